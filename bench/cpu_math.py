"""What oneMKL's strict reproducibility mode (cpu_math.strict_cpu_math, on in every command) costs CPU work: the
time of the same workloads with oneMKL's own choice of kernels and in the strict mode, side by side.

Each measurement runs in a fresh process (the mode is chosen once per process, before the first product), and
the two modes alternate, repeats times, so a shared machine's slow spells fall on both. Workloads: the training
steps of bench/cpu_allocator.py (the quickstart's tokenizer and DiT), a DiT forward as sampling runs it (no
gradients, a batch of 8 with guidance's twins), and the matrix product of a 4096 x 1024 input by a 1024 x 1024
weight. Prints a table (milliseconds per call, strict / default) and writes JSON.

    python bench/cpu_math.py            # every workload, 3 repeats
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

MODES = ("default", "strict")
WORKLOADS = ("gemm", "dit-sample", "dit-step", "tokenizer-step")


def _workload(name: str):
    import torch

    torch.manual_seed(0)
    if name == "gemm":
        a, w = torch.randn(4096, 1024), torch.randn(1024, 1024)
        return lambda: a @ w
    if name == "dit-sample":
        from dit3d import DiT3D, preset

        model = DiT3D(preset("tiny", width=128, depth=6)).eval()
        x, t = torch.randn(16, model.config.in_channels, 5, 8, 8), torch.rand(16)
        text, mask = torch.randn(16, 32, model.config.text_dim), torch.ones(16, 32, dtype=torch.bool)
        return torch.no_grad()(lambda: model(x, t, text, mask))
    from bench.cpu_allocator import _workload as step

    return step({"workload": name, "preset": "tiny", "size": 64, "batch": 4})


def measure(spec: dict) -> dict:
    import time

    from cpu_math import strict_cpu_math

    strict = strict_cpu_math() if spec["mode"] == "strict" else False
    run = _workload(spec["workload"])
    run()  # warm-up
    walls = []
    for _ in range(spec["calls"]):
        t0 = time.perf_counter()
        run()
        walls.append(time.perf_counter() - t0)
    return {"strict": strict, "ms": 1e3 * statistics.median(walls), "measure": spec["measure"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--calls", type=int, default=10, help="timed calls per process (their median is kept)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per mode, the modes alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_math.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    os.environ.pop("MKL_CBWR", None)  # a mode of your own would make "default" another strict run
    results, rows = [], []
    for name in args.workloads:
        runs = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(measure_in_subprocess(__file__, {"workload": name, "mode": mode,
                                                                   "calls": args.calls}, measures=("time",)))
        if not all(r["strict"] for r in runs["strict"]):
            raise RuntimeError("strict_cpu_math() could not turn the mode on here (no oneMKL?): nothing to compare")
        med = {m: statistics.median(r["ms"] for r in runs[m]) for m in MODES}
        per_pair = [s["ms"] / d["ms"] for d, s in zip(runs["default"], runs["strict"])]
        results.append({"workload": name, "runs": runs, "median_ms": med, "ratio": med["strict"] / med["default"],
                        "time_ratio_per_pair": per_pair})
        rows.append([name, f"{med['default']:.1f}", f"{med['strict']:.1f}", f"{med['strict'] / med['default']:.2f}",
                     " ".join(f"{r:.2f}" for r in per_pair)])
    print(markdown_table(["workload", "ms default", "ms strict", "strict / default", "per pair"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": os.cpu_count(), "repeats": args.repeats, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
