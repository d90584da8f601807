"""Reading WebDataset tars: shard URLs from the forms a user gives, and each shard's samples in turn, the
samples before a damaged shard's damage included.

    urls = expand_urls("shards/")                       # a folder, a glob, a brace pattern, pipe: commands, a list
    for sample in iter_shard_samples(urls): ...         # {"__key__", "__url__", "mp4": bytes, "txt": bytes, ...}
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from typing import Callable, Iterable, Iterator, Sequence

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from errors import InputError, MissingInputError

from .video_io import MEDIA_EXTENSIONS

PARTIAL_MANIFEST = "manifest.partial.json"  # in a shard folder while make_shards writes it (see data.make_shards)

log = logging.getLogger(__name__)


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
    local = [u for u in out if not u.startswith("pipe:") and "://" not in u]
    empty = [u for u in local if os.path.isfile(u) and os.path.getsize(u) == 0]
    if empty and len(empty) == len(out):  # one empty shard among good ones is skipped and counted as bad_shard
        raise InputError(f"{empty[0]} is empty (0 bytes)" + (f", as are all {len(out)} shards" if len(out) > 1 else "")
                         + ": it was never written or was cut off; write the shards again with data.make_shards")
    for folder in sorted({os.path.dirname(u) or "." for u in local}):
        if os.path.isfile(os.path.join(folder, PARTIAL_MANIFEST)):
            raise InputError(f"{folder} is incomplete: make_shards was interrupted while writing it (it holds "
                             f"{PARTIAL_MANIFEST}); run the same make_shards command again to finish it")
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


def media_member(sample: dict) -> str | None:
    """The extension of a WebDataset sample's video or image member (mp4, avi, ..., png), if it has one."""
    return next((e for e in MEDIA_EXTENSIONS if e in sample), None)
