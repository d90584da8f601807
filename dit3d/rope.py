"""Position in 3D, split across (t, h, w): rotary embedding, and optional absolute sine-cosine features.

The head dim d holds d / 2 rotating channel pairs, cut into three parts: height and width get d // 6
pairs each and time the rest (as Wan splits it), and each part rotates its pairs by angles
proportional to the token's index along its own axis. Which two channels form a pair is the model's choice:
channel i with channel i + d / 2 ("half", ours), or 2i with 2i + 1 ("adjacent", Wan's); pair j turns by angle
j either way. Rotary angles only tell attention how far apart two
tokens are; `sincos_position` gives each token where it is (the same angles' sines and cosines over the
model width), for models that add it to their tokens. Nothing is tied to a grid size, so any duration and
resolution work at inference.

Clips longer than the trained ones (`TimeScaling`): RIFLEx (Zhao et al., 2025) lowers the one time frequency
whose period is nearest the trained length (the "intrinsic" one, which otherwise makes the motion repeat) so
that its period covers the target; NTK-aware scaling raises the time axis's base by s^(d / (d - 2)) for s
times the trained length, stretching the slow frequencies and keeping the fastest; position interpolation
("pi", Chen et al., 2023) divides every time frequency by s, so that the target's token frames span the angles
the trained ones did. All leave the height and width axes alone, and change nothing at or below the trained
length. The absolute features can place time as a fraction of the clip (`sincos_position(time_fraction=True)`),
which any length shares: the first token frame at 0, the last at `FRACTION_SPAN`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

METHODS = ("riflex", "ntk", "pi")
FRACTION_SPAN = math.pi  # the time "position" of a clip's last token frame in fraction features (cos runs 1 to -1)


@dataclass(frozen=True)
class TimeScaling:
    """Rotary time frequencies for sampling `target` token frames with a model trained on `trained`."""

    method: str
    trained: int
    target: int

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"time extrapolation must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.trained < 1 or self.target < 1:
            raise ValueError(f"trained and target lengths must be positive, got {self.trained} and {self.target}")

    def frequencies(self, freqs: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
        """The time axis's (dim // 2) frequencies, changed for the target length."""
        if self.target <= self.trained:
            return freqs
        if self.method == "ntk":
            base = theta * (self.target / self.trained) ** (dim / (dim - 2)) if dim > 2 else theta
            return 1.0 / base ** (torch.arange(0, dim, 2, device=freqs.device, dtype=torch.float64) / dim)
        if self.method == "pi":
            return freqs * (self.trained / self.target)
        freqs = freqs.clone()
        k = int(torch.argmin((2 * math.pi / freqs - self.trained).abs()))  # the intrinsic frequency
        freqs[k] = min(float(freqs[k]), 0.9 * 2 * math.pi / self.target)  # its period now a little past the target
        return freqs


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(n: int, dim: int, theta: float, device, scaling: TimeScaling | None = None,
                 spacing: float = 1.0) -> torch.Tensor:
    """(n, dim // 2) angles for positions 0, spacing, ..., (n - 1) spacing on one axis (the time axis's changed
    by `scaling`)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    if scaling is not None:
        freqs = scaling.frequencies(freqs, dim, theta)
    return torch.outer(torch.arange(n, device=device, dtype=torch.float64) * spacing, freqs)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None,
                time: TimeScaling | None = None, time_fraction: bool = False) -> torch.Tensor:
    """Rotation angles (N, head_dim // 2) for the tokens of a (T, H, W) grid in raster order (t, h, w); with
    time_fraction the time positions run from 0 to FRACTION_SPAN over the clip, whatever its length."""
    t, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    spacing = FRACTION_SPAN / max(t - 1, 1) if time_fraction else 1.0
    at = _axis_angles(t, dt, theta, device, time, spacing)[:, None, None, :].expand(t, h, w, -1)
    ah = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(t, h, w, -1)
    aw = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(t, h, w, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, head_dim // 2)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float, device, dtype,
                 pairs: str = "half", time: TimeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, head_dim) of the angles, laid out as `pairs` pairs the channels (see apply_rope): the
    angles repeated for both halves of the head dim ("half"), or each angle twice in a row ("adjacent").

    Cached per (grid, head_dim, theta, device, dtype): every forward pass of a clip size reuses them, where
    building them (in float64) cost about 6% of a small model's training step. Treat them as read-only."""
    return _cos_sin(tuple(int(n) for n in grid), int(head_dim), float(theta), torch.device(device), dtype, pairs, time)


@functools.lru_cache(maxsize=64)
def _cos_sin(grid, head_dim, theta, device, dtype, pairs, time=None):
    if pairs not in ("half", "adjacent"):
        raise ValueError(f"rotary pairs must be 'half' or 'adjacent', got {pairs!r}")
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable by autograd later
        angles = rope_angles(grid, head_dim, theta, device, time)  # (N, head_dim / 2)
        angles = torch.cat([angles, angles], dim=-1) if pairs == "half" else angles.repeat_interleave(2, dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: str = "half") -> torch.Tensor:
    """Rotate the channel pairs of x (B, N, heads, head_dim) by the angles behind cos/sin (N, head_dim) or
    (B, N, head_dim), built for the same `pairs`, the same for every head: pair (a, b) becomes
    (a cos - b sin, b cos + a sin).

    "half" pairs channel i with i + head_dim / 2 (two multiplies and a concatenation); "adjacent" pairs 2i with
    2i + 1, as Wan2.1 was trained. Which channels pair up does not matter, as long as it never changes.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (..., N, 1, head_dim): broadcast over the heads
    if pairs == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    else:
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)  # (..., head_dim / 2) each: channels 2i and 2i + 1
        rotated = torch.stack([-b, a], dim=-1).flatten(-2)
    return (x * cos + rotated * sin).type_as(x)


def sincos_position(grid: tuple[int, int, int], dim: int, theta: float, device, dtype,
                    time: TimeScaling | None = None, time_fraction: bool = False) -> torch.Tensor:
    """Absolute sine-cosine features (N, dim) of each token's (t, h, w) index in a grid of tokens in raster
    order, the channels split over the axes as `axis_dims` splits a head; with time_fraction, time is how far
    through the clip the token is (see rope_angles), and `time` does not apply. Built for any grid (no table),
    so any duration and size still work; cached like the rotary tables. Treat it as read-only."""
    return _sincos(tuple(int(n) for n in grid), int(dim), float(theta), torch.device(device), dtype,
                   None if time_fraction else time, bool(time_fraction))


@functools.lru_cache(maxsize=64)
def _sincos(grid, dim, theta, device, dtype, time=None, time_fraction=False):
    with torch.inference_mode(False), torch.no_grad():
        angles = rope_angles(grid, dim, theta, device, time, time_fraction)  # (N, dim / 2): t, h and w side by side
        per_axis = angles.split([d // 2 for d in axis_dims(dim)], dim=-1)
        return torch.cat([torch.cat([a.sin(), a.cos()], dim=-1) for a in per_axis], dim=-1).to(dtype)  # (N, dim)
