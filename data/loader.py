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

The parts: data/tar_reader.py reads the tars, data/samples.py turns one sample into an example,
data/shard_stream.py is one reader's pipeline (data/stream.py its resumable shuffle), and this module runs
the readers in workers and keeps the books: skips, positions, the bucket scan.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tarfile
from collections import Counter
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from webdataset.tariterators import base_plus_ext

from .buckets import Bucket, BucketSchedule, Packing, describe
from .samples import ClipSpec, SkipRecord, SkipSample, buckets_for, no_bucket, sample_meta
from .shard_stream import ShardStream
from .shards import LATENT_EXT
from .tar_reader import expand_urls, shard_problem, shard_samples
from .video_io import VideoInfo, check_frame_count, size_pair

log = logging.getLogger(__name__)

_MAX_LOGGED_SKIPS = 10  # warnings printed before the loader only counts


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _ignore_ctrl_c(worker_id: int) -> None:
    """Decoding workers leave Ctrl-C to the process that owns them: a terminal sends it to the whole process
    group, and a worker that died of it would take the stream down before the trainer saves its checkpoint.
    They end with their parent, as DataLoader workers do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
                                  persistent_workers=False, worker_init_fn=_ignore_ctrl_c, **kwargs)
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
