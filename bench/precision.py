"""Training-step time in float32 against bf16 autocast (train.py --precision fp32 / bf16), side by side.

    python bench/precision.py [--tokenizer small] [--dit tiny] [--device cpu|cuda] [--repeats 6] [--rounds 2]
                              [--out bench/results/precision.json]

Each model takes train.py's own step: the tokenizer stage's loss with the real-footage recipe's terms (squared
error, KL, boundary weight) on a batch of 8 clips of 17x64x64 (the recipe's batch), the DiT's flow-matching
velocity loss on one clip of --dit-tokens tokens with 32 text tokens; backward; fused AdamW. Weights, optimiser
state and losses are float32 in both; only the forward's autocast differs. Each round is a fresh process that
holds one model and alternates the two precisions step by step (fp32 then bf16, then bf16 then fp32, ...), so
that the machine's drift falls on both alike; the ratio is the median over every pair's ratio. The loss after the
warm-up steps, on the same weights and the same draws in both precisions, shows what bf16 changes.

bf16 pays off on a CPU that multiplies bf16 in hardware (AMX or AVX512-BF16, recent Xeons: the table says
whether this one does); elsewhere it is emulated and slower. On CUDA bf16 is train.py's default.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, measure_in_subprocess, sync  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def _finish(loss, opt, device) -> float:
    """The rest of train.py's step after the loss (backward, AdamW) unless opt is None; the loss."""
    if opt is not None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return loss.item()


def tokenizer_step(spec: dict, device):
    """(step(precision) -> loss, parameter count) for the tokenizer stage's step with the real-footage recipe."""
    import shlex

    import torch

    from bench.tokenizer_recipes import FOOTAGE_RECIPE
    from parallel import Env
    from training.optim import adamw
    from training.options import build_parser
    from training.tokenizer_stage import TokenizerStage

    args = build_parser().parse_args(["--stage", "tokenizer", "--data", "unused", "--out", "unused", "--preset",
                                      spec["preset"], "--frames", "17", *shlex.split(FOOTAGE_RECIPE)])
    torch.manual_seed(0)
    stage = TokenizerStage(args, Env(rank=0, world=1, local_rank=0, device=device))
    opt = adamw(stage.model.parameters(), device, lr=args.lr)
    batch = {"video": torch.rand(spec["batch"], 3, 17, 64, 64, device=device) * 2 - 1,
             "key": [f"clip{i}" for i in range(spec["batch"])]}

    def step(precision: str, update: bool = True) -> float:
        args.precision = precision  # the stage reads it at each loss
        loss, _ = stage.loss(stage.model, batch, step=0)
        return _finish(loss, opt if update else None, device)

    return step, sum(p.numel() for p in stage.model.parameters())


def dit_step(spec: dict, device):
    """(step(precision) -> loss, parameter count) for a DiT flow-matching step on random latents and text."""
    import torch

    from dit3d import DiT3D, preset
    from dit3d.flow import flow_loss, interpolate, velocity_target
    from training.optim import adamw
    from training.stage import autocast

    torch.manual_seed(0)
    cfg = preset(spec["preset"])
    model = DiT3D(cfg).to(device).train()
    opt = adamw(model.parameters(), device, lr=1e-4)
    x0 = torch.randn(1, cfg.in_channels, spec["tokens"] // 256, 32, 32, device=device)  # 256 tokens a frame
    noise = torch.randn_like(x0)
    t = torch.rand(1, device=device)
    text = torch.randn(1, 32, cfg.text_dim, device=device)
    mask = torch.ones(1, 32, dtype=torch.bool, device=device)

    def step(precision: str, update: bool = True) -> float:
        with autocast(device, precision):
            v = model(interpolate(x0, noise, t), t, text, mask)
        loss = flow_loss(v.float(), velocity_target(x0, noise))
        return _finish(loss, opt if update else None, device)

    return step, sum(p.numel() for p in model.parameters())


def measure(spec: dict) -> dict:
    """Runs inside the worker process: a warm-up step in each precision, the loss in both on the same weights,
    then spec["repeats"] pairs of timed steps in alternating order."""
    import torch

    from training.stage import cpu_has_native_bf16

    device = torch.device(spec["device"])
    step, params = (tokenizer_step if spec["model"] == "tokenizer" else dit_step)(spec, device)
    for p in PRECISIONS:  # warm-up; after it the DiT's output layer (zero at the start) is no longer zero
        step(p)
    with torch.no_grad():
        same = {p: step(p, update=False) for p in PRECISIONS}
    seconds = {p: [] for p in PRECISIONS}
    for i in range(spec["repeats"]):
        for p in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
            t0 = time.perf_counter()
            step(p)
            seconds[p].append(time.perf_counter() - t0)
    native = device.type == "cuda" or cpu_has_native_bf16()
    return spec | {"params": params, "loss": same, "seconds": seconds, "native_bf16": native,
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", nargs="*", default=["small"], help="tokenizer presets")
    parser.add_argument("--batch", type=int, default=8, help="tokenizer clips per step (17x64x64 each)")
    parser.add_argument("--dit", nargs="*", default=["tiny"], help="DiT presets")
    parser.add_argument("--dit-tokens", type=int, default=2048, help="DiT tokens per clip (a multiple of 256)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda where there is one)")
    parser.add_argument("--repeats", type=int, default=6, help="timed pairs of steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per model")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "precision.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    if args.dit_tokens % 256 or args.dit_tokens <= 0:
        raise SystemExit(f"error: --dit-tokens must be a positive multiple of 256 (a 32x32 latent frame), got {args.dit_tokens}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = [{"model": "tokenizer", "preset": p, "batch": args.batch} for p in args.tokenizer]
    cases += [{"model": "dit", "preset": p, "tokens": args.dit_tokens} for p in args.dit]
    rows, results = [], []
    for case in cases:
        rounds = [measure_in_subprocess(__file__, case | {"device": device, "repeats": args.repeats}, measures=("time",))
                  for _ in range(args.rounds)]
        seconds = {p: [s for r in rounds for s in r["seconds"][p]] for p in PRECISIONS}
        ratios = [b / f for r in rounds for f, b in zip(r["seconds"]["fp32"], r["seconds"]["bf16"])]
        same = rounds[0]["loss"]
        result = case | {"device": device, "params": rounds[0]["params"], "native_bf16": rounds[0]["native_bf16"],
                         "threads": rounds[0]["threads"], "seconds": seconds,
                         "fp32_s": statistics.median(seconds["fp32"]), "bf16_s": statistics.median(seconds["bf16"]),
                         "bf16_over_fp32": statistics.median(ratios), "loss": same,
                         "loss_rel_diff": abs(same["bf16"] - same["fp32"]) / abs(same["fp32"])}
        results.append(result)
        what = f"{case['batch']} x 17x64x64" if case["model"] == "tokenizer" else f"{case['tokens']} tokens"
        rows.append([f"{case['model']} {case['preset']}", what, f"{result['params'] / 1e6:.1f}M",
                     f"{result['fp32_s']:.3f}", f"{result['bf16_s']:.3f}", f"{result['bf16_over_fp32']:.2f}",
                     f"{100 * result['loss_rel_diff']:.3f}%"])
        print(f"{case['model']} {case['preset']}: fp32 {result['fp32_s']:.3f} s, bf16 {result['bf16_s']:.3f} s", flush=True)
    cpu = platform.processor() or platform.machine()
    print(f"\ntraining steps on {device} ({cpu}; native bf16: {'yes' if results[0]['native_bf16'] else 'no'}, "
          f"{results[0]['threads']} threads), {args.rounds} rounds x {args.repeats} alternating pairs\n")
    print(markdown_table(["model", "batch", "parameters", "fp32 s/step", "bf16 s/step", "bf16 / fp32 (pairs' median)",
                          "loss, bf16 against fp32"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                                 if k != "worker"}, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
