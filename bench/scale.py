"""Scaling out: Ulysses sequence parallelism, with DDP or FSDP2 over the same ranks, at a fixed global token
count; and a memory model that says how long a clip fits per preset and --sp-size.

    python bench/scale.py [--presets tiny] [--tokens 4096] [--ranks 1 2] [--parallel ddp|fsdp]
                          [--checkpoint-activations] [--size 480 832] [--capacity-gb G] [--link-gbps 450]
                          [--device cpu|cuda] [--repeats 2] [--out bench/results/scale.json]

1. Measured. For each preset and rank count P: one training step (forward, backward, AdamW) on one clip of
   --tokens tokens (latent frames of 32 x 32 in 1x2x2 patches: 256 tokens each, 64 text tokens), its tokens
   split over the P ranks (--sp-size P), in fresh processes under torchrun (gloo on the CPU, NCCL on GPUs):
   seconds, tokens/s, memory per rank (held between steps: weights, optimiser state; and the step's own
   peak above that), and MFU: the step's FLOPs (dit3d/budget.py) over P ranks, against the measured peak of
   a large matmul on one device, in the same dtype (bf16 on CUDA, float32 on the CPU).
2. Memory model, from the one-rank runs at S and S / 2 tokens: memory per token (the slope) and the rest.
   The rest splits into 16 bytes per parameter (float32 weights, gradients and AdamW's two moments, which
   FSDP2 shards over the ranks) and an overhead that stays (the runtime, buffers). A rank of P then holds
   overhead + 16 N / P + per_token x S / P; the table gives the longest clip at --size that fits in
   --capacity-gb for P = 1, 2, 4, 8. Rows beyond the measured rank counts are projections and say so.
3. Throughput projection: t_P = t_1 / P + the all-to-all time, where each rank sends, per block and step,
   8 tensors (q, k, v and the output; forward and backward) of (S / P) x width, (P - 1) / P of each to
   other ranks, over --link-gbps (450 GB/s: an H200's NVLink). A projection: one GPU cannot measure it.
Prints tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, measure_in_subprocess, time_or_memory  # noqa: E402
from bench.dit import FRAME_TOKENS, matmul_peak_flops  # noqa: E402  (the same 32x32 latent frames as bench/dit.py)

TEXT_TOKENS = 64
STATE_BYTES_PER_PARAM = 16  # float32 weights, gradients and AdamW's two moments
PROJECTED_RANKS = (1, 2, 4, 8)


def measure(spec: dict) -> dict:
    """One rank's part of a measurement; rank 0 returns every rank's figures."""
    import torch
    import torch.distributed as dist

    from dit3d import DiT3D, preset
    from dit3d.budget import training_flops
    from dit3d.model import DiTBlock
    from parallel import ParallelOptions, parallelize, setup_distributed, teardown_distributed

    env = setup_distributed(spec["device"], spec["ranks"])
    device = env.device
    cuda = device.type == "cuda"
    torch.manual_seed(0)  # the same weights and inputs on every rank
    cfg = preset(spec["preset"])
    model = DiT3D(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, env, ParallelOptions((DiTBlock,), spec["parallel"], spec["checkpoint_activations"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randn(1, cfg.in_channels, spec["tokens"] // FRAME_TOKENS, 32, 32, device=device)
    t = torch.rand(1, device=device)
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(x, t, text).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)

    mine = time_or_memory(step, spec, device)
    everyone = [mine]
    if env.world > 1:
        everyone = [None] * env.world
        dist.all_gather_object(everyone, mine)
    result = {"params": params}
    if "seconds" in mine:
        seconds = max(r["seconds"] for r in everyone)  # the step ends when the slowest rank's does
        flops = training_flops(cfg, params, spec["tokens"], TEXT_TOKENS)
        peak = matmul_peak_flops(device, torch.bfloat16 if cuda else torch.float32)
        result |= {"seconds": seconds, "tokens_per_s": spec["tokens"] / seconds,
                   "mfu": flops / env.world / seconds / peak, "peak_tflops": peak / 1e12}
    else:
        result |= {"peak_mb": max(r["peak_mb"] for r in everyone), "held_mb": max(r["held_mb"] for r in everyone)}
    teardown_distributed(ok=True)
    return spec | result if env.main else {}


def memory_model(low: dict, high: dict, params: int) -> dict:
    """Fit per-token memory and the overhead from one-rank runs at two token counts (see the docstring)."""
    total = lambda r: r["held_mb"] + r["peak_mb"]  # noqa: E731  (PeakMemory's peak is above what was held)
    per_token = (total(high) - total(low)) / (high["tokens"] - low["tokens"])
    state = STATE_BYTES_PER_PARAM * params / 2**20
    overhead = total(high) - per_token * high["tokens"] - state
    return {"per_token_mb": per_token, "state_mb": state, "overhead_mb": overhead}


def longest_clip(model: dict, ranks: int, capacity_mb: float, frame_tokens: int) -> tuple[int, int]:
    """(tokens, frames) of the longest clip whose per-rank memory fits, frames = 1 + 4 (latent frames - 1)."""
    room = capacity_mb - model["overhead_mb"] - model["state_mb"] / ranks
    tokens = max(0, int(room / model["per_token_mb"] * ranks)) if model["per_token_mb"] > 0 else 0
    latent_frames = tokens // frame_tokens
    return tokens, (1 + 4 * (latent_frames - 1)) if latent_frames else 0



def capacity_mb(device: str) -> float:
    """A GPU's whole memory, or the memory the CPU machine has available (sample.py's reading of it)."""
    import torch

    from sample import free_memory_gb

    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    available = free_memory_gb(torch.device("cpu"))
    if available == float("inf"):
        raise SystemExit("error: cannot read the available memory; give --capacity-gb")
    return available * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=None, help="DiT presets (default: tiny on the CPU, S and 1.3B on CUDA)")
    parser.add_argument("--tokens", type=int, default=None, help="global tokens per clip (default 2048 CPU, 32768 CUDA)")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="process counts, each one sequence group (default: 1 2 on the CPU, the visible GPUs on CUDA)")
    parser.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    parser.add_argument("--checkpoint-activations", action="store_true")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 832], metavar=("H", "W"),
                        help="frame size in pixels for the longest-clip table (8x tokenizer, 2x2 patches)")
    parser.add_argument("--capacity-gb", type=float, default=None, help="memory per rank (default: this device's)")
    parser.add_argument("--link-gbps", type=float, default=450.0, help="all-to-all bandwidth per rank for the projection")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(json.loads(args.worker))
        if result:
            print(json.dumps(result))
        return
    import torch

    from dit3d import preset
    from dit3d.budget import all_to_all_bytes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    presets = args.presets or (["S", "1.3B"] if cuda else ["tiny"])
    tokens = args.tokens or (32768 if cuda else 2048)
    ranks = args.ranks or ([torch.cuda.device_count()] if cuda else [1, 2])
    ranks = sorted(set([1] + ranks))
    if tokens % (2 * FRAME_TOKENS):
        raise SystemExit(f"error: --tokens must be a multiple of {2 * FRAME_TOKENS} (two 32x32 latent frames), got {tokens}")
    for name in presets:
        heads = preset(name).heads
        if any(heads % r or tokens % r for r in ranks):
            raise SystemExit(f"error: every rank count must divide the {name} preset's {heads} heads and the "
                             f"{tokens} tokens; got {ranks}")
    base = {"device": device, "parallel": args.parallel, "checkpoint_activations": args.checkpoint_activations,
            "repeats": args.repeats}
    capacity = args.capacity_gb * 1024 if args.capacity_gb else capacity_mb(device)
    frame_tokens = (args.size[0] // 16) * (args.size[1] // 16)
    dtype_bytes = 2 if cuda else 4
    runs, models = [], {}
    for name in presets:
        for n in ranks:
            spec = base | {"preset": name, "tokens": tokens, "ranks": n}
            runs.append(spec | measure_in_subprocess(__file__, spec, nproc=n))
            r = runs[-1]
            print(f"  {name} on {n} rank(s): {r['tokens_per_s']:.0f} tokens/s, {r['held_mb'] + r['peak_mb']:.0f} MB per rank",
                  file=sys.stderr)
        spec = base | {"preset": name, "tokens": tokens // 2, "ranks": 1}
        half = spec | measure_in_subprocess(__file__, spec)
        one = next(r for r in runs if r["preset"] == name and r["ranks"] == 1)
        models[name] = memory_model(half, one, one["params"])

    def one_rank(name):
        return next(r for r in runs if r["preset"] == name and r["ranks"] == 1)

    rows = []
    for r in runs:
        rows.append([r["preset"], r["ranks"], tokens, tokens // r["ranks"], f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / one_rank(r['preset'])['tokens_per_s']:.2f}x", f"{100 * r['mfu']:.1f}%",
                     f"{r['held_mb']:.0f}", f"{r['peak_mb']:.0f}"])
    print(f"\nMeasured: one training step of one {tokens}-token clip split over P ranks (--sp-size P, {args.parallel}), "
          f"{device}{', activation checkpointing' if args.checkpoint_activations else ''}; matmul peak "
          f"{runs[0]['peak_tflops']:.2f} TFLOP/s per device")
    print(markdown_table(["preset", "ranks P", "tokens", "tokens per rank", "step s", "tokens/s", "vs 1 rank", "MFU",
                          "held MB per rank", "step peak MB per rank"], rows))

    longest, projection = [], []
    for name in presets:
        cfg, m, t1 = preset(name), models[name], one_rank(name)["seconds"]
        for p in PROJECTED_RANKS:
            n, frames = longest_clip(m, p, capacity, frame_tokens)
            kind = "measured model" if p in ranks else "projection"
            longest.append({"preset": name, "ranks": p, "tokens": n, "frames": frames, "kind": kind})
            exchange = all_to_all_bytes(cfg, tokens, p, 1, dtype_bytes, training=True)
            tp = t1 / p + exchange / (args.link_gbps * 1e9)
            measured = next((r["tokens_per_s"] for r in runs if r["preset"] == name and r["ranks"] == p), None)
            projection.append({"preset": name, "ranks": p, "all_to_all_mb": exchange / 2**20, "tokens_per_s": tokens / tp,
                               "efficiency": t1 / p / tp, "measured_tokens_per_s": measured})
    print(f"\nMemory model (from the one-rank runs at {tokens // 2} and {tokens} tokens; FSDP2 shards the "
          f"{STATE_BYTES_PER_PARAM} bytes per parameter of state): longest clip at {args.size[0]}x{args.size[1]} "
          f"({frame_tokens} tokens per latent frame) in {capacity / 1024:.1f} GiB per rank")
    print(markdown_table(["preset", "MB per 1k tokens", "state MB", "overhead MB"] + [f"P={p}" for p in PROJECTED_RANKS],
                         [[name, f"{1000 * models[name]['per_token_mb']:.1f}", f"{models[name]['state_mb']:.0f}",
                           f"{models[name]['overhead_mb']:.0f}"]
                          + [f"{x['frames']} frames ({x['tokens']:,} tokens){'' if x['kind'] == 'measured model' else ' *'}"
                             for x in longest if x["preset"] == name] for name in presets]))
    print("* projection: more ranks than were measured")
    print(f"\nProjected tokens/s for the {tokens}-token clip: t_1 / P + all-to-all volume at {args.link_gbps:g} GB/s "
          f"(a projection; measured where that many ranks ran)")
    print(markdown_table(["preset", "P", "all-to-all MB per rank per step", "projected tokens/s", "efficiency",
                          "measured tokens/s"],
                         [[x["preset"], x["ranks"], f"{x['all_to_all_mb']:.1f}", f"{x['tokens_per_s']:.0f}",
                           f"{100 * x['efficiency']:.0f}%",
                           "" if x["measured_tokens_per_s"] is None else f"{x['measured_tokens_per_s']:.0f}"]
                          for x in projection]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(),
               "gpu": torch.cuda.get_device_name(0) if cuda else None}
    args.out.write_text(json.dumps({"machine": machine, "args": base | {"tokens": tokens, "size": args.size,
                                    "capacity_mb": capacity, "link_gbps": args.link_gbps, "ranks": ranks},
                                    "measured": runs, "memory_model": models, "longest_clip": longest,
                                    "projection": projection}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
