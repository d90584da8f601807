"""What the two training stages share: per-sample random streams, image steps, and the compute precision.

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


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype the training forward runs in under autocast (None: float32, no autocast). --precision auto: bf16
    on CUDA, float32 elsewhere; bf16: bf16 on any device (on a CPU with AMX or AVX512-BF16 a tokenizer step takes
    about two thirds of its float32 time, elsewhere longer); fp32: float32 even on CUDA. Weights, optimiser state
    and the losses stay float32 in every case."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device: torch.device, precision: str = "auto"):
    """Autocast to compute_dtype(device, precision); a no-op where that is float32."""
    dtype = compute_dtype(device, precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
