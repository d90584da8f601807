"""The field's video autoencoders behind our tokenizer interface: tiny random diffusers models, saved with
save_pretrained and loaded through our path, against diffusers' own calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from errors import InputError
from tokenizer import CausalVAE, DiffusersVAE, load_tokenizer, save_vae

diffusers = pytest.importorskip("diffusers")

TINY = {
    "AutoencoderKLWan": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                             temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                             latents_std=[1.5, 0.5, 2.0, 1.0]),
    "Wan2.2": dict(base_dim=8, decoder_base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True], is_residual=True, patch_size=2, scale_factor_spatial=16,
                   in_channels=12, out_channels=12, latents_mean=[0.2, 0.0, -0.1, 0.1], latents_std=[1.2, 0.8, 1.0, 2.0]),
    "AutoencoderKLCogVideoX": dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                                   norm_num_groups=4, sample_height=32, sample_width=32),
    "AutoencoderKLHunyuanVideo": dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                                      norm_num_groups=4),
    "AutoencoderKLLTXVideo": dict(block_out_channels=(8, 8, 16, 16), decoder_block_out_channels=(8, 8, 16, 16),
                                  latent_channels=8, layers_per_block=(1, 1, 1, 1, 1),
                                  decoder_layers_per_block=(1, 1, 1, 1, 1), scaling_factor=0.7),
}
# (frames rule, compression) each class declares; LTX-Video compresses 8x32x32
EXPECTED = {"AutoencoderKLWan": (4, 8), "Wan2.2": (4, 16), "AutoencoderKLCogVideoX": (4, 8), "AutoencoderKLHunyuanVideo": (4, 8),
            "AutoencoderKLLTXVideo": (8, 32)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, config in TINY.items():
        torch.manual_seed(0)
        model = getattr(diffusers, class_of(name))(**config)
        if name == "AutoencoderKLLTXVideo":  # saved statistics, so the normalisation is not the identity
            model.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
            model.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def class_of(name: str) -> str:
    return "AutoencoderKLWan" if name == "Wan2.2" else name  # Wan2.2's 4x16x16 autoencoder is the same class


def clip_for(name: str, batch: int = 2) -> torch.Tensor:
    tf, sf = EXPECTED[name]
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 3, 1 + 2 * tf, 2 * sf, 2 * sf, generator=g) * 2 - 1


@pytest.mark.parametrize("name", list(TINY))
def test_reconstruction_equals_diffusers(folders, name):
    vae = load_tokenizer(folders[name])
    assert isinstance(vae, DiffusersVAE) and vae.config.class_name == class_of(name)
    tf, sf = EXPECTED[name]
    assert (vae.config.temporal_factor, vae.config.spatial_factor) == (tf, sf)
    x = clip_for(name)
    reference = getattr(diffusers, class_of(name)).from_pretrained(folders[name]).eval()
    with torch.no_grad():
        posterior = vae.encode(x)
        ours = vae.decode(posterior.mean)
        batched = reference.encode(x).latent_dist
        batched_decode = reference.decode(batched.mean).sample
        reference.enable_slicing()  # as the adapter runs it: one clip of the batch at a time
        dist = reference.encode(x).latent_dist
        theirs = reference.decode(dist.mean).sample
    assert posterior.mean.shape == (2, vae.config.latent_channels, *vae.latent_shape(*x.shape[2:])[1:])
    assert torch.equal(posterior.mean, dist.mean) and torch.equal(posterior.logvar, dist.logvar)
    assert ours.shape == x.shape
    assert torch.equal(ours, theirs)  # float32, the same calls: exactly equal
    # slicing changes only the float rounding of the batched convolutions
    torch.testing.assert_close(posterior.mean, batched.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, batched_decode, rtol=0, atol=2e-4)  # HunyuanVideo: 1e-4
    # the posterior's KL is the diffusers distribution's
    assert torch.allclose(posterior.kl(), dist.kl().reshape(2, -1).sum(1), rtol=1e-5)  # diffusers sums dims 1-3 only


@pytest.mark.parametrize("name", list(TINY))
def test_latent_normalisation_is_the_pipelines(folders, name):
    vae = load_tokenizer(folders[name])
    z = torch.randn(2, vae.config.latent_channels, 3, 2, 2)
    model = vae.model
    if class_of(name) == "AutoencoderKLWan":  # WanPipeline: latents / (1 / std) + mean before decoding
        mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
        expected = (z - mean) / std
    elif name == "AutoencoderKLLTXVideo":
        from diffusers import LTXPipeline

        expected = LTXPipeline._normalize_latents(z, model.latents_mean, model.latents_std, model.config.scaling_factor)
    else:  # CogVideoX and HunyuanVideo pipelines scale by scaling_factor
        expected = z * model.config.scaling_factor
    assert torch.allclose(vae.normalize(z), expected, atol=1e-6)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-5)


def test_frame_rules_and_bad_folders(folders, tmp_path):
    ltx = load_tokenizer(folders["AutoencoderKLLTXVideo"])
    with pytest.raises(InputError, match=r"1 \+ 8k.*use 9 or 17"):
        ltx.check_video(torch.empty(1, 3, 13, 64, 64, device="meta"))
    with pytest.raises(InputError, match="divisible by the spatial factor 32"):
        ltx.check_video(torch.empty(1, 3, 9, 48, 64, device="meta"))
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "image_vae")
    with pytest.raises(InputError) as e:
        load_tokenizer(tmp_path / "image_vae")
    assert "holds AutoencoderKL (config.json)" in str(e.value) and "AutoencoderKLWan" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no config.json"):
        DiffusersVAE.from_pretrained(tmp_path / "nowhere")
    # our own folders still load as CausalVAE
    save_vae(CausalVAE.from_preset("tiny"), tmp_path / "ours")
    assert isinstance(load_tokenizer(tmp_path / "ours"), CausalVAE)


def test_save_pretrained_round_trip(folders, tmp_path):
    vae = load_tokenizer(folders["AutoencoderKLWan"])
    vae.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    again = load_tokenizer(tmp_path / "copy")
    x = clip_for("AutoencoderKLWan", 1)
    with torch.no_grad():
        assert torch.equal(again.encode(x).mean, vae.encode(x).mean)


def test_tiled_decoding_runs_and_its_error_is_measured(folders):
    """diffusers' tiling blends overlapping tiles: an approximation, not claimed exact. It runs through our
    interface, keeps the shape, and stays near the whole-frame result on this smooth random model."""
    vae = load_tokenizer(folders["AutoencoderKLWan"])
    x = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        whole = vae.decode(z)
        tiled = vae.decode(z, tile=32)
        again = vae.decode(z)
    assert tiled.shape == whole.shape
    assert torch.equal(again, whole)  # tiling switched back off
    assert (tiled - whole).abs().max() < 1.0
    # auto: the model's own 256-pixel tiles, which a 64-pixel frame does not reach: the whole-frame result
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile="auto"), whole)
    assert vae.model.use_tiling and vae.model.tile_sample_min_height == 256
    with torch.no_grad():
        vae.decode(z, tile=32)
        vae.decode(z, tile="auto")
    assert vae.model.tile_sample_min_height == 256  # its defaults are restored after a tile size was asked for


def test_a_wrapped_tokenizer_works_wherever_ours_does(folders, tmp_path, synthetic_shards):
    """tokenizer.evaluate, tokenizer.encode, train.py --vae and sample.py with Wan's autoencoder (tiny, random)."""
    import sample
    import train
    from tokenizer.encode import main as encode_main
    from tokenizer.evaluate import main as evaluate_main

    from .conftest import CARPHONE

    wan = str(folders["AutoencoderKLWan"])
    assert evaluate_main(["--ckpt", wan, "--data", str(CARPHONE), "--frames", "9", "--size", "32", "--windows", "1",
                          "--no-videos", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["settings"]["latent_shape"] == [4, 3, 4, 4] and report["tokenizers"]["AutoencoderKLWan"]["mean"]["psnr"] > 0
    assert encode_main(["--ckpt", wan, "--data", str(synthetic_shards), "--out", str(tmp_path / "latents"),
                        "--frames", "9", "--size", "32", "--workers", "0"]) == 0
    assert train.main(["--stage", "dit", "--data", str(tmp_path / "latents"), "--latents", "--vae", wan,
                       "--out", str(tmp_path / "dit"), "--frames", "9", "--size", "32", "--steps", "2",
                       "--batch-size", "2", "--num-workers", "0", "--checkpoint-every", "0", "--wandb", "disabled",
                       "--no-progress", "--preview-steps", "2", "--warmup", "1"]) == 0
    exported = tmp_path / "dit" / "model" / "tokenizer" / "config.json"
    assert json.loads(exported.read_text())["_class_name"] == "AutoencoderKLWan"
    assert sample.main(["--ckpt", str(tmp_path / "dit"), "--prompt", "a red circle moving right", "--steps", "2",
                        "--out", str(tmp_path / "clip.mp4"), "--no-progress"]) == 0
    assert (tmp_path / "clip.mp4").stat().st_size > 0


@pytest.mark.filterwarnings("ignore::FutureWarning:torch.jit", "ignore::UserWarning:torchvision")
def test_one_report_compares_ours_and_two_wrapped_tokenizers(folders, tmp_path, i3d_path):
    """Ours, Wan's and LTX-Video's autoencoders on the repository's real clips, on the same windows at each
    clip's own aspect ratio: every column filled, the side-by-side videos and the PSNR-per-frame plot written."""
    import av

    from tokenizer.evaluate import main as evaluate_main

    from .conftest import BIKES, CARPHONE, copy_clip, write_reference_lpips_weights

    torch.manual_seed(0)
    save_vae(CausalVAE.from_preset("tiny"), tmp_path / "ours")
    _, vgg, heads = write_reference_lpips_weights(tmp_path)
    clips = tmp_path / "clips"
    clips.mkdir()
    copy_clip(BIKES, clips / "bikes.mp4", None)
    copy_clip(CARPHONE, clips / "carphone.mp4", None)
    ckpts = [tmp_path / "ours", folders["AutoencoderKLWan"], folders["AutoencoderKLLTXVideo"]]
    out = tmp_path / "report"
    args = ["--data", str(clips), "--frames", "9", "--size", "32", "--aspect", "native", "--windows", "1",
            "--out", str(out), "--lpips-vgg", str(vgg), "--lpips-heads", str(heads), "--i3d", str(i3d_path)]
    assert evaluate_main(sum((["--ckpt", str(c)] for c in ckpts), []) + args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["order"] == ["ours", "AutoencoderKLWan", "AutoencoderKLLTXVideo"]
    # 640x272 and 176x144: the long side to the nearest multiple of 32, LTX-Video's spatial factor
    assert report["settings"]["sizes"] == {"bikes.mp4": [32, 64], "carphone.mp4": [32, 32]}
    columns = ("psnr", "ssim", "lpips", "rfvd", "baseline_psnr", "baseline_ssim", "baseline_lpips", "baseline_rfvd")
    for name, r in report["tokenizers"].items():
        assert all(np.isfinite(r["mean"][c]) for c in columns), name
        assert r["mean"]["rfvd_clips"] == 2 and len(r["videos"]) == 2
        assert np.isfinite(r["seams"]["error_ratio"]) and np.isfinite(r["seams"]["motion_ratio"])
        assert r["encode_frames_per_s"] > 0 and r["decode_frames_per_s"] > 0 and np.isfinite(r["peak_memory_mb"])
        assert len(r["psnr_per_frame"]) == 9
    ltx = report["tokenizers"]["AutoencoderKLLTXVideo"]
    assert ltx["compression"] == [8, 32, 32] and ltx["latent_floats_per_pixel"] == pytest.approx(8 * 2 / (9 * 32 * 32))
    assert report["tokenizers"]["AutoencoderKLWan"]["seams"]["group_starts"] == [1, 5]
    text = (out / "report.md").read_text()
    assert "| AutoencoderKLLTXVideo | 8x32x32 |" in text and "nan" not in text.split("## ")[0]
    assert (out / "psnr_per_frame.png").stat().st_size > 0
    with av.open(str(out / "videos" / "bikes.mp4")) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (32, 64 * 7, 3)  # original, then reconstruction and error for each of three


def test_a_frame_count_one_tokenizer_cannot_take_names_it(folders, tmp_path, capsys):
    from tokenizer.evaluate import main as evaluate_main

    from .conftest import CARPHONE

    save_vae(CausalVAE.from_preset("tiny"), tmp_path / "ours")
    assert evaluate_main(["--ckpt", str(tmp_path / "ours"), "--ckpt", str(folders["AutoencoderKLLTXVideo"]),
                          "--data", str(CARPHONE), "--frames", "13", "--size", "64", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: AutoencoderKLLTXVideo: the frame count must be 1 + 8k") and len(err.splitlines()) == 1
