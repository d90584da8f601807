"""The text-to-video model as train.py trains it and sample.py runs it: text encoder + DiT + tokenizer.

Like the trainer and sample.py this module composes the libraries (`dit3d`, `tokenizer`); the libraries never
import it.

A trained model is a folder (a train.py run's `model/`, or the run folder itself) holding
    dit/        the DiT (config.json + model.safetensors, EMA weights)
    text/       the built-in text encoder (bytes or words) trained with it (absent for a frozen T5 / UMT5 / CLIP)
    tokenizer/  the frozen tokenizer, with its latent statistics
    pipeline.json  the text encoder's kind or path, the training clip shape, flow and sampler defaults
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from checkpoint_io import checkpoint_step, save_checkpoint, write_json_atomic
from cpu_math import strict_cpu_math
from dit3d import DiT3D, load_dit
from dit3d.cache import step_cache
from dit3d.budget import all_to_all_bytes, forward_flops, inference_activation_bytes
from dit3d.flow import FlowConfig, model_calls, sample
from dit3d.lora import LoraSettings, load_adapter, merged, merged_state, save_adapter, updates
from dit3d.rope import TimeScaling
from dit3d.text import BUILTIN_TEXT_ENCODERS, HFTextEncoder
from dit3d.checkpoint import wan_format
from errors import InputError, MissingInputError
from tokenizer import CausalVAE, load_tokenizer, save_tokenizer

PIPELINE_FILE = "pipeline.json"
# The diffusers scheduler a Wan folder names, as our solver on its grid (dit3d.flow.solver_times).
WAN_SCHEDULERS = {"UniPCMultistepScheduler": "unipc", "DPMSolverMultistepScheduler": "dpm++",
                  "FlowMatchEulerDiscreteScheduler": "euler"}
# the negative prompt Wan2.1's own sampler uses by default (its configs' sample_neg_prompt)
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                       "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def derived_seed(seed: int, *parts) -> int:
    """A 63-bit seed for a sub-task of the video with `seed` (an extension step, a cascade stage)."""
    digest = hashlib.blake2b("/".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class TextToVideo(nn.Module):
    """The trained modules in one module (so that one DDP or FSDP wrapper syncs them all): the DiT and, with
    a built-in text encoder (bytes or words), the text encoder trained with it."""

    def __init__(self, dit: DiT3D, text: nn.Module | None):
        super().__init__()
        self.dit, self.text = dit, text

    def forward(self, x: torch.Tensor | list[torch.Tensor], t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                drop: torch.Tensor | None = None, given: torch.Tensor | list | None = None,
                sampler: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Velocity for latents x (B, C, T, H, W) at times t (B,). text: token ids (B, L) with a built-in encoder,
        else encoded tokens (B, L, D); rows where `drop` (B,) is True get the null condition instead; `given`
        (B, T) flags latent frames known clean in x. A packed batch: x a list of (C, T_i, H_i, W_i) latents of mixed
        shapes (and `given` a list of (T_i,) flags or None), run together by `DiT3D.forward_varlen`.
        `sampler` (B, 2): a distilled student's (guidance, steps)."""
        if self.text is not None:
            text = self.text(text, text_mask)
        if drop is not None:
            text, text_mask = self.dit.drop_captions(text, text_mask, drop)
        if isinstance(x, (list, tuple)):
            return self.dit.forward_varlen(list(x), t, text, text_mask, given)
        return self.dit(x, t, text, text_mask, given, sampler)


def save_pipeline(directory: Path, model: TextToVideo, state: dict[str, torch.Tensor], vae: CausalVAE, step: int,
                  previous: Path | None, spec: dict, lora: LoraSettings | None = None, merge: bool = False) -> None:
    """Write a trained model folder: directory/{dit, text, tokenizer} from `model`'s full `state` (the EMA
    weights; `text` only with a built-in encoder) and pipeline.json = `spec` (the text encoder's kind or path,
    frames, size, fps, flow, sampler and condition settings) with `step`, last. The frozen tokenizer is
    hard-linked from a `previous` export of the same run where there is one, not written again.

    With `lora`, the DiT is written as its adapter alone (lora/, in diffusers' format), with spec["base"] naming
    the pretrained weights it adapts; `merge` writes dit/ too, the adapter merged into the base weights."""
    dit_state = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    if lora is not None:
        adapter = updates(dit_state, lora.scale)
        save_adapter(adapter, model.dit.config.width, directory / "lora", lora)
        spec = spec | {"lora": "lora", "lora_step": step}
        dit_state = merged_state(dit_state, adapter) if merge else None
    if dit_state is not None:
        save_checkpoint(directory / "dit", dataclasses.asdict(model.dit.config), dit_state, kind="dit", step=step)
    if model.text is not None:
        text_state = {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
        save_checkpoint(directory / "text", dataclasses.asdict(model.text.config), text_state, kind=model.text.KIND,
                        step=step)
    if previous is not None and (previous / "tokenizer" / "config.json").is_file():
        shutil.copytree(previous / "tokenizer", directory / "tokenizer", copy_function=_link_or_copy)
    else:
        save_tokenizer(vae, directory / "tokenizer")
    write_json_atomic(directory / PIPELINE_FILE, spec | {"step": step})


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # safe to share: files are replaced by renames, never rewritten in place
    except OSError:
        shutil.copy2(src, dst)


def text_inputs(model: TextToVideo, frozen: HFTextEncoder | None, captions: list[str],
                device: torch.device, fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What `model.forward` takes as text: token ids (built-in encoder) or the frozen encoder's tokens. fixed=True
    pads to the encoder's most rather than the batch's longest caption: sampling does, so that a video does not
    depend on the prompts beside it (masked padding of another length sums in another order)."""
    if frozen is not None:
        return frozen.encode(captions, fixed=fixed)
    ids, mask = model.text.tokenize(captions, fixed=fixed)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_latents(forward: Callable[..., torch.Tensor], text_fn: Callable[[list[str]], tuple], prompts: list[str],
                     latent_shape: tuple[int, int, int, int], *, steps: int, guidance: float, shift: float,
                     negative: str | None = None, seeds: list[int], solver: str = "euler", device=None,
                     autocast_dtype: torch.dtype | None = None,
                     on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                     given: tuple[torch.Tensor, torch.Tensor] | None = None, schedule: str = "uniform",
                     student: bool = False) -> torch.Tensor:
    """Normalised latents (B, C, t, h, w) for prompts, solving the flow ODE from seeded noise.

    forward(x, t, text, mask, drop, given) is the model (called as a whole, as FSDP needs). Guidance runs the
    prompt and its unconditional twin in one batch: the negative prompt when given, else the null
    condition (the caption dropped); both see the same given frames. Each video's noise comes from its own
    seed, so a video does not depend on the others in its batch. given = (known, mask): normalised latents
    (B, C, t, h, w) and (B, t) bool, True on the frames to keep exactly (image-to-video, extension,
    interpolation). student: the model is a distilled student (DiTConfig.sampler_embed), which takes the
    guidance scale and the step count as inputs: one pass a step, no unconditional twin.
    """
    n = len(prompts)
    noise = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    if guidance == 1.0 or student:
        text, mask = text_fn(prompts)
        drop = None
    else:
        text, mask = text_fn(prompts + [negative or ""] * n)  # one padded batch for both halves
        drop = torch.arange(2 * n, device=device) >= n if negative is None else None

    if given is not None:
        given = (given[0].to(device=device, dtype=noise.dtype), given[1].to(device))
    flags = None if given is None else given[1]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
        with ctx:
            if student:
                return forward(x, t, text, mask, None, flags, sampler=x.new_tensor([[guidance, steps]]).expand(n, 2)).float()
            if guidance == 1.0:
                return forward(x, t, text, mask, None, flags).float()
            both = None if flags is None else torch.cat([flags, flags])
            cond, uncond = forward(torch.cat([x, x]), torch.cat([t, t]), text, mask, drop, both).float().chunk(2)
        return uncond + guidance * (cond - uncond)

    return sample(velocity, noise, steps, shift, solver, on_step=on_step, given=given, schedule=schedule)


def trained_time_scaling(spec: dict) -> TimeScaling | None:
    """The TimeScaling a pipeline.json records (train.py --extrapolate), or None."""
    return TimeScaling(**spec["time_scaling"]) if spec.get("time_scaling") else None


@dataclass
class Pipeline:
    model: TextToVideo
    frozen_text: HFTextEncoder | None
    vae: CausalVAE
    flow: FlowConfig
    defaults: dict  # frames, size, fps, sampler steps / guidance / solver from training
    device: torch.device
    cache_reports: list = dataclasses.field(default_factory=list)  # step caching's report of each sampler run

    @classmethod
    def load(cls, path: str | Path, vae: str | Path | None = None, device: str | torch.device = "cpu",
             text_encoder: str | Path | None = None) -> "Pipeline":
        """From a train.py run folder or its `model/` folder, or Wan2.1 (a diffusers Wan pipeline folder, or its
        transformer in either layout with `vae` and `text_encoder` folders); `vae` overrides the tokenizer."""
        strict_cpu_math()  # a no-op where the process did a matrix product first (cpu_math)
        path = Path(path)
        if not path.is_dir():
            raise MissingInputError(f"no checkpoint at {path}: give a train.py run folder (or its model/ folder)")
        if wan_format(path):
            return cls.load_wan(path, vae, device, text_encoder)
        root = path / "model" if (path / "model" / PIPELINE_FILE).is_file() else path
        if not (root / PIPELINE_FILE).is_file():
            raise MissingInputError(f"{path} is not a trained DiT: no {PIPELINE_FILE} in it or in {path / 'model'} "
                                    f"(train one with `python train.py --stage dit ...`; its run folder is what to give)")
        try:
            spec = json.loads((root / PIPELINE_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{root / PIPELINE_FILE} is not valid JSON ({e}): re-export the model or pick another "
                             f"checkpoint") from None
        missing = [k for k in ("text_encoder", "flow") if not isinstance(spec, dict) or k not in spec]
        if missing:
            raise InputError(f"{root / PIPELINE_FILE} has no {' or '.join(repr(k) for k in missing)} (it names the text "
                             f"encoder and flow the DiT was trained with): export the model again, or pick another")
        if text_encoder is not None and spec["text_encoder"] in BUILTIN_TEXT_ENCODERS:
            raise InputError(f"{path} was trained with the built-in {spec['text_encoder']!r} text encoder, whose "
                             f"weights it holds; --text-encoder replaces a frozen pretrained one only: drop it")
        has_dit = (root / "dit" / "config.json").is_file()
        parts = {"pipeline.json": spec.get("step"), "lora" if "lora" in spec else "dit":
                 checkpoint_step(root / "dit") if has_dit else spec.get("lora_step")}
        if spec["text_encoder"] in BUILTIN_TEXT_ENCODERS:
            parts["text"] = checkpoint_step(root / "text")
        if len(set(parts.values())) > 1:
            raise InputError(f"{root} mixes parts from different training steps ("
                             + ", ".join(f"{k}: step {v}" for k, v in parts.items())
                             + "): it was assembled by hand or half-copied; export it again, or copy a whole model/")
        device = torch.device(device)
        if has_dit:  # our own weights, or an adapter merged into them at export
            dit = load_dit(root / "dit")
        elif "lora" in spec:  # an adapter on pretrained weights: merged once here, so sampling runs at full speed
            base = Path(spec["base"])
            if not base.exists():
                raise MissingInputError(f"{root} is a LoRA of the DiT at {base}, which is not there: give the base "
                                        f"weights back that path, or export the run with --lora-merge")
            dit = merged(load_adapter(load_dit(base), root / spec["lora"]))
        else:
            raise MissingInputError(f"{root} has no dit/ folder (and no LoRA adapter): export the model again")
        frozen, text = None, None
        if spec["text_encoder"] in BUILTIN_TEXT_ENCODERS:
            text = BUILTIN_TEXT_ENCODERS[spec["text_encoder"]].from_pretrained(root / "text")
        else:
            frozen = HFTextEncoder(text_encoder or spec["text_encoder"], device=device,
                                   padding=spec.get("text_padding", "masked"))
        return cls.assemble(dit, text, frozen, vae or root / "tokenizer", spec, device)

    @classmethod
    def load_wan(cls, path: Path, vae: str | Path | None, device, text_encoder: str | Path | None) -> "Pipeline":
        """Wan2.1 with its defaults (81 frames at 480x832 and 16 fps, 50 steps of the folder's scheduler on its
        grid: UniPC as Wan2.1 ships, DPM-Solver++ or Euler as its scheduler config names, Euler without one;
        guidance 5, the scheduler's flow shift or 5, Wan's negative prompt), its UMT5 tokens padded as Wan was
        trained."""
        whole = (path / "model_index.json").is_file()
        vae = vae or (path / "vae" if whole else None)
        text_encoder = text_encoder or (path if whole else None)
        if vae is None or text_encoder is None:
            raise InputError(f"{path} is a Wan transformer alone: give its VAE (--vae, a diffusers AutoencoderKLWan "
                             f"folder) and UMT5 text encoder (--text-encoder) too, or a whole diffusers Wan pipeline folder")
        shift, solver = 5.0, "euler"
        scheduler = path / "scheduler" / "scheduler_config.json"
        if whole and scheduler.is_file():
            config = json.loads(scheduler.read_text())
            shift = float(config.get("flow_shift") or config.get("shift") or shift)
            solver = WAN_SCHEDULERS.get(config.get("_class_name"), "euler")
        device = torch.device(device)
        spec = {"text_encoder": str(Path(text_encoder).resolve()), "frames": 81, "size": [480, 832], "fps": 16.0,
                "flow": {"shift": shift}, "text_padding": "wan", "negative_prompt": WAN_NEGATIVE_PROMPT,
                "sampler": {"steps": 50, "guidance": 5.0, "solver": solver, "schedule": "diffusers"}}
        frozen = HFTextEncoder(text_encoder, device=device, padding="wan")
        return cls.assemble(load_dit(path), None, frozen, vae, spec, device)

    @classmethod
    def assemble(cls, dit: DiT3D, text, frozen, vae: str | Path, spec: dict, device) -> "Pipeline":
        tokenizer = load_tokenizer(vae)
        if tokenizer.config.latent_channels != dit.config.in_channels:
            raise InputError(f"the tokenizer at {vae} has {tokenizer.config.latent_channels} latent "
                             f"channels but the DiT takes {dit.config.in_channels}: use the tokenizer it was trained with")
        if frozen is not None and frozen.dim != dit.config.text_dim:
            raise InputError(f"the text encoder at {spec['text_encoder']} gives {frozen.dim}-wide tokens but the DiT "
                             f"takes {dit.config.text_dim}: use the one it was trained with")
        dit.time_scaling = trained_time_scaling(spec)  # the frequencies it trained with, if it changed them
        model = TextToVideo(dit, text).to(device).eval().requires_grad_(False)
        return cls(model, frozen, tokenizer.to(device).eval().requires_grad_(False), FlowConfig(**spec["flow"]),
                   spec, device)

    @property
    def size(self) -> tuple[int, int]:
        """The (height, width) the model was trained at (pipeline.json's "size": [height, width], or one side)."""
        size = self.defaults["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, t, h, w), with one-line errors for a frame count or size the tokenizer or the patch cannot take."""
        self.vae.check_video(torch.empty(1, 3, frames, height, width, device="meta"))
        shape = self.vae.latent_shape(frames, height, width)
        try:
            self.model.dit.token_grid(shape[1:])
        except ValueError as e:
            s = self.vae.config.spatial_factor
            raise InputError(f"{e} (latent = pixels / {s} in height and width, (frames - 1) / "
                             f"{self.vae.config.temporal_factor} + 1 in time)") from None
        return shape

    def trained_shapes(self) -> list[list[int]]:
        """The (frames, height, width) the model trained on: its buckets, else its clips' one shape."""
        return [list(b) for b in self.defaults.get("buckets") or [[self.defaults["frames"], *self.size]]]

    def token_frames(self, frames: int) -> int:
        """Token frames of a clip of `frames` frames (latent frames over the DiT's patch in time)."""
        return self.vae.latent_shape(frames, 8, 8)[1] // self.model.dit.config.patch_size[0]

    @property
    def trained_frames(self) -> int:
        """Frames of the longest clip the model trained on."""
        return max(int(shape[0]) for shape in self.trained_shapes())

    @property
    def trained_time_scaling(self) -> TimeScaling | None:
        """The rotary time frequencies the model was trained or fine-tuned with (train.py --extrapolate), if any."""
        return trained_time_scaling(self.defaults)

    def extrapolate_time(self, method: str | None, frames: int) -> str | None:
        """Change the DiT's rotary time frequencies (dit3d.rope.TimeScaling) to sample `frames` frames with a
        model trained on shorter clips; None puts back those it trained with. Returns a warning when the model's
        positions cannot serve the length, or a note when there is nothing to extrapolate."""
        dit, fixed, trained_frames = self.model.dit, self.trained_time_scaling, self.trained_frames
        trained, target = self.token_frames(trained_frames), self.token_frames(frames)
        warning = None
        index_features = dit.config.absolute_position and dit.config.absolute_time == "index"
        chosen = fixed.method if fixed is not None else method
        if target > trained and index_features and chosen != "pi":
            warning = (f"this model adds absolute features of each token frame's index and trained on up to {trained} "
                       f"({trained_frames} frames): {frames} frames place {target - trained} token frame(s) where it "
                       f"has never seen one, and its motion replays instead of going on; --extrapolate pi interpolates "
                       f"those features with the rotary ones (the others change the rotary ones alone)")
        if fixed is not None:
            if method not in (None, fixed.method):
                raise InputError(f"this model was trained with --extrapolate {fixed.method} (for {fixed.target} token "
                                 f"frames), which its weights expect at every length: drop --extrapolate {method}")
            dit.time_scaling = fixed
            return warning
        if method is None:
            dit.time_scaling = None
            return warning
        if trained_frames == 1:
            raise InputError(f"--extrapolate {method} stretches the time positions past the trained clip length, and "
                             f"this model trained on single images: there is no trained length to extrapolate from")
        dit.time_scaling = TimeScaling(method, trained, target)
        if target <= trained:
            return (f"--extrapolate {method} changes nothing here: {frames} frames are {target} token frames, and the "
                    f"model trained on up to {trained}")
        return warning

    def tokens(self, shape: tuple[int, int, int, int]) -> int:
        return math.prod(self.model.dit.token_grid(shape[1:]))

    def budget(self, frames: int, height: int, width: int, steps: int, guidance: float, batch: int, text_tokens: int,
               sp: int = 1, decode_chunk: int = 2) -> dict:
        """Tokens, FLOPs and memory of one denoising step and of the run (forward passes only; see dit3d/budget.py),
        per rank when the tokens are split over `sp` ranks: each holds N / sp tokens between blocks and does
        1 / sp of the work. Memory counts what the command holds: every model's weights (the DiT, the text
        encoder, the tokenizer), then the larger of the denoising (one block's activations, the batch's latents)
        and the decoding (one chunk of `decode_chunk` latent frames; the video goes to disk chunk by chunk)."""
        cfg = self.model.dit.config
        shape = self.latent_shape(frames, height, width)
        n = self.tokens(shape)
        clips = batch * (2 if guidance != 1.0 else 1)  # guidance runs each prompt and its unconditional twin
        flops = forward_flops(cfg, sum(p.numel() for p in self.model.dit.parameters()), n, text_tokens)
        dtype_bytes = 2 if self.device.type == "cuda" else 4
        models = [self.model, self.vae] + ([self.frozen_text.model] if self.frozen_text is not None else [])
        weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        activations = inference_activation_bytes(cfg, n, clips, dtype_bytes)
        latents = 4 * clips * math.prod(shape) * 4  # the state, its noise, the velocity and the prediction, float32
        if isinstance(self.vae, CausalVAE):
            decode = self.vae.decode_bytes(height, width, decode_chunk)
        else:
            decode = self.vae.decode_bytes(height, width, decode_chunk, frames=frames)
        return {"sp": sp, "latent": shape, "tokens": n, "tokens_per_rank": n // sp, "text_tokens": text_tokens,
                "tokens_without_temporal_compression": n * frames // shape[1],
                "attention_tflop_per_step": clips * flops["attention"] / sp / 1e12,
                "total_tflop_per_step": clips * flops["total"] / sp / 1e12,
                "total_tflop_run": clips * flops["total"] * steps / sp / 1e12,
                "memory_gb": (weights + latents + max(activations / sp, decode)) / 2**30,
                "weights_gb": weights / 2**30, "denoise_gb": (activations / sp + latents) / 2**30,
                "decode_gb": decode / 2**30,
                "all_to_all_gb_per_step": all_to_all_bytes(cfg, n, sp, clips, dtype_bytes, training=False) / 2**30,
                "attention_matrix_gb_if_materialised": clips * cfg.heads * n * n * dtype_bytes / 2**30}

    def text_tokens(self) -> int:
        """Text tokens a sampling batch is padded to: always the encoder's most (see `text_inputs`)."""
        if self.frozen_text is not None:
            return self.frozen_text.max_length
        return self.model.text.position.shape[0]

    def generate(self, prompts: list[str], frames: int, height: int, width: int, *, steps: int, guidance: float,
                 seeds: list[int], negative: str | None = None, shift: float | None = None, solver: str | None = None,
                 on_step=None, given: tuple[torch.Tensor, torch.Tensor] | None = None, cache: float = 0.0) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w); `decode` turns them into video. solver None: the run's (Wan: its
        scheduler's). given = (known latents, (B, t) mask) keeps those latent frames exactly (see `condition`)."""
        return self.generate_latents(prompts, self.latent_shape(frames, height, width), steps=steps, guidance=guidance,
                                     seeds=seeds, negative=negative, shift=shift, solver=solver, on_step=on_step,
                                     given=given, cache=cache)

    def generate_latents(self, prompts: list[str], shape: tuple[int, int, int, int], *, steps: int, guidance: float,
                         seeds: list[int], negative: str | None = None, shift: float | None = None,
                         solver: str | None = None, on_step=None, given=None, cache: float = 0.0) -> torch.Tensor:
        """`generate` for a latent shape (C, t, h, w). Given frames need a model trained with frame conditioning
        (DiT3D says so with an InputError otherwise). cache > 0: skip the blocks on steps whose input changed less
        than that in sum (dit3d/cache.py); each run's report is appended to self.cache_reports."""
        negative = self.defaults.get("negative_prompt") if negative is None else negative
        solver = self.defaults["sampler"].get("solver", "euler") if solver is None else solver
        with step_cache(self.model.dit, cache, model_calls(solver, steps)) as cached:
            z = self._generate(prompts, shape, steps, guidance, seeds, negative, shift, solver, on_step, given)
        if cached is not None:
            self.cache_reports.append(cached.report())
        return z

    def _generate(self, prompts, shape, steps, guidance, seeds, negative, shift, solver, on_step, given):
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        return generate_latents(self.model, lambda c: text_inputs(self.model, self.frozen_text, c, self.device, fixed=True), prompts,
                                shape, steps=steps, guidance=guidance, negative=negative, seeds=seeds, solver=solver,
                                schedule=self.defaults["sampler"].get("schedule", "uniform"),
                                shift=self.flow.shift_for(self.tokens(shape)) if shift is None else shift,
                                device=self.device, autocast_dtype=dtype, on_step=on_step, given=given,
                                student=self.model.dit.config.sampler_embed)

    # ---- known frames: image-to-video, extension, interpolation ---------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) of videos (B, 3, 1 + 4k, H, W) in [-1, 1] (the posterior means),
        encoded chunk by chunk and one video at a time (as `decode`). The tokenizer is causal, so the first latent
        frame is the first frame's alone."""
        return torch.cat([self.vae.normalize(self.vae.encode(v[None].to(self.device).float(), chunk=chunk).mean)
                          for v in video])

    @torch.no_grad()
    def held_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w): a later latent frame showing images (B, 3, H, W) held still, the way a keyframe
        that ends a clip is given (a latent frame after the first covers temporal_factor frames)."""
        held = images[:, :, None].expand(-1, -1, 1 + self.vae.config.temporal_factor, -1, -1)
        return self.encode(held)[:, :, -1:]

    @staticmethod
    def condition(shape: tuple[int, int, int, int], frames: dict[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """given = (known, mask) for generate: latents (B, C, 1, h, w) placed at latent frame indices
        (negative ones count from the end) of a clip of latent shape (C, t, h, w)."""
        first = next(iter(frames.values()))
        known = torch.zeros(first.shape[0], *shape, device=first.device)
        mask = torch.zeros(first.shape[0], shape[1], dtype=torch.bool, device=first.device)
        for index, z in frames.items():
            n = z.shape[2]
            start = index % shape[1]
            if start + n > shape[1]:
                raise InputError(f"{n} given latent frame(s) at {index} do not fit a clip of {shape[1]} latent frames")
            known[:, :, start:start + n] = z
            mask[:, start:start + n] = True
        return known, mask

    def extend(self, latents: torch.Tensor, prompts: list[str], add: int, *, window: int, context: int,
               seeds: list[int], **sampler) -> torch.Tensor:
        """latents (B, C, t, h, w) continued by `add` latent frames: each step gives the last `context` latent
        frames of what exists and generates the rest of a `window`-frame clip, until `add` are made. Step i of
        video j draws its noise from a seed derived from (seeds[j], i), so a video does not depend on its batch."""
        if not 1 <= context < window:
            raise InputError(f"the context ({context} latent frames) must be at least 1 and less than the window "
                             f"({window}): each step has to generate something")
        out, step = latents, 0
        c, _, h, w = latents.shape[1:]
        while out.shape[2] < latents.shape[2] + add:
            shape = (c, window, h, w)
            given = self.condition(shape, {0: out[:, :, -context:]})
            step_seeds = [derived_seed(s, "extend", step) for s in seeds]
            z = self.generate_latents(prompts, shape, seeds=step_seeds, given=given, **sampler)
            out = torch.cat([out, z[:, :, context:]], dim=2)
            step += 1
        return out[:, :, :latents.shape[2] + add]

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, chunk: int = 2):
        """One video's frames (3, n, H, W) in [-1, 1], a chunk of `chunk` latent frames at a time, from its
        normalised latents (C, t, h, w): a long video need never be held whole (ours decode chunk by chunk; the
        field's tokenizers, which walk time themselves, give the whole video as one chunk)."""
        z = self.vae.denormalize(latents[None].float())
        if isinstance(self.vae, CausalVAE):
            for part in self.vae.decode_chunks(z, chunk):
                yield part[0].clamp(-1, 1)
        else:
            yield self.vae.decode(z, chunk=chunk)[0].clamp(-1, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 2) -> torch.Tensor:
        """Videos (B, 3, T, H, W) in [-1, 1] from normalised latents, decoded chunk by chunk (bounded memory) and
        one video at a time: a convolution's algorithm, and so its last bits, can depend on the batch size."""
        return torch.cat([self.vae.decode(self.vae.denormalize(z[None].float()), chunk=chunk).clamp(-1, 1)
                          for z in latents])
