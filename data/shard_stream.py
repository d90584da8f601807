"""The per-reader pipeline of a training or evaluation stream: a reader's shards -> raw samples -> (buckets,
packing) -> decoded examples -> batches, each carrying the reader's state to resume from and the skips met.

`ShardStream` is the `IterableDataset` that data/loader.py's `ShardLoader` runs in each worker; readers are
assigned shards, never samples (reader g of G takes shards g, g + G, ...).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Sequence

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .buckets import Bucket, BucketSchedule, Packing
from .samples import (ClipSpec, SkipRecord, SkipSample, buckets_for, collate, collate_packed, decode_sample,
                      no_bucket)
from .stream import ReaderStream, StaleState
from .tar_reader import shard_problem, shard_samples

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 1000  # a reader that skips this many in a row has a systematic problem: stop


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
        run = _ReaderRun(self, reader)
        samples, stream, position, saved = self._open(reader, readers, run)
        if self.schedule is not None:
            yield from self._bucketed(samples, stream, saved, position, worker, workers, run)
        elif self.packing is not None and self.mode == "train":
            yield from self._packed(samples, stream, saved, position, run)
        else:
            yield from self._batched(samples, stream, position, run)

    def _open(self, reader: int, readers: int, run: _ReaderRun):
        """(this reader's raw samples, its ReaderStream or None in eval, the draw position, the saved state or {})."""
        if self.mode == "eval":
            return shard_samples(({"url": u} for u in self.urls[reader::readers]), run.on_shard_error), None, 0, {}
        # infinite: each pass over this reader's shards in a fresh order, samples shuffled in a buffer
        mine = self.urls[reader::readers] if len(self.urls) >= readers else list(self.urls)
        saved = self.start_states.get(reader)
        try:
            stream = ReaderStream(mine, self.seed, reader, self.shuffle_buffer, run.on_shard_error,
                                  None if saved is None else saved["stream"])
        except StaleState as e:  # the shards were rewritten since the checkpoint: their stream starts afresh
            log.warning("reader %d cannot continue where it stopped (%s); its stream starts afresh", reader, e)
            stream = ReaderStream(mine, self.seed, reader, self.shuffle_buffer, run.on_shard_error)
            saved = {"position": 0}
        position = saved["position"] if saved is not None else self.start_positions.get(reader, 0)
        samples = iter(stream)
        if saved is None and position:  # a checkpoint from before reader states: replay the samples drawn since step 0
            for _ in range(position):
                next(samples)
        return samples, stream, position, saved or {}

    def _batched(self, samples, stream: ReaderStream | None, position: int, run: _ReaderRun):
        """Batches of `batch_size` at the spec's shape; in eval with buckets, a batch per bucket as it fills and
        the rest at the end. The stream ends with an item that carries the last skips."""

        def state() -> dict:  # where this reader is, after the samples drawn so far
            return {"position": position} | ({} if stream is None else {"stream": stream.state()})

        buckets = self.buckets or [None]
        batches: list[list[dict]] = [[] for _ in buckets]
        for sample in samples:
            at, position = position, position + 1
            b, spec = 0, self.spec
            if self.buckets:
                order = run.places(sample, self.buckets)
                if not order:
                    continue
                b = order[0]
                spec = spec.at(self.buckets[b])
            decoded = run.decode(sample, at, spec)
            if decoded is None:
                continue
            batches[b].append(decoded)
            if len(batches[b]) == (self.batch_size if buckets[b] is None else buckets[b].batch_size):
                yield run.emit(batches[b], state(), None if buckets[b] is None else {"bucket": buckets[b].name})
                batches[b] = []
        for b, batch in enumerate(batches):
            if batch and self.mode == "eval":
                yield run.emit(batch, state(), None if buckets[b] is None else {"bucket": buckets[b].name})
        yield run.emit([], state(), {"__end__": True})

    def _packed(self, samples, stream: ReaderStream, saved: dict, position: int, run: _ReaderRun):
        """Batches of mixed shapes filled to the token budget (see the class)."""
        buckets, packing = self.buckets, self.packing
        pool: list[tuple[dict, int, int]] = []  # (raw sample, draw position, bucket), oldest first
        entries = saved.get("pool", [])
        if entries:
            try:
                raw = stream.fetch([(url, index) for url, index, _, _ in entries])
                pool = [(r, at, b) for r, (_, _, at, b) in zip(raw, entries)]
            except StaleState as e:
                log.warning("reader %d: its packing pool is gone (%s); those samples are dropped", run.reader, e)
        batches = saved.get("batches", 0)

        def state() -> dict:
            return {"position": position, "stream": stream.state(), "batches": batches,
                    "pool": [[s["__url__"], s["__index__"], at, b] for s, at, b in pool]}

        while True:
            while len(pool) < packing.pool:
                sample, at = next(samples), position
                position += 1
                order = run.places(sample, buckets)
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
                decoded = run.decode(sample, at, self.spec.at(buckets[b]))
                if decoded is not None:
                    batch.append(decoded)
                    tokens.append(packing.tokens(buckets[b].shape))
            if batch:  # when every pick failed to decode, choose again (the skips go with the next batch)
                batches += 1
                yield run.emit(batch, state(), {"tokens": tokens})

    def _bucketed(self, samples, stream: ReaderStream, saved: dict, position: int, worker: int, workers: int,
                  run: _ReaderRun):
        """Batches of one bucket each, the bucket of this rank's batch n being schedule(n) (see the class)."""
        buckets = self.schedule.buckets
        waiting: list[deque] = [deque() for _ in buckets]  # per bucket: (raw sample, draw position)
        for i, entries in saved.get("backlog", {}).items():
            try:
                raw = stream.fetch([(url, index) for url, index, _ in entries])
            except StaleState as e:
                log.warning("reader %d: its backlog of bucket %s is gone (%s); those samples are dropped", run.reader,
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
                    order = run.places(sample, buckets)
                    if not order:
                        continue
                    key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
                    home = next((i for i in order if i == b or len(waiting[i]) < max(self.backlog, 3 * buckets[i].batch_size)),
                                None)
                    if home is None:
                        run.skip(SkipRecord("bucket_full", key, url, f"the backlogs of its buckets "
                                        f"({', '.join(buckets[i].name for i in order)}) are full"))
                        continue
                    if home != b:
                        waiting[home].append((sample, at))
                        continue
                decoded = run.decode(sample, at, spec)
                if decoded is not None:
                    batch.append(decoded)
            batches += 1
            yield run.emit(batch, state(), {"bucket": bucket.name})


class _ReaderRun:
    """One reader's walk through its samples: the skips met since its last batch (and how many in a row), the
    files it used that decode fewer frames than they claim, and the decoding of each sample from its own draw
    position, so that the same (seed, reader, position) always gives the same window and crop."""

    def __init__(self, dataset: ShardStream, reader: int):
        self.dataset, self.reader = dataset, reader
        self.skips: list[SkipRecord] = []
        self.shorts: list[SkipRecord] = []
        self.in_a_row = 0  # skips since the last good sample

    def skip(self, rec: SkipRecord) -> None:
        self.skips.append(rec)
        self.in_a_row += 1
        if self.in_a_row >= MAX_CONSECUTIVE_SKIPS:
            hint = ("its shards hold no sample for the bucket of this step, or too few: write the footage's "
                    "aspect ratios and durations across all shards, or drop the bucket"
                    if rec.reason == "bucket_full" else
                    "check the shards and the requested frames, size and fps")
            raise RuntimeError(f"reader {self.reader} skipped {self.in_a_row} samples in a row, the last for "
                               f"{rec.reason}: {rec.detail} ({rec.url}); {hint}")

    def on_shard_error(self, url: str, exn: Exception, read: int) -> None:
        reason, detail = shard_problem(exn, read)
        self.skip(SkipRecord(reason, "", url, detail))

    def places(self, sample: dict, buckets: Sequence[Bucket]) -> list[int]:
        """The buckets the sample may go to, best first; [] when none (the skip is recorded)."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        try:
            order = buckets_for(sample, buckets, self.dataset.spec.fps)
        except SkipSample as s:
            self.skip(SkipRecord(s.reason, key, url, s.detail))
            return []
        if not order:
            self.skip(no_bucket(sample, buckets, key, url))
        return order

    def decode(self, sample: dict, at: int, spec: ClipSpec) -> dict | None:
        """The sample decoded with its own window and crop (from its draw position `at`), or None: skipped."""
        key, url = sample.get("__key__", "?"), sample.get("__url__", "?")
        rng = np.random.default_rng([self.dataset.seed, self.reader, at])
        try:
            decoded = decode_sample(sample, spec, rng)
        except SkipSample as s:
            self.skip(SkipRecord(s.reason, key, url, s.detail))
            return None
        except Exception as e:  # decoding untrusted media can fail in any way; one sample never stops a run
            self.skip(SkipRecord("corrupt", key, url, f"{type(e).__name__}: {e}"))
            return None
        if "__short__" in decoded:  # used, and counted: a file whose header claims more than decodes
            self.shorts.append(SkipRecord("short_file", key, url, decoded.pop("__short__")))
        self.in_a_row = 0
        return decoded

    def emit(self, batch: list[dict], state: dict, extra: dict | None = None) -> dict:
        """The item the loader receives: the collated batch (none for the end marker) with the skips and short
        files met since the last one, this reader and its state after the batch."""
        collated = {} if not batch else collate_packed(batch) if self.dataset.packing else collate(batch)
        out = collated | (extra or {}) | {"__skips__": self.skips, "__shorts__": self.shorts,
                                          "__reader__": self.reader, "__state__": state}
        self.skips, self.shorts = [], []
        return out
