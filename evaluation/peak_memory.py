"""Peak memory of a block of code, on CUDA (the allocator's) or the CPU (the process's resident memory).

    with PeakMemory(device) as mem:
        run()
    mem.held_mb   # in use when the block began
    mem.peak_mb   # the most in use at any moment of the block, above held_mb

That is the one meaning of "peak memory" in this project: the evaluation reports, the benchmarks and the
trainer's metrics (per logging window) all measure it here. On the CPU the kernel's high-water mark of
resident memory is reset when the block begins (Linux: /proc/self/clear_refs), so the figure is the block's
own peak, not the process's lifetime peak.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise RuntimeError(f"{field} is not in /proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device | str = "cpu", collect_garbage: bool = True):
        """collect_garbage: free unreferenced objects first, so that held_mb is what is really held (for
        measurements; the trainer, which measures every logging window, skips it)."""
        self.device = torch.device(device)
        self.collect_garbage = collect_garbage
        self.peak_mb = float("nan")
        self.held_mb = 0.0

    @property
    def supported(self) -> bool:
        return self.device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    def start(self) -> "PeakMemory":
        if self.collect_garbage:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.held_mb = torch.cuda.memory_allocated(self.device) / 2**20
        elif self.supported:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS
            self.held_mb = _status_mb("VmRSS")
        return self

    def stop(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.held_mb
        elif self.supported:
            self.peak_mb = _status_mb("VmHWM") - self.held_mb
        return self

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
