"""Flow matching: the path, the target, the timestep shift and the ODE samplers."""

from __future__ import annotations

import pytest
import torch

from dit3d.flow import (FlowConfig, interpolate, predicted_x0, sample, sampling_timesteps, shift_time,
                        training_timesteps, velocity_target)


def test_path_target_and_x0_prediction_agree():
    x0, noise = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = interpolate(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(predicted_x0(x_t, t, velocity_target(x0, noise)), x0)


def test_shift_moves_time_towards_noise_and_grows_with_tokens():
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > t[1:-1]).all())
    cfg = FlowConfig(shift_base_tokens=256)
    assert cfg.shift_for(64) == 1.0 and cfg.shift_for(256) == 1.0 and cfg.shift_for(1024) == pytest.approx(2.0)
    assert FlowConfig(shift=5.0).shift_for(10) == 5.0
    ts = training_timesteps(cfg, torch.randn(10000, generator=torch.Generator().manual_seed(0)), tokens=4096)
    plain = training_timesteps(cfg, torch.randn(10000, generator=torch.Generator().manual_seed(0)), tokens=256)
    assert 0 < float(ts.min()) and float(ts.max()) < 1
    assert float(plain.mean()) == pytest.approx(0.5, abs=0.02) and float(ts.mean()) > 0.7  # shift 4 for 16x the tokens


@pytest.mark.parametrize("solver", ["euler", "heun", "unipc", "dpm++"])
def test_samplers_recover_the_data_of_an_exact_velocity_field(solver):
    # all data at one point c: the exact velocity on the straight path is (x_t - c) / t, and both solvers
    # must land on c from any noise, with any number of steps and any shift
    c = torch.randn(2, 3, 1, 4, 4)
    steps_seen = []
    out = sample(lambda x, t: (x - c) / t.view(-1, 1, 1, 1, 1), torch.randn(2, 3, 1, 4, 4), steps=4, shift=2.5,
                 solver=solver, on_step=lambda i, t, x0: steps_seen.append((i, float(t), x0)))
    torch.testing.assert_close(out, c, rtol=1e-5, atol=1e-5)
    assert [i for i, _, _ in steps_seen] == [0, 1, 2, 3] and steps_seen[0][1] == 1.0
    torch.testing.assert_close(steps_seen[0][2], c, rtol=1e-5, atol=1e-5)  # the x0 prediction of the trajectory
    assert sampling_timesteps(4, 1.0).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_classifier_free_guidance_combines_both_predictions_in_one_call():
    from pipeline import generate_latents

    calls = []

    def forward(x, t, text, mask, drop=None, given=None):
        calls.append((x.shape[0], None if drop is None else drop.tolist()))
        cond = torch.where(drop, 0.0, 1.0) if drop is not None else torch.ones(x.shape[0])
        return cond.view(-1, 1, 1, 1, 1) * torch.ones_like(x)  # v = 1 with the caption, 0 without

    out = generate_latents(forward, lambda c: (torch.zeros(len(c), 3), torch.ones(len(c), 3, dtype=torch.bool)),
                           ["a", "b"], (1, 1, 1, 1), steps=2, guidance=3.0, shift=1.0, seeds=[0, 1])
    assert calls == [(4, [False, False, True, True])] * 2  # one batched call per step, the twins dropped
    noise = torch.stack([torch.randn((1, 1, 1, 1), generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    torch.testing.assert_close(out, noise - 3.0)  # v = 0 + 3 * (1 - 0) integrated from t = 1 to 0
    with pytest.raises(ValueError, match="solver must be"):
        sample(lambda x, t: x, torch.zeros(1), 2, solver="rk4")
