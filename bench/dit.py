"""DiT speed and memory: a training step of ours against diffusers' WanTransformer3DModel of the same shape,
and the attention backends side by side.

    python bench/dit.py [--presets tiny S] [--tokens 2048 8192] [--attention-tokens 1024 2048 4096 8192 16384]
                        [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 2] [--rounds 3] [--malloc-heap]
                        [--out bench/results/dit.json]

1. Forward + backward of one training step (batch 1, 32 text tokens, latents of 16 channels with 32x32
   latent frames and as many frames as the token count needs, patch 1x2x2), for each preset and token
   count: seconds per step, tokens/s, peak memory, and model FLOPs per second. FLOPs come from
   dit3d/budget.py (per token 6 N + 12 L d S plus cross-attention; N parameters, L layers, width d, S tokens); MFU divides the achieved rate by the
   measured peak of a large matmul in the same dtype on the same device. The Wan model gets the same width,
   depth, heads, patch, FFN width and text width, random weights; both use PyTorch SDPA. Time is measured
   in pairs: each round is one fresh process that holds both models and alternates their steps (ours then
   Wan, then Wan then ours), so that a machine's drift and a process's luck (memory placement, threads)
   fall on both alike; the ratio is the median over all rounds of each pair's ratio, and each model's time
   the median of its steps. Peak memory comes from one more fresh process per model.
   On the CPU, glibc's malloc serves every block of 32 MB or more with a fresh mmap, so each such tensor
   costs page faults and zeroing (about 10 ms for 38 MB on the 2-core machine, against 0.5 ms reused from
   the heap): at 8k tokens a width-384 model's fused QKV output (38 MB) and MLP hidden (50 MB) pay it on
   every step. `--malloc-heap` times with MALLOC_MMAP_THRESHOLD_ raised to 4 GiB (glibc's own switch for
   the heap reuse that jemalloc or tcmalloc, which PyTorch's CPU tuning guide recommends, give), for both
   models alike; the default leaves the allocator as the user's environment has it.
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

from bench.common import markdown_table, measure_in_subprocess, sync, time_or_memory  # noqa: E402

FRAME_TOKENS = 256  # a 32x32 latent frame in 2x2 patches
TEXT_TOKENS = 32
MODELS = ("ours", "wan")


def matmul_peak_flops(device, dtype, n: int = 4096, repeats: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
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


def training_step(spec: dict, device, dtype):
    """The model spec["model"] of spec["preset"] on its inputs: (step function, config, parameter count)."""
    import torch

    torch.manual_seed(0)
    cfg, model, call = build(spec)
    model = model.to(device, dtype).train()
    frames = spec["tokens"] // FRAME_TOKENS
    x = torch.randn(1, cfg.in_channels, frames, 32, 32, device=device, dtype=dtype)
    t = torch.rand(1, device=device, dtype=dtype)
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=device, dtype=dtype)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)

    def step():
        loss = call(x, t, text, mask).float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync(device)

    return step, cfg, sum(p.numel() for p in model.parameters())


def measure(spec: dict) -> dict:
    import torch

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec["kind"] == "attention":
        return spec | measure_attention(spec, device, dtype)
    if spec["kind"] == "pair":
        return spec | measure_pair(spec, device, dtype)
    step, _, params = training_step(spec, device, dtype)  # peak memory of one model's step
    return spec | {"params": params} | time_or_memory(step, spec, device)


def measure_pair(spec: dict, device, dtype) -> dict:
    from dit3d.budget import training_flops

    """Both models in this process, a warm-up step each, then spec["repeats"] pairs of timed steps in
    alternating order: {model: {"seconds": [...], "params", "flops"}}, plus the matmul peak."""
    steps, result = {}, {}
    for model in MODELS:
        steps[model], cfg, params = training_step(spec | {"model": model}, device, dtype)
        steps[model]()
        flops = training_flops(cfg, params, spec["tokens"], TEXT_TOKENS)
        result[model] = {"params": params, "flops": flops, "seconds": []}
    for i in range(spec["repeats"]):
        for model in MODELS if i % 2 == 0 else MODELS[::-1]:
            t0 = time.perf_counter()
            steps[model]()
            result[model]["seconds"].append(time.perf_counter() - t0)
    return result | {"peak_flops": matmul_peak_flops(device, dtype)}


def measure_attention(spec: dict, device, dtype) -> dict:
    import torch

    from dit3d.attention import attention

    q, k, v = (torch.randn(1, 6, spec["tokens"], 64, device=device, dtype=dtype) for _ in range(3))
    run = lambda: (attention(q, k, v, spec["backend"]), sync(device))  # noqa: E731
    result = time_or_memory(run, spec, device)
    if "seconds" in result:
        result["tflops"] = 4 * 6 * spec["tokens"] ** 2 * 64 / result["seconds"] / 1e12  # QK^T and PV
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--attention-tokens", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed pairs of steps per round (ours and Wan, alternating)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds: fresh processes that each hold both models")
    parser.add_argument("--malloc-heap", action="store_true",
                        help="CPU: time with glibc's MALLOC_MMAP_THRESHOLD_ at 4 GiB (large tensors reuse the heap)")
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
    time_env = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30)} if args.malloc_heap else {}
    allocator = ("glibc heap reuse (MALLOC_MMAP_THRESHOLD_=4 GiB)" if args.malloc_heap
                 else f"allocator as inherited (MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')})")
    for tokens in args.tokens + args.attention_tokens:
        if tokens % FRAME_TOKENS:
            raise SystemExit(f"error: token counts must be multiples of {FRAME_TOKENS} (one 32x32 latent frame), got {tokens}")

    steps, ratios = {}, {}
    for name in args.presets:
        for tokens in args.tokens:
            spec = base | {"preset": name, "tokens": tokens}
            pairs = [measure_in_subprocess(__file__, spec | {"kind": "pair"}, measures=("time",), time_env=time_env)
                     for _ in range(args.rounds)]
            per_pair = [w / o for p in pairs for o, w in zip(p["ours"]["seconds"], p["wan"]["seconds"])]
            ratios[name, tokens] = {"preset": name, "tokens": tokens, "ratio": statistics.median(per_pair), "per_pair": per_pair}
            peak = statistics.median(p["peak_flops"] for p in pairs)
            for model in MODELS:
                memory = measure_in_subprocess(__file__, spec | {"kind": "step", "model": model}, measures=("memory",))
                all_seconds = [x for p in pairs for x in p[model]["seconds"]]
                seconds, flops = statistics.median(all_seconds), pairs[0][model]["flops"]
                steps[model, name, tokens] = {
                    "model": model, "preset": name, "tokens": tokens, "params": pairs[0][model]["params"],
                    "seconds": seconds, "seconds_all": all_seconds, "tokens_per_s": tokens / seconds,
                    "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak, "peak_tflops": peak / 1e12,
                    "peak_mb": memory["peak_mb"], "held_mb": memory["held_mb"]}
                print(f"  {model} {name} {tokens} tokens: {tokens / seconds:.0f} tokens/s, peak {memory['peak_mb']:.0f} MB",
                      file=sys.stderr)
    backends = ["sdpa", "reference"] + (["xformers"] if device == "cuda" and _has_xformers() else [])
    attn = []
    for tokens in args.attention_tokens:
        for backend in backends:
            attn.append(measure_in_subprocess(__file__, base | {"kind": "attention", "backend": backend, "tokens": tokens}))

    rows = []
    for name in args.presets:
        for tokens in args.tokens:
            o, w, r = steps["ours", name, tokens], steps["wan", name, tokens], ratios[name, tokens]
            spread = f"{min(r['per_pair']):.2f}-{max(r['per_pair']):.2f}"
            rows.append([name, f"{o['params'] / 1e6:.1f}M / {w['params'] / 1e6:.1f}M", tokens, f"{w['tokens_per_s']:.0f}",
                         f"{o['tokens_per_s']:.0f}", f"{r['ratio']:.3f}x", spread, f"{w['peak_mb']:.0f}",
                         f"{o['peak_mb']:.0f}", f"{o['tflops']:.3f}", f"{100 * o['mfu']:.1f}%"])
    first = next(iter(steps.values()))
    print(f"\nTraining step (forward + backward), {device} {dtype}, batch 1: {args.rounds} fresh processes, each "
          f"alternating {args.repeats} steps of each model; matmul peak {first['peak_tflops']:.2f} TFLOP/s; "
          f"{allocator if device == 'cpu' else 'CUDA caching allocator'}")
    print(markdown_table(["preset", "params ours / Wan", "tokens", "Wan tokens/s", "ours tokens/s",
                          "ratio (median of pairs)", "pair ratios", "Wan peak MB", "ours peak MB", "ours TFLOP/s",
                          "ours MFU"], rows))
    rows = []
    for tokens in args.attention_tokens:
        row = [tokens]
        for backend in backends:
            r = next(a for a in attn if (a["tokens"], a["backend"]) == (tokens, backend))
            row += [f"{r['seconds'] * 1e3:.1f}", f"{r['tflops']:.3f}", f"{r['peak_mb']:.0f}"]
        rows.append(row)
    if rows:
        print(f"\nAttention alone (forward, 6 heads x 64), {device} {dtype}")
        print(markdown_table(["tokens"] + [f"{b} {m}" for b in backends for m in ("ms", "TFLOP/s", "peak MB")], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"machine": machine, "args": base | {"rounds": args.rounds, "allocator": allocator},
                                    "steps": list(steps.values()), "ratios": list(ratios.values()), "attention": attn},
                                   indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
