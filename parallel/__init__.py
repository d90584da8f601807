"""Running models on many processes: process groups, Ulysses sequence parallelism, and `parallelize`, which
applies sequence parallelism, activation checkpointing, compile and DDP / FSDP2 in one fixed order."""

from .parallelize import (ParallelOptions, apply_activation_checkpointing, compile_blocks, data_parallel, parallelize,
                          unsharded, unwrap)
from .process_groups import Env, all_reduce_sum, barrier, run_command, setup_distributed, teardown_distributed
from .ulysses import UlyssesAttend, UlyssesLayout, apply_sequence_parallel

__all__ = ["Env", "ParallelOptions", "UlyssesAttend", "UlyssesLayout", "all_reduce_sum", "apply_activation_checkpointing",
           "apply_sequence_parallel", "barrier", "compile_blocks", "data_parallel", "parallelize", "run_command",
           "setup_distributed",
           "teardown_distributed", "unsharded", "unwrap"]
