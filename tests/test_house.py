"""The house rules that a user or a contributor relies on without seeing: the libraries import without the data
stack; bad input is one line and a bug keeps its traceback; FSDP2 computes in bf16 on CUDA; a resumed run
draws the random numbers the uninterrupted one would have; the GAN weight is VQGAN's."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_libraries_import_without_the_data_stack():
    """`import dit3d` and `import tokenizer` (and loading their checkpoints) need torch and safetensors only:
    not PyAV, webdataset or the loader."""
    code = ("import sys, dit3d, tokenizer, checkpoint_io; from dit3d import DiT3D; from tokenizer import CausalVAE; "
            "print(sorted(m for m in ('av', 'webdataset', 'data', 'braceexpand') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_a_restored_rng_state_draws_what_the_saved_one_would_have():
    from training.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    for _ in range(5):  # move every stream off its start, NumPy's mid-way through its 624-word block
        torch.rand(3), random.random(), np.random.rand(7), np.random.randn()
    state = json.loads(json.dumps(rng_state(torch.device("cpu"))))  # as it goes through rank{r}.json
    expected = (torch.rand(4), random.random(), np.random.rand(5), np.random.randn(3))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(4), random.random(), np.random.rand(5), np.random.randn(3))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and np.array_equal(expected[3], again[3])


def test_fsdp2_computes_in_bf16_on_cuda_and_reduces_in_float32(monkeypatch):
    """parallelize() gives FSDP2 a bf16 parameter dtype on CUDA (float32 gradient reduction), and none on the
    CPU; every block and the root get the same policy. fully_shard is replaced by a recorder, so no GPU is
    needed: what is checked is what training asks FSDP2 for."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    from dit3d import DiT3D
    from dit3d.model import DiTBlock
    from parallel import Env, ParallelOptions, parallelize

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy: calls.append((type(module), mp_policy)))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    model = DiT3D.from_preset("tiny")
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", None)):
        calls.clear()
        env = Env(rank=0, world=2, local_rank=0, device=torch.device(device))
        assert parallelize(model, env, ParallelOptions((DiTBlock,), "fsdp")) is model
        assert [t for t, _ in calls] == [DiTBlock] * 4 + [DiT3D]
        assert all(p.param_dtype == dtype and p.reduce_dtype == torch.float32 for _, p in calls)


def test_the_gan_weight_is_the_gradient_ratio_at_the_decoders_last_weight(tmp_path):
    """VQGAN's adaptive weight: ||d rec / d W|| / ||d gan / d W|| at the decoder's last layer's weight W."""
    from data.synthetic import SyntheticSpec, generate
    from parallel import Env
    from tokenizer.losses import reconstruction_loss
    from training.options import build_parser
    from training.stage import sample_generator
    from training.tokenizer_stage import TokenizerStage

    generate(tmp_path / "shards", 4, SyntheticSpec(frames=5, size=32), seed=0, shard_size=4)
    args = build_parser().parse_args(["--stage", "tokenizer", "--data", str(tmp_path / "shards"), "--out", str(tmp_path),
                                      "--frames", "5", "--size", "32", "--disc-weight", "0.5", "--disc-start", "0"])
    torch.manual_seed(0)
    stage = TokenizerStage(args, Env(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    batch = {"video": torch.rand(2, 3, 5, 32, 32) * 2 - 1, "key": ["a", "b"]}
    _, logs = stage.loss(stage.model, batch, step=0)

    recon, posterior = stage.model(batch["video"], generator=sample_generator(0, 0, "a", "posterior"))
    rec, _, _ = reconstruction_loss(batch["video"], recon, posterior, stage.loss_cfg)
    gan = -stage.disc(recon).mean()
    weight = stage.model.decoder.conv_out.conv.weight
    rec_grad, = torch.autograd.grad(rec, weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan, weight)
    assert logs["adaptive_weight"] == pytest.approx(float(rec_grad.norm() / (gan_grad.norm() + 1e-4)), rel=1e-4)


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import train

    assert train.main(["--stage", "dit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--frames", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --frames: frames must be 1 + 4k") and err.count("\n") == 1

    def broken(args):
        raise ValueError("an internal invariant broke")  # a bug, not the user's input

    monkeypatch.setattr(train, "train", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        train.main(["--stage", "dit", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
