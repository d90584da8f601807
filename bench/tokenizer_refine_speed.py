"""What the tokenizer's pixel refinement costs in a training step, and which layout runs it fastest.

The refinement (VAEConfig.refine_channels) is two 3x3 convolutions on the decoded frames, with 3 and a few
channels. Such thin convolutions are slow on the CPU in the default contiguous layout, so PixelRefine folds
the frames into the batch and runs them as 2D convolutions in channels-last layout. This compares, side by
side in fresh processes, the forward and backward of the same weights as

  conv3d        (1, 3, 3) 3D convolutions on (B, C, T, H, W), contiguous (how it was first written)
  conv2d        2D convolutions on the folded frames, contiguous
  conv2d-cl     2D convolutions on the folded frames, channels-last (PixelRefine)

and a whole training step (forward, loss, backward, AdamW) of the model with and without the refinement.
Prints a table of milliseconds and ratios, and writes JSON.

    python bench/tokenizer_refine_speed.py                       # the quickstart's tiny tokenizer, batch 4
    python bench/tokenizer_refine_speed.py --preset small --size 128 --batch 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, markdown_table, measure_in_subprocess, time_or_memory

LAYOUTS = ("conv3d", "conv2d", "conv2d-cl")


def _refine_fn(layout: str, refine):
    """The refinement's forward as `layout` computes it, with the module's weights."""
    import torch.nn.functional as F
    from einops import rearrange

    if layout == "conv2d-cl":
        return refine
    w1, b1, w2, b2 = refine.conv1.weight, refine.conv1.bias, refine.conv2.weight, refine.conv2.bias

    def conv3d(video):
        h = F.conv3d(video, w1.unsqueeze(2), b1, padding=(0, 1, 1))
        return video + F.conv3d(F.silu(h), w2.unsqueeze(2), b2, padding=(0, 1, 1))

    def conv2d(video):
        b = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w").contiguous()
        frames = frames + F.conv2d(F.silu(F.conv2d(frames, w1, b1, padding=1)), w2, b2, padding=1)
        return rearrange(frames, "(b t) c h w -> b c t h w", b=b)

    return {"conv3d": conv3d, "conv2d": conv2d}[layout]


def _trained_refine(hidden: int):
    """A refinement of `hidden` channels whose second convolution is not zero (a trained one, not the identity)."""
    import torch

    from tokenizer.model import PixelRefine

    torch.manual_seed(0)
    refine = PixelRefine(3, hidden)
    torch.nn.init.normal_(refine.conv2.weight, std=0.05)
    return refine


def measure(spec: dict) -> dict:
    import torch

    from tokenizer import CausalVAE, preset
    from tokenizer.losses import LossConfig, reconstruction_loss

    torch.manual_seed(0)
    b, t, s = spec["batch"], spec["frames"], spec["size"]
    video = torch.rand(b, 3, t, s, s) * 2 - 1
    if spec["what"] == "refine":
        fn = _refine_fn(spec["layout"], _trained_refine(spec["hidden"]))

        def run():
            x = video.clone().requires_grad_()
            fn(x).square().mean().backward()
    else:
        model = CausalVAE(preset(spec["preset"], refine_channels=spec["hidden"]))
        if model.refine is not None and spec["layout"] != "conv2d-cl":
            model.refine.forward = _refine_fn(spec["layout"], model.refine)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cfg = LossConfig(recon="mse", temporal_factor=model.config.temporal_factor)

        def run():
            recon, posterior = model(video)
            reconstruction_loss(video, recon, posterior, cfg, None)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time_or_memory(run, spec, torch.device("cpu"))


def check_equal(hidden: int, size: int) -> float:
    """The largest difference between the layouts' outputs (they compute the same function)."""
    import torch

    refine = _trained_refine(hidden)
    video = torch.rand(1, 3, 5, size, size) * 2 - 1
    with torch.no_grad():
        ref = _refine_fn("conv3d", refine)(video)
        return max(float((_refine_fn(layout, refine)(video) - ref).abs().max()) for layout in LAYOUTS[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer_refine_speed.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker)) | {"measure": json.loads(args.worker)["measure"]}))
        return
    base = {"batch": args.batch, "frames": args.frames, "size": args.size, "repeats": args.repeats}
    results, rows = [], []
    for hidden in args.hidden:
        diff = check_equal(hidden, args.size)
        times = {layout: measure_in_subprocess(__file__, base | {"what": "refine", "hidden": hidden, "layout": layout},
                                               measures=("time",))["seconds"] for layout in LAYOUTS}
        for layout in LAYOUTS:
            rows.append([f"refinement, {hidden} channels", layout, f"{1e3 * times[layout]:.1f}",
                         f"{times[layout] / times['conv3d']:.2f}", f"{diff:.1e}"])
        results.append({"what": "refine", "hidden": hidden, "ms": {k: 1e3 * v for k, v in times.items()},
                        "max_abs_difference": diff})
    variants = [(0, "conv2d-cl")] + [(h, layout) for h in args.hidden for layout in ("conv3d", "conv2d-cl")]
    steps = {(h, layout): measure_in_subprocess(__file__, base | {"what": "step", "preset": args.preset, "hidden": h,
                                                                  "layout": layout}, measures=("time",))["seconds"]
             for h, layout in variants}
    for (h, layout), seconds in steps.items():
        rows.append([f"{args.preset} training step", f"refine_channels={h}" + (f", {layout}" if h else ""),
                     f"{1e3 * seconds:.1f}", f"{seconds / steps[variants[0]]:.2f}", ""])
    results.append({"what": "step", "preset": args.preset, "ms": {f"{h} {layout}": 1e3 * s for (h, layout), s in steps.items()}})
    print(f"forward + backward, batch {args.batch} x {args.frames} frames x {args.size}^2, CPU, median of "
          f"{args.repeats}; ratio: against conv3d (refinement rows) or against no refinement (step rows)")
    print(markdown_table(["what", "variant", "ms", "ratio", "max |diff| vs conv3d"], rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
                                    "results": results}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
