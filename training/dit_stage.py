"""The DiT stage: flow matching in the frozen tokenizer's normalised latent space, conditioned on captions
(and on known frames, with --condition)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from dit3d import DiT3D, load_dit
from dit3d import preset as dit_preset
from dit3d.condition import ConditionConfig, FrameSelection
from dit3d.flow import FlowConfig, flow_loss, interpolate, keep_given, training_timesteps, velocity_target
from dit3d.lora import LoraSettings, add_lora
from dit3d.model import DiTBlock, with_frame_conditioning
from dit3d.rope import TimeScaling
from dit3d.checkpoint import wan_format
from dit3d.text import BUILTIN_TEXT_ENCODERS, HFTextEncoder
from checkpoint_io import dit_folder
from data.buckets import Packing, parse_buckets
from data.video_io import size_pair
from errors import InputError
from evaluation.motion_score import preview_scores
from parallel import Env, unwrap
from pipeline import TextToVideo, generate_latents, save_pipeline, text_inputs
from tokenizer import CausalVAE, load_tokenizer

from .options import parse_overrides
from .stage import autocast, compute_dtype, image_step, sample_generator

log = logging.getLogger("train")


class DiTStage:
    name = "dit"

    def __init__(self, args, env: Env):
        self.args, self.env = args, env
        if not args.vae:
            raise InputError("--stage dit needs --vae DIR, a trained tokenizer (a tokenizer run's folder, or its model/)")
        self.vae = load_tokenizer(args.vae).to(env.device).eval().requires_grad_(False)
        if env.main and isinstance(self.vae, CausalVAE) and bool((self.vae.latent_std == 1).all() and (self.vae.latent_mean == 0).all()):
            log.warning("the tokenizer at %s has no measured latent statistics; latents are used unnormalised", args.vae)
        self.frozen_text = None
        try:
            condition = ConditionConfig.parse(args.condition)
        except InputError as e:
            raise InputError(f"--condition: {e}") from None
        self.frames = FrameSelection(condition, args.latent_stride, args.latent_window)
        overrides = parse_overrides(args.override)
        pretrained = self.pretrained_dit(args, overrides) if args.init else None
        self.text_padding = args.text_padding if args.text_padding != "auto" else (
            "wan" if args.init and wan_format(args.init) else "masked")
        if args.text_encoder in BUILTIN_TEXT_ENCODERS:
            if self.text_padding == "wan":
                raise InputError("--text-padding wan is Wan2.1's convention for a T5 / UMT5 encoder; give its folder as "
                                 "--text-encoder (the built-in encoders mask their padding)")
            cfg = pretrained.config if pretrained else dit_preset(args.preset, in_channels=self.vae.config.latent_channels,
                                                                  **overrides)
            builtin = BUILTIN_TEXT_ENCODERS[args.text_encoder]
            text = builtin(builtin.CONFIG(dim=cfg.text_dim))
            trained_text = dit_folder(args.init).parent / "text" if pretrained is not None else None
            if trained_text is not None and (trained_text / "config.json").is_file():
                text = builtin.from_pretrained(trained_text)  # the encoder the DiT was trained with
                if text.dim != cfg.text_dim:
                    raise InputError(f"the text encoder at {trained_text} gives {text.dim}-wide tokens but the DiT "
                                     f"takes {cfg.text_dim}: the folder was assembled from two models")
            elif pretrained is not None and args.lora_rank:
                raise InputError(f"--lora-rank freezes the text encoder, and {args.init} has no trained {args.text_encoder} "
                                 f"encoder beside its DiT (a text/ folder): give the run's model/ folder, or a frozen "
                                 f"T5 / UMT5 as --text-encoder")
        else:
            self.frozen_text = HFTextEncoder(args.text_encoder, device=env.device, padding=self.text_padding)
            cfg = pretrained.config if pretrained else dit_preset(args.preset, in_channels=self.vae.config.latent_channels,
                                                                  text_dim=self.frozen_text.dim, **overrides)
            if cfg.text_dim != self.frozen_text.dim:
                raise InputError(f"the text encoder at {args.text_encoder} gives {self.frozen_text.dim}-wide tokens but the "
                                 f"DiT at {args.init} takes {cfg.text_dim}: use the encoder it was trained with (Wan2.1: "
                                 f"UMT5-XXL, 4096)")
            text = None
        if pretrained is not None and pretrained.config.in_channels != self.vae.config.latent_channels:
            raise InputError(f"the DiT at {args.init} takes {pretrained.config.in_channels} latent channels but the "
                             f"tokenizer at {args.vae} makes {self.vae.config.latent_channels}: use the tokenizer it was "
                             f"trained with")
        if condition.active and not cfg.frame_conditioning:
            if pretrained is not None and args.lora_rank:
                raise InputError(f"--condition on the DiT at {args.init}, which has no frame conditioning, adds an input "
                                 f"channel that LoRA adapters cannot train: fine-tune it fully (drop --lora-rank)")
            if pretrained is not None:  # the flag's channel added at zero: it starts as the text-to-video model
                pretrained = with_frame_conditioning(pretrained)
            cfg = dataclasses.replace(cfg, frame_conditioning=True)
        self.model = TextToVideo(pretrained or DiT3D(cfg), text).to(env.device)
        if self.text_padding == "wan":  # dropout is the empty caption: the learned null token is never used
            self.model.dit.null_text.requires_grad_(False)
        self.lora = None
        if args.lora_rank:
            self.lora = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_dropout,
                                     tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
            if self.model.text is not None:
                self.model.text.requires_grad_(False)
            add_lora(self.model.dit, self.lora)
        self.model.dit.time_scaling = self.time_scaling(args)
        self.block_types = (DiTBlock,)
        self.flow = FlowConfig(logit_mean=args.logit_mean, logit_std=args.logit_std, shift=args.shift,
                               shift_base_tokens=args.shift_base_tokens)
        self.buckets, self.schedule = None, None  # the loop's buckets and the loader's schedule, with --buckets

    def time_scaling(self, args) -> TimeScaling | None:
        """The rotary time frequencies of --extrapolate for --extrapolate-frames, past the longest clip trained on."""
        if not args.extrapolate:
            return None
        longest = max([b.frames for b in parse_buckets(args.buckets)] if args.buckets else [args.frames])

        def token_frames(frames: int, trained: bool) -> int:  # the trained clips as the frame selection cuts them
            self.check_frames(frames)
            latent = self.vae.latent_shape(frames, *self.shape_multiple())[1]
            return (self.frames.frames(latent) if trained else latent) // self.model.dit.config.patch_size[0]

        trained, target = token_frames(longest, True), token_frames(args.extrapolate_frames, False)
        if target <= trained:
            raise InputError(f"--extrapolate-frames {args.extrapolate_frames} is {target} token frames, no more than the "
                             f"{trained} of the longest clips trained on ({longest} frames): give a longer length")
        return TimeScaling(args.extrapolate, trained, target)

    @staticmethod
    def pretrained_dit(args, overrides: dict) -> DiT3D:
        """The DiT of --init: Wan2.1's transformer (either layout) or ours (a dit/ folder, a run or its model/)."""
        if overrides:
            raise InputError(f"--override {', '.join(sorted(overrides))}: with --init the DiT is the pretrained one as it "
                             f"is (set DIT3D_ATTENTION to choose its attention backend)")
        return load_dit(dit_folder(args.init))

    def config_dict(self) -> dict:
        cfg = dataclasses.asdict(self.model.dit.config)
        return cfg | ({"lora": dataclasses.asdict(self.lora)} if self.lora else {})

    def shape_multiple(self) -> tuple[int, int]:
        """What a bucket's height and width must be multiples of: the tokenizer's factor times the patch."""
        _, ph, pw = self.model.dit.config.patch_size
        sf = self.vae.config.spatial_factor
        return sf * ph, sf * pw

    def check_frames(self, frames: int) -> None:
        """An InputError unless the tokenizer takes `frames` and its latent frames divide into the patch."""
        self.vae.check_video(torch.empty(1, 3, frames, *self.shape_multiple(), device="meta"))
        t = self.frames.frames(self.vae.latent_shape(frames, *self.shape_multiple())[1])
        self.model.dit.token_grid((t, self.model.dit.config.patch_size[1], self.model.dit.config.patch_size[2]))

    def packing(self, budget: int, pool: int) -> Packing:
        """--pack: a token budget per batch, counted as this DiT counts a clip's tokens."""
        pt = self.model.dit.config.patch_size[0]
        if self.args.latent_stride > 1 or self.args.latent_window:
            raise InputError("--pack counts each clip's tokens from its shape; it does not take --latent-stride or "
                             "--latent-window")
        return Packing(budget, self.vae.config.temporal_factor, (pt, *self.shape_multiple()), pool)

    def preview_shape(self) -> tuple[int, tuple[int, int]]:
        """(frames, (height, width)) of the previews and pipeline.json's default: --frames x --size, or with
        buckets the video bucket that holds the most of the data (packing: the largest)."""
        if not self.buckets:
            return self.args.frames, size_pair(self.args.size)
        counts = self.schedule.counts if self.schedule is not None else [b.volume() for b in self.buckets]
        best = max(zip(counts, self.buckets), key=lambda cb: (cb[1].frames > 1, cb[0]))[1]
        return best.frames, (best.height, best.width)

    def trained_shapes(self) -> list[list[int]]:
        """The (frames, height, width) of the buckets that took part (with a schedule: those the data fills)."""
        if not self.buckets:
            return []
        counts = self.schedule.counts if self.schedule is not None else [1] * len(self.buckets)
        return [list(b.shape) for b, c in zip(self.buckets, counts) if c > 0]

    def initialize(self) -> None:
        pass

    def latent_grid(self, batch: dict) -> tuple[int, ...]:
        if "latents" in batch:
            t, h, w = batch["latents"].shape[2:]
        else:
            t, h, w = self.vae.latent_shape(*batch["video"].shape[2:])[1:]
        return self.frames.frames(t), h, w

    def tokens(self, batch: dict) -> float:
        """Tokens per sample (a packed batch: their mean)."""
        if batch.get("packed"):
            return sum(batch["tokens"]) / len(batch["tokens"])
        return math.prod(self.model.dit.token_grid(self.latent_grid(batch)))

    def encode_text(self, module: TextToVideo, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text inputs of the wrapped model: token ids (built-in encoder) or frozen-encoder tokens."""
        return text_inputs(module, self.frozen_text, captions, self.env.device)

    def sample_draws(self, keys: list[str], step: int) -> tuple[list[torch.Generator], torch.Tensor, torch.Tensor]:
        """Each sample's generator (its noise comes from it next), its normal draw for the time and its caption
        dropout, in this order: a clip draws the same whether it trains in a bucket or in a packed batch."""
        gens = [sample_generator(self.args.seed, step, k) for k in keys]
        normals = torch.stack([torch.randn((), generator=g) for g in gens])
        drop = torch.stack([torch.rand((), generator=g) < self.args.caption_dropout for g in gens])
        return gens, normals, drop

    def caption_inputs(self, model: nn.Module, captions: list[str], drop: torch.Tensor):
        """(text, mask, drop for the model): Wan's caption dropout is the empty caption, not a learned null token."""
        if self.text_padding == "wan":
            captions, drop = ["" if d else c for c, d in zip(captions, drop.tolist())], None
        text, mask = self.encode_text(unwrap(model), captions)
        return text, mask, drop

    def packed_loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        """The loss of a packed batch (clips of mixed shapes, one `forward_varlen`): each clip draws its noise, time
        and dropout as it would alone, its time shifted for its own token count; the clips' losses are averaged
        weighted by their tokens."""
        device, seed = self.env.device, self.args.seed
        keys = batch["key"]
        gens, normals, drop = self.sample_draws(keys, step)
        items = batch["latents"] if "latents" in batch else batch["video"]
        x0s, givens = [], []
        with torch.no_grad():
            for key, gen, item in zip(keys, gens, items):
                if "latents" in batch:
                    z = item[None].to(device)
                else:
                    posterior = self.vae.encode(item[None].to(device))
                    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape[1:], generator=gen).to(device)
                z, given = self.frames.select(z, [sample_generator(seed, step, key, "condition")])
                x0s.append(self.vae.normalize(z.float())[0])  # (C, t, h, w)
                givens.append(None if given is None else given[0])
        dit = unwrap(model).dit
        tokens = [math.prod(dit.token_grid(tuple(x0.shape[1:]))) for x0 in x0s]
        noises = [torch.randn(x0.shape, generator=g).to(device) for x0, g in zip(x0s, gens)]
        t = torch.cat([training_timesteps(self.flow, normals[i : i + 1], n) for i, n in enumerate(tokens)]).to(device)
        x_ts = [keep_given(interpolate(x0[None], noise[None], t[i : i + 1]), None if g is None else (x0[None], g[None]))[0]
                for i, (x0, noise, g) in enumerate(zip(x0s, noises, givens))]
        text, mask, drop = self.caption_inputs(model, batch["caption"], drop)
        with autocast(device, self.args.precision):
            vs = model(x_ts, t, text, mask, None if drop is None else drop.to(device),
                       None if all(g is None for g in givens) else givens)
        losses = [flow_loss(v[None], velocity_target(x0, noise)[None], None if g is None else ~g[None])
                  for v, x0, noise, g in zip(vs, x0s, noises, givens)]
        loss = sum(n * part for n, part in zip(tokens, losses)) / sum(tokens)
        longest = max(tokens)
        return loss, {"pack/clips": len(tokens), "pack/padding": 1 - sum(tokens) / (len(tokens) * longest)}

    def loss(self, model: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        if batch.get("packed"):
            return self.packed_loss(model, batch, step)
        device, seed = self.env.device, self.args.seed
        keys = batch["key"]
        gens, normals, drop = self.sample_draws(keys, step)
        with torch.no_grad():
            if "latents" in batch:
                z = batch["latents"].to(device)
            else:
                posterior = self.vae.encode(batch["video"].to(device))
                eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in gens]).to(device)
                z = posterior.mean + posterior.std * eps
            z, given = self.frames.select(z, [sample_generator(seed, step, k, "condition") for k in keys])
            if image_step(seed, step, self.args.image_prob):
                z, given = z[:, :, :1], None if given is None else torch.zeros_like(given[:, :1])
            x0 = self.vae.normalize(z.float())  # (B, C, t, h, w), unit scale
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        t = training_timesteps(self.flow, normals, math.prod(unwrap(model).dit.token_grid(tuple(x0.shape[2:])))).to(device)
        x_t = keep_given(interpolate(x0, noise, t), None if given is None else (x0, given))
        text, mask, drop = self.caption_inputs(model, batch["caption"], drop)
        with autocast(device, self.args.precision):
            v = model(x_t, t, text, mask, None if drop is None else drop.to(device), given)
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
    def generate(self, ema: TextToVideo, prompts: list[str], frames: int, size: int | tuple[int, int], steps: int, guidance: float,
                 seed: int = 0) -> torch.Tensor:
        """Videos (B, 3, frames, size, size) in [-1, 1] for prompts, by the EMA model (called as a whole, as
        FSDP2 needs: it gathers the root's parameters in the root's forward)."""
        shape = self.vae.latent_shape(frames, *size_pair(size))
        z = generate_latents(ema, lambda c: self.encode_text(ema, c), prompts, shape, steps=steps, guidance=guidance,
                             negative="" if self.text_padding == "wan" else None,
                             shift=self.flow.shift_for(math.prod(ema.dit.token_grid(shape[1:]))),
                             seeds=[seed + i for i in range(len(prompts))], device=self.env.device,
                             autocast_dtype=compute_dtype(self.env.device, self.args.precision),
                             student=ema.dit.config.sampler_embed)
        return self.vae.decode(self.vae.denormalize(z), chunk=2).clamp(-1, 1)

    def preview(self, ema: nn.Module, batch: dict) -> tuple[list[tuple[str, torch.Tensor, str | None]], dict]:
        """Samples of the preview prompts by the EMA weights: (name, video, prompt) items and their motion scores."""
        prompts = self.preview_prompts() or list(dict.fromkeys(batch["caption"]))[:4]
        frames, size = self.preview_shape()
        videos = self.generate(ema, prompts, frames, size, self.args.preview_steps, self.args.guidance, seed=self.args.seed)
        items = [(prompt, video, prompt) for prompt, video in zip(prompts, videos)]
        return items, preview_scores(prompts, videos)

    def finish(self, ema: nn.Module) -> dict:
        return {}

    def sampler_record(self) -> dict:
        """pipeline.json's "sampler": what sample.py does with no flags."""
        return {"steps": self.args.preview_steps, "guidance": self.args.guidance, "solver": "euler"}

    def export(self, ema: TextToVideo, state: dict[str, torch.Tensor], directory: Path, step: int,
               previous: Path | None = None) -> None:
        """directory/{dit, text, tokenizer} and pipeline.json: all that sample.py needs (the frozen tokenizer
        linked from the `previous` export where there is one)."""
        frames, size = self.preview_shape()
        trained = self.trained_shapes()
        save_pipeline(directory, ema, state, self.vae, step, previous, {
            "text_encoder": self.args.text_encoder if ema.text is not None else str(Path(self.args.text_encoder).resolve()),
            "frames": frames, "size": list(size), "fps": self.args.fps or 8.0,
            "flow": dataclasses.asdict(self.flow),
            "sampler": self.sampler_record(),
            "condition": dataclasses.asdict(self.frames.condition), "text_padding": self.text_padding,
        } | ({"base": str(dit_folder(self.args.init).resolve())} if self.args.init else {})
          | ({"buckets": trained} if trained else {})
          | ({"time_scaling": dataclasses.asdict(ema.dit.time_scaling)} if ema.dit.time_scaling else {}),
            lora=self.lora, merge=self.args.lora_merge)
