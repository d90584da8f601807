#!/usr/bin/env python
"""Train the video tokenizer or the text-to-video DiT, from one CPU to many GPUs.

    # the quickstart: synthetic shards, the tiny tokenizer, then the tiny DiT, on the CPU; writes samples
    python train.py

    # one process (one GPU, or the CPU)
    python train.py --stage tokenizer --preset small --data shards/ --out runs/vae --frames 17 --size 128
    python train.py --stage dit --preset B --data shards/ --vae runs/vae/model --out runs/dit

    # one node, 8 GPUs (DDP; add --parallel fsdp for models that do not fit one GPU)
    torchrun --nproc_per_node 8 train.py --stage dit --preset XL --data shards/ --vae runs/vae/model --out runs/dit

    # several nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        train.py --stage dit ...

    # long clips: each clip's tokens split over 8 ranks (Ulysses sequence parallelism), FSDP2 over all ranks
    torchrun --nnodes 4 --nproc_per_node 8 ... train.py --stage dit --preset 1.3B --parallel fsdp --sp-size 8 ...

    # SLURM: one task per node, torchrun starts the GPU processes
    #   #SBATCH --nodes 4 --ntasks-per-node 1 --gpus-per-node 8
    #   head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    #   srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \\
    #        --rdzv_endpoint "$head:29500" --rdzv_id "$SLURM_JOB_ID" train.py --stage dit ...

NCCL on CUDA, gloo on the CPU. Running again with the same --out resumes from its last checkpoint
(model, EMA, optimiser, scheduler, step, RNG and the data stream's position) and says so. SIGTERM
(preemption) writes a checkpoint before the process exits. The resolved configuration is written to
OUT/config.json, the metrics to OUT/metrics.jsonl, checkpoints to OUT/checkpoints/, the EMA weights
for sampling to OUT/model/ and preview videos to OUT/previews/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from data import make_loader, write_video
from data.video_io import check_frame_count
from dit3d.condition import ConditionConfig, given_mask
from parallelize import (Env, apply_activation_checkpointing, apply_sequence_parallel, compile_blocks, data_parallel,
                         setup_distributed, teardown_distributed, unwrap)
from pipeline import PIPELINE_FILE, TextToVideo, derived_seed, generate_latents, text_inputs

log = logging.getLogger("train")

QUICKSTART_DIR = Path("runs/quickstart")
# The quickstart DiT's timestep shift, in training and sampling. Which way the object moves is settled at the
# highest noise levels (t above about 0.95), where at shift 3 only about 3% of the training draws fall and at
# shift 6 about 12%. With the tiny preset's absolute positions, seed 0 reached 97.5% direction accuracy on
# held-out captions (R^2 0.95) at shift 3 and 100% (R^2 0.99) at shift 6; seeds 0-2 all 100% at shift 6.
QUICKSTART_SHIFT = 6


# ---- distributed setup --------------------------------------------------------------------------


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sample_generator(seed: int, step: int, key: str, purpose: str = "") -> torch.Generator:
    """A CPU generator for one sample at one step: its noise, time and caption dropout depend on the sample
    and the step alone, not on how samples are spread over ranks and micro-batches, so 1 process with
    gradient accumulation and N processes with DDP take the same steps, and a resumed run repeats nothing."""
    return torch.Generator().manual_seed(derived_seed(seed, step, key, purpose))


def image_step(seed: int, step: int, prob: float) -> bool:
    """Whether this step trains on images (each clip's first frame): the same answer on every rank."""
    return prob > 0 and torch.rand((), generator=sample_generator(seed, step, "", "image")).item() < prob


def preview_fps(args, batch: dict) -> float:
    """Frame rate of preview videos: the training --fps, else the clips' own, else 8."""
    return float(args.fps or batch["fps"][0].item() or 8.0)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --override takes KEY=VALUE (e.g. depth=8), got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# ---- the tokenizer stage ------------------------------------------------------------------------


class TokenizerStage:
    """L1 + KL (+ LPIPS) + a 3D patch discriminator with hinge loss and adaptive weight after a warm-up."""

    name = "tokenizer"

    def __init__(self, args, env: Env):
        from tokenizer import CausalVAE
        from tokenizer import preset as vae_preset
        from tokenizer.losses import LossConfig, PatchDiscriminator3D
        from tokenizer.model import ResBlock

        self.args, self.env = args, env
        self.model = CausalVAE(vae_preset(args.preset, **parse_overrides(args.override))).to(env.device)
        self.model.check_video(torch.empty(1, 3, args.frames, args.size, args.size, device="meta"))
        self.block_types = (ResBlock,)
        self.loss_cfg = LossConfig(kl_weight=args.kl_weight, lpips_weight=args.lpips_weight, disc_weight=args.disc_weight,
                                   disc_start=args.disc_start)
        self.lpips = None
        if args.lpips_weight > 0:
            if not (args.lpips_vgg and args.lpips_heads):
                raise SystemExit("error: --lpips-weight needs --lpips-vgg (VGG16 weights) and --lpips-heads (LPIPS "
                                 "linear heads), both local files; nothing is downloaded")
            from tokenizer.lpips import LPIPS

            self.lpips = LPIPS.from_local(args.lpips_vgg, args.lpips_heads).to(env.device).eval().requires_grad_(False)
        self.disc = self.disc_opt = None
        if args.disc_weight > 0:
            self.disc = PatchDiscriminator3D(self.loss_cfg.disc_channels, self.loss_cfg.disc_layers).to(env.device)
            self.disc = data_parallel(self.disc, "ddp" if env.world > 1 else "none", device=env.device)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9),
                                              fused=env.device.type == "cuda")
        self._recon: torch.Tensor | None = None

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.model.config)

    @torch.no_grad()
    def initialize(self) -> None:
        """A fresh run starts as the linear codec fitted to the first --pca-init-clips clips (the same on
        every rank: each reads them all), so training begins at a linear codec's quality, not at noise."""
        n = self.args.pca_init_clips
        if n <= 0 or not self.model.config.linear_codec:
            return
        # a shuffled stream with random windows and crops, seeded and read in full by every rank
        loader = make_loader(self.args.data, min(n, 16), self.args.frames, self.args.size, mode="train",
                             num_workers=0, fps=self.args.fps, seed=self.args.seed + 1, rank=0, world_size=1)
        clips = []
        for batch in loader:
            clips.append(batch["video"])
            if sum(len(c) for c in clips) >= n:
                break
        if not clips:
            raise SystemExit(f"error: no readable clips in {self.args.data} to initialise the tokenizer from")
        kept = self.model.init_linear_codec(torch.cat(clips)[:n].to(self.env.device))
        if self.env.main:
            log.info("initialised as the linear codec of %d clips (%.2f%% of their energy reconstructed)",
                     min(n, sum(len(c) for c in clips)), 100 * kept)

    def tokens(self, batch: dict) -> int:
        return math.prod(self.model.latent_shape(*batch["video"].shape[2:])[1:])

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        from tokenizer.losses import reconstruction_loss

        video = batch["video"].to(self.env.device, non_blocking=True)
        if image_step(self.args.seed, step, self.args.image_prob):
            video = video[:, :, :1]  # images train with videos: a one-frame clip
        with autocast(self.env.device):
            recon, posterior = model(video, sample_posterior=True,
                                     generator=sample_generator(self.args.seed, step, batch["key"][0], "posterior"))
        recon = recon.float()
        rec, total, logs = reconstruction_loss(video, recon, posterior, self.loss_cfg, self.lpips)
        self._recon = None
        if self.disc is not None and step >= self.loss_cfg.disc_start:
            from tokenizer.losses import adaptive_weight

            disc = unwrap(self.disc)  # not the DDP wrapper: this pass must not touch its gradient sync
            disc.requires_grad_(False)
            g_loss = -disc(recon).mean()
            disc.requires_grad_(True)
            weight = adaptive_weight(rec, g_loss, recon) if torch.is_grad_enabled() else torch.tensor(1.0)
            total = total + self.loss_cfg.disc_weight * weight * g_loss
            logs |= {"g_loss": g_loss.item(), "adaptive_weight": weight.item()}
            self._recon = recon.detach()
            self._real = video
        return total, logs

    def after_backward(self, step: int, last_micro: bool, micro_batches: int) -> dict:
        """The discriminator's update, on the reconstructions of the micro-batch just trained on."""
        if self._recon is None:
            return {}
        from tokenizer.losses import hinge_d_loss

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
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(unwrap(self.disc), self.disc_opt)
        return {"disc": model_sd, "disc_optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is None or not state:
            return
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(unwrap(self.disc), self.disc_opt, model_state_dict=state["disc"], optim_state_dict=state["disc_optim"])

    @torch.no_grad()
    def preview(self, ema: nn.Module, batch: dict) -> tuple[list[tuple[str, torch.Tensor, str | None]], dict]:
        """Originals beside their reconstructions by the EMA weights: (name, video, caption) items and the PSNR."""
        from tokenizer.metrics import psnr

        video = batch["video"][:4].to(self.env.device)
        recon = ema.decode(ema.encode(video).mode()).clamp(-1, 1)
        items = [(key, torch.cat([original, rebuilt], dim=3), None) for key, original, rebuilt in zip(batch["key"], video, recon)]
        return items, {"preview/psnr": float(psnr(recon, video).mean())}

    @torch.no_grad()
    def finish(self, ema: nn.Module) -> dict:
        """Measure the per-channel latent statistics on the training data (all ranks), store them in the model."""
        loader = make_loader(self.args.data, self.args.batch_size, self.args.frames, self.args.size, mode="eval",
                             num_workers=self.args.num_workers, fps=self.args.fps)
        sums = torch.zeros(3, ema.config.latent_channels, dtype=torch.float64, device=self.env.device)
        for i, batch in enumerate(loader):
            if i >= self.args.stats_batches:
                break
            z = ema.encode(batch["video"].to(self.env.device)).mode().double()  # (B, L, t, h, w)
            per_channel = z.transpose(0, 1).flatten(1)  # (L, B * t * h * w)
            sums += torch.stack([per_channel.new_full((per_channel.shape[0],), per_channel.shape[1]),
                                 per_channel.sum(1), per_channel.pow(2).sum(1)])
        if dist.is_initialized():
            dist.all_reduce(sums)
        count, total, squares = sums
        if count[0] == 0:
            raise SystemExit("error: no readable clips to measure the latent statistics on")
        mean = total / count
        std = (squares / count - mean**2).clamp_min(0).sqrt()
        if self.args.latent_norm == "global":  # one scale for all channels: keeps their relative energies
            std = std.pow(2).mean().sqrt().expand_as(std)
        ema.set_latent_stats(mean.float(), std.float())
        return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}

    def export(self, ema: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
        from data.pretrained import save_checkpoint

        save_checkpoint(directory, dataclasses.asdict(ema.config), state, kind="tokenizer")


# ---- the DiT stage ------------------------------------------------------------------------------


class DiTStage:
    """Flow matching in the frozen tokenizer's normalised latent space, conditioned on captions."""

    name = "dit"

    def __init__(self, args, env: Env):
        from dit3d import DiT3D
        from dit3d import preset as dit_preset
        from dit3d.flow import FlowConfig
        from dit3d.model import DiTBlock
        from dit3d.text import BUILTIN_TEXT_ENCODERS, HFTextEncoder
        from tokenizer import CausalVAE

        self.args, self.env = args, env
        if not args.vae:
            raise SystemExit("error: --stage dit needs --vae DIR, a trained tokenizer (OUT/model of a tokenizer run)")
        self.vae = CausalVAE.from_pretrained(args.vae).to(env.device).eval().requires_grad_(False)
        if env.main and bool((self.vae.latent_std == 1).all() and (self.vae.latent_mean == 0).all()):
            log.warning("the tokenizer at %s has no measured latent statistics; latents are used unnormalised", args.vae)
        self.frozen_text = None
        try:
            self.condition = ConditionConfig.parse(args.condition)
        except ValueError as e:
            raise SystemExit(f"error: --condition: {e}") from None
        overrides = parse_overrides(args.override)
        if args.text_encoder in BUILTIN_TEXT_ENCODERS:
            cfg = dit_preset(args.preset, in_channels=self.vae.config.latent_channels, **overrides)
            builtin = BUILTIN_TEXT_ENCODERS[args.text_encoder]
            text = builtin(builtin.CONFIG(dim=cfg.text_dim))
        else:
            self.frozen_text = HFTextEncoder(args.text_encoder, device=env.device)
            cfg = dit_preset(args.preset, in_channels=self.vae.config.latent_channels, text_dim=self.frozen_text.dim,
                             **overrides)
            text = None
        if self.condition.active and not cfg.frame_conditioning:
            cfg = dataclasses.replace(cfg, frame_conditioning=True)
        self.model = TextToVideo(DiT3D(cfg), text).to(env.device)
        self.block_types = (DiTBlock,)
        self.flow = FlowConfig(logit_mean=args.logit_mean, logit_std=args.logit_std, shift=args.shift,
                               shift_base_tokens=args.shift_base_tokens)

    def config_dict(self) -> dict:
        return dataclasses.asdict(self.model.dit.config)

    def latent_grid(self, batch: dict) -> tuple[int, ...]:
        if "latents" in batch:
            t, h, w = batch["latents"].shape[2:]
        else:
            t, h, w = self.vae.latent_shape(*batch["video"].shape[2:])[1:]
        return self.trained_frames(t), h, w

    def trained_frames(self, t: int) -> int:
        """Latent frames a clip of t trains on, after --latent-stride and --latent-window."""
        t = -(-t // self.args.latent_stride)
        return min(t, self.args.latent_window) if self.args.latent_window else t

    def select_frames(self, z: torch.Tensor, keys: list[str], step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The latent frames each sample trains on, and which of them are given clean ((B, T) bool, or None when
        conditioning is off). A window starts at the clip's first frame unless the window's own first frame
        is given (extension, interpolation): then anywhere, so that given frames from the middle of a clip
        are seen in training, as they are when a long video is extended."""
        frames = self.trained_frames(z.shape[2])
        z = z[:, :, ::self.args.latent_stride]
        if not self.condition.active and frames == z.shape[2]:
            return z, None
        parts, masks = [], []
        for i, key in enumerate(keys):
            g = sample_generator(self.args.seed, step, key, "condition")
            mode, m = self.condition.draw(g, frames) if self.condition.active else ("none", 1)
            last = z.shape[2] - frames
            start = int(torch.randint(last + 1, (), generator=g)) if mode in ("extend", "interpolate") else 0
            parts.append(z[i, :, start:start + frames])
            masks.append(given_mask(mode, frames, m))
        given = torch.stack(masks).to(z.device) if self.condition.active else None
        return torch.stack(parts), given

    def tokens(self, batch: dict) -> int:
        return math.prod(self.model.dit.token_grid(self.latent_grid(batch)))

    def encode_text(self, module: TextToVideo, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text inputs of the wrapped model: token ids (built-in encoder) or frozen-encoder tokens."""
        return text_inputs(module, self.frozen_text, captions, self.env.device)

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        from dit3d.flow import flow_loss, interpolate, keep_given, training_timesteps, velocity_target

        device, seed = self.env.device, self.args.seed
        keys = batch["key"]
        gens = [sample_generator(seed, step, k) for k in keys]
        normals = torch.stack([torch.randn((), generator=g) for g in gens])
        drop = torch.stack([torch.rand((), generator=g) < self.args.caption_dropout for g in gens])
        with torch.no_grad():
            if "latents" in batch:
                z = batch["latents"].to(device)
            else:
                posterior = self.vae.encode(batch["video"].to(device))
                eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens]).to(device)
                z = posterior.mean + posterior.std * eps
            z, given = self.select_frames(z, keys, step)
            if image_step(seed, step, self.args.image_prob):
                z, given = z[:, :, :1], None if given is None else torch.zeros_like(given[:, :1])
            x0 = self.vae.normalize(z.float())  # (B, C, t, h, w), unit scale
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        t = training_timesteps(self.flow, normals, math.prod(unwrap(model).dit.token_grid(tuple(x0.shape[2:])))).to(device)
        x_t = keep_given(interpolate(x0, noise, t), None if given is None else (x0, given))
        text, mask = self.encode_text(unwrap(model), batch["caption"])
        with autocast(device):
            v = model(x_t, t, text, mask, drop.to(device), given)
        loss = flow_loss(v, velocity_target(x0, noise), None if given is None else ~given)
        logs = {} if given is None else {"given_frames": given.float().mean().item()}
        return loss, logs

    def after_backward(self, step: int, last_micro: bool, micro_batches: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def preview_prompts(self) -> list[str]:
        if self.args.preview_prompts:
            return self.args.preview_prompts
        manifest = Path(self.args.data) / "manifest.json" if os.path.isdir(str(self.args.data)) else None
        if manifest is not None and manifest.is_file():
            m = json.loads(manifest.read_text())
            captions = list(m.get("holdout_captions", []))[:3] + list(m.get("train_captions", []))[:2]
            if captions:
                return captions
        return []

    @torch.no_grad()
    def generate(self, ema: TextToVideo, prompts: list[str], frames: int, size: int, steps: int, guidance: float,
                 seed: int = 0) -> torch.Tensor:
        """Videos (B, 3, frames, size, size) in [-1, 1] for prompts, by the EMA model (called as a whole, as
        FSDP2 needs: it gathers the root's parameters in the root's forward)."""
        shape = self.vae.latent_shape(frames, size, size)
        z = generate_latents(ema, lambda c: self.encode_text(ema, c), prompts, shape, steps=steps, guidance=guidance,
                             shift=self.flow.shift_for(math.prod(ema.dit.token_grid(shape[1:]))),
                             seeds=[seed + i for i in range(len(prompts))], device=self.env.device,
                             autocast_dtype=torch.bfloat16 if self.env.device.type == "cuda" else None)
        return self.vae.decode(self.vae.denormalize(z), chunk=2).clamp(-1, 1)

    def preview(self, ema: nn.Module, batch: dict) -> tuple[list[tuple[str, torch.Tensor, str | None]], dict]:
        """Samples of the preview prompts by the EMA weights: (name, video, prompt) items and their motion scores."""
        prompts = self.preview_prompts() or list(dict.fromkeys(batch["caption"]))[:4]
        videos = self.generate(ema, prompts, self.args.frames, self.args.size, self.args.preview_steps, self.args.guidance,
                               seed=self.args.seed)
        items = [(f"{i:02d}_{prompt.replace(' ', '_')[:60]}", video, prompt) for i, (prompt, video) in enumerate(zip(prompts, videos))]
        return items, self.motion_scores(prompts, videos)

    @staticmethod
    def motion_scores(prompts: list[str], videos: torch.Tensor) -> dict:
        """The motion benchmark's averages over previews whose prompts follow the synthetic grammar."""
        from data import tensor_to_frames
        from data.motion_score import score_frames
        from data.synthetic import parse_caption

        scores = [score_frames(tensor_to_frames(v), p) for p, v in zip(prompts, videos) if parse_caption(p)]
        if not scores:
            return {}
        return {f"motion/{m}": sum(getattr(x, m) for x in scores) / len(scores)
                for m in ("presence", "color", "shape", "direction", "linearity")} | {"motion/videos": len(scores)}

    def initialize(self) -> None:
        pass

    def finish(self, ema: nn.Module) -> dict:
        return {}

    def export(self, ema: TextToVideo, state: dict[str, torch.Tensor], directory: Path) -> None:
        """directory/{dit, text, tokenizer} and pipeline.json: all that sample.py needs."""
        from data.pretrained import save_checkpoint
        from data.shards import write_json_atomic

        dit_state = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
        save_checkpoint(directory / "dit", dataclasses.asdict(ema.dit.config), dit_state, kind="dit")
        if ema.text is not None:
            text_state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
            save_checkpoint(directory / "text", dataclasses.asdict(ema.text.config), text_state, kind=ema.text.KIND)
        if not (directory / "tokenizer" / "config.json").is_file():
            self.vae.save_pretrained(directory / "tokenizer")
        write_json_atomic(directory / PIPELINE_FILE, {
            "text_encoder": self.args.text_encoder if ema.text is not None else str(Path(self.args.text_encoder).resolve()),
            "frames": self.args.frames, "size": self.args.size, "fps": self.args.fps or 8.0,
            "flow": dataclasses.asdict(self.flow),
            "sampler": {"steps": self.args.preview_steps, "guidance": self.args.guidance, "solver": "euler"},
            "condition": dataclasses.asdict(self.condition),
        })


STAGES = {"tokenizer": TokenizerStage, "dit": DiTStage}


# ---- EMA ----------------------------------------------------------------------------------------


def ema_update_fn(decay: float):
    """EMA with warm-up for torch.optim.swa_utils.AveragedModel: the decay grows as min(decay, (1+n)/(10+n)),
    so the average is not dominated by the random initial weights in short runs (as timm's ModelEmaV3)."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


# ---- checkpoints --------------------------------------------------------------------------------


class Checkpoints:
    """OUT/checkpoints/step_NNNNNNNN: the sharded training state (torch.distributed.checkpoint), trainer.json
    (step, scheduler) and rank{r}.json (RNG and data position per rank). Each is written into a temporary
    folder renamed when complete, then `latest` is replaced: a killed run leaves the last checkpoint intact."""

    def __init__(self, root: Path, env: Env, keep: int):
        self.root, self.env, self.keep = root, env, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / "trainer.json").is_file():
                return path
        done = sorted(p for p in self.root.glob("step_*") if (p / "trainer.json").is_file())
        return done[-1] if done else None

    def save(self, step: int, tensors: dict, trainer_state: dict, rank_state: dict) -> Path:
        import torch.distributed.checkpoint as dcp

        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.env.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(tensors, checkpoint_id=tmp)
        (tmp / f"rank{self.env.rank}.json").write_text(json.dumps(rank_state))
        barrier()
        if self.env.main:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / ".latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, self.root / "latest")
            for old in sorted(self.root.glob("step_*"))[: -max(1, self.keep)]:  # the newest is the one just written
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, tensors: dict) -> tuple[dict, dict]:
        import torch.distributed.checkpoint as dcp

        dcp.load(tensors, checkpoint_id=path)
        rank_file = path / f"rank{self.env.rank}.json"
        rank_state = json.loads(rank_file.read_text()) if rank_file.is_file() else {}
        return json.loads((path / "trainer.json").read_text()), rank_state


def rng_state(device: torch.device) -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()[1],
             "numpy": np.random.get_state()[1].tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    import random

    import numpy as np

    if not state:
        return
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


# ---- the loop -----------------------------------------------------------------------------------


class Stop(Exception):
    pass


def build_optimizer(model: nn.Module, args, device: torch.device):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=device.type == "cuda")
    main_steps = max(1, args.steps - args.warmup)
    if args.schedule == "cosine":
        after = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=main_steps, eta_min=args.lr * args.min_lr_ratio)
    else:
        after = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if args.warmup > 0:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / args.warmup, end_factor=1.0, total_iters=args.warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, after], milestones=[args.warmup])
    else:
        sched = after
    return opt, sched


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLog:
    """OUT/metrics.jsonl on rank 0, and wandb when enabled."""

    def __init__(self, path: Path, env: Env, args, resolved: dict, resumed_step: int):
        self.path, self.env, self.wandb = path, env, None
        if not env.main:
            return
        if path.is_file():  # a resumed run: drop what an interrupted run logged after its last checkpoint
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resumed_step]
            path.write_text("".join(line + "\n" for line in kept))
        mode = args.wandb
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode != "disabled":
            try:
                import wandb

                id_file = path.parent / "wandb_id"
                run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
                id_file.write_text(run_id)
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_run_name, dir=str(path.parent),
                                        config=resolved, mode=mode, id=run_id, resume="allow")
            except Exception as e:  # logging must never stop training
                log.warning("wandb could not start (%s: %s); logging to %s only", type(e).__name__, e, path)

    def write(self, record: dict, videos: list[Path] = ()) -> None:
        if not self.env.main:
            return
        if videos:
            record = record | {"previews": [str(v) for v in videos]}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            import wandb

            try:
                data = {k: v for k, v in record.items() if k not in ("step", "previews")}
                data |= {f"preview/{Path(p).stem}": wandb.Video(str(p), format="mp4") for p in videos}
                self.wandb.log(data, step=record["step"])
            except Exception as e:  # logging must never stop training
                log.warning("wandb logging failed (%s: %s); metrics go on to %s", type(e).__name__, e, self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def resolve_run(args, stage, env: Env) -> tuple[dict, Path]:
    """Write (or check) OUT/config.json; a different stage or model in an existing run is an error."""
    out = Path(args.out)
    resolved = json.loads(json.dumps({"args": vars(args), "model": stage.config_dict(), "world_size": env.world},
                                     default=str))  # as it reads back from disk
    config_path = out / "config.json"
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old["args"]["stage"] != args.stage or old.get("model") != resolved["model"]:
            raise SystemExit(f"error: {out} holds a {old['args']['stage']} run with another model configuration; "
                             f"give another --out, or the same --stage, --preset and --override to resume it")
        cosmetic = {"no_progress", "wandb", "wandb_project", "wandb_run_name", "log_every", "preview_every", "num_workers"}
        changed = sorted(k for k, v in resolved["args"].items() if old["args"].get(k) != v and k not in cosmetic)
        if changed and env.main:
            log.warning("options changed since %s was started: %s", out, ", ".join(changed))
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        tmp.write_text(json.dumps(resolved, indent=2, default=str) + "\n")
        os.replace(tmp, config_path)
    return resolved, out


def train(args) -> Path:
    if args.sp_size > 1 and args.stage != "dit":
        raise SystemExit(f"error: --sp-size splits the DiT's token sequence; the {args.stage} stage has none (use 1)")
    env = setup_distributed(args.device, args.sp_size)
    logging.basicConfig(level=logging.INFO if env.main else logging.WARNING, format="%(message)s", force=True)
    check_frame_count(args.frames)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    stage = STAGES[args.stage](args, env)
    resolved, out = resolve_run(args, stage, env)
    plain = stage.model
    n_params = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    ckpts = Checkpoints(out / "checkpoints", env, args.keep_checkpoints)
    latest = ckpts.latest()
    if latest is None:
        stage.initialize()

    from torch.optim.swa_utils import AveragedModel

    ema = AveragedModel(plain, multi_avg_fn=ema_update_fn(args.ema_decay)).requires_grad_(False)
    if env.sp > 1:  # the EMA too: previews run under the same token budget per rank
        apply_sequence_parallel(plain, env.sp_group)
        apply_sequence_parallel(ema.module, env.sp_group)
    if args.checkpoint_activations:
        apply_activation_checkpointing(plain, stage.block_types[0])
    if args.compile:
        compile_blocks(plain, stage.block_types[0])
    strategy = args.parallel if env.world > 1 else "none"
    model = data_parallel(plain, strategy, stage.block_types, env.device)
    if strategy == "fsdp":
        data_parallel(ema.module, "fsdp", stage.block_types, env.device)
    opt, sched = build_optimizer(model, args, env.device)
    loader = make_loader(args.data, args.batch_size, None if args.latents else args.frames,
                         None if args.latents else args.size, mode="train", num_workers=args.num_workers,
                         fps=args.fps, seed=args.seed, shuffle_buffer=args.shuffle_buffer,
                         rank=env.dp_rank, world_size=env.dp_world)

    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    def tensor_state() -> dict:
        model_sd, optim_sd = get_state_dict(model, opt)
        return {"model": model_sd, "optim": optim_sd, "ema": get_model_state_dict(ema), "stage": stage.state_dict()}

    step, samples_seen = 0, 0
    if latest is not None:
        state = tensor_state()
        trainer_state, rank_state = ckpts.load(latest, state)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        set_model_state_dict(ema, state["ema"])
        stage.load_state_dict(state["stage"])
        sched.load_state_dict(trainer_state["scheduler"])
        step, samples_seen = trainer_state["step"], trainer_state["samples_seen"]
        set_rng_state(rank_state.get("rng", {}), env.device)
        exact = loader.load_state_dict(rank_state["data"]) if "data" in rank_state else False
        if env.main:
            log.info("resuming %s from %s (step %d of %d)%s", out, latest, step, args.steps,
                     "" if exact else "; the data layout changed, so the data stream starts afresh")
        if step >= args.steps:
            if env.main:
                log.info("%s is already trained to step %d; nothing to do (raise --steps to train on)", out, step)
            return out
    elif env.main:
        log.info("training the %s stage (%s preset, %.2fM parameters) on %d process(es)%s, %s, into %s", args.stage,
                 args.preset, n_params / 1e6, env.world,
                 f" ({env.dp_world} data-parallel x {env.sp} sequence-parallel)" if env.sp > 1 else "", env.device, out)

    def save_checkpoint() -> None:
        trainer_state = {"step": step, "samples_seen": samples_seen, "scheduler": sched.state_dict()}
        path = ckpts.save(step, tensor_state(), trainer_state, {"rng": rng_state(env.device), "data": loader.state_dict()})
        export_model()
        if env.main:
            log.info("checkpoint: %s", path)

    def export_model() -> None:
        full = get_model_state_dict(ema.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.main:
            stage.export(ema.module, full, out / "model")

    metrics = MetricsLog(out / "metrics.jsonl", env, args, resolved, step)
    stop = {"signal": 0}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    stopped_at = args.exit_after and step + args.exit_after
    from tqdm import tqdm

    bar = tqdm(total=args.steps, initial=step, disable=not env.main or args.no_progress, dynamic_ncols=True, desc=args.stage)
    data = iter(loader)
    window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "time": 0.0, "grad_norm": 0.0}
    last_batch = None
    started = time.perf_counter()
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            model.train()
            logs: dict = {}
            loss_sum = 0.0
            for micro in range(args.grad_accum):
                batch = next(data)
                last_batch = batch
                last = micro == args.grad_accum - 1
                sync = contextlib.nullcontext()
                if not last and isinstance(model, nn.parallel.DistributedDataParallel):
                    sync = model.no_sync()
                elif strategy == "fsdp":
                    model.set_requires_gradient_sync(last)
                with sync:
                    loss, micro_logs = stage.loss(model, batch, step)
                    (loss / args.grad_accum).backward()
                logs |= micro_logs | stage.after_backward(step, last, args.grad_accum)
                loss_sum += loss.item()
                window["samples"] += len(batch["key"]) * env.dp_world
                window["tokens"] += stage.tokens(batch) * len(batch["key"]) * env.dp_world
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            time_up = bool(args.max_minutes) and time.perf_counter() - started > 60 * args.max_minutes
            total, nonfinite, stopping, time_up = all_reduce_sum(  # one collective: every rank decides alike
                [loss_sum / args.grad_accum, float(not math.isfinite(loss_sum)), float(stop["signal"] != 0), float(time_up)],
                env.device)
            mean_loss = total / env.world
            if nonfinite or not math.isfinite(float(grad_norm)):
                kept = ckpts.latest()
                raise SystemExit(f"error: the loss is {mean_loss} (grad norm {float(grad_norm)}) at step {step + 1}; "
                                 f"stopped before the update. The last good checkpoint is "
                                 f"{kept or 'none (no checkpoint was written yet)'}; lower --lr or raise --warmup, "
                                 f"then run the same command to resume from it")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema.update_parameters(plain)
            step += 1
            samples_seen += args.batch_size * args.grad_accum * env.dp_world
            window["time"] += time.perf_counter() - t0
            window["loss"] += mean_loss
            window["grad_norm"] += float(grad_norm)
            window["n"] += 1
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                skipped = all_reduce_sum([loader.samples_skipped], env.device)[0]
                record = {"step": step, "loss": window["loss"] / window["n"], "lr": sched.get_last_lr()[0],
                          "grad_norm": window["grad_norm"] / window["n"],
                          "samples_per_s": window["samples"] / window["time"], "tokens_per_s": window["tokens"] / window["time"],
                          "peak_memory_gb": peak_memory_gb(env.device), "skipped_samples": int(skipped)} | logs
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window = {"loss": 0.0, "n": 0, "samples": 0, "tokens": 0, "time": 0.0, "grad_norm": 0.0}
            if args.preview_every and step % args.preview_every == 0 and step < args.steps:
                paths, logs = run_preview(stage, ema, step, out, last_batch, env)
                metrics.write({"step": step} | logs, paths)
            if time_up and step < args.steps:
                if env.main:
                    log.info("--max-minutes %g reached at step %d: finishing the run here", args.max_minutes, step)
                break
            if step < args.steps and (stopping or (stopped_at and step >= stopped_at)):
                raise Stop("preempted (SIGTERM)" if stopping else f"--exit-after {args.exit_after}")
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
                save_checkpoint()
    except Stop as why:
        save_checkpoint()
        bar.close()
        if env.main:
            log.info("stopped at step %d (%s): checkpoint written; run the same command to resume", step, why)
        metrics.close()
        signal.signal(signal.SIGTERM, previous_handler)
        return out
    bar.close()
    signal.signal(signal.SIGTERM, previous_handler)
    stats = stage.finish(ema.module)
    if stats and env.main:
        log.info("latent statistics measured on the data: mean %s, std %s",
                 [round(v, 3) for v in stats["latent_mean"]], [round(v, 3) for v in stats["latent_std"]])
    save_checkpoint()
    if last_batch is not None:
        paths, logs = run_preview(stage, ema, step, out, last_batch, env)
        metrics.write({"step": step} | logs, paths)
    if env.main:
        log.info("done: %d steps, %s. EMA weights for sampling: %s", step, loader.report(), out / "model")
    metrics.close()
    return out


def run_preview(stage, ema, step: int, out: Path, batch: dict, env: Env) -> tuple[list[Path], dict]:
    """Preview videos by the EMA weights and their scores (every rank runs the model, as FSDP needs; rank 0
    writes): reconstruction PSNR for the tokenizer, the motion benchmark for synthetic-grammar prompts."""
    ema.module.eval()
    items, logs = stage.preview(ema.module, batch)
    if not env.main:
        return [], {}
    directory = out / "previews" / f"step_{step:08d}"
    fps = preview_fps(stage.args, batch)
    paths = []
    for name, video, caption in items:
        paths.append(write_video(directory / f"{name}.mp4", video, fps=fps))
        if caption is not None:
            paths[-1].with_suffix(".txt").write_text(caption + "\n")
    log.info("previews: %s%s", directory, "".join(f", {k} {v:.3f}" for k, v in logs.items()))
    return paths, logs


# ---- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=sorted(STAGES), required=True, help="what to train")
    g.add_argument("--preset", default="tiny", help="model size: tokenizer tiny|small|base, DiT tiny|S|B|L|XL|1.3B")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one model config field of the preset (repeatable), e.g. depth=8")
    g.add_argument("--data", required=True, help="shards: a folder, glob, brace pattern or pipe: URL")
    g.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    g.add_argument("--vae", help="trained tokenizer folder (the dit stage)")
    g.add_argument("--latents", action="store_true", help="--data holds latent shards (python -m tokenizer.encode)")
    g.add_argument("--device", default="auto", help="auto | cuda | cpu")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k")
    g.add_argument("--size", type=int, default=64, help="square crop side, in pixels")
    g.add_argument("--fps", type=float, default=None, help="target frame rate (default: each file's own)")
    g.add_argument("--batch-size", type=int, default=8, help="clips per process per micro-batch")
    g.add_argument("--num-workers", type=int, default=2, help="decoding worker processes per rank")
    g.add_argument("--shuffle-buffer", type=int, default=64)
    g.add_argument("--image-prob", type=float, default=0.0, help="fraction of steps that train on images (first frames)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimiser steps in all")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="after the warm-up")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine: final LR over --lr")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.999)
    g = p.add_argument_group("parallelism and speed")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="with several processes")
    g.add_argument("--sp-size", type=int, default=1,
                   help="Ulysses sequence parallelism: split each video's tokens over this many consecutive ranks "
                        "(must divide the process count and the DiT's heads); DDP / FSDP2 over the rest")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward (memory)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--exit-after", type=int, default=0,
                   help="checkpoint and exit after this many steps of this invocation (fixed-length job slots); 0: off")
    g.add_argument("--max-minutes", type=float, default=0,
                   help="end the run properly (statistics, export, final checkpoint) after this many minutes; 0: off")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--preview-every", type=int, default=0, help="steps between preview videos (0: at the end only)")
    g.add_argument("--preview-prompts", nargs="*", default=None, help="dit: prompts (default: from the data's manifest)")
    g.add_argument("--preview-steps", type=int, default=30, help="dit: sampler steps of the previews")
    g.add_argument("--guidance", type=float, default=5.0, help="dit: classifier-free guidance scale of the previews, and sample.py's default")
    g.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="auto",
                   help="auto: online with WANDB_API_KEY set, else offline (WANDB_MODE overrides)")
    g.add_argument("--wandb-project", default="dit3d-video")
    g.add_argument("--wandb-run-name", default=None)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("dit stage")
    g.add_argument("--text-encoder", default="bytes",
                   help="bytes or words (built in, trained with the DiT; see dit3d/text.py) or a local folder with a "
                        "T5 / UMT5 / CLIP text model")
    g.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance")
    g.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal timestep location")
    g.add_argument("--logit-std", type=float, default=1.0, help="logit-normal timestep scale")
    g.add_argument("--shift", type=float, default=None, help="fixed timestep shift (default: from the token count)")
    g.add_argument("--shift-base-tokens", type=int, default=256, help="token count with no shift")
    g.add_argument("--condition", nargs="*", default=None, metavar="MODE=P",
                   help="known-frame conditioning: per sample, with probability P, give the first latent frame "
                        "(image), the first m (extend) or the first and last (interpolate) clean and train on the "
                        "rest, e.g. --condition image=0.2 extend=0.2 interpolate=0.1 (the rest: text only)")
    g.add_argument("--latent-window", type=int, default=0,
                   help="train on this many latent frames of each clip (from its start, or anywhere when the "
                        "window's first frame is given); 0: all")
    g.add_argument("--latent-stride", type=int, default=1,
                   help="take every K-th latent frame first (a keyframe model, as in bench/cascade.py)")
    g = p.add_argument_group("tokenizer stage")
    g.add_argument("--kl-weight", type=float, default=1e-6)
    g.add_argument("--lpips-weight", type=float, default=0.0, help="perceptual loss weight (needs the two paths below)")
    g.add_argument("--lpips-vgg", help="local torchvision VGG16 weights (.pth)")
    g.add_argument("--lpips-heads", help="local LPIPS linear heads (vgg.pth of the lpips package)")
    g.add_argument("--disc-weight", type=float, default=0.0, help="3D patch discriminator weight (0: none)")
    g.add_argument("--disc-start", type=int, default=2000, help="step at which the adversarial loss switches on")
    g.add_argument("--disc-lr", type=float, default=1e-4)
    g.add_argument("--stats-batches", type=int, default=16, help="batches to measure the latent statistics on")
    g.add_argument("--latent-norm", choices=["channel", "global"], default="channel",
                   help="normalise latents per channel, or by one scale for all (the PCA-like linear code's "
                        "weak channels then stay weak, so the DiT spends less on them)")
    g.add_argument("--pca-init-clips", type=int, default=64,
                   help="clips the linear codec path of a fresh run is fitted to: PCA encoder, least-squares decoder (0: random init)")
    return p


def check_args(args) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        check_frame_count(args.frames)
    except ValueError as e:
        raise SystemExit(f"error: --frames: {e}") from None
    if args.latent_stride < 1 or args.latent_window < 0:
        raise SystemExit("error: --latent-stride must be at least 1 and --latent-window at least 0")
    if args.latents and args.stage != "dit":
        raise SystemExit("error: --latents is for the dit stage (latent shards have no pixels to reconstruct)")


# ---- the quickstart ----------------------------------------------------------------------------


def quickstart_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py quickstart", description=(
        "The built-in demo (what `python train.py` with no arguments runs): write the synthetic shards, train "
        "the tiny tokenizer, encode the clips to latent shards, train the tiny DiT on them, and write samples "
        "for prompts whose caption combinations were held out of training. Each part resumes if interrupted."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(QUICKSTART_DIR), help="folder for everything it writes")
    p.add_argument("--clips", type=int, default=1200, help="synthetic clips to generate")
    p.add_argument("--tokenizer-steps", type=int, default=200)
    p.add_argument("--dit-steps", type=int, default=2000)
    p.add_argument("--sample-steps", type=int, default=30, help="sampler steps for the final samples")
    p.add_argument("--samples-per-prompt", type=int, default=8, help="videos per prompt (seeds 0, 1, ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of both training stages (initial weights, data order, "
                   "noise); the synthetic set is the same for every seed. Give each seed its own --out")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="disabled")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_quickstart(argv: list[str]) -> int:
    from data.synthetic import DEFAULT_HOLDOUT, SyntheticSpec, generate
    from tokenizer import CausalVAE
    from tokenizer.encode import export_latents

    q = quickstart_parser().parse_args(argv)
    out = Path(q.out)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    shards, latents = out / "shards", out / "latents"
    spec = SyntheticSpec(holdout=DEFAULT_HOLDOUT)
    if not (shards / "manifest.json").is_file() or json.loads((shards / "manifest.json").read_text())["samples"] != q.clips:
        log.info("[1/4] writing %d synthetic clips (%d frames, %dx%d) to %s", q.clips, spec.frames, spec.size, spec.size, shards)
        generate(shards, q.clips, spec, seed=0, shard_size=max(1, q.clips // 8))
    common = ["--frames", str(spec.frames), "--size", str(spec.size), "--fps", str(spec.fps), "--preset", "tiny",
              "--seed", str(q.seed), "--wandb", q.wandb, "--log-every", "50", "--checkpoint-every", "500", "--num-workers", "1"]
    common += ["--no-progress"] if q.no_progress else []
    log.info("[2/4] training the tiny tokenizer (%d steps)", q.tokenizer_steps)
    vae_run = train(build_parser().parse_args(common + [
        "--stage", "tokenizer", "--data", str(shards), "--out", str(out / "tokenizer"), "--steps", str(q.tokenizer_steps),
        "--batch-size", "8", "--lr", "2e-3", "--warmup", "50", "--schedule", "cosine", "--ema-decay", "0.99",
        "--latent-norm", "global"]))
    vae_dir = vae_run / "model"
    if not (latents / "done.json").is_file():
        log.info("[3/4] encoding the clips to latent shards in %s", latents)
        shutil.rmtree(latents, ignore_errors=True)
        result = export_latents(CausalVAE.from_pretrained(vae_dir), shards, latents, spec.frames, spec.size,
                                fps=spec.fps, batch_size=16, shard_size=max(1, q.clips // 8), num_workers=1,
                                ckpt=str(vae_dir))
        (latents / "done.json").write_text(json.dumps({"samples": result["samples"]}))
    prompts = list(DEFAULT_HOLDOUT) + ["a red circle moving right", "a blue triangle moving left", "a white square moving down"]
    log.info("[4/4] training the tiny DiT on the latents (%d steps)", q.dit_steps)
    dit_run = train(build_parser().parse_args(common + [
        "--stage", "dit", "--latents", "--data", str(latents), "--vae", str(vae_dir), "--out", str(out / "dit"),
        "--steps", str(q.dit_steps), "--batch-size", "32", "--lr", "1e-3", "--warmup", "100", "--schedule", "cosine",
        "--ema-decay", "0.995", "--shift", str(QUICKSTART_SHIFT), "--override", "width=128", "--override", "depth=6",
        "--preview-steps", str(q.sample_steps), "--preview-prompts", *prompts]))
    log.info("sampling %d videos for each of %d prompts and scoring their motion", q.samples_per_prompt, len(prompts))
    import sample
    from data.motion_score import score_dir, table

    samples = out / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    if sample.main(["--ckpt", str(dit_run), "--prompts", str(prompt_file), "--videos-per-prompt", str(q.samples_per_prompt),
                    "--steps", str(q.sample_steps), "--out", str(samples), "--no-progress"]) != 0:
        raise SystemExit("error: sampling the trained model failed (see above)")
    scores, summary = score_dir(samples, shards / "manifest.json")
    (out / "motion_scores.json").write_text(json.dumps({"summary": summary, "videos": [dataclasses.asdict(x) for x in scores]},
                                                       indent=2))
    minutes = (time.perf_counter() - start) / 60
    print(f"\nquickstart done in {minutes:.1f} min. {len(scores)} samples in {samples} ({len(DEFAULT_HOLDOUT)} of the "
          f"{len(prompts)} prompts are caption combinations held out of training); their motion scores:\n")
    print(table(summary))
    print(f"\nsample more:  python sample.py --ckpt {dit_run} --prompt \"a green square moving up\" --out samples/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ok = False
    try:
        if not argv or argv[0] == "quickstart":
            return run_quickstart(argv[1:])
        parser = build_parser()
        if not {"-h", "--help"} & set(argv) and not any(a == "--stage" or a.startswith("--stage=") for a in argv):
            parser.error("no --stage given: train on your data with `--stage {tokenizer,dit} --data SHARDS ...`, "
                         "or put the quickstart's options after its name (`python train.py quickstart --seed 1`)")
        args = parser.parse_args(argv)
        check_args(args)
        train(args)
        ok = True
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
