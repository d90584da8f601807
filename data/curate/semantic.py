"""The scores that need a CLIP model: how good a clip looks (aesthetics) and whether its caption describes it.

- `aesthetic`: LAION's improved aesthetic predictor, the MLP it trained on CLIP ViT-L/14 unit image embeddings
  (1-10, the scale of the LAION-Aesthetics subsets), applied to each of `FRAMES` evenly spaced frames of the
  clip and averaged. Its weights are a local file (`--aesthetic-head`: the predictor's `.pth`, or the same
  tensors as safetensors); they must match the CLIP folder's embedding size.
- `clip_score`: CLIPSIM of the clip and its caption (100 x the mean cosine of frame and caption embeddings,
  `evaluation.clip_score`), None for a clip without a caption.

The CLIP folder (`--clip`) is a transformers `CLIPModel` with its tokenizer and image processor, as
`save_pretrained` writes them; nothing is downloaded. The stage runs in the main process after the captions are
known, on `--device`; each clip's scores are kept in `CURATED/work/semantic/`, so a rerun scores only clips it
had not (or whose caption or model changed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn as nn

from checkpoint_io import write_json_atomic
from errors import InputError, MissingInputError

from .scores import sample_positions

FRAMES = 4


class AestheticHead(nn.Module):
    """The improved aesthetic predictor's MLP: a unit CLIP image embedding to a score (dropout, used in its
    training, is left out: it does nothing at inference). Its layers keep the predictor's names."""

    def __init__(self, dim: int):
        super().__init__()
        self.layers = nn.ModuleDict({"0": nn.Linear(dim, 1024), "2": nn.Linear(1024, 128), "4": nn.Linear(128, 64),
                                     "6": nn.Linear(64, 16), "7": nn.Linear(16, 1)})

    def forward(self, e: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N,)
        for layer in self.layers.values():
            e = layer(e)
        return e[:, 0]

    @classmethod
    def load(cls, path: Path, dim: int) -> "AestheticHead":
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        head = cls(dim)
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            first = got.get("layers.0.weight")
            raise InputError(f"--aesthetic-head {path} does not match the CLIP model: it takes "
                             f"{first[1] if first else '?'}-wide embeddings in its layers {sorted(got)[:3]}..., the "
                             f"model gives {dim} (the LAION predictor is for CLIP ViT-L/14: give that CLIP folder)")
        head.load_state_dict(state)
        return head.eval()


def check_folder(clip_dir: Path, head: Path | None) -> None:
    """Before any work: the CLIP folder holds what `save_pretrained` writes, and the head file is there."""
    if head is not None and clip_dir is None:
        raise InputError("--aesthetic-head needs --clip (the CLIP ViT-L/14 folder whose embeddings it scores)")
    if clip_dir is None:
        return
    from evaluation.clip_score import ClipScore

    ClipScore.check_folder(clip_dir)
    if head is not None and not head.is_file():
        raise MissingInputError(f"--aesthetic-head {head}: no such file (give the aesthetic predictor's weights, "
                                f".pth or .safetensors)")


def clip_frames(path: Path, frames: int = FRAMES) -> np.ndarray:
    """`frames` evenly spaced frames of a clip file, RGB uint8 (n, H, W, 3)."""
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([decoded[p] for p in sample_positions(len(decoded), frames)])


def _fingerprint(clip_dir: Path, head: Path | None) -> str:
    parts = [str(clip_dir.resolve()), (clip_dir / "config.json").read_text()]
    if head is not None:
        parts += [str(head.resolve()), str(head.stat().st_size)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def score_semantic(rows: list[dict], out: Path, clip_dir: Path, head_path: Path | None = None, device: str = "cpu",
                   log=print) -> None:
    """Give every row `aesthetic` (None without a head) and `clip_score` (None without a caption)."""
    from evaluation.clip_score import ClipScore

    fingerprint = _fingerprint(clip_dir, head_path)
    cache_dir = out / "work" / "semantic"
    todo = []
    for row in rows:
        cached = _read(cache_dir / f"{Path(row['clip']).stem}.json")
        if cached and cached["model"] == fingerprint and cached["caption"] == row["caption"]:
            row["aesthetic"], row["clip_score"] = cached["aesthetic"], cached["clip_score"]
        else:
            todo.append(row)
    if not todo:
        return
    log(f"aesthetic and caption scores: {len(todo)} of {len(rows)} clips to score with {clip_dir}")
    clip = ClipScore.from_local(clip_dir, device)
    head = None
    if head_path is not None:
        head = AestheticHead.load(head_path, clip.model.config.projection_dim).to(clip.device)
    for row in todo:
        with torch.no_grad():
            images = clip.images(clip_frames(out / row["clip"]))  # (n, D) unit embeddings
            row["aesthetic"] = round(float(head(images).mean()), 4) if head is not None else None
            row["clip_score"] = (round(float(100 * (images @ clip.text([row["caption"]])[0]).mean()), 4)
                                 if row["caption"] else None)
        write_json_atomic(cache_dir / f"{Path(row['clip']).stem}.json",
                          {"model": fingerprint, "caption": row["caption"], "aesthetic": row["aesthetic"],
                           "clip_score": row["clip_score"]})


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
