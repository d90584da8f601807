"""Evaluating the generator: FVD against a reference, CLIPSIM from a local CLIP, the chain-of-steps study."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train
from data import frames_to_tensor, write_video
from data.synthetic import SyntheticSpec, render_sample
from evaluation import chain_of_steps
from evaluation.generator import main as evaluate_main
from tests.conftest import write_tiny_clip, write_tiny_dit_inputs

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.jit")

CAPTIONS = ["a red circle moving right", "a blue square moving left", "a green triangle moving up",
            "a yellow circle moving down", "a white square moving right", "a red triangle moving left"]


def synthetic_clips(n: int, size: int = 32, frames: int = 9, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    spec = SyntheticSpec(frames=frames, size=size)
    rng = np.random.default_rng(seed)
    return [(CAPTIONS[i % len(CAPTIONS)], render_sample(CAPTIONS[i % len(CAPTIONS)], spec, rng)[0]) for i in range(n)]


def write_set(folder, clips, transform=None, captions: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (caption, frames) in enumerate(clips):
        video = frames_to_tensor(frames)
        if transform is not None:
            video = transform(i, video)
        write_video(folder / f"v{i:02d}.mp4", video.clamp(-1, 1), fps=8.0)
        if captions:
            (folder / f"v{i:02d}.txt").write_text(caption + "\n")
    return folder


def report_of(out):
    return json.loads((out / "report.json").read_text())


def test_fvd_of_a_set_against_itself_is_zero_and_grows_when_corrupted(tmp_path, i3d_path):
    clips = synthetic_clips(12)
    clean = write_set(tmp_path / "clean", clips)
    g = torch.Generator().manual_seed(0)
    noisy = write_set(tmp_path / "noisy", clips, lambda i, v: v + 0.3 * torch.randn(v.shape, generator=g))
    order = torch.randperm(9, generator=g)
    shuffled = write_set(tmp_path / "shuffled", clips, lambda i, v: v[:, order])
    fvd = {}
    for name, folder in (("clean", clean), ("noisy", noisy), ("shuffled", shuffled)):
        out = tmp_path / f"report_{name}"
        assert evaluate_main(["--videos", str(folder), "--reference", str(clean), "--i3d", str(i3d_path),
                              "--out", str(out), "--resamples", "50"]) == 0
        r = report_of(out)
        fvd[name] = r["fvd"]
        assert r["fvd"]["generated_clips"] == r["fvd"]["reference_clips"] == 12
        assert r["shape"] == {"frames": 9, "height": 32, "width": 32, "fps": 8.0}
        low, high = r["fvd"]["interval_90"]
        assert 0 <= low <= high
        assert r["motion"]["all"]["videos"] == 12
        assert (out / "contact_sheet.png").is_file() and "color" in r["contact_sheet"]
        assert "FVD" in (out / "report.md").read_text()
    assert abs(fvd["clean"]["value"]) < 1e-6
    assert fvd["noisy"]["value"] > 1e3 * max(abs(fvd["clean"]["value"]), 1e-9)
    assert fvd["shuffled"]["value"] > 1e3 * max(abs(fvd["clean"]["value"]), 1e-9)
    assert fvd["noisy"]["interval_90"][1] > 0
    # the generator's own clips score (nearly) perfectly; noise breaks them
    clean_motion = report_of(tmp_path / "report_clean")["motion"]["all"]
    assert clean_motion["color"] == clean_motion["direction"] == 1.0


def test_the_command_fails_in_one_line_on_bad_input(tmp_path, i3d_path, capsys):
    clips = synthetic_clips(4)
    uncaptioned = write_set(tmp_path / "uncaptioned", clips, captions=False)
    assert evaluate_main(["--videos", str(uncaptioned), "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no caption" in err and "v00.txt" in err
    # a reference of another shape: 5-frame clips cannot give the generated 9-frame windows
    generated = write_set(tmp_path / "generated", clips)
    short = write_set(tmp_path / "short", synthetic_clips(4, frames=5))
    assert evaluate_main(["--videos", str(generated), "--reference", str(short), "--i3d", str(i3d_path),
                          "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9 frames" in err and "shorter" in err
    # generated videos of two shapes
    write_set(tmp_path / "mixed", synthetic_clips(2, size=48))
    for p in (tmp_path / "mixed").iterdir():
        p.rename(tmp_path / "generated" / f"big_{p.name}")
    assert evaluate_main(["--videos", str(generated), "--out", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 shapes" in err


def test_reference_shards_are_read_at_the_generated_shape(tmp_path, i3d_path, synthetic_shards):
    # the shards hold 64x64 clips of 17 frames; the generated ones are 9 frames at 32x32
    generated = write_set(tmp_path / "generated", synthetic_clips(6))
    out = tmp_path / "report"
    assert evaluate_main(["--videos", str(generated), "--reference", str(synthetic_shards), "--i3d", str(i3d_path),
                          "--out", str(out), "--resamples", "20"]) == 0
    r = report_of(out)
    assert r["fvd"]["reference_clips"] >= 2 and r["fvd"]["value"] > 0


# ---- CLIPSIM --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), CAPTIONS)


def test_clipsim_equals_transformers_clip(tiny_clip):
    import transformers

    from evaluation.clip_score import ClipScore

    clip = ClipScore.from_local(tiny_clip, frames=4)
    caption, frames = synthetic_clips(1)[0]
    video = frames_to_tensor(frames)
    ours = clip.video(video, caption)
    model = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    chosen = clip.frames_of(video)
    assert chosen.shape[0] == 4
    inputs = transformers.AutoTokenizer.from_pretrained(tiny_clip)([caption], return_tensors="pt")
    pixels = transformers.CLIPImageProcessor.from_pretrained(tiny_clip)(images=list(chosen), return_tensors="pt").pixel_values
    with torch.no_grad():
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=pixels).logits_per_image
        expected = float(100 * (logits[:, 0] / model.logit_scale.exp()).mean())
    assert ours == pytest.approx(expected, abs=1e-4)
    # a caption that does not match moves the figure
    assert clip.video(video, "a blue square moving left") != pytest.approx(ours, abs=1e-6)


def test_the_report_has_clipsim_for_every_video(tmp_path, tiny_clip, capsys):
    generated = write_set(tmp_path / "generated", synthetic_clips(3))
    out = tmp_path / "report"
    assert evaluate_main(["--videos", str(generated), "--clip", str(tiny_clip), "--out", str(out)]) == 0
    r = report_of(out)
    assert all(np.isfinite(v["clipsim"]) for v in r["videos"]) and r["clipsim"]["videos"] == 3
    assert "clipsim" in r["contact_sheet"] and "CLIPSIM" in capsys.readouterr().out
    assert evaluate_main(["--videos", str(generated), "--clip", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


# ---- the chain-of-steps study ---------------------------------------------------------------------------


def test_a_trajectory_of_ground_truth_clips_is_perfect_at_every_step():
    clips = synthetic_clips(4, size=48)
    videos = torch.stack([frames_to_tensor(f) for _, f in clips])
    captions = [c for c, _ in clips]
    steps = 5
    per_step = [chain_of_steps.step_scores(videos, captions, [str(i) for i in range(4)], ["seen"] * 4) for _ in range(steps)]
    records = [{"name": str(j), "caption": captions[j], "seed": 0, "group": "seen", "steps": [s[j] for s in per_step]}
               for j in range(4)]
    study = chain_of_steps.study_summary(records, [1 - i / steps for i in range(steps)], 48)
    for a in chain_of_steps.ATTRIBUTES:
        s = study["groups"]["all"][a]
        assert s["accuracy"] == [1.0] * steps, a
        assert s["decided_step_mean"] == 0 and s["loss"] == 0 and s["ever_wrong"] == 0
    assert "seen" in study["groups"] and "held_out" not in study["groups"]


def test_corrections_and_losses_are_counted():
    clips = synthetic_clips(2, size=48)
    right = frames_to_tensor(clips[0][1])
    wrong_colour = frames_to_tensor(render_sample("a blue circle moving right", SyntheticSpec(frames=9, size=48),
                                                  np.random.default_rng(1))[0])
    caption = clips[0][0]  # a red circle moving right

    def record(sequence):
        scores = [chain_of_steps.step_scores(v[None], [caption], ["x"], ["held_out"])[0] for v in sequence]
        return {"name": "x", "caption": caption, "seed": 0, "group": "held_out", "steps": scores}

    corrected = record([torch.zeros_like(right), wrong_colour, right, right])  # nothing, wrong, then right
    lost = record([right, right, wrong_colour, wrong_colour])
    s = chain_of_steps.study_summary([corrected, lost], [1.0, 0.75, 0.5, 0.25], 48)["groups"]["held_out"]["color"]
    assert s["accuracy"] == [0.5, 0.5, 0.5, 0.5]
    assert (s["corrected"], s["ever_wrong"], s["lost"], s["ever_right"]) == (1, 2, 1, 2)
    assert s["self_correction"] == 0.5 and s["loss"] == 0.5
    assert s["decided_step_mean"] == 2.0  # both settle at step 2


def test_trajectory_study_from_a_run(tmp_path):
    root = tmp_path
    write_tiny_dit_inputs(root, clips=8, size=32)
    assert train.main(["--stage", "dit", "--data", str(root / "shards"), "--vae", str(root / "vae"),
                       "--out", str(root / "dit"), "--frames", "9",
                       "--size", "32", "--steps", "2", "--batch-size", "2", "--num-workers", "0",
                       "--checkpoint-every", "0", "--wandb", "disabled", "--no-progress", "--preview-steps", "2",
                       "--warmup", "1"]) == 0
    captions = root / "captions.txt"
    captions.write_text("a red circle moving right\na blue square moving up\n")
    out = root / "eval"
    assert evaluate_main(["--run", str(root / "dit"), "--captions", str(captions), "--k", "2", "--steps", "3",
                          "--trajectory", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == [
        "a_blue_square_moving_up_0.mp4", "a_blue_square_moving_up_1.mp4",
        "a_red_circle_moving_right_0.mp4", "a_red_circle_moving_right_1.mp4"]
    study = json.loads((out / "trajectory.json").read_text())
    assert study["seeds"] == [0, 1] and len(study["t"]) == 3 and study["groups"]["all"]["videos"] == 4
    assert all(len(v["steps"]) == 3 for v in study["videos"])
    # the last step's clean-video prediction is the sampled video: its scores are the report's
    report = report_of(out)
    final = {v["name"]: v["steps"][-1] for v in study["videos"]}
    for row in report["videos"]:
        assert final[row["name"]]["presence"] == pytest.approx(row["presence"], abs=0.15)
    assert (out / "trajectory.png").stat().st_size > 0 and "Chain of steps" in (out / "trajectory.md").read_text()
