"""Writing WebDataset shards: numbered tars, written atomically and byte-for-byte reproducibly.

A sample is a dict `{"__key__": KEY, EXT: payload, ...}` that becomes the members `KEY.EXT` of a
tar. Payloads are bytes, str (utf-8), a Path (the file's bytes, copied in chunks, so a file larger than
memory can be stored) or, for `json`, a dict (serialised with sorted keys).
Shards are `OUT/000000.tar`, `OUT/000001.tar`, ..., so that `OUT/{000000..000009}.tar` names them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from checkpoint_io import atomic_path
from errors import InputError

SHARD_PATTERN = "{:06d}.tar"
LATENT_EXT = "latents.npy"  # member holding a latent sample's (C, t, h, w) array
_SHARD_RE = re.compile(r"^\d{6}\.tar$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def sanitize_key(name: str) -> str:
    """A WebDataset key from a file's relative path: WebDataset splits a member name at its first dot,
    so dots, slashes and anything unusual become underscores."""
    return _KEY_UNSAFE.sub("_", name) or "_"


def encode_payload(ext: str, value) -> bytes | Path:
    if isinstance(value, Path):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext.endswith("json"):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if ext.endswith("npy") and isinstance(value, np.ndarray):
        return npy_bytes(value)
    raise TypeError(f"cannot store {type(value).__name__} as .{ext}: give bytes, str, a dict for json or an array for npy")


def npy_bytes(array: np.ndarray) -> bytes:
    """An array in .npy format (read back with `np.load(..., allow_pickle=False)`: no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def latent_sample(key: str, latents, caption: str, meta: dict) -> dict:
    """A latent-shard sample for ShardWriter: `latents` (C, t, h, w), a numpy array or a tensor.

    `meta` should hold what the latents encode (frames, height, width, fps) and the tokenizer they
    came from, so that a loader can refuse latents of the wrong shape or origin.
    """
    if hasattr(latents, "detach"):
        latents = latents.detach().cpu().numpy()
    latents = np.asarray(latents)
    if latents.ndim != 4:
        raise ValueError(f"latents must be (C, t, h, w), got shape {latents.shape}")
    if not caption or not caption.strip():
        raise ValueError(f"sample {key!r} has an empty caption")
    return {"__key__": key, LATENT_EXT: latents, "txt": caption, "json": meta}


class ShardWriter:
    """Write samples into `out_dir/NNNNNN.tar`, `shard_size` samples per shard.

    Each shard is written to a temporary name and renamed when complete, so a reader never sees half a
    shard. Tar headers carry a fixed mtime, owner and mode, so the same samples give the same bytes.
    A folder that holds anything is refused unless `overwrite`: then the numbered shards an earlier, longer
    run left there are removed on close, so it holds exactly this run's shards, and nothing else in it is
    touched (a run that wrote nothing leaves the folder alone).
    `resume` names the shards an interrupted writer finished (in order): they are kept and numbering goes on
    after them, the folder's other contents notwithstanding; `keys` are the keys they hold.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 100, overwrite: bool = False,
                 resume: list[str] | None = None, keys: list[str] | None = None, count: int = 0):
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        if self.out_dir.is_dir() and not overwrite and resume is None:
            present = sorted(p.name for p in self.out_dir.iterdir())
            if present:
                raise InputError(f"{self.out_dir} is not empty ({len(present)} entries, e.g. {present[0]}): give a new "
                                 f"or empty folder, or --overwrite to replace the shards and manifest in it")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.shards: list[Path] = [self.out_dir / name for name in resume or []]
        self.count = count
        self._keys: set[str] = set(keys or [])
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._in_shard = 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        if key != sanitize_key(key):
            raise ValueError(f"key {key!r} has characters WebDataset cannot group by; use sanitize_key()")
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r}: keys must be unique across the shards")
        self._keys.add(key)
        if self._tar is None:
            self._open_next()
        for ext in sorted(e for e in sample if not e.startswith("__")):  # members in name order, as webdataset writes them
            self._add_member(f"{key}.{ext}", encode_payload(ext, sample[ext]))
        self.count += 1
        self._in_shard += 1
        if self._in_shard == self.shard_size:
            self._finish_shard()

    def _open_next(self) -> None:
        path = self.out_dir / SHARD_PATTERN.format(len(self.shards))
        self._shard = contextlib.ExitStack()  # the shard's atomic write: renamed on close, removed on abort
        self._file = self._shard.enter_context(open(self._shard.enter_context(atomic_path(path)), "wb"))
        self._tar = tarfile.open(fileobj=self._file, mode="w")
        self._path = path
        self._in_shard = 0

    def _add_member(self, name: str, payload: bytes | Path) -> None:
        info = tarfile.TarInfo(name)
        info.mtime, info.mode, info.uname, info.gname = 0.0, 0o644, "", ""  # the same bytes whenever written
        if isinstance(payload, Path):
            with open(payload, "rb") as f:
                info.size = os.fstat(f.fileno()).st_size
                self._tar.addfile(info, f)  # copied in blocks, never read whole
        else:
            info.size = len(payload)
            self._tar.addfile(info, io.BytesIO(payload))

    def _finish_shard(self) -> None:
        self._tar.close()
        self._shard.close()
        self.shards.append(self._path)
        self._tar = self._file = None

    def _abort(self) -> None:
        if self._tar is not None:
            self._shard.__exit__(RuntimeError, RuntimeError("shard writing aborted"), None)
            self._tar = self._file = None

    def close(self) -> list[Path]:
        if self._tar is not None:
            self._finish_shard()
        if not self.shards:
            return self.shards  # nothing written: leave whatever the folder held alone
        keep = {p.name for p in self.shards}
        for stale in self.out_dir.iterdir():
            if _SHARD_RE.match(stale.name) and stale.name not in keep:
                stale.unlink()
        return self.shards
