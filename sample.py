#!/usr/bin/env python
"""Text to video from the command line, with a model trained by train.py.

    python sample.py --ckpt runs/quickstart/dit --prompt "a red circle moving right" --out samples/
    python sample.py --ckpt RUN --prompts prompts.txt --videos-per-prompt 4 --steps 50 --guidance 5 --solver heun --out samples/
    python sample.py --ckpt RUN --prompt "..." --negative-prompt "blurry" --seed 7 --out clip.mp4 --gif --png
    python sample.py --ckpt RUN --prompt "..." --save-trajectory --out study/   # x0 prediction at every step
    python sample.py --ckpt RUN --frames 121 --height 256 --width 256 --dry-run   # the token budget, nothing run
    python sample.py --ckpt RUN --prompt "..." --image first.png --out clip.mp4          # image to video
    python sample.py --ckpt RUN --prompt "..." --video clip.mp4 --extend 32 --out longer.mp4  # continue a clip
    python sample.py --ckpt RUN --prompt "..." --keyframes a.png b.png --out between.mp4    # interpolate
    torchrun --nproc_per_node 8 sample.py --ckpt RUN --prompts p.txt --sp-size 4 --frames 121 --out samples/
    python sample.py --ckpt Wan2.1-T2V-1.3B-Diffusers --prompt "..." --out clip.mp4       # Wan2.1, with its defaults

The run folder supplies the DiT (EMA weights), its text encoder and the tokenizer (--vae overrides the
tokenizer); frames, size, fps, steps, guidance and the timestep shift default to the training run's (a run
trained in buckets: its bucket with the most data; a shape it never trained on is sampled, with a note naming
the nearest bucket it did).
The flow ODE is solved in latent space with classifier-free guidance (against the negative prompt, or
the null condition), deterministically for a seed: video i of a prompt uses seed + i. Latents are
decoded chunk by chunk (bounded memory) and written as h264 mp4. With a folder as --out each video is
NAME.mp4 with its prompt in NAME.txt, which is what `python -m evaluation.motion_score` reads.

Known frames (a model trained with `train.py --condition ...`): --image gives the first frame; --keyframes
gives the first and the last (the last as its image held still over the final latent frame); --video
continues a clip by --extend frames, window by window, each window given the last --context latent frames of
what exists. Given frames are kept exactly at every solver step, so they come back up to the tokenizer's
reconstruction error. Images and videos are scaled to cover the size and centre-cropped; a video is read at
the run's fps, and its last 1 + 4k frames are used.

Long videos on several GPUs: under torchrun, --sp-size N splits every video's tokens over N ranks (Ulysses
sequence parallelism, see parallel/ulysses.py), and the process count / N groups share out the batches of
prompts; the first rank of each group decodes and writes. The video is the one a single process makes.
--dry-run prints, for each --sp-size that divides the heads, the tokens, FLOPs, memory and all-to-all
traffic per rank, and the smallest one whose memory fits this device.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from checkpoint_io import atomic_path, check_writable, write_text_atomic
from data import read_image, read_last_frames, tensor_to_frames, video_writer, write_video
from data.buckets import nearest_bucket
from data.sources import video_name
from data.clip_options import add_clip_options, check_clip_options
from dit3d.flow import SOLVERS
from dit3d.model import DiTBlock
from dit3d.rope import METHODS as TIME_METHODS
from errors import InputError, Interrupted, MissingInputError
from evaluation.metrics import unusable
from parallel import ParallelOptions, parallelize, run_command, setup_distributed
from pipeline import Pipeline

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a train.py DiT run folder (or its model/ folder), or Wan2.1: a diffusers "
                                                 "Wan pipeline folder, or its transformer (either layout) with --vae and "
                                                 "--text-encoder")
    p.add_argument("--vae", help="tokenizer folder overriding the run's (a Wan transformer's: its AutoencoderKLWan folder)")
    p.add_argument("--text-encoder", help="text encoder folder overriding the run's (a Wan transformer's: its UMT5)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    what.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="guide away from this instead of the null condition")
    p.add_argument("--videos-per-prompt", "--num", dest="num", type=int, default=1,
                   help="videos per prompt (seeds seed, seed + 1, ...); under torchrun spell it out, as torchrun "
                        "reads --num as an abbreviation of its own --numa-binding")
    p.add_argument("--seed", type=int, default=0, help="the first prompt video's seed; video i of a prompt uses seed + i")
    add_clip_options(p, frames=None, with_size=False, frames_help="frames, 1 + 4k (default: the training clips')",
                     fps_help="frame rate of the written video (default: the training clips')")
    p.add_argument("--height", type=int, default=None, help="frame height in pixels (default: the training clips')")
    p.add_argument("--width", type=int, default=None, help="frame width in pixels (default: the training clips')")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the run's preview setting)")
    p.add_argument("--guidance", "--cfg", dest="cfg", type=float, default=None, help="classifier-free guidance scale (1: none)")
    p.add_argument("--solver", choices=list(SOLVERS), default=None,
                   help="ODE solver (default: the run's; Wan folders: their scheduler's): euler (one pass a step), heun "
                        "(two), unipc or dpm++ (multistep, one pass a step, second order: Wan2.1 ships unipc)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: as in training)")
    p.add_argument("--cache-threshold", type=float, default=0.0,
                   help="step caching (TeaCache's rule): skip the DiT's blocks on a step while the summed relative "
                        "change of their modulated input stays under this, reusing their last output; 0: off, bit "
                        "for bit the uncached video (see docs/sampling.md for the speed and quality it costs)")
    p.add_argument("--extrapolate", choices=list(TIME_METHODS), default=None,
                   help="for clips longer than the model trained on: change its rotary time frequencies, RIFLEx's "
                        "intrinsic frequency, NTK-aware scaling of the time base, or position interpolation (pi), "
                        "for the requested --frames (nothing changes at or below the trained length)")
    p.add_argument("--batch-size", type=int, default=8, help="videos generated together")
    p.add_argument("--decode-chunk", type=int, default=2, help="latent frames decoded per step (memory)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="a folder, or FILE.mp4 for a single video")
    p.add_argument("--lossless", action="store_true",
                   help="write RGB h264 at qp 0 (libx264rgb): the mp4 decodes to exactly the generated frames, for "
                        "comparing samples bit for bit (about 3x larger; FFmpeg-based players play it, some others not)")
    p.add_argument("--gif", action="store_true", help="also write NAME.gif")
    p.add_argument("--png", action="store_true", help="also write NAME.png, a contact sheet of the frames")
    p.add_argument("--save-trajectory", action="store_true",
                   help="also write the clean-video prediction at every step: NAME.trajectory/step_NNN.mp4")
    known = p.add_argument_group("known frames (models trained with --condition)")
    start = known.add_mutually_exclusive_group()
    start.add_argument("--image", type=Path, help="image to video: the first frame")
    start.add_argument("--video", type=Path, help="a clip to continue (with --extend)")
    start.add_argument("--keyframes", type=Path, nargs=2, metavar=("FIRST", "LAST"), help="interpolate between two images")
    known.add_argument("--extend", type=int, default=None, help="with --video: frames to add (a multiple of 4)")
    known.add_argument("--context", type=int, default=None,
                       help="with --video: latent frames of the clip's tail given to each window (default: half "
                            "the training window)")
    p.add_argument("--dry-run", action="store_true", help="print the token budget and exit")
    p.add_argument("--force", action="store_true",
                   help="sample even when the memory estimate is more than the device has free (refused otherwise)")
    p.add_argument("--sp-size", type=int, default=1,
                   help="under torchrun: ranks that split each video's tokens (sequence parallelism); must divide "
                        "the process count and the DiT's heads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help='no progress bar')
    return p


def read_prompts(args) -> list[str]:
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise MissingInputError(f"no prompt file at {args.prompts}")
        try:
            text = args.prompts.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"the prompt file {args.prompts} is not UTF-8 text ({e.reason} at byte {e.start}): "
                             f"give a text file, one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"the prompt file {args.prompts} has no prompts: write one per line")
        return prompts
    prompts = [p.strip() for p in (args.prompt or []) if p.strip()]
    if not prompts and not args.dry_run:
        raise InputError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def dry_run(pipe, frames: int, height: int, width: int, steps: int, guidance: float, batch: int, text_tokens: int,
            device, decode_chunk: int = 2) -> None:
    """Print the token budget, and per --sp-size (the divisors of the heads, up to 64) what each rank carries,
    with the smallest split that runs on this host (its GPUs, or its memory shared by every process on the CPU)."""
    b = pipe.budget(frames, height, width, steps, guidance, batch, text_tokens, 1, decode_chunk)
    c, t, h, w = b["latent"]
    print(f"{frames} frames at {height}x{width} -> latents ({c}, {t}, {h}, {w}) -> {b['tokens']:,} tokens "
          f"({b['tokens_without_temporal_compression']:,} without temporal compression)")
    print(f"per step (batch {batch}{', x2 for guidance' if guidance != 1.0 else ''}, {text_tokens} text tokens): "
          f"{b['total_tflop_per_step']:.3g} TFLOP "
          f"({b['attention_tflop_per_step']:.3g} in attention); {steps} steps: {b['total_tflop_run']:.3g} TFLOP")
    print(f"memory: about {b['memory_gb']:.2f} GiB: weights {b['weights_gb']:.2f} (DiT, text encoder, tokenizer), "
          f"then denoising {b['denoise_gb']:.2f} (one block's activations and the latents; attention never holds "
          f"the {b['attention_matrix_gb_if_materialised']:.2f} GiB score matrix) or decoding {b['decode_gb']:.2f} "
          f"(--decode-chunk {decode_chunk}; the video goes to disk chunk by chunk), whichever is more")
    free = free_memory_gb(device)
    heads = pipe.model.dit.config.heads
    rows = [pipe.budget(frames, height, width, steps, guidance, batch, text_tokens, sp, decode_chunk)
            for sp in range(1, min(heads, 64) + 1) if heads % sp == 0 and b["tokens"] % sp == 0]
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    where = f"{free:.1f} GiB free on {device}" + (f", {gpus} GPU(s) on this host" if gpus else
                                                  ", shared by every process on this host")
    print(f"\nsequence parallelism (torchrun ... sample.py --sp-size N); {where}:")
    print("| --sp-size | tokens per rank | TFLOP per step per rank | memory per rank GiB | all-to-all GiB per step per rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sp']} | {r['tokens_per_rank']:,} | {r['total_tflop_per_step']:.3g} | {r['memory_gb']:.2f} | "
              f"{r['all_to_all_gb_per_step']:.3g} |")
    print(smallest_split(rows, free, gpus))


def smallest_split(rows: list[dict], free: float, gpus: int) -> str:
    """Which --sp-size runs here: on GPUs, one whose per-rank memory fits a GPU, with a GPU per rank on this
    host (a larger split needs more hosts); on the CPU every rank holds its own copy of the weights in the one
    memory, so the split must fit sp times over."""
    if gpus:
        fits = [r for r in rows if r["memory_gb"] <= free]
        here = [r for r in fits if r["sp"] <= gpus]
        if here:
            return f"smallest --sp-size that fits here: {here[0]['sp']} (of this host's {gpus} GPU(s))"
        if fits:
            return (f"no --sp-size fits on this host's {gpus} GPU(s): --sp-size {fits[0]['sp']} fits GPUs like this "
                    f"one, across hosts (torchrun --nnodes), or lower --batch-size, --frames or the size")
        return "no --sp-size fits here: lower --batch-size, --frames or the size"
    here = [r for r in rows if r["memory_gb"] * r["sp"] <= free]
    if here:
        return f"smallest --sp-size that fits here: {here[0]['sp']} ({here[0]['sp']} processes sharing this memory)"
    return ("no --sp-size fits in this host's memory (each process holds the weights): lower --batch-size, --frames "
            "or the size, or --decode-chunk")


def free_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def contact_sheet(frames: np.ndarray, columns: int = 8) -> np.ndarray:
    """uint8 frames (T, H, W, 3) in rows of `columns`."""
    t, h, w, _ = frames.shape
    rows = -(-t // columns)
    sheet = np.zeros((rows * h, min(t, columns) * w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        sheet[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = f
    return sheet


def check_sampled(x: torch.Tensor, what: str, prompt: str, args, guidance: float) -> None:
    """A video that is not finite would be written as black frames (NaN becomes 0 in uint8): say so instead."""
    found = unusable(x, latents=what == "latents")
    if found is None:
        return
    if found.startswith("up to"):
        found += " (normalised latents are about 1)"
    source = args.vae if what == "decoded video" and args.vae else args.ckpt
    raise InputError(f"the {what} sampled for {prompt[:60]!r} {'are' if what == 'latents' else 'is'} {found}: the model "
                     f"at {source} has diverged (its model/run.json says how its run ended) or --guidance {guidance:g} "
                     f"is far too large; sample from an earlier checkpoint's export, or with guidance about 1-10")


def write_outputs(path: Path, chunks, prompt: str, fps: float, args, guidance: float) -> None:
    """The video, decoded chunk by chunk (`chunks`: (3, n, H, W) in [-1, 1]) and written as it comes, so a long
    one is never held whole (only with --gif or --png are its 8-bit frames kept, for those); its prompt beside."""
    frames = [] if args.gif or args.png else None
    writer = None
    with contextlib.ExitStack() as stack:
        for chunk in chunks:
            check_sampled(chunk, "decoded video", prompt, args, guidance)
            if writer is None:
                writer = stack.enter_context(video_writer(path, chunk.shape[-1], chunk.shape[-2], fps=fps,
                                                          lossless=args.lossless))
            part = tensor_to_frames(chunk)
            writer(part)
            if frames is not None:
                frames.append(part)
    if args.out.suffix != ".mp4":
        write_text_atomic(path.with_suffix(".txt"), prompt + "\n")
    if frames is not None:
        from PIL import Image

        frames = np.concatenate(frames)
        if args.png:
            with atomic_path(path.with_suffix(".png")) as tmp:
                Image.fromarray(contact_sheet(frames)).save(tmp, format="PNG")
        if args.gif:
            images = [Image.fromarray(f) for f in frames]
            with atomic_path(path.with_suffix(".gif")) as tmp:
                images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps),
                               loop=0)


class KnownFrames:
    """What --image, --keyframes and --video give the sampler, read and encoded once."""

    def __init__(self, args, pipe, frames: int, height: int, width: int, fps: float):
        self.pipe, self.shape, self.passes = pipe, pipe.latent_shape(frames, height, width), 1
        self.mode = "image" if args.image else "interpolate" if args.keyframes else "extend" if args.video else None
        if (args.extend is not None or args.context is not None) and self.mode != "extend":
            raise InputError("--extend and --context continue a clip: give it with --video")
        if self.mode is None:
            return
        if not pipe.model.dit.config.frame_conditioning:
            raise InputError(f"the model at {args.ckpt} was trained without frame conditioning, so --{self.mode if self.mode != 'interpolate' else 'keyframes'} "
                             f"cannot be used (train one with `train.py --stage dit --condition ...`)")
        if args.save_trajectory and self.mode == "extend":
            raise InputError("--save-trajectory records one solver run; --video runs one per window")
        if self.mode == "image":
            self.frames = {0: pipe.encode(read_image(args.image, height, width)[None, :, None])}
        elif self.mode == "interpolate":
            first, last = (read_image(p, height, width)[None] for p in args.keyframes)
            self.frames = {0: pipe.encode(first[:, :, None]), -1: pipe.held_latent(last)}
        else:
            factor = pipe.vae.config.temporal_factor
            if args.extend is None or args.extend < factor or args.extend % factor:
                raise InputError(f"--video needs --extend N, the frames to add: a positive multiple of {factor} "
                                 f"(got {args.extend})")
            self.latents = pipe.encode(read_last_frames(args.video, height, width, fps, factor)[None], chunk=args.decode_chunk)
            self.window = self.shape[1]
            self.context = args.context or max(1, self.window // 2)
            if not 1 <= self.context < self.window:
                raise InputError(f"--context must be 1 to {self.window - 1} latent frames (the window is "
                                 f"{self.window}), got {self.context}")
            self.add = args.extend // factor
            self.passes = -(-self.add // (self.window - self.context))

    def generate(self, prompts: list[str], seeds: list[int], sampler: dict) -> torch.Tensor:
        n = len(prompts)
        if self.mode is None:
            return self.pipe.generate_latents(prompts, self.shape, seeds=seeds, **sampler)
        if self.mode == "extend":
            start = self.latents.expand(n, -1, -1, -1, -1)
            return self.pipe.extend(start, prompts, self.add, window=self.window, context=self.context, seeds=seeds,
                                    **sampler)
        given = self.pipe.condition(self.shape, {i: z.expand(n, -1, -1, -1, -1) for i, z in self.frames.items()})
        return self.pipe.generate_latents(prompts, self.shape, seeds=seeds, given=given, **sampler)


def check_options(args) -> None:
    """Values out of range are errors; only an option left out takes the run's default."""
    for flag, value in (("--videos-per-prompt", args.num), ("--batch-size", args.batch_size),
                        ("--decode-chunk", args.decode_chunk), ("--steps", args.steps), ("--height", args.height),
                        ("--width", args.width)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    check_clip_options(args)
    if args.cfg is not None and not args.cfg >= 0:
        raise InputError(f"--guidance must be at least 0 (1: no guidance), got {args.cfg}")
    if args.shift is not None and not args.shift > 0:
        raise InputError(f"--shift must be positive, got {args.shift}")
    if not args.cache_threshold >= 0:
        raise InputError(f"--cache-threshold must be at least 0 (0: off), got {args.cache_threshold}")
    if args.cache_threshold > 0 and args.sp_size > 1:
        raise InputError("--cache-threshold decides per rank from that rank's tokens, which --sp-size splits: "
                         "use one or the other")


def check_student(student: dict, embedded: bool, steps: int, guidance: float) -> None:
    """A distilled student (train.py --stage distill) asked for what it was not distilled for: steps it has no
    input for are an error; other steps or guidance than its own, a warning."""
    trained = ", ".join(map(str, student["steps"]))
    lo, hi = student["guidance"]
    if embedded and steps not in student["steps"]:
        raise InputError(f"this student was distilled to sample in {trained} step(s) and takes its step count as an "
                         f"input; --steps {steps} is none of them (leave --steps out for its default)")
    if not embedded and steps not in student["steps"]:
        print(f"warning: this LoRA student was distilled for {trained} steps; at {steps} its steps no longer match "
              f"the segments it learnt", file=sys.stderr)
    if embedded and not lo <= guidance <= hi:
        print(f"warning: this student stands in for guidance {lo:g} to {hi:g}, and {guidance:g} is outside what it "
              f"was distilled on (it samples in one pass a step either way)", file=sys.stderr)
    if not embedded and guidance != 1:
        print(f"warning: this LoRA student was distilled out of guidance (it stands in for {lo:g}); --guidance "
              f"{guidance:g} doubles the passes and guides twice", file=sys.stderr)


def run(args) -> list[Path]:
    check_options(args)
    prompts = read_prompts(args)
    single = args.out.suffix == ".mp4"
    out_dir = args.out.parent if single else args.out
    if not args.dry_run:  # before anything is computed: a wrong or read-only --out fails now, not after sampling
        check_writable(out_dir)
    env = setup_distributed(args.device, 1 if args.dry_run else args.sp_size)
    device = env.device
    pipe = Pipeline.load(args.ckpt, vae=args.vae, device=device, text_encoder=args.text_encoder)
    d = pipe.defaults
    frames = d["frames"] if args.frames is None else args.frames
    height, width = (s if v is None else v for s, v in zip(pipe.size, (args.height, args.width)))
    steps = d["sampler"]["steps"] if args.steps is None else args.steps
    guidance = d["sampler"]["guidance"] if args.cfg is None else args.cfg
    args.solver = d["sampler"].get("solver", "euler") if args.solver is None else args.solver
    if d["sampler"].get("student"):
        check_student(d["sampler"]["student"], pipe.model.dit.config.sampler_embed, steps, guidance)
    fps = d["fps"] if args.fps is None else args.fps
    jobs = [(p, args.seed + i, video_name(p, args.seed + i if args.num > 1 else None)) for p in prompts for i in range(args.num)]
    batch = max(1, min(args.batch_size, len(jobs) or 1))
    text_tokens = pipe.text_tokens()
    if args.dry_run:
        dry_run(pipe, frames, height, width, steps, guidance, batch, text_tokens, device, args.decode_chunk)
        return []
    b = pipe.budget(frames, height, width, steps, guidance, batch, text_tokens, env.sp, args.decode_chunk)
    # sequence parallelism refuses a head count, and its layout a token count, that --sp-size does not divide
    parallelize(pipe.model.dit, env, ParallelOptions((DiTBlock,)))
    free = free_memory_gb(device)
    if b["memory_gb"] > free:
        need = (f"needs about {b['memory_gb']:.1f} GiB (weights {b['weights_gb']:.1f}, denoising "
                f"{b['denoise_gb']:.1f}, decoding {b['decode_gb']:.1f}) and {device} has {free:.1f} GiB free")
        if not args.force:
            raise InputError(f"this {need}: lower --batch-size, --frames, the size or --decode-chunk, split it with "
                             f"--sp-size (see --dry-run), or give --force to try anyway")
        print(f"warning: this {need}; going on (--force)", file=sys.stderr)
    if single and len(jobs) != 1:
        raise InputError(f"--out {args.out} is one file but {len(jobs)} videos were asked for: give a folder")
    known = KnownFrames(args, pipe, frames, height, width, fps)
    note = pipe.extrapolate_time(args.extrapolate, frames)
    if note and env.main:
        print(f"note: {note}", file=sys.stderr)
    trained = pipe.trained_shapes()
    if [frames, height, width] not in trained and env.main:
        near = nearest_bucket(trained, frames, height, width)
        print(f"note: {frames}x{height}x{width} is a shape this model never trained on; the nearest it did is "
              f"{near[0]}x{near[1]}x{near[2]} (--frames {near[0]} --height {near[1]} --width {near[2]})", file=sys.stderr)
    writer = env.rank % env.sp == 0  # the first rank of each sequence group
    starts = list(range(0, len(jobs), batch))[env.dp_rank :: env.dp_world]  # sequence groups share out the batches
    written = []
    bar = tqdm(total=sum(len(jobs[s : s + batch]) for s in starts) * steps * known.passes,
               disable=args.no_progress or not env.main, desc="sampling", unit="step")
    try:
        for start in starts:
            group = jobs[start : start + batch]
            trajectory: list[tuple[int, torch.Tensor]] = []

            def on_step(i, t, x0):
                bar.update(len(group))
                for k in range(len(group)):  # stop at the first step that leaves the video, not after the last
                    check_sampled(x0[k], "latents", group[k][0], args, guidance)
                if args.save_trajectory:
                    trajectory.append((i, x0.detach().clone()))

            sampler = dict(steps=steps, guidance=guidance, negative=args.negative_prompt, shift=args.shift,
                           solver=args.solver, on_step=on_step, cache=args.cache_threshold)
            z = known.generate([p for p, _, _ in group], [s for _, s, _ in group], sampler)
            if not writer:
                continue
            for k, (prompt, _, name) in enumerate(group):  # one video decoded and written at a time
                check_sampled(z[k], "latents", prompt, args, guidance)
                path = args.out if single else out_dir / f"{name}.mp4"
                write_outputs(path, pipe.decode_chunks(z[k], chunk=args.decode_chunk), prompt, fps, args, guidance)
                written.append(path)
                for i, x0 in trajectory:
                    write_video(path.with_suffix(".trajectory") / f"step_{i:03d}.mp4",
                                pipe.decode(x0[k : k + 1], chunk=args.decode_chunk)[0], fps=fps, lossless=args.lossless)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted (Ctrl-C): {len(written)} of {len(jobs)} videos written, each whole, in "
                          f"{out_dir}") from None
    finally:
        bar.close()
    if pipe.cache_reports and env.main:
        passes, run_ = (sum(r[k] for r in pipe.cache_reports) for k in ("passes", "passes_run"))
        print(f"step caching at {args.cache_threshold:g}: the DiT's blocks skipped on {passes - run_} of {passes} "
              f"video passes ({1 - run_ / max(passes, 1):.0%})", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status, written = run_command(lambda: run(args))
    if written:
        print(f"wrote {len(written)} video(s): {written[0] if len(written) == 1 else written[0].parent}")
    return status


if __name__ == "__main__":
    sys.exit(main())
