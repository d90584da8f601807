"""Where a tokenizer's reconstruction error is, and how much of it the network removes beyond the linear codec.

    python bench/tokenizer_diagnosis.py --ckpt runs/quickstart/tokenizer --data ../shared/data/clips \\
        [--frames 17 --size 64 --windows 2 --fit-clips 32] [--out bench/results/tokenizer_diagnosis]

A tokenizer run of ours starts as a linear codec (PCA encoder and least-squares decoder fitted to the
training clips, the network's output layers zeroed; `CausalVAE.init_linear_codec`) and trains the network
as a residual on it. Three reconstructions of the same held-out windows are compared:
- `start`: the run's starting point, a linear codec fitted as the run fitted it (--fit-clips clips of the
  run's own training data, or of --fit-data);
- `linear path`: the trained model with its network's contribution removed (both ends' linear paths alone);
- `trained`: the trained model (posterior means).
For each, the error is cut three ways:
- by spatial frequency: the error's energy in each band of the 2D spectrum (per frame and channel, radius
  in cycles per pixel: 0-1/32, 1/32-1/16, 1/16-1/8, 1/8-1/4, 1/4 and up) over the footage's own energy
  in that band (dB; 0 dB: the band is lost entirely);
- by frame position: the squared error at every frame of the window and the seam ratios (error and
  frame-to-frame motion error at the frames that start a latent group against the others);
- by edges against flat areas: PSNR on the pixels whose ground-truth gradient (Sobel, luma) is in the top
  20% of the window, and on the bottom 50%.
On synthetic held-out clips (captions in its grammar), the motion scorer also reads every reconstruction:
the share in which it finds the object (presence), its caption's colour and its shape, which bounds what a
DiT trained on these latents can draw (the originals score 100%).
Prints the tables, writes report.json and diagnosis.png (the three views).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from tokenizer import fit_linear_codec, load_vae

BANDS = [0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]  # cycles per pixel (Nyquist 0.5; the corners reach 0.71)
BAND_NAMES = ["<1/32", "1/32-1/16", "1/16-1/8", "1/8-1/4", ">1/4"]


def band_energy(x: torch.Tensor) -> torch.Tensor:
    """Energy (len(BANDS) - 1,) of videos x (B, C, T, H, W) in each radial band of the per-frame 2D spectrum."""
    h, w = x.shape[-2:]
    spectrum = torch.fft.fft2(x.double()).abs().pow(2)  # (B, C, T, H, W)
    fy, fx = torch.fft.fftfreq(h, dtype=torch.float64), torch.fft.fftfreq(w, dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    total = spectrum.sum(dim=(0, 1, 2))  # (H, W)
    return torch.stack([total[(radius >= lo) & (radius < hi)].sum() for lo, hi in zip(BANDS[:-1], BANDS[1:])])


def edge_masks(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edges, flat) boolean masks (B, 1, T, H, W) of videos (B, 3, T, H, W) on [0, 1]: the top 20% and the bottom
    50% of each window's Sobel gradient magnitude of the luma (pixels tied with the median count as flat)."""
    luma = (0.299 * video[:, 0] + 0.587 * video[:, 1] + 0.114 * video[:, 2]).double()  # (B, T, H, W)
    b, t, h, w = luma.shape
    frames = rearrange(luma, "b t h w -> (b t) 1 h w")
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    padded = F.pad(frames, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(padded, kx[None, None]), F.conv2d(padded, kx.T[None, None])
    magnitude = rearrange((gx**2 + gy**2).sqrt(), "(b t) 1 h w -> b t h w", b=b)
    flat_values = magnitude.flatten(1)
    high = flat_values.quantile(0.8, dim=1).view(b, 1, 1, 1)
    low = flat_values.quantile(0.5, dim=1).view(b, 1, 1, 1)
    # ties (a frame that is mostly flat) count as flat, never as edges
    return ((magnitude >= high) & (magnitude > low))[:, None], (magnitude <= low)[:, None]


def linear_only(model, video: torch.Tensor) -> torch.Tensor:
    """The model's reconstruction through its linear paths alone (encoder and decoder), on [-1, 1]."""
    cfg = model.config
    z = model.encoder.linear(model.patchify(video))  # (B, L, t, h, w)
    out = rearrange(model.decoder.linear(z, None), "b (d i j) t h w -> b d t (h i) (w j)", i=cfg.cell_patches,
                    j=cfg.cell_patches)
    return model.unpatchify(out)[:, :, cfg.temporal_factor - 1:]


@torch.no_grad()
def diagnose(models: dict, windows: list[torch.Tensor], temporal_factor: int,
             captions: list[str | None] | None = None) -> dict:
    """models: name -> (video (1, 3, T, H, W) on [-1, 1] -> reconstruction on [-1, 1]). With synthetic captions,
    each reconstruction is scored by the motion scorer too."""
    from data.synthetic import parse_caption
    from data.video_io import tensor_to_frames
    from evaluation.metrics import frame_errors, psnr_from_mse, seam_ratios
    from evaluation.motion_score import score_frames

    captions = captions or [None] * len(windows)
    scored = [c is not None and parse_caption(c) is not None for c in captions]

    signal = sum(band_energy(w * 0.5 + 0.5) for w in windows)
    out = {}
    for name, run in models.items():
        errors, sq, motion, edge_sq, flat_sq, edge_n, flat_n = 0, 0, 0, 0.0, 0.0, 0, 0
        scores = []
        for w, caption, score in zip(windows, captions, scored):
            rebuilt = run(w).clamp(-1, 1)
            if score:
                scores.append(score_frames(tensor_to_frames(rebuilt[0]), caption))
            original, recon = w * 0.5 + 0.5, rebuilt * 0.5 + 0.5  # [0, 1]
            errors = errors + band_energy(recon - original)
            s, m = frame_errors(original, recon)
            sq, motion = sq + s, motion + m
            edges, flat = edge_masks(original)
            err = (recon.double() - original.double()).pow(2).mean(dim=1, keepdim=True)
            edge_sq += float(err[edges].sum())
            flat_sq += float(err[flat].sum())
            edge_n += int(edges.sum())
            flat_n += int(flat.sum())
        n = len(windows)
        mse = sq / n
        out[name] = {
            "psnr": float(psnr_from_mse(mse.mean())),
            "band_error_db": [10 * math.log10(max(float(e / s), 1e-30)) for e, s in zip(errors, signal)],
            "frame_mse": mse.tolist(),
            "seams": seam_ratios(sq, motion, temporal_factor),
            "psnr_edges": float(psnr_from_mse(torch.tensor(edge_sq / edge_n))),
            "psnr_flat": float(psnr_from_mse(torch.tensor(flat_sq / flat_n))),
        }
        if scores:
            out[name]["motion"] = {m: sum(getattr(x, m) for x in scores) / len(scores)
                                   for m in ("presence", "color", "shape")} | {"clips": len(scores)}
    return out


def read_windows(data: str, frames: int, size: int, windows: int) -> tuple[list[torch.Tensor], list[str], list]:
    """Windows (1, 3, T, H, W) of the footage, their names, and their captions (None without one)."""
    from data import read_clip
    from data.sources import find_videos, window_starts

    videos, _ = find_videos(data)
    clips, names, captions = [], [], []
    for v in videos:
        for start in window_starts(v.info, frames, None, windows):
            clips.append(read_clip(v.data, frames, size=(size, size), start=start, info=v.info).to_tensor()[None])
            names.append(f"{v.name}@{start}")
            captions.append(v.caption)
    if not clips:
        raise SystemExit(f"error: no window of {frames} frames in {data}")
    return clips, names, captions


def fitting_clips(run: Path | None, fit_data: str | None, count: int, frames: int, size: int) -> torch.Tensor:
    """The clips the start is fitted to: --fit-data, else the run's own training data (its config.json)."""
    from data import make_loader

    if fit_data is None:
        if run is None or not (run / "config.json").is_file():
            raise SystemExit("error: give --fit-data (clips to fit the starting linear codec to) or a run folder as --ckpt")
        fit_data = json.loads((run / "config.json").read_text())["args"]["data"]
    loader = make_loader(fit_data, min(count, 16), frames, size, mode="train", num_workers=0, seed=0)
    parts, it = [], iter(loader)
    while sum(len(p) for p in parts) < count:
        parts.append(next(it)["video"])
    return torch.cat(parts)[:count]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in report.items():
        axes[0].plot(BAND_NAMES, r["band_error_db"], "o-", label=name)
        axes[1].plot(range(len(r["frame_mse"])), [10 * math.log10(1 / max(v, 1e-12)) for v in r["frame_mse"]], "o-",
                     markersize=3, label=name)
    starts = next(iter(report.values()))["seams"].get("group_starts", [])
    for s in starts:
        axes[1].axvline(s, color="grey", lw=0.5, ls=":")
    axes[0].set(title="error energy / signal energy per band", xlabel="spatial frequency (cycles / pixel)", ylabel="dB")
    axes[1].set(title="PSNR per frame (dotted: latent group starts)", xlabel="frame", ylabel="PSNR dB")
    names = list(report)
    x = torch.arange(len(names)).float()
    axes[2].bar(x - 0.2, [report[n]["psnr_edges"] for n in names], 0.4, label="edges (top 20% gradient)")
    axes[2].bar(x + 0.2, [report[n]["psnr_flat"] for n in names], 0.4, label="flat (bottom 50%)")
    axes[2].set_xticks(x.tolist(), names)
    axes[2].set(title="PSNR on edges and flat areas", ylabel="PSNR dB")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", "--run", dest="ckpt", type=Path, required=True,
                   help="a tokenizer run folder (its model/ is evaluated, its data fits the start), or a tokenizer "
                        "folder (then give --fit-data)")
    p.add_argument("--fit-data", help="clips the starting linear codec is fitted to (default: the run's data)")
    p.add_argument("--fit-clips", type=int, default=None, help="how many (default: the run's --pca-init-clips, or 64)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "clips"), help="held-out footage")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--windows", type=int, default=2, help="windows per video")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tokenizer_diagnosis")
    args = p.parse_args(argv)
    from tokenizer import CausalVAE

    torch.manual_seed(0)
    run = args.ckpt if (args.ckpt / "model").is_dir() else None  # a train.py run folder, or its model alone
    folder = args.ckpt / "model" if run else args.ckpt
    trained = load_vae(folder).eval()
    if not trained.config.linear_codec:
        raise SystemExit(f"error: {folder} has no linear codec path to compare the network against")
    run_args = json.loads((run / "config.json").read_text())["args"] if run else {}
    count = args.fit_clips or run_args.get("pca_init_clips") or 64
    start = CausalVAE(trained.config).eval()
    fit = fitting_clips(run, args.fit_data, count, args.frames, args.size)
    kept = fit_linear_codec(start, fit)
    windows, names, captions = read_windows(args.data, args.frames, args.size, args.windows)
    models = {"start": lambda v: start.decode(start.encode(v).mean),
              "linear path": lambda v: linear_only(trained, v),
              "trained": lambda v: trained.decode(trained.encode(v).mean)}
    report = diagnose(models, windows, trained.config.temporal_factor, captions)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps({"windows": names, "fit_clips": len(fit), "start_energy_kept": kept,
                                                      "settings": vars(args) | {"run": str(run), "ckpt": str(folder)},
                                                      "results": report}, indent=2, default=str) + "\n")
    plot(report, args.out / "diagnosis.png")
    print(f"\n{folder}: {len(windows)} held-out windows of {args.frames} frames at {args.size}x{args.size} "
          f"({args.data}); start fitted to {len(fit)} clips\n")
    print(markdown_table(["reconstruction", "PSNR", *[f"band {b} dB" for b in BAND_NAMES], "edges PSNR", "flat PSNR",
                          "seam error ratio", "seam motion ratio"],
                         [[n, f"{r['psnr']:.2f}", *[f"{v:.1f}" for v in r["band_error_db"]], f"{r['psnr_edges']:.2f}",
                           f"{r['psnr_flat']:.2f}", f"{r['seams']['error_ratio']:.2f}", f"{r['seams']['motion_ratio']:.2f}"]
                          for n, r in report.items()]))
    if any("motion" in r for r in report.values()):
        print("\nThe motion scorer on the reconstructions (the originals: 1.000 each)\n")
        print(markdown_table(["reconstruction", "clips", "presence", "colour", "shape"],
                             [[n, r["motion"]["clips"], *(f"{r['motion'][m]:.3f}" for m in ("presence", "color", "shape"))]
                              for n, r in report.items() if "motion" in r]))
    print(f"\nwrote {args.out / 'report.json'} and {args.out / 'diagnosis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
