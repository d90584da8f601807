"""Everything that changes how a model runs rather than what it computes, applied from outside the model by
one call (as torchtitan's parallelize.py):

    model = parallelize(model, env, ParallelOptions(strategy="fsdp", checkpoint_activations=True))

in a fixed order: Ulysses sequence parallelism (when env has a sequence group; see ulysses.py), activation
checkpointing, `torch.compile` per block, then data parallelism, either DDP (a full replica per rank,
gradients all-reduced) or FSDP2 (`fully_shard` on every block, then on the root: parameters, gradients and
optimiser state sharded across ranks, each block's parameters gathered just before it runs; on CUDA in bf16,
with gradients reduced in float32). Training, sampling and the benchmarks all call it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel

from .process_groups import Env
from .ulysses import apply_sequence_parallel


@dataclass(frozen=True)
class ParallelOptions:
    block_types: tuple[type[nn.Module], ...]  # the repeated blocks: checkpointed, compiled, sharded one by one
    strategy: str = "none"  # ddp | fsdp | none (one process needs none, whatever is asked)
    checkpoint_activations: bool = False  # recompute each block in backward instead of storing its activations
    compile: bool = False  # torch.compile each block
    # FSDP2's parameter dtype for compute ("auto": bf16 on CUDA, as autocast there, else the parameters' own)
    param_dtype: torch.dtype | str | None = "auto"


def parallelize(model: nn.Module, env: Env, options: ParallelOptions) -> nn.Module:
    """`model` made ready to run on `env` (see the module docstring for the order); returns the module to call:
    a DDP wrapper, or the model itself (FSDP2 and one process)."""
    if env.sp > 1:
        apply_sequence_parallel(model, env.sp_group)
    if options.checkpoint_activations:
        apply_activation_checkpointing(model, options.block_types)
    if options.compile:
        compile_blocks(model, options.block_types)
    strategy = options.strategy if env.world > 1 else "none"
    param_dtype = options.param_dtype
    if param_dtype == "auto":
        param_dtype = torch.bfloat16 if env.device.type == "cuda" else None
    return data_parallel(model, strategy, options.block_types, env.device, param_dtype)


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """Recompute each `block_types` submodule's activations in the backward pass instead of storing them.

    Trades about one extra forward of each block for memory that no longer grows with depth. Returns the
    number of blocks wrapped.
    """
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, block_types):
                setattr(parent, name, checkpoint_wrapper(child, preserve_rng_state=True))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no {_names(block_types)} modules to checkpoint in {type(model).__name__}")
    return wrapped


def compile_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> int:
    """`torch.compile` each `block_types` submodule on its own: identical blocks share one compiled graph,
    and compile time stays flat in depth. Returns the number of blocks compiled."""
    compiled = 0
    for module in model.modules():
        if isinstance(module, block_types):
            module.compile()
            compiled += 1
    if not compiled:
        raise ValueError(f"no {_names(block_types)} modules to compile in {type(model).__name__}")
    return compiled


def data_parallel(model: nn.Module, strategy: str, block_types: tuple[type[nn.Module], ...] = (),
                  device: torch.device | None = None, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `model` for data-parallel training over the default process group.

    strategy "ddp": DistributedDataParallel (returns the wrapper; the model is `.module`).
    strategy "fsdp": FSDP2; every `block_types` submodule becomes its own shard group, then the root;
      `param_dtype` (bf16 on CUDA) is the dtype blocks compute in, with gradients reduced in float32.
      Returns the model itself, its parameters now DTensors.
    strategy "none" or a single process: the model unchanged.
    """
    if strategy not in ("ddp", "fsdp", "none"):
        raise ValueError(f"data-parallel strategy must be ddp, fsdp or none, got {strategy!r}")
    if strategy == "none" or not (dist.is_available() and dist.is_initialized()):
        return model
    if strategy == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, block_types)]
    if not blocks:
        raise ValueError(f"FSDP2 needs blocks to shard one by one; no {_names(block_types)} in {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Within the block, every FSDP2-sharded part of `model` holds its full parameters, so that its methods
    other than forward (a tokenizer's encode and decode) can run; resharded after. Nothing for other models.
    A forward of the root gathers them itself: prefer calling the model as a whole where one can."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield model
    finally:
        for m in sharded:
            m.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _names(block_types: tuple[type[nn.Module], ...]) -> str:
    return ", ".join(t.__name__ for t in block_types) or "(no block types given)"
