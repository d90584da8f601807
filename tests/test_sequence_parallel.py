"""Ulysses sequence parallelism on the CPU: 2 processes with gloo against one process.

Each worker builds the same model and inputs from the same seed, runs them once without and once with the
sequence split over both ranks, and checks that the outputs agree and that the ranks' gradients add up to
the one-process gradient (each rank computes the same loss, and the gather's backward sums the ranks'
gradients of each slice, so the sum over ranks is ranks x the gradient; DDP's average divides that out).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import free_port
from dit3d import DiT3D
from dit3d.model import Attend
from parallel import teardown_distributed


def _spawn(fn, *args) -> None:
    mp.spawn(_init_and_run, args=(free_port(), fn, args), nprocs=2, join=True)


def _init_and_run(rank: int, port: int, fn, args) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ok = False
    try:
        fn(rank, *args)
        ok = True
    finally:
        teardown_distributed(ok)


def _summed_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads[name] = g / dist.get_world_size()
    return grads


def _attention_worker(rank: int) -> None:
    from parallel import UlyssesAttend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    key_mask = torch.arange(16)[None] < torch.tensor([16, 11])[:, None]  # the second sample has 5 padding keys
    full = Attend("sdpa")(q, k, v, key_mask)
    (full * torch.arange(16.0)[:, None]).sum().backward()  # a loss that weighs tokens differently
    part = slice(8 * rank, 8 * rank + 8)
    ql, kl, vl = (x.detach()[:, :, part].clone().requires_grad_() for x in (q, k, v))
    local = UlyssesAttend(Attend("sdpa"), dist.group.WORLD)(ql, kl, vl, key_mask)
    torch.testing.assert_close(local, full[:, :, part], rtol=1e-5, atol=1e-6)
    (local * torch.arange(16.0)[part, None]).sum().backward()
    for mine, whole in ((ql, q), (kl, k), (vl, v)):
        torch.testing.assert_close(mine.grad, whole.grad[:, :, part], rtol=1e-5, atol=1e-6)


def test_ulysses_attention_equals_one_process():
    _spawn(_attention_worker)


def _dit_worker(rank: int) -> None:
    from parallel import apply_sequence_parallel

    torch.manual_seed(0)
    model = DiT3D.from_preset("tiny", frame_conditioning=True)
    for p in model.parameters():  # leave adaLN-Zero's zeros, so that every path carries signal
        p.data.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 16, 3, 8, 8)  # 3 x 4 x 4 = 48 tokens
    t, text, given = torch.rand(2), torch.randn(2, 5, 64), torch.tensor([[True, False, False], [False] * 3])
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    sp = copy.deepcopy(model)
    assert apply_sequence_parallel(sp, dist.group.WORLD) == 4

    plain_out = model(x, t, text, mask, given)
    plain_out.pow(2).mean().backward()
    sp_out = sp(x, t, text, mask, given)
    torch.testing.assert_close(sp_out, plain_out, rtol=1e-5, atol=1e-6)
    sp_out.pow(2).mean().backward()
    summed = _summed_grads(sp)
    for name, p in model.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)  # null_text is unused here
        torch.testing.assert_close(summed[name], expected, rtol=1e-4, atol=1e-7, msg=name)

    # variable length: the padded sequence is made divisible by the ranks, each clip is its own forward
    xs = [torch.randn(16, 1, 6, 6), torch.randn(16, 2, 4, 6)]  # 9 and 12 tokens
    outs = sp.forward_varlen(xs, t, text, mask)
    for x_i, out, i in zip(xs, outs, range(2)):
        torch.testing.assert_close(out, model(x_i[None], t[i : i + 1], text[i : i + 1], mask[i : i + 1])[0],
                                   rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="divisible by 2, got 9 tokens"):
        sp(torch.randn(1, 16, 1, 6, 6), t[:1], text[:1])
    with pytest.raises(ValueError, match="has 3 heads: use an --sp-size that divides 3"):
        apply_sequence_parallel(DiT3D.from_preset("tiny", heads=3, width=96), dist.group.WORLD)


def test_sequence_parallel_dit_equals_one_process():
    _spawn(_dit_worker)


def test_scale_bench_memory_model_and_longest_clip():
    from bench.scale import longest_clip, memory_model
    from dit3d.budget import all_to_all_bytes
    from dit3d import preset

    # 1000 MB held + 10 MB per 1k tokens; 1M parameters carry 16 MB of state (weights, grads, AdamW)
    low, high = {"tokens": 1000, "held_mb": 1000.0, "peak_mb": 10.0}, {"tokens": 2000, "held_mb": 1000.0, "peak_mb": 20.0}
    model = memory_model(low, high, params=2**20)
    assert model["per_token_mb"] == pytest.approx(0.01) and model["state_mb"] == pytest.approx(16.0)
    assert model["overhead_mb"] == pytest.approx(1000.0 - 16.0)
    # 1 rank, 1100 MB: 984 overhead + 16 state leave 100 MB = 10k tokens = 39 latent frames of 256 -> 1 + 4 x 38
    assert longest_clip(model, 1, 1100.0, 256) == (10000, 153)
    # 2 ranks: the state halves (8 MB more room) and each rank holds half the tokens
    assert longest_clip(model, 2, 1100.0, 256)[0] == 21600
    assert longest_clip(model, 1, 900.0, 256) == (0, 0)  # nothing fits
    cfg = preset("S")  # 12 blocks x 8 exchanges x (S / P) x width x 4 bytes x (P - 1) / P
    assert all_to_all_bytes(cfg, 4096, 1, 1, 4, training=True) == 0
    assert all_to_all_bytes(cfg, 4096, 2, 1, 4, training=True) == 12 * 8 * 2048 * 384 * 4 / 2
    assert all_to_all_bytes(cfg, 4096, 2, 3, 4, training=False) == 3 * 12 * 4 * 2048 * 384 * 4 / 2


@pytest.mark.slow
def test_scale_bench_runs_one_and_two_ranks(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "scale.py"), "--tokens", "512", "--repeats", "1",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["ranks"] for r in result["measured"]] == [1, 2]
    assert all(r["tokens_per_s"] > 0 and r["held_mb"] > 0 for r in result["measured"])
    assert {x["kind"] for x in result["longest_clip"]} == {"measured model", "projection"}
    assert "projection" in proc.stdout and "| tiny | 2 | 512 | 256 |" in proc.stdout
