"""Processes and their groups: one process per GPU under torchrun (NCCL), or per CPU worker (gloo), as a
data-parallel x sequence-parallel mesh; and its teardown.

    env = setup_distributed("auto", sp=2)   # Env: rank, world, device, and the sequence group
    ...
    teardown_distributed(ok=True)
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from cpu_allocator import keep_freed_memory
from cpu_math import strict_cpu_math
from errors import InputError, Interrupted

T = TypeVar("T")


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
        raise InputError(f"--sp-size {sp} must divide the number of processes ({world}); launch a multiple "
                         f"of {sp} processes with torchrun, or change --sp-size")
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda, but no CUDA device is visible; use --device cpu")
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


def run_command(command: Callable[[], T]) -> tuple[int, T | None]:
    """An entry point's work, run as every command runs it: (0, its result); or, for bad input (InputError),
    the message as one line on stderr and (2, None). Under torchrun every rank returns 2 and rank 0 alone
    prints the line, so it is said once. Anything else keeps its traceback. The process group, if there is
    one, is torn down either way. Freed CPU memory is kept for reuse (cpu_allocator), and the CPU's matrix products
    give the same floats in any batch (cpu_math)."""
    keep_freed_memory()
    strict_cpu_math()
    ok = False
    try:
        result = command()
        ok = True
        return 0, result
    except InputError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(interrupted_line(e), file=sys.stderr)
        return 130, None
    finally:
        teardown_distributed(ok)


def interrupted_line(e: KeyboardInterrupt) -> str:
    """The one line a command ends with on Ctrl-C: what it kept (an `Interrupted` says), else that every file it
    wrote is whole (each is written under a temporary name and renamed)."""
    if isinstance(e, Interrupted) and str(e):
        return str(e)
    return "interrupted (Ctrl-C): stopped; every file written so far is complete, nothing is half-written"


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over all ranks of a few numbers (one collective; the values themselves on a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()
