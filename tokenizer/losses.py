"""The tokenizer's training losses: L1 + KL + optional LPIPS + a 3D patch discriminator (hinge, adaptive weight).

    rec   = |x - x_hat|  (+ lpips_weight * LPIPS per frame, when LPIPS weights are given)
    total = rec + kl_weight * KL / pixel values + disc_weight * lambda * (-D(x_hat))     (the GAN term after disc_start)

lambda is the adaptive weight of VQGAN (Esser et al. 2021): the ratio of the gradient norms of the
reconstruction and adversarial terms at the decoder's last layer, so the adversarial term never dominates
whatever the scale of the discriminator. The discriminator is trained with the hinge loss on real clips and
detached reconstructions, by its own optimiser (the trainer's tokenizer stage owns it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import DiagonalGaussian


@dataclass(frozen=True)
class LossConfig:
    kl_weight: float = 1e-6  # on the KL summed over a clip's latents, against the L1 summed over its pixels
    # the pixel term: l1 (LDM's) or mse (squared error, what PSNR measures; see bench/tokenizer_diagnosis.py)
    recon: str = "l1"
    lpips_weight: float = 0.0  # 0: no perceptual term (it needs local LPIPS weights)
    disc_weight: float = 0.0  # 0: no discriminator
    disc_start: int = 2000  # optimiser steps before the adversarial term is switched on
    disc_channels: int = 64
    disc_layers: int = 3
    # the pixel term's weight on the frames where latent groups meet (each group's first and last frame, against
    # 1 inside; rescaled so the weights average 1): a block code in time reconstructs a group's middle frames
    # best, and the error that rises at its ends pulses at the latent frame rate (the seam ratios)
    boundary_weight: float = 1.0
    temporal_factor: int = 4  # frames per latent group (the tokenizer's)


class PatchDiscriminator3D(nn.Module):
    """Real/fake logits per spacetime patch for video (B, 3, T, H, W) in [-1, 1].

    Strided 3D convolutions (PatchGAN over space and time, as MAGVIT and Open-Sora's VAE), with GroupNorm
    rather than BatchNorm so that its statistics do not depend on the batch or on other ranks.
    """

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(in_channels, channels, 3, stride=(1, 2, 2), padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(layers - 1):
            c_out = min(channels * 2 ** (i + 1), 8 * channels)
            stride = (2, 2, 2) if i % 2 == 0 else (1, 2, 2)
            mods += [nn.Conv3d(c, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(32, c_out // 4), c_out),
                     nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)  # (B, 1, t, h, w) logits


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d W|| / ||d gan / d W|| at the decoder's last weight W, clamped to [0, 1e4], no gradient."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def frame_weights(frames: int, temporal_factor: int, boundary_weight: float) -> torch.Tensor:
    """(frames,) weights averaging 1: `boundary_weight` times the others at each latent group's first and last
    frame (frames 1 + k tf and k tf; frame 0, a group of its own, counts as inside)."""
    w = torch.ones(frames, dtype=torch.float64)
    t = torch.arange(frames)
    starts, ends = (t - 1) % temporal_factor == 0, t % temporal_factor == 0
    w[(t > 0) & (starts | ends)] = boundary_weight
    return w / w.mean()


def reconstruction_loss(video: torch.Tensor, recon: torch.Tensor, posterior: DiagonalGaussian, cfg: LossConfig,
                        lpips: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(reconstruction term, reconstruction + KL, logged values) for video and recon (B, 3, T, H, W)."""
    diff = video - recon
    abs_err, sq_err = diff.abs(), diff.pow(2)
    l1, mse = abs_err.mean(), sq_err.mean()
    if cfg.recon not in ("l1", "mse"):
        raise ValueError(f"the reconstruction loss must be 'l1' or 'mse', got {cfg.recon!r}")
    rec = l1 if cfg.recon == "l1" else mse
    if cfg.boundary_weight != 1.0 and video.shape[2] > 1:
        per_frame = (abs_err if cfg.recon == "l1" else sq_err).mean(dim=(0, 1, 3, 4))  # (T,)
        w = frame_weights(video.shape[2], cfg.temporal_factor, cfg.boundary_weight).to(per_frame)
        rec = (per_frame * w).mean()
    logs = {"l1": l1.item(), "mse": mse.item()}
    if lpips is not None and cfg.lpips_weight > 0:
        p = lpips.video(recon, video).mean()
        rec = rec + cfg.lpips_weight * p
        logs["lpips"] = p.item()
    # as LDM's VAE loss (sums over each sample, KL weight 1e-6) with both sums divided by the pixel values
    kl = posterior.kl().mean() / video[0].numel()
    logs["kl"] = kl.item()
    return rec, rec + cfg.kl_weight * kl, logs
