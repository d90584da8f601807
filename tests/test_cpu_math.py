"""A command's matrix products on the CPU give the same floats for a row alone and in any batch (cpu_math):
oneMKL's strict reproducibility mode, turned on before the first product, unless the user chose a mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the mode is oneMKL's")

# each row of a linear layer's input alone, and in batches of 2 to 16, against the row in the batch of 16
ROWS = """
import json, torch
def rows():
    torch.manual_seed(0)
    lin, x = torch.nn.Linear(256, 1024), torch.randn(16, 256)
    whole = lin(x)
    return max((lin(x[i:i + m])[0] - whole[i]).abs().max().item() for m in (1, 2, 4, 8) for i in range(0, 16, m))
"""


def _run(code: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", ROWS + code], capture_output=True, text=True, cwd=ROOT,
                         env=clean | env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@mkl
def test_a_command_computes_a_row_alike_alone_and_in_any_batch():
    got = _run("from parallel import run_command\nimport cpu_math\n"
               "print(json.dumps({'diff': run_command(rows)[1], 'strict': cpu_math.strict_cpu_math()}))")
    assert got == {"diff": 0.0, "strict": True}


@mkl
def test_too_late_or_chosen_by_the_user_the_mode_is_left_as_it_is():
    # a product before it: oneMKL refuses a change of mode, and the rows differ by the batch (the bug it fixes)
    late = _run("d = rows()\nimport cpu_math\nprint(json.dumps({'diff': d, 'strict': cpu_math.strict_cpu_math()}))")
    assert not late["strict"] and late["diff"] > 0
    # the user's own MKL_CBWR is kept: non-strict stays non-strict, and their strict mode is reported as on
    for mode, strict in (("COMPATIBLE", False), ("AVX2,STRICT", True)):
        got = _run("import cpu_math\ns = cpu_math.strict_cpu_math()\nprint(json.dumps({'strict': s, 'diff': rows()}))",
                   MKL_CBWR=mode)
        assert got["strict"] is strict
        if strict:
            assert got["diff"] == 0.0
