"""Fine-tuning a 1.3B DiT: LoRA (peft) against full fine-tuning, side by side, one fresh process each.

    python bench/finetune.py                                   # CPU: the 1.3B preset, 256 tokens, float32
    python bench/finetune.py --device cuda --tokens 8192       # GPU: 8k tokens, bf16 autocast, tokens/s and MFU
    python bench/finetune.py --modes full lora --rank 16 --repeats 3 --out bench/results/finetune.json

One optimiser step as train.py takes it (weights in float32, AdamW over the trainable parameters, bf16 autocast
on CUDA, flow-matching loss against random targets) on random latents of 16 channels (latent frames of 16x16
on the CPU, 32x32 on the GPU; as many frames as the token count needs; patch 1x2x2) with 512 text tokens of
width 4096 (Wan's UMT5 padding), random weights of the preset (Wan2.1 1.3B's shape). Per mode: trainable
parameters, seconds per step (median of --repeats after a warm-up step), tokens/s, the memory held between
steps (weights, optimiser state) and the peak during a step (PeakMemory: the process's resident memory on the
CPU, the allocator's on CUDA), and on CUDA the model FLOPs per second and MFU against a bf16 matmul measured
in the same process. FLOPs: dit3d/budget.py's forward; full fine-tuning's step counts 3 forwards, LoRA's 2
(the frozen layers compute no weight gradients; the adapters' own work is under 1%), and one more with
--checkpoint-activations (the recomputed forward). Prints a table with
the LoRA / full ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402

TEXT_TOKENS = 512


def latent_shape(tokens: int, frame_side: int) -> tuple[int, int, int, int]:
    """(16, T, H, W) latents with `tokens` tokens of patch 1x2x2 on frames of frame_side x frame_side."""
    per_frame = (frame_side // 2) ** 2
    if tokens % per_frame:
        raise SystemExit(f"--tokens must be a multiple of {per_frame} (one {frame_side}x{frame_side} latent frame)")
    return 16, tokens // per_frame, frame_side, frame_side


def matmul_tflops(device, n: int = 8192, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def worker(spec: dict) -> dict:
    import torch

    from dit3d import DiT3D
    from dit3d.budget import forward_flops
    from dit3d.config import preset
    from dit3d.lora import LoraSettings, add_lora
    from evaluation.peak_memory import PeakMemory

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    cfg = preset(spec["preset"], **({"depth": spec["depth"]} if spec.get("depth") else {}))
    with torch.device(device):
        model = DiT3D(cfg)
    total = sum(p.numel() for p in model.parameters())
    if spec["mode"] == "lora":
        add_lora(model, LoraSettings(rank=spec["rank"], targets=tuple(spec["targets"])))
    if spec["checkpoint_activations"]:  # as train.py --checkpoint-activations applies it
        from dit3d.model import DiTBlock
        from parallel.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model, (DiTBlock,))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda", foreach=False if device.type == "cpu" else None)
    shape = latent_shape(spec["tokens"], spec["frame_side"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, *shape, generator=g).to(device)
    target = torch.randn(1, *shape, generator=g).to(device)
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=g).to(device)
    t = torch.tensor([0.5], device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = model(x, t, text)
        loss = (v.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        step()
    mem = PeakMemory(device).start()
    step()
    mem.stop()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    forward = forward_flops(cfg, total, spec["tokens"], TEXT_TOKENS)["total"]
    flops = ((3 if spec["mode"] == "full" else 2) + int(spec["checkpoint_activations"])) * forward  # + the recompute
    out = {"mode": spec["mode"], "trainable_params": sum(p.numel() for p in trainable), "total_params": total,
           "seconds_per_step": seconds, "tokens_per_s": spec["tokens"] / seconds, "held_gb": mem.held_mb / 1024,
           "peak_gb": (mem.held_mb + mem.peak_mb) / 1024, "step_tflop": flops / 1e12,
           "tflops_per_s": flops / seconds / 1e12, "latents": list(shape)}
    if device.type == "cuda":
        out["matmul_peak_tflops"] = matmul_tflops(device)
        out["mfu"] = out["tflops_per_s"] / out["matmul_peak_tflops"]
        out["device_name"] = torch.cuda.get_device_name(device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="1.3B")
    p.add_argument("--depth", type=int, default=None, help="fewer blocks than the preset's (a machine too small for "
                                                            "full fine-tuning of all of them)")
    p.add_argument("--tokens", type=int, default=None, help="video tokens (default: 256 on the CPU, 8192 on CUDA)")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="qkv,proj,q,kv")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default: 2 on the CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on the CPU, 3 on CUDA)")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in the backward")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    cuda = args.device.startswith("cuda")
    spec = {"device": args.device, "preset": args.preset, "depth": args.depth, "tokens": args.tokens or (8192 if cuda else 256),
            "frame_side": 32 if cuda else 16, "rank": args.rank, "targets": args.targets.split(","),
            "warmup": args.warmup or (3 if cuda else 1), "repeats": args.repeats or (10 if cuda else 2),
            "checkpoint_activations": args.checkpoint_activations}
    results = []
    for mode in args.modes:  # one fresh process each: its memory is its own
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec | {"mode": mode})],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"killed by signal {-proc.returncode}"])[-1]
            oom = proc.returncode < 0 or "out of memory" in proc.stderr.lower()
            results.append({"mode": mode, "failed": "out of memory" if oom else "failed", "error": last[:500]})
            print(f"{mode}: failed ({results[-1]['failed']}, exit {proc.returncode})", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{mode}: {results[-1]['seconds_per_step']:.3f} s/step", file=sys.stderr)
    headers = ["mode", "trainable params", "s / step", "tokens / s", "held GiB", "peak GiB"] + (["TFLOP/s", "MFU"] if cuda else [])
    rows = []
    for r in results:
        if "failed" in r:
            rows.append([r["mode"], "", r["failed"], "", "", ""] + (["", ""] if cuda else []))
            continue
        row = [r["mode"], f"{r['trainable_params'] / 1e6:,.1f}M of {r['total_params'] / 1e9:.2f}B",
               f"{r['seconds_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['held_gb']:.1f}", f"{r['peak_gb']:.1f}"]
        rows.append(row + ([f"{r['tflops_per_s']:.0f}", f"{r['mfu']:.0%}"] if cuda else []))
    done = {r["mode"]: r for r in results if "failed" not in r}
    ratios = {}
    if {"lora", "full"} <= set(done):
        lo, fu = done["lora"], done["full"]
        ratios = {"time": lo["seconds_per_step"] / fu["seconds_per_step"], "peak_memory": lo["peak_gb"] / fu["peak_gb"],
                  "held_memory": lo["held_gb"] / fu["held_gb"], "trainable": lo["trainable_params"] / fu["trainable_params"]}
        rows.append(["LoRA / full", f"{ratios['trainable']:.2%}", f"{ratios['time']:.2f}x", f"{1 / ratios['time']:.2f}x",
                     f"{ratios['held_memory']:.2f}x", f"{ratios['peak_memory']:.2f}x"] + (["", ""] if cuda else []))
    print(f"\n{args.preset} preset{f' cut to {args.depth} blocks' if args.depth else ''}, {spec['tokens']} video tokens + {TEXT_TOKENS} text tokens, batch 1, LoRA rank "
          f"{args.rank} on {args.targets}{', activation checkpointing' if args.checkpoint_activations else ''}, "
          f"{args.device} ({platform.processor() or platform.machine()})\n")
    print(markdown_table(headers, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"spec": spec, "results": results, "ratios": ratios}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0  # a mode that ran out of memory is a result (the table says so), not a failure of the benchmark


if __name__ == "__main__":
    sys.exit(main())
