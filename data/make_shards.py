"""Write captioned WebDataset shards from a folder of videos or a CSV.

    python -m data.make_shards --input videos/ --out shards/ [--shard-size 100]
    python -m data.make_shards --input captions.csv --out shards/ [--path-column path --caption-column caption]

From a folder: every video or image below it (mp4, avi, mov, mkv, webm, ..., png, jpg), captioned by a
sidecar `NAME.txt` beside it (UTF-8 text). A link whose target lies outside the folder is refused, a video's
or a caption's alike, so a folder someone gave you cannot put /etc/passwd into a shard. From a CSV: one row
per video, with its path (relative to the CSV's folder, or absolute: the CSV names its files) and its caption.

Each sample is `KEY.<ext>` (the original bytes, never re-encoded, copied in chunks: a file larger than memory
is fine), `KEY.txt` (the caption) and `KEY.json` (fps, frames, width, height, duration, codec, source). Every
file is probed first; an unreadable file or one without a caption is skipped, and the summary names each with
its reason. `OUT/manifest.json` records the shards, the sample count and the skipped files. The exit status is
non-zero only when nothing usable was written. The same input always gives the same shards.

While it runs, `OUT/manifest.partial.json` records the shards finished so far; readers refuse a folder that
holds it. Interrupted (Ctrl-C, a kill, a crash), the same command again goes on after the last finished shard
and ends with the shards an uninterrupted run writes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from checkpoint_io import check_writable, write_json_atomic
from errors import InputError

from .shards import ShardWriter, sanitize_key
from .tar_reader import PARTIAL_MANIFEST
from .video_io import MEDIA_EXTENSIONS, VideoReadError, probe


@dataclass
class Candidate:
    path: Path
    name: str  # relative name, used for the key and in reports
    caption: str | None
    missing_reason: str = ""  # why it cannot be used (no caption, a link out of the input), when it cannot


@dataclass
class Skipped:
    name: str
    reason: str


def _outside(path: Path, root: Path) -> Path | None:
    """Where `path` really is, when a link takes it outside `root`; None when it stays inside."""
    target = path.resolve()
    return None if target.is_relative_to(root.resolve()) else target


def link_refusal(path: Path, root: Path) -> str | None:
    """Why a file below `root` is refused when it is a link whose target lies outside `root`; None when it is not."""
    target = _outside(path, root)
    return None if target is None else f"a link to {target}, outside --input: refused (copy the file in)"


def _read_caption(path: Path, root: Path) -> tuple[str | None, str]:
    """(the caption in sidecar `path`, "") or (None, why there is none)."""
    if not path.is_file():
        return None, f"no caption: expected a non-empty {path.name} beside it"
    target = _outside(path, root)
    if target is not None:
        return None, f"caption {path.name} is a link to {target}, outside --input: refused (copy the text in)"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return None, (f"caption {path.name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                      f"save it as UTF-8")
    return (text, "") if text else (None, f"no caption: {path.name} is empty")


def _media_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the media files below `folder`, the linked folders not descended into), both sorted."""
    files, linked_dirs = [], []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are listed, never followed
        base = Path(dirpath)
        linked_dirs += [base / d for d in dirnames if (base / d).is_symlink()]
        files += [base / f for f in filenames if Path(f).suffix.lower().lstrip(".") in MEDIA_EXTENSIONS]
    return sorted(files), sorted(linked_dirs)


def candidates_from_folder(folder: Path) -> list[Candidate]:
    out = []
    files, linked_dirs = _media_files(folder)
    for link in linked_dirs:
        name = link.relative_to(folder).as_posix()
        out.append(Candidate(link, name, None, f"a link to the folder {link.resolve()}: not followed (copy or move "
                                                f"its files into --input)"))
    for path in files:
        name = path.relative_to(folder).as_posix()
        refusal = link_refusal(path, folder)
        if refusal is not None:
            out.append(Candidate(path, name, None, refusal))
            continue
        caption, reason = _read_caption(path.with_suffix(".txt"), folder)
        out.append(Candidate(path, name, caption, reason))
    return out


def candidates_from_csv(csv_path: Path, path_column: str, caption_column: str) -> list[Candidate]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            for col in (path_column, caption_column):
                if col not in columns:
                    raise InputError(
                        f"{csv_path} has no column {col!r} (columns: {', '.join(columns)}); "
                        f"name them with --path-column and --caption-column"
                    )
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise InputError(f"{csv_path} is not UTF-8 text (offset {e.start}): save it as UTF-8") from e
    out = []
    for row in rows:
        rel = (row.get(path_column) or "").strip()
        path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
        caption = (row.get(caption_column) or "").strip() or None
        out.append(Candidate(path, rel, caption, "" if caption else f"no caption: empty {caption_column!r} column"))
    return out


def _unique_key(name: str, taken: set[str]) -> str:
    base = sanitize_key(Path(name).with_suffix("").as_posix())
    key, n = base, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def _fingerprint(candidates: list[Candidate], shard_size: int) -> str:
    """What an interrupted run must have been given for this one to go on from it."""
    h = hashlib.sha256(str(shard_size).encode())
    for c in candidates:
        size = c.path.stat().st_size if c.path.is_file() else -1
        h.update(json.dumps([c.name, str(c.path), size, c.caption, c.missing_reason]).encode())
    return h.hexdigest()


def _resume_state(out_dir: Path, fingerprint: str, overwrite: bool, own_output: bool = False) -> dict | None:
    """The progress an interrupted run of this same input left in `out_dir`, or None to start afresh. An
    interrupted run of other input is refused, unless `own_output` (the folder is the caller's to replace)."""
    partial = out_dir / PARTIAL_MANIFEST
    if overwrite or not partial.is_file():
        return None
    try:
        state = json.loads(partial.read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        if own_output:
            return None
        raise InputError(f"{out_dir} holds an interrupted make_shards of other input (or other --shard-size): give "
                         f"that input to finish it, or --overwrite to start afresh")
    if not all((out_dir / name).is_file() for name in state["shards"]):
        return None  # a finished shard has gone: nothing to go on from, so the folder is refused as not empty
    return state


def make_shards(candidates: list[Candidate], out_dir: Path, shard_size: int = 100, log=print,
                overwrite: bool = False, own_output: bool = False) -> dict:
    """Probe every candidate, write the usable ones and return the manifest. A non-empty `out_dir` is refused
    unless `overwrite` (see ShardWriter), or unless it holds an interrupted run of this same input: then the
    run goes on after its last finished shard. `own_output`: the folder belongs to the calling command (as
    `data.curate`'s shards/ does), so an interrupted run of this input is gone on from and anything else replaced."""
    check_writable(out_dir)  # a read-only or impossible --out is one line before any file is probed
    fingerprint = _fingerprint(candidates, shard_size)
    state = _resume_state(out_dir, fingerprint, overwrite, own_output)
    overwrite = overwrite or (own_output and state is None)
    done = state["done"] if state else 0
    skipped = [Skipped(**s) for s in state["skipped"]] if state else []
    keys: set[str] = set(state["keys"]) if state else set()
    if state:
        log(f"going on after {len(state['shards'])} finished shards ({state['samples']} samples) in {out_dir}")
    writer = ShardWriter(out_dir, shard_size, overwrite, resume=state["shards"] if state else None,
                         keys=state["keys"] if state else None, count=state["samples"] if state else 0)
    partial = out_dir / PARTIAL_MANIFEST

    def save_progress(done: int) -> None:
        write_json_atomic(partial, {"fingerprint": fingerprint, "done": done, "samples": writer.count,
                                    "shards": [p.name for p in writer.shards], "keys": sorted(keys),
                                    "skipped": [vars(s) for s in skipped]})

    save_progress(done)
    with writer:
        for i in range(done, len(candidates)):
            c = candidates[i]
            if c.caption is None or not c.path.is_file():
                skipped.append(Skipped(c.name, c.missing_reason or (
                    f"a link to {os.readlink(c.path)}, which does not exist" if c.path.is_symlink() else "file not found")))
                continue
            try:
                info = probe(c.path)  # from the file: demuxed, never read into memory whole
            except VideoReadError as e:
                skipped.append(Skipped(c.name, f"unreadable: {e}"))
                continue
            ext = c.path.suffix.lower().lstrip(".")
            meta = info.to_json() | {"source": c.name}
            finished = len(writer.shards)
            writer.write({"__key__": _unique_key(c.name, keys), ext: c.path.resolve(), "txt": c.caption, "json": meta})
            if len(writer.shards) > finished:
                save_progress(i + 1)
    shards = writer.shards
    manifest = {
        "samples": writer.count,
        "shards": [p.name for p in shards],
        "skipped": [{"file": s.name, "reason": s.reason} for s in skipped],
    }
    if writer.count:
        write_json_atomic(out_dir / "manifest.json", manifest)
    partial.unlink()
    log(f"wrote {writer.count} samples in {len(shards)} shards to {out_dir}")
    if skipped:
        log(f"skipped {len(skipped)} files:")
        for s in skipped:
            log(f"  {s.name}: {s.reason}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="a folder of videos with NAME.txt captions, or a CSV")
    parser.add_argument("--out", required=True, type=Path, help="output folder for NNNNNN.tar shards")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, replacing its shards and manifest (nothing else is touched)")
    parser.add_argument("--path-column", default="path", help="CSV column holding the video path (default 'path')")
    parser.add_argument("--caption-column", default="caption", help="CSV column holding the caption (default 'caption')")
    args = parser.parse_args(argv)

    if args.input.is_dir():
        candidates = candidates_from_folder(args.input)
    elif args.input.is_file() and args.input.suffix.lower() == ".csv":
        try:
            candidates = candidates_from_csv(args.input, args.path_column, args.caption_column)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        print(f"error: --input {args.input} is neither a folder nor a .csv file", file=sys.stderr)
        return 2
    if not candidates:
        print(f"error: no video or image files found in {args.input} ({', '.join(MEDIA_EXTENSIONS)})", file=sys.stderr)
        return 1
    try:
        manifest = make_shards(candidates, args.out, args.shard_size, overwrite=args.overwrite)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the shards finished so far are kept in {args.out}; the same command again goes on "
              f"from them", file=sys.stderr)
        return 130
    if manifest["samples"] == 0:
        print("error: nothing usable was written; see the reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
