"""Wan2.1's transformer in DiT3D, held against diffusers' WanTransformer3DModel on small random-weight models
saved with save_pretrained: both layouts in, the diffusers layout out."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dit3d import DiT3D, load_dit, save_diffusers, save_dit
from dit3d.config import preset
from errors import InputError

diffusers = pytest.importorskip("diffusers")

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=24, freq_dim=256, ffn_dim=40, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def tiny_wan(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**(TINY_WAN | overrides)).eval()
    with torch.no_grad():  # every parameter away from its initial value (norm weights of one, zero biases)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def wan_output(model, x, t, text):
    with torch.no_grad():
        return model(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]


def ours_output(model, x, t, text):
    with torch.no_grad():
        return model(x, t, text)


SHAPES = [(1, 4, 4), (3, 4, 6), (2, 6, 2)]  # (T, H, W) latents, one frame included


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    model = tiny_wan()
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(folder)
    return model, folder


def inputs(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *shape, generator=g)
    t = torch.tensor([0.3, 0.85])
    text = torch.randn(2, 7, 24, generator=g)
    return x, t, text


@pytest.mark.parametrize("shape", SHAPES)
def test_diffusers_layout_gives_diffusers_output(wan, shape):
    model, folder = wan
    ours = load_dit(folder).eval()
    x, t, text = inputs(shape)
    expected = wan_output(model, x, t, text)
    got = ours_output(ours, x, t, text)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() <= 1e-5
    assert expected.abs().max().item() > 0.1  # not two zeros


@pytest.mark.parametrize("method", ["riflex", "ntk", "pi"])
def test_time_extrapolation_keeps_diffusers_output_at_the_trained_length(wan, method):
    """sample.py --extrapolate on Wan2.1: at the length it trained on, the same output as diffusers' own
    transformer (which has no such option); past it, the time frequencies change and so does the output."""
    from dit3d.rope import TimeScaling

    model, folder = wan
    ours = load_dit(folder).eval()
    x, t, text = inputs((3, 4, 6))
    expected = wan_output(model, x, t, text)
    ours.time_scaling = TimeScaling(method, 3, 3)
    assert (ours_output(ours, x, t, text) - expected).abs().max().item() <= 1e-5
    ours.time_scaling = TimeScaling(method, 3, 12)  # a model trained on 3 latent frames, asked for 12
    assert (ours_output(ours, x, t, text) - expected).abs().max().item() > 1e-3


def to_original(state: dict) -> dict:
    """A diffusers Wan state dict in the original Wan2.1 release's names (written here independently of
    dit3d/wan.py, and checked against diffusers' own converter below)."""
    names = {"condition_embedder.time_embedder.linear_1": "time_embedding.0",
             "condition_embedder.time_embedder.linear_2": "time_embedding.2",
             "condition_embedder.text_embedder.linear_1": "text_embedding.0",
             "condition_embedder.text_embedder.linear_2": "text_embedding.2",
             "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head",
             "attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
             "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "norm2": "norm3"}
    out = {}
    for key, value in state.items():
        if key == "scale_shift_table":
            out["head.modulation"] = value
            continue
        key = key.replace("scale_shift_table", "modulation")
        for theirs, original in names.items():
            key = key.replace(f".{theirs}.", f".{original}.") if not key.startswith(theirs) else original + key[len(theirs):]
        out[key] = value
    return out


def test_original_layout_gives_diffusers_output(wan, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model, _ = wan
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original = to_original(state)
    back = convert_wan_transformer_to_diffusers(dict(original))  # diffusers' converter reads our fixture back
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    folder = tmp_path / "Wan2.1-T2V-tiny"
    folder.mkdir()
    save_file(original, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "model_type": "t2v", "dim": 32, "ffn_dim": 40, "freq_dim": 256, "in_dim": 4,
        "out_dim": 4, "num_heads": 2, "num_layers": 2, "text_len": 512, "text_dim": 24, "eps": 1e-6}))
    ours = load_dit(folder).eval()
    for shape in SHAPES:
        x, t, text = inputs(shape, seed=2)
        assert (ours_output(ours, x, t, text) - wan_output(model, x, t, text)).abs().max().item() <= 1e-5


def test_sharded_diffusers_folder_and_pipeline_folder(tmp_path):
    model = tiny_wan(seed=3)
    model.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    ours = load_dit(tmp_path / "pipe").eval()  # the pipeline folder: its transformer/
    x, t, text = inputs((2, 4, 4))
    assert (ours_output(ours, x, t, text) - wan_output(model, x, t, text)).abs().max().item() <= 1e-5


def test_export_then_import_gives_identical_tensors(wan, tmp_path):
    model, folder = wan
    ours = load_dit(folder)
    save_diffusers(ours, tmp_path / "export")
    again = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "export")
    reference = model.state_dict()
    exported = again.state_dict()
    assert set(exported) == set(reference)
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    back = load_dit(tmp_path / "export").state_dict()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_presets_are_wan_shaped():
    from dit3d.wan import diffusers_config

    for name, layers, heads, ffn in (("1.3B", 30, 12, 8960), ("14B", 40, 40, 13824)):
        c = diffusers_config(preset(name))
        assert (c["num_layers"], c["num_attention_heads"], c["attention_head_dim"], c["ffn_dim"]) == (layers, heads, 128, ffn)


def test_bad_folders_are_one_line_errors(wan, tmp_path):
    model, folder = wan
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(InputError, match="holds a UNet2DModel, neither a DiT checkpoint of ours nor a Wan"):
        load_dit(tmp_path / "neither")
    # weights that do not match their config: a block too few
    cut = tmp_path / "cut"
    cut.mkdir()
    config = json.loads((folder / "config.json").read_text()) | {"num_layers": 3}
    (cut / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cut / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InputError, match=r"do not match its config.json.*missing \['blocks.2"):
        load_dit(cut)
    # no weights at all
    (cut / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights in"):
        load_dit(cut)
    # an image-to-video model
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "config.json").write_text(json.dumps(config | {"image_dim": 1280, "added_kv_proj_dim": 32}))
    with pytest.raises(InputError, match="image-to-video"):
        load_dit(i2v)
    # export of a DiT that is not Wan-shaped
    with pytest.raises(InputError, match="cannot be exported as a Wan transformer.*rope_pairs"):
        save_diffusers(DiT3D.from_preset("tiny"), tmp_path / "x")


def test_the_export_command(wan, tmp_path, capsys):
    from dit3d.to_diffusers import main

    model, folder = wan
    run = tmp_path / "run" / "model"
    save_dit(load_dit(folder), run / "dit")
    assert main([str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    again = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "out")
    exported = {k: v.to(torch.bfloat16) for k, v in again.state_dict().items()}
    assert all(torch.equal(exported[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    (tmp_path / "lora_run" / "model" / "lora").mkdir(parents=True)
    assert main([str(tmp_path / "lora_run"), str(tmp_path / "out2")]) == 2
    assert "holds a LoRA adapter, not a whole DiT" in capsys.readouterr().err
