"""What every benchmark here shares: measuring in fresh processes, and printing tables.

A benchmark script calls `measure_in_subprocess(__file__, spec)`; the script, run with `--worker SPEC`,
calls its own `measure(spec)` and prints one JSON line. Time and memory are measured in two separate
processes: on the CPU the memory process maps large buffers with mmap (MALLOC_MMAP_THRESHOLD_), so
that freed memory leaves the resident set and its peak follows live tensors rather than heap
fragmentation, and that setting slows allocation, which would distort the timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure_in_subprocess(script: str, spec: dict, nproc: int = 1, measures=("time", "memory"),
                          time_env: dict | None = None) -> dict:
    """`script --worker SPEC` in a fresh process per measure, or under torchrun in `nproc` of them (rank 0 prints).
    `time_env`: extra environment variables for the timing process."""
    result: dict = {}
    for measure in measures:
        env = dict(os.environ) | ((time_env or {}) if measure == "time" else {})
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        launcher = [sys.executable]
        if nproc > 1:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
        cmd = launcher + [script, "--worker", json.dumps(spec | {"measure": measure})]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"benchmark worker failed for {spec}:\n{out.stderr[-3000:]}")
        result |= json.loads(out.stdout.strip().splitlines()[-1])
    result.pop("measure")
    return result


def sync(device) -> None:
    """Wait for the device's queued work (CUDA's kernels run asynchronously; the CPU's do not), so that a timer
    read after it counts the work."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_or_memory(run, spec: dict, device) -> dict:
    """Inside a worker: one warm-up call of `run`, then, as spec["measure"] says, either the peak memory of
    one more call ({"peak_mb"}) or the median time of spec["repeats"] calls ({"seconds"})."""
    from evaluation.peak_memory import PeakMemory

    run()
    if spec["measure"] == "memory":
        with PeakMemory(device) as mem:
            run()
        return {"peak_mb": mem.peak_mb, "held_mb": mem.held_mb}
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times)}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
