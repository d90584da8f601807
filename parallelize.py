"""Everything that changes how a model runs rather than what it computes, applied from outside the model.

Model files hold plain PyTorch modules. Training and sampling call these functions on them, in one place
(as torchtitan's parallelize.py): activation checkpointing and `torch.compile` per block, then data
parallelism, either DDP (a full replica per rank, gradients all-reduced) or FSDP2 (`fully_shard` on every
block, then on the root: parameters, gradients and optimiser state sharded across ranks, each block's
parameters gathered just before it runs).

Sequence parallelism (Ulysses, as in DeepSpeed-Ulysses, xDiT and Open-Sora 2.0) splits every video's tokens
across a group of ranks. Each rank runs the norms, MLPs, modulation and text cross-attention on its own
contiguous slice of the sequence; around self-attention one all-to-all turns the split by tokens into a
split by heads (each rank attends over the whole sequence with heads / ranks of the heads) and another turns
it back; after the last block the output tokens are gathered. The data-parallel wrapper (DDP or FSDP2) then
spans all ranks: the ranks of a sequence group see the same samples, and since the gather's backward sums
their gradients, averaging over all ranks gives each sample's gradient exactly once.

Order matters and is fixed here: sequence parallelism, then checkpointing, then compile, then DDP or FSDP2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    sp: int = 1  # ranks per sequence-parallel group (they share samples and split each one's tokens)
    sp_group: object = None  # that group (a torch.distributed ProcessGroup) when sp > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica this rank is: the ranks of one sequence group read the same samples."""
        return self.rank // self.sp

    @property
    def dp_world(self) -> int:
        return self.world // self.sp


def setup_distributed(device_arg: str, sp: int = 1) -> Env:
    """One process per GPU under torchrun (NCCL), or per CPU worker (gloo); a plain process otherwise.

    With sp > 1 the ranks form a 2D mesh (data parallel x sequence parallel): consecutive ranks
    (one node's GPUs first, where the all-to-all is fastest) make up each sequence group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if sp < 1 or world % sp:
        raise SystemExit(f"error: --sp-size {sp} must divide the number of processes ({world}); launch a multiple "
                         f"of {sp} processes with torchrun, or change --sp-size")
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_arg)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    sp_group = None
    if sp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
        sp_group = mesh.get_group("sp")
    return Env(rank, world, local_rank, device, sp, sp_group)


def teardown_distributed(ok: bool) -> None:
    """Destroys the process group, if there is one. After a successful run (`ok`) every rank first waits for
    the others, so none tears gloo or NCCL down while a peer is still in a collective; after an error it does
    not wait, since a peer that died would never arrive at the barrier."""
    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


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
            raise ValueError(f"sequence parallelism over {self.ranks} ranks needs a token count divisible by "
                             f"{self.ranks}, got {n} tokens: change the frame count or size, or --sp-size")
        part = slice(self.rank * n // self.ranks, (self.rank + 1) * n // self.ranks)
        return h[:, part], cos[..., part, :], sin[..., part, :]

    def gather(self, out):  # (B, N / P, C) -> (B, N, C); the backward sums the ranks' gradients of each slice
        gathered = _GatherTokens.apply(out.transpose(0, 1), self.group)  # (N, B, C)
        return gathered.transpose(0, 1)


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Ulysses sequence parallelism over `group` for a model built of `Attend` calls and one `TokenLayout`
    (DiT3D): swap in the wrappers above. Every rank of the group must then get the same inputs. Returns the
    number of attention calls wrapped; a head count that the group size does not divide is a ValueError."""
    from dit3d.model import Attend, TokenLayout

    ranks = dist.get_world_size(group)
    wrapped, layouts = 0, 0
    for parent in list(model.modules()):
        heads = getattr(parent, "heads", None)
        for name, child in list(parent.named_children()):
            if isinstance(child, Attend):
                if heads is None or heads % ranks:
                    raise ValueError(f"sequence parallelism over {ranks} ranks splits the attention heads across "
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


def compile_blocks(model: nn.Module, block_type: type[nn.Module]) -> int:
    """`torch.compile` each `block_type` submodule on its own: identical blocks share one compiled graph,
    and compile time stays flat in depth. Returns the number of blocks compiled."""
    compiled = 0
    for module in model.modules():
        if isinstance(module, block_type):
            module.compile()
            compiled += 1
    if not compiled:
        raise ValueError(f"no {block_type.__name__} modules to compile in {type(model).__name__}")
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
        names = ", ".join(t.__name__ for t in block_types) or "none given"
        raise ValueError(f"FSDP2 needs blocks to shard one by one; no {names} in {type(model).__name__}")
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP wrapper (FSDP2 modules are their own model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
