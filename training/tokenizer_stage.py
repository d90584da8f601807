"""The tokenizer stage: L1 + KL (+ LPIPS) + a 3D patch discriminator with hinge loss and adaptive weight
after a warm-up; a fresh run starts as the linear codec fitted to data; the latent statistics are measured
on the data at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from checkpoint_io import save_checkpoint
from data import make_loader
from data.video_io import size_pair
from errors import InputError
from evaluation.lpips import LPIPS
from evaluation.metrics import psnr
from parallel import Env, ParallelOptions, parallelize, unsharded, unwrap
from tokenizer import CausalVAE, fit_linear_codec
from tokenizer import preset as vae_preset
from tokenizer.latent_stats import latent_moments, stats_from_moments
from tokenizer.losses import (LossConfig, PatchDiscriminator3D, adaptive_weight, hinge_d_loss,
                              reconstruction_loss)
from tokenizer.model import ResBlock

from .optim import adamw
from .options import parse_overrides
from .stage import autocast, image_step, sample_generator

log = logging.getLogger("train")


class TokenizerStage:
    name = "tokenizer"

    def __init__(self, args, env: Env):
        self.args, self.env = args, env
        self.model = CausalVAE(vae_preset(args.preset, **parse_overrides(args.override))).to(env.device)
        self.crop = (args.frames, size_pair(args.size))  # what initialize() and finish() read (the loop sets it with buckets)
        if not args.buckets:
            self.model.check_video(torch.empty(1, 3, args.frames, *size_pair(args.size), device="meta"))
        self.block_types = (ResBlock,)
        self.loss_cfg = LossConfig(kl_weight=args.kl_weight, lpips_weight=args.lpips_weight, disc_weight=args.disc_weight,
                                   disc_start=args.disc_start, recon=args.recon_loss,
                                   boundary_weight=args.boundary_weight,
                                   temporal_factor=self.model.config.temporal_factor)
        self.lpips = None
        if args.lpips_weight > 0:
            if not (args.lpips_vgg and args.lpips_heads):
                raise InputError("--lpips-weight needs --lpips-vgg (VGG16 weights) and --lpips-heads (LPIPS linear "
                                 "heads), both local files; nothing is downloaded")
            self.lpips = LPIPS.from_local(args.lpips_vgg, args.lpips_heads).to(env.device).eval().requires_grad_(False)
        self.disc = self.disc_opt = None
        if args.disc_weight > 0:
            self.disc = PatchDiscriminator3D(self.loss_cfg.disc_channels, self.loss_cfg.disc_layers).to(env.device)
            self.disc = parallelize(self.disc, env, ParallelOptions((), "ddp"))
            self.disc_opt = adamw(self.disc.parameters(), env.device, lr=args.disc_lr, betas=(0.5, 0.9))
        self._recon: torch.Tensor | None = None
        self.buckets, self.schedule = None, None  # the loop's buckets and the loader's schedule, with --buckets

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.model.config)

    def shape_multiple(self) -> tuple[int, int]:
        """What a bucket's height and width must be multiples of."""
        return self.model.config.spatial_factor, self.model.config.spatial_factor

    def check_frames(self, frames: int) -> None:
        self.model.check_video(torch.empty(1, 3, frames, *self.shape_multiple(), device="meta"))

    @torch.no_grad()
    def initialize(self) -> None:
        """A fresh run starts as the linear codec fitted to the first --pca-init-clips clips (the same on
        every rank: each reads them all), so training begins at a linear codec's quality, not at noise."""
        n = self.args.pca_init_clips
        if n <= 0 or not self.model.config.linear_codec:
            return
        # a shuffled stream with random windows and crops (zoomed and flipped as training's are), seeded and read
        # in full by every rank
        loader = make_loader(self.args.data, min(n, 16), *self.crop, mode="train", num_workers=0, fps=self.args.fps,
                             zoom=self.args.zoom, hflip=self.args.hflip, seed=self.args.seed + 1, rank=0, world_size=1)
        clips = []
        for batch in loader:
            clips.append(batch["video"])
            if sum(len(c) for c in clips) >= n:
                break
        if not clips:
            raise InputError(f"no readable clips in {self.args.data} to initialise the tokenizer from")
        kept = fit_linear_codec(self.model, torch.cat(clips)[:n].to(self.env.device))
        if self.env.main:
            log.info("initialised as the linear codec of %d clips (%.2f%% of their energy reconstructed)",
                     min(n, sum(len(c) for c in clips)), 100 * kept)

    def tokens(self, batch: dict) -> int:
        return math.prod(self.model.latent_shape(*batch["video"].shape[2:])[1:])

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        video = batch["video"].to(self.env.device, non_blocking=True)
        if image_step(self.args.seed, step, self.args.image_prob):
            video = video[:, :, :1]  # images train with videos: a one-frame clip
        with autocast(self.env.device, self.args.precision):
            recon, posterior = model(video, sample_posterior=True,
                                     generator=sample_generator(self.args.seed, step, batch["key"][0], "posterior"))
        recon = recon.float()
        rec, total, logs = reconstruction_loss(video, recon, posterior, self.loss_cfg, self.lpips)
        self._recon = None
        if self.disc is not None and step >= self.loss_cfg.disc_start:
            disc = unwrap(self.disc)  # not the DDP wrapper: this pass must not touch its gradient sync
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            disc.requires_grad_(True)
            last_layer = unwrap(model).decoder.conv_out.conv.weight  # VQGAN's choice: the decoder's last weight
            weight = adaptive_weight(rec, g_loss, last_layer) if torch.is_grad_enabled() else torch.tensor(1.0)
            total = total + self.loss_cfg.disc_weight * weight * g_loss
            logs |= {"g_loss": g_loss.item(), "adaptive_weight": weight.item()}
            self._recon = recon.detach()
            self._real = video
        return total, logs

    def after_backward(self, step: int, last_micro: bool, micro_batches: int) -> dict:
        """The discriminator's update, on the reconstructions of the micro-batch just trained on."""
        if self._recon is None:
            return {}
        sync = self.disc.no_sync() if (not last_micro and hasattr(self.disc, "no_sync")) else contextlib.nullcontext()
        with sync:
            d_loss = hinge_d_loss(self.disc(self._real), self.disc(self._recon))
            (d_loss / micro_batches).backward()
        if last_micro:
            self.disc_opt.step()
            self.disc_opt.zero_grad(set_to_none=True)
        self._recon = self._real = None
        return {"d_loss": d_loss.item()}

    def state_dict(self) -> dict:
        if self.disc is None:
            return {}
        model_sd, optim_sd = get_state_dict(unwrap(self.disc), self.disc_opt)
        return {"disc": model_sd, "disc_optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is None:
            return
        set_state_dict(unwrap(self.disc), self.disc_opt, model_state_dict=state["disc"], optim_state_dict=state["disc_optim"])

    @torch.no_grad()
    def preview(self, ema: nn.Module, batch: dict) -> tuple[list[tuple[str, torch.Tensor, str | None]], dict]:
        """Originals beside their reconstructions by the EMA weights: (name, video, caption) items and the PSNR."""
        video = batch["video"][:4].to(self.env.device)
        with unsharded(ema):  # encode and decode are not the forward, which FSDP2 would gather for
            recon = ema.decode(ema.encode(video).mode()).clamp(-1, 1)
        items = [(key, torch.cat([original, rebuilt], dim=3), None) for key, original, rebuilt in zip(batch["key"], video, recon)]
        return items, {"preview/psnr": float(psnr(recon, video).mean())}

    @torch.no_grad()
    def finish(self, ema: nn.Module) -> dict:
        """Measure the latent statistics on the training data (all ranks) and store them in the model."""
        loader = make_loader(self.args.data, self.args.batch_size, *self.crop, mode="eval",
                             num_workers=self.args.num_workers, fps=self.args.fps)
        moments = torch.zeros(3, ema.config.latent_channels, dtype=torch.float64, device=self.env.device)
        with unsharded(ema):
            for i, batch in enumerate(loader):
                if i >= self.args.stats_batches:
                    break
                moments += latent_moments(ema.encode(batch["video"].to(self.env.device)).mode())
        if dist.is_initialized():
            dist.all_reduce(moments)
        if moments[0, 0] == 0:
            raise InputError(f"no readable clips in {self.args.data} to measure the latent statistics on")
        mean, std = stats_from_moments(moments, per_channel=self.args.latent_norm == "channel")
        ema.set_latent_stats(mean, std)
        return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}

    def export(self, ema: nn.Module, state: dict[str, torch.Tensor], directory: Path, step: int,
               previous: Path | None = None) -> None:
        save_checkpoint(directory, dataclasses.asdict(ema.config), state, kind="tokenizer", step=step)
