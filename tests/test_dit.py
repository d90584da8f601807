"""DiT3D: shapes, patchify, attention backends, zero init, checkpointing, text padding, checkpoints."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from dit3d import DiT3D, DiTConfig, attention, load_dit, save_dit, patchify, preset, resolve_backend, unpatchify
from dit3d.model import DiTBlock
from dit3d.rope import apply_rope, axis_dims, rope_angles, rope_cos_sin, sincos_position
from parallel import apply_activation_checkpointing
from tokenizer import load_vae


def randomized(model: DiT3D, seed: int = 0) -> DiT3D:
    """Random weights everywhere, the zero-initialised modulation and output layers included, so that every
    path carries signal (at initialisation most of the network is switched off by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5 if p.ndim > 1 else 0.1))
    return model


def inputs(batch=2, frames=5, height=8, width=12, text_len=7, text_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g)
    text = torch.randn(batch, text_len, text_dim, generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, text_len // 2 :] = False  # the last caption is shorter
    return x, t, text, mask


def with_backend(model: DiT3D, backend: str) -> DiT3D:
    """The same weights in a model built to run another attention backend."""
    twin = DiT3D(dataclasses.replace(model.config, attention_backend=backend)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.fixture(scope="module", params=[{}, {"absolute_position": False}], ids=["tiny", "tiny-rotary-only"])
def model(request) -> DiT3D:
    """The tiny DiT with random weights; also without the absolute positions its preset adds to rotary."""
    torch.manual_seed(0)
    return randomized(DiT3D.from_preset("tiny", **request.param)).eval()


@pytest.mark.parametrize("shape", [(1, 8, 8), (5, 8, 12), (9, 4, 16), (2, 6, 6)])
def test_output_shapes(model, shape):
    x, t, text, mask = inputs(frames=shape[0], height=shape[1], width=shape[2])
    with torch.no_grad():
        assert model(x, t, text, mask).shape == x.shape


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 1, 1)])
def test_patchify_then_unpatchify_is_exact(patch):
    x = torch.randn(2, 16, 4, 6, 8)
    tokens = patchify(x, patch)
    grid = (4 // patch[0], 6 // patch[1], 8 // patch[2])
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 16 * patch[0] * patch[1] * patch[2])
    assert torch.equal(unpatchify(tokens, grid, patch), x)
    # token (t, h, w) holds exactly the latent cuboid at that place
    t, h, w = 1, 2, 3
    index = (t * grid[1] + h) * grid[2] + w
    cuboid = x[:, :, t * patch[0] : (t + 1) * patch[0], h * patch[1] : (h + 1) * patch[1], w * patch[2] : (w + 1) * patch[2]]
    assert torch.equal(tokens[:, index], cuboid.flatten(1))


def test_other_patch_sizes_and_embeddings():
    for overrides in ({"patch_size": (2, 2, 2)}, {"patch_embed": "conv"}, {"mlp": "swiglu"}, {"qk_norm": False}):
        m = randomized(DiT3D.from_preset("tiny", **overrides)).eval()
        x, t, text, mask = inputs(frames=4)
        with torch.no_grad():
            y = m(x, t, text, mask)
        assert y.shape == x.shape and y.abs().max() > 0, overrides


def test_conv_and_linear_embeddings_are_the_same_map():
    lin = randomized(DiT3D.from_preset("tiny")).eval()
    conv = DiT3D.from_preset("tiny", patch_embed="conv").eval()
    state = dict(lin.state_dict())
    state["embed.weight"] = state["embed.weight"].view(96, 16, 1, 2, 2)  # (width, C * pt * ph * pw) as a kernel
    conv.load_state_dict(state)
    x, t, text, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(conv(x, t, text, mask), lin(x, t, text, mask), rtol=1e-5, atol=1e-5)


def test_sdpa_equals_reference(model):
    x, t, text, mask = inputs(frames=5, height=8, width=8)
    with torch.no_grad():
        ref = with_backend(model, "reference")(x, t, text, mask)
        out = with_backend(model, "sdpa")(x, t, text, mask)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_attention_function_backends_agree_on_long_sequences_with_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2500, 16, generator=g) for _ in range(3))  # more than one reference block
    mask = torch.ones(2, 2500, dtype=torch.bool)
    mask[1, 1700:] = False
    ref = attention(q, k, v, "reference", key_mask=mask)
    torch.testing.assert_close(attention(q, k, v, "sdpa", key_mask=mask), ref, rtol=0, atol=1e-5)
    # a masked key changes nothing, whatever it holds
    k2 = k.clone()
    k2[1, :, 1700:] = 100.0
    torch.testing.assert_close(attention(q, k2, v, "reference", key_mask=mask), ref, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xFormers runs on CUDA only")
def test_xformers_equals_reference_on_cuda():
    pytest.importorskip("xformers")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", generator=g) for _ in range(3))
    mask = torch.ones(2, 1000, dtype=torch.bool, device="cuda")
    mask[1, 600:] = False
    for m in (None, mask):
        torch.testing.assert_close(attention(q, k, v, "xformers", key_mask=m), attention(q, k, v, "reference", key_mask=m),
                                   rtol=0, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="xFormers may run here")
def test_an_unavailable_backend_falls_back_with_one_log_line_per_model(caplog, monkeypatch):
    monkeypatch.delenv("DIT3D_ATTENTION", raising=False)
    for built in (1, 2):  # every model that asks says so once, whatever was built before it
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            model = DiT3D.from_preset("tiny", attention_backend="xformers")
        assert model.attention_backend == "sdpa"
        assert sum("running 'sdpa'" in r.message for r in caplog.records) == 1, built
    monkeypatch.setenv("DIT3D_ATTENTION", "reference")
    assert resolve_backend("sdpa") == "reference"
    monkeypatch.setenv("DIT3D_ATTENTION", "flash9")
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        resolve_backend("sdpa")


def test_the_backend_is_resolved_when_the_model_is_built(monkeypatch):
    """DIT3D_ATTENTION is read when a model is built, not on every call: a model keeps the backend it was
    built with, and attention() runs the backend it is given."""
    monkeypatch.setenv("DIT3D_ATTENTION", "reference")
    torch.manual_seed(0)
    built_reference = randomized(DiT3D.from_preset("tiny")).eval()
    monkeypatch.setenv("DIT3D_ATTENTION", "sdpa")
    assert built_reference.attention_backend == "reference"
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, text, mask = inputs()
    with torch.no_grad():
        built_reference(x, t, text, mask)
    assert not calls  # the environment changed since, the model did not
    monkeypatch.delenv("DIT3D_ATTENTION")
    with torch.no_grad():
        with_backend(built_reference, "sdpa")(x, t, text, mask)
    assert calls


def test_absolute_position_marks_where_each_token_is():
    grid, dim = (3, 4, 5), 96
    feats = sincos_position(grid, dim, 10000.0, "cpu", torch.float64).view(*grid, dim)
    dt, dh, _ = axis_dims(dim)
    # each axis's channels depend on that axis's index alone, and no two tokens share their features
    assert torch.equal(feats[:, :1, :1, :dt].expand(*grid, dt), feats[..., :dt])
    assert torch.equal(feats[:1, :, :1, dt : dt + dh].expand(*grid, dh), feats[..., dt : dt + dh])
    assert torch.equal(feats[:1, :1, :, dt + dh :].expand(*grid, dim - dt - dh), feats[..., dt + dh :])
    assert torch.cdist(feats.view(-1, dim), feats.view(-1, dim)).add(torch.eye(60)).min() > 0.1
    # the features of a grid do not depend on which grids were asked for before (the cache keys on all of it)
    sincos_position((4, 4, 4), dim, 10000.0, "cpu", torch.float64)
    assert torch.equal(sincos_position(grid, dim, 10000.0, torch.device("cpu"), torch.float64).view(*grid, dim), feats)
    torch.manual_seed(0)
    rotary_only = randomized(DiT3D.from_preset("tiny", absolute_position=False))
    placed = DiT3D.from_preset("tiny", absolute_position=True)
    placed.load_state_dict(rotary_only.state_dict())  # no parameters of its own
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert (placed(x, t, text, mask) - rotary_only(x, t, text, mask)).abs().max() > 1e-3
        assert torch.equal(DiT3D.from_preset("tiny", absolute_position=True)(x, t, text, mask), torch.zeros_like(x))


def test_absolute_time_as_a_fraction_of_the_clip_is_the_same_span_at_any_length():
    """With time_fraction the first token frame has the same time features at every length, and so has the
    last: a clip twice the trained length places its tokens between places the model has seen, where index
    features would place half of them past anything seen. Time extrapolation leaves fraction features alone."""
    from dit3d.rope import TimeScaling

    dim = 96
    dt = axis_dims(dim)[0]

    def time_features(frames, **kw):
        return sincos_position((frames, 2, 2), dim, 10000.0, "cpu", torch.float64, **kw).view(frames, 2, 2, dim)[:, 0, 0]

    short, long = time_features(5, time_fraction=True), time_features(9, time_fraction=True)
    torch.testing.assert_close(long[0], short[0])
    torch.testing.assert_close(long[-1], short[-1])
    torch.testing.assert_close(long[4], short[2])  # half-way through is the same place at both lengths
    assert not torch.allclose(long[1], short[1])
    torch.testing.assert_close(long[:, dt:], short[:1, dt:].expand(9, -1))  # height and width as before
    index = time_features(9)
    assert torch.equal(index[:5], time_features(5))  # index features: the first 5 agree, the rest are new places
    scaled = time_features(9, time_fraction=True, time=TimeScaling("riflex", 5, 9))
    assert torch.equal(scaled, long)
    assert torch.equal(time_features(1, time_fraction=True)[0], short[0])  # an image is the first frame
    with pytest.raises(Exception, match="absolute_time must be one of 'index', 'fraction'"):
        preset("tiny", absolute_time="middle")


def test_output_at_initialisation_is_exactly_zero():
    torch.manual_seed(0)
    fresh = DiT3D.from_preset("tiny")
    x, t, text, mask = inputs()
    out = fresh(x, t, text, mask)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # and it still learns: the output layer gets a gradient
    assert fresh.out.weight.grad.abs().max() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    x, t, text, mask = inputs()
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        m = randomized(DiT3D.from_preset("tiny"))
        if checkpointed:
            assert apply_activation_checkpointing(m, DiTBlock) == 4
        m(x, t, text, mask).pow(2).mean().backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                      for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert {n for n, _ in DiT3D.from_preset("tiny").named_parameters()} - grads[0].keys() == {"null_text"}  # no dropout here
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_padding_tokens_in_the_text_do_not_change_the_output(model):
    x, t, text, _ = inputs(text_len=5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    padded = torch.cat([text, 50 * torch.randn(2, 4, 64)], dim=1)  # 4 garbage tokens, masked out
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, padded, padded_mask), model(x, t, text, mask), rtol=0, atol=1e-5)
        unmasked = model(x, t, padded, torch.ones(2, 9, dtype=torch.bool))
    assert (unmasked - model(x, t, text, mask)).abs().max() > 1e-3  # the mask is what hides them


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_a_batch_mixing_durations_and_sizes_equals_each_clip_alone(model, backend):
    model = with_backend(model, backend)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 5, 8, 8, generator=g), torch.randn(16, 1, 6, 10, generator=g), torch.randn(16, 3, 4, 8, generator=g)]
    t = torch.rand(3, generator=g)
    text = torch.randn(3, 6, 64, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2:] = False
    with torch.no_grad():
        out = model.forward_varlen(xs, t, text, mask)
        for i, x in enumerate(xs):
            alone = model(x[None], t[i : i + 1], text[i : i + 1], mask[i : i + 1])[0]
            assert out[i].shape == x.shape
            torch.testing.assert_close(out[i], alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected latents \(16, T, H, W\)"):
        model.forward_varlen([torch.zeros(1, 16, 1, 4, 4)], t[:1], text[:1])


def test_caption_dropout_uses_the_null_condition(model):
    x, t, text, mask = inputs()
    dropped_text, dropped_mask = model.drop_captions(text, mask, torch.tensor([False, True]))
    assert torch.equal(dropped_text[0], text[0]) and torch.equal(dropped_mask[0], mask[0])
    assert dropped_mask[1].tolist() == [True] + [False] * 6
    null_text, null_mask = model.null_condition(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, dropped_text, dropped_mask)[1], model(x, t, null_text, null_mask)[1],
                                   rtol=0, atol=1e-5)


def test_rotary_embedding_is_relative():
    """Scores depend on the offset between positions only: shifting both tokens leaves q.k unchanged."""
    head_dim = 24
    assert axis_dims(head_dim) == (8, 8, 8) and axis_dims(64) == (24, 20, 20)
    cos, sin = rope_cos_sin((6, 5, 5), head_dim, 10000.0, "cpu", torch.float64)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, head_dim, generator=g, dtype=torch.float64)
    index = lambda t, h, w: (t * 5 + h) * 5 + w  # noqa: E731

    def score(a, b):
        qa = apply_rope(q, cos[a : a + 1], sin[a : a + 1])
        kb = apply_rope(k, cos[b : b + 1], sin[b : b + 1])
        return (qa * kb).sum().item()

    assert score(index(0, 1, 2), index(2, 3, 1)) == pytest.approx(score(index(3, 2, 3), index(5, 4, 2)), abs=1e-9)
    assert score(index(0, 0, 0), index(1, 0, 0)) != pytest.approx(score(index(0, 0, 0), index(0, 1, 0)), abs=1e-6)


def test_sizes_that_do_not_divide_are_refused(model):
    with pytest.raises(ValueError, match="latent height 7 is not divisible by the patch size 2: use 6 or 8"):
        model(torch.zeros(1, 16, 1, 7, 8), torch.zeros(1), torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match=r"expected latents \(B, 16, T, H, W\)"):
        model(torch.zeros(1, 4, 1, 8, 8), torch.zeros(1), torch.zeros(1, 1, 64))
    with pytest.raises(ValueError, match="latent frames 3 .* use 2 or 4"):
        DiT3D.from_preset("tiny", patch_size=(2, 2, 2))(torch.zeros(1, 16, 3, 8, 8), torch.zeros(1), torch.zeros(1, 1, 64))


def test_save_and_load(model, tmp_path):
    save_dit(model, tmp_path / "dit")
    rng = torch.get_rng_state()
    loaded = load_dit(tmp_path / "dit").eval()
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing from the global generator
    assert loaded.config == model.config
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), model(x, t, text, mask))
    with pytest.raises(ValueError, match="holds a 'dit' checkpoint, not a 'tokenizer' one"):
        from tokenizer import CausalVAE

        load_vae(tmp_path / "dit")


@pytest.mark.parametrize("before,key", [(dict(absolute_position=False), "absolute_position"),
                                        (dict(absolute_position=True, absolute_time="index"), "absolute_time")],
                         ids=["before-absolute-position", "before-absolute-time"])
def test_checkpoint_saved_before_a_position_option_loads_as_it_was(tmp_path, before, key):
    """A tiny DiT saved before the preset turned absolute_position on (or before absolute_time existed) has no
    such key in its config.json: it loads as the model it was, not as today's preset."""
    import json

    old = randomized(DiT3D.from_preset("tiny", **before)).eval()
    save_dit(old, tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    config["config"].pop(key)
    (tmp_path / "dit" / "config.json").write_text(json.dumps(config))
    loaded = load_dit(tmp_path / "dit").eval()
    assert loaded.config.absolute_position == before["absolute_position"] and loaded.config.absolute_time == "index"
    x, t, text, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text, mask), old(x, t, text, mask))


def test_presets():
    sizes = {}
    for name in ("S", "B", "L", "XL", "1.3B"):
        with torch.device("meta"):
            sizes[name] = sum(p.numel() for p in DiT3D.from_preset(name).parameters())
    assert sizes["S"] < sizes["B"] < sizes["L"] < sizes["XL"] < sizes["1.3B"]
    assert 1.3e9 < sizes["1.3B"] < 1.5e9  # Wan2.1 "1.3B": width 1536, 30 layers, 12 heads, FFN 8960
    c = preset("1.3B")
    assert (c.width, c.depth, c.heads, int(c.width * c.mlp_ratio)) == (1536, 30, 12, 8960)
    with pytest.raises(ValueError, match="must be divisible by heads"):
        DiTConfig(width=100, heads=3)


def test_rotary_tables_built_while_sampling_serve_training():
    with torch.inference_mode():  # built first while sampling...
        cos, sin = rope_cos_sin((2, 3, 4), 32, 10000.0, "cpu", torch.float32)
    rope_cos_sin((4, 3, 2), 32, 10000.0, "cpu", torch.float32)  # another grid in between
    cos, sin = rope_cos_sin((2, 3, 4), 32, 10000.0, torch.device("cpu"), torch.float32)  # ...then in training
    angles = rope_angles((2, 3, 4), 32)
    torch.testing.assert_close(cos, torch.cat([angles, angles], -1).cos().float(), rtol=0, atol=1e-6)
    x = torch.randn(1, 24, 2, 32, dtype=torch.float32, requires_grad=True)  # (B, N, heads, head_dim)
    apply_rope(x, cos, sin).pow(2).sum().backward()
    # a rotation keeps each pair's length, so the gradient of the squared norm is 2 x
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["riflex", "ntk", "pi"])
def test_time_extrapolation_changes_only_the_time_frequencies_and_nothing_at_the_trained_length(method):
    from dit3d.rope import TimeScaling

    head_dim, grid = 48, (20, 3, 4)  # 8 time pairs, 4 height pairs and 4 width pairs
    dt, dh, dw = axis_dims(head_dim)
    plain = rope_angles(grid, head_dim).reshape(*grid, -1)
    same = rope_angles(grid, head_dim, time=TimeScaling(method, 20, 20)).reshape(*grid, -1)
    assert torch.equal(plain, same) and torch.equal(plain, rope_angles(grid, head_dim, time=TimeScaling(method, 20, 10)).reshape(*grid, -1))
    longer = rope_angles(grid, head_dim, time=TimeScaling(method, 10, 20)).reshape(*grid, -1)
    assert torch.equal(longer[..., dt // 2 :], plain[..., dt // 2 :])  # height and width untouched
    freqs, new = plain[1, 0, 0, : dt // 2], longer[1, 0, 0, : dt // 2]  # the angles at t = 1 are the frequencies
    changed = (freqs != new).nonzero().flatten().tolist()
    if method == "riflex":
        periods = 2 * torch.pi / freqs
        intrinsic = int(torch.argmin((periods - 10).abs()))
        assert changed == [intrinsic]
        assert float(new[intrinsic]) == pytest.approx(0.9 * 2 * torch.pi / 20)  # its period now past the target
    elif method == "ntk":
        assert changed == list(range(1, dt // 2)) and bool((new[1:] < freqs[1:]).all())  # slower, the fastest kept
        base = 10000.0 * 2 ** (dt / (dt - 2))
        assert float(new[-1]) == pytest.approx(base ** (-(dt - 2) / dt))
    else:  # every time frequency halved: 20 token frames turn through the angles 10 did
        torch.testing.assert_close(new, freqs / 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(longer[19, 0, 0, : dt // 2], plain[19, 0, 0, : dt // 2] / 2, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="must be one of riflex, ntk, pi"):
        TimeScaling("yarn", 10, 20)


def test_a_dit_with_time_extrapolation_at_its_trained_length_gives_the_same_output():
    from dit3d.rope import TimeScaling

    torch.manual_seed(0)
    model = randomized(DiT3D(preset("tiny", width=48, depth=2, heads=2))).eval()  # not zero-initialised: outputs differ
    x, t, text = torch.randn(1, 16, 16, 4, 4), torch.rand(1), torch.randn(1, 5, model.config.text_dim)
    with torch.no_grad():
        plain = model(x, t, text)
        for method in ("riflex", "ntk"):
            model.time_scaling = TimeScaling(method, 16, 16)
            assert torch.equal(model(x, t, text), plain)
        model.time_scaling = TimeScaling("riflex", 8, 16)  # twice the trained length: the intrinsic period (6.3) is short of it
        assert not torch.equal(model(x, t, text), plain)
