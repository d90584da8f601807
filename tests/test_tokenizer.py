"""CausalVAE: shapes, causality, chunked = whole clip, checkpoints, input errors, latent statistics."""

from __future__ import annotations

import json

import pytest
import torch
from einops import rearrange

from tokenizer import CausalCache, CausalVAE, DiagonalGaussian, VAEConfig, fit_linear_codec, load_vae, preset, save_vae
from tokenizer.model import CausalConv3d


def randomized(model: CausalVAE, seed: int = 0) -> CausalVAE:
    """Random weights everywhere, including the residual branches that start at zero, so that every
    path of the network carries signal and a causality or chunking bug shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim >= 4:  # 3D and 2D convolutions
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=[(3, 0), (1, 8)], ids=["fine-kernel-3", "fine-kernel-1-refine"])
def vae(request) -> CausalVAE:
    torch.manual_seed(0)
    # the context decoder (3x3 cells, this and the previous latent frame) that small and base use: the
    # causality, chunk and tiling tests then cover its cache and halo too; temporal kernels of 3 at the latent
    # resolution, and 3 or 1 (the tiny preset's) in the finer layers, so both mixes of cached layers are covered;
    # the second also refines the decoded pixels
    fine, refine = request.param
    return randomized(CausalVAE.from_preset("tiny", linear_context=1, linear_frames=2, temporal_kernel=3,
                                            fine_temporal_kernel=fine, refine_channels=refine))


@pytest.mark.parametrize("frames", [1, 5, 17, 33])
def test_shapes(vae, frames):
    video = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(video)
        recon = vae.decode(posterior.sample())
    latents = 1 + (frames - 1) // 4
    assert posterior.mean.shape == posterior.logvar.shape == (2, 16, latents, 4, 6)
    assert vae.latent_shape(frames, 32, 48) == (16, latents, 4, 6)
    assert recon.shape == video.shape


def test_configurable_factors():
    cfg = preset("tiny", spatial_factor=16, channels=(48, 96, 192), latent_channels=48)  # 4x16x16, 48 channels
    model = CausalVAE(cfg).eval()
    with torch.no_grad():
        z = model.encode(torch.zeros(1, 3, 9, 32, 32)).mean
        assert z.shape == (1, 48, 3, 2, 2)
        assert model.decode(z).shape == (1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="must equal spatial_factor"):
        preset("tiny", spatial_factor=16)


def test_fine_temporal_kernel_sets_the_layers_above_the_latent_resolution():
    model = CausalVAE.from_preset("tiny", temporal_kernel=3, fine_temporal_kernel=1, encoder_blocks=1)
    kernels = {name: m.conv.kernel_size[0] for name, m in model.named_modules() if isinstance(m, CausalConv3d)}
    fine = ["encoder.conv_in", "encoder.stages.0.0.conv1", "encoder.stages.0.1.conv", "decoder.stages.0.1.conv",
            "decoder.stages.1.0.conv2", "decoder.conv_out"]
    latent = ["encoder.stages.1.0.conv1", "encoder.mid.0.conv2", "encoder.conv_out", "decoder.conv_in",
              "decoder.mid.0.conv1", "decoder.stages.0.0.conv1"]
    assert [kernels[n] for n in fine] == [1] * len(fine) and [kernels[n] for n in latent] == [3] * len(latent)
    # a config written before the field existed reads as one kernel everywhere
    old = VAEConfig.from_dict({k: v for k, v in json.loads(preset("tiny").to_json()).items() if k != "fine_temporal_kernel"})
    assert old.fine_kernel == old.temporal_kernel
    with pytest.raises(ValueError, match="fine_temporal_kernel must be at least 1"):
        preset("tiny", fine_temporal_kernel=0)


def test_encoder_is_causal(vae):
    """The latents of the first 1 + 4j frames do not depend on any later frame."""
    video = torch.rand(1, 3, 33, 32, 32) * 2 - 1
    with torch.no_grad():
        full = vae.encode(video)
        for j in range(4):
            head = vae.encode(video[:, :, : 1 + 4 * j])
            torch.testing.assert_close(head.mean, full.mean[:, :, : 1 + j], rtol=0, atol=1e-5)
            torch.testing.assert_close(head.logvar, full.logvar[:, :, : 1 + j], rtol=0, atol=1e-5)
        changed = video.clone()
        changed[:, :, 9:] = torch.rand_like(changed[:, :, 9:])  # change every frame after frame 8
        other = vae.encode(changed).mean
    torch.testing.assert_close(other[:, :, :3], full.mean[:, :, :3], rtol=0, atol=1e-5)
    assert (other[:, :, 3:] - full.mean[:, :, 3:]).abs().max() > 1e-3  # later latents do see them


def test_decoder_is_causal(vae):
    z = torch.randn(1, 16, 6, 4, 4)
    with torch.no_grad():
        full = vae.decode(z)
        for j in range(1, 6):
            torch.testing.assert_close(vae.decode(z[:, :, :j]), full[:, :, : 1 + 4 * (j - 1)], rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_equals_whole_clip(vae, chunk):
    video = torch.rand(2, 3, 29, 32, 40) * 2 - 1  # 8 latent frames: chunks do not divide it evenly for 3
    with torch.no_grad():
        whole = vae.encode(video)
        chunked = vae.encode(video, chunk=chunk)
        torch.testing.assert_close(chunked.mean, whole.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked.logvar, whole.logvar, rtol=0, atol=1e-5)
        frames = vae.decode(whole.mean)
        torch.testing.assert_close(vae.decode(whole.mean, chunk=chunk), frames, rtol=0, atol=1e-5)
        pieces = list(vae.decode_chunks(whole.mean, chunk))
    assert [p.shape[2] for p in pieces] == [1 + 4 * (min(chunk, 8) - 1)] + [4 * min(chunk, 8 - i) for i in range(chunk, 8, chunk)]
    torch.testing.assert_close(torch.cat(pieces, dim=2), frames, rtol=0, atol=1e-5)


def test_cache_holds_a_fixed_number_of_frames(vae):
    """Memory in chunked mode is bounded: the cache stops growing after the first chunk."""
    cache = CausalCache()
    z = torch.randn(1, 16, 9, 4, 4)
    sizes = []
    with torch.no_grad():
        for i in range(9):
            vae.decoder(z[:, :, i : i + 1], cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1 and len(cache) == sum(1 for m in vae.decoder.modules() if getattr(m, "time_pad", 0))


def test_input_errors_name_the_nearest_valid_values(vae):
    with pytest.raises(ValueError, match="got 16: use 13 or 17"):
        vae.encode(torch.zeros(1, 3, 16, 32, 32))
    with pytest.raises(ValueError, match="height 250 is not divisible by the spatial factor 8: use 248 or 256"):
        vae.encode(torch.zeros(1, 3, 1, 250, 32))
    with pytest.raises(ValueError, match="width 4 .* use 8"):
        vae.encode(torch.zeros(1, 3, 1, 32, 4))
    with pytest.raises(ValueError, match=r"expected video \(B, 3, T, H, W\)"):
        vae.encode(torch.zeros(3, 5, 32, 32))
    with pytest.raises(ValueError, match="expected latents"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        vae.encode(torch.zeros(1, 3, 9, 32, 32), chunk=0)


def test_save_and_load_round_trip(vae, tmp_path):
    vae.set_latent_stats(torch.linspace(-1, 1, 16), torch.linspace(0.5, 2, 16))
    save_vae(vae, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["kind"] == "tokenizer" and record["config"]["channels"] == [32, 64]
    loaded = load_vae(tmp_path / "ckpt").eval()
    assert loaded.config == vae.config
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(video).mean, vae.encode(video).mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.latent_std, vae.latent_std)
    with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint at .*missing_dir"):
        load_vae(tmp_path / "missing_dir")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete tokenizer checkpoint .* model.safetensors is missing"):
        load_vae(tmp_path / "ckpt")


def test_latent_normalization(vae):
    vae.set_latent_stats(torch.full((16,), 0.5), torch.full((16,), 3.0))
    z = torch.randn(2, 16, 3, 4, 4) * 3 + 0.5
    n = vae.normalize(z)
    torch.testing.assert_close(n, (z - 0.5) / 3)
    torch.testing.assert_close(vae.denormalize(n), z)


def test_posterior():
    mean, logvar = torch.zeros(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2)
    post = DiagonalGaussian(mean, logvar)
    assert post.kl().shape == (2,) and post.kl().abs().max() == 0
    assert DiagonalGaussian(mean + 1, logvar).kl().tolist() == [8.0, 8.0]  # 0.5 * 1^2 per element, 16 elements
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.std() > 0.5


def test_fresh_model_starts_near_deterministic_and_trains():
    """At initialisation the posterior is narrow and a few optimiser steps reduce the L1 loss."""
    torch.manual_seed(0)
    model = CausalVAE.from_preset("tiny")
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    recon, posterior = model(video)
    assert posterior.std.max() < 0.1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):  # the tiny preset (0.5M parameters) is at 0.54 of its first loss by then, 0.70 after 15
        recon, posterior = model(video)
        loss = (recon - video).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_pixel_refinement_starts_as_the_identity_and_old_configs_have_none():
    """refine_channels adds two 3x3 convs on the decoded frames, the second zero at the start, so a fresh model
    decodes as the same model without them; a config without the field (saved before it) has none."""
    torch.manual_seed(0)
    plain = randomized(CausalVAE.from_preset("tiny", refine_channels=0))
    refined = CausalVAE.from_preset("tiny", refine_channels=8).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"refine.conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))
    assert not unexpected and plain.refine is None
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(refined.decode(z), plain.decode(z))
    cfg = json.loads(preset("tiny").to_json())
    del cfg["refine_channels"]
    assert VAEConfig.from_dict(cfg).refine_channels == 0
    with pytest.raises(ValueError, match="refine_channels must be 0"):
        preset("tiny", refine_channels=-1)


def test_presets_match_the_field():
    sizes = {name: sum(p.numel() for p in CausalVAE(preset(name)).parameters()) for name in ("tiny", "small")}
    assert sizes["tiny"] < 3e6 and 5e6 < sizes["small"] < 20e6
    base = VAEConfig.from_dict(json.loads(preset("base").to_json()))  # round trip through JSON, no pickle
    with torch.device("meta"):
        n_base = sum(p.numel() for p in CausalVAE(base).parameters())
    assert 100e6 < n_base < 250e6
    with pytest.raises(ValueError, match="unknown tokenizer preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="unknown tokenizer config fields"):
        VAEConfig.from_dict({"channels": [8, 16], "depth": 3})


@pytest.mark.parametrize("preset", ["tiny", pytest.param("small", marks=pytest.mark.slow)])
def test_spatial_tiles_equal_the_whole_frame(preset):
    # every normalisation is per voxel, so a tile computed with the receptive field's worth of context
    # around it is exact: no blending, no seams
    vae = randomized(CausalVAE.from_preset(preset, linear_context=1, linear_frames=2, refine_channels=8)).eval()
    x = torch.rand(1, 3, 5, 64, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole, tiled = vae.encode(x), vae.encode(x, tile=32, chunk=1)
        torch.testing.assert_close(tiled.mean, whole.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tiled.logvar, whole.logvar, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(whole.mean, tile=48, chunk=2), vae.decode(whole.mean), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="tile must be a positive multiple of the spatial factor 8"):
        vae.encode(x, tile=20)


def test_linear_codec_init_is_the_best_linear_block_code():
    """After init_linear_codec the model is exactly the projection of each 4x8x8 pixel block onto the top
    principal directions of the data's blocks, so its reconstruction error is the PCA's."""
    torch.manual_seed(0)
    vae = CausalVAE.from_preset("tiny", linear_context=0, linear_frames=1)  # the decoder sees each block's cell only
    x = torch.rand(4, 3, 9, 32, 32) * 2 - 1
    x = x + torch.linspace(-0.5, 0.5, 32).view(1, 1, 1, 1, 32)  # some structure for PCA to find
    kept = fit_linear_codec(vae, x)
    assert 0 < kept < 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).mode())
    blocks = lambda v: rearrange(vae.patchify(v), "b d t (h i) (w j) -> b t (h w) (d i j)", i=2, j=2)  # noqa: E731
    data = blocks(x).double()
    _, _, vt = torch.linalg.svd(data.flatten(0, 2), full_matrices=False)
    basis = vt[:16]
    projected = data @ basis.T @ basis
    # latent frames 1.. (the first holds the first frame's copies, of which decoding keeps one)
    torch.testing.assert_close(blocks(recon)[:, 1:].double(), projected[:, 1:], rtol=1e-3, atol=1e-3)


def test_linear_codec_init_with_context_is_the_least_squares_decoder():
    """With context (the default: 3x3 latent cells, this and the previous latent frame) the decoder's linear
    path is fitted by least squares: the gradient of the squared error with respect to its weights vanishes at
    init, and it reconstructs better than the block code that sees one cell."""
    torch.manual_seed(0)
    t = torch.linspace(0, 1, 64)
    x = torch.sin(6.3 * t.view(1, 1, 1, 1, 64) + 4 * t.view(1, 1, 1, 64, 1) + torch.rand(4, 3, 1, 1, 1) * 6)
    x = (0.7 * x.expand(4, 3, 9, 64, 64) + 0.3 * torch.rand(4, 3, 9, 64, 64)).contiguous()  # smooth + noise
    errors = {}
    for context, frames in ((0, 1), (1, 2)):
        vae = CausalVAE.from_preset("tiny", linear_context=context, linear_frames=frames)
        kept = fit_linear_codec(vae, x)
        with torch.no_grad():
            errors[context] = (vae.decode(vae.encode(x).mode()) - x).pow(2).mean().item()
        assert 0 < kept < 1
    assert errors[1] < 0.9 * errors[0]

    patches = vae.patchify(x)
    with torch.no_grad():
        z = vae.encoder.linear(patches)
    s = vae.decoder.block
    target = rearrange(patches, "b d t (h i) (w j) -> b (d i j) t h w", i=s, j=s)
    conv = vae.decoder.linear.conv

    def grad_norm() -> float:
        conv.zero_grad()
        (vae.decoder.linear(z) - target).pow(2).sum().backward()
        return conv.weight.grad.norm().item()

    at_fit = grad_norm()
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight) * 1e-3)
    assert at_fit < 1e-3 * grad_norm()


def test_weights_that_do_not_match_their_config_get_a_one_line_error(tmp_path):
    """A checkpoint whose weights are another architecture's (here a renamed decoder path) is refused with the
    missing and unexpected keys named, not a load_state_dict traceback."""
    import dataclasses

    from checkpoint_io import save_checkpoint
    from errors import InputError

    vae = CausalVAE.from_preset("tiny")
    state = dict(vae.state_dict())
    state["decoder.linear.weight"] = state.pop("decoder.linear.conv.weight")
    save_checkpoint(tmp_path, dataclasses.asdict(vae.config), state, "tokenizer")
    with pytest.raises(InputError, match=r"do not match their config: missing \['decoder.linear.conv.weight'\], "
                                         r"unexpected \['decoder.linear.weight'\]"):
        load_vae(tmp_path)
    config = {k: v for k, v in dataclasses.asdict(vae.config).items() if k != "linear_context"}  # an older config
    save_checkpoint(tmp_path, config | {"linear_contxt": 0}, vae.state_dict(), "tokenizer")
    with pytest.raises(InputError, match=r"unknown tokenizer config fields \['linear_contxt'\]"):
        load_vae(tmp_path)
