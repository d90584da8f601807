"""Read shards back through the loader and report what is in them.

    python -m data.check_shards SHARDS [--frames 17 --size 64 --fps 8 --batch-size 8 --workers 2]

Reads every sample once (eval mode), then prints the sample count, the batch shape and value range,
a few captions, the clips per second, and every skipped sample with its reason. Exits non-zero when
no sample could be read. Use it on new shards before launching a training run on them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter

from errors import InputError

from .loader import make_loader
from .clip_options import add_clip_options, check_clip_options


def _shown(caption: str, limit: int = 200) -> str:
    """A caption as printed: quoted, and cut at `limit` characters with its full length named."""
    return repr(caption) if len(caption) <= limit else f"{caption[:limit]!r}... ({len(caption):,} characters)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.check_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="a folder of shards, a glob, a brace pattern or a pipe: command")
    add_clip_options(parser, frames=17, size=64)
    parser.add_argument("--batch-size", type=int, default=8, help='clips per batch read back')
    parser.add_argument("--workers", type=int, default=2, help='loader worker processes')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        check_clip_options(args)
        loader = make_loader(args.shards, args.batch_size, args.frames, args.size, mode="eval",
                             num_workers=args.workers, fps=args.fps)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    count, lo, hi, shape, captions = 0, float("inf"), float("-inf"), None, Counter()
    for batch in loader:
        x = batch.get("video", batch.get("latents"))
        shape = tuple(x.shape[1:])
        lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
        count += x.shape[0]
        captions.update(batch["caption"])
    elapsed = time.perf_counter() - t0

    print(f"{count} samples read from {len(loader.dataset.urls)} shards in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.1f} clips/s)")
    if count:
        print(f"sample shape {shape}, values in [{lo:.3f}, {hi:.3f}], {len(captions)} distinct captions, e.g.:")
        for caption, n in captions.most_common(3):
            print(f"  {n:4d} x {_shown(caption)}")
    print(loader.report())
    for rec in loader.skip_log:
        print(f"  {rec.key or rec.url}: {rec.reason}: {rec.detail}")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
