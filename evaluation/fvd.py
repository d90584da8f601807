"""Fréchet Video Distance between two sets of clips, from a local I3D; rFVD when the sets are originals
and their reconstructions.

    fvd = FrechetVideoDistance.from_local("i3d_torchscript.pt")
    fvd.update(real, fake)      # batches of videos (B, 3, T, H, W) in [-1, 1], as many calls as needed
    fvd.compute()               # the distance, from all the clips seen

The detector is the TorchScript Kinetics-400 I3D that most FVD code uses (the port of the network behind
Unterthiner et al.'s FVD, `i3d_torchscript.pt`), loaded from a local path, never downloaded. Clips are
resized so the short side is 224 (bilinear, per frame), centre-cropped to 224x224, and passed in [-1, 1]
as `detector(x, rescale=False, resize=False, return_features=True)`, which returns the 400 logits before
the softmax. Any module with that call works, which is how the tests use a tiny random one. The file is
TorchScript, so it is read with torch.jit.load, which PyTorch now marks as deprecated; there is no other
form of those weights in common use.

The distance is ||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)) over the feature statistics. It
needs many clips to mean anything (FVD is usually reported on 256 or more): the covariance of a few
clips is rank-deficient, and the figure is then biased upwards. The number of clips is reported with it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from errors import InputError, MissingInputError

I3D_SIZE = 224


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

    tr(sqrt(S1 S2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    positive semi-definite matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2.
    """
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


def to_i3d_input(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> (B, 3, T, 224, 224): short side to 224, then a centre crop."""
    b, c, t, h, w = video.shape
    scale = I3D_SIZE / min(h, w)
    size = (max(I3D_SIZE, round(h * scale)), max(I3D_SIZE, round(w * scale)))
    frames = video.transpose(1, 2).reshape(b * t, c, h, w).float()
    frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - I3D_SIZE) // 2, (size[1] - I3D_SIZE) // 2
    frames = frames[:, :, top : top + I3D_SIZE, left : left + I3D_SIZE]
    return frames.reshape(b, t, c, I3D_SIZE, I3D_SIZE).transpose(1, 2).clamp(-1, 1).contiguous()


class FrechetVideoDistance:
    def __init__(self, detector, device: str | torch.device = "cpu"):
        self.detector = detector
        self.device = torch.device(device)
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []

    @classmethod
    def from_local(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "FrechetVideoDistance":
        if not os.path.isfile(path):
            raise MissingInputError(f"no I3D detector at {path}: rFVD needs a local TorchScript I3D "
                                    f"(i3d_torchscript.pt); nothing is downloaded")
        return cls(torch.jit.load(str(path), map_location=device).eval(), device)

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> torch.Tensor:
        x = to_i3d_input(video.to(self.device))
        return self.detector(x, rescale=False, resize=False, return_features=True).double().cpu()

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        self.real.append(self.features(real))
        self.fake.append(self.features(fake))

    @property
    def count(self) -> int:
        return sum(len(f) for f in self.real)

    def compute(self) -> float:
        return fvd_from_features(torch.cat(self.real), torch.cat(self.fake))


def fvd_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FVD between two sets of detector features (N, F) and (M, F)."""
    if min(len(real), len(fake)) < 2:
        raise InputError(f"FVD needs at least 2 clips per set (and hundreds to be meaningful); got {len(real)} and {len(fake)}")
    real, fake = real.double(), fake.double()
    return frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))


def fvd_interval(real: torch.Tensor, fake: torch.Tensor, *, resamples: int = 200, level: float = 0.9,
                 seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of the FVD between feature sets (N, F) and (M, F): both sets resampled with
    replacement `resamples` times (seeded), the central `level` of the distances. It shows how much the figure
    moves with the clips drawn; it does not remove FVD's upward bias at small counts, which the count reported
    beside it says."""
    if min(len(real), len(fake)) < 2:
        raise InputError(f"FVD needs at least 2 clips per set; got {len(real)} and {len(fake)}")
    g = torch.Generator().manual_seed(seed)
    real, fake = real.double(), fake.double()
    values = []
    for _ in range(resamples):
        r = real[torch.randint(len(real), (len(real),), generator=g)]
        f = fake[torch.randint(len(fake), (len(fake),), generator=g)]
        values.append(fvd_from_features(r, f))
    low, high = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(low), float(high)
