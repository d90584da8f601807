"""`python -m data.make_shards`: real clips in, WebDataset tars out; bad files skipped and named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.make_shards import main

from .conftest import BIKES, CARPHONE, copy_clip, tar_members, truncated_copy


@pytest.fixture()
def video_folder(tmp_path) -> Path:
    """Two real captioned clips (one in a subfolder with dots in its name) and three bad files."""
    src = tmp_path / "videos"
    (src / "city.v2").mkdir(parents=True)
    copy_clip(BIKES, src / "bikes.mp4", "cyclists ride past a row of parked cars")
    copy_clip(CARPHONE, src / "city.v2" / "car phone.mp4", "a man talks on a phone in a moving car")
    copy_clip(CARPHONE, src / "uncaptioned.mp4", None)
    truncated_copy(BIKES, src / "truncated.mp4").with_suffix(".txt").write_text("half a file")
    (src / "notes.mp4").write_text("not a video")
    (src / "notes.txt").write_text("a caption for a text file")
    (src / "readme.md").write_text("ignored: not a media file")
    return src


def test_folder_to_shards(video_folder, tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["--input", str(video_folder), "--out", str(out), "--shard-size", "1"]) == 0
    report = capsys.readouterr().out
    assert "wrote 2 samples in 2 shards" in report
    assert "skipped 3 files" in report
    assert "notes.mp4: unreadable" in report
    assert "truncated.mp4: unreadable" in report
    assert "uncaptioned.mp4: no caption: expected a non-empty uncaptioned.txt" in report

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2 and manifest["shards"] == ["000000.tar", "000001.tar"]
    assert {s["file"] for s in manifest["skipped"]} == {"notes.mp4", "truncated.mp4", "uncaptioned.mp4"}

    samples = {}
    for shard in sorted(out.glob("*.tar")):
        samples.update(tar_members(shard))
    assert sorted(samples) == [
        "bikes.json", "bikes.mp4", "bikes.txt",
        "city_v2_car_phone.json", "city_v2_car_phone.mp4", "city_v2_car_phone.txt",
    ]
    assert samples["bikes.mp4"] == BIKES.read_bytes()  # the original bytes, not re-encoded
    assert samples["city_v2_car_phone.txt"].decode() == "a man talks on a phone in a moving car"
    meta = json.loads(samples["bikes.json"])
    assert (meta["fps"], meta["frames"], meta["width"], meta["height"], meta["duration"]) == (25.0, 250, 640, 272, 10.0)
    assert meta["source"] == "bikes.mp4"


def test_same_input_gives_the_same_shards(video_folder, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--input", str(video_folder), "--out", str(a)]) == 0
    assert main(["--input", str(video_folder), "--out", str(b)]) == 0
    assert (a / "000000.tar").read_bytes() == (b / "000000.tar").read_bytes()
    # a later run told to overwrite, with bigger shards, replaces the earlier run's shards rather than mixing
    assert main(["--input", str(video_folder), "--out", str(a), "--shard-size", "1", "--overwrite"]) == 0
    assert main(["--input", str(video_folder), "--out", str(a), "--shard-size", "5", "--overwrite"]) == 0
    assert sorted(p.name for p in a.glob("*.tar")) == ["000000.tar"]


def test_csv_input(tmp_path, capsys):
    (tmp_path / "clips").mkdir()
    copy_clip(BIKES, tmp_path / "clips" / "a.mp4", None)
    copy_clip(CARPHONE, tmp_path / "clips" / "b.avi", None)  # container by content, any extension
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "file,text\n"
        "clips/a.mp4,\"bikes, on a street\"\n"
        "clips/b.avi,a phone call\n"
        "clips/missing.mp4,nothing here\n"
        "clips/a.mp4,\n"
    )
    out = tmp_path / "shards"
    assert main(["--input", str(csv_path), "--out", str(out), "--path-column", "file", "--caption-column", "text"]) == 0
    members = tar_members(out / "000000.tar")
    assert members["clips_a.txt"].decode() == "bikes, on a street"
    assert "clips_b.avi" in members
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert [s["reason"] for s in skipped] == ["file not found", "no caption: empty 'text' column"]
    assert main(["--input", str(csv_path), "--out", str(tmp_path / "other")]) == 2
    assert "has no column 'path'" in capsys.readouterr().err


def test_nothing_usable_exits_non_zero(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "x.mp4").write_text("not a video")
    (src / "x.txt").write_text("caption")
    result = subprocess.run([sys.executable, "-m", "data.make_shards", "--input", str(src), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 1
    assert "x.mp4: unreadable" in result.stdout
    assert "nothing usable was written" in result.stderr
    assert not list((tmp_path / "o").glob("*.tar"))


def test_a_folder_that_holds_anything_is_refused_unless_told_to_overwrite(tmp_path, capsys):
    """make_shards once wrote one shard into a folder of four and deleted three it had not written."""
    videos = tmp_path / "videos"
    videos.mkdir()
    copy_clip(CARPHONE, videos / "a.mp4", "a phone call")
    out = tmp_path / "shards"
    out.mkdir()
    for i in range(4):
        (out / f"{i:06d}.tar").write_bytes(b"someone else's shard")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["--input", str(videos), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} is not empty (5 entries" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, nothing deleted
    assert main(["--input", str(videos), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "manifest.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
