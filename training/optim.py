"""The optimiser, its LR schedule, and the EMA of the weights."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def adamw(params, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel on CUDA and on the CPU (one kernel for every tensor: on the CPU 0.6 ms
    a step for the tiny tokenizer's 45 tensors against 4 ms for the per-tensor loop, 3 ms against 14 for the
    quickstart's DiT)."""
    return torch.optim.AdamW(params, fused=device.type in ("cuda", "cpu"), **kwargs)


def build_optimizer(model: nn.Module, args, device: torch.device):
    """AdamW (weight decay on matrices only; fused) and a linear warm-up then constant or cosine LR."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = adamw(groups, device, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8)
    main_steps = max(1, args.steps - args.warmup)
    if args.schedule == "cosine":
        after = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=main_steps, eta_min=args.lr * args.min_lr_ratio)
    else:
        after = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    if args.warmup > 0:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / args.warmup, end_factor=1.0, total_iters=args.warmup)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, after], milestones=[args.warmup])
    else:
        sched = after
    return opt, sched


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights (torch.optim.swa_utils.AveragedModel; a copy, no
    gradients). Its decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (the num_updates rule of
    TensorFlow's ExponentialMovingAverage), so that in short runs the average is not dominated by the random
    initial weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        n = float(num_averaged)
        pairs = [(a, c) for a, c in zip(averaged, current) if _address(a) != _address(c)]  # frozen: shared, skip
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1 - min(decay, (1 + n) / (10 + n)))

    ema = AveragedModel(model, multi_avg_fn=update).requires_grad_(False)
    share_frozen(ema.module, model)
    return ema


def _address(t: torch.Tensor) -> int:
    """Where a tensor's data lives (a sharded DTensor's: its local shard's; DTensor.data_ptr() is not that)."""
    return (t.to_local() if hasattr(t, "to_local") else t).data_ptr()


def share_frozen(copy: nn.Module, model: nn.Module) -> None:
    """Point `copy`'s parameters at `model`'s wherever the model's are frozen (LoRA's base weights): frozen
    weights never change, so their average is themselves, and a second copy of a 1.3B or 14B model would
    only take memory."""
    originals = dict(model.named_parameters())
    for module_name, module in copy.named_modules():
        for name, param in list(module._parameters.items()):
            original = originals.get(f"{module_name}.{name}" if module_name else name)
            if param is not None and original is not None and not original.requires_grad:
                module._parameters[name] = original
