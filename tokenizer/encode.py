"""Export latent shards: encode every clip of a video dataset once, so that DiT training skips decoding.

    python -m tokenizer.encode --ckpt DIR --data SHARDS --out DIR [--frames 17 --size 256 --fps F]
                               [--buckets 256p|FILE] [--batch-size 8 --chunk N --shard-size 100 --device cuda]

Reads the shards in eval order (each sample once: the first window of `--frames` frames at `--fps`,
centre-cropped to `--size`), encodes with the tokenizer and writes `KEY.latents.npy` (the posterior
mean, (C, t, h, w), unnormalised float16), `KEY.txt` (the caption) and `KEY.json` (what the latents
encode: frames, size, fps, the tokenizer checkpoint and its latent statistics). Samples the loader
cannot use are skipped and reported, as in training. `make_loader` reads the result directly.

With --buckets, each clip is encoded at the shape of its bucket (the nearest aspect ratio whose duration it
fills, as training takes it), so `train.py --latents --buckets` (the same list) trains on mixed shapes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from cpu_allocator import keep_freed_memory
from data import ShardWriter, latent_sample, make_loader
from data.shards import sanitize_key
from data.buckets import Bucket, check_divisible, parse_buckets
from data.clip_options import add_clip_options, check_clip_options
from errors import InputError

from .checkpoint import load_tokenizer
from .diffusers_vae import DiffusersVAE
from .model import CausalVAE


@torch.no_grad()
def export_latents(vae: CausalVAE | DiffusersVAE, data, out: Path, frames: int, size: int | tuple[int, int], *,
                   fps: float | None = None,
                   batch_size: int = 8, chunk: int | None = None, shard_size: int = 100, num_workers: int = 2,
                   device: str | torch.device = "cpu", ckpt: str = "", overwrite: bool = False,
                   buckets: list[Bucket] | None = None) -> dict:
    """Encode every clip of `data` into latent shards at `out` (with buckets: each at its bucket's shape);
    returns the samples and shards written, per-bucket counts and the skipped samples."""
    device = torch.device(device)
    vae = vae.to(device).eval()
    loader = make_loader(data, batch_size, frames, size, mode="eval", num_workers=num_workers, fps=fps,
                         rank=0, world_size=1, buckets=buckets)
    stats = {"latent_mean": vae.latent_mean.tolist(), "latent_std": vae.latent_std.tolist()}
    keys, clashes = set(), []  # a key is stored made safe (no path, no dot); two that become one keep the first
    with ShardWriter(out, shard_size, overwrite) as writer:
        for batch in loader:
            t, height, width = batch["video"].shape[2:]
            z = vae.encode(batch["video"].to(device), chunk=chunk).mean.cpu().numpy().astype(np.float16)
            for key, caption, latents, clip_fps in zip(batch["key"], batch["caption"], z, batch["fps"].tolist()):
                safe = sanitize_key(key)
                if safe in keys:
                    clashes.append(f"{key}: duplicate_key: stored as {safe}, as an earlier sample already is")
                    continue
                keys.add(safe)
                meta = {"frames": t, "height": height, "width": width, "fps": clip_fps, "tokenizer": ckpt} | stats
                writer.write(latent_sample(safe, latents, caption, meta))
    skipped = dict(loader.skipped) | ({"duplicate_key": len(clashes)} if clashes else {})
    return {"samples": writer.count, "shards": [p.name for p in writer.shards], "skipped": skipped,
            "buckets": dict(loader.bucket_samples),
            "skip_log": [f"{r.key or r.url}: {r.reason}: {r.detail}" for r in loader.skip_log] + clashes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="tokenizer checkpoint folder")
    parser.add_argument("--data", required=True, help="video shards: a folder, a glob or a brace pattern")
    parser.add_argument("--out", required=True, type=Path, help="output folder for the latent shards")
    add_clip_options(parser, frames=17, size=256, buckets=True,
                     buckets_help="encode each clip at its bucket's shape (train.py --buckets takes the same): a preset "
                                  "(64p, 256p, 480p) or a file of 'frames height width [batch]' lines; --frames and "
                                  "--size are then unused")
    parser.add_argument("--batch-size", type=int, default=8, help='clips encoded together')
    parser.add_argument("--chunk", type=int, default=None, help="latent frames per encode step (bounded memory)")
    parser.add_argument("--shard-size", type=int, default=100, help='samples per latent shard')
    parser.add_argument("--overwrite", action="store_true", help="replace the shards and manifest of a non-empty --out")
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help='cpu, cuda, cuda:N (default: cuda when available)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory()
    try:
        check_clip_options(args)
        vae = load_tokenizer(args.ckpt)
        buckets = parse_buckets(args.buckets, args.batch_size) if args.buckets else None
        if buckets:
            sf = vae.config.spatial_factor
            check_divisible(buckets, (sf, sf), lambda f: vae.check_video(torch.empty(1, 3, f, sf, sf, device="meta")))
        else:
            vae.check_video(torch.empty(1, 3, args.frames, *args.size, device="meta"))
        result = export_latents(vae, args.data, args.out, args.frames, args.size, fps=args.fps,
                                batch_size=args.batch_size, chunk=args.chunk, shard_size=args.shard_size,
                                num_workers=args.workers, device=args.device, ckpt=str(args.ckpt),
                                overwrite=args.overwrite, buckets=buckets)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['samples']} latent samples in {len(result['shards'])} shards to {args.out}"
          + (f" ({', '.join(f'{n} at {b}' for b, n in sorted(result['buckets'].items()))})" if result["buckets"] else ""))
    if result["skip_log"]:
        print(f"skipped {len(result['skip_log'])} samples:")
        for line in result["skip_log"]:
            print(f"  {line}")
    return 0 if result["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
