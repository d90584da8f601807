"""DiT speed and memory: a training step of ours against diffusers' WanTransformer3DModel of the same shape,
and the attention backends side by side.

    python bench/dit.py [--presets tiny S] [--tokens 2048 8192] [--attention-tokens 1024 2048 4096 8192 16384]
                        [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 2] [--rounds 3]
                        [--out bench/results/dit.json]

1. Forward + backward of one training step (batch 1, 32 text tokens, latents of 16 channels with 32x32
   latent frames and as many frames as the token count needs, patch 1x2x2), for each preset and token
   count: seconds per step, tokens/s, peak memory, and model FLOPs per second. FLOPs per token for training
   are 6 N + 12 L d S (N parameters, L layers, width d, S tokens); MFU divides the achieved rate by the
   measured peak of a large matmul in the same dtype on the same device. The Wan model gets the same width,
   depth, heads, patch, FFN width and text width, random weights; both use PyTorch SDPA. The two models
   alternate, each round in fresh processes and in the other order from the round before, so that a
   machine's drift (other load, clocks) falls on both alike; the ratio is the median of the rounds' ratios
   and the times are the median over rounds (peak memory, which does not drift, from the first round).
2. The attention function alone (forward, 6 heads of 64) from 1k to 16k tokens, per backend: time and
   peak memory. No backend may grow quadratically in memory.
Each figure comes from a fresh process (see bench/common.py). Prints tables with ratios and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, measure_in_subprocess, time_or_memory  # noqa: E402

FRAME_TOKENS = 256  # a 32x32 latent frame in 2x2 patches
TEXT_TOKENS = 32


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device, dtype, n: int = 4096, repeats: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def build(spec: dict):
    import torch

    from dit3d import DiT3D, preset

    cfg = preset(spec["preset"])
    if spec["model"] == "ours":
        model = DiT3D(cfg)
        call = lambda x, t, text, mask: model(x, t, text, mask)  # noqa: E731
    else:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(patch_size=cfg.patch_size, num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
                                      in_channels=cfg.in_channels, out_channels=cfg.output_channels, text_dim=cfg.text_dim,
                                      ffn_dim=int(cfg.width * cfg.mlp_ratio), num_layers=cfg.depth)
        call = lambda x, t, text, mask: model(x, t * 1000, text, return_dict=False)[0]  # noqa: E731
    return cfg, model, call


def measure(spec: dict) -> dict:
    import torch

    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec["kind"] == "attention":
        return spec | measure_attention(spec, device, dtype)
    cfg, model, call = build(spec)
    model = model.to(device, dtype).train()
    params = sum(p.numel() for p in model.parameters())
    frames = spec["tokens"] // FRAME_TOKENS
    x = torch.randn(1, cfg.in_channels, frames, 32, 32, device=device, dtype=dtype)
    t = torch.rand(1, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)

    def step():
        loss = call(x, t, text, mask).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    result = spec | {"params": params} | time_or_memory(step, spec, device)
    if "seconds" in result:
        seconds = result["seconds"]
        flops = (6 * params + 12 * cfg.depth * cfg.width * spec["tokens"]) * spec["tokens"]
        peak = matmul_peak_flops(device, dtype)
        result |= {"tokens_per_s": spec["tokens"] / seconds, "tflops": flops / seconds / 1e12,
                   "mfu": flops / seconds / peak, "peak_tflops": peak / 1e12}
    return result


def measure_attention(spec: dict, device, dtype) -> dict:
    import torch

    from dit3d.attention import attention

    q, k, v = (torch.randn(1, 6, spec["tokens"], 64, device=device, dtype=dtype) for _ in range(3))
    run = lambda: (attention(q, k, v, spec["backend"]), _sync(device))  # noqa: E731
    result = time_or_memory(run, spec, device)
    if "seconds" in result:
        result["tflops"] = 4 * 6 * spec["tokens"] ** 2 * 64 / result["seconds"] / 1e12  # QK^T and PV
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--attention-tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per process (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and Wan (their median)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dit.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    base = {"device": device, "dtype": dtype, "repeats": args.repeats}
    for tokens in args.tokens + args.attention_tokens:
        if tokens % FRAME_TOKENS:
            raise SystemExit(f"error: token counts must be multiples of {FRAME_TOKENS} (one 32x32 latent frame), got {tokens}")

    rounds = []  # rounds[r][(model, preset, tokens)] = that round's measurement
    for r in range(args.rounds):
        this = {}
        for name in args.presets:
            for tokens in args.tokens:
                for model in (("ours", "wan") if r % 2 == 0 else ("wan", "ours")):
                    spec = base | {"kind": "step", "model": model, "preset": name, "tokens": tokens}
                    # memory does not drift like time: the first round measures it, the others time alone
                    this[model, name, tokens] = res = measure_in_subprocess(
                        __file__, spec, measures=("time", "memory") if r == 0 else ("time",))
                    print(f"  round {r + 1}: {model} {name} {tokens} tokens: {res['tokens_per_s']:.0f} tokens/s",
                          file=sys.stderr)
        rounds.append(this)
    steps = []
    for key in rounds[0]:
        runs = [rd[key] for rd in rounds]
        seconds = statistics.median(x["seconds"] for x in runs)
        steps.append(runs[0] | {"seconds": seconds, "seconds_per_round": [x["seconds"] for x in runs],
                                "tokens_per_s": key[2] / seconds, "tflops": statistics.median(x["tflops"] for x in runs),
                                "mfu": statistics.median(x["mfu"] for x in runs),
                                "peak_mb": runs[0]["peak_mb"]})
    backends = ["sdpa", "reference"] + (["xformers"] if device == "cuda" and _has_xformers() else [])
    attn = []
    for tokens in args.attention_tokens:
        for backend in backends:
            attn.append(measure_in_subprocess(__file__, base | {"kind": "attention", "backend": backend, "tokens": tokens}))

    def get(model, name, tokens):
        return next(r for r in steps if (r["model"], r["preset"], r["tokens"]) == (model, name, tokens))

    rows, ratios = [], []
    for name in args.presets:
        for tokens in args.tokens:
            o, w = get("ours", name, tokens), get("wan", name, tokens)
            per_round = [rd["wan", name, tokens]["seconds"] / rd["ours", name, tokens]["seconds"] for rd in rounds]
            ratios.append({"preset": name, "tokens": tokens, "ratio": statistics.median(per_round), "per_round": per_round})
            rows.append([name, f"{o['params'] / 1e6:.1f}M / {w['params'] / 1e6:.1f}M", tokens, f"{w['tokens_per_s']:.0f}",
                         f"{o['tokens_per_s']:.0f}", f"{ratios[-1]['ratio']:.2f}x",
                         " ".join(f"{x:.2f}" for x in per_round), f"{w['peak_mb']:.0f}", f"{o['peak_mb']:.0f}",
                         f"{o['tflops']:.3f}", f"{100 * o['mfu']:.1f}%"])
    print(f"\nTraining step (forward + backward), {device} {dtype}, batch 1, median of {args.rounds} alternating "
          f"rounds of {args.repeats} steps; matmul peak {steps[0]['peak_tflops']:.2f} TFLOP/s")
    print(markdown_table(["preset", "params ours / Wan", "tokens", "Wan tokens/s", "ours tokens/s", "ratio (ours / Wan)",
                          "ratio per round", "Wan peak MB", "ours peak MB", "ours TFLOP/s", "ours MFU"], rows))
    print(f"\nAttention alone (forward, 6 heads x 64), {device} {dtype}")
    rows = []
    for tokens in args.attention_tokens:
        row = [tokens]
        for backend in backends:
            r = next(a for a in attn if (a["tokens"], a["backend"]) == (tokens, backend))
            row += [f"{r['seconds'] * 1e3:.1f}", f"{r['tflops']:.3f}", f"{r['peak_mb']:.0f}"]
        rows.append(row)
    print(markdown_table(["tokens"] + [f"{b} {m}" for b in backends for m in ("ms", "TFLOP/s", "peak MB")], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"machine": machine, "args": base | {"rounds": args.rounds}, "steps": steps,
                                    "ratios": ratios, "attention": attn}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
