"""Scoring one window of video with one tokenizer, for `tokenizer.evaluate`: ours read, encoded, decoded and
scored a chunk at a time from the file (memory flat in the window's length), or any tokenizer on the window
held whole; and the side-by-side video written a few frames at a time."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import VideoInfo, iter_clip, video_writer
from data.video_io import frames_to_tensor, tensor_to_frames
from errors import InputError
from evaluation.metrics import (StreamingBaseline, equal_floats_baseline, frame_errors, ssim_frames, to_unit_range,
                                unusable)

from .diffusers_vae import DiffusersVAE
from .model import CausalCache, CausalVAE


ERROR_GAIN = 4.0  # amplification of |original - reconstruction| in the side-by-side videos


@dataclass
class Candidate:
    """One tokenizer under evaluation: its name in the report, where it came from, and the model."""

    name: str
    ckpt: str
    model: CausalVAE | DiffusersVAE


def side_by_side(original: torch.Tensor, recons: list[torch.Tensor]) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (3, T, H, (1 + 2n) W): original | reconstruction, amplified error | ...
    for each of n tokenizers, in the report's order."""
    parts = [original]
    for recon in recons:
        parts += [recon, ((original - recon).abs() * ERROR_GAIN).clamp(0, 2) - 1]
    return torch.cat(parts, dim=-1)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_output(x: torch.Tensor, what: str, cand: Candidate, video: str) -> None:
    """A tokenizer whose output is not finite (or whose latents are astronomically large) has diverged: its
    scores would be a number that means nothing, so say so instead."""
    found = unusable(x, latents=what == "latents")
    if found:
        raise InputError(f"{cand.name} ({cand.ckpt}): its {what} of {video} {'are' if what == 'latents' else 'is'} "
                         f"{found}: the tokenizer has diverged (its model/run.json says how its run ended); evaluate "
                         f"an earlier checkpoint's export")


@dataclass
class WindowScore:
    """What one tokenizer measured on one window, kept apart until the window is whole (a window that a damaged
    file cuts short is read again, moved into the frames that decode, and this one dropped)."""

    frames: int
    sq_err: float = 0.0
    sq_err_base: float = 0.0
    count: int = 0
    lp: float = 0.0
    lp_base: float = 0.0
    latent_floats: int = 0
    enc: float = 0.0
    dec: float = 0.0
    gap: float = 0.0
    peak_mb: float = float("nan")

    def __post_init__(self):
        self.frame_sq = torch.zeros(self.frames, dtype=torch.float64)
        self.frame_motion = torch.zeros(self.frames, dtype=torch.float64)
        self.ssims: list[float] = []
        self.ssims_base: list[float] = []
        self.feats: dict[str, list[torch.Tensor]] = {"real": [], "recon": [], "baseline": []}

    def add(self, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, start: int, previous, lpips) -> tuple:
        """Frames [start, start + n) of the window: original x, reconstruction y and baseline (1, 3, n, H, W) in
        [-1, 1]. `previous`: the frame before them of the original and the reconstruction on [0, 1] (the motion
        error crosses chunks), or None; returns this chunk's last ones."""
        a, b, c = to_unit_range(x.float()), to_unit_range(y.float()), to_unit_range(base.float())
        self.sq_err += (a.double() - b.double()).pow(2).sum().item()
        self.sq_err_base += (a.double() - c.double()).pow(2).sum().item()
        self.count += a.numel()
        n = a.shape[2]
        if previous is None:
            sq, motion = frame_errors(a, b)
        else:
            sq, motion = (v[1:] for v in frame_errors(torch.cat([previous[0], a], 2), torch.cat([previous[1], b], 2)))
        self.frame_sq[start : start + n] += sq.cpu()
        self.frame_motion[start : start + n] += motion.cpu()
        self.ssims += ssim_frames(a, b)[0].tolist()
        self.ssims_base += ssim_frames(a, c)[0].tolist()
        if lpips is not None:
            self.lp += lpips.video(x, y).item() * n / self.frames
            self.lp_base += lpips.video(x, base).item() * n / self.frames
        return a[:, :, -1:], b[:, :, -1:]


@dataclass
class WindowSource:
    """One window of one video: its frames, read afresh from the file (one at a time) on each call, or held
    when a damaged file moved the window."""

    name: str
    data: object
    info: VideoInfo
    frames: int
    fps: float | None
    size: tuple[int, int]
    start: int
    held: np.ndarray | None = None

    def read(self) -> Iterator[np.ndarray]:
        if self.held is not None:
            return iter(self.held)
        return iter_clip(self.data, self.frames, fps=self.fps, size=self.size, start=self.start, info=self.info)

    def tensor(self, device) -> torch.Tensor:
        return as_clip(self.held if self.held is not None else np.stack(list(self.read())), device)


def as_clip(frames: np.ndarray, device) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T, H, W) in [-1, 1] on the device."""
    return frames_to_tensor(frames).unsqueeze(0).to(device)


def take(frames: Iterator[np.ndarray], n: int) -> np.ndarray:
    return np.stack([next(frames) for _ in range(n)])


def score_streaming(cand: Candidate, src: WindowSource, chunk: int | None, device, lpips, check_gap: bool,
                     recon) -> WindowScore:
    """One window through our causal tokenizer a chunk at a time: read from the file, encoded, decoded and
    scored in steps of `chunk` latent frames, so memory is a chunk's whatever the window's length. Two passes
    over the file: the first shrinks the frames for the equal-floats baseline, the second does the rest.
    `recon`: a binary file the reconstruction's uint8 frames are appended to (the side-by-side video), or None."""
    vae: CausalVAE = cand.model
    latent_shape = vae.latent_shape(src.frames, *src.size)
    ranges = vae.pixel_ranges(src.frames, chunk or latent_shape[1])
    score = WindowScore(src.frames)
    baseline = StreamingBaseline(src.frames, *src.size, latent_shape)
    frames = src.read()
    for a, b in ranges:
        baseline.add(as_clip(take(frames, b - a), device))
    baseline.finish()
    frames = src.read()
    enc_cache, dec_cache = CausalCache(), CausalCache()
    # chunked against whole on the first chunks (three steps: two boundaries): the tokenizer is causal, so the
    # whole decode of a prefix is the first frames of the whole window's
    prefix = vae.pixel_range(0, min(latent_shape[1], 3 * chunk))[1] if chunk and check_gap else 0
    kept, previous = [], None
    for i, (a, b) in enumerate(ranges):
        x = as_clip(take(frames, b - a), device)
        sync_device(device)
        t0 = time.perf_counter()
        z = vae.encode_step(x, enc_cache, first=i == 0).mean
        sync_device(device)
        t1 = time.perf_counter()
        check_output(z, "latents", cand, src.name)
        y = vae.decode_step(z, dec_cache, first=i == 0)
        sync_device(device)
        score.enc, score.dec = score.enc + t1 - t0, score.dec + time.perf_counter() - t1
        check_output(y, "reconstruction", cand, src.name)
        y = y.clamp(-1, 1)
        score.latent_floats += math.prod(z.shape[1:])
        previous = score.add(x, y, baseline.frames_between(a, b), a, previous, lpips)
        if a < prefix:
            kept.append((x, y))
        if recon is not None:
            recon.write(tensor_to_frames(y[0]).tobytes())
    if kept:
        x, y = (torch.cat([k[j] for k in kept], 2)[:, :, :prefix] for j in (0, 1))
        score.gap = float((vae.decode(vae.encode(x).mean).clamp(-1, 1) - y).abs().max())
    return score


def score_whole(cand: Candidate, src: WindowSource, chunk: int | None, tile, device, lpips, fvd, check_gap: bool,
                 recon) -> WindowScore:
    """One window held whole: a diffusers tokenizer (which walks time itself), a tiled one, or with rFVD."""
    vae = cand.model
    tiles = None if tile == "auto" and isinstance(vae, CausalVAE) else tile  # ours runs whole, or exactly tiled
    x = src.tensor(device)
    score = WindowScore(src.frames)
    sync_device(device)
    t0 = time.perf_counter()
    z = vae.encode(x, chunk=chunk, tile=tiles).mean
    sync_device(device)
    t1 = time.perf_counter()
    check_output(z, "latents", cand, src.name)
    y = vae.decode(z, chunk=chunk, tile=tiles)
    sync_device(device)
    score.enc, score.dec = t1 - t0, time.perf_counter() - t1
    check_output(y, "reconstruction", cand, src.name)
    y = y.clamp(-1, 1)
    if check_gap and (chunk is not None or tile is not None):
        score.gap = float((vae.decode(vae.encode(x).mean).clamp(-1, 1) - y).abs().max())
    base = equal_floats_baseline(x, vae.latent_shape(src.frames, *src.size)).clamp(-1, 1)
    score.add(x, y, base, 0, None, lpips)
    score.latent_floats = math.prod(z.shape[1:])
    if fvd is not None:
        for name, clip in (("real", x), ("recon", y), ("baseline", base)):
            score.feats[name].append(fvd.features(clip))
    if recon is not None:
        recon.write(tensor_to_frames(y[0]).tobytes())
    return score


def write_side_by_side(path: Path, src: WindowSource, recons: list[Path], fps: float, chunk_frames: int = 16) -> None:
    """The first window's original | each reconstruction, amplified error | ..., written a few frames at a time
    from the reconstructions' uint8 frames on disk: a long window never sits whole in memory."""
    height, width = src.size
    frame_bytes = height * width * 3
    files = [open(r, "rb") for r in recons]
    try:
        frames = src.read()
        with video_writer(path, width * (1 + 2 * len(recons)), height, fps=fps) as write:
            for a in range(0, src.frames, chunk_frames):
                n = min(chunk_frames, src.frames - a)
                original = frames_to_tensor(take(frames, n))
                parts = [frames_to_tensor(np.frombuffer(f.read(n * frame_bytes), np.uint8).reshape(n, height, width, 3))
                         for f in files]
                write(side_by_side(original, parts))
    finally:
        for f in files:
            f.close()
