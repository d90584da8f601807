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
    tl = latent_shape[1]
    per_frame = math.prod(latent_shape) / (c * tl)
    scale = math.sqrt(h * w / per_frame)
    small = (tl, max(1, round(h / scale)), max(1, round(w / scale)))
    down = F.interpolate(video.float(), size=small, mode="trilinear", align_corners=False)
    return F.interpolate(down, size=(t, h, w), mode="trilinear", align_corners=False)
