"""make_shards on a folder someone gave you, and on a long job cut short: links out of the folder are refused,
captions are UTF-8 or refused, a file is never read whole, and an interrupted run is finished by running it
again, with the shards an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data.make_shards as make_shards_module
from data.make_shards import main
from data.shards import ShardWriter
from data.tar_reader import PARTIAL_MANIFEST, expand_urls
from errors import InputError

from .conftest import BIKES, CARPHONE, copy_clip, tar_members

REPO = Path(__file__).resolve().parents[1]


def _clip(src: Path, dst: Path, caption: str | None) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    return copy_clip(src, dst, caption)


def _members(out: Path) -> dict[str, bytes]:
    found = {}
    for shard in sorted(out.glob("*.tar")):
        found.update(tar_members(shard))
    return found


def test_links_leaving_the_input_folder_are_refused_and_reported(tmp_path, capsys):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    _clip(CARPHONE, secret / "private.mp4", None)
    src = tmp_path / "given"
    src.mkdir()
    _clip(BIKES, src / "bikes.mp4", None)
    (src / "bikes.txt").symlink_to(secret / "passwd")  # the caption is a link to a file outside
    (src / "private.mp4").symlink_to(secret / "private.mp4")  # the video is a link to a file outside
    (src / "private.txt").write_text("a private clip")
    (src / "outside_folder").symlink_to(secret, target_is_directory=True)
    _clip(CARPHONE, src / "real" / "car.mp4", "a man on a phone")
    (src / "inside.mp4").symlink_to(src / "real" / "car.mp4")  # a link that stays inside is fine
    (src / "inside.txt").write_text("the same clip, by a link inside the folder")
    (src / "dangling.mp4").symlink_to(src / "real" / "gone.mp4")  # inside, to nothing
    (src / "dangling.txt").write_text("a clip that is not there")

    out = tmp_path / "shards"
    assert main(["--input", str(src), "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "wrote 2 samples" in report
    assert f"bikes.mp4: caption bikes.txt is a link to {secret / 'passwd'}, outside --input: refused" in report
    assert f"private.mp4: a link to {secret / 'private.mp4'}, outside --input: refused" in report
    assert f"outside_folder: a link to the folder {secret}: not followed" in report
    assert f"dangling.mp4: a link to {src / 'real' / 'gone.mp4'}, which does not exist" in report
    members = _members(out)
    assert sorted(members) == ["inside.json", "inside.mp4", "inside.txt", "real_car.json", "real_car.mp4", "real_car.txt"]
    assert not any(b"root:x:0:0" in v for v in members.values())
    assert members["inside.mp4"] == CARPHONE.read_bytes()
    skipped = {s["file"] for s in json.loads((out / "manifest.json").read_text())["skipped"]}
    assert skipped == {"bikes.mp4", "private.mp4", "outside_folder", "dangling.mp4"}


def test_a_caption_that_is_not_utf8_is_refused_not_garbled(tmp_path, capsys):
    src = tmp_path / "videos"
    src.mkdir()
    _clip(BIKES, src / "latin1.mp4", None)
    (src / "latin1.txt").write_bytes("un café au coin de la rue".encode("latin-1"))
    _clip(CARPHONE, src / "ok.mp4", "un café au coin de la rue")
    assert main(["--input", str(src), "--out", str(tmp_path / "shards")]) == 0
    report = capsys.readouterr().out
    assert "latin1.mp4: caption latin1.txt is not UTF-8 text (byte 0xe9 at offset 6): save it as UTF-8" in report
    members = _members(tmp_path / "shards")
    assert members["ok.txt"].decode("utf-8") == "un café au coin de la rue"
    assert "latin1.txt" not in members


def test_a_shard_caption_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    from data.loader import make_loader

    with ShardWriter(tmp_path / "s", 4) as w:
        w.write({"__key__": "good", "mp4": BIKES.read_bytes(), "txt": "cyclists"})
        w.write({"__key__": "bad", "mp4": BIKES.read_bytes(), "txt": "caf\xe9".encode("latin-1")})
    loader = make_loader(str(tmp_path / "s"), 1, 5, 32, mode="eval", num_workers=0)
    captions = [c for batch in loader for c in batch["caption"]]
    assert captions == ["cyclists"]
    assert loader.skipped == {"bad_caption": 1}


def test_a_json_member_that_is_not_an_object_is_skipped_with_buckets(tmp_path):
    from data.buckets import parse_buckets
    from data.loader import make_loader

    with ShardWriter(tmp_path / "s", 4) as w:
        w.write({"__key__": "good", "mp4": BIKES.read_bytes(), "txt": "cyclists"})
        w.write({"__key__": "list", "mp4": BIKES.read_bytes(), "txt": "cyclists", "json": "[1, 2, 3]"})
    (tmp_path / "buckets.txt").write_text("5 32 64\n")
    buckets = parse_buckets(str(tmp_path / "buckets.txt"))
    loader = make_loader(str(tmp_path / "s"), 1, 5, 32, mode="eval", num_workers=0, buckets=buckets)
    assert sum(len(b["caption"]) for b in loader) == 1
    assert loader.skipped == {"corrupt": 1}
    assert "KEY.json holds a list, not an object" in loader.skip_log[0].detail


def _peak_rss_mb(src: Path, out: Path) -> float:
    code = ("import resource, sys; from data.make_shards import main; "
            f"assert main(['--input', {str(src)!r}, '--out', {str(out)!r}]) == 0; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def test_a_file_is_streamed_into_its_shard_never_read_whole(tmp_path):
    """A 400 MB file (a real clip, then padding its demuxer ignores) raises peak memory by far less than its
    size: it is probed from disk and copied into the tar in blocks."""
    small, big = tmp_path / "small", tmp_path / "big"
    _clip(BIKES, small / "clip.mp4", "cyclists")
    _clip(BIKES, big / "clip.mp4", "cyclists")
    with open(big / "clip.mp4", "ab") as f:
        for _ in range(100):
            f.write(bytes(4 << 20))
    size_mb = (big / "clip.mp4").stat().st_size / 2**20
    base = _peak_rss_mb(small, tmp_path / "out_small")
    peak = _peak_rss_mb(big, tmp_path / "out_big")
    assert peak - base < 100, f"peak RSS {peak:.0f} MB for a {size_mb:.0f} MB file, {base:.0f} MB for a small one"
    assert (tmp_path / "out_big" / "000000.tar").stat().st_size > size_mb * 2**20


@pytest.fixture()
def five_clips(tmp_path) -> Path:
    src = tmp_path / "videos"
    for i in range(5):
        _clip(BIKES if i % 2 else CARPHONE, src / f"clip{i}.mp4", f"clip number {i}")
    (src / "clip2.txt").unlink()  # a skipped file in the middle, recorded across the interruption
    return src


def test_an_interrupted_run_is_named_incomplete_and_finished_by_running_it_again(five_clips, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(["--input", str(five_clips), "--out", str(whole), "--shard-size", "1"]) == 0

    probe, calls = make_shards_module.probe, []

    def interrupted_probe(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return probe(path)

    out = tmp_path / "cut"
    monkeypatch.setattr(make_shards_module, "probe", interrupted_probe)
    assert main(["--input", str(five_clips), "--out", str(out), "--shard-size", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted: the shards finished so far are kept in {out}; the same command again goes on from them"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(InputError, match="incomplete: make_shards was interrupted"):
        expand_urls(str(out))
    with pytest.raises(InputError, match="incomplete"):
        expand_urls(str(out / "*.tar"))

    monkeypatch.setattr(make_shards_module, "probe", probe)
    other = tmp_path / "other"
    _clip(BIKES, other / "x.mp4", "x")
    assert main(["--input", str(other), "--out", str(out)]) == 2  # another input: refused, the work kept
    assert "interrupted make_shards of other input" in capsys.readouterr().err

    assert main(["--input", str(five_clips), "--out", str(out), "--shard-size", "1"]) == 0
    assert "going on after 2 finished shards (2 samples)" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert expand_urls(str(out))


def test_make_shards_ctrl_c_in_a_real_process_says_one_line(five_clips, tmp_path):
    """SIGINT while it writes: one line, exit 130, and the second run finishes."""
    import signal
    import time

    for i in range(5, 40):  # enough work that the signal lands while it runs
        _clip(BIKES, five_clips / f"clip{i}.mp4", f"clip number {i}")
    out = tmp_path / "shards"
    cmd = [sys.executable, "-m", "data.make_shards", "--input", str(five_clips), "--out", str(out), "--shard-size", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not (out / PARTIAL_MANIFEST).exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted: the shards finished so far are kept in {out}; the same command again goes on from them"]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert (out / "manifest.json").is_file() and not (out / PARTIAL_MANIFEST).exists()


def test_a_caption_longer_than_the_builtin_encoder_reads_is_reported_once(caplog):
    from dit3d.text import ByteTextEncoder

    encoder = ByteTextEncoder()
    with caplog.at_level("WARNING"):
        ids, _ = encoder.tokenize(["short", "x" * 300, "y" * 200])
    assert ids.shape == (3, 96)
    cut = [r.getMessage() for r in caplog.records if "is cut" in r.getMessage()]
    assert len(cut) == 1 and "a caption of 300 bytes is cut to the 96 the built-in text-bytes encoder reads" in cut[0]
    assert encoder.cut_captions == 2


def test_check_shards_shows_a_long_caption_cut_with_its_length(tmp_path, capsys):
    from data.check_shards import main as check

    with ShardWriter(tmp_path / "s", 4) as w:
        w.write({"__key__": "long", "mp4": BIKES.read_bytes(), "txt": "word " * 80_000})
    assert check([str(tmp_path / "s"), "--frames", "5", "--size", "32", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "... (399,999 characters)" in out and len(out) < 2000
