"""What a DiT3D step costs, from its shape alone: FLOPs, activation memory and sequence-parallel traffic.

One model for `sample.py --dry-run`, `bench/dit.py` (MFU) and `bench/scale.py` (MFU, all-to-all volume):

- FLOPs of one forward pass over S video tokens and L text tokens: every parameter is used once per video
  token (a multiply-add is 2 FLOPs: 2 N S), self-attention's QK^T and AV cost 2 x 2 S^2 d per block, and
  cross-attention's 2 x 2 S L d. A training step (forward + backward) is 3 forward passes. This is the
  6 N + 12 L d S per token of the scaling-law papers, plus the cross-attention term.
- Activation memory of inference, one block live at a time: about (6 + 2 x mlp_ratio) tensors of S x d.
- Ulysses all-to-all: per block, q, k and v go out stacked and the output comes back (4 tensors of S / P x d,
  (P - 1) / P of each to other ranks), twice that in training (the backward's exchanges).
"""

from __future__ import annotations

from .config import DiTConfig


def forward_flops(cfg: DiTConfig, params: int, tokens: int, text_tokens: int) -> dict[str, float]:
    """FLOPs of one forward pass of one clip: {"linear", "attention", "total"}."""
    linear = 2.0 * params * tokens
    attention = 4.0 * cfg.depth * cfg.width * tokens * (tokens + text_tokens)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def training_flops(cfg: DiTConfig, params: int, tokens: int, text_tokens: int) -> float:
    """FLOPs of one training step (forward and backward) of one clip."""
    return 3.0 * forward_flops(cfg, params, tokens, text_tokens)["total"]


def inference_activation_bytes(cfg: DiTConfig, tokens: int, batch: int, dtype_bytes: int) -> float:
    """Activations of one forward pass over `batch` clips (one block's live at a time)."""
    return batch * tokens * cfg.width * dtype_bytes * (6 + 2 * cfg.mlp_ratio)


def all_to_all_bytes(cfg: DiTConfig, tokens: int, ranks: int, batch: int, dtype_bytes: int, training: bool) -> float:
    """Bytes one rank of `ranks` sends per forward pass (or training step) in Ulysses' exchanges."""
    exchanges = 8 if training else 4
    return exchanges * cfg.depth * batch * (tokens / ranks) * cfg.width * dtype_bytes * (ranks - 1) / ranks
