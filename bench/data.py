"""Data pipeline benchmark: loader throughput by worker count, seeking against decoding from the start, and
the start-up time of a resumed loader.

    python bench/data.py [--clips DIR] [--batches 20] [--sections throughput seek resume] [--out bench/results/data.json]

1. Clips per second out of `make_loader` (train mode) with 0, 1 and 2 workers, on shards of the real
   clips (resized and cropped to 128x128) and on the synthetic set (64x64), 17-frame windows.
2. The time to decode a 17-frame window at several positions of each real clip, seeking to the
   keyframe before it against decoding from the file's start, and their ratio.
3. Resuming: the time from a fresh loader with a checkpoint's state to its first batch, at step 10 and at
   step 2,000 of the same stream (batch 4: 40 and 8,000 samples drawn; synthetic shards of 8 clips),
   with the reader's saved state (data/stream.py: about one shard and the shuffle buffer read again) against
   the replay of every sample drawn since step 0 that checkpoints from before reader states get, and the
   samples each reads. The state is taken from the stream's raw draws (nothing decoded to get there).
Prints a table and writes JSON. Timings are wall-clock medians on this machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import make_loader, probe, read_clip  # noqa: E402
from data.make_shards import Candidate, make_shards  # noqa: E402
from data.synthetic import SyntheticSpec, generate  # noqa: E402

DEFAULT_CLIPS = ROOT.parent / "shared" / "data" / "clips"
FALLBACK_CLIPS = ROOT / "tests" / "assets" / "clips"


def loader_throughput(shards: Path, frames: int, size: int, workers: int, batch_size: int, batches: int) -> dict:
    loader = make_loader(shards, batch_size, frames, size, mode="train", num_workers=workers, seed=0)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # worker start-up and the first shuffle buffer
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - t0
    del it
    return {"workers": workers, "clips_per_s": batches * batch_size / elapsed, "first_batch_s": first}


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median time of each function, timing them in turn within every repeat so that drift (caches, clock,
    other load) falls on all of them alike; one untimed warm-up round first."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def seek_vs_start(path: Path, frames: int, repeats: int) -> list[dict]:
    info = probe(path)
    last = info.frames - frames
    rows = []
    for start in sorted({0, last // 4, last // 2, (3 * last) // 4, last}):
        t = interleaved_medians({
            "seek": lambda: read_clip(path, frames, start=start, seek=True, info=info),
            "full": lambda: read_clip(path, frames, start=start, seek=False, info=info),
        }, repeats)
        rows.append({"clip": path.name, "start": start, "seek_ms": t["seek"] * 1e3, "from_start_ms": t["full"] * 1e3,
                     "speedup": t["full"] / t["seek"]})
    return rows


def resume_startup(shards: Path, batch_size: int, steps: list[int], repeats: int) -> list[dict]:
    """Seconds from make_loader + load_state_dict to the first batch, resumed at each step, by reader state and
    by replay; and the raw samples each read."""
    import data.loader as loader_module
    from data.loader import expand_urls
    from data.stream import ReaderStream

    urls, rows = expand_urls(str(shards)), []
    original = loader_module.shard_samples
    read = [0]

    def counting(sources, on_error):
        for sample in original(sources, on_error):
            read[0] += 1
            yield sample

    for step in steps:
        drawn = step * batch_size
        stream = ReaderStream(urls, 0, 0, 64, lambda *_: None)
        it = iter(stream)
        for _ in range(drawn):
            next(it)
        layout = {"seed": 0, "rank": 0, "world_size": 1, "num_workers": 0, "urls": len(urls), "batch_size": batch_size,
                  "next_worker": 0, "skipped": {}, "unique_skips": []}
        states = {"reader state": layout | {"readers": {"0": {"position": drawn, "stream": stream.state()}}},
                  "replay from step 0": layout | {"positions": {"0": drawn}}}
        firsts = {}
        for how, state in states.items():
            times = []
            for _ in range(repeats):
                loader_module.shard_samples = counting
                read[0] = 0
                try:
                    t0 = time.perf_counter()
                    loader = make_loader(shards, batch_size, 17, 64, mode="train", num_workers=0, seed=0)
                    assert loader.load_state_dict(json.loads(json.dumps(state)))
                    batch = next(iter(loader))
                    times.append(time.perf_counter() - t0)
                finally:
                    loader_module.shard_samples = original
            firsts[how] = batch["key"]
            rows.append({"step": step, "samples_drawn": drawn, "how": how, "seconds": statistics.median(times),
                         "samples_read": read[0]})
        assert firsts["reader state"] == firsts["replay from step 0"], "the two resumes disagree"
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=Path, default=DEFAULT_CLIPS if DEFAULT_CLIPS.is_dir() else FALLBACK_CLIPS)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9, help="repeats per seek timing (median)")
    parser.add_argument("--sections", nargs="+", default=["throughput", "seek", "resume"],
                        choices=["throughput", "seek", "resume"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader's work is decoding; keep torch from competing for the 2 cores

    clips = sorted(args.clips.glob("*.mp4"))
    if not clips:
        raise SystemExit(f"error: no .mp4 clips in {args.clips}")
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "throughput": [], "seek": [],
                     "resume": []}
    with tempfile.TemporaryDirectory() as tmp:
        real = Path(tmp) / "real"
        make_shards([Candidate(p, p.name, f"clip {p.stem}") for p in clips], real, shard_size=1, log=lambda *_: None)
        synth = Path(tmp) / "synthetic"
        generate(synth, 64, SyntheticSpec(), seed=0, shard_size=8)
        for name, shards, size in (("real clips", real, 128), ("synthetic", synth, 64)):
            for workers in (0, 1, 2) if "throughput" in args.sections else ():
                row = loader_throughput(shards, 17, size, workers, args.batch_size, args.batches)
                results["throughput"].append({"data": name, "size": size, "frames": 17} | row)
        if "resume" in args.sections:
            results["resume"] = resume_startup(synth, args.batch_size, [10, 2000], repeats=3)
    for clip in clips if "seek" in args.sections else ():
        results["seek"] += seek_vs_start(clip, 17, args.repeats)

    print("\nLoader throughput (train mode, 17 frames, batch %d)" % args.batch_size)
    print("| data | size | workers | clips/s | vs 0 workers | first batch (s) |")
    print("|---|---|---|---|---|---|")
    base = {}
    for r in results["throughput"]:
        base.setdefault(r["data"], r["clips_per_s"])
        print(f"| {r['data']} | {r['size']} | {r['workers']} | {r['clips_per_s']:.1f} | "
              f"{r['clips_per_s'] / base[r['data']]:.2f}x | {r['first_batch_s']:.2f} |")
    print("\nDecoding a 17-frame window at native size: seek to the keyframe before it vs decode from frame 0")
    print("| clip | start frame | seek (ms) | from start (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for r in results["seek"]:
        print(f"| {r['clip']} | {r['start']} | {r['seek_ms']:.1f} | {r['from_start_ms']:.1f} | {r['speedup']:.2f}x |")
    if results["resume"]:
        print(f"\nResuming: a fresh loader (no workers, batch {args.batch_size}) from a checkpoint's state to its first batch")
        print("| resumed at step | samples drawn before | how | seconds to the first batch | samples read |")
        print("|---|---|---|---|---|")
        for r in results["resume"]:
            print(f"| {r['step']:,} | {r['samples_drawn']:,} | {r['how']} | {r['seconds']:.3f} | {r['samples_read']:,} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
