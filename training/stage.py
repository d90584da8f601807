"""What the two training stages share: per-sample random streams, image steps, and autocast.

A stage (`TokenizerStage`, `DiTStage`) owns its model and loss; the loop (loop.py) owns everything else. It
provides: `model` (the module to train), `block_types` (its repeated blocks, for parallelize), `config_dict()`,
`initialize()` (a fresh run only), `tokens(batch)`, `loss(model, batch, step) -> (loss, logs)`,
`after_backward(step, last_micro, micro_batches) -> logs`, `state_dict()` / `load_state_dict()` (extra training
state, such as a discriminator), `preview(ema, batch) -> (items, logs)`, `finish(ema) -> logs` and
`export(ema, state, directory)`.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline import derived_seed


def sample_generator(seed: int, step: int, key: str, purpose: str = "") -> torch.Generator:
    """A CPU generator for one sample at one step: its noise, time and caption dropout depend on the sample
    and the step alone, not on how samples are spread over ranks and micro-batches, so 1 process with
    gradient accumulation and N processes with DDP take the same steps, and a resumed run repeats nothing."""
    return torch.Generator().manual_seed(derived_seed(seed, step, key, purpose))


def image_step(seed: int, step: int, prob: float) -> bool:
    """Whether this step trains on images (each clip's first frame): the same answer on every rank."""
    return prob > 0 and torch.rand((), generator=sample_generator(seed, step, "", "image")).item() < prob


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
