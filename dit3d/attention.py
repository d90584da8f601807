"""One attention function, three backends.

    out = attention(q, k, v, backend="sdpa", key_mask=None)   # q (B, heads, N, D), k/v (B, heads, L, D)

| backend     | where                | kernels                                        | key_mask (padding, variable length)       |
|-------------|----------------------|------------------------------------------------|-------------------------------------------|
| `sdpa`      | everywhere (default) | PyTorch picks flash / cuDNN / memory-efficient | boolean mask broadcast as (B, 1, 1, L)    |
| `xformers`  | CUDA, if installed   | `memory_efficient_attention`                   | sequences packed under a BlockDiagonalMask |
| `reference` | tests                | plain softmax(QK^T / sqrt(D)) V in float32     | additive -inf bias                        |

None of them holds the full N x N score matrix of a long sequence: the fused kernels never form it, and
the reference computes it for blocks of 1024 queries at a time. `key_mask` is True for real keys;
each row must have at least one. A model resolves its backend once, when it is built (`resolve_backend`):
the config's, or the DIT3D_ATTENTION environment variable's when set; one that cannot run here falls back
to `sdpa` with one log line. `attention` itself runs the backend it is given and reads no environment.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F

from errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("sdpa", "xformers", "reference")
_REFERENCE_BLOCK = 1024


def _xformers_problem() -> str | None:
    if not torch.cuda.is_available():
        return "xFormers' memory-efficient attention needs a CUDA device"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xformers is not installed ({e}); pip install '.[xformers]'"
    return None


def resolve_backend(requested: str) -> str:
    """The backend a model will run, decided once when it is built: DIT3D_ATTENTION overrides `requested`; one
    that cannot run on this machine falls back to sdpa, with one log line per call."""
    name = os.environ.get("DIT3D_ATTENTION") or requested
    if name not in BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    problem = _xformers_problem() if name == "xformers" else None
    if problem:
        log.warning("attention backend %r unavailable: %s; running 'sdpa'", name, problem)
        return "sdpa"
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q (B, heads, N, D) over k, v (B, heads, L, D) -> (B, heads, N, D), by
    `backend` as given (see `resolve_backend` for choosing one)."""
    if backend == "sdpa":
        mask = key_mask[:, None, None, :] if key_mask is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "xformers":
        if not q.is_cuda:
            raise ValueError("the xformers attention backend runs on CUDA tensors only; build the model with "
                             "attention_backend='sdpa' to run it elsewhere")
        return _xformers(q, k, v, key_mask)
    if backend == "reference":
        return _reference(q, k, v, key_mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _reference(q, k, v, key_mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    bias = None
    if key_mask is not None:
        bias = torch.zeros(key_mask.shape, dtype=torch.float32, device=q.device).masked_fill(~key_mask, float("-inf"))
        bias = bias[:, None, None, :]  # (B, 1, 1, L)
    out = []
    for i in range(0, q.shape[2], _REFERENCE_BLOCK):
        scores = q[:, :, i : i + _REFERENCE_BLOCK].float() @ k.float().transpose(-1, -2) * scale  # (B, h, block, L)
        if bias is not None:
            scores = scores + bias
        out.append(scores.softmax(-1) @ v.float())
    return torch.cat(out, dim=2).to(q.dtype)


def _xformers(q, k, v, key_mask):
    import xformers.ops as xops

    # xFormers takes (B, N, heads, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if key_mask is None:
        return xops.memory_efficient_attention(q, k, v).transpose(1, 2)
    # Variable length: pack every sample's queries and its real keys into one sequence; the block-diagonal
    # mask keeps each sample to itself. Real keys must come first in each row (padding at the end).
    b, n = q.shape[:2]
    kv_lens = key_mask.sum(1).tolist()
    if not torch.equal(key_mask, torch.arange(key_mask.shape[1], device=key_mask.device)[None] < key_mask.sum(1, keepdim=True)):
        raise ValueError("the xformers backend needs padding at the end of each key_mask row")
    mask = xops.fmha.BlockDiagonalMask.from_seqlens([n] * b, kv_lens)
    k_packed = torch.cat([k[i, :length] for i, length in enumerate(kv_lens)])[None]
    v_packed = torch.cat([v[i, :length] for i, length in enumerate(kv_lens)])[None]
    out = xops.memory_efficient_attention(q.reshape(1, b * n, *q.shape[2:]), k_packed, v_packed, attn_bias=mask)
    return out.reshape(b, n, *q.shape[2:]).transpose(1, 2)
