"""The curation benchmark: clips per second per stage on the CPU, and the share of clips each filter drops.

    python bench/curate.py [--input tests/assets/clips] [--detector content adaptive] [--out bench/results/curate.json]

Runs `python -m data.curate`'s pipeline (one process, so each stage's time is its own) on a folder of footage
for each detector, and prints per stage: seconds, clips per second and source frames per second (the multiple
of real time is frames per second over the footage's fps). The filters' drop shares are of the clips cut.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table  # noqa: E402
from checkpoint_io import write_json_atomic  # noqa: E402
from data.curate.__main__ import run  # noqa: E402
from data.curate.clips import CutOptions  # noqa: E402
from data.curate.filters import Thresholds  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, default=ROOT / "tests" / "assets" / "clips", help="folder of footage")
    p.add_argument("--detector", nargs="+", default=["content", "adaptive"], choices=["content", "adaptive"],
                   help="cut detectors to time")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "curate.json", help="JSON written")
    a = p.parse_args(argv)
    results, stage_rows, drop_rows = [], [], []
    for detector in a.detector:
        with tempfile.TemporaryDirectory() as tmp:
            s = run(a.input, Path(tmp) / "out", CutOptions(detector=detector), Thresholds(), workers=1,
                    log=lambda *_: None)
        results.append({"detector": detector, "summary": s})
        for stage, seconds in s["seconds"].items():
            stage_rows.append([detector, stage, f"{seconds:.2f}", f"{s['clips'] / seconds:.1f}" if seconds else "-",
                               f"{s['source_frames'] / seconds:.0f}" if seconds else "-"])
        clips = max(s["clips"], 1)
        drop_rows.append([detector, s["sources"], s["scenes"], s["clips"]]
                         + [f"{n / clips:.2f}" for n in s["dropped"].values()] + [f"{s['kept'] / clips:.2f}"])
    print(markdown_table(["detector", "stage", "seconds", "clips/s", "source frames/s"], stage_rows))
    print()
    reasons = list(results[0]["summary"]["dropped"])
    print(markdown_table(["detector", "videos", "scenes", "clips"] + [f"dropped: {r}" for r in reasons] + ["kept"],
                         drop_rows))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out, {"input": str(a.input), "results": results})
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
