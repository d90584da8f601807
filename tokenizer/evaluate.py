"""How faithfully tokenizers reconstruct real video: ours and the field's, side by side on the same windows.

    python -m tokenizer.evaluate --ckpt DIR [--ckpt DIR ...] --data PATH --frames 17 --size 256 [192 320] --out DIR
                                 [--aspect square|native] [--windows 4] [--fps F] [--chunk N] [--tile PX]
                                 [--lpips-vgg W --lpips-heads H] [--i3d I3D] [--device cuda] [--no-videos]

Each --ckpt is one of our tokenizer folders or a diffusers video autoencoder folder (Wan, CogVideoX,
HunyuanVideo, LTX-Video: `tokenizer.diffusers_vae`). PATH is a folder of video files (searched recursively),
one video file, or shards (a folder of .tar, a glob or a brace pattern). Each video is cut into `--windows`
evenly spaced windows of `--frames` frames (the same first frames on every run over the same footage: no
randomness), resized so the short side fits `--size` and centre-cropped, square or at the video's own aspect
ratio; every tokenizer encodes and decodes exactly these windows. Reported per tokenizer, per video and on
average:
- PSNR on [0, 1] over all the video's evaluated frames, and SSIM (Gaussian window 11, sigma 1.5, as
  scikit-image computes it) averaged over frames; LPIPS and rFVD with local weights;
- the same for the equal-floats baseline: trilinear down- and up-sampling to a grid holding as many
  floats as the tokenizer's latents (16 channels at 4x8x8 = 3 channels at 4x3.46x3.46);
- compression, latent floats per pixel, encode and decode throughput (frames/s) and peak memory;
- seams: the error and the frame-to-frame motion error at frames that start a latent group against the
  others (a ratio above 1 is a seam), and the PSNR at every frame of the window (psnr_per_frame.png).
Writes OUT/report.json, OUT/report.md, OUT/psnr_per_frame.png and, per video, OUT/videos/NAME.mp4 with the
original and every tokenizer's reconstruction and amplified error side by side (first window).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from checkpoint_io import check_writable, save_figure, write_json_atomic, write_text_atomic
from cpu_allocator import keep_freed_memory
from data import ClipTooShortError, VideoInfo, VideoReadError, read_clip
from data.shards import sanitize_key
from data.sources import VideoSource, find_videos, window_starts
from data.clip_options import add_clip_options, check_clip_options
from data.video_io import WindowCutShort, size_pair, window_stride
from errors import InputError
from evaluation.fvd import FrechetVideoDistance, fvd_from_features
from evaluation.lpips import LPIPS
from evaluation.metrics import psnr_from_mse, seam_ratios
from evaluation.peak_memory import PeakMemory

from .checkpoint import load_tokenizer
from .model import CausalVAE
from .window_scores import (ERROR_GAIN, Candidate, WindowScore, WindowSource, score_streaming, score_whole,
                            write_side_by_side)

log = logging.getLogger("tokenizer.evaluate")


def candidate_names(paths: list[str]) -> list[str]:
    """Short unique names for checkpoint folders: the folder's name, with its parent's where the name is generic."""
    names = []
    for p in paths:
        path = Path(p)
        name = f"{path.parent.name}/{path.name}" if path.name in ("model", "tokenizer", "vae") else path.name
        names.append(name if name not in names else f"{name} ({len(names) + 1})")
    return names


def clip_size(info: VideoInfo, size: int | tuple[int, int], multiple: int, aspect: str) -> tuple[int, int]:
    """(height, width) a window is read at: (height, width) when given as two, `size` square, or the video's own
    aspect ratio with the short side `size` and the long side the nearest multiple of `multiple`."""
    if not isinstance(size, int):
        return tuple(size)
    if aspect == "square" or not info.width or not info.height:
        return size, size
    long_side = max(multiple, round(size * max(info.width, info.height) / min(info.width, info.height) / multiple) * multiple)
    return (size, long_side) if info.width >= info.height else (long_side, size)


class _Tally:
    """What one tokenizer accumulates over the videos."""

    def __init__(self, frames: int):
        self.rows: list[dict] = []
        self.enc = self.dec = 0.0
        self.frames = 0
        self.peak_mb = float("nan")
        self.sq = torch.zeros(frames, dtype=torch.float64)  # per-frame squared error, summed over windows
        self.motion = torch.zeros(frames, dtype=torch.float64)
        self.windows = 0
        self.feats: dict[str, list[torch.Tensor]] = {"real": [], "recon": [], "baseline": []}
        self.latent_floats = self.pixels = 0
        self.chunk_gap = 0.0  # largest |chunked or tiled - whole| seen on first windows


def streams(vae, tile, fvd) -> bool:
    """Whether a tokenizer is evaluated a chunk at a time from the file: ours, untiled, without rFVD (whose
    detector takes the window whole); the field's models walk time themselves and take the window whole."""
    return isinstance(vae, CausalVAE) and tile is None and fvd is None


@torch.no_grad()
def evaluate(tokenizers: list[Candidate], videos: list[VideoSource], frames: int, size: int | tuple[int, int],
             *, aspect: str = "square", fps: float | None = None, windows: int = 4, chunk: int | None = None,
             tile: int | None = None, device: torch.device | str = "cpu", video_dir: Path | None = None,
             plot: Path | None = None, lpips: LPIPS | None = None, fvd: FrechetVideoDistance | None = None) -> dict:
    """Every tokenizer on exactly the same windows: see the module's docstring for what is reported. Our
    tokenizers read each window from the file a chunk at a time (`--chunk`), so their memory does not grow with
    the window's length."""
    device = torch.device(device)
    for c in tokenizers:
        c.model.to(device).eval()
    lpips = lpips.to(device) if lpips is not None else None
    multiple = math.lcm(*(c.model.config.spatial_factor for c in tokenizers))
    tallies = {c.name: _Tally(frames) for c in tokenizers}
    # one tokenizer that takes the window whole: it is read once, whole, for all of them, not once each
    hold = not all(streams(c.model, tile, fvd) for c in tokenizers)
    skipped, shortfalls, shapes = [], [], {}
    if video_dir is not None:
        video_dir.mkdir(parents=True, exist_ok=True)
    # the first window's reconstructions, as uint8 frames on disk until the side-by-side video is written
    scratch = Path(tempfile.mkdtemp(prefix=".reconstructions-", dir=video_dir))
    try:
        for v in videos:
            height, width = clip_size(v.info, size, multiple, aspect)
            try:
                starts = window_starts(v.info, frames, fps, windows)
            except ClipTooShortError as e:
                skipped.append((v.name, str(e)))
                continue
            rows = {c.name: WindowScore(frames) for c in tokenizers}
            seen, decoded, first, scored = set(), v.info.frames, None, 0
            for start in starts:
                recons = [scratch / f"{i}.u8" for i in range(len(tokenizers))] if first is None and video_dir else []
                results = None
                if not hold:  # read from the file a chunk at a time, by each tokenizer
                    src = WindowSource(v.name, v.data, v.info, frames, fps, (height, width), start)
                    try:
                        results = _score_window(tokenizers, src, chunk, tile, device, lpips, fvd, first is None, recons)
                    except (WindowCutShort, ClipTooShortError, VideoReadError):
                        pass  # a file that holds fewer frames than it claims: read whole, moved into what decodes
                if results is None:  # the window read once, whole, for every tokenizer
                    try:
                        clip = read_clip(v.data, frames, fps=fps, size=(height, width), start=start, info=v.info)
                    except (ClipTooShortError, VideoReadError) as e:
                        if not scored:
                            skipped.append((v.name, str(e)))
                            break
                        continue
                    decoded = min(decoded, clip.available or decoded)
                    if clip.start in seen:
                        continue  # moved onto frames already scored
                    src = WindowSource(v.name, v.data, v.info, frames, fps, (height, width), clip.start, held=clip.frames)
                    results = _score_window(tokenizers, src, chunk, tile, device, lpips, fvd, first is None, recons)
                seen.add(src.start)
                scored += 1
                if first is None:
                    first = (src, recons)
                for cand, score in zip(tokenizers, results):
                    _merge(tallies[cand.name], rows[cand.name], score, frames, height, width)
            if not scored:
                continue
            shapes[v.name] = [height, width]
            if v.info.declared_frames or decoded < v.info.frames:
                shortfalls.append({"video": v.name, "declared": v.info.declared_frames or v.info.frames,
                                   "decoded": decoded})
            for cand in tokenizers:
                tallies[cand.name].rows.append(_row(v.name, scored, rows[cand.name], lpips is not None))
            if video_dir is not None and first[1]:
                src, recons = first
                write_side_by_side(video_dir / f"{sanitize_key(Path(v.name).stem)}.mp4", src, recons,
                                    fps=_window_fps(v.info, fps))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {}
    for cand in tokenizers:
        results[cand.name] = _summary(cand, tallies[cand.name], lpips is not None, fvd is not None, chunk, tile)
    if plot is not None and any(t.windows for t in tallies.values()):
        psnr_per_frame_plot(results, plot)
    first = tokenizers[0].model
    return {
        "tokenizers": results,
        "order": [c.name for c in tokenizers],
        "skipped": [{"video": n, "reason": r} for n, r in skipped],
        "shortfalls": shortfalls,
        "device": str(device),
        "settings": {"frames": frames, "size": size if isinstance(size, int) else list(size), "aspect": aspect, "fps": fps, "windows": windows, "chunk": chunk,
                     "tile": tile, "sizes": shapes,
                     "latent_shape": list(first.latent_shape(frames, *size_pair(size))) if len(tokenizers) == 1 else None},
        "conventions": CONVENTIONS,
    }


def _score_window(tokenizers: list[Candidate], src: WindowSource, chunk, tile, device, lpips, fvd, check_gap: bool,
                  recons: list[Path]) -> list[WindowScore]:
    """Every tokenizer on one window, each with its peak memory above what was held when it began."""
    results = []
    for i, cand in enumerate(tokenizers):
        recon = open(recons[i], "wb") if recons else None
        mem = PeakMemory(device).start()
        try:
            if streams(cand.model, tile, fvd):
                score = score_streaming(cand, src, chunk, device, lpips, check_gap, recon)
            else:
                score = score_whole(cand, src, chunk, tile, device, lpips, fvd, check_gap, recon)
        finally:
            mem.stop()
            if recon is not None:
                recon.close()
        score.peak_mb = mem.peak_mb
        results.append(score)
    return results


def _merge(tally: _Tally, row: WindowScore, score: WindowScore, frames: int, height: int, width: int) -> None:
    """A whole window's measurements into its tokenizer's tally and its video's row."""
    tally.enc, tally.dec, tally.frames = tally.enc + score.enc, tally.dec + score.dec, tally.frames + frames
    tally.chunk_gap = max(tally.chunk_gap, score.gap)
    tally.sq += score.frame_sq
    tally.motion += score.frame_motion
    tally.windows += 1
    tally.latent_floats += score.latent_floats
    tally.pixels += frames * height * width
    for name, feats in score.feats.items():
        tally.feats[name] += feats
    tally.peak_mb = score.peak_mb if math.isnan(tally.peak_mb) else max(tally.peak_mb, score.peak_mb)
    row.sq_err, row.sq_err_base, row.count = row.sq_err + score.sq_err, row.sq_err_base + score.sq_err_base, row.count + score.count
    row.ssims += score.ssims
    row.ssims_base += score.ssims_base
    row.lp, row.lp_base = row.lp + score.lp, row.lp_base + score.lp_base


def _row(name: str, windows: int, row: WindowScore, has_lpips: bool) -> dict:
    return {
        "video": name,
        "windows": windows,
        "frames": len(row.ssims),
        "psnr": psnr_from_mse(torch.tensor(row.sq_err / row.count)).item(),
        "ssim": float(np.mean(row.ssims)),
        "baseline_psnr": psnr_from_mse(torch.tensor(row.sq_err_base / row.count)).item(),
        "baseline_ssim": float(np.mean(row.ssims_base)),
    } | ({"lpips": row.lp / windows, "baseline_lpips": row.lp_base / windows} if has_lpips else {})


def _window_fps(info: VideoInfo, fps: float | None) -> float:
    """The frame rate a window plays at: the file's over the stride, else 8."""
    return info.fps / window_stride(info.fps, fps) if info.fps > 0 else 8.0


def _summary(cand: Candidate, tally: _Tally, has_lpips: bool, has_fvd: bool, chunk, tile) -> dict:
    rows = tally.rows
    keys = ("psnr", "ssim", "baseline_psnr", "baseline_ssim") + (("lpips", "baseline_lpips") if has_lpips else ())
    mean = {k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys}
    if has_fvd and len(tally.feats["real"]) >= 2:
        real = torch.cat(tally.feats["real"])
        mean |= {"rfvd": fvd_from_features(real, torch.cat(tally.feats["recon"])),
                 "baseline_rfvd": fvd_from_features(real, torch.cat(tally.feats["baseline"])), "rfvd_clips": len(real)}
    cfg = cand.model.config
    per_frame = tally.sq / max(1, tally.windows)
    out = {
        "ckpt": cand.ckpt,
        "kind": getattr(cfg, "class_name", "CausalVAE"),
        "compression": list(cfg.compression),
        "latent_channels": cfg.latent_channels,
        "latent_floats_per_pixel": tally.latent_floats / tally.pixels if tally.pixels else float("nan"),
        "videos": rows,
        "mean": mean,
        "encode_frames_per_s": tally.frames / tally.enc if tally.enc else float("nan"),
        "decode_frames_per_s": tally.frames / tally.dec if tally.dec else float("nan"),
        "peak_memory_mb": tally.peak_mb,
        "seams": seam_ratios(tally.sq, tally.motion, cfg.temporal_factor) if tally.windows else {},
        "psnr_per_frame": [psnr_from_mse(m).item() if m > 0 else float("inf") for m in per_frame] if tally.windows else [],
    }
    if chunk is not None or tile is not None:
        out["chunked_max_abs_difference"] = tally.chunk_gap  # against the whole clip, first windows
    return out


def psnr_per_frame_plot(results: dict, path: Path) -> None:
    """PSNR at each frame index, over all windows, one line per tokenizer; group-start frames marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, r in results.items():
        values = np.array(r["psnr_per_frame"], dtype=float)
        if not len(values):
            continue
        line, = ax.plot(np.arange(len(values)), values, label=name)
        starts = r["seams"].get("group_starts", [])
        ax.plot(starts, values[starts], "o", color=line.get_color(), markersize=4)
    ax.set_xlabel("frame in the window (dots: frames that start a latent group)")
    ax.set_ylabel("PSNR (dB), all windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


CONVENTIONS = {
    "psnr": "per video, from the MSE over all its evaluated frames on [0, 1] (peak 1), then averaged over videos",
    "ssim": "per frame: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, population covariance, data range 1, "
            "5-pixel border excluded, averaged over RGB; then over frames, then over videos (= scikit-image)",
    "baseline": "trilinear down- and up-sampling to a 3-channel grid with as many floats as the tokenizer's latents",
    "lpips": "VGG16 LPIPS v0.1 from the given local weights, per frame, averaged over frames then videos",
    "rfvd": "Frechet distance of I3D (Kinetics-400, TorchScript, local) logits between all original and all "
            "reconstructed windows, short side resized to 224 and centre-cropped; needs hundreds of windows "
            "to be meaningful (the count is reported)",
    "seams": "mean squared error, and mean |frame-to-frame change of the reconstruction - that of the original|, at "
             "frames that start a latent group (1, 1 + tf, ...) divided by the same at the other frames after the "
             "first, over all windows; 1 means no seam",
}


def markdown(report: dict, data: str) -> str:
    s = report["settings"]
    results = report["tokenizers"]
    sizes = sorted({tuple(v) for v in s["sizes"].values()})
    lines = [
        "# Tokenizer reconstruction",
        "",
        f"Data `{data}`: up to {s['windows']} windows of {s['frames']} frames per video"
        + (f" at {s['fps']} fps" if s["fps"] else "") + ", read at "
        + ", ".join(f"{h}x{w}" for h, w in sizes) + f" ({s['aspect']}); every tokenizer on the same windows.",
        "",
    ]
    has_lpips = any("lpips" in r["mean"] for r in results.values())
    has_fvd = any("rfvd" in r["mean"] for r in results.values())
    head = ["tokenizer", "compression t x h x w", "latent floats / pixel", "PSNR (dB)", "SSIM"]
    head += ["LPIPS"] * has_lpips + ["rFVD"] * has_fvd
    head += ["baseline PSNR", "baseline SSIM"] + ["baseline LPIPS"] * has_lpips + ["baseline rFVD"] * has_fvd
    head += ["seam error ratio", "seam motion ratio", "encode frames/s", "decode frames/s", "peak MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        m, seam = r["mean"], r["seams"]
        cells = [name, "x".join(map(str, r["compression"])), f"{r['latent_floats_per_pixel']:.4f}",
                 f"{m['psnr']:.2f}", f"{m['ssim']:.4f}"]
        nan = float("nan")
        cells += ([f"{m.get('lpips', nan):.4f}"] if has_lpips else []) + ([f"{m.get('rfvd', nan):.1f}"] if has_fvd else [])
        cells += [f"{m['baseline_psnr']:.2f}", f"{m['baseline_ssim']:.4f}"]
        cells += (([f"{m.get('baseline_lpips', nan):.4f}"] if has_lpips else [])
                  + ([f"{m.get('baseline_rfvd', nan):.1f}"] if has_fvd else []))
        cells += [f"{seam.get('error_ratio', float('nan')):.2f}", f"{seam.get('motion_ratio', float('nan')):.2f}",
                  f"{r['encode_frames_per_s']:.1f}", f"{r['decode_frames_per_s']:.1f}", f"{r['peak_memory_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, r in results.items():
        lines += [f"## {name}" + (f" (`{r['ckpt']}`)" if r["ckpt"] else ""), "",
                  "| video | frames | PSNR (dB) | SSIM |" + (" LPIPS |" if has_lpips else "")
                  + " baseline PSNR (dB) | baseline SSIM |" + (" baseline LPIPS |" if has_lpips else ""),
                  "|" + "---|" * (6 + 2 * has_lpips)]
        for v in r["videos"]:
            lines.append(f"| {v['video']} | {v['frames']} | {v['psnr']:.2f} | {v['ssim']:.4f} |"
                         + (f" {v['lpips']:.4f} |" if has_lpips else "")
                         + f" {v['baseline_psnr']:.2f} | {v['baseline_ssim']:.4f} |"
                         + (f" {v['baseline_lpips']:.4f} |" if has_lpips else ""))
        if "rfvd" in r["mean"]:
            lines += ["", f"rFVD {r['mean']['rfvd']:.1f} (baseline {r['mean']['baseline_rfvd']:.1f}) over "
                          f"{r['mean']['rfvd_clips']} windows."]
        if "chunked_max_abs_difference" in r:
            gap = r["chunked_max_abs_difference"]
            lines += ["", f"Chunked / tiled against the whole clip (first windows): largest difference {gap:.2e}"
                          + (" (equal)" if gap < 1e-4 else " (not equal: the model's tiling is an approximation)")]
        lines.append("")
    lines += [f"Peak memory is above what was held when each tokenizer started, on {report['device']}. Side-by-side "
              f"videos: original, then each tokenizer's reconstruction and its error x{ERROR_GAIN:g}, in the table's "
              f"order. psnr_per_frame.png: PSNR at each frame of the window.", "",
              "Conventions: " + "; ".join(f"{k}: {v}" for k, v in report["conventions"].items()) + "."]
    for short in report["shortfalls"]:
        lines.append(f"\n{short['video']} claims {short['declared']} frames and decodes {short['decoded']}: its "
                     f"windows were taken from the frames that decode")
    for sk in report["skipped"]:
        lines.append(f"\nSkipped {sk['video']}: {sk['reason']}")
    return "\n".join(lines) + "\n"


def _tile(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile takes a number of pixels or auto, not {value!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, action="append",
                        help="a tokenizer: our checkpoint folder, or a diffusers video autoencoder folder; repeat to "
                             "compare several on the same windows")
    parser.add_argument("--data", required=True, help="a folder of videos, a video file, or shards")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.json, report.md and videos/")
    add_clip_options(parser, frames=17, size=256, frames_help="frames per window, 1 + 4k, a count every tokenizer takes",
                     size_help="square side, or the short side with --aspect native, or HEIGHT WIDTH; multiples of "
                               "every spatial factor")
    parser.add_argument("--aspect", choices=["square", "native"], default="square",
                        help="square centre crops, or each video's own aspect ratio (the long side rounded to a "
                             "multiple of every tokenizer's spatial factor)")
    parser.add_argument("--windows", type=int, default=4, help="evenly spaced windows per video (default 4)")
    parser.add_argument("--chunk", type=int, default=None, help="latent frames per encode/decode step (bounded memory)")
    parser.add_argument("--tile", type=_tile, default=None,
                        help="spatial tiles of this many pixels (ours: exact; a diffusers model's own tiling: blended), "
                             "or auto: each diffusers model's own default tiling for long or large clips, ours whole")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help='cpu, cuda, cuda:N (default: cuda when available)')
    parser.add_argument("--no-videos", action="store_true", help="do not write the side-by-side videos")
    parser.add_argument("--lpips-vgg", help="local VGG16 ImageNet weights (torchvision's state dict) to report LPIPS")
    parser.add_argument("--lpips-heads", help="local LPIPS v0.1 linear-head weights (the lpips package's vgg.pth)")
    parser.add_argument("--i3d", help="local TorchScript I3D (i3d_torchscript.pt) to report rFVD over all windows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory()
    try:
        sides = [args.size] if isinstance(args.size, int) else list(args.size)
        check_clip_options(args)
        check_writable(args.out)  # a read-only or impossible --out is one line before any model loads
        height, width = args.size
        if len(sides) == 2 and args.aspect == "native":
            raise InputError("--aspect native sizes each video by its short side: give --size one side, or drop "
                             "--aspect native to crop every window to HEIGHT x WIDTH")
        args.size = sides[0] if len(sides) == 1 else (height, width)
        tokenizers = []
        for name, ckpt in zip(candidate_names(args.ckpt), args.ckpt):
            model = load_tokenizer(ckpt)
            try:
                model.check_video(torch.empty(1, 3, args.frames, height, width, device="meta"))
            except InputError as e:
                raise InputError(f"{name}: {e}") from None
            tokenizers.append(Candidate(name, ckpt, model))
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
    try:
        report = evaluate(tokenizers, videos, args.frames, args.size, aspect=args.aspect, fps=args.fps,
                          windows=args.windows, chunk=args.chunk, tile=args.tile, device=args.device,
                          video_dir=None if args.no_videos else args.out / "videos",
                          plot=args.out / "psnr_per_frame.png", lpips=lpips, fvd=fvd)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted (Ctrl-C): no report written; the side-by-side videos finished so far are in "
              f"{args.out / 'videos'}", file=sys.stderr)
        return 130
    report["skipped"] = [{"video": n, "reason": r} for n, r in skipped] + report["skipped"]
    report["data"] = str(args.data)
    write_json_atomic(args.out / "report.json", report)
    text = markdown(report, args.data)
    write_text_atomic(args.out / "report.md", text)
    print(text)
    return 0 if any(r["videos"] for r in report["tokenizers"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
