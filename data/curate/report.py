"""The curation report: what each stage kept and dropped, a histogram per score with its threshold drawn on it,
and for each filter a contact sheet of clips it dropped beside clips it kept, so thresholds are chosen by looking."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from checkpoint_io import save_figure, write_bytes_atomic

SCORES = {  # score: (thresholds drawn on its histogram, the filter it feeds)
    "motion": (("motion_min",), "motion"),
    "static_fraction": (("static_max",), "static"),
    "sharpness": (("sharpness_min",), "blur"),
    "brightness": (("brightness_min", "brightness_max"), "exposure"),
    "clipped": (("clipped_max",), "exposure"),
    "text_area": (("text_max",), "text"),
    "aesthetic": (("aesthetic_min",), "aesthetic"),  # these two only where the run had a CLIP model
    "clip_score": (("clip_min",), "caption"),
}
SHEET_COUNT = 4


def _middle_frame(path: Path, height: int = 96) -> np.ndarray:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        want = max(0, (stream.frames or 1) // 2)
        for i, frame in enumerate(c.decode(stream)):
            if i >= want:
                break
        width = max(2, round(frame.width * height / frame.height))
        return frame.to_ndarray(format="rgb24", width=width, height=height)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _histograms(rows, thresholds, path: Path) -> None:
    plt = _pyplot()
    scored = [s for s in SCORES if any(r.get(s) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(scored), figsize=(3.2 * len(scored), 2.6), squeeze=False)
    for ax, score in zip(axes[0], scored):
        limits = SCORES[score][0]
        ax.hist([r[score] for r in rows if r.get(score) is not None], bins=30, color="#4878a8")
        for limit in limits:
            ax.axvline(thresholds[limit], color="#c03030", linestyle="--", linewidth=1)
        ax.set_title(score, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def _sheet(out: Path, dropped, kept, title: str, path: Path) -> None:
    plt = _pyplot()
    columns = max(len(dropped), len(kept), 1)
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 3.4), squeeze=False)
    for r, (label, group) in enumerate((("dropped", dropped), ("kept", kept))):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(group):
                row, value = group[c]
                ax.imshow(_middle_frame(out / row["clip"]))
                ax.set_title(f"{label}: {value}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, rows: list[dict], summary: dict) -> Path:
    """`out/report.md` and its pictures in `out/report/`."""
    pictures = out / "report"
    pictures.mkdir(exist_ok=True)
    s = summary
    lines = ["# Curation report", "",
             "| stage | in | kept | dropped |", "| --- | --- | --- | --- |",
             f"| read | {s['sources']} videos | {s['sources'] - len(s['skipped'])} | "
             f"{len(s['skipped'])} skipped |",
             f"| cut | {s['scenes']} scenes | {s['clips']} clips | {s['scenes_too_short']} scenes too short |"]
    for reason, n in s["dropped"].items():
        lines.append(f"| filter: {reason} | | | {n} |")
    lines += [f"| kept | {s['clips']} clips | {s['kept']} | {s['clips'] - s['kept']} |",
              f"| shard | {s['kept']} kept | {s['sharded']} with a caption | {s['kept_without_caption']} "
              f"without one |", ""]
    if s["skipped"]:
        lines += ["Skipped:", ""] + [f"- `{name}`: {why}" for name, why in s["skipped"].items()] + [""]
    if rows:
        _histograms(rows, s["thresholds"], pictures / "histograms.png")
        lines += ["## Scores", "", "The dashed lines are the thresholds.", "", "![histograms](report/histograms.png)",
                  ""]
        for score, (limits, reason) in SCORES.items():
            dropped = sorted(((r, r[score]) for r in rows if reason in r["drop"]), key=lambda x: x[1])
            kept = sorted(((r, r[score]) for r in rows if r["keep"] and r.get(score) is not None), key=lambda x: x[1])
            if not dropped:
                continue
            # the dropped clips nearest the threshold and the kept ones nearest it: where the line is drawn
            # (above an upper limit, those are the lowest dropped and the highest kept)
            upper = all(limit.endswith("_max") for limit in limits)
            near_drop = dropped[:SHEET_COUNT] if upper or reason == "exposure" else dropped[-SHEET_COUNT:]
            near_kept = kept[-SHEET_COUNT:] if upper else kept[:SHEET_COUNT]
            _sheet(out, near_drop, near_kept, f"{score}: dropped ({reason}) and kept",
                   pictures / f"sheet_{score}.png")
            lines += [f"![{score}](report/sheet_{score}.png)", ""]
    path = out / "report.md"
    write_bytes_atomic(path, "\n".join(lines).encode())
    return path
