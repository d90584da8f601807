"""Matrix products on the CPU that give the same floats whatever the batch around a row.

PyTorch's CPU builds do their matrix products in Intel's oneMKL, which picks its kernel, and so the order of
its sums, by the shape of the product: a row of a linear layer's input comes out a few units in the last place
different alone than in a batch of 16 (PyTorch 2.14). Sampling a prompt alone and beside seven others would
then give different floats. oneMKL's strict conditional-numerical-reproducibility mode (CNR) fixes the order of
a product's sums per row, whatever the number of rows or threads, for its AVX2 and AVX-512 kernels, on the
branch the CPU would pick anyway. Its cost on two cores is within the machine's drift (`bench/cpu_math.py`:
medians of six alternating pairs 1.03-1.10 times the time, single pairs 0.72-1.49, for a product, a DiT forward
and the quickstart's training steps).

    strict_cpu_math()   # at the start of an entry point; True where the mode is on

The mode can only be chosen before oneMKL's first call in the process, so every command turns it on before its
work (`parallel.process_groups.run_command`) and `Pipeline.load` tries too; where a process did a product
first it stays off (False). It leaves the process as it is where MKL_CBWR is set (your own choice of oneMKL's
mode), and does nothing where the PyTorch build has no oneMKL (ARM, macOS).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

# oneMKL's named constants for its CNR control (mkl_cbwr.h)
CBWR_AUTO, CBWR_STRICT, CBWR_ALL, CBWR_SUCCESS = 2, 0x10000, -1, 0

_state: bool | None = None


def _mkl():
    """PyTorch's own copy of oneMKL's service functions (linked into libtorch_cpu), or None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return lib if hasattr(lib, "mkl_serv_cbwr_set") and hasattr(lib, "mkl_serv_cbwr_get") else None
    except OSError:
        return None


def strict_cpu_math() -> bool:
    """Turn on oneMKL's strict CNR mode on the branch the CPU picks (once; later calls say whether it is on).
    False where the process already chose a mode (MKL_CBWR), already did a product, or has no oneMKL."""
    global _state
    if _state is None:
        lib = _mkl()
        _state = False
        if lib is not None:
            if "MKL_CBWR" not in os.environ:
                lib.mkl_serv_cbwr_set(CBWR_AUTO | CBWR_STRICT)  # refused (nonzero) once oneMKL has run
            _state = bool(lib.mkl_serv_cbwr_get(CBWR_ALL) & CBWR_STRICT)
    return _state
