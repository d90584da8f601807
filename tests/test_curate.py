"""Curation (`python -m data.curate`): scene cuts on real footage, the score filters, captions, resume, bad input."""

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("scenedetect")
pytest.importorskip("cv2")

from data.curate import __main__ as curate  # noqa: E402
from data.curate import clips as clips_module  # noqa: E402
from data.curate.filters import Thresholds  # noqa: E402
from data.curate.scenes import Span, detect_scenes, plan_clips  # noqa: E402
from data.video_write import write_video  # noqa: E402

CLIPS = Path(__file__).parent / "assets" / "clips"
SIZE = (128, 96)  # width, height of the test footage


def _frames(name: str, start: int, end: int, size=SIZE) -> list[np.ndarray]:
    out = []
    with av.open(str(CLIPS / name)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i >= end:
                break
            if i >= start:
                out.append(f.to_ndarray(format="rgb24", width=size[0], height=size[1]))
    return out


def _joined(path: Path) -> Path:
    """Three shots of real footage joined: cuts at frames 35 and 75 (each piece from inside one shot of bikes)."""
    shots = _frames("bikes.mp4", 35, 70) + _frames("carphone_pristine.mp4", 0, 40) + _frames("bikes.mp4", 80, 130)
    return write_video(path, np.stack(shots), fps=25)


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_cuts_of_three_joined_shots_are_found_within_two_frames(tmp_path, detector):
    scenes, total, fps = detect_scenes(_joined(tmp_path / "joined.mp4"), detector)
    assert total == 125 and fps == 25
    cuts = [s.start for s in scenes[1:]]
    assert len(cuts) == 2, scenes
    assert abs(cuts[0] - 35) <= 2 and abs(cuts[1] - 75) <= 2


def test_a_video_without_cuts_is_one_scene():
    scenes, total, _ = detect_scenes(CLIPS / "carphone_pristine.mp4")
    assert scenes == [Span(0, total)] and total == 120


def test_clip_plan_trims_at_cuts_drops_short_scenes_and_splits_long_ones_evenly():
    scenes = [Span(0, 40), Span(40, 50), Span(50, 200)]
    clips, too_short = plan_clips(scenes, min_frames=17, max_frames=61, trim=2)
    assert too_short == 1  # 40-50 is 6 frames once trimmed
    assert clips[0] == Span(0, 38)  # the video's own start is not a cut: not trimmed
    rest = clips[1:]  # 52-200: 148 frames in three windows of 50, 49, 49
    assert [c.frames for c in rest] == [50, 49, 49] and rest[0].start == 52 and rest[-1].end == 200
    with pytest.raises(Exception, match="min-frames"):
        plan_clips(scenes, min_frames=30, max_frames=20, trim=0)


def _footage(folder: Path) -> Path:
    """A folder of raw footage: a moving shot with a caption, a frozen one with a caption, a joined video without."""
    folder.mkdir()
    write_video(folder / "moving.mp4", np.stack(_frames("carphone_pristine.mp4", 0, 40)), fps=25)
    (folder / "moving.txt").write_text("a man talks in a moving car")
    frame = _frames("bikes.mp4", 100, 101)[0]
    write_video(folder / "frozen.mp4", np.stack([frame] * 40), fps=25)
    (folder / "frozen.txt").write_text("a still picture of a bike")
    _joined(folder / "sub" / "joined.mp4")
    return folder


def test_curate_drops_the_frozen_clip_keeps_the_moving_one_and_shards_the_captioned(tmp_path):
    raw = _footage(tmp_path / "raw")
    before = _tree(raw)
    summary = curate.run(raw, tmp_path / "out", clips_module.CutOptions(min_frames=17, max_frames=61),
                         Thresholds())
    rows = {(r["source"], r["start_frame"]): r for r in _manifest(tmp_path / "out")}
    frozen = rows[("frozen.mp4", 0)]
    moving = rows[("moving.mp4", 0)]
    assert "motion" in frozen["drop"] and "static" in frozen["drop"] and not frozen["keep"]
    assert frozen["motion"] < 0.01 and frozen["static_fraction"] == 1  # h264 leaves a trace of flow, no more
    assert moving["keep"] and moving["motion"] > 0.1 and moving["caption"] == "a man talks in a moving car"
    joined = sorted(r["start_frame"] for r in rows.values() if r["source"] == "sub/joined.mp4")
    assert len(joined) == 3 and joined[0] == 0  # one clip per shot
    assert all(r["caption"] is None for r in rows.values() if r["source"] == "sub/joined.mp4")
    # its middle shot is the moving clip's footage again: a near-duplicate of it
    assert rows[("sub/joined.mp4", joined[1])]["duplicate_of"] == moving["clip"]
    assert summary["sharded"] == 1 and summary["kept_without_caption"] == 2
    shards = json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())
    assert shards["samples"] == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| filter: motion | | | 1 |" in report and (tmp_path / "out" / "report" / "histograms.png").is_file()
    assert (tmp_path / "out" / "report" / "sheet_motion.png").is_file()
    assert _tree(raw) == before  # the input is only read


def test_a_killed_run_goes_on_without_redoing_finished_sources_and_ends_with_the_same_shards(tmp_path, monkeypatch):
    raw = _footage(tmp_path / "raw")
    (raw / "sub" / "joined.txt").write_text("bikes, a car, bikes")
    options = clips_module.CutOptions(min_frames=17, max_frames=61)
    curate.run(raw, tmp_path / "whole", options, Thresholds())

    real = clips_module.cut_and_score
    calls = []

    def killed_on_the_second(path, name, clips_dir, opts):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, name, clips_dir, opts)

    monkeypatch.setattr(clips_module, "cut_and_score", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        curate.run(raw, tmp_path / "killed", options, Thresholds())
    calls.clear()
    monkeypatch.setattr(clips_module, "cut_and_score", lambda *a: calls.append(a[1]) or real(*a))
    curate.run(raw, tmp_path / "killed", options, Thresholds())
    assert calls == ["moving.mp4", "sub/joined.mp4"]  # frozen.mp4, finished before the kill, is not redone
    shards = sorted((tmp_path / "whole" / "shards").glob("*.tar"))
    assert shards and [p.read_bytes() for p in shards] == [
        p.read_bytes() for p in sorted((tmp_path / "killed" / "shards").glob("*.tar"))]
    assert _manifest(tmp_path / "whole") == _manifest(tmp_path / "killed")

    calls.clear()  # other thresholds: only the filter and shard stages run again, and the shards are replaced
    sharded = json.loads((tmp_path / "killed" / "shards" / "manifest.json").read_text())["samples"]
    summary = curate.run(raw, tmp_path / "killed", options, Thresholds(dup_bits=-1))  # keeps the repeated shot
    assert calls == [] and summary["sharded"] == sharded + 1
    assert json.loads((tmp_path / "killed" / "shards" / "manifest.json").read_text())["samples"] == sharded + 1
    curate.run(raw, tmp_path / "killed", options, Thresholds(motion_min=100.0))
    assert calls == [] and not any(r["keep"] for r in _manifest(tmp_path / "killed"))


def test_bad_footage_is_a_counted_skip_and_the_rest_goes_on(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "empty.mp4").write_bytes(b"")
    (raw / "garbage.mov").write_bytes(b"not a video at all" * 100)
    write_video(raw / "moving.mp4", np.stack(_frames("carphone_pristine.mp4", 0, 30)), fps=25)
    (raw / "moving.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    rng = np.random.default_rng(0)  # a cut every frame: noise, each frame unlike the last
    write_video(raw / "noise.mp4", rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8), fps=25)
    summary = curate.run(raw, tmp_path / "out", clips_module.CutOptions(min_frames=17, max_frames=61),
                         Thresholds())
    assert set(summary["skipped"]) == {"empty.mp4", "garbage.mov", "noise.mp4"}
    assert summary["skipped"]["empty.mp4"].startswith("unreadable")
    assert summary["skipped"]["garbage.mov"].startswith("unreadable")
    assert "as large as a cut" in summary["skipped"]["noise.mp4"]
    rows = _manifest(tmp_path / "out")
    assert [r["source"] for r in rows] == ["moving.mp4"]
    assert rows[0]["caption"] is None and "not UTF-8" in rows[0]["caption_source"]
    assert "garbage.mov" in (tmp_path / "out" / "report.md").read_text()


def test_the_same_shot_twice_is_dropped_as_a_near_duplicate(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shot = np.stack(_frames("carphone_pristine.mp4", 0, 30))
    write_video(raw / "a.mp4", shot, fps=25)
    write_video(raw / "b.mp4", shot, fps=25, crf=30)  # the same picture, re-encoded
    curate.run(raw, tmp_path / "out", clips_module.CutOptions(min_frames=17, max_frames=61), Thresholds())
    a, b = _manifest(tmp_path / "out")
    assert a["keep"] and b["drop"] == ["duplicate"] and b["duplicate_of"] == a["clip"]


def _subtitled(frames: list[np.ndarray], line: str) -> list[np.ndarray]:
    """Each frame with a line of white subtitles burned in near its bottom, as a broadcast would."""
    import cv2

    out = []
    for f in frames:
        f = f.copy()
        h, w = f.shape[:2]
        cv2.putText(f, line, (w // 16, h - h // 12), cv2.FONT_HERSHEY_SIMPLEX, w / 700, (255, 255, 255), 2,
                    cv2.LINE_AA)
        out.append(f)
    return out


@pytest.mark.parametrize("clip, start, size", [("bikes.mp4", 150, (640, 272)), ("carphone_pristine.mp4", 0, (176, 144))])
def test_a_shot_with_burned_in_subtitles_scores_above_the_same_shot_without_and_is_dropped(tmp_path, clip, start,
                                                                                           size):
    raw = tmp_path / "raw"
    raw.mkdir()
    shot = _frames(clip, start, start + 30, size)
    write_video(raw / "clean.mp4", np.stack(shot), fps=25)
    write_video(raw / "subtitled.mp4", np.stack(_subtitled(shot, "where are you going tonight?")), fps=25)
    curate.run(raw, tmp_path / "out", clips_module.CutOptions(min_frames=17, max_frames=61), Thresholds())
    clean, subtitled = _manifest(tmp_path / "out")
    assert clean["text_area"] < 0.005 and subtitled["text_area"] > 0.02, (clean["text_area"], subtitled["text_area"])
    assert clean["keep"] and subtitled["drop"] == ["text"]
    assert (tmp_path / "out" / "report" / "sheet_text_area.png").is_file()


def test_command_line_errors_are_one_line(tmp_path, capsys):
    raw = _footage(tmp_path / "raw")
    assert curate.main(["--input", str(raw), "--out", str(raw / "curated")]) == 2
    assert "inside --input" in capsys.readouterr().err
    assert not (raw / "curated").exists()
    assert curate.main(["--input", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    # thresholds that drop everything: said, and the manifest and report are kept
    assert curate.main(["--input", str(raw), "--out", str(tmp_path / "o"), "--workers", "1",
                        "--min-frames", "17", "--max-frames", "61", "--sharpness-min", "1e9"]) == 1
    assert "every clip was dropped" in capsys.readouterr().err
    assert (tmp_path / "o" / "manifest.jsonl").is_file() and (tmp_path / "o" / "report.md").is_file()


def test_the_command_runs_its_worker_processes_and_they_give_the_manifest_of_one_process(tmp_path):
    """Under `python -m data.curate` the workers are spawned and import the stage by module name: a stage defined in
    the main module hung them."""
    import subprocess
    import sys
    raw = _footage(tmp_path / "raw")
    done = subprocess.run([sys.executable, "-m", "data.curate", "--input", str(raw), "--out", str(tmp_path / "o"),
                           "--workers", "2", "--min-frames", "17", "--max-frames", "61"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "3 sources (0 skipped)" in done.stdout
    curate.run(raw, tmp_path / "one", clips_module.CutOptions(min_frames=17, max_frames=61), Thresholds(), workers=1)
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "o")


def _lai_reference(state: dict):
    """LAION's aesthetic predictor as its own code builds it: one Sequential named `layers`, dropout included."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

        def forward(self, x):
            return self.layers(x)

    mlp = MLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval()


def test_a_tiny_clip_and_aesthetic_head_score_every_clip_as_transformers_does_and_rerun_from_cache(tmp_path,
                                                                                                   monkeypatch):
    import torch
    import transformers
    from safetensors.torch import save_file

    from data.curate import semantic
    from tests.conftest import write_tiny_clip

    raw = _footage(tmp_path / "raw")
    (raw / "sub" / "joined.txt").write_text("bikes a car bikes")
    captions = ["a man talks in a moving car", "a still picture of a bike", "bikes a car bikes"]
    clip_dir = write_tiny_clip(tmp_path / "clip", captions)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in semantic.AestheticHead(16).state_dict().items()}
    save_file(state, tmp_path / "head.safetensors")
    options, open_all = clips_module.CutOptions(min_frames=17, max_frames=61), Thresholds(aesthetic_min=-1e9,
                                                                                          clip_min=-1e9)
    curate.run(raw, tmp_path / "out", options, open_all, clip=clip_dir, aesthetic_head=tmp_path / "head.safetensors")
    rows = _manifest(tmp_path / "out")
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(clip_dir)
    proc = transformers.CLIPImageProcessor.from_pretrained(clip_dir)
    reference = _lai_reference(state)
    for row in rows:
        frames = semantic.clip_frames(tmp_path / "out" / row["clip"])
        assert len(frames) == semantic.FRAMES
        with torch.no_grad():
            out = model(**tok([row["caption"]], return_tensors="pt"), pixel_values=proc(
                images=list(frames), return_tensors="pt").pixel_values)
            image = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            aesthetic = float(reference(image).mean())
            score = float(out.logits_per_image[:, 0].mean() / model.logit_scale.exp() * 100)
        assert row["clip_score"] == pytest.approx(score, abs=1e-3)
        assert row["aesthetic"] == pytest.approx(aesthetic, abs=1e-3)
    # other thresholds: the cached scores are read back (no model is loaded) and the lowest-agreeing clip drops
    monkeypatch.setattr("evaluation.clip_score.ClipScore.from_local", lambda *a, **k: pytest.fail("rescored"))
    scores = sorted(r["clip_score"] for r in rows)
    curate.run(raw, tmp_path / "out", options, Thresholds(aesthetic_min=-1e9, clip_min=(scores[0] + scores[1]) / 2),
               clip=clip_dir, aesthetic_head=tmp_path / "head.safetensors")
    again = _manifest(tmp_path / "out")
    assert [r["clip_score"] for r in again] == [r["clip_score"] for r in rows]
    assert sum("caption" in r["drop"] for r in again) == 1
    assert (tmp_path / "out" / "report" / "sheet_clip_score.png").is_file()


def test_a_clip_folder_or_head_that_does_not_fit_is_a_one_line_error(tmp_path, capsys):
    from safetensors.torch import save_file

    from data.curate import semantic
    from tests.conftest import write_tiny_clip

    raw = tmp_path / "raw"
    raw.mkdir()
    write_video(raw / "moving.mp4", np.stack(_frames("carphone_pristine.mp4", 0, 20)), fps=25)
    (raw / "moving.txt").write_text("a man in a car")
    clip_dir = write_tiny_clip(tmp_path / "clip", ["a man in a car"])
    (tmp_path / "not_clip").mkdir()
    (tmp_path / "not_clip" / "config.json").write_text("{}")
    common = ["--input", str(raw), "--workers", "1", "--min-frames", "17"]
    capsys.readouterr()  # what saving the tiny model printed
    assert curate.main(common + ["--out", str(tmp_path / "a"), "--clip", str(tmp_path / "not_clip")]) == 2
    err = capsys.readouterr().err
    assert "preprocessor_config.json missing" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()  # refused before any work
    assert curate.main(common + ["--out", str(tmp_path / "b"), "--aesthetic-head", str(tmp_path / "h.pth")]) == 2
    assert "needs --clip" in capsys.readouterr().err
    save_file({k: v.contiguous() for k, v in semantic.AestheticHead(768).state_dict().items()}, tmp_path / "l14.safetensors")
    assert curate.main(common + ["--out", str(tmp_path / "c"), "--clip", str(clip_dir),
                                 "--aesthetic-head", str(tmp_path / "l14.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "does not match the CLIP model: it takes 768-wide embeddings" in err and "gives 16" in err
