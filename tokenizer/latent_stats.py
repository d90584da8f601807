"""The latent statistics that make the DiT's inputs unit-scale: per-channel mean and std of the posterior
means over data, from moments that add up over batches and ranks.

    moments = sum(latent_moments(vae.encode(batch).mode()) for batch in batches)   # (3, L) float64
    mean, std = stats_from_moments(moments)        # then vae.set_latent_stats(mean, std)
"""

from __future__ import annotations

import torch


def latent_moments(z: torch.Tensor) -> torch.Tensor:
    """(3, L) float64: per channel, the count, the sum and the sum of squares of latents z (B, L, t, h, w)."""
    per_channel = z.double().transpose(0, 1).flatten(1)  # (L, B * t * h * w)
    count = per_channel.new_full((per_channel.shape[0],), per_channel.shape[1])
    return torch.stack([count, per_channel.sum(1), per_channel.pow(2).sum(1)])


def stats_from_moments(moments: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (L,) float32, from summed moments. per_channel=False gives every channel one scale
    (the root mean of their variances), which keeps their relative energies: the weak channels of a PCA-like
    code then stay weak, so the DiT spends less on them."""
    count, total, squares = moments
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    if not per_channel:
        std = std.pow(2).mean().sqrt().expand_as(std)
    return mean.float(), std.float()
