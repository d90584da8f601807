"""train.py's options: every option's type, default and help in one place, and the checks of their values."""

from __future__ import annotations

import argparse
import json
import math

from data.clip_options import add_clip_options, check_clip_options
from dit3d.rope import METHODS as TIME_METHODS
from errors import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Train the video tokenizer or the text-to-video DiT, from one CPU to many GPUs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--stage", choices=["dit", "tokenizer", "distill"], required=True,
                   help="what to train (distill: a few-step student of the --init teacher)")
    g.add_argument("--preset", default="tiny", help="model size: tokenizer tiny|small|base, DiT tiny|S|B|L|XL|1.3B")
    g.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="change one model config field of the preset (repeatable), e.g. depth=8")
    g.add_argument("--data", required=True, help="shards: a folder, glob, brace pattern or pipe: URL")
    g.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    g.add_argument("--vae", help="the dit stage's trained tokenizer: a tokenizer run folder, or its model/")
    g.add_argument("--latents", action="store_true", help="--data holds latent shards (python -m tokenizer.encode)")
    g.add_argument("--device", default="auto", help="auto | cuda | cpu")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation, the data order and every sample's noise, time and dropout")
    g = p.add_argument_group("data")
    add_clip_options(g, frames=17, size=64, buckets=True)
    g.add_argument("--batch-size", type=int, default=8,
                   help="clips per process per micro-batch (with --buckets: the largest bucket's; smaller ones take "
                        "more, so that tokens per batch stay about even)")
    g.add_argument("--pack", type=int, default=0, metavar="TOKENS",
                   help="dit, with --buckets: fill each batch to this many DiT tokens with clips of mixed shapes (each "
                        "at its bucket's shape) run together by forward_varlen, instead of one bucket per batch")
    g.add_argument("--pack-pool", type=int, default=32, help="with --pack: samples each batch is chosen from")
    g.add_argument("--bucket-backlog", type=int, default=64,
                   help="with --buckets: samples each bucket may hold (raw bytes) while waiting for its turn")
    g.add_argument("--num-workers", type=int, default=2, help="decoding worker processes per rank")
    g.add_argument("--shuffle-buffer", type=int, default=64, help='samples each training reader holds to shuffle across shards (raw bytes: memory per worker is about this times the mean file size)')
    g.add_argument("--image-prob", type=float, default=0.0, help="fraction of steps that train on images (first frames)")
    g.add_argument("--zoom", type=float, nargs=2, default=[1.0, 1.0], metavar=("LO", "HI"),
                   help="take each training crop from the frame scaled to cover --size times a factor drawn from "
                        "[LO, HI] (log-uniform), e.g. --size 64 --zoom 1 4: small crops of the footage at several "
                        "scales, more views of few videos per CPU-minute; 1 1: none")
    g.add_argument("--hflip", action="store_true",
                   help="mirror half the training clips left to right (captions stay as they are: not for a DiT "
                        "whose captions name left and right)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=1000, help="optimiser steps in all")
    g.add_argument("--lr", type=float, default=1e-4, help='peak learning rate (AdamW), reached after --warmup steps')
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    g.add_argument("--schedule", choices=["constant", "cosine"], default="constant", help="after the warm-up")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine: final LR over --lr")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW's first-moment decay")
    g.add_argument("--beta2", type=float, default=0.99, help="AdamW's second-moment decay")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm (0: off)")
    g.add_argument("--divergence-factor", type=float, default=100.0,
                   help="stop when a step's loss exceeds this many times the median of the last 50 steps' (or is not "
                        "finite), before the update, setting aside what holds the weights that gave it; 0: only a "
                        "loss that is not finite")
    g.add_argument("--ema-decay", type=float, default=0.999, help='decay of the exponential moving average of the weights that model/ exports (0: the weights themselves)')
    g = p.add_argument_group("parallelism and speed")
    g.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="with several processes")
    g.add_argument("--sp-size", type=int, default=1,
                   help="Ulysses sequence parallelism: split each video's tokens over this many consecutive ranks "
                        "(must divide the process count and the DiT's heads); DDP / FSDP2 over the rest")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the training forward's autocast dtype: auto is bf16 on CUDA and float32 on the CPU; bf16 on a "
                        "CPU with AMX or AVX512-BF16 (recent Xeons) takes about two thirds of the time per tokenizer "
                        "step; fp32 keeps float32 everywhere. Weights, optimiser state and losses stay float32")
    g.add_argument("--checkpoint-activations", action="store_true", help="recompute blocks in backward (memory)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--checkpoint-every", type=int, default=500, help="steps (0: only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help='checkpoints kept on disk; older ones are deleted once a newer one is complete')
    g.add_argument("--exit-after", type=int, default=0,
                   help="checkpoint and exit after this many steps of this invocation (fixed-length job slots); 0: off")
    g.add_argument("--max-minutes", type=float, default=0,
                   help="end the run properly (statistics, export, final checkpoint) after this many minutes; 0: off")
    g.add_argument("--log-every", type=int, default=10, help='steps between metrics lines (loss, LR, grad norm, throughput, memory) in metrics.jsonl and wandb; the loss is read back from the device only then')
    g.add_argument("--preview-every", type=int, default=0, help="steps between preview videos (0: at the end only)")
    g.add_argument("--preview-prompts", nargs="*", default=None, help="dit: prompts (default: from the data's manifest)")
    g.add_argument("--preview-steps", type=int, default=30, help="dit: sampler steps of the previews")
    g.add_argument("--guidance", type=float, default=5.0, help="dit: classifier-free guidance scale of the previews, and sample.py's default")
    g.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="auto",
                   help="auto: online with WANDB_API_KEY set, else offline (WANDB_MODE overrides)")
    g.add_argument("--wandb-project", default="dit3d-video", help='wandb project name')
    g.add_argument("--wandb-run-name", default=None, help="wandb run name")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("dit stage")
    g.add_argument("--text-encoder", default="bytes",
                   help="bytes or words (built in, trained with the DiT; see dit3d/text.py) or a local folder with a "
                        "T5 / UMT5 / CLIP text model")
    g.add_argument("--text-padding", choices=["auto", "masked", "wan"], default="auto",
                   help="a T5 / UMT5 encoder's padding: masked (cross-attention ignores it) or wan (zeros to 512 tokens "
                        "that cross-attention sees, and caption dropout to the empty caption, as Wan2.1 was trained); "
                        "auto: wan when --init is a Wan model")
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
    g.add_argument("--extrapolate", choices=list(TIME_METHODS), default=None,
                   help="train (or fine-tune) with the rotary time frequencies changed for clips of "
                        "--extrapolate-frames frames, as sample.py --extrapolate changes them; pipeline.json records "
                        "it, and sampling then keeps those frequencies at every length")
    g.add_argument("--extrapolate-frames", type=int, default=0,
                   help="with --extrapolate: the clip length (frames) to sample in one pass, past the longest trained")
    g.add_argument("--latent-stride", type=int, default=1,
                   help="take every K-th latent frame first (a keyframe model, as in bench/cascade.py)")
    g = p.add_argument_group("fine-tuning (dit stage)")
    g.add_argument("--init", help="start from pretrained DiT weights: Wan2.1's transformer (a diffusers folder, a diffusers "
                                  "Wan pipeline folder, or the original release's folder) or a DiT of ours (a dit/ folder "
                                  "or a train.py run); --preset is then ignored")
    g.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (peft) instead of all "
                                                            "weights; 0: full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, a scale of 1)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA adapters' input")
    g.add_argument("--lora-targets", default="qkv,proj,q,kv",
                   help="comma-separated DiT layers to adapt: qkv, proj, q, kv (attention), fc1, fc2 (MLP)")
    g.add_argument("--lora-merge", action="store_true",
                   help="export the DiT with the adapters merged into its weights too (model/dit/), beside the adapter")
    g = p.add_argument_group("distill stage (a few-step student of the --init teacher; see training/distill_stage.py)")
    g.add_argument("--distill-steps", type=int, nargs="+", default=[4], metavar="S",
                   help="the sampler step counts the student learns (e.g. 1 2 4 8); each divides --teacher-steps")
    g.add_argument("--teacher-steps", type=int, default=16,
                   help="the teacher's Euler grid: each student step is taught by --teacher-steps / S guided teacher steps")
    g.add_argument("--distill-guidance", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guidance scales the student stands in for, drawn uniformly (default: --guidance, fixed)")
    g = p.add_argument_group("tokenizer stage")
    g.add_argument("--kl-weight", type=float, default=1e-6, help="tokenizer: weight of the posterior's KL term")
    g.add_argument("--recon-loss", choices=["l1", "mse"], default="l1",
                   help="the pixel term: l1, or mse (squared error, what PSNR measures: on the quickstart's held-out "
                        "clips it ended 2.6 dB higher in the same 200 steps; see docs/results/tokenizer.md)")
    g.add_argument("--boundary-weight", type=float, default=1.0,
                   help="the pixel term's weight on each latent group's first and last frame against the frames inside "
                        "(rescaled to average 1): above 1 evens out the error that rises where groups meet (seams)")
    g.add_argument("--lpips-weight", type=float, default=0.0, help="perceptual loss weight (needs the two paths below)")
    g.add_argument("--lpips-vgg", help="local torchvision VGG16 weights (.pth)")
    g.add_argument("--lpips-heads", help="local LPIPS linear heads (vgg.pth of the lpips package)")
    g.add_argument("--disc-weight", type=float, default=0.0, help="3D patch discriminator weight (0: none)")
    g.add_argument("--disc-start", type=int, default=2000, help="step at which the adversarial loss switches on")
    g.add_argument("--disc-lr", type=float, default=1e-4, help="tokenizer: the discriminator's learning rate")
    g.add_argument("--stats-batches", type=int, default=16, help="batches to measure the latent statistics on")
    g.add_argument("--latent-norm", choices=["channel", "global"], default="channel",
                   help="normalise latents per channel, or by one scale for all (the PCA-like linear code's "
                        "weak channels then stay weak, so the DiT spends less on them)")
    g.add_argument("--pca-init-clips", type=int, default=64,
                   help="clips the linear codec path of a fresh run is fitted to: PCA encoder, least-squares decoder (0: random init)")
    return p


# Each number's allowed range, as (option, low, high, low open, high open, what to give): checked before torch or
# the loader sees them, where a NaN, a negative count or a decay above 1 is a traceback or a run that diverges.
RANGES = (
    ("lr", 0.0, math.inf, True, True, "a positive learning rate such as 1e-4"),
    ("warmup", 0, math.inf, False, True, "0 for none"),
    ("min_lr_ratio", 0.0, 1.0, False, False, "a fraction of --lr between 0 and 1"),
    ("weight_decay", 0.0, math.inf, False, True, "0 for none, or a small positive number such as 0.01"),
    ("beta1", 0.0, 1.0, False, True, "a decay in [0, 1), such as 0.9"),
    ("beta2", 0.0, 1.0, False, True, "a decay in [0, 1), such as 0.99"),
    ("grad_clip", 0.0, math.inf, False, True, "0 for none, or a positive norm such as 1.0"),
    ("divergence_factor", 0.0, math.inf, False, True, "0 to stop on a non-finite loss alone, or a factor such as 100"),
    ("ema_decay", 0.0, 1.0, False, True, "a decay in [0, 1) such as 0.999, or 0 to export the weights themselves"),
    ("num_workers", 0, math.inf, False, True, "0 to decode in the training process"),
    ("shuffle_buffer", 1, math.inf, False, True, "a number of samples, such as 64"),
    ("bucket_backlog", 1, math.inf, False, True, "a number of samples, such as 64"),
    ("image_prob", 0.0, 1.0, False, False, "a fraction between 0 and 1"),
    ("checkpoint_every", 0, math.inf, False, True, "0 for only at the end"),
    ("keep_checkpoints", 1, math.inf, False, True, "at least 1"),
    ("exit_after", 0, math.inf, False, True, "0 for off"),
    ("max_minutes", 0.0, math.inf, False, True, "0 for off"),
    ("preview_every", 0, math.inf, False, True, "0 for at the end only"),
    ("preview_steps", 1, math.inf, False, True, "at least 1"),
)


def check_ranges(args) -> None:
    for name, low, high, low_open, high_open, advice in RANGES:
        value = getattr(args, name, None)
        if value is None:
            continue
        inside = math.isfinite(value) and (low < value if low_open else low <= value) and (
            value < high if high_open else value <= high)
        if not inside:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise InputError(f"--{name.replace('_', '-')} must be in {bounds}, got {value:g}: give {advice}")


def check_args(args) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_ranges(args)
    check_clip_options(args)  # args.size is (height, width) from here on
    if args.latent_stride < 1 or args.latent_window < 0:
        raise InputError("--latent-stride must be at least 1 and --latent-window at least 0")
    if args.sp_size > 1 and args.stage == "tokenizer":
        raise InputError(f"--sp-size splits the DiT's token sequence; the {args.stage} stage has none (use 1)")
    if (args.init or args.lora_rank) and args.stage == "tokenizer":
        raise InputError("--init and --lora-rank fine-tune the DiT: use them with --stage dit (or distill)")
    if args.lora_rank < 0:
        raise InputError(f"--lora-rank must be at least 1 (0: full fine-tuning), got {args.lora_rank}")
    if args.buckets and args.image_prob > 0:
        raise InputError("--image-prob takes the first frame of a step's clips; with --buckets, images train in "
                         "one-frame buckets instead (put images in the shards, or a 1-frame bucket in the list)")
    if args.pack and (args.stage != "dit" or not args.buckets):
        raise InputError("--pack fills DiT batches with clips of the --buckets shapes: use it with --stage dit and --buckets")
    if args.pack < 0 or args.pack_pool < 1:
        raise InputError("--pack must be at least 0 (0: off) and --pack-pool at least 1")
    if not 1.0 <= args.zoom[0] <= args.zoom[1]:
        raise InputError(f"--zoom takes LO HI with 1 <= LO <= HI (factors on the scale that covers --size), got "
                         f"{args.zoom[0]:g} {args.zoom[1]:g}")
    if args.latents and (args.zoom != [1.0, 1.0] or args.hflip):
        raise InputError("--zoom and --hflip change how videos are cropped; latent shards are stored encoded at one "
                         "size (write them from zoomed or flipped clips instead, or drop the options)")
    if args.latents and args.stage == "tokenizer":
        raise InputError("--latents is for the dit stage (latent shards have no pixels to reconstruct)")
    if bool(args.extrapolate) != bool(args.extrapolate_frames) or args.extrapolate_frames < 0:
        raise InputError("--extrapolate METHOD and --extrapolate-frames FRAMES go together (the method, and the clip "
                         "length it prepares the model for)")
    if args.extrapolate and args.stage != "dit":
        raise InputError("--extrapolate changes the DiT's rotary time frequencies: use it with --stage dit")


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"--override takes KEY=VALUE (e.g. depth=8), got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
