"""bench/cascade.py end to end at toy scale: data, the three DiTs, both designs' videos at 1x/2x/4x, the table,
the JSON and the trajectory figure (the real run is in the closing note of the cascade issue)."""

from __future__ import annotations

import json

import pytest

from bench import cascade
from evaluation.motion_score import read_frames
from tests.conftest import save_tiny_vae


@pytest.mark.slow  # 15 s, a benchmark's plumbing
def test_cascade_bench_runs_end_to_end(tmp_path, capsys):
    save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "out"
    assert cascade.main(["--out", str(out), "--vae", str(tmp_path / "vae"), "--clips", "8", "--size", "32",
                         "--steps", "2", "--batch-size", "2", "--width", "32", "--depth", "1", "--k", "1",
                         "--seen-captions", "1", "--sample-steps", "2", "--batch", "4"]) == 0
    record = json.loads((out / "cascade.json").read_text())
    assert record["train_steps"] == {"whole": 2, "keyframes": 1, "interpolate": 1}  # equal compute
    assert set(record["results"]) == {f"{m}_{n}" for m in ("whole", "cascade") for n in ("1x", "2x", "4x")}
    for method in ("whole", "cascade"):
        for length, frames in (("1x", 17), ("2x", 33), ("4x", 65)):
            videos = sorted((out / "videos" / f"{method}_{length}").glob("*.mp4"))
            assert len(videos) == 6  # 5 held-out captions and 1 seen, 1 seed each
            assert read_frames(videos[0]).shape == (frames, 32, 32, 3)
        # a shorter clip is the start of the longer one
        name = videos[0].name
        short, long = (read_frames(out / "videos" / f"{method}_{n}" / name) for n in ("1x", "4x"))
        assert abs(short.astype(int) - long[:17].astype(int)).mean() < 3
    steps = {json.loads(line)["step"] for n in ("whole", "keyframes", "interpolate")
             for line in (out / n / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)}
    assert max(steps) == 2  # (a) 2 steps; (b) 1 + 1
    assert (out / "trajectories.png").stat().st_size > 1000
    assert "| 4x | cascade | held_out |" in capsys.readouterr().out
