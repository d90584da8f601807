"""Tokenizer speed and memory: our CausalVAE against diffusers' AutoencoderKLWan with matching widths, and
against the field's released autoencoder architectures.

    python bench/tokenizer.py [--preset small] [--size 128] [--frames 17 65 129] [--chunk 2]
                              [--field AutoencoderKLWan AutoencoderKLCogVideoX AutoencoderKLHunyuanVideo
                                       AutoencoderKLLTXVideo]
                              [--device cpu|cuda] [--dtype float32|bfloat16] [--out bench/results/tokenizer.json]

Both models get random weights. The Wan model is built with the same widths at the resolutions both
networks share (for `small`: 64 channels at 1/4 and 128 at 1/8 resolution, from base_dim=16 and
dim_mult [1, 2, 4, 8]); Wan also runs full- and half-resolution stages, which ours replaces with a
space-to-depth patchify. Ours runs whole-clip and chunked (`--chunk` latent frames per step).

Each (model, mode, frames, op) is timed in a fresh process: one warm-up, then the median of
`--repeats` runs, as frames per second. Its peak memory is measured in another fresh process, as the
increase over the memory held before the call (model and input already allocated): on CUDA the
allocator's peak; on the CPU the peak resident set size, its high-water mark reset first and large
buffers mmapped so that freed memory leaves the resident set. Prints a table with ratios (ours over Wan) and writes JSON.

`--field` adds the named diffusers classes at their default configs, which are the released architectures
(Wan2.1's VAE, CogVideoX's, HunyuanVideo's, LTX-Video 0.9's), through our tokenizer interface, at the same
size and frames (frame counts a model cannot take, such as 65 for LTX-Video's 1 + 8k, are skipped): random
weights, so speed and memory only; their quality is `tokenizer.evaluate`'s business with real weights.
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

from bench.common import measure_in_subprocess, sync, time_or_memory  # noqa: E402

WAN_MATCH = {  # our preset -> AutoencoderKLWan kwargs with the same widths at shared resolutions
    "tiny": dict(base_dim=8, dim_mult=[1, 2, 4, 8], num_res_blocks=1),
    "small": dict(base_dim=16, dim_mult=[1, 2, 4, 8], num_res_blocks=2),
    "base": dict(base_dim=64, dim_mult=[1, 2, 4, 8], num_res_blocks=2),
}


def measure(spec: dict) -> dict:
    """Runs inside the worker process."""
    import torch

    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    size, frames = spec["size"], spec["frames"]
    if spec["model"] == "ours":
        from tokenizer import CausalVAE

        model = CausalVAE.from_preset(spec["preset"])
        chunk = spec["chunk"]
        encode = lambda x: model.encode(x, chunk=chunk).mean  # noqa: E731
        decode = lambda z: model.decode(z, chunk=chunk)  # noqa: E731
    elif spec["model"] != "wan":  # a released architecture, through our adapter
        import diffusers

        from tokenizer import DiffusersVAE

        model = DiffusersVAE(getattr(diffusers, spec["model"])(), spec["model"])
        encode = lambda x: model.encode(x).mean  # noqa: E731
        decode = lambda z: model.decode(z)  # noqa: E731
    else:
        from diffusers import AutoencoderKLWan

        model = AutoencoderKLWan(z_dim=16, temperal_downsample=[False, True, True], **WAN_MATCH[spec["preset"]])
        encode = lambda x: model.encode(x).latent_dist.mode()  # noqa: E731
        decode = lambda z: model.decode(z).sample  # noqa: E731
    model = model.to(device, dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    video = torch.rand(1, 3, frames, size, size, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        latents = encode(video)
    fn, arg = (encode, video) if spec["op"] == "encode" else (decode, latents)

    def run():
        with torch.no_grad():
            out = fn(arg)
        sync(device)
        return out

    if spec["op"] == "encode":
        del latents
    else:
        del video
    result = spec | {"params": params} | time_or_memory(run, spec, device)
    if "seconds" in result:
        result["frames_per_s"] = frames / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(WAN_MATCH))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 65, 129])
    parser.add_argument("--chunk", type=int, default=2, help="latent frames per step in our chunked mode")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--field", nargs="*", default=[], help="diffusers autoencoder classes at their released configs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    base = {"preset": args.preset, "size": args.size, "device": args.device, "dtype": args.dtype, "repeats": args.repeats}
    modes = [("ours", None), ("ours", args.chunk), ("wan", None)]
    rows = []
    for frames in args.frames:
        for model, chunk in modes:
            for op in ("encode", "decode"):
                spec = base | {"model": model, "chunk": chunk, "frames": frames, "op": op}
                rows.append(measure_in_subprocess(__file__, spec))
                r = rows[-1]
                print(f"  {model:4s} chunk={chunk} {frames:4d} frames {op}: {r['frames_per_s']:.1f} frames/s, "
                      f"peak +{r['peak_mb']:.0f} MB", file=sys.stderr)

    field = []
    for name in args.field:
        factor = 8 if name == "AutoencoderKLLTXVideo" else 4
        for frames in [f for f in args.frames if (f - 1) % factor == 0]:
            for op in ("encode", "decode"):
                field.append(measure_in_subprocess(__file__, base | {"model": name, "chunk": None, "frames": frames, "op": op}))
                r = field[-1]
                print(f"  {name} {frames:4d} frames {op}: {r['frames_per_s']:.1f} frames/s, peak +{r['peak_mb']:.0f} MB",
                      file=sys.stderr)

    def get(model, chunk, frames, op):
        return next(r for r in rows if (r["model"], r["chunk"], r["frames"], r["op"]) == (model, chunk, frames, op))

    params = {m: next(r["params"] for r in rows if r["model"] == m) for m in ("ours", "wan")}
    print(f"\nTokenizer '{args.preset}' ({params['ours'] / 1e6:.1f}M params) vs diffusers AutoencoderKLWan with "
          f"matching widths ({params['wan'] / 1e6:.1f}M), {args.size}x{args.size}, {args.device} {args.dtype}")
    print("| frames | op | Wan frames/s | ours frames/s | ratio | ours chunked frames/s | ratio | "
          "Wan peak MB | ours peak MB | ours chunked peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for frames in args.frames:
        for op in ("encode", "decode"):
            w, o, c = get("wan", None, frames, op), get("ours", None, frames, op), get("ours", args.chunk, frames, op)
            print(f"| {frames} | {op} | {w['frames_per_s']:.1f} | {o['frames_per_s']:.1f} | "
                  f"{o['frames_per_s'] / w['frames_per_s']:.2f}x | {c['frames_per_s']:.1f} | "
                  f"{c['frames_per_s'] / w['frames_per_s']:.2f}x | {w['peak_mb']:.0f} | {o['peak_mb']:.0f} | {c['peak_mb']:.0f} |")
    if field:
        print(f"\nThe field's released architectures (random weights) against ours, {args.size}x{args.size}")
        print("| model | params (M) | frames | encode frames/s | ours / it | decode frames/s | ours / it | "
              "encode peak MB | decode peak MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.field:
            for frames in sorted({r["frames"] for r in field if r["model"] == name}):
                e, d = (next(r for r in field if (r["model"], r["frames"], r["op"]) == (name, frames, op))
                        for op in ("encode", "decode"))
                oe, od = get("ours", None, frames, "encode"), get("ours", None, frames, "decode")
                print(f"| {name} | {e['params'] / 1e6:.1f} | {frames} | {e['frames_per_s']:.2f} | "
                      f"{oe['frames_per_s'] / e['frames_per_s']:.1f}x | {d['frames_per_s']:.2f} | "
                      f"{od['frames_per_s'] / d['frames_per_s']:.1f}x | {e['peak_mb']:.0f} | {d['peak_mb']:.0f} |")
        rows += field
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"machine": machine, "args": base | {"chunk": args.chunk, "field": args.field},
                                    "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
