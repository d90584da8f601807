"""Step caching for sampling: skip a DiT's blocks on steps where their output is predicted to change little.

TeaCache's observation (Liu et al., CVPR 2025): from one sampler step to the next, the change of the blocks'
residual (their output minus their input) follows the change of the timestep-modulated input, which costs
almost nothing to compute. So each call measures the relative L1 change of that input,

    d = mean |m_k - m_{k-1}| / mean |m_{k-1}|,   m = modulate(layer_norm(tokens), shift, scale of the time),

adds it to a running sum, and while the sum stays under the threshold it reuses the last computed residual
(tokens + residual) instead of running the blocks; when the sum reaches the threshold the blocks run, the
residual is stored and the sum starts again. The first and last calls of a run always compute. Each video
of a batch (and each half of a guided pair) decides on its own sum, so a video's result does not depend on
what else is in its batch. Threshold 0 is off: the model is not touched and the output is bit for bit the
uncached one. The modulated input here leaves out each block's own modulation table, so it reads only the
shared time modulation and the tokens, which any DiT3D (ours or Wan's, sharded or compiled) has outside its
blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .model import DiT3D, modulate


@dataclass
class StepCache:
    threshold: float
    calls: int  # model calls the run will make (the last always computes)
    computed: list[int] = field(default_factory=list)  # per call: how many of the batch's rows ran the blocks
    rows: list[int] = field(default_factory=list)  # per call: the batch's rows
    _prev: torch.Tensor | None = None  # the last call's modulated input (B, N, width), float32
    _acc: torch.Tensor | None = None  # (B,) running sum of relative changes
    _residual: torch.Tensor | None = None  # (B, N, width) the blocks' last computed output minus input

    def report(self) -> dict:
        """The run's model calls, block passes (one per batch row per call) and how many of those ran."""
        return {"threshold": self.threshold, "calls": len(self.rows), "passes": sum(self.rows),
                "passes_run": sum(self.computed)}

    def run(self, blocks, h, shared, cos, sin, txt, text_mask, token_mask) -> torch.Tensor:
        """DiT3D.run_blocks with caching; `blocks` is the uncached one."""
        probe = modulate(F.layer_norm(h.float(), h.shape[-1:], eps=1e-6), shared[:, 0].float(), shared[:, 1].float())
        b = h.shape[0]
        fresh = self._prev is None or self._prev.shape != probe.shape or len(self.rows) + 1 >= self.calls
        if fresh:
            need = torch.ones(b, dtype=torch.bool, device=h.device)
            self._acc = torch.zeros(b, device=h.device)
        else:
            change = (probe - self._prev).abs().mean((1, 2)) / self._prev.abs().mean((1, 2)).clamp_min(1e-12)
            self._acc = self._acc + change
            need = self._acc >= self.threshold
        self._prev = probe
        self.rows.append(b)
        self.computed.append(int(need.sum()))
        if bool(need.all()):
            out = blocks(h, shared, cos, sin, txt, text_mask, token_mask)
            self._residual = out - h
        else:
            out = h + self._residual.to(h.dtype)
            if bool(need.any()):
                idx = need.nonzero().squeeze(1)
                pick = lambda x: None if x is None else x[idx]  # noqa: E731
                batched = cos.ndim == 3  # per-clip rotary tables (forward_varlen) or one for the batch
                part = blocks(h[idx], shared[idx], pick(cos) if batched else cos, pick(sin) if batched else sin,
                              txt[idx], pick(text_mask), pick(token_mask))
                out[idx] = part
                self._residual[idx] = (part - h[idx]).to(self._residual.dtype)
        self._acc = torch.where(need, torch.zeros_like(self._acc), self._acc)
        return out


@contextmanager
def step_cache(model: DiT3D, threshold: float, calls: int) -> Iterator[StepCache | None]:
    """Within the block, `model` caches its blocks' residual across calls (see the module's docstring); yields
    the StepCache (its report) or None when threshold is 0 (off: the model untouched)."""
    if not threshold > 0:
        yield None
        return
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model inside
    cache = StepCache(float(threshold), calls)
    uncached = model.run_blocks
    model.run_blocks = lambda *args: cache.run(uncached, *args)
    try:
        yield cache
    finally:
        del model.run_blocks  # the class's method again
