"""The optimiser, its LR schedule, and the EMA of the weights."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


def build_optimizer(model: nn.Module, args, device: torch.device):
    """AdamW (weight decay on matrices only; fused on CUDA) and a linear warm-up then constant or cosine LR."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=1e-8, fused=device.type == "cuda")
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
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return AveragedModel(model, multi_avg_fn=update).requires_grad_(False)
