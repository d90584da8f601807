"""What keeping freed memory in the process (cpu_allocator.keep_freed_memory) does to CPU work: time, page faults
and peak memory, with glibc malloc's own settings and with the raised thresholds, side by side.

Each measurement runs in a fresh process (the allocator's settings are per process), and the two settings
alternate, repeats times, so a shared machine's slow spells fall on both. Workloads:

  tokenizer-step   a training step (forward, squared error, backward, AdamW) of a tokenizer preset on a batch of
                   clips: the quickstart's tiny one at 64x64, batch 4, 17 frames by default
  dit-step         a training step of the quickstart's DiT (the tiny preset at width 128, depth 6) on 32 latents of
                   16 x 5 x 8 x 8 with 32 text tokens
  long-video       a tokenizer's chunked encode and decode of one long clip (129 frames), whose peak resident
                   memory must stay flat with either setting

Prints a table (milliseconds per call, CPU milliseconds, minor page faults per call, peak resident MiB, and the
kept / default ratios) and writes JSON.

    python bench/cpu_allocator.py                               # the three workloads, 3 repeats
    python bench/cpu_allocator.py --workloads tokenizer-step --preset small --size 128 --batch 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, markdown_table, measure_in_subprocess

SETTINGS = ("default", "kept")
WORKLOADS = ("tokenizer-step", "dit-step", "long-video")


def _workload(spec: dict):
    """The function one measurement calls repeatedly."""
    import torch

    torch.manual_seed(0)
    if spec["workload"] == "dit-step":
        from dit3d import DiT3D, preset

        model = DiT3D(preset("tiny", width=128, depth=6))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(32, model.config.in_channels, 5, 8, 8)
        t, text = torch.rand(32), torch.randn(32, 32, model.config.text_dim)
        mask = torch.ones(32, 32, dtype=torch.bool)

        def run():
            model(x, t, text, mask).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run
    from tokenizer import CausalVAE, preset

    vae = CausalVAE(preset(spec["preset"]))
    if spec["workload"] == "long-video":
        video = torch.rand(1, 3, 129, spec["size"], spec["size"]) * 2 - 1
        vae.eval()

        @torch.no_grad()
        def run():
            vae.decode(vae.encode(video, chunk=2).mean, chunk=2)

        return run
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    video = torch.rand(spec["batch"], 3, 17, spec["size"], spec["size"]) * 2 - 1

    def run():
        (vae(video)[0] - video).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def measure(spec: dict) -> dict:
    import resource
    import time

    from cpu_allocator import keep_freed_memory

    kept = keep_freed_memory()  # DIT3D_KEEP_FREED_MEMORY=0 in the environment of the "default" processes
    run = _workload(spec)
    run()  # warm-up
    walls, cpus, faults = [], [], []
    for _ in range(spec["calls"]):
        before, t0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"measure": spec["measure"], "kept": kept, "ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus),
            "faults": statistics.median(faults), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _in_process(spec: dict, setting: str) -> dict:
    return measure_in_subprocess(__file__, spec, measures=("time",),
                                 time_env={"DIT3D_KEEP_FREED_MEMORY": "1" if setting == "kept" else "0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--preset", default="tiny", help="the tokenizer preset (tokenizer-step, long-video)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (tokenizer-step, long-video)")
    parser.add_argument("--batch", type=int, default=4, help="clips per tokenizer step")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per process (their median is kept)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per setting, the settings alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_allocator.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    for name in [k for k in os.environ if k.startswith("MALLOC_")]:  # glibc's own settings are what is compared
        del os.environ[name]
    results, rows = [], []
    for workload in args.workloads:
        spec = {"workload": workload, "preset": args.preset, "size": args.size, "batch": args.batch,
                "calls": args.calls if workload != "long-video" else max(2, args.calls // 5)}
        runs = {s: [] for s in SETTINGS}
        for _ in range(args.repeats):
            for setting in SETTINGS:
                runs[setting].append(_in_process(spec, setting))
        if not all(r["kept"] for r in runs["kept"]):
            raise RuntimeError("keep_freed_memory() changed nothing here (not glibc?): nothing to compare")
        med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("ms", "cpu_ms", "faults", "peak_mib")}
               for s in SETTINGS}
        ratio = {k: med["kept"][k] / med["default"][k] for k in ("ms", "cpu_ms", "peak_mib")}
        # the ratio of each alternating pair, so a slow spell shared by a pair cancels
        per_pair = [k["ms"] / d["ms"] for d, k in zip(runs["default"], runs["kept"])]
        results.append({"spec": spec, "runs": runs, "median": med, "ratio": ratio, "time_ratio_per_pair": per_pair})
        what = workload if workload == "dit-step" else f"{workload} ({args.preset}, {args.size}px" + (
            f", batch {args.batch})" if workload == "tokenizer-step" else ", 129 frames, chunk 2)")
        rows.append([what, f"{med['default']['ms']:.1f}", f"{med['kept']['ms']:.1f}", f"{ratio['ms']:.2f}",
                     " ".join(f"{r:.2f}" for r in per_pair), f"{ratio['cpu_ms']:.2f}",
                     f"{med['default']['faults']:.0f}", f"{med['kept']['faults']:.0f}",
                     f"{med['default']['peak_mib']:.0f}", f"{med['kept']['peak_mib']:.0f}"])
    print(markdown_table(["workload", "ms default", "ms kept", "time kept / default", "per pair", "CPU time ratio",
                          "page faults default", "page faults kept", "peak MiB default", "peak MiB kept"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": os.cpu_count(), "repeats": args.repeats, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
