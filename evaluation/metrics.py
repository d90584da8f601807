"""Reconstruction metrics on videos in [0, 1]: PSNR and SSIM, batched in torch.

Conventions (stated in every evaluation report):
- PSNR: per video, from the mean squared error over all its frames, pixels and channels, with a peak
  of 1; then averaged over videos. A perfect reconstruction is capped at 100 dB.
- SSIM: per frame, on each RGB channel with an 11-tap Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, population covariances, averaged over the frame without the 5-pixel border the window
  cannot cover; then averaged over channels and frames. This equals scikit-image's
  `structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1, channel_axis=-1)` frame by frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # scipy's gaussian_filter truncates at 3.5 sigma: radius 5, 11 taps
MAX_PSNR = 100.0
LATENT_LIMIT = 1e4  # working latents are units to tens (normalised ones about 1); a diverged model's are not


def unusable(x: torch.Tensor, latents: bool) -> str | None:
    """Why a model's output is no video, or None: "not finite (NaN or inf)" (NaN is black once rounded to 8 bits),
    or for latents "up to X" beyond LATENT_LIMIT. What sample.py and tokenizer.evaluate refuse to write or score."""
    if not bool(torch.isfinite(x).all()):
        return "not finite (NaN or inf)"
    if latents and float(x.abs().max()) > LATENT_LIMIT:
        return f"up to {float(x.abs().max()):.3g}"
    return None


def to_unit_range(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clipped."""
    return ((video + 1) / 2).clamp(0, 1)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) for signals in [0, 1], capped at MAX_PSNR (a perfect match)."""
    return (10 * torch.log10(1.0 / mse.double().clamp_min(1e-30))).clamp(max=MAX_PSNR)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR per video (B,) of (B, C, T, H, W) tensors in [0, 1], over all frames of each video."""
    return psnr_from_mse((a.double() - b.double()).pow(2).flatten(1).mean(1))


def _gaussian_kernel(device, dtype) -> torch.Tensor:
    x = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / _SSIM_SIGMA) ** 2)
    return k / k.sum()


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over H and W of (N, 1, H, W), without padding: the output is the valid interior."""
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return F.conv2d(x, k.view(1, 1, 1, -1))


def ssim_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame: (B, C, T, H, W) in [0, 1] -> (B, T), averaged over channels."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    bsz, c, t, h, w = a.shape
    if min(h, w) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * _SSIM_RADIUS + 1}x{2 * _SSIM_RADIUS + 1}, got {h}x{w}")
    x = a.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)  # (B * T * C, 1, H, W)
    y = b.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    k = _gaussian_kernel(x.device, x.dtype)
    mx, my = _blur(x, k), _blur(y, k)
    vx = _blur(x * x, k) - mx * mx
    vy = _blur(y * y, k) - my * my
    cxy = _blur(x * y, k) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).view(bsz, t, c).mean(-1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per video (B,): the mean over its frames."""
    return ssim_frames(a, b).mean(1)


def equal_floats_baseline(video: torch.Tensor, latent_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Trilinear down- then up-sampling to a 3-channel grid holding as many floats as latents of
    `latent_shape` (C, t, h, w) per video.

    The honest baseline for a tokenizer: the same number of floats as its latents, spent on a plain
    lower-resolution copy. Time is kept at the latents' frame count t; the spatial factor is chosen so that
    3 x t x h' x w' matches C x t x h x w (e.g. 16 channels at 4x8x8 is 3 channels at 4x3.46x3.46).
    (B, 3, T, H, W) in [-1, 1] -> the same shape.
    """
    b, c, t, h, w = video.shape
    small = _baseline_grid(h, w, c, latent_shape)
    down = F.interpolate(video.float(), size=small, mode="trilinear", align_corners=False)
    return F.interpolate(down, size=(t, h, w), mode="trilinear", align_corners=False)


def _baseline_grid(height: int, width: int, channels: int, latent_shape) -> tuple[int, int, int]:
    tl = latent_shape[1]
    per_frame = math.prod(latent_shape) / (channels * tl)
    scale = math.sqrt(height * width / per_frame)
    return tl, max(1, round(height / scale)), max(1, round(width / scale))


class StreamingBaseline:
    """`equal_floats_baseline` of a clip seen a chunk of frames at a time, for clips too long to hold: `add` each
    chunk in order (shrunk at once to the baseline's grid, a few floats a frame), `finish`, then `frames(a, b)`
    gives the baseline's frames [a, b). Trilinear interpolation is separable, so shrinking each frame and then
    interpolating in time is the same map (equal to float rounding)."""

    def __init__(self, frames: int, height: int, width: int, latent_shape, channels: int = 3):
        self.frames, self.size = frames, (height, width)
        self.tl, self.hs, self.ws = _baseline_grid(height, width, channels, latent_shape)
        self.parts: list[torch.Tensor] = []
        self.grid: torch.Tensor | None = None

    def add(self, chunk: torch.Tensor) -> None:
        """Frames (1, C, n, H, W) in [-1, 1], the next ones of the clip."""
        frames = chunk[0].float().transpose(0, 1)  # (n, C, H, W)
        self.parts.append(F.interpolate(frames, size=(self.hs, self.ws), mode="bilinear", align_corners=False))

    def finish(self) -> None:
        small = torch.cat(self.parts)  # (T, C, hs, ws)
        if len(small) != self.frames:
            raise ValueError(f"{len(small)} frames were added for a clip of {self.frames}")
        t, c = small.shape[:2]
        series = small.permute(1, 2, 3, 0).reshape(1, -1, t)  # every grid cell's values over time
        down = F.interpolate(series, size=self.tl, mode="linear", align_corners=False)
        up = F.interpolate(down, size=t, mode="linear", align_corners=False)
        self.grid = up.reshape(c, self.hs, self.ws, t).permute(3, 0, 1, 2)  # (T, C, hs, ws)
        self.parts = []

    def frames_between(self, a: int, b: int) -> torch.Tensor:
        """The baseline's frames [a, b) as (1, C, b - a, H, W)."""
        out = F.interpolate(self.grid[a:b], size=self.size, mode="bilinear", align_corners=False)
        return out.transpose(0, 1).unsqueeze(0)


def group_starts(frames: int, temporal_factor: int) -> list[int]:
    """The frames that start a latent group of a causal tokenizer, after the first (an image, encoded alone):
    1, 1 + tf, 1 + 2 tf, ..."""
    return list(range(1, frames, temporal_factor))


def frame_errors(original: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame of videos (B, 3, T, H, W) on [0, 1], summed over the batch: the squared error (T,), and the
    motion error (T,): the mean |(r_t - r_{t-1}) - (o_t - o_{t-1})| of the frame-to-frame change, 0 at t = 0.
    Both are means over pixels and channels, summed over videos (divide by the count of videos)."""
    a, b = original.double(), recon.double()
    sq = (a - b).pow(2).mean(dim=(1, 3, 4)).sum(0)
    motion = torch.zeros_like(sq)
    if a.shape[2] > 1:
        motion[1:] = ((b.diff(dim=2) - a.diff(dim=2)).abs()).mean(dim=(1, 3, 4)).sum(0)
    return sq, motion


def seam_ratios(sq: torch.Tensor, motion: torch.Tensor, temporal_factor: int) -> dict:
    """From per-frame sums of `frame_errors`: the reconstruction error and the motion error at frames that start
    a latent group against the other frames after the first (above 1: a seam where groups meet). NaN when the
    clip has no group boundary (one frame) or no frame inside a group (temporal_factor 1)."""
    t = len(sq)
    starts = set(group_starts(t, temporal_factor))
    inside = [i for i in range(1, t) if i not in starts]
    if not starts or not inside:
        return {"error_ratio": float("nan"), "motion_ratio": float("nan")}
    at = sorted(starts)
    err_at, err_in = float(sq[at].mean()), float(sq[inside].mean())
    mot_at, mot_in = float(motion[at].mean()), float(motion[inside].mean())
    return {"error_ratio": err_at / err_in if err_in > 0 else float("nan"),
            "motion_ratio": mot_at / mot_in if mot_in > 0 else float("nan"),
            "group_starts": at}
