"""Write captioned WebDataset shards from a folder of videos or a CSV.

    python -m data.make_shards --input videos/ --out shards/ [--shard-size 100]
    python -m data.make_shards --input captions.csv --out shards/ [--path-column path --caption-column caption]

From a folder: every video or image below it (mp4, avi, mov, mkv, webm, ..., png, jpg), captioned by a
sidecar `NAME.txt` beside it. From a CSV: one row per video, with its path (relative to the CSV's
folder, or absolute) and its caption.

Each sample is `KEY.<ext>` (the original bytes, never re-encoded), `KEY.txt` (the caption) and
`KEY.json` (fps, frames, width, height, duration, codec, source). Every file is probed first; an
unreadable file or one without a caption is skipped, and the summary names each with its reason.
`OUT/manifest.json` records the shards, the sample count and the skipped files. The exit status is
non-zero only when nothing usable was written. The same input always gives the same shards.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from checkpoint_io import write_json_atomic
from errors import InputError

from .shards import ShardWriter, sanitize_key
from .video_io import MEDIA_EXTENSIONS, VideoReadError, probe


@dataclass
class Candidate:
    path: Path
    name: str  # relative name, used for the key and in reports
    caption: str | None
    missing_reason: str = ""  # why there is no caption, when there is none


@dataclass
class Skipped:
    name: str
    reason: str


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text or None


def candidates_from_folder(folder: Path) -> list[Candidate]:
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix.lower().lstrip(".") not in MEDIA_EXTENSIONS:
            continue
        sidecar = path.with_suffix(".txt")
        caption = _read_caption(sidecar)
        reason = "" if caption else f"no caption: expected a non-empty {sidecar.name} beside it"
        out.append(Candidate(path, path.relative_to(folder).as_posix(), caption, reason))
    return out


def candidates_from_csv(csv_path: Path, path_column: str, caption_column: str) -> list[Candidate]:
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


def make_shards(candidates: list[Candidate], out_dir: Path, shard_size: int = 100, log=print,
                overwrite: bool = False) -> dict:
    """Probe every candidate, write the usable ones and return the manifest. A non-empty `out_dir` is refused
    unless `overwrite` (see ShardWriter)."""
    skipped: list[Skipped] = []
    keys: set[str] = set()
    with ShardWriter(out_dir, shard_size, overwrite) as writer:
        for c in candidates:
            if not c.path.is_file():
                skipped.append(Skipped(c.name, "file not found"))
                continue
            if c.caption is None:
                skipped.append(Skipped(c.name, c.missing_reason))
                continue
            data = c.path.read_bytes()
            try:
                info = probe(data)
            except VideoReadError as e:
                skipped.append(Skipped(c.name, f"unreadable: {e}"))
                continue
            ext = c.path.suffix.lower().lstrip(".")
            meta = info.to_json() | {"source": c.name}
            writer.write({"__key__": _unique_key(c.name, keys), ext: data, "txt": c.caption, "json": meta})
    shards = writer.shards
    manifest = {
        "samples": writer.count,
        "shards": [p.name for p in shards],
        "skipped": [{"file": s.name, "reason": s.reason} for s in skipped],
    }
    if writer.count:
        write_json_atomic(out_dir / "manifest.json", manifest)
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
    if manifest["samples"] == 0:
        print("error: nothing usable was written; see the reasons above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
