"""3D rotary position embedding, split across (t, h, w).

The head dim d is cut into three even parts: height and width get 2 * (d // 6) channels each and time
the rest (as Wan does), and each part rotates its channel pairs by angles proportional to the token's
index along its own axis. Nothing is tied to a grid size, so any duration and resolution work at
inference.
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(n: int, dim: int, theta: float, device) -> torch.Tensor:
    """(n, dim // 2) angles for positions 0..n-1 on one axis."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(n, device=device, dtype=torch.float64), freqs)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Rotation angles (N, head_dim // 2) for the tokens of a (T, H, W) grid in raster order (t, h, w)."""
    t, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    at = _axis_angles(t, dt, theta, device)[:, None, None, :].expand(t, h, w, -1)
    ah = _axis_angles(h, dh, theta, device)[None, :, None, :].expand(t, h, w, -1)
    aw = _axis_angles(w, dw, theta, device)[None, None, :, :].expand(t, h, w, -1)
    return torch.cat([at, ah, aw], dim=-1).reshape(t * h * w, head_dim // 2)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    angles = rope_angles(grid, head_dim, theta, device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i + 1) of x (B, heads, N, head_dim) by the angles behind cos/sin (N, head_dim // 2)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, N, head_dim // 2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)
