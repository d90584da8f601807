"""Rectified flow matching: the training objective and the ODE samplers, shared by train.py and sample.py.

Convention (as SD3, Open-Sora 2.0 and Wan2.1): t = 0 is data and t = 1 is noise,

    x_t = (1 - t) * x0 + t * noise,        the model predicts  v = noise - x0,

so sampling integrates dx/dt = v from t = 1 down to t = 0, and the clean-video prediction at any point
is x0 = x_t - t * v.

Timesteps. Training draws t from a logit-normal distribution (t = sigmoid(mean + std * n), n ~ N(0, 1)),
which concentrates on the middle of the path. Larger videos have more tokens and so keep more of their
signal at a given noise level; both training and sampling therefore apply the same shift towards noise,
    t' = s * t / (1 + (s - 1) * t),   s = sqrt(tokens / shift_base_tokens), at least 1,
the resolution-dependent shift of SD3 and Open-Sora 2.0. A fixed `shift` overrides the token rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .solvers import MULTISTEP, Multistep, flow_times

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,)) -> v (B, ...)


@dataclass(frozen=True)
class FlowConfig:
    logit_mean: float = 0.0  # logit-normal location of the training timesteps
    logit_std: float = 1.0  # and its scale
    shift: float | None = None  # a fixed timestep shift; None: from the token count
    shift_base_tokens: int = 256  # token count at which the shift is 1 (a 256x256 image at 8x and patch 2)

    def shift_for(self, tokens: int) -> float:
        if self.shift is not None:
            return float(self.shift)
        return max(1.0, math.sqrt(tokens / self.shift_base_tokens))


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move t towards noise (shift > 1) keeping 0 and 1 fixed."""
    return shift * t / (1 + (shift - 1) * t)


def training_timesteps(cfg: FlowConfig, normal: torch.Tensor, tokens: int) -> torch.Tensor:
    """Training times from standard normal draws `normal` (B,): logit-normal, then shifted for `tokens`."""
    return shift_time(torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal), cfg.shift_for(tokens))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t (B,) broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predicted_x0(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_t - t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * v


def sampling_timesteps(steps: int, shift: float, device=None) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), uniform before the shift."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift).float()


def diffusers_euler_timesteps(steps: int, shift: float, train_steps: int = 1000) -> torch.Tensor:
    """steps + 1 times from 1 to 0 as diffusers' FlowMatchEulerDiscreteScheduler(shift=shift) places them (the
    scheduler WanPipeline runs with it): `steps` points uniform from 1 to the shifted 1 / train_steps, each then
    shifted (again), in its float32 and float64 arithmetic, so that the same model gives the same video."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    table = torch.linspace(train_steps, 1, train_steps, dtype=torch.float32) / train_steps
    table = shift * table / (1 + (shift - 1) * table)  # the scheduler's training sigmas, float32
    sigmas = np.linspace(table[0].item() * train_steps, table[-1].item() * train_steps, steps) / train_steps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)  # float64
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


SCHEDULES = ("uniform", "diffusers")


def per_frame(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B, T) per-latent-frame mask viewed as (B, 1, T, 1, ...), broadcastable to (B, C, T, ...) of `ndim` dims."""
    return mask.view(mask.shape[0], 1, mask.shape[1], *([1] * (ndim - 3)))


def keep_given(x: torch.Tensor, given: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x (B, C, T, ...) with the latent frames flagged in given = (known (B, C, T, ...), mask (B, T)) replaced
    by the known clean ones."""
    if given is None:
        return x
    known, mask = given
    return torch.where(per_frame(mask, x.ndim), known.to(x.dtype), x)


def flow_loss(v: torch.Tensor, target: torch.Tensor, generate: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the velocity. With `generate` (B, T) bool, only the latent frames to be generated
    count: each sample's error is averaged over its generated frames, then the samples are averaged (so a
    sample's weight does not depend on how many of its frames were given)."""
    err = (v.float() - target.float()).pow(2)
    if generate is None:
        return err.mean()
    w = per_frame(generate.to(err.device), err.ndim).float()
    per_sample = (err * w).flatten(1).sum(1) / (w.expand_as(err).flatten(1).sum(1)).clamp(min=1)
    return per_sample.mean()


SOLVERS = ("euler", "heun", *MULTISTEP)


def solver_times(solver: str, steps: int, shift: float, schedule: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """(noise levels (steps + 1,) from noise to 0, model times (steps,)) of one sampler run. "uniform": our grid
    (sampling_timesteps) for every solver; "diffusers": the grid of the diffusers scheduler each solver is
    (FlowMatchEulerDiscreteScheduler for euler and heun, UniPC / DPM-Solver++ with flow sigmas), with the
    integer timesteps those pipelines give the model."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "uniform":
        levels = sampling_timesteps(steps, shift)
    elif solver in MULTISTEP:
        return flow_times(solver, steps, shift)
    else:
        levels = diffusers_euler_timesteps(steps, shift)
    return levels, levels[:-1]


def model_calls(solver: str, steps: int) -> int:
    """Velocity calls one `sample` run makes: Heun two a step except the last, every other solver one."""
    return 2 * steps - 1 if solver == "heun" else steps


@torch.no_grad()
def sample(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0, solver: str = "euler",
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           given: tuple[torch.Tensor, torch.Tensor] | None = None, schedule: str = "uniform") -> torch.Tensor:
    """Integrate from `noise` (t = 1) to data (t = 0) in `steps` steps; returns x0 in noise's shape.

    solver: "euler" (one model call per step), "heun" (two per step, except the last, second order), "unipc"
    or "dpm++" (multistep, one call per step, second order from the second step: dit3d.solvers).
    on_step(i, t, x0_prediction) is called after every step, e.g. to save the denoising trajectory.
    given = (known, mask): latent frames known clean (mask (B, T) True), kept exactly at every model call and
    in the result; only the others are integrated.
    schedule: "uniform" (our times: uniform, then shifted) or "diffusers" (the grid of the diffusers scheduler
    of that solver, see solver_times: how Wan2.1 pipelines sample).
    """
    levels, model_times = solver_times(solver, steps, shift, schedule)
    levels, model_times = levels.to(noise.device), model_times.to(noise.device)
    multistep = Multistep(solver, levels) if solver in MULTISTEP else None
    x = keep_given(noise, given)
    batch = noise.shape[0]
    for i in range(steps):
        t, t_next = levels[i], levels[i + 1]
        v = velocity(x, model_times[i].expand(batch))
        x0 = keep_given(predicted_x0(x, t.expand(batch), v), given)
        if on_step is not None:
            on_step(i, t, x0)
        if multistep is not None:
            x = keep_given(multistep.step(i, x, x0), given)
            continue
        x_next = keep_given(x + (t_next - t) * v, given)
        if solver == "heun" and t_next > 0:
            v_next = velocity(x_next, t_next.expand(batch))
            x_next = keep_given(x + (t_next - t) * 0.5 * (v + v_next), given)
        x = x_next
    return x
