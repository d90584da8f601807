"""A shard's keys and captions never name a file outside --out: training previews and latent shards make them
safe, and a key that is a path is stored, not followed (issue 50's traversal findings, as a user met them)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.conftest import tar_members

import train
from data.shards import sanitize_key
from data.synthetic import SyntheticSpec, generate
from tokenizer.encode import main as encode_main

FAST = ["--frames", "5", "--size", "32", "--wandb", "disabled", "--no-progress", "--warmup", "1", "--steps", "1",
        "--batch-size", "4", "--num-workers", "0", "--preview-steps", "1"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    """(a shard folder, the folder the hostile names point at) : keys `../../evil` and an absolute path, and a
    caption that climbs out of any folder into the target."""
    root = tmp_path_factory.mktemp("hostile")
    clean = root / "clean"
    generate(clean, 4, SyntheticSpec(frames=9, size=32), seed=0, shard_size=4)
    videos = [data for name, data in sorted(tar_members(next(clean.glob("*.tar"))).items()) if name.endswith(".mp4")]
    target = root / "target"
    climb = "../" * 16 + str(target / "from_a_caption").lstrip("/")
    samples = [("../../evil", "a red circle moving left"), (str(target / "absolute_key"), "a blue square moving up"),
               ("pl/ain", climb), ("pl_ain", "a green triangle moving right")]
    shards = root / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for (key, caption), video in zip(samples, videos):
            for ext, payload in (("mp4", video), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return shards, target, climb


def test_previews_named_from_hostile_keys_and_captions_stay_in_the_run_folder(hostile, tmp_path):
    shards, target, climb = hostile
    before = files_under(tmp_path.parent) | files_under(shards.parent)
    vae, dit = tmp_path / "vae", tmp_path / "dit"
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(vae), "--pca-init-clips", "0",
                       "--stats-batches", "1", *FAST]) == 0
    assert train.main(["--stage", "dit", "--data", str(shards), "--vae", str(vae), "--out", str(dit), *FAST,
                       "--preview-prompts", climb, "../../a red circle"]) == 0
    assert not target.exists()
    outside = (files_under(tmp_path.parent) | files_under(shards.parent)) - before - files_under(tmp_path)
    assert not outside, sorted(outside)
    for run, expected in ((vae, 4), (dit, 2)):
        previews = [p for p in files_under(run) if p.suffix in (".mp4", ".txt") and "previews" in p.parts]
        assert all(p.parent.parent == run / "previews" for p in previews), previews
        assert len([p for p in previews if p.suffix == ".mp4"]) == expected
    captions = {p.read_text().strip() for p in (dit / "previews").rglob("*.txt")}
    assert captions == {climb, "../../a red circle"}  # the caption itself is kept, only the file name is made safe


def test_encode_stores_a_hostile_key_made_safe_and_counts_clashes(hostile, tmp_path, capsys):
    shards, target, _ = hostile
    vae = tmp_path / "vae"
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(vae), "--pca-init-clips", "0",
                       "--stats-batches", "1", *FAST]) == 0
    out = tmp_path / "latents"
    assert encode_main(["--ckpt", str(vae), "--data", str(shards), "--out", str(out), "--frames", "5", "--size", "32",
                        "--workers", "0"]) == 0
    printed, err = capsys.readouterr()
    assert "Traceback" not in err
    names = set(tar_members(next(out.glob("*.tar"))))
    keys = {n.split(".")[0] for n in names}
    assert keys == {"______evil", sanitize_key(str(target / "absolute_key")), "pl_ain"}, names
    assert not target.exists() and len(names) == 9
    assert "skipped 1 samples:" in printed and "duplicate_key: stored as pl_ain" in printed
