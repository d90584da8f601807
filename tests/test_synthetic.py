"""The synthetic captioned set: the caption grammar, and a stored truth that matches the decoded pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data import make_loader
from data.synthetic import (
    ALL_CAPTIONS,
    BACKGROUND,
    COLORS,
    DEFAULT_HOLDOUT,
    DIRECTIONS,
    SHAPES,
    SyntheticSpec,
    generate,
    main,
    parse_caption,
    render_sample,
)
from data.video_io import read_video

from .conftest import tar_members


def object_mask(frames: np.ndarray, rgb) -> np.ndarray:
    """Pixels close to the object's colour: (T, H, W) bool."""
    return np.abs(frames.astype(int) - np.asarray(rgb)).sum(-1) < 90


def measured_centres(frames: np.ndarray, rgb) -> np.ndarray:
    """Coverage-weighted centroid (x, y) of the object in every frame, in the json's pixel-centre convention.

    Each pixel's coverage is its position on the line from the background colour to the object colour,
    which recovers the anti-aliased edges, so the centroid is sub-pixel accurate.
    """
    bg, fg = np.asarray(BACKGROUND, float), np.asarray(rgb, float)
    alpha = np.clip(((frames - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg)), 0, 1)  # (T, H, W)
    yy, xx = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]] + 0.5
    total = alpha.sum(axis=(1, 2))
    return np.stack([(alpha * xx).sum(axis=(1, 2)) / total, (alpha * yy).sum(axis=(1, 2)) / total], axis=1)


def test_caption_grammar():
    assert len(ALL_CAPTIONS) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) == 60
    assert parse_caption("a red circle moving left") == ("red", "circle", "left")
    assert parse_caption("  A Blue Square moving UP ") == ("blue", "square", "up")
    for bad in ("a red circle moves left", "a purple circle moving left", "a red hexagon moving left", "red circle"):
        assert parse_caption(bad) is None
    assert all(parse_caption(c) for c in DEFAULT_HOLDOUT)


@pytest.mark.parametrize("caption", ["a red circle moving left", "a blue square moving up",
                                     "a yellow triangle moving right", "a white circle moving down"])
def test_rendered_truth_matches_the_pixels(caption):
    spec = SyntheticSpec()
    frames, truth = render_sample(caption, spec, np.random.default_rng(7))
    color, shape, direction = parse_caption(caption)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == np.uint8
    assert (truth["color"], truth["shape"], truth["direction"]) == (color, shape, direction)
    mask = object_mask(frames, COLORS[color])
    centres = np.array(truth["centers"])
    # the object is where the truth says (the triangle's centroid sits below its bounding-box centre)
    offset = np.array([0.0, truth["size"] / 6 if shape == "triangle" else 0.0])
    np.testing.assert_allclose(measured_centres(frames, COLORS[color]), centres + offset, atol=0.15)  # 4x4 supersampling
    # about a quarter of the frame across, and fully inside the frame at all times
    assert 0.22 * 64 <= truth["size"] <= 0.30 * 64
    widths = mask.any(axis=1).sum(-1)
    assert np.all(np.abs(widths - truth["size"]) <= 2)
    assert not mask[:, 0].any() and not mask[:, -1].any() and not mask[:, :, 0].any() and not mask[:, :, -1].any()
    # constant velocity the caption's way, across a good part of the frame
    step = np.diff(centres, axis=0)
    np.testing.assert_allclose(step, np.broadcast_to(step[0], step.shape), atol=2e-3)  # centres stored to 1e-3
    travel = centres[-1] - centres[0]
    assert np.dot(travel, DIRECTIONS[direction]) >= 0.45 * 64 - 1e-6
    dx, dy = DIRECTIONS[direction]
    assert abs(travel[0] * dy - travel[1] * dx) < 1e-6  # no drift across the motion axis
    # the object is well lit against the dark background
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    far = np.hypot(xx - centres[0][0], yy - centres[0][1]) > truth["size"]  # beyond the anti-aliased edge
    assert (frames[0][far] == BACKGROUND).all() and max(BACKGROUND) < 40
    assert np.abs(frames[0][mask[0]].astype(int) - COLORS[color]).max() < 90


def test_distractor_and_ranges():
    spec = SyntheticSpec(distractor=True, speed=(0.2, 0.2), object_size=(0.3, 0.3), size=96, frames=9)
    frames, truth = render_sample("a green square moving down", spec, np.random.default_rng(0))
    assert frames.shape == (9, 96, 96, 3)
    d = truth["distractor"]
    assert d["color"] != "green" and d["shape"] != "square" and d["size"] == pytest.approx(0.6 * truth["size"], abs=1e-3)
    assert object_mask(frames, COLORS[d["color"]]).any(axis=(1, 2)).all()
    travel = np.array(truth["centers"][-1]) - np.array(truth["centers"][0])
    assert travel.tolist() == pytest.approx([0.0, 0.2 * 96], abs=1e-3)
    assert truth["size"] == pytest.approx(0.3 * 96)


def test_generate_writes_shards_with_holdout_and_is_deterministic(tmp_path):
    spec = SyntheticSpec(holdout=DEFAULT_HOLDOUT)
    manifest = generate(tmp_path / "a", 55, spec, seed=3, shard_size=20)
    assert manifest["shards"] == ["000000.tar", "000001.tar", "000002.tar"]
    assert set(manifest["holdout_captions"]) == set(DEFAULT_HOLDOUT)
    assert len(manifest["train_captions"]) == 55
    # one full cycle: every training caption exactly once, no held-out caption at all
    assert manifest["caption_counts"] == {c: 1 for c in manifest["train_captions"]}
    captions = [c for b in make_loader(tmp_path / "a", 11, 17, 64, mode="eval", num_workers=0) for c in b["caption"]]
    assert sorted(captions) == sorted(manifest["train_captions"])
    meta = json.loads(tar_members(tmp_path / "a" / "000000.tar")["synth_000000.json"])
    assert {"fps", "frames", "width", "height", "duration", "centers", "color", "shape", "direction"} <= meta.keys()
    assert (meta["fps"], meta["frames"], meta["width"]) == (8.0, 17, 64)

    # The same seed gives the same samples: names, captions and metadata byte for byte, and the same frames.
    # Not the same mp4 bytes: on a busy machine x264 (this FFmpeg build, even with one thread) now and then
    # codes a frame a little differently, seen as 2 levels in one frame of one clip in 55; so frames are
    # compared after decoding, within a few levels. Another seed gives other samples.
    generate(tmp_path / "b", 55, spec, seed=3, shard_size=20)
    generate(tmp_path / "c", 55, spec, seed=4, shard_size=20)
    a, b, c = (tar_members(tmp_path / run / "000001.tar") for run in "abc")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".mp4"):
            first, second = (read_video(x[name], 17).numpy() for x in (a, b))
            assert np.abs(first - second).max() <= 4 / 127.5, name  # frames in [-1, 1]: 4 levels of 255
        else:
            assert a[name] == b[name], name
    assert [a[k] for k in a if not k.endswith(".mp4")] != [c[k] for k in c if not k.endswith(".mp4")]


def test_command_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--num", "6", "--frames", "9", "--size", "32",
                 "--holdout-default", "--holdout", "a red circle moving left", "--distractor"]) == 0
    assert "wrote 6 clips in 1 shards" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert len(manifest["holdout_captions"]) == 6 and manifest["spec"]["distractor"] is True
    assert main(["--out", str(tmp_path / "t"), "--num", "2", "--holdout", "a red circle moving sideways"]) == 2
    assert "holdout captions must follow" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "t"), "--num", "2", "--frames", "16"]) == 2
    assert "use 13 or 17" in capsys.readouterr().err
