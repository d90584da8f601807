"""Streaming captioned video (or latents) from WebDataset shards to many GPUs.

    from data import make_loader
    loader = make_loader("shards/{000000..000099}.tar", batch_size=8, frames=17, size=256, mode="train")
    for batch in loader:          # batch["video"]: (B, 3, T, H, W) in [-1, 1]
        ...
    loader.skipped                # Counter of skipped samples by reason, summed over all workers

Shards are assigned to readers, never samples: reader g of G (g = rank * num_workers + worker) takes
shards g, g + G, g + 2G, ... of the sorted list.
- mode="train": infinite. Each reader loops over its own shards, reshuffled every pass, and shuffles
  samples in a buffer; so ranks do not read the same shards at once. With fewer shards than readers,
  every reader draws from all shards (in its own order) and a warning says to write more shards.
  Windows and crops are random. Everything is seeded: the same seed and reader layout give the same batches.
- mode="eval": finite and ordered; every sample is read exactly once across all ranks and workers.
  Windows start at frame 0, crops are centred, and the last batch may be smaller.

A sample that cannot be used (undecodable video, clip too short for the window, no caption, no
video, an unreadable shard) is skipped and counted by reason; `loader.skipped` and
`loader.skip_log` expose them to the trainer, and the first few are logged as warnings.

Latent shards (written by `LatentShardWriter` from the tokenizer's export) hold `KEY.latents.npy`
(C, t, h, w), `KEY.txt` and `KEY.json`; their batches carry `latents` (B, C, t, h, w) instead of `video`.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import dataclasses
from collections import deque

import braceexpand
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from errors import InputError, MissingInputError

from .buckets import Bucket, BucketSchedule, Packing, bucket_order, describe, latent_bucket
from .shards import LATENT_EXT
from .stream import ReaderStream, StaleState
from .video_io import (MEDIA_EXTENSIONS, ClipTooShortError, VideoInfo, VideoReadError, check_frame_count, probe,
                       read_clip, size_pair)

log = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 10  # warnings printed before the loader only counts
MAX_CONSECUTIVE_SKIPS = 1000  # a reader that skips this many in a row has a systematic problem: stop


class SkipSample(Exception):
    """Raised while decoding a sample that must be skipped; `reason` is the counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class SkipRecord:
    reason: str  # corrupt | too_short | no_caption | no_video | bad_latents | bad_shard | truncated_shard
    key: str
    url: str
    detail: str


def expand_urls(urls: str | os.PathLike | Sequence) -> list[str]:
    """Shard URLs from a directory (its *.tar, sorted), a glob, a brace pattern, `pipe:` commands or a list."""
    if isinstance(urls, (list, tuple)):
        out = [u for item in urls for u in expand_urls(item)]
    else:
        spec = os.fspath(urls)
        if spec.startswith("pipe:"):
            out = list(braceexpand.braceexpand(spec))
        elif os.path.isdir(spec):
            out = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(ch in spec for ch in "*?["):
            out = sorted(glob.glob(spec))
        else:
            out = list(braceexpand.braceexpand(spec))
            missing = [u for u in out if "://" not in u and not os.path.exists(u)]
            if missing:
                raise MissingInputError(f"shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if not out:
        raise MissingInputError(f"no shards found at {urls!r}: give a folder of .tar shards, a glob, a brace pattern, pipe: commands or a list")
    return out


def shard_samples(sources: Iterable[dict], on_error: Callable[[str, Exception, int], None]) -> Iterator[dict]:
    """The samples {"__key__", "__url__", EXT: bytes, ...} of each shard {"url": ...} in turn.

    Members are grouped by key within one shard only. webdataset groups the file stream across shards, so a
    shard cut off mid-member left its last sample open and the next pass's first members were added to it
    ("duplicate file name"), skipping every sample after it. Here a shard that cannot be opened or read to its
    end goes to on_error(url, exception, samples read from it); the samples before the damage are still
    yielded, the last one too if its caption and media were read whole."""
    for source in sources:
        url, read, current, error = source["url"], 0, None, None
        try:
            stream = wds.gopen(url)
        except Exception as e:
            on_error(url, e, 0)
            continue
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    prefix, suffix = base_plus_ext(info.name) if info.isreg() else (None, None)
                    if prefix is None or suffix is None or prefix.startswith("__"):
                        continue
                    data = tar.extractfile(info).read()
                    tar.members = []  # a stream: keep no index of what was read
                    if current is not None and prefix != current["__key__"]:
                        yield current
                        read, current = read + 1, None
                    current = current or {"__key__": prefix, "__url__": url}
                    if suffix.lower() in current:
                        raise ValueError(f"{info.name} appears twice in the shard")
                    current[suffix.lower()] = data
        except Exception as e:  # a truncated or damaged tar
            error = e
        finally:
            stream.close()
        if error is None and not _ends_whole(url):  # cut at a member boundary: tarfile reads that as the end
            error = tarfile.ReadError("the archive stops without its end-of-archive blocks")
        if current is not None and (error is None or ("txt" in current and media_member(current))):
            yield current
            read += 1
        if error is not None:
            on_error(url, error, read)


def _ends_whole(url: str) -> bool:
    """Whether a local tar ends as tar writers end one (whole 512-byte blocks, the last two zero). Streams
    from pipe: commands cannot be checked this way and count as whole."""
    path = url[len("file:"):] if url.startswith("file:") else url
    if url.startswith("pipe:") or not os.path.isfile(path):
        return True
    size = os.path.getsize(path)
    if size % 512 or size < 1024:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def iter_shard_samples(urls) -> Iterator[dict]:
    """Every raw sample of the shards, in order, in this process: {"__key__", "__url__", EXT: bytes, ...}.

    For tools that walk a dataset once (evaluation, latent export) rather than train on it. An unreadable
    shard is logged and skipped; what a truncated one holds before the damage is read.
    """

    def on_error(url: str, exn: Exception, read: int) -> None:
        log.warning("%s: %s", url, shard_problem(exn, read)[1])

    yield from shard_samples(({"url": u} for u in expand_urls(urls)), on_error)


def shard_problem(exn: Exception, read: int) -> tuple[str, str]:
    """(skip reason, detail) for a shard that failed after `read` samples."""
    text = f"{type(exn).__name__}: {exn}"
    if isinstance(exn, (tarfile.ReadError, EOFError)) and read > 0:
        return "truncated_shard", f"the shard is truncated: it ends after {read} readable samples ({text})"
    return "bad_shard", f"the shard cannot be read ({text})"


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class ClipSpec:
    """What each sample becomes: a window of `frames` frames at `fps`, cropped to `size`."""

    frames: int | None  # 1 + 4k; None for latent shards (take what is stored)
    size: tuple[int, int] | None
    fps: float | None
    window: str  # start | center | random
    crop: str  # center | random
    decode_threads: int = 0  # per decoder; 0: FFmpeg's default (one per core)
    zoom: tuple[float, float] = (1.0, 1.0)  # random crops: the covering scale times a factor from this range
    hflip: bool = False  # mirror half the clips left to right

    def at(self, bucket: Bucket) -> "ClipSpec":
        """This spec at a bucket's frames and size."""
        return dataclasses.replace(self, frames=bucket.frames, size=(bucket.height, bucket.width))


def media_member(sample: dict) -> str | None:
    """The extension of a WebDataset sample's video or image member (mp4, avi, ..., png), if it has one."""
    return next((e for e in MEDIA_EXTENSIONS if e in sample), None)


def sample_meta(sample: dict) -> dict:
    """The sample's KEY.json ({} without one); SkipSample when it does not parse."""
    if "json" not in sample:
        return {}
    try:
        return json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipSample("corrupt", f"KEY.json does not parse: {e}") from e


def require_media(sample: dict) -> str:
    """The extension of the sample's video or image member; SkipSample when it has none."""
    ext = media_member(sample)
    if ext is None:
        found = ", ".join(k for k in sample if not k.startswith("__"))
        raise SkipSample("no_video", f"no video or image member (found: {found})")
    return ext


def sample_info(sample: dict) -> tuple[VideoInfo | None, dict]:
    """(what the sample's video is, its KEY.json) without decoding frames: from KEY.json where it records the
    video, else from a probe of the file; (None, meta) for a latent sample. Raises SkipSample."""
    meta = sample_meta(sample)
    if LATENT_EXT in sample:
        return None, meta
    ext = require_media(sample)
    info = VideoInfo.from_meta(meta)
    if info is None:
        try:
            info = probe(sample[ext])
        except VideoReadError as e:
            raise SkipSample("corrupt", str(e)) from e
    return info, meta


def _decode_sample(sample: dict, spec: ClipSpec, rng: np.random.Generator) -> dict:
    key = sample.get("__key__", "?")
    caption = sample.get("txt")
    caption = caption.decode("utf-8", errors="replace").strip() if isinstance(caption, bytes) else None
    if not caption:
        raise SkipSample("no_caption", "the sample has no KEY.txt caption, or it is empty")
    meta = sample_meta(sample)
    if LATENT_EXT in sample:
        return _decode_latents(sample[LATENT_EXT], caption, key, meta, spec)
    ext = require_media(sample)
    info = VideoInfo.from_meta(meta)
    try:
        clip = read_clip(sample[ext], spec.frames, fps=spec.fps, size=spec.size, start=spec.window,
                         crop=spec.crop, zoom=spec.zoom, rng=rng, info=info, threads=spec.decode_threads)
    except ClipTooShortError as e:
        raise SkipSample("too_short", str(e)) from e
    except VideoReadError as e:
        raise SkipSample("corrupt", str(e)) from e
    if spec.hflip and rng.random() < 0.5:  # drawn only with hflip: a seeded stream without it is unchanged
        clip.frames = np.ascontiguousarray(clip.frames[:, :, ::-1])
    out = {"video": clip.to_tensor(), "caption": caption, "key": key, "fps": clip.fps, "meta": meta}
    if clip.available is not None or (info is not None and info.declared_frames):
        claimed = (info.declared_frames or info.frames) if info is not None else None
        decoded = clip.available if clip.available is not None else info.frames
        out["__short__"] = f"claims {claimed or '?'} frames and {decoded} decode; windows are taken from those"
    return out


def _decode_latents(data: bytes, caption: str, key: str, meta: dict, spec: ClipSpec) -> dict:
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SkipSample("bad_latents", f"KEY.latents.npy does not load: {e}") from e
    if z.ndim != 4:
        raise SkipSample("bad_latents", f"latents must be (C, t, h, w), got shape {z.shape}")
    if spec.frames is not None and meta.get("frames") not in (None, spec.frames):
        raise SkipSample("too_short", f"latents encode {meta['frames']} frames, {spec.frames} were asked for")
    if spec.size is not None and (meta.get("height"), meta.get("width")) not in ((None, None), spec.size):
        raise SkipSample("bad_latents", f"latents encode {meta.get('height')}x{meta.get('width')}, {spec.size} was asked for")
    return {"latents": torch.from_numpy(z.astype(np.float32)), "caption": caption, "key": key,
            "fps": float(meta.get("fps", 0.0)), "meta": meta}


def collate(samples: list[dict]) -> dict:
    tensor_key = "latents" if "latents" in samples[0] else "video"
    shapes = {tuple(s[tensor_key].shape) for s in samples}
    if len(shapes) > 1:
        raise InputError(f"samples in one batch have different shapes {sorted(shapes)}: give a size (frames are then "
                         f"resized and cropped to it), or write latent shards at one size")
    return {
        tensor_key: torch.stack([s[tensor_key] for s in samples]),  # (B, C, T, H, W)
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
        "meta": [s["meta"] for s in samples],
    }


def collate_packed(samples: list[dict]) -> dict:
    """A packed batch: `video` (or `latents`) is a list of (C, T_i, H_i, W_i) tensors of mixed shapes."""
    tensor_key = "latents" if "latents" in samples[0] else "video"
    return {tensor_key: [s[tensor_key] for s in samples], "packed": True, "caption": [s["caption"] for s in samples],
            "key": [s["key"] for s in samples], "fps": torch.tensor([s["fps"] for s in samples], dtype=torch.float32),
            "meta": [s["meta"] for s in samples]}


class ShardStream(IterableDataset):
    """The per-reader pipeline: shards -> WebDataset samples -> (shuffle) -> decode -> batches.

    Each yielded batch carries `__skips__`, the SkipRecords met since the previous batch, and the
    stream ends with a batch-less item holding the rest, so that no skip goes uncounted. It also carries
    `__reader__` and `__state__`: where this reader is after the batch, {"position": raw samples drawn (used
    or skipped), "stream": its ReaderStream's state (train)}. Each sample's window and crop depend only on
    (seed, reader, position), and the stream resumes from its state (see data/stream.py), so a reader
    restarted with `start_states[reader] = state` yields exactly the batches it would have yielded next,
    after reading about one shard and its shuffle buffer again, whatever the step.

    With buckets (train mode), batch n of this rank (reader w of W on it yields batches w, w + W, ...) holds
    `schedule(n)`'s bucket, the same on every rank. Samples drawn for another bucket wait in that bucket's
    backlog (raw bytes, at most `backlog` samples or three batches of it; a sample whose buckets' backlogs are
    all full goes to its next bucket, or is skipped as bucket_full) and are decoded when their bucket's turn
    comes. The state then also holds the batches
    yielded and the backlog as (shard, index, position) triples, fetched again on resume.

    With packing (train mode), each batch is filled up to a token budget from a pool of samples (the oldest
    first, then the largest that still fit), each at its best bucket's shape; the pool is in the state too.
    """

    def __init__(self, urls: list[str], spec: ClipSpec, batch_size: int, mode: str, seed: int,
                 rank: int, world_size: int, shuffle_buffer: int, schedule: BucketSchedule | None = None,
                 backlog: int = 64):
        self.urls, self.spec, self.batch_size, self.mode, self.seed = urls, spec, batch_size, mode, seed
        self.rank, self.world_size, self.shuffle_buffer = rank, world_size, shuffle_buffer
        self.schedule, self.backlog = schedule, backlog
        self.buckets = None  # eval in buckets or packing: each sample at its best bucket's shape
        self.packing: Packing | None = None
        self.start_states: dict[int, dict] = {}  # reader -> its ReaderStream state when the run stopped (resume)
        self.start_positions: dict[int, int] = {}  # reader -> raw samples consumed (a checkpoint from before states)

    def _reader(self) -> tuple[int, int, int, int]:
        """(reader, readers, this worker, workers on this rank)."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers, worker, num_workers

    def __iter__(self):
        reader, readers, worker, workers = self._reader()
        skips: list[SkipRecord] = []
        shorts: list[SkipRecord] = []  # samples used from files that decode fewer frames than they claim
        run = [0]  # skips since the last good sample

        def skip(rec: SkipRecord) -> None:
            skips.append(rec)
            run[0] += 1
            if run[0] >= MAX_CONSECUTIVE_SKIPS:
                hint = ("its shards hold no sample for the bucket of this step, or too few: write the footage's "
                        "aspect ratios and durations across all shards, or drop the bucket"
                        if rec.reason == "bucket_full" else
                        "check the shards and the requested frames, size and fps")
                raise RuntimeError(f"reader {reader} skipped {run[0]} samples in a row, the last for {rec.reason}: "
                                   f"{rec.detail} ({rec.url}); {hint}")

        def on_shard_error(url: str, exn: Exception, read: int) -> None:
            reason, detail = shard_problem(exn, read)
            skip(SkipRecord(reason, "", url, detail))

        stream, position, saved = None, 0, None
        if self.mode == "eval":
            samples = shard_samples(({"url": u} for u in self.urls[reader::readers]), on_shard_error)
        else:  # infinite: each pass over this reader's shards in a fresh order, samples shuffled in a buffer
            mine = self.urls[reader::readers] if len(self.urls) >= readers else list(self.urls)
            saved = self.start_states.get(reader)
            try:
                stream = ReaderStream(mine, self.seed, reader, self.shuffle_buffer, on_shard_error,
                                      None if saved is None else saved["stream"])
            except StaleState as e:  # the shards were rewritten since the checkpoint: their stream starts afresh
                log.warning("reader %d cannot continue where it stopped (%s); its stream starts afresh", reader, e)
                stream = ReaderStream(mine, self.seed, reader, self.shuffle_buffer, on_shard_error)
                saved = {"position": 0}
            position = saved["position"] if saved is not None else self.start_positions.get(reader, 0)
            samples = iter(stream)
            if saved is None and position:  # a checkpoint from before reader states: replay the samples drawn since step 0
                for _ in range(position):
                    next(samples)

        def decode(sample: dict, at: int, spec: ClipSpec) -> dict | None:
            """The sample decoded with its own window and crop (from its draw position), or None: skipped."""
            key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
            rng = np.random.default_rng([self.seed, reader, at])
            try:
                decoded = _decode_sample(sample, spec, rng)
            except SkipSample as s:
                skip(SkipRecord(s.reason, key, url, s.detail))
                return None
            except Exception as e:  # decoding untrusted media can fail in any way; one sample never stops a run
                skip(SkipRecord("corrupt", key, url, f"{type(e).__name__}: {e}"))
                return None
            if "__short__" in decoded:  # used, and counted: a file whose header claims more than decodes
                shorts.append(SkipRecord("short_file", key, url, decoded.pop("__short__")))
            run[0] = 0
            return decoded

        def emit(batch: list[dict], state: dict, extra: dict | None = None) -> dict:
            out = ({} if not batch else collate_packed(batch) if self.packing else collate(batch)) | (extra or {}) | {
                "__skips__": skips[:], "__shorts__": shorts[:], "__reader__": reader, "__state__": state}
            skips.clear()
            shorts.clear()
            return out

        if self.schedule is not None:
            yield from self._bucketed(samples, stream, saved or {}, position, reader, worker, workers, decode, skip, emit)
            return
        if self.packing is not None and self.mode == "train":
            yield from self._packed(samples, stream, saved or {}, position, reader, decode, skip, emit)
            return

        def state() -> dict:  # where this reader is, after the samples drawn so far
            return {"position": position} | ({} if stream is None else {"stream": stream.state()})
        buckets = self.buckets or [None]  # eval in buckets: a batch per bucket as it fills, the rest at the end
        batches: list[list[dict]] = [[] for _ in buckets]
        for sample in samples:
            at, position = position, position + 1
            b, spec = 0, self.spec
            if self.buckets:
                order = self._places(sample, self.buckets, skip)
                if not order:
                    continue
                b = order[0]
                spec = spec.at(self.buckets[b])
            decoded = decode(sample, at, spec)
            if decoded is None:
                continue
            batches[b].append(decoded)
            if len(batches[b]) == (self.batch_size if buckets[b] is None else buckets[b].batch_size):
                yield emit(batches[b], state(), None if buckets[b] is None else {"bucket": buckets[b].name})
                batches[b] = []
        for b, batch in enumerate(batches):
            if batch and self.mode == "eval":
                yield emit(batch, state(), None if buckets[b] is None else {"bucket": buckets[b].name})
        yield emit([], state(), {"__end__": True})

    def _places(self, sample: dict, buckets: Sequence[Bucket], skip) -> list[int]:
        """The buckets the sample may go to, best first; [] when none (the skip is recorded)."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            order = buckets_for(sample, buckets, self.spec.fps)
        except SkipSample as s:
            skip(SkipRecord(s.reason, key, url, s.detail))
            return []
        if not order:
            skip(no_bucket(sample, buckets, key, url))
        return order

    def _packed(self, samples, stream: ReaderStream, saved: dict, position: int, reader: int, decode, skip, emit):
        """Batches of mixed shapes filled to the token budget (see the class)."""
        buckets, packing = self.buckets, self.packing
        pool: list[tuple[dict, int, int]] = []  # (raw sample, draw position, bucket), oldest first
        entries = saved.get("pool", [])
        if entries:
            try:
                raw = stream.fetch([(url, index) for url, index, _, _ in entries])
                pool = [(r, at, b) for r, (_, _, at, b) in zip(raw, entries)]
            except StaleState as e:
                log.warning("reader %d: its packing pool is gone (%s); those samples are dropped", reader, e)
        batches = saved.get("batches", 0)

        def state() -> dict:
            return {"position": position, "stream": stream.state(), "batches": batches,
                    "pool": [[s["__url__"], s["__index__"], at, b] for s, at, b in pool]}

        while True:
            while len(pool) < packing.pool:
                sample, at = next(samples), position
                position += 1
                order = self._places(sample, buckets, skip)
                if order:
                    pool.append((sample, at, order[0]))
            cost = [packing.tokens(buckets[b].shape) for _, _, b in pool]
            chosen, room = [0], packing.budget - cost[0]  # the oldest always goes: none waits for ever
            for i in sorted(range(1, len(pool)), key=lambda i: -cost[i]):
                if cost[i] <= room:
                    chosen.append(i)
                    room -= cost[i]
            taken = set(chosen)
            picked = [pool[i] for i in sorted(taken)]
            pool = [p for i, p in enumerate(pool) if i not in taken]
            batch, tokens = [], []
            for sample, at, b in picked:
                decoded = decode(sample, at, self.spec.at(buckets[b]))
                if decoded is not None:
                    batch.append(decoded)
                    tokens.append(packing.tokens(buckets[b].shape))
            if batch:  # when every pick failed to decode, choose again (the skips go with the next batch)
                batches += 1
                yield emit(batch, state(), {"tokens": tokens})

    def _bucketed(self, samples, stream: ReaderStream, saved: dict, position: int, reader: int, worker: int,
                  workers: int, decode, skip, emit):
        """Batches of one bucket each, the bucket of this rank's batch n being schedule(n) (see the class)."""
        buckets = self.schedule.buckets
        waiting: list[deque] = [deque() for _ in buckets]  # per bucket: (raw sample, draw position)
        for i, entries in saved.get("backlog", {}).items():
            try:
                raw = stream.fetch([(url, index) for url, index, _ in entries])
            except StaleState as e:
                log.warning("reader %d: its backlog of bucket %s is gone (%s); those samples are dropped", reader,
                            buckets[int(i)].name, e)
                continue
            waiting[int(i)].extend((r, at) for r, (_, _, at) in zip(raw, entries))
        batches = saved.get("batches", 0)
        walk = saved.get("schedule") or self.schedule.start()  # where this reader is in the shared bucket sequence
        walk = {"n": walk["n"], "taken": list(walk["taken"])}  # a copy: the saved state may start another pass

        def state() -> dict:
            backlog = {str(i): [[s["__url__"], s["__index__"], at] for s, at in q] for i, q in enumerate(waiting) if q}
            return {"position": position, "stream": stream.state(), "batches": batches, "backlog": backlog,
                    "schedule": {"n": walk["n"], "taken": list(walk["taken"])}}

        while True:
            b = self.schedule.advance(walk, batches * workers + worker)
            bucket = buckets[b]
            spec = self.spec.at(bucket)
            batch: list[dict] = []
            while len(batch) < bucket.batch_size:
                if waiting[b]:
                    sample, at = waiting[b].popleft()
                else:
                    sample, at = next(samples), position
                    position += 1
                    order = self._places(sample, buckets, skip)
                    if not order:
                        continue
                    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
                    home = next((i for i in order if i == b or len(waiting[i]) < max(self.backlog, 3 * buckets[i].batch_size)),
                                None)
                    if home is None:
                        skip(SkipRecord("bucket_full", key, url, f"the backlogs of its buckets "
                                        f"({', '.join(buckets[i].name for i in order)}) are full"))
                        continue
                    if home != b:
                        waiting[home].append((sample, at))
                        continue
                decoded = decode(sample, at, spec)
                if decoded is not None:
                    batch.append(decoded)
            batches += 1
            yield emit(batch, state(), {"bucket": bucket.name})


def buckets_for(sample: dict, buckets: Sequence[Bucket], fps: float | None) -> list[int]:
    """The buckets a raw sample may go to, best first (data/buckets.py); latents: the one they were encoded at.
    Raises SkipSample for a sample that cannot be measured."""
    info, meta = sample_info(sample)
    if info is None:
        i = latent_bucket(buckets, meta)
        return [] if i is None else [i]
    return bucket_order(buckets, info, fps)


def no_bucket(sample: dict, buckets: Sequence[Bucket], key: str = "", url: str = "") -> SkipRecord:
    """Why a sample fits none of the buckets: too_short (a video shorter than every bucket) or no_bucket."""
    info, meta = sample_info(sample)
    if info is None:
        return SkipRecord("no_bucket", key, url, f"latents of {meta.get('frames')}x{meta.get('height')}x"
                                                 f"{meta.get('width')} match no bucket")
    if info.fps <= 0 or info.frames <= 1:
        return SkipRecord("no_bucket", key, url, "an image, and no bucket has one frame")
    shortest = min((b.frames for b in buckets if b.frames > 1), default=None)
    return SkipRecord("too_short", key, url, f"{info.frames} frames at {info.fps:g} fps fill no bucket "
                                             f"(the shortest takes {shortest} frames)")


class ShardLoader:
    """Iterable of batches over shards, with skip accounting gathered from all worker processes.

    In train mode the batches come in a fixed round-robin over this rank's readers (its workers), and
    `state_dict()` records how far each reader's stream has been consumed by the caller (batches
    prefetched but not yet taken do not count). `load_state_dict()` before iterating makes the stream
    continue exactly where that state was taken: the trainer's exact resume.
    """

    def __init__(self, dataset: ShardStream, num_workers: int, pin_memory: bool, prefetch_factor: int | None):
        self.dataset = dataset
        self.num_workers = num_workers
        kwargs = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  persistent_workers=False, **kwargs)
        self.skipped: Counter = Counter()
        self.skip_log: list[SkipRecord] = []  # every skipped sample, in the order met
        self.unique_skips: set[tuple[str, str, str]] = set()  # (reason, url, key) of each bad sample or shard
        self.short_files: dict[tuple[str, str], str] = {}  # (url, key) -> what a file claims and what decodes
        self._states: dict[int, dict] = {}  # reader -> its state after the last batch the caller took
        self._next_worker = 0  # the worker whose batch the caller takes next (train mode)
        self.bucket_samples: Counter = Counter()  # bucket name -> samples this rank took from it (with buckets)

    def _count_skips(self, item: dict) -> None:
        """Every pass over a bad sample counts in `skipped`; each bad sample (or shard) once in `unique_skips`,
        and only its first meeting is logged."""
        for rec in item.pop("__shorts__"):
            if (rec.url, rec.key) not in self.short_files:
                self.short_files[(rec.url, rec.key)] = rec.detail
                log.warning("%s from %s %s", rec.key, rec.url, rec.detail)
        for rec in item.pop("__skips__"):
            self.skipped[rec.reason] += 1
            self.skip_log.append(rec)
            which = (rec.reason, rec.url, rec.key)
            if which in self.unique_skips:
                continue
            self.unique_skips.add(which)
            if len(self.unique_skips) <= _MAX_LOGGED_SKIPS:
                log.warning("skipped %s from %s (%s): %s", rec.key or "a shard", rec.url, rec.reason, rec.detail)
                if len(self.unique_skips) == _MAX_LOGGED_SKIPS:
                    log.warning("further skipped samples are counted, not logged; see loader.skipped")

    def _take(self, item: dict) -> dict | None:
        """Account for an item the caller is about to receive; None for an end-of-stream marker."""
        self._count_skips(item)
        self._states[item.pop("__reader__")] = item.pop("__state__")
        if "bucket" in item:
            self.bucket_samples[item["bucket"]] += len(item["key"])
        return None if item.pop("__end__", False) else item

    def __iter__(self) -> Iterator[dict]:
        if self.dataset.mode != "train":
            for item in self._loader:
                if (batch := self._take(item)) is not None:
                    yield batch
            return
        # train: every worker's stream is infinite, and the DataLoader serves workers 0, 1, ... in turn;
        # take them in turn starting from the one a resumed state says is next
        workers = max(1, self.num_workers)
        first_reader = self.dataset.rank * workers
        pending: dict[int, list[dict]] = {w: [] for w in range(workers)}
        for item in self._loader:
            pending[item["__reader__"] - first_reader].append(item)
            while pending[self._next_worker]:
                item = pending[self._next_worker].pop(0)
                self._next_worker = (self._next_worker + 1) % workers
                if (batch := self._take(item)) is not None:
                    yield batch

    def state_dict(self) -> dict:
        """Where the caller is in the stream (plain JSON-able values), and the skip counts so far."""
        d = self.dataset
        return {"seed": d.seed, "rank": d.rank, "world_size": d.world_size, "num_workers": self.num_workers,
                "urls": len(d.urls), "batch_size": d.batch_size, "readers": {str(k): v for k, v in self._states.items()},
                "next_worker": self._next_worker, "skipped": dict(self.skipped),
                "unique_skips": sorted(self.unique_skips), "buckets": self._bucket_layout(),
                "bucket_samples": dict(self.bucket_samples)}

    def _bucket_layout(self) -> dict | None:
        """The buckets and their schedule or packing, as the state records them (JSON values)."""
        d = self.dataset
        if d.schedule is not None:
            layout = d.schedule.to_json()
        elif d.packing is not None and d.mode == "train":
            layout = {"buckets": [[b.frames, b.height, b.width, b.batch_size] for b in d.buckets],
                      "packing": dataclasses.asdict(d.packing)}
        else:
            return None
        return json.loads(json.dumps(layout))

    def load_state_dict(self, state: dict) -> bool:
        """Continue from `state` (taken by `state_dict()` of a loader over the same shards and layout).

        Returns False, and leaves the stream at its start, when the layout changed (another number of
        ranks, workers, shards, buckets or another batch size or seed): positions would then name other streams.
        The skip counts carry over either way.
        """
        self.skipped.update(state["skipped"])
        self.unique_skips.update(tuple(u) for u in state["unique_skips"])
        self.bucket_samples.update(state.get("bucket_samples", {}))
        d = self.dataset
        layout = (d.seed, d.rank, d.world_size, self.num_workers, len(d.urls), d.batch_size, self._bucket_layout())
        saved = tuple(state.get(k) for k in ("seed", "rank", "world_size", "num_workers", "urls", "batch_size", "buckets"))
        if layout != saved or d.mode != "train":
            return False
        if "readers" in state:
            self._states = {int(k): v for k, v in state["readers"].items()}
            d.start_states = dict(self._states)
        else:  # a checkpoint from before reader states: raw samples drawn per reader, replayed on resume
            d.start_positions = {int(k): v for k, v in state["positions"].items()}
            self._states = {k: {"position": v} for k, v in d.start_positions.items()}
        self._next_worker = state["next_worker"]
        return True

    @property
    def samples_skipped(self) -> int:
        return sum(self.skipped.values())

    def report(self) -> str:
        shorts = (f"; {len(self.short_files)} files decode fewer frames than they claim (used: their windows come "
                  f"from the frames that decode)") if self.short_files else ""
        if not self.skipped:
            return "no samples skipped" + shorts
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        unique = Counter(reason for reason, _, _ in self.unique_skips)
        distinct = ", ".join(f"{n} {reason}" for reason, n in sorted(unique.items()))
        return (f"skipped {self.samples_skipped} samples ({parts}); {len(self.unique_skips)} distinct bad samples or "
                f"shards ({distinct}), the rest were passes over them again" + shorts)


def make_loader(
    urls,
    batch_size: int,
    frames: int | None,
    size: int | tuple[int, int] | None,
    mode: str = "train",
    num_workers: int = 2,
    *,
    fps: float | None = None,
    seed: int = 0,
    window: str | None = None,
    crop: str | None = None,
    zoom: tuple[float, float] = (1.0, 1.0),
    hflip: bool = False,
    shuffle_buffer: int = 64,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    decode_threads: int | None = None,
    buckets: Sequence[Bucket] | None = None,
    backlog: int = 64,
    scan: int = 100_000,
    packing: Packing | None = None,
) -> ShardLoader:
    """Batches of `video` (B, 3, frames, H, W) in [-1, 1] (or `latents`), `caption`, `key`, `fps`, `meta`.

    urls: a folder of shards, a glob, a brace pattern (`shards/{000000..000099}.tar`), `pipe:` commands
      (`pipe:aws s3 cp s3://bucket/{000..009}.tar -`) or a list of these.
    frames: 1 + 4k; size: int (square) or (H, W); fps: target rate (None: the file's own).
    mode: "train" (infinite, shuffled, random windows and crops) or "eval" (finite, ordered, each sample once).
    window / crop: override the mode's default ("random"/"random" for train, "start"/"center" for eval).
    zoom: (lo, hi), train: each random crop is taken from the frame scaled to cover the size times a factor drawn
      log-uniformly from [lo, hi] (more views of few videos: their detail at several scales); (1, 1): none.
    hflip: train: mirror half the clips left to right. Eval streams never zoom or flip.
    shuffle_buffer: samples each train reader holds to shuffle across shards; they are raw file bytes,
      so memory per worker is about shuffle_buffer times the mean file size.
    rank / world_size: default to torch.distributed's, or torchrun's RANK / WORLD_SIZE.
    decode_threads: threads per video decoder. Default: the node's cores shared among all its readers
      (LOCAL_WORLD_SIZE ranks x num_workers), so that many readers do not oversubscribe the CPU.
    buckets: batches in these buckets (data/buckets.py) instead of one frames x size. Train: each batch holds one
      bucket, its batch size, and every rank takes the same bucket at each batch. Eval: each sample is read
      once at its bucket's shape, and a bucket's batch comes when it fills (the rest at the end).
      In training, the first `scan` samples of the shards (in a fixed order, alike on every rank; from local
      tars their KEY.json alone) are measured to weight the buckets: a bucket's weight below its share of the
      data makes its samples overflow their backlog (skipped as bucket_full), so the default reads them all
      up to 100,000. The table is logged, and buckets that no scanned sample fits are named.
    backlog: samples (raw bytes) each bucket may hold while waiting for its turn (at least three batches).
    packing: (train, with buckets) fill each batch to a token budget with clips of mixed shapes instead, each at
      its best bucket's shape; `video` (or `latents`) is then a list, and `tokens` their token counts.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if frames is not None:
        check_frame_count(frames)
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    url_list = expand_urls(urls)
    readers = world_size * max(1, num_workers)
    if mode == "train" and len(url_list) < readers:
        log.warning("%d shards for %d readers (%d ranks x %d workers): readers share shards; write at least %d shards",
                    len(url_list), readers, world_size, max(1, num_workers), readers)
    if decode_threads is None:
        readers_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * max(1, num_workers)
        decode_threads = max(1, (os.cpu_count() or 1) // readers_on_node)
    train = mode == "train"
    spec = ClipSpec(
        frames=frames,
        size=None if size is None else size_pair(size, "size"),
        fps=fps,
        window=window or ("random" if train else "start"),
        crop=crop or ("random" if train else "center"),
        decode_threads=decode_threads,
        zoom=tuple(map(float, zoom)) if train else (1.0, 1.0),
        hflip=hflip and train,
    )
    schedule = None
    if packing is not None:
        if not (buckets and train):
            raise ValueError("packing takes its shapes from buckets, in a training stream")
        packing.check(buckets)
    elif buckets and train:
        counts, scanned, problems = scan_buckets(url_list, buckets, fps, scan)
        empty = [b.name for b, c in zip(buckets, counts) if c == 0]
        if rank == 0:  # every rank scans alike; one reports
            log.info("%s", describe(buckets, counts, scanned) + (f"\n  unusable: {dict(problems)}" if problems else ""))
        if empty and rank == 0:
            log.warning("no scanned sample fits the buckets %s: they are never trained (of %d samples scanned)",
                        ", ".join(empty), scanned)
        schedule = BucketSchedule(buckets, counts, seed)
    dataset = ShardStream(url_list, spec, batch_size, mode, seed, rank, world_size, shuffle_buffer, schedule, backlog)
    if buckets and (packing is not None or not train):
        dataset.buckets, dataset.packing = list(buckets), packing
    return ShardLoader(dataset, num_workers, pin_memory, prefetch_factor)


def described_samples(urls: list[str], on_error: Callable[[str, Exception, int], None]) -> Iterator[dict]:
    """The shards' samples for measuring, not training: from a local tar, each sample's KEY.json and caption
    alone (the tar is read by seeking past the media), its media bytes only when it has no usable KEY.json;
    other URLs (pipe:) are streamed whole."""
    for url in urls:
        path = url[len("file:"):] if url.startswith("file:") else url
        if url.startswith("pipe:") or not os.path.isfile(path):
            yield from shard_samples([{"url": url}], on_error)
            continue
        try:
            with tarfile.open(path, mode="r:") as tar:
                members: dict[str, dict[str, tarfile.TarInfo]] = {}
                for info in tar.getmembers():
                    prefix, suffix = base_plus_ext(info.name) if info.isreg() else (None, None)
                    if prefix is not None and suffix is not None and not prefix.startswith("__"):
                        members.setdefault(prefix, {})[suffix.lower()] = info
                for key, parts in members.items():
                    sample = {"__key__": key, "__url__": url}
                    for ext in ("json", "txt"):
                        if ext in parts:
                            sample[ext] = tar.extractfile(parts[ext]).read()
                    try:
                        needs_media = VideoInfo.from_meta(sample_meta(sample)) is None
                    except SkipSample:  # a KEY.json that does not parse: counted as such by the scan
                        needs_media = False
                    for ext, info in parts.items():
                        if ext not in sample:  # the media: read only when KEY.json does not describe it
                            sample[ext] = tar.extractfile(info).read() if needs_media and ext != LATENT_EXT else b""
                    yield sample
        except Exception as e:  # a damaged tar
            on_error(url, e, 0)


def scan_buckets(urls: list[str], buckets: Sequence[Bucket], fps: float | None, limit: int) -> tuple[list[int], int, Counter]:
    """(samples whose best bucket is each bucket, samples scanned, unusable samples by reason) over the first
    `limit` samples of the shards taken in a fixed spread order (the same on every rank): KEY.json where it
    records the video, else a probe of the file."""
    order = list(urls)
    np.random.default_rng(0).shuffle(order)
    counts, problems, scanned = [0] * len(buckets), Counter(), 0
    for sample in described_samples(order, lambda url, e, read: problems.update([shard_problem(e, read)[0]])):
        if scanned >= limit:
            break
        scanned += 1
        try:
            fit = buckets_for(sample, buckets, fps)
        except SkipSample as s:
            problems[s.reason] += 1
            continue
        if fit:
            counts[fit[0]] += 1
        else:
            problems[no_bucket(sample, buckets).reason] += 1
    return counts, scanned, problems
