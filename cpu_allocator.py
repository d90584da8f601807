"""Keep freed CPU memory in the process, so that a training step's tensors stop costing page faults.

glibc's malloc serves a block above its mmap threshold (128 KiB, raised at run time up to 32 MiB) with a fresh
mmap and unmaps it when freed, and gives the top of its heap back to the system whenever more than its trim
threshold is free there. A training step allocates and frees the same activations every step, so every step
maps their pages again and the kernel zeroes each one on first touch: 8,000 to 20,000 minor page faults a
step for the quickstart's tiny tokenizer, whose step takes 0.87 of the time with them gone (two cores,
bench/cpu_allocator.py).
With both thresholds raised, freed blocks stay in the heap for the next step, as PyTorch's caching allocator
keeps GPU memory and as jemalloc or tcmalloc (through LD_PRELOAD) would on the CPU. What is kept is what the
next step allocates again, so peak memory does not grow.

    keep_freed_memory()   # at the start of an entry point; True where it changed the allocator's settings

It leaves the process as it is where a choice was already made: an allocator preloaded (LD_PRELOAD), glibc's
own settings (MALLOC_* variables, GLIBC_TUNABLES), or DIT3D_KEEP_FREED_MEMORY=0. Where the C library is not
glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform

OPT_OUT = "DIT3D_KEEP_FREED_MEMORY"
# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# blocks up to this size come from the heap (a CPU step's largest activations are tens to hundreds of MiB) ...
MMAP_THRESHOLD = 512 << 20
# ... and up to this much free memory at the heap's top is kept for the next step
TRIM_THRESHOLD = 1 << 30

_applied: bool | None = None


def _already_chosen() -> bool:
    env = os.environ
    return (env.get(OPT_OUT, "1") == "0" or bool(env.get("LD_PRELOAD", "").strip())
            or "malloc" in env.get("GLIBC_TUNABLES", "")
            or any(k.startswith("MALLOC_") for k in env))


def keep_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (once; later calls return the first
    answer). True where the settings were changed; False where the process had already chosen (see the module's
    docstring) or the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" and not _already_chosen():
            libc = ctypes.CDLL(None)  # the process's own symbols: the C library already loaded, found without a search
            # mallopt returns 1 on success; setting the thresholds by hand also stops glibc adjusting them itself
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
