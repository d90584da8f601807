"""Data pipeline benchmark: loader throughput by worker count, seeking against decoding from the start, the
start-up time of a resumed loader, buckets against square crops, and packing's padding.

    python bench/data.py [--clips DIR] [--batches 20] [--sections throughput seek resume buckets packing convert]
                         [--out bench/results/data.json]

1. Clips per second out of `make_loader` (train mode) with 0, 1 and 2 workers, on shards of the real
   clips (resized and cropped to 128x128) and on the synthetic set (64x64), 17-frame windows.
2. The time to decode a 17-frame window at several positions of each real clip, seeking to the
   keyframe before it against decoding from the file's start, and their ratio.
3. Resuming: the time from a fresh loader with a checkpoint's state to its first batch, at step 10 and at
   step 2,000 of the same stream (batch 4: 40 and 8,000 samples drawn; synthetic shards of 8 clips),
   with the reader's saved state (data/stream.py: about one shard and the shuffle buffer read again) against
   the replay of every sample drawn since step 0 that checkpoints from before reader states get, and the
   samples each reads. The state is taken from the stream's raw draws (nothing decoded to get there).
4. Buckets against square crops, on 16:9 and on 9:16 footage (windows of the real clips cut to those aspect
   ratios): samples/s out of the loader (no workers), the share of each source frame a sample keeps, and the
   kept pixels per second; square: 17 frames at 128x128; buckets: 17 frames at 128x128, 128x224 and 224x128.
5. Packing against buckets on mixed synthetic clips (64x64, 64x96 and 96x64 at 17 and 9 frames, and images,
   the 64p preset): tokens per batch and their spread, the budget a packed batch fills, and the padding SDPA
   computes for nothing (a packed batch is padded to its longest clip; xFormers' block-diagonal packing on
   CUDA computes none).
6. Decoding a 17-frame window and converting each frame to RGB at the crop's scale: one swscale converter for
   the whole window (what `read_clip` does) against `frame.reformat()`, which builds a new one for every
   frame; ms per frame on each real clip (at 128 on the short side) and on a synthetic clip (64x64).
Prints a table and writes JSON. Timings are wall-clock medians on this machine; compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import ShardWriter, encode_mp4, make_loader, probe, read_clip  # noqa: E402
from data.buckets import Bucket, Packing, parse_buckets, scaled_batch_sizes  # noqa: E402
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


def convert_per_window(path: Path, height: int, width: int, frames: int, repeats: int) -> dict:
    """ms per frame decoding the first `frames` frames and converting each to RGB at (height, width) as it comes:
    one converter for the window against `frame.reformat()` (a new converter for every frame). Each timed call
    decodes afresh: a frame keeps the converter its first reformat() built, so converting the same frames again
    would hide the cost."""
    import av
    from av.video.reformatter import VideoReformatter

    kwargs = dict(width=width, height=height, format="rgb24", interpolation="AREA")

    def read(shared: bool):
        reformatter = VideoReformatter() if shared else None
        with av.open(str(path)) as container:
            return [(reformatter.reformat(f, **kwargs) if shared else f.reformat(**kwargs)).to_ndarray()
                    for _, f in zip(range(frames), container.decode(video=0))]

    t = interleaved_medians({"per_window": lambda: read(True), "per_frame": lambda: read(False)}, repeats)
    return {"clip": path.name, "size": f"{width}x{height}", "per_window_ms": 1e3 * t["per_window"] / frames,
            "per_frame_ms": 1e3 * t["per_frame"] / frames, "speedup": t["per_frame"] / t["per_window"]}


def resume_startup(shards: Path, batch_size: int, steps: list[int], repeats: int) -> list[dict]:
    """Seconds from make_loader + load_state_dict to the first batch, resumed at each step, by reader state and
    by replay; and the raw samples each read."""
    import data.loader as loader_module
    from data.tar_reader import expand_urls
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


def cut_footage(clips: list[Path], out: Path, aspect: float, frames: int = 49) -> Path:
    """Shards of the clips' windows of `frames` frames, centre-cropped to `aspect` (width / height): footage of
    that shape from real video."""
    with ShardWriter(out, shard_size=1) as writer:
        for clip in clips:
            info = probe(clip)
            for start in range(0, info.frames - frames + 1, frames):
                video = read_clip(clip, frames, start=start).frames  # (T, H, W, 3) at native size
                h, w = video.shape[1:3]
                ch, cw = (h, int(h * aspect) // 2 * 2) if h * aspect <= w else (int(w / aspect) // 2 * 2, w)
                top, left = (h - ch) // 2, (w - cw) // 2
                crop = video[:, top : top + ch, left : left + cw]
                writer.write({"__key__": f"{clip.stem}_{start}", "mp4": encode_mp4(crop, info.fps), "txt": clip.stem,
                              "json": {"fps": info.fps, "frames": frames, "width": cw, "height": ch}})
    return out


def kept_fraction(batch: dict) -> float:
    """Mean share of each source frame's area that the batch's samples keep (resize to cover, then crop)."""
    _, _, _, h, w = batch["video"].shape
    shares = []
    for meta in batch["meta"]:
        sh, sw = meta["height"], meta["width"]
        scale = max(h / sh, w / sw)
        shares.append(h * w / (sh * sw * scale * scale))
    return sum(shares) / len(shares)


def buckets_vs_square(root: Path, clips: list[Path], batch_size: int, batches: int) -> list[dict]:
    square = [Bucket(17, 128, 128, batch_size)]
    bucketed = scaled_batch_sizes([(17, 128, 128), (17, 128, 224), (17, 224, 128)], batch_size)
    rows = []
    for name, aspect in (("16:9", 16 / 9), ("9:16", 9 / 16)):
        shards = cut_footage(clips, root / f"footage_{name.replace(':', 'x')}", aspect)
        for how, buckets in (("square crop", square), ("buckets", bucketed)):
            loader = make_loader(shards, batch_size, None, None, num_workers=0, seed=0, shuffle_buffer=8, buckets=buckets)
            it = iter(loader)
            next(it)
            t0, samples, pixels, kept, used = time.perf_counter(), 0, 0, [], {}
            for _ in range(batches):
                batch = next(it)
                used[batch["bucket"]] = used.get(batch["bucket"], 0) + len(batch["key"])
                samples += len(batch["key"])
                pixels += batch["video"][:, 0].numel()
                kept.append(kept_fraction(batch))
            seconds = time.perf_counter() - t0
            rows.append({"footage": name, "how": how, "samples_by_bucket": used,
                         "samples_per_s": samples / seconds, "kept": sum(kept) / len(kept),
                         "mpixels_per_s": pixels / seconds / 1e6})
    return rows


def packing_vs_buckets(shards: Path, batches: int) -> list[dict]:
    """Tokens per batch (tiny DiT: 8x tokenizer, 2x2 patch) with buckets and with packing at several budgets."""
    buckets = parse_buckets("64p", batch_size=4)
    cost = Packing(0, 4, (1, 16, 16))
    rows = []
    settings = [("buckets", None)] + [(f"pack {b}", Packing(b, 4, (1, 16, 16), 32)) for b in (480, 960, 1920)]
    for how, packing in settings:
        loader = make_loader(shards, 4, None, None, num_workers=0, seed=0, shuffle_buffer=16, buckets=buckets,
                             packing=packing)
        it = iter(loader)
        totals, padding, fills, clips = [], [], [], []
        for _ in range(batches):
            batch = next(it)
            tokens = batch["tokens"] if packing else [cost.tokens(batch["video"].shape[2:])] * len(batch["key"])
            totals.append(sum(tokens))
            padding.append(1 - sum(tokens) / (len(tokens) * max(tokens)))
            fills.append(sum(tokens) / packing.budget if packing else None)
            clips.append(len(tokens))
        mean = statistics.mean(totals)
        rows.append({"how": how, "tokens_per_batch": mean, "spread": statistics.pstdev(totals) / mean,
                     "clips_per_batch": statistics.mean(clips),
                     "budget_filled": statistics.mean(fills) if packing else None,
                     "sdpa_padding": statistics.mean(padding)})
    return rows


def vs_first(rows: list[dict], group: str, value: str) -> list[float]:
    """Each row's `value` over that of the first row of its `group`."""
    base: dict = {}
    return [r[value] / base.setdefault(r[group], r[value]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=Path, default=DEFAULT_CLIPS if DEFAULT_CLIPS.is_dir() else FALLBACK_CLIPS)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9, help="repeats per seek timing (median)")
    parser.add_argument("--sections", nargs="+", default=["throughput", "seek", "resume", "buckets", "packing", "convert"],
                        choices=["throughput", "seek", "resume", "buckets", "packing", "convert"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader's work is decoding; keep torch from competing for the 2 cores

    clips = sorted(args.clips.glob("*.mp4"))
    if not clips:
        raise SystemExit(f"error: no .mp4 clips in {args.clips}")
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "throughput": [], "seek": [],
                     "resume": [], "buckets": [], "packing": [], "convert": []}
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
        if "buckets" in args.sections:
            results["buckets"] = buckets_vs_square(Path(tmp), clips, args.batch_size, args.batches)
        if "packing" in args.sections:
            mixed = Path(tmp) / "mixed"
            generate(mixed, 96, SyntheticSpec(shapes=((17, 64, 64), (17, 64, 96), (17, 96, 64), (9, 64, 64),
                                                      (9, 64, 96), (9, 96, 64), (1, 64, 64))), seed=0, shard_size=12)
            results["packing"] = packing_vs_buckets(mixed, 4 * args.batches)
        if "convert" in args.sections:
            for clip in clips:
                info = probe(clip)
                scale = 128 / min(info.height, info.width)
                results["convert"].append(convert_per_window(clip, round(info.height * scale), round(info.width * scale),
                                                             17, args.repeats))
            one = next(synth.glob("*.tar"))
            with tarfile.open(one) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
                (Path(tmp) / "synthetic.mp4").write_bytes(tar.extractfile(member).read())
            results["convert"].append(convert_per_window(Path(tmp) / "synthetic.mp4", 64, 64, 17, args.repeats))
    for clip in clips if "seek" in args.sections else ():
        results["seek"] += seek_vs_start(clip, 17, args.repeats)

    print("\nLoader throughput (train mode, 17 frames, batch %d)" % args.batch_size)
    print("| data | size | workers | clips/s | vs 0 workers | first batch (s) |")
    print("|---|---|---|---|---|---|")
    for r, ratio in zip(results["throughput"], vs_first(results["throughput"], "data", "clips_per_s")):
        print(f"| {r['data']} | {r['size']} | {r['workers']} | {r['clips_per_s']:.1f} | {ratio:.2f}x | "
              f"{r['first_batch_s']:.2f} |")
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
    if results["buckets"]:
        print(f"\nBuckets against square crops (loader, no workers, 17 frames, batch {args.batch_size} for the largest)")
        print("| footage | how | samples/s | share of each frame kept | kept Mpixels/s | vs square |")
        print("|---|---|---|---|---|---|")
        for r, ratio in zip(results["buckets"], vs_first(results["buckets"], "footage", "mpixels_per_s")):
            print(f"| {r['footage']} | {r['how']} | {r['samples_per_s']:.1f} | {100 * r['kept']:.0f}% | "
                  f"{r['mpixels_per_s']:.2f} | {ratio:.2f}x |")
    if results["packing"]:
        print("\nPacking against buckets on mixed clips (64p preset; tiny DiT tokens: 8x tokenizer, 2x2 patch)")
        print("| batches | tokens per batch | spread (CV) | clips per batch | budget filled | SDPA padding |")
        print("|---|---|---|---|---|---|")
        for r in results["packing"]:
            filled = "-" if r["budget_filled"] is None else f"{100 * r['budget_filled']:.0f}%"
            print(f"| {r['how']} | {r['tokens_per_batch']:.0f} | {r['spread']:.2f} | {r['clips_per_batch']:.1f} | "
                  f"{filled} | {100 * r['sdpa_padding']:.0f}% |")
    if results["convert"]:
        print("\nDecoding a 17-frame window to RGB: one converter per window against one per frame")
        print("| clip | to | per window (ms/frame) | per frame (ms/frame) | speed-up |")
        print("|---|---|---|---|---|")
        for r in results["convert"]:
            print(f"| {r['clip']} | {r['size']} | {r['per_window_ms']:.3f} | {r['per_frame_ms']:.3f} | {r['speedup']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
