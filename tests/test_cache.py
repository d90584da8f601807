"""Step caching (dit3d/cache.py) on a small random DiT: off is the model untouched, a threshold nothing
reaches is bit for bit the uncached sampler, a large one computes only the first and last calls, and a video
decides for itself whatever else is in its batch."""

from __future__ import annotations

import pytest
import torch

from dit3d import DiT3D
from dit3d.cache import step_cache
from dit3d.config import preset
from dit3d.flow import sample


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = DiT3D(preset("tiny", in_channels=4, text_dim=8, width=64, depth=3, heads=4)).eval()
    with torch.no_grad():  # away from the zero-initialised gates, so that the blocks do something
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def run(model, noise, text, steps=8, solver="euler"):
    def velocity(x, t):
        return model(x, t, text[: x.shape[0]])

    return sample(velocity, noise, steps, 3.0, solver)


def inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 2, 4, 4, generator=g), torch.randn(batch, 5, 8, generator=g)


def test_off_leaves_the_model_alone_and_an_unreached_threshold_changes_no_bit(dit):
    noise, text = inputs(2)
    plain = run(dit, noise, text)
    with step_cache(dit, 0.0, 8) as cache:
        assert cache is None and "run_blocks" not in vars(dit)
        assert torch.equal(run(dit, noise, text), plain)
    with step_cache(dit, 1e-30, 8) as cache:  # every call computes, through the caching path
        out = run(dit, noise, text)
    assert torch.equal(out, plain)
    assert cache.report() == {"threshold": 1e-30, "calls": 8, "passes": 16, "passes_run": 16}
    assert "run_blocks" not in vars(dit)  # the class's method is back


@pytest.mark.parametrize("solver,calls", [("euler", 8), ("heun", 15), ("unipc", 8)])
def test_a_threshold_nothing_reaches_computes_the_first_and_last_calls_only(dit, solver, calls):
    noise, text = inputs(2)
    with step_cache(dit, 1e9, calls) as cache:
        run(dit, noise, text, solver=solver)
    assert cache.report() == {"threshold": 1e9, "calls": calls, "passes": 2 * calls, "passes_run": 4}


def test_a_moderate_threshold_skips_some_steps_and_stays_near_the_uncached_video(dit):
    noise, text = inputs(2)
    plain = run(dit, noise, text, steps=20)
    with step_cache(dit, 0.3, 20) as cache:
        cached = run(dit, noise, text, steps=20)
    r = cache.report()
    assert 0 < r["passes_run"] < r["passes"], r
    err = ((cached - plain).norm() / plain.norm()).item()
    assert 0 < err < 0.2, err


def test_each_video_decides_for_itself_whatever_its_batch(dit):
    noise, text = inputs(3, seed=4)
    with step_cache(dit, 0.3, 20):
        together = run(dit, noise, text, steps=20)
    for i in range(3):
        with step_cache(dit, 0.3, 20) as cache:
            alone = run(dit, noise[i : i + 1], text[i : i + 1], steps=20)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
    assert cache.report()["passes_run"] < 20
