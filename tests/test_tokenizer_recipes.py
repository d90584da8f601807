"""bench/tokenizer_recipes.py: recipes trained for the same budget and judged on a whole held-out video."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from bench.tokenizer_recipes import FOOTAGE_RECIPE, main, parse_recipes, probe_rate

CLIPS = Path(__file__).parent / "assets" / "clips"


def test_a_video_in_both_training_and_held_out_footage_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="hold out whole videos"):
        main(["--train", str(CLIPS / "bikes.mp4"), "--held-out", str(CLIPS / "bikes.mp4"), "--recipe", "a=",
              "--work", str(tmp_path)])


def test_a_bad_flag_in_any_recipe_stops_the_bench_before_anything_trains(tmp_path):
    with pytest.raises(SystemExit):
        main(["--train", str(CLIPS / "bikes.mp4"), "--held-out", str(CLIPS / "carphone_pristine.mp4"),
              "--recipe", "good=--recon-loss mse", "--recipe", "bad=--recon-loss huber", "--work", str(tmp_path)])
    assert not (tmp_path / "probes").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_two_recipes_train_for_the_same_budget_and_are_scored_on_the_held_out_video(tmp_path, capsys):
    out = tmp_path / "recipes.json"
    assert main(["--train", str(CLIPS / "bikes.mp4"), "--held-out", str(CLIPS / "carphone_pristine.mp4"),
                 "--preset", "tiny", "--size", "32", "--frames", "9", "--batch-size", "2", "--minutes", "0.15",
                 "--probe-steps", "4", "--windows", "1", "--recipe", "l1=--recon-loss l1",
                 "--recipe", "mse=--recon-loss mse --lr 1e-3", "--work", str(tmp_path / "work"),
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["recipes"]) == ["l1", "mse"]
    for r in result["recipes"].values():
        # steps planned from the probe's rate fill the budget; --max-minutes stops the run at it in any case
        assert r["planned_steps"] >= 1 and 1 <= r["steps"] <= r["planned_steps"]
        assert r["train_s"] < 0.15 * 60 * 1.5
        assert 5 < r["held_out"]["psnr"] < 60 and 0 < r["held_out"]["ssim"] <= 1
        assert r["diagnosis"]["start"]["psnr"] == result["start"]["psnr"]  # one starting codec for both
    assert result["baseline"]["held_out"]["baseline_psnr"] > 5
    table = capsys.readouterr().out
    assert "| start (fitted linear codec) |" in table and "| equal-floats baseline |" in table


def test_each_decoding_worker_gets_its_own_copy_of_the_training_footage(tmp_path):
    from bench.tokenizer_recipes import training_shards

    videos = [CLIPS / "bikes.mp4", CLIPS / "carphone_pristine.mp4"]
    shards = training_shards(videos, tmp_path / "shards", copies=3)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["samples"] == 6 and len(manifest["shards"]) == 3  # a worker reads only its own shards
    for name in manifest["shards"]:
        with tarfile.open(shards / name) as tar:
            sources = [json.load(tar.extractfile(m))["source"] for m in tar.getmembers() if m.name.endswith(".json")]
        assert sorted(sources) == ["bikes.mp4", "carphone_pristine.mp4"]
    manifest = json.loads((training_shards(videos, tmp_path / "shards", copies=1) / "manifest.json").read_text())
    assert manifest["samples"] == 2 and len(manifest["shards"]) == 1  # another worker count rewrites them


def test_workers_below_one_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--workers must be at least 1"):
        main(["--train", str(CLIPS / "bikes.mp4"), "--held-out", str(CLIPS / "carphone_pristine.mp4"),
              "--recipe", "a=", "--workers", "0", "--work", str(tmp_path)])


def test_footage_names_the_kept_recipe_inside_a_recipes_flags():
    recipes = parse_recipes(["after=@footage", "frames9=@footage --frames 9", "l1=--recon-loss l1"])
    assert recipes["after"] == FOOTAGE_RECIPE.split()
    assert recipes["frames9"] == FOOTAGE_RECIPE.split() + ["--frames", "9"]
    assert recipes["l1"] == ["--recon-loss", "l1"]
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        parse_recipes(["bad name=--lr 1"])


def test_the_probe_rate_leaves_out_the_start_up_window_and_one_slow_window():
    rows = [{"step": 10, "samples_per_s": 1.0}, {"step": 20, "samples_per_s": 5.0},
            {"step": 30, "samples_per_s": 2.5}, {"step": 40, "samples_per_s": 5.2}, {"step": 40, "preview/psnr": 20}]
    assert probe_rate(rows) == 5.0
    assert probe_rate(rows[:1]) == 1.0
