"""Non-square sizes wherever a size is taken: `--size HEIGHT WIDTH` in data.check_shards, tokenizer.encode,
tokenizer.evaluate and train.py (both stages), and the size a DiT was trained at is sample.py's default."""

from __future__ import annotations

import json

import pytest
import torch

import train
from data import check_shards
from errors import InputError
from data.video_io import size_pair
from pipeline import Pipeline
from tokenizer import CausalVAE, save_vae
from tokenizer import encode as encode_cmd
from tokenizer import evaluate as evaluate_cmd
from tests.test_train import one_line_error

FAST = ["--frames", "5", "--wandb", "disabled", "--no-progress", "--warmup", "1", "--log-every", "1", "--num-workers", "0",
        "--batch-size", "2", "--steps", "2", "--preview-steps", "2", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("vae")
    save_vae(CausalVAE.from_preset("tiny"), out)
    return out


def test_size_pair():
    assert size_pair([64]) == (64, 64) and size_pair([48, 80]) == (48, 80) and size_pair(32) == (32, 32)
    for bad in ([], [1, 2, 3], [0, 8]):
        with pytest.raises(InputError, match="one side .* or two, HEIGHT WIDTH"):
            size_pair(bad)


def test_every_command_takes_height_and_width(synthetic_shards, vae_dir, tmp_path, capsys):
    assert check_shards.main([str(synthetic_shards), "--frames", "5", "--size", "32", "48", "--workers", "0"]) == 0
    assert "sample shape (3, 5, 32, 48)" in capsys.readouterr().out

    latents = tmp_path / "latents"
    assert encode_cmd.main(["--ckpt", str(vae_dir), "--data", str(synthetic_shards), "--out", str(latents), "--frames",
                            "5", "--size", "32", "48", "--workers", "0", "--device", "cpu"]) == 0
    from data import make_loader

    batch = next(iter(make_loader(latents, 2, None, None, mode="eval", num_workers=0)))
    assert tuple(batch["latents"].shape[1:]) == (16, 2, 4, 6)
    assert (batch["meta"][0]["height"], batch["meta"][0]["width"]) == (32, 48)

    report_dir = tmp_path / "eval"
    assert evaluate_cmd.main(["--ckpt", str(vae_dir), "--data", str(synthetic_shards), "--out", str(report_dir),
                              "--frames", "5", "--size", "32", "48", "--windows", "1", "--no-videos", "--device",
                              "cpu"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["settings"]["size"] == [32, 48] and {tuple(s) for s in report["settings"]["sizes"].values()} == {(32, 48)}
    assert evaluate_cmd.main(["--ckpt", str(vae_dir), "--data", str(synthetic_shards), "--out", str(report_dir),
                              "--size", "32", "48", "--aspect", "native"]) == 2
    assert one_line_error(capsys, "--aspect native sizes each video by its short side")

    # the DiT on the 32x48 latents; its previews and sample.py's default are 32x48
    run = tmp_path / "dit"
    assert train.main(["--stage", "dit", "--data", str(latents), "--latents", "--vae", str(vae_dir), "--out", str(run),
                       "--size", "32", "48", *FAST]) == 0
    pipe = Pipeline.load(run)
    assert pipe.size == (32, 48)
    previews = sorted((run / "previews").rglob("*.mp4"))
    from data import probe

    assert previews and (probe(previews[0]).height, probe(previews[0]).width) == (32, 48)
    # the tokenizer stage checks and crops the same pair (make_loader takes it); three numbers are refused
    assert train.main(["--stage", "tokenizer", "--data", str(synthetic_shards), "--out", str(tmp_path / "bad"),
                       "--size", "32", "48", "64", *FAST]) == 2
    assert one_line_error(capsys, "--size takes one side")
