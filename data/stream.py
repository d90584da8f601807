"""One training reader's raw samples: its shards in a seeded order, shuffled through a buffer, and a state to
resume from whose cost does not grow with the step.

    stream = ReaderStream(my_urls, seed, reader, buffer=64, on_error=...)
    for sample in stream: ...          # {"__key__", "__url__", "__index__", "mp4": bytes, "txt": bytes, ...}
    state = stream.state()             # JSON-able, taken between samples
    again = ReaderStream(my_urls, seed, reader, buffer=64, on_error=..., state=state)   # the same samples next

The stream is the one webdataset's `shuffle` gives over the reader's shard stream: each pass over the shards
in a fresh order (random.Random(f"shards-{seed}-{reader}")), the samples through a buffer of `buffer` samples
(refilled two at a time until full, picking from the start once a quarter full; random.Random(f"samples-
{seed}-{reader}")), drawing the same random numbers in the same order. Only here the state is in the open:
where the shard stream is (the order generator's state at the start of this pass, the shard's place in it,
how many of its samples were taken), the buffer as (shard, index in shard) pairs, and the picking
generator's state. A resumed stream reads the current shard up to where it was and the shards that hold the
buffer's samples up to them: about one shard and the buffer, whatever the step, where replaying the stream
from its start reads every sample drawn since step 0.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from . import tar_reader


class StaleState(ValueError):
    """A saved state names a sample its shard no longer holds (the shards were rewritten)."""


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


class ReaderStream:
    def __init__(self, urls: list[str], seed: int, reader: int, buffer: int,
                 on_error: Callable[[str, Exception, int], None], state: dict | None = None):
        self.urls, self.bufsize, self.initial = list(urls), buffer, min(buffer // 4, buffer)
        self.on_error = on_error
        self.order_rng = random.Random(f"shards-{seed}-{reader}")
        self.pick_rng = random.Random(f"samples-{seed}-{reader}")
        self.order: list[str] | None = None
        self.order_state = _rng_state(self.order_rng)
        self.index = self.taken = 0
        self.buffer: list[dict] = []
        if state is not None:
            self._restore(state)

    # ---- the shard stream ---------------------------------------------------------------------------

    def _new_pass(self) -> None:
        self.order_state = _rng_state(self.order_rng)
        self.order = list(self.urls)
        self.order_rng.shuffle(self.order)
        self.index = self.taken = 0

    def _raw(self) -> Iterator[dict]:
        """The reader's shards' samples, pass after pass, each tagged with its index in its shard. A resumed
        stream reads the current shard's first `taken` samples again without yielding them."""
        while True:
            if self.order is None or self.index >= len(self.order):
                self._new_pass()
            url = self.order[self.index]
            for i, sample in enumerate(tar_reader.shard_samples([{"url": url}], self.on_error)):
                if i < self.taken:
                    continue
                self.taken = i + 1
                sample["__index__"] = i
                yield sample
            self.index, self.taken = self.index + 1, 0

    # ---- the shuffle ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        raw, buf = self._raw(), self.buffer
        while True:
            buf.append(next(raw))
            if len(buf) < self.bufsize:
                buf.append(next(raw))
            if len(buf) >= self.initial:
                k = self.pick_rng.randint(0, len(buf) - 1)
                sample = buf[k]
                buf[k] = buf[-1]
                buf.pop()
                yield sample

    # ---- state ----------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"order_state": self.order_state, "index": self.index, "taken": self.taken,
                "pick_state": _rng_state(self.pick_rng),
                "buffer": [[s["__url__"], s["__index__"]] for s in self.buffer]}

    def _restore(self, state: dict) -> None:
        _set_rng_state(self.order_rng, state["order_state"])
        self._new_pass()  # this pass's order again
        self.index, self.taken = state["index"], state["taken"]
        _set_rng_state(self.pick_rng, state["pick_state"])
        self.buffer[:] = self.fetch([tuple(e) for e in state["buffer"]])

    def fetch(self, wanted: list[tuple[str, int]]) -> list[dict]:
        """The samples (url, index in shard), in that order: each shard that holds some is read up to the last."""
        found: dict[tuple[str, int], dict] = {}
        for url in dict.fromkeys(u for u, _ in wanted):
            last = max(i for u, i in wanted if u == url)
            for i, sample in enumerate(tar_reader.shard_samples([{"url": url}], lambda *_: None)):
                if (url, i) in wanted:
                    found[(url, i)] = sample | {"__index__": i}
                if i >= last:
                    break
        missing = [w for w in wanted if w not in found]
        if missing:
            raise StaleState(f"{len(missing)} buffered samples are no longer in their shards (first: {missing[0]})")
        return [found[w] for w in wanted]
