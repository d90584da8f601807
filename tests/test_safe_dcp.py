"""Loading a checkpoint runs no code from it: torch.distributed.checkpoint's pickles are read by training.safe_dcp,
which admits only what a checkpoint is made of."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from training import safe_dcp


class Hostile:
    """What a hostile run folder holds: unpickling it runs a shell command (here: it writes a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def optimiser_like_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    model(torch.rand(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 7, "name": "run", "bf16": torch.ones(2, dtype=torch.bfloat16)}


def test_a_checkpoint_of_tensors_and_plain_values_loads_exactly(tmp_path):
    state = optimiser_like_state()
    dcp.save(state, checkpoint_id=tmp_path)
    into = optimiser_like_state()
    into["model"] = {k: torch.zeros_like(v) for k, v in into["model"].items()}
    into["optim"]["param_groups"][0]["lr"], into["step"], into["name"] = 0.0, 0, ""
    safe_dcp.load(into, tmp_path)
    for key, value in state["model"].items():
        assert torch.equal(into["model"][key], value)
    assert into["optim"]["param_groups"][0]["lr"] == 3e-3 and into["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert into["step"] == 7 and into["name"] == "run"


def test_a_hostile_index_is_refused_without_running_it(tmp_path):
    dcp.save({"w": torch.ones(3)}, checkpoint_id=tmp_path)
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match=r"refers to (posix|os)\.system, which no checkpoint holds"):
        safe_dcp.load({"w": torch.zeros(3)}, tmp_path)
    assert not marker.exists()
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match="system, which no checkpoint holds"):
        safe_dcp.read_index((tmp_path / ".metadata").read_bytes())
    assert not marker.exists()


def test_a_hostile_value_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    dcp.save({"w": torch.ones(3), "lr": Hostile(marker)}, checkpoint_id=tmp_path / "ckpt")
    assert not marker.exists()
    with pytest.raises(safe_dcp.UnsafeCheckpointError, match=r"value lr is not plain data \(.*system"):
        safe_dcp.load({"w": torch.zeros(3), "lr": 0.1}, tmp_path / "ckpt")
    assert not marker.exists()
    dcp.load({"w": torch.zeros(3), "lr": 0.1}, checkpoint_id=tmp_path / "ckpt")  # torch's own reader runs it:
    assert marker.exists()  # the marker shows the test can fail
