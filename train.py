#!/usr/bin/env python
"""Train the video tokenizer or the text-to-video DiT, from one CPU to many GPUs.

    # the quickstart: synthetic shards, the tiny tokenizer, then the tiny DiT, on the CPU; writes samples
    python train.py

    # one process (one GPU, or the CPU)
    python train.py --stage tokenizer --preset small --data shards/ --out runs/vae --frames 17 --size 128
    python train.py --stage dit --preset B --data shards/ --vae runs/vae/model --out runs/dit

    # one node, 8 GPUs (DDP; add --parallel fsdp for models that do not fit one GPU)
    torchrun --nproc_per_node 8 train.py --stage dit --preset XL --data shards/ --vae runs/vae/model --out runs/dit

    # several nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN \\
        train.py --stage dit ...

    # long clips: each clip's tokens split over 8 ranks (Ulysses sequence parallelism), FSDP2 over all ranks
    torchrun --nnodes 4 --nproc_per_node 8 ... train.py --stage dit --preset 1.3B --parallel fsdp --sp-size 8 ...

    # SLURM: one task per node, torchrun starts the GPU processes
    #   #SBATCH --nodes 4 --ntasks-per-node 1 --gpus-per-node 8
    #   head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    #   srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node 8 --rdzv_backend c10d \\
    #        --rdzv_endpoint "$head:29500" --rdzv_id "$SLURM_JOB_ID" train.py --stage dit ...

NCCL on CUDA, gloo on the CPU. The trainer itself is the `training` package (options, the two stages,
checkpoints, metrics, the loop); the quickstart is quickstart.py. Running again with the same --out resumes from its last checkpoint
(model, EMA, optimiser, scheduler, step, RNG and the data stream's position) and says so. SIGTERM
(preemption) writes a checkpoint before the process exits. The resolved configuration is written to
OUT/config.json, the metrics to OUT/metrics.jsonl, checkpoints to OUT/checkpoints/, the EMA weights
for sampling to OUT/model/ and preview videos to OUT/previews/.
"""

from __future__ import annotations

import sys

import quickstart
from parallel import run_command
from training.loop import train
from training.options import build_parser, check_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] == "quickstart":
        return quickstart.main(argv[1:])
    parser = build_parser()
    if not {"-h", "--help"} & set(argv) and not any(a == "--stage" or a.startswith("--stage=") for a in argv):
        parser.error("no --stage given: train on your data with `--stage {tokenizer,dit} --data SHARDS ...`, "
                     "or put the quickstart's options after its name (`python train.py quickstart --seed 1`)")
    args = parser.parse_args(argv)

    def checked_train():
        check_args(args)
        return train(args)

    return run_command(checked_train)[0]


if __name__ == "__main__":
    sys.exit(main())
