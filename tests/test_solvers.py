"""The multistep solvers (dit3d/solvers.py) held against diffusers' schedulers step for step on the same model
outputs, and against the exact flow of Gaussian data, where their second order must show."""

from __future__ import annotations

import pytest
import torch

from dit3d.flow import sample, solver_times
from dit3d.solvers import Multistep, flow_times

diffusers = pytest.importorskip("diffusers")


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth field that depends on x and t nonlinearly, as a network's output does."""
    tt = t.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(1.3 * x + 0.7 * tt) - 0.4 * x * tt + torch.sin(3 * tt) * 0.2


def diffusers_scheduler(solver: str, shift: float, order: int):
    common = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order)
    if solver == "unipc":
        return diffusers.UniPCMultistepScheduler(**common)
    return diffusers.DPMSolverMultistepScheduler(**common)


@pytest.mark.parametrize("solver,order", [("unipc", 1), ("unipc", 2), ("unipc", 3), ("dpm++", 1), ("dpm++", 2)])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (5, 5.0), (12, 3.0), (20, 1.0)])
def test_each_step_equals_the_diffusers_scheduler(solver, order, steps, shift):
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(steps))
    theirs_in, x = [], noise.clone()
    scheduler = diffusers_scheduler(solver, shift, order)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        theirs_in.append((x.clone(), float(t)))
        x = scheduler.step(toy_velocity(x, t.expand(2).float() / 1000), t, x).prev_sample
    theirs = x

    levels, model_times = flow_times(solver, steps, shift)
    torch.testing.assert_close(levels, scheduler.sigmas.float(), rtol=0, atol=0)
    assert [round(1000 * float(m)) for m in model_times] == [int(t) for t in scheduler.timesteps]
    ours_in = []

    def velocity(x, t):
        ours_in.append((x.clone(), float(t[0])))
        return toy_velocity(x, t)

    if order == 2:  # the sampler's own path: the order Wan2.1 ships
        ours = sample(velocity, noise, steps, shift, solver, schedule="diffusers")
    else:
        run, x, ours_in = Multistep(solver, levels, order=order), noise.clone(), []
        for i in range(steps):
            ours_in.append((x.clone(), float(model_times[i])))
            v = toy_velocity(x, model_times[i].expand(2))
            x = run.step(i, x, x - levels[i] * v)
        ours = x
    assert len(ours_in) == len(theirs_in) == steps
    for (a, ta), (b, tb) in zip(ours_in, theirs_in):
        assert ta == pytest.approx(tb / 1000, abs=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert float(theirs.std()) > 0.1


def gaussian_flow(mu: float, s: float):
    """Data N(mu, s^2) per element: the exact velocity of the straight path and the exact ODE end point."""
    def velocity(x, t):
        tt = t.view(-1, *([1] * (x.ndim - 1))).double()
        var = (1 - tt) ** 2 * s**2 + tt**2
        x0 = mu + (1 - tt) * s**2 / var * (x.double() - (1 - tt) * mu)  # E[x0 | x_t]
        return ((x.double() - x0) / tt).to(x.dtype)

    return velocity, lambda noise: mu + s * noise  # the ODE carries noise z to mu + s z


@pytest.mark.parametrize("steps", [8, 16])
def test_multistep_solvers_beat_euler_on_gaussian_data(steps):
    # at one model call a step, both land several times nearer the exact end point than Euler does
    velocity, exact = gaussian_flow(0.7, 0.8)
    noise = torch.randn(2, 3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {solver: (sample(velocity, noise, steps, 1.0, solver) - exact(noise)).abs().max().item()
           for solver in ("euler", "unipc", "dpm++")}
    assert err["euler"] > 0.1  # the problem is not trivial at this many steps
    assert err["unipc"] < err["euler"] / 4 and err["dpm++"] < err["euler"] / 4, err


def test_our_grid_starts_at_pure_noise_and_stays_finite():
    levels, model_times = solver_times("unipc", 4, 3.0)
    assert float(levels[0]) == 1.0 and float(levels[-1]) == 0.0 and torch.equal(model_times, levels[:-1])
    out = sample(toy_velocity, torch.randn(1, 2, 1, 2, 2), 4, 3.0, "unipc")
    assert bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="solver must be one of"):
        solver_times("rk4", 4, 3.0)
    with pytest.raises(ValueError, match="order 1 to 2"):
        Multistep("dpm++", levels, order=3)
