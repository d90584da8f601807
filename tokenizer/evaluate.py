"""How faithfully a trained tokenizer reconstructs real video.

    python -m tokenizer.evaluate --ckpt DIR --data PATH --frames 17 --size 256 --out DIR
                                 [--windows 4] [--fps F] [--chunk N] [--tile PX] [--device cuda] [--no-videos]

PATH is a folder of video files (searched recursively), one video file, or shards (a folder of .tar,
a glob or a brace pattern). Each video is cut into `--windows` evenly spaced windows of `--frames`
frames, resized so the short side fits `--size` and centre-cropped, encoded and decoded (chunked
when `--chunk` is given). Reported per video and on average:
- PSNR on [0, 1] over all the video's evaluated frames, and SSIM (Gaussian window 11, sigma 1.5, as
  scikit-image computes it) averaged over frames; see tokenizer/metrics.py for the exact conventions;
- the same for the equal-floats baseline: trilinear down- and up-sampling to a grid holding as many
  floats as the latents (16 channels at 4x8x8 = 3 channels at 4x3.46x3.46);
- encode and decode throughput (frames/s) and the peak memory of the run.
Writes OUT/report.json, OUT/report.md and, per video, OUT/videos/NAME.mp4 with the original, the
reconstruction and the error amplified 4x side by side (first window).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import ClipTooShortError, VideoReadError, read_clip, write_video
from data.shards import sanitize_key
from data.sources import VideoSource, find_videos, window_starts
from data.video_io import check_frame_count
from errors import InputError
from evaluation.fvd import FrechetVideoDistance, fvd_from_features
from evaluation.lpips import LPIPS
from evaluation.metrics import equal_floats_baseline, psnr_from_mse, ssim_frames, to_unit_range
from evaluation.peak_memory import PeakMemory

from .diffusers_vae import DiffusersVAE, load_tokenizer
from .model import CausalVAE

log = logging.getLogger("tokenizer.evaluate")
ERROR_GAIN = 4.0  # amplification of |original - reconstruction| in the side-by-side videos


def side_by_side(original: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(3, T, H, W) x2 in [-1, 1] -> (3, T, H, 3W): original | reconstruction | amplified error."""
    error = ((original - recon).abs() * ERROR_GAIN).clamp(0, 2) - 1
    return torch.cat([original, recon, error], dim=-1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(vae: CausalVAE | DiffusersVAE, videos: list[VideoSource], frames: int, size: int, *, fps: float | None = None,
             windows: int = 4, chunk: int | None = None, tile: int | None = None, device: torch.device | str = "cpu",
             video_dir: Path | None = None, lpips: LPIPS | None = None, fvd: FrechetVideoDistance | None = None) -> dict:
    device = torch.device(device)
    vae = vae.to(device).eval()
    lpips = lpips.to(device) if lpips is not None else None
    latent_shape = vae.latent_shape(frames, size, size)
    rows, skipped, shortfalls = [], [], []  # shortfalls: videos that decode fewer frames than they claim
    feats: dict[str, list[torch.Tensor]] = {"real": [], "recon": [], "baseline": []}  # I3D features, for rFVD
    enc_time = dec_time = 0.0
    n_frames = 0
    with PeakMemory(device) as mem:
        for v in videos:
            try:  # every window read first: a file that holds fewer frames than it claims moves them into what decodes
                clips = [read_clip(v.data, frames, fps=fps, size=size, start=start, info=v.info)
                         for start in window_starts(v.info, frames, fps, windows)]
            except (ClipTooShortError, VideoReadError) as e:
                skipped.append((v.name, str(e)))
                continue
            clips = list({c.start: c for c in clips}.values())  # windows moved onto the same frames count once
            decoded = min((c.available for c in clips if c.available is not None), default=v.info.frames)
            if v.info.declared_frames or decoded < v.info.frames:
                shortfalls.append({"video": v.name, "declared": v.info.declared_frames or v.info.frames,
                                   "decoded": decoded})
            sq_err = sq_err_base = 0.0
            count = 0
            ssims, ssims_base, lp, lp_base = [], [], [], []
            for i, clip in enumerate(clips):
                x = clip.to_tensor().unsqueeze(0).to(device)  # (1, 3, T, H, W)
                _sync(device)
                t0 = time.perf_counter()
                z = vae.encode(x, chunk=chunk, tile=tile).mean
                _sync(device)
                t1 = time.perf_counter()
                y = vae.decode(z, chunk=chunk, tile=tile).clamp(-1, 1)
                _sync(device)
                enc_time, dec_time = enc_time + t1 - t0, dec_time + time.perf_counter() - t1
                n_frames += frames
                base = equal_floats_baseline(x, latent_shape).clamp(-1, 1)
                a, b, c = to_unit_range(x.float()), to_unit_range(y.float()), to_unit_range(base)
                sq_err += (a.double() - b.double()).pow(2).sum().item()
                sq_err_base += (a.double() - c.double()).pow(2).sum().item()
                count += a.numel()
                ssims += ssim_frames(a, b)[0].tolist()
                ssims_base += ssim_frames(a, c)[0].tolist()
                if fvd is not None:
                    for name, clip_ in (("real", x), ("recon", y), ("baseline", base)):
                        feats[name].append(fvd.features(clip_))
                if lpips is not None:
                    lp.append(lpips.video(x, y).item())
                    lp_base.append(lpips.video(x, base).item())
                if i == 0 and video_dir is not None:
                    write_video(video_dir / f"{sanitize_key(Path(v.name).stem)}.mp4", side_by_side(x[0].cpu(), y[0].cpu()),
                                fps=clip.fps or 8.0)
            rows.append({
                "video": v.name,
                "windows": len(clips),
                "frames": len(ssims),
                "psnr": psnr_from_mse(torch.tensor(sq_err / count)).item(),
                "ssim": float(np.mean(ssims)),
                "baseline_psnr": psnr_from_mse(torch.tensor(sq_err_base / count)).item(),
                "baseline_ssim": float(np.mean(ssims_base)),
            } | ({"lpips": float(np.mean(lp)), "baseline_lpips": float(np.mean(lp_base))} if lpips is not None else {}))
    keys = ("psnr", "ssim", "baseline_psnr", "baseline_ssim") + (("lpips", "baseline_lpips") if lpips is not None else ())
    mean = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys}
    if fvd is not None and len(feats["real"]) >= 2:
        real = torch.cat(feats["real"])
        mean |= {"rfvd": fvd_from_features(real, torch.cat(feats["recon"])),
                 "baseline_rfvd": fvd_from_features(real, torch.cat(feats["baseline"])), "rfvd_clips": len(real)}
    return {
        "videos": rows,
        "mean": mean,
        "skipped": [{"video": n, "reason": r} for n, r in skipped],
        "shortfalls": shortfalls,
        "encode_frames_per_s": n_frames / enc_time if enc_time else float("nan"),
        "decode_frames_per_s": n_frames / dec_time if dec_time else float("nan"),
        "peak_memory_mb": mem.peak_mb,
        "device": str(device),
        "settings": {"frames": frames, "size": size, "fps": fps, "windows": windows, "chunk": chunk, "tile": tile,
                     "latent_shape": list(latent_shape)},
        "conventions": {
            "psnr": "per video, from the MSE over all its evaluated frames on [0, 1] (peak 1), then averaged over videos",
            "ssim": "per frame: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, population covariance, data range 1, "
                    "5-pixel border excluded, averaged over RGB; then over frames, then over videos (= scikit-image)",
            "baseline": "trilinear down- and up-sampling to a 3-channel grid with as many floats as the latents",
            "lpips": "VGG16 LPIPS v0.1 from the given local weights, per frame, averaged over frames then videos",
            "rfvd": "Frechet distance of I3D (Kinetics-400, TorchScript, local) logits between all original and all "
                    "reconstructed windows, short side resized to 224 and centre-cropped; needs hundreds of windows "
                    "to be meaningful (the count is reported)",
        },
    }


def markdown(report: dict, ckpt: str, data: str) -> str:
    s = report["settings"]
    lines = [
        f"# Tokenizer reconstruction: `{ckpt}`",
        "",
        f"Data `{data}`: {len(report['videos'])} videos, up to {s['windows']} windows of {s['frames']} frames "
        f"at {s['size']}x{s['size']}" + (f", {s['fps']} fps" if s["fps"] else "") + f"; latents {tuple(s['latent_shape'])}.",
        "",
    ]
    has_lpips = "lpips" in report["mean"]
    head = "| video | frames | PSNR (dB) | SSIM |" + (" LPIPS |" if has_lpips else "")
    head += " baseline PSNR (dB) | baseline SSIM |" + (" baseline LPIPS |" if has_lpips else "")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]

    def cells(r: dict) -> str:
        ours = f" {r['psnr']:.2f} | {r['ssim']:.4f} |" + (f" {r['lpips']:.4f} |" if has_lpips else "")
        base = f" {r['baseline_psnr']:.2f} | {r['baseline_ssim']:.4f} |" + (f" {r['baseline_lpips']:.4f} |" if has_lpips else "")
        return ours + base

    for r in report["videos"]:
        lines.append(f"| {r['video']} | {r['frames']} |" + cells(r))
    lines += [
        "| **mean** | |" + cells(report["mean"]),
        "",
        *([f"rFVD {report['mean']['rfvd']:.1f} (baseline {report['mean']['baseline_rfvd']:.1f}) over "
           f"{report['mean']['rfvd_clips']} windows.", ""] if "rfvd" in report["mean"] else []),
        f"Encode {report['encode_frames_per_s']:.1f} frames/s, decode {report['decode_frames_per_s']:.1f} frames/s, "
        f"peak memory {report['peak_memory_mb']:.0f} MB above the model ({report['device']}).",
        "",
        "Conventions: " + "; ".join(f"{k}: {v}" for k, v in report["conventions"].items()) + ".",
    ]
    for short in report["shortfalls"]:
        lines.append(f"\n{short['video']} claims {short['declared']} frames and decodes {short['decoded']}: its "
                     f"windows were taken from the frames that decode")
    for sk in report["skipped"]:
        lines.append(f"\nSkipped {sk['video']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="tokenizer checkpoint folder (config.json + model.safetensors)")
    parser.add_argument("--data", required=True, help="a folder of videos, a video file, or shards")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md and videos/")
    parser.add_argument("--frames", type=int, default=17, help="frames per window, 1 + 4k (default 17)")
    parser.add_argument("--size", type=int, default=256, help="square crop side, a multiple of the spatial factor")
    parser.add_argument("--windows", type=int, default=4, help="evenly spaced windows per video (default 4)")
    parser.add_argument("--fps", type=float, default=None, help="target frame rate (default: each file's own)")
    parser.add_argument("--chunk", type=int, default=None, help="latent frames per encode/decode step (bounded memory)")
    parser.add_argument("--tile", type=int, default=None, help="spatial tiles of this many pixels (exact; for large frames)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-videos", action="store_true", help="do not write the side-by-side videos")
    parser.add_argument("--lpips-vgg", help="local VGG16 ImageNet weights (torchvision's state dict) to report LPIPS")
    parser.add_argument("--lpips-heads", help="local LPIPS v0.1 linear-head weights (the lpips package's vgg.pth)")
    parser.add_argument("--i3d", help="local TorchScript I3D (i3d_torchscript.pt) to report rFVD over all windows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        check_frame_count(args.frames)
        vae = load_tokenizer(args.ckpt)
        vae.check_video(torch.empty(1, 3, args.frames, args.size, args.size, device="meta"))
        if bool(args.lpips_vgg) != bool(args.lpips_heads):
            raise InputError("LPIPS needs both --lpips-vgg and --lpips-heads")
        lpips = LPIPS.from_local(args.lpips_vgg, args.lpips_heads) if args.lpips_vgg else None
        fvd = FrechetVideoDistance.from_local(args.i3d, args.device) if args.i3d else None
        videos, skipped = find_videos(args.data)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not videos:
        print(f"error: no readable video under {args.data}" + "".join(f"\n  {n}: {r}" for n, r in skipped), file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    report = evaluate(vae, videos, args.frames, args.size, fps=args.fps, windows=args.windows, chunk=args.chunk, tile=args.tile,
                      device=args.device, video_dir=None if args.no_videos else args.out / "videos", lpips=lpips, fvd=fvd)
    report["skipped"] = [{"video": n, "reason": r} for n, r in skipped] + report["skipped"]
    report["checkpoint"], report["data"] = str(args.ckpt), str(args.data)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report, args.ckpt, args.data)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0 if report["videos"] else 1


if __name__ == "__main__":
    sys.exit(main())
