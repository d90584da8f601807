"""Commands keep freed CPU memory for reuse (cpu_allocator): a large tensor allocated again after it was freed
costs no page faults, unless the user chose the allocator's settings."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import cpu_allocator

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the allocator's settings are glibc's")

# A command (through parallel.run_command, as train.py, sample.py and the quickstart run) that allocates, writes
# and frees a 48 MiB tensor 20 times: above glibc's own largest mmap threshold (32 MiB), so by default each one
# is a fresh mapping whose every page faults when first written. Kept, the heap grows for the first few (the
# small blocks allocated between them keep freed ones from merging) and then serves them all, as a training
# loop's steps after the first few.
CHURN = """
import json, resource, torch
from parallel import run_command
def churn():
    for _ in range(10):
        torch.empty(12 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(12 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
import cpu_allocator
print(json.dumps({"faults": run_command(churn)[1], "kept": cpu_allocator.keep_freed_memory()}))
"""


def _churn(**env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in (cpu_allocator.OPT_OUT, "LD_PRELOAD", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, cwd=ROOT,
                         env=clean | env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc
def test_a_command_reuses_freed_memory_without_page_faults():
    kept, default = _churn(), _churn(DIT3D_KEEP_FREED_MEMORY="0")
    assert kept["kept"] and not default["kept"]
    assert default["faults"] >= 20 * 100, default  # every allocation mapped afresh: thousands of 4 KiB pages
    assert kept["faults"] * 20 < default["faults"], (kept, default)


def test_the_users_own_allocator_choice_is_left_alone(monkeypatch):
    """glibc's own variables, a preloaded allocator, or the opt-out: keep_freed_memory() changes nothing."""
    for name, value in (("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
                        ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"), (cpu_allocator.OPT_OUT, "0")):
        with monkeypatch.context() as m:
            m.setattr(cpu_allocator, "_applied", None)
            m.setenv(name, value)
            assert cpu_allocator.keep_freed_memory() is False, name
