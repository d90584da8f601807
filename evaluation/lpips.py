"""LPIPS (Zhang et al., 2018) with a VGG16 backbone, loaded from local weight files, never downloaded.

    lpips = LPIPS.from_local(vgg_path="vgg16-397923af.pth", lin_path="lpips_vgg_v0.1.pth")
    distance = lpips(a, b)             # (N,) for frames (N, 3, H, W) in [-1, 1]
    per_video = lpips.video(x, y)      # (B,) for videos (B, 3, T, H, W), averaged over frames

Weights: `vgg_path` is torchvision's ImageNet VGG16 state dict (keys `features.N.weight`; other keys
are ignored) and `lin_path` the LPIPS linear heads of the `lpips` package (`lin0.model.1.weight`, ...,
`lin4.model.1.weight`, each (1, C, 1, 1)). Both are read with `torch.load(weights_only=True)`: plain
tensors, no code. The backbone is written out here with torchvision's layer indices, so no torchvision
import is needed.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from errors import InputError, MissingInputError

# VGG16 "D" configuration: conv widths, "M" for max-pooling. torchvision's `features` indices follow it.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_TAPS = (3, 8, 15, 22, 29)  # the ReLU after conv1_2, conv2_2, conv3_3, conv4_3, conv5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# input normalisation of LPIPS ("ScalingLayer"), for inputs in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
            cin = v
    return nn.Sequential(*layers[: _TAPS[-1] + 1])  # nothing after the last tap is used


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_local(cls, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> "LPIPS":
        model = cls()
        for path, what in ((vgg_path, "VGG16 backbone"), (lin_path, "LPIPS linear heads")):
            if not os.path.isfile(path):
                raise MissingInputError(f"no {what} weights at {path}: LPIPS needs local weight files (nothing is downloaded)")
        vgg = torch.load(vgg_path, map_location="cpu", weights_only=True)
        backbone = {k.removeprefix("features."): v for k, v in vgg.items() if k.startswith("features.")}
        backbone = {k: v for k, v in backbone.items() if int(k.split(".")[0]) <= _TAPS[-1]}
        model.features.load_state_dict(backbone)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        try:
            model.lins.load_state_dict({f"{i}.weight": lin[f"lin{i}.model.1.weight"] for i in range(len(_TAPS))})
        except KeyError as e:
            raise InputError(f"{lin_path} is not an LPIPS linear-head file: missing {e}") from None
        return model

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance per image (N,) for (N, 3, H, W) in [-1, 1]."""
        dist = a.new_zeros(a.shape[0])
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length across channels
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            dist = dist + lin((na - nb).pow(2)).mean(dim=(1, 2, 3))
        return dist

    def video(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS over frames per video (B,), for (B, 3, T, H, W) in [-1, 1]."""
        b, c, t, h, w = x.shape
        frames = lambda v: v.transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
        return self(frames(x), frames(y)).view(b, t).mean(1)
