"""Ulysses sequence parallelism (as in DeepSpeed-Ulysses, xDiT and Open-Sora 2.0) for DiT3D.

Every video's tokens are split across a group of ranks. Each rank runs the norms, MLPs, modulation and text
cross-attention on its own contiguous slice of the sequence; around self-attention one all-to-all turns the
split by tokens into a split by heads (each rank attends over the whole sequence with heads / ranks of the
heads) and another turns it back; after the last block the output tokens are gathered. The data-parallel
wrapper (DDP or FSDP2) then spans all ranks: the ranks of a sequence group see the same samples, and since the
gather's backward sums their gradients, averaging over all ranks gives each sample's gradient exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from dit3d.model import Attend, TokenLayout
from errors import InputError


class _AllToAll(torch.autograd.Function):
    """x (P, ...) on each of the P ranks of `group`: slice j goes to rank j, and slice j of the result came
    from rank j. The same exchange carries the gradient back.

    Built on the public blocking collectives rather than torch.distributed's functional collectives: their
    AsyncCollectiveTensor path keeps a reference to the process group after destroy_process_group, so the
    group outlives its teardown, and gloo's worker threads then free the exchanged tensors while the
    interpreter is shutting down, which aborts the process (SIGABRT, "terminate called without an active
    exception") now and then at exit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # (a gradient can arrive strided); the collective reads and writes flat memory
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class _GatherTokens(torch.autograd.Function):
    """x (n, ...) on each of the P ranks of `group` -> (P n, ...), rank r's rows at [r n, (r + 1) n). Every
    rank computes its loss from the whole gathered tensor, so the gradient of rank r's rows is the sum over
    ranks of their gradients of those rows: a reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ranks = group, dist.get_world_size(group)
        out = x.new_empty((ranks * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


class UlyssesAttend(nn.Module):
    """Wraps a block's attention call: q, k, v (B, heads, N / P, D) on each of the P ranks of `group` ->
    all-to-all -> (B, heads / P, N, D) -> the wrapped attention over the whole sequence -> all-to-all back."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.inner, self.group, self.ranks = inner, group, dist.get_world_size(group)

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (..., H, n, D) -> send head group j to rank j -> receive every rank's n tokens of our heads: (..., H / P, P n, D)
        *lead, h, n, d = x.shape
        x = x.reshape(*lead, self.ranks, h // self.ranks, n, d).movedim(len(lead), 0).contiguous()  # (P, ..., H / P, n, D)
        x = _AllToAll.apply(x, self.group)  # dim 0 now: the source rank
        return x.movedim(0, -3).reshape(*lead, h // self.ranks, self.ranks * n, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        # (..., H / P, P n, D) -> send token slice j to rank j -> receive every rank's heads of our tokens: (..., H, n, D)
        *lead, hp, n_all, d = x.shape
        n = n_all // self.ranks
        x = x.reshape(*lead, hp, self.ranks, n, d).movedim(-3, 0).contiguous()  # (P, ..., H / P, n, D)
        x = _AllToAll.apply(x, self.group)  # dim 0 now: the source rank = head group
        # (..., n, P, H / P, D) in memory, returned as a (..., H, n, D) view: the layout the local kernels give,
        # so the block merges the heads without another copy
        k = len(lead)  # x: (P, ..., H / P, n, D) -> (..., n, P, H / P, D)
        x = x.permute(*range(1, k + 1), k + 2, 0, k + 1, k + 3)
        return x.reshape(*lead, n, self.ranks * hp, d).transpose(-3, -2)

    def forward(self, q, k, v, key_mask=None):
        # one exchange for q, k and v together (fewer, larger messages than three), then one back
        q, k, v = self._tokens_to_heads(torch.stack([q, k, v])).unbind(0)
        return self._heads_to_tokens(self.inner(q, k, v, key_mask))


class UlyssesLayout(nn.Module):
    """Gives rank r of the P ranks in `group` tokens [r N / P, (r + 1) N / P) of every sequence, with their
    rotary angles, and gathers the output tokens of all ranks after the last block."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        self.group, self.ranks, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.multiple = self.ranks

    def split(self, h, cos, sin):  # h (B, N, width), cos / sin (..., N, head_dim)
        n = h.shape[1]
        if n % self.ranks:
            raise InputError(f"sequence parallelism over {self.ranks} ranks needs a token count divisible by "
                             f"{self.ranks}, got {n} tokens: change the frame count or size, or --sp-size")
        part = slice(self.rank * n // self.ranks, (self.rank + 1) * n // self.ranks)
        return h[:, part], cos[..., part, :], sin[..., part, :]

    def gather(self, out):  # (B, N / P, C) -> (B, N, C); the backward sums the ranks' gradients of each slice
        gathered = _GatherTokens.apply(out.transpose(0, 1), self.group)  # (N, B, C)
        return gathered.transpose(0, 1)


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Ulysses sequence parallelism over `group` for a model built of `Attend` calls and one `TokenLayout`
    (DiT3D): swap in the wrappers above. Every rank of the group must then get the same inputs. Returns the
    number of attention calls wrapped; a head count that the group size does not divide is an InputError."""
    ranks = dist.get_world_size(group)
    wrapped, layouts = 0, 0
    for parent in list(model.modules()):
        heads = getattr(parent, "heads", None)
        for name, child in list(parent.named_children()):
            if isinstance(child, Attend):
                if heads is None or heads % ranks:
                    raise InputError(f"sequence parallelism over {ranks} ranks splits the attention heads across "
                                     f"them, but this model has {heads} heads: use an --sp-size that divides {heads}")
                setattr(parent, name, UlyssesAttend(child, group))
                wrapped += 1
            elif isinstance(child, TokenLayout):
                setattr(parent, name, UlyssesLayout(group))
                layouts += 1
    if not wrapped or layouts != 1:
        raise ValueError(f"{type(model).__name__} has {wrapped} attention calls and {layouts} token layouts; sequence "
                         f"parallelism needs a DiT3D (at least one Attend and exactly one TokenLayout)")
    return wrapped


