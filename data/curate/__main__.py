"""From a folder of raw footage to scored clips and captioned shards.

    python -m data.curate --input RAW/ --out CURATED/ [--workers 2] [--min-frames 17 --max-frames 161]

Stages, in one run:
1. **cut**: each video's scenes found (PySceneDetect), a few frames trimmed at each cut, short scenes dropped,
   long ones split into windows; every clip written to `CURATED/clips/` (h264, the source's size and fps).
2. **score**: motion, stillness, sharpness, exposure, text overlay (OCR) and a perceptual hash, measured on the
   same decode; with `--clip`, how well the caption matches the clip, and with `--aesthetic-head` how good it
   looks (after the captions are known, in this process).
3. **filter**: a threshold per score, and near-duplicates; every clip stays in `CURATED/manifest.jsonl` with
   its scores, its caption and why it was dropped, if it was.
4. **shard**: the kept clips that have a caption (a sidecar `NAME.txt` beside the source, given to each of its
   clips) written to `CURATED/shards/` by `data.make_shards`' writer; `CURATED/report.md` counts what each
   stage kept and dropped, with a histogram per score.

Resumable: each source's clips and scores are recorded in `CURATED/work/` when it is done, and a rerun (after a
kill, or with other thresholds) redoes only the sources not done with the same cut options, so choosing
thresholds by looking at the report costs one filter-and-shard pass. The input folder is only read.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from checkpoint_io import write_bytes_atomic, write_json_atomic
from errors import InputError

from data.make_shards import Candidate, _media_files, _read_caption, link_refusal, make_shards
from data.video_io import VIDEO_EXTENSIONS

from . import clips as _clips
from . import semantic
from .clips import CutOptions, work_file
from .filters import REASONS, Thresholds, apply
from .report import write_report

FOOTAGE_EXTENSIONS = tuple(e for e in VIDEO_EXTENSIONS if e != "gif")  # an animated gif is not camera footage


def find_sources(folder: Path) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """((path, name relative to `folder`) of every video below it, sorted; {name: why refused} of the links that
    lead out of it). Images are not footage."""
    files, _ = _media_files(folder)
    sources, refused = [], {}
    for p in files:
        if p.suffix.lower().lstrip(".") not in FOOTAGE_EXTENSIONS:
            continue
        name = p.relative_to(folder).as_posix()
        refusal = link_refusal(p, folder)
        if refusal is not None:
            refused[name] = refusal
        else:
            sources.append((p, name))
    return sources, refused


def _done(out: Path, name: str, options: CutOptions) -> dict | None:
    try:
        record = json.loads(work_file(out, name).read_text())
    except (OSError, ValueError):
        return None
    if record.get("options") != options.fingerprint():
        return None
    if any(not (out / r["clip"]).is_file() for r in record.get("rows", [])):
        return None
    return record


def check_folders(inp: Path, out: Path) -> None:
    if not inp.is_dir():
        raise InputError(f"--input {inp}: not a folder (give the folder of raw footage)")
    if out.resolve().is_relative_to(inp.resolve()):
        raise InputError(f"--out {out} lies inside --input {inp}: the input is never written to; choose a folder "
                         f"outside it")


def cut_and_score_all(sources, out: Path, options: CutOptions, workers: int, log=print) -> dict[str, dict]:
    """Every source's record, the finished ones read back and the rest processed across `workers` processes."""
    records, jobs = {}, []
    for path, name in sources:
        done = _done(out, name, options)
        if done is not None:
            records[name] = done
        else:
            jobs.append((path, name, out, options))
    if records:
        log(f"{len(records)} of {len(sources)} sources already cut and scored in {out / 'work'}: not redone")
    bar = tqdm(total=len(jobs), desc="cut and score", unit="video", disable=not jobs)
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for name, record in pool.imap_unordered(_clips.process, jobs):
                records[name] = record
                bar.update()
    else:
        for job in jobs:
            name, record = _clips.process(job)
            records[name] = record
            bar.update()
    bar.close()
    return records


def caption_rows(rows: list[dict], sources: dict[str, Path], inp: Path) -> None:
    """Each row's `caption` and `caption_source`: the source's sidecar text, or None with why."""
    cache = {}
    for row in rows:
        name = row["source"]
        if name not in cache:
            cache[name] = _read_caption(sources[name].with_suffix(".txt"), inp)
        text, why = cache[name]
        row["caption"] = text
        row["caption_source"] = "sidecar" if text is not None else why


def shard(out: Path, rows: list[dict], shard_size: int, log=print) -> dict | None:
    candidates = [Candidate(out / r["clip"], r["clip"], r["caption"]) for r in rows if r["keep"] and r["caption"]]
    if not candidates:
        return None
    return make_shards(candidates, out / "shards", shard_size, log=log, own_output=True)


def run(inp: Path, out: Path, options: CutOptions, thresholds: Thresholds, workers: int = 1,
        shard_size: int = 100, log=print, clip: Path | None = None, aesthetic_head: Path | None = None,
        device: str = "cpu") -> dict:
    """The whole pipeline; returns the summary the report is made from. With `clip` (a CLIP folder) the clips
    get a caption-agreement score, and with `aesthetic_head` too an aesthetic one (`semantic`)."""
    check_folders(inp, out)
    semantic.check_folder(clip, aesthetic_head)
    sources, refused = find_sources(inp)
    if not sources:
        raise InputError(f"--input {inp}: no video files below it ({', '.join(FOOTAGE_EXTENSIONS)})")
    out.mkdir(parents=True, exist_ok=True)
    records = cut_and_score_all(sources, out, options, workers, log)
    ordered = [records[name] for _, name in sources]
    rows = [row for record in ordered for row in record.get("rows", [])]
    caption_rows(rows, {name: path for path, name in sources}, inp)
    t0 = time.perf_counter()
    if clip is not None:
        semantic.score_semantic(rows, out, clip, aesthetic_head, device, log)
    else:
        for row in rows:
            row["aesthetic"] = row["clip_score"] = None
    semantic_seconds = time.perf_counter() - t0
    rows = apply(rows, thresholds)
    write_bytes_atomic(out / "manifest.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    summary = {
        "sources": len(sources) + len(refused),
        "skipped": refused | {r["source"]: r["error"] for r in ordered if "error" in r},
        "scenes": sum(r.get("scenes", 0) for r in ordered),
        "scenes_too_short": sum(r.get("too_short", 0) for r in ordered),
        "clips": len(rows), "kept": sum(r["keep"] for r in rows),
        "dropped": {reason: sum(reason in r["drop"] for r in rows)
                    for reason in REASONS},
        "kept_without_caption": sum(r["keep"] and not r["caption"] for r in rows),
        "source_frames": sum(r.get("frames", 0) for r in ordered),
        "seconds": {stage: round(sum(r.get("seconds", {}).get(stage, 0.0) for r in ordered), 3)
                    for stage in ("detect", "cut", "score", "text")}
        | {"semantic": round(semantic_seconds, 3)},
        "options": asdict(options), "thresholds": asdict(thresholds),
    }
    manifest = shard(out, rows, shard_size, log)
    summary["sharded"] = manifest["samples"] if manifest else 0
    write_json_atomic(out / "summary.json", summary)
    write_report(out, rows, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.curate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="folder of raw videos (read only; sidecar NAME.txt "
                   "captions are given to each clip of NAME)")
    p.add_argument("--out", type=Path, required=True, help="output folder: clips/, manifest.jsonl, report.md, "
                   "shards/; a rerun goes on where the last one stopped")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes cutting and scoring "
                   "sources side by side (default: every core)")
    p.add_argument("--detector", choices=("content", "adaptive"), default="content", help="PySceneDetect's cut "
                   "detector: content (a jump between frames) or adaptive (a jump large against its neighbours'; "
                   "fewer false cuts in fast camera moves)")
    p.add_argument("--threshold", type=float, default=None, help="the detector's threshold (content: 27, "
                   "adaptive: 3); lower finds more cuts")
    p.add_argument("--min-frames", type=int, default=17, help="shortest clip kept, in frames (default 17)")
    p.add_argument("--max-frames", type=int, default=161, help="longest clip; longer scenes are split into "
                   "equal windows (default 161)")
    p.add_argument("--trim", type=int, default=2, help="frames dropped on each side of a cut (default 2)")
    p.add_argument("--crf", type=int, default=18, help="h264 quality of the written clips (default 18)")
    p.add_argument("--shard-size", type=int, default=100, help="samples per shard (default 100)")
    p.add_argument("--clip", type=Path, default=None, help="a local CLIP folder (CLIPModel, tokenizer and image "
                   "processor, as save_pretrained writes them): scores how well each caption matches its clip")
    p.add_argument("--aesthetic-head", type=Path, default=None, help="LAION's aesthetic predictor weights (.pth or "
                   ".safetensors; needs --clip, the ViT-L/14 it was trained on): scores how good each clip looks")
    p.add_argument("--device", default="cpu", help="where the CLIP model runs (cpu, cuda; default cpu)")
    for name in Thresholds.names():
        default = getattr(Thresholds(), name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=f"filter threshold (default {default}; data/curate/filters.py says why)")
    a = p.parse_args(argv)
    try:
        options = CutOptions(a.detector, a.threshold, a.min_frames, a.max_frames, a.trim, a.crf)
        thresholds = Thresholds(**{n: getattr(a, n) for n in Thresholds.names()})
        s = run(a.input, a.out, options, thresholds, a.workers, a.shard_size, clip=a.clip,
                aesthetic_head=a.aesthetic_head, device=a.device)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['sources']} sources ({len(s['skipped'])} skipped), {s['scenes']} scenes, {s['clips']} clips: "
          f"{s['kept']} kept, {s['sharded']} sharded; report: {a.out / 'report.md'}")
    if s["clips"] and not s["kept"]:
        print("every clip was dropped by the filters: the manifest and report are kept; loosen the thresholds the "
              "report's histograms show", file=sys.stderr)
        return 1
    return 0 if s["kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
