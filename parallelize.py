"""Everything that changes how a model runs rather than what it computes, applied from outside the model.

Model files hold plain PyTorch modules. Training and sampling call these functions on them, in one place:
activation checkpointing per block now; DDP, FSDP2 and compile join here with the trainer.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, block_type: type[nn.Module]) -> int:
    """Recompute each `block_type` submodule's activations in the backward pass instead of storing them.

    Trades about one extra forward of each block for memory that no longer grows with depth. Returns the
    number of blocks wrapped.
    """
    wrapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, block_type):
                setattr(parent, name, checkpoint_wrapper(child, preserve_rng_state=True))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"no {block_type.__name__} modules to checkpoint in {type(model).__name__}")
    return wrapped
