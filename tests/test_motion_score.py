"""The motion benchmark's scorer: the synthetic generator's own videos are the ceiling, noise and a static
object score badly, and hand-made videos get the answers they were made to have."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.motion_score import main, object_centres, score_dir, score_frames
from data.synthetic import BACKGROUND, COLORS, DEFAULT_HOLDOUT, SyntheticSpec, render_object_track, render_sample
from data.video_write import write_video


def synthetic(caption: str, seed: int = 0) -> np.ndarray:
    frames, _ = render_sample(caption, SyntheticSpec(), np.random.default_rng(seed))
    return frames


def blank(t: int = 17, size: int = 64) -> np.ndarray:
    return np.broadcast_to(np.array(BACKGROUND, dtype=np.float32), (t, size, size, 3)).copy()  # render_object_track paints floats


def test_the_generators_own_videos_score_perfectly():
    for i, caption in enumerate(["a red circle moving right", "a green square moving up", "a blue triangle moving left",
                                 "a yellow circle moving down", "a white triangle moving right"]):
        s = score_frames(synthetic(caption, i), caption)
        assert (s.presence, s.color, s.shape, s.direction) == (1.0, 1.0, 1.0, 1.0), (caption, s)
        assert s.linearity > 0.99 and s.identity == 1.0 and s.area_cv < 0.1 and s.flicker < 1.0


def test_noise_and_a_static_object_score_badly():
    rng = np.random.default_rng(0)
    noise = score_frames(rng.integers(0, 256, (17, 64, 64, 3), dtype=np.uint8), "a red circle moving right")
    assert noise.presence < 0.2 and noise.flicker > 50
    static = blank()
    render_object_track(static, "circle", COLORS["red"], np.tile([[32.0, 32.0]], (17, 1)), 16.0)
    s = score_frames(static, "a red circle moving right")
    assert s.presence == 1.0 and s.color == 1.0 and s.shape == 1.0  # a red circle is there ...
    assert s.direction == 0.0 and s.linearity == 0.0  # ... but it does not move


def test_hand_made_videos_get_their_known_answers():
    # a green square that moves left, jumps back and forth (poor linearity) and is drawn white half the time
    frames = blank()
    xs = np.array([50, 44, 38, 46, 30, 40, 26, 36, 22, 30, 20, 26, 18, 22, 16, 18, 14], dtype=float)
    centres = np.stack([xs, np.full(17, 32.0)], axis=1)
    for i in range(17):
        render_object_track(frames[i : i + 1], "square", COLORS["green" if i < 9 else "white"], centres[i : i + 1], 14.0)
    s = score_frames(frames, "a green square moving left")
    assert s.presence == 1.0 and s.shape == 1.0 and s.direction == 1.0
    assert s.color == 1.0  # 9 of 17 frames green: the majority
    assert 0.5 < s.linearity < 0.9
    assert s.color_spread > 50 and s.identity == 9 / 17  # green square in 9 frames, white square in 8
    found = object_centres(frames.round().astype(np.uint8))
    np.testing.assert_allclose([c[0] for c in found], xs, atol=0.5)
    wrong_way = score_frames(frames, "a green square moving right")
    assert wrong_way.direction == 0.0 and score_frames(frames, "a green circle moving left").shape == 0.0
    # two objects: presence counts frames with exactly one
    two = synthetic("a red circle moving right").astype(np.float32)
    render_object_track(two[:8], "square", COLORS["blue"], np.tile([[52.0, 52.0]], (8, 1)), 10.0)  # away from the circle
    assert score_frames(two, "a red circle moving right").presence == pytest.approx(9 / 17)
    with pytest.raises(ValueError, match="is not 'a {color} {shape} moving {direction}'"):
        score_frames(frames, "a dog running")


@pytest.mark.parametrize("color", list(COLORS))
def test_colour_survives_dimming_and_blur_but_not_a_change_of_hue(color):
    """A small tokenizer's reconstruction blurs a thin shape into the dark background and dims it: the hue is
    still the caption's (by RGB distance a dimmed yellow was green and a grey-white yellow)."""
    background = np.array(BACKGROUND, dtype=np.float32)
    dimmed = background + 0.55 * (np.array(COLORS[color], dtype=np.float32) - background)
    centres = np.stack([np.linspace(16, 44, 17), np.full(17, 32.0)], axis=1)
    frames = blank()
    render_object_track(frames, "triangle", dimmed, centres, 18.0)
    padded = np.pad(frames, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[:, i : i + 64, j : j + 64] for i in range(3) for j in range(3)) / 9  # 3x3 box blur
    caption = f"a {color} triangle moving right"
    assert score_frames(blurred, caption).color == 1.0
    other = {"red": "green", "green": "blue", "blue": "red", "yellow": "blue", "white": "red"}[color]
    assert score_frames(blurred, f"a {other} triangle moving right").color == 0.0


def test_command_scores_a_folder_split_by_seen_and_held_out(tmp_path, capsys):
    captions = [DEFAULT_HOLDOUT[0], "a red circle moving right", "a green square moving up"]
    for i, c in enumerate(captions):
        write_video(tmp_path / f"v{i}.mp4", synthetic(c, i), fps=8)
        (tmp_path / f"v{i}.txt").write_text(c + "\n")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"holdout_captions": list(DEFAULT_HOLDOUT),
                                    "train_captions": captions[1:]}))
    assert main([str(tmp_path), "--manifest", str(manifest), "--json", str(tmp_path / "s.json"), "--per-video"]) == 0
    table = capsys.readouterr().out
    assert "| held_out |" in table and "| seen " in table and "| v2 " in table
    summary = json.loads((tmp_path / "s.json").read_text())["summary"]
    assert summary["held_out"]["videos"] == 1 and summary["seen"]["videos"] == 2
    assert summary["all"]["direction"] == 1.0 and summary["all"]["color"] == 1.0
    _, s2 = score_dir(tmp_path)
    assert set(s2) == {"all"}
    assert main([str(tmp_path / "nothing")]) == 2


def test_an_object_at_the_frame_edge_does_not_reach_the_opposite_edge():
    """The object's mask is grown by one pixel to take in its anti-aliased edge; at the frame's border nothing
    is beyond, so the mask must not wrap around to the other side (where it would hide flicker there)."""
    from evaluation.motion_score import detect

    frame = np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), (64, 64, 3)).copy()
    frame[20:30, 0:10] = COLORS["red"]  # touches the left edge
    d = detect(frame)
    assert d.present and d.mask[:, :11].any()
    assert not d.mask[:, -1].any() and not d.mask[:, 12:].any()
    frame[0:6, 40:46] = COLORS["blue"]  # a second object touching the top edge
    d2 = detect(frame)
    assert not d2.mask[-1].any()
