"""python -m tokenizer.evaluate and python -m tokenizer.encode with a tiny random tokenizer."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch

from data import make_loader, probe, read_clip
from data.make_shards import main as make_shards_main
from tokenizer import CausalVAE, load_vae, save_vae
from tokenizer.encode import main as encode_main
from tokenizer.evaluate import main as evaluate_main
from data.sources import window_starts
from evaluation.metrics import psnr, ssim, to_unit_range

from .conftest import BIKES, CARPHONE, copy_clip, write_reference_lpips_weights
from .test_tokenizer import randomized


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vae")
    torch.manual_seed(0)
    vae = randomized(CausalVAE.from_preset("tiny"), seed=1)
    vae.set_latent_stats(torch.zeros(16), torch.full((16,), 2.0))
    save_vae(vae, path)
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    copy_clip(BIKES, folder / "bikes.mp4", "cyclists")
    copy_clip(CARPHONE, folder / "carphone.mp4", "a phone call")
    (folder / "broken.mp4").write_text("not a video")
    return folder


def test_window_starts_are_evenly_spaced():
    info = probe(BIKES)  # 250 frames
    assert window_starts(info, 17, None, 4) == [0, 78, 155, 233]
    assert window_starts(info, 17, 12.5, 3) == [0, 108, 217]  # stride 2: the last start is 249 - 32
    assert window_starts(info, 17, None, 1) == [116]


def test_evaluate_reports_metrics_that_match_a_direct_computation(ckpt, clip_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(clip_folder), "--frames", "5", "--size", "32",
                          "--windows", "2", "--chunk", "1", "--out", str(out)]) == 0
    full = json.loads((out / "report.json").read_text())
    assert full["skipped"][0]["video"] == "broken.mp4" and full["settings"]["latent_shape"] == [16, 2, 4, 4]
    (report,) = full["tokenizers"].values()
    assert [v["video"] for v in report["videos"]] == ["bikes.mp4", "carphone.mp4"]
    assert report["videos"][0]["frames"] == 10
    assert report["encode_frames_per_s"] > 0 and report["decode_frames_per_s"] > 0
    assert report["chunked_max_abs_difference"] < 1e-5  # ours: chunked equals whole
    assert "| carphone.mp4 |" in (out / "report.md").read_text() and "Conventions" in capsys.readouterr().out

    # the same numbers computed here, independently of the command's accumulation
    vae = load_vae(ckpt).eval()
    windows = [read_clip(CARPHONE, 5, size=32, start=s).to_tensor() for s in (0, 115)]
    x = torch.stack(windows)  # (2, 3, 5, 32, 32)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    a, b = to_unit_range(x), to_unit_range(y)
    whole = psnr(a.transpose(0, 1).reshape(1, 3, -1, 32, 32), b.transpose(0, 1).reshape(1, 3, -1, 32, 32))
    assert report["videos"][1]["psnr"] == pytest.approx(whole.item(), abs=1e-4)
    assert report["videos"][1]["ssim"] == pytest.approx(ssim(a, b).mean().item(), abs=1e-5)
    assert report["mean"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in report["videos"]]))

    with av.open(str(out / "videos" / "carphone.mp4")) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 96, 3)  # original | reconstruction | error


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")
def test_evaluate_reports_lpips_from_local_weights(ckpt, tmp_path):
    torch.manual_seed(0)
    _, vgg_path, heads = write_reference_lpips_weights(tmp_path)
    (tmp_path / "v").mkdir()
    copy_clip(CARPHONE, tmp_path / "v" / "carphone.mp4", None)
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(tmp_path / "v"), "--frames", "5", "--size", "32",
                          "--windows", "1", "--no-videos", "--out", str(tmp_path / "e"),
                          "--lpips-vgg", str(vgg_path), "--lpips-heads", str(heads)]) == 0
    (report,) = json.loads((tmp_path / "e" / "report.json").read_text())["tokenizers"].values()
    assert report["videos"][0]["lpips"] > 0 and report["videos"][0]["baseline_lpips"] > 0
    assert "| LPIPS |" in (tmp_path / "e" / "report.md").read_text()
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(tmp_path / "v"), "--out", str(tmp_path / "f"),
                          "--lpips-vgg", str(vgg_path)]) == 2


def test_evaluate_reads_shards_and_rejects_bad_input(ckpt, clip_folder, tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    copy_clip(CARPHONE, tmp_path / "videos" / "carphone.mp4", "a phone call")
    assert make_shards_main(["--input", str(tmp_path / "videos"), "--out", str(tmp_path / "shards")]) == 0
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(tmp_path / "shards"), "--frames", "5", "--size", "32",
                          "--windows", "1", "--no-videos", "--out", str(tmp_path / "e")]) == 0
    (report,) = json.loads((tmp_path / "e" / "report.json").read_text())["tokenizers"].values()
    assert report["videos"][0]["video"] == "carphone"
    assert not (tmp_path / "e" / "videos").exists()
    capsys.readouterr()
    assert evaluate_main(["--ckpt", str(tmp_path / "nope"), "--data", str(clip_folder), "--out", str(tmp_path / "x")]) == 2
    assert "no tokenizer checkpoint" in capsys.readouterr().err
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(clip_folder), "--frames", "16", "--out", str(tmp_path / "x")]) == 2
    assert "use 13 or 17" in capsys.readouterr().err
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(clip_folder), "--size", "36", "--out", str(tmp_path / "x")]) == 2
    assert "use 32 or 40" in capsys.readouterr().err


def test_encode_writes_latent_shards_the_loader_reads(ckpt, synthetic_shards, tmp_path, capsys):
    out = tmp_path / "latents"
    assert encode_main(["--ckpt", str(ckpt), "--data", str(synthetic_shards), "--out", str(out), "--frames", "9",
                        "--size", "32", "--batch-size", "5", "--shard-size", "10", "--workers", "0"]) == 0
    assert "wrote 24 latent samples in 3 shards" in capsys.readouterr().out
    batches = list(make_loader(out, 4, 9, 32, mode="eval", num_workers=0))
    assert batches[0]["latents"].shape == (4, 16, 3, 4, 4)
    assert batches[0]["meta"][0]["latent_std"] == [2.0] * 16 and batches[0]["meta"][0]["tokenizer"] == str(ckpt)
    # the stored latents are the tokenizer's posterior mean for the same clip (to float16 precision)
    video = next(iter(make_loader(synthetic_shards, 1, 9, 32, mode="eval", num_workers=0)))
    vae = load_vae(ckpt).eval()
    with torch.no_grad():
        expected = vae.encode(video["video"]).mean[0]
    assert batches[0]["key"][0] == video["key"][0]
    torch.testing.assert_close(batches[0]["latents"][0], expected, rtol=2e-3, atol=2e-3)


def test_evaluate_takes_windows_from_the_frames_that_decode(ckpt, tmp_path):
    """Files whose headers lie: one claims 40 frames and holds 24, one holds 40 whose last ones do not decode. The
    evaluation crashed on the second (its last window reached a broken frame) and rejected the first whole."""
    from .conftest import write_faststart_mp4

    data = write_faststart_mp4(tmp_path / "whole.mp4", 40).read_bytes()
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "short.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (folder / "broken_end.mp4").write_bytes(data[: int(len(data) * 0.99)])
    assert evaluate_main(["--ckpt", str(ckpt), "--data", str(folder), "--frames", "17", "--size", "32", "--windows", "3",
                          "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    (one,) = report["tokenizers"].values()
    assert sorted(r["video"] for r in one["videos"]) == ["broken_end.mp4", "short.mp4"] and not report["skipped"]
    short = {s["video"]: s for s in report["shortfalls"]}
    assert short["short.mp4"]["declared"] == 40 and short["short.mp4"]["decoded"] < 30
    assert short["broken_end.mp4"]["declared"] == 40 and short["broken_end.mp4"]["decoded"] < 40
    assert "claims 40 frames and decodes" in (tmp_path / "eval" / "report.md").read_text()


def test_a_window_read_a_chunk_at_a_time_scores_as_the_whole_window(ckpt, tmp_path, monkeypatch):
    """Our tokenizer reads, encodes, decodes and scores a window a chunk at a time from the file (memory flat in
    the window's length: bench/tokenizer_memory.py); every number and the side-by-side video are the whole
    window's."""
    import tokenizer.evaluate as ev

    folder = tmp_path / "clips"
    folder.mkdir()
    copy_clip(BIKES, folder / "bikes.mp4", "cyclists")
    args = ["--ckpt", str(ckpt), "--data", str(folder), "--frames", "41", "--size", "32", "--windows", "2",
            "--chunk", "2"]
    assert ev.main(args + ["--out", str(tmp_path / "stream")]) == 0
    monkeypatch.setattr(ev, "streams", lambda *a: False)  # the window held whole, as every window once was
    assert ev.main(args + ["--out", str(tmp_path / "whole")]) == 0
    (stream,), (whole,) = (json.loads((tmp_path / n / "report.json").read_text())["tokenizers"].values()
                           for n in ("stream", "whole"))
    for key in ("psnr", "ssim", "baseline_psnr", "baseline_ssim"):
        assert stream["videos"][0][key] == pytest.approx(whole["videos"][0][key], abs=1e-4), key
    assert stream["psnr_per_frame"] == pytest.approx(whole["psnr_per_frame"], abs=1e-3)
    assert stream["seams"]["error_ratio"] == pytest.approx(whole["seams"]["error_ratio"], abs=1e-4)
    assert stream["seams"]["motion_ratio"] == pytest.approx(whole["seams"]["motion_ratio"], abs=1e-4)
    assert stream["chunked_max_abs_difference"] < 1e-5 and stream["latent_floats_per_pixel"] == whole["latent_floats_per_pixel"]
    videos = []
    for n in ("stream", "whole"):
        with av.open(str(tmp_path / n / "videos" / "bikes.mp4")) as c:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int))
    assert videos[0].shape == (41, 32, 96, 3) and np.abs(videos[0] - videos[1]).max() <= 2
    assert not list((tmp_path / "stream" / "videos").glob(".*"))  # no scratch left behind
