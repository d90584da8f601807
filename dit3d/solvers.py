"""Multistep solvers of the flow ODE in data-prediction form: UniPC (Zhao et al., 2023) and DPM-Solver++(2M)
(Lu et al., 2022), the samplers Wan2.1 and most diffusers video pipelines run.

On the flow path x_t = (1 - s) x0 + s noise (s the noise level, `t` elsewhere in dit3d.flow) the "signal" is
alpha = 1 - s and the "noise" sigma = s, so lambda(s) = log((1 - s) / s), the log signal-to-noise ratio, is the
variable these solvers step in. Each step turns the model's velocity into its clean prediction
x0 = x_s - s v and combines it with the clean predictions of the last steps; one model call per step, second
order from the second step (UniPC adds a corrector that reuses the next call, so it costs nothing extra).

The arithmetic follows diffusers' UniPCMultistepScheduler (solver_type "bh2", predict_x0) and
DPMSolverMultistepScheduler ("dpmsolver++", "midpoint"), both with flow sigmas, lower_order_final and a zero
final sigma, so that on diffusers' own time grid (`flow_times`) the same model outputs give the same samples.
The coefficients are computed in float64 from the grid; the tensors keep the sample's dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MULTISTEP = ("unipc", "dpm++")
_EDGE = 1e-6  # noise levels within this of 1 are moved to 1 - _EDGE for lambda (finite at the start)


def flow_times(solver: str, steps: int, shift: float, train_steps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise levels (steps + 1,), model times (steps,)) as diffusers' scheduler of `solver` places them with
    use_flow_sigmas and flow_shift=shift: the levels the solver steps between (float32, ending at 0) and the
    times the pipeline gives the model (its integer timesteps / train_steps)."""
    if steps < 1:
        raise ValueError(f"the sampler needs at least 1 step, got {steps}")
    if solver == "unipc":
        s = np.linspace(1, 1 / train_steps, steps + 1)[:-1]
        s = shift * s / (1 + (shift - 1) * s)
        if abs(s[0] - 1) < _EDGE:
            s[0] -= _EDGE
    elif solver == "dpm++":
        s = 1.0 - np.linspace(1, 1 / train_steps, steps + 1)
        s = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
    else:
        raise ValueError(f"diffusers' flow grid is defined here for {', '.join(MULTISTEP)}, not {solver!r}")
    levels = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    model_times = torch.from_numpy((s * train_steps).astype(np.int64)).double() / train_steps  # int64: truncated
    return levels, model_times.float()


def _lam(s: float) -> float:
    """log SNR of noise level s; +inf at s = 0."""
    s = min(s, 1 - _EDGE)
    return math.inf if s <= 0 else math.log((1 - s) / s)


class Multistep:
    """One solver run over the noise levels `levels` (steps + 1, from noise to 0): call step(i, x, x0) once per
    step with the sample at levels[i] and the model's clean prediction there; it returns the sample at
    levels[i + 1]."""

    def __init__(self, solver: str, levels: torch.Tensor, order: int = 2):
        if solver not in MULTISTEP:
            raise ValueError(f"solver must be one of {', '.join(MULTISTEP)}, got {solver!r}")
        if not 1 <= order <= (3 if solver == "unipc" else 2):
            raise ValueError(f"{solver} runs at order 1 to {3 if solver == 'unipc' else 2}, got {order}")
        self.solver, self.order = solver, order
        self.s = [float(v) for v in levels.double()]
        self.lam = [_lam(v) for v in self.s]
        self.steps = len(self.s) - 1
        self.outputs: list[torch.Tensor] = []  # clean predictions, oldest first (at most `order` kept)
        self.last: tuple[torch.Tensor, int] | None = None  # UniPC: the sample before the last prediction, its order

    def _alpha_sigma(self, i: int) -> tuple[float, float]:
        s = min(self.s[i], 1 - _EDGE) if i < self.steps else self.s[i]
        return 1 - s, s

    def step(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.solver == "dpm++":
            return self._dpm(i, x, x0)
        if self.last is not None:  # UniC: correct the sample at levels[i] with the prediction made there
            x = self._unipc(i - 1, *self.last, m_next=x0)
        self.outputs = (self.outputs + [x0])[-self.order:]
        order = min(self.order, self.steps - i, i + 1)
        self.last = (x, order)
        return self._unipc(i, x, order)

    def _unipc(self, i: int, x: torch.Tensor, order: int, m_next: torch.Tensor | None = None) -> torch.Tensor:
        """UniP from levels[i] to levels[i + 1] with the clean predictions up to step i (`m_next` None), or UniC:
        the same step corrected with the prediction at levels[i + 1]. bh2, predict_x0, as diffusers."""
        ms = self.outputs
        m0 = ms[-1]
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        _, sigma_s = self._alpha_sigma(i)
        h = self.lam[i + 1] - self.lam[i]
        hh = -h
        rks = [(self.lam[i - k] - self.lam[i]) / h for k in range(1, order)] + [1.0]
        d1s = [(ms[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]
        h_phi_1 = math.expm1(hh)
        b_h = h_phi_1
        h_phi_k = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0
        rows, b, fact = [], [], 1
        for k in range(1, order + 1):
            rows.append([r ** (k - 1) for r in rks])
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = (h_phi_k / hh if math.isfinite(hh) else 0.0) - 1 / fact
        R, b = np.array(rows), np.array(b)
        base = (sigma_t / sigma_s) * x - (alpha_t * h_phi_1) * m0
        if m_next is None:
            if not d1s:
                return base
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            return base - (alpha_t * b_h) * sum(float(r) * d for r, d in zip(rhos, d1s))
        rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
        corr = sum((float(r) * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + float(rhos[-1]) * (m_next - m0)
        return base - (alpha_t * b_h) * corr

    def _dpm(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """DPM-Solver++ (multistep, midpoint): first order at the first and last step, second order between."""
        self.outputs = (self.outputs + [x0])[-2:]
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        _, sigma_s = self._alpha_sigma(i)
        h = self.lam[i + 1] - self.lam[i]
        phi = math.expm1(-h)  # exp(-h) - 1
        base = (sigma_t / sigma_s) * x.float() - (alpha_t * phi) * x0.float()
        if self.order == 1 or i == 0 or i == self.steps - 1:
            return base.to(x0.dtype)
        r0 = (self.lam[i] - self.lam[i - 1]) / h
        d1 = (self.outputs[-1] - self.outputs[-2]).float() / r0
        return (base - (0.5 * alpha_t * phi) * d1).to(x0.dtype)
