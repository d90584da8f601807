"""Wan2.1's text-to-video transformer in DiT3D's names: a state-dict adapter, as torchtitan's are.

    cfg = config_from_diffusers(json)               # a WanTransformer3DModel config.json as our DiTConfig
    ours = diffusers_to_ours(state, cfg)            # their tensors under our names (and reshapes)
    theirs = ours_to_diffusers(ours, cfg)           # and back
    original_to_diffusers(state)                    # the original release's names as diffusers'

This module maps names and configs and never imports the model, nor reads or writes a file: the folders
(either layout in, the diffusers layout out) are dit3d/checkpoint.py's, and the export command is
`python -m dit3d.to_diffusers`.

The two models compute the same function once the config says what Wan does differently from our defaults
(`config.WAN`): a Conv3d patch embedding, RMS norm of queries and keys over the whole width, rotary pairs of
adjacent channels, and the output layer's shift and scale as a learned table plus the time embedding.
The rest is renaming, with three reshapes:
- our self-attention projects q, k and v with one fused linear map (rows q, then k, then v), and our
  cross-attention k and v with one: diffusers' to_q / to_k / to_v are its row blocks;
- our output layer's rows are ordered (channel, pt, ph, pw), Wan's (pt, ph, pw, channel);
- Wan has no learned "no caption" token (it guides with an encoded negative prompt): `null_text` starts at zero.

Layouts on disk:
- diffusers: `config.json` with "_class_name": "WanTransformer3DModel" and `diffusion_pytorch_model.safetensors`
  (or shards listed in `diffusion_pytorch_model.safetensors.index.json`); a whole diffusers pipeline folder
  (model_index.json) is read from its `transformer/`.
- original (the Wan2.1 release): `config.json` with "_class_name": "WanModel" (dim, ffn_dim, num_heads, ...),
  the same file names, keys such as `blocks.0.self_attn.q.weight` and `head.modulation`.

Only the text-to-video transformers load: image-to-video models (an image encoder's tokens beside the text)
and configs without the cross-attention norm are refused with a message that says so. Nothing is
downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from einops import rearrange

from errors import InputError

from .config import WAN, DiTConfig

DIFFUSERS_CLASS = "WanTransformer3DModel"
ORIGINAL_CLASS = "WanModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"

# original Wan2.1 name -> diffusers name, per piece of a key (the order matters: norm2 and norm3 swap)
_ORIGINAL_TO_DIFFUSERS = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"\.self_attn\.", ".attn1."),
    (r"\.cross_attn\.", ".attn2."),
    (r"\.(attn[12])\.([qkv])\.", r".\1.to_\2."),
    (r"\.(attn[12])\.o\.", r".\1.to_out.0."),
    (r"\.modulation$", ".scale_shift_table"),
    (r"\.ffn\.0\.", ".ffn.net.0.proj."),
    (r"\.ffn\.2\.", ".ffn.net.2."),
    (r"\.norm3\.", ".norm2."),  # Wan's cross-attention norm is norm3; diffusers calls it norm2
]


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original Wan2.1 state dict's keys to diffusers' (tensors unchanged)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("model.diffusion_model.")
        for pattern, replacement in _ORIGINAL_TO_DIFFUSERS:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


# ---- configs ----------------------------------------------------------------------------------------

def config_from_diffusers(c: dict, where: Path) -> DiTConfig:
    """Our config for a WanTransformer3DModel config.json."""
    if c.get("image_dim") or c.get("added_kv_proj_dim"):
        raise InputError(f"{where} holds an image-to-video Wan transformer (image_dim {c.get('image_dim')}); only "
                         f"the text-to-video ones load into DiT3D")
    if not c.get("cross_attn_norm", True) or c.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
        raise InputError(f"{where}: a Wan transformer with cross_attn_norm={c.get('cross_attn_norm')} and "
                         f"qk_norm={c.get('qk_norm')!r} cannot be expressed by DiTConfig (the released ones have True "
                         f"and 'rms_norm_across_heads')")
    if c.get("freq_dim", 256) != 256:
        raise InputError(f"{where}: freq_dim {c['freq_dim']} is not supported (DiT3D's time features are 256 wide, as "
                         f"every released Wan model's)")
    heads, head_dim = int(c.get("num_attention_heads", 40)), int(c.get("attention_head_dim", 128))
    return _config(width=heads * head_dim, heads=heads, depth=int(c.get("num_layers", 40)),
                   ffn=int(c.get("ffn_dim", 13824)), in_channels=int(c.get("in_channels", 16)),
                   out_channels=int(c.get("out_channels") or c.get("in_channels", 16)),
                   text_dim=int(c.get("text_dim", 4096)), patch=tuple(c.get("patch_size", (1, 2, 2))),
                   eps=float(c.get("eps", 1e-6)))


def config_from_original(c: dict, where: Path) -> DiTConfig:
    """Our config for an original Wan2.1 config.json (WanModel: dim, ffn_dim, num_heads, ...)."""
    if c.get("model_type", "t2v") != "t2v":
        raise InputError(f"{where} holds a Wan {c.get('model_type')!r} model; only text-to-video ('t2v') ones load "
                         f"into DiT3D")
    if not c.get("cross_attn_norm", True) or not c.get("qk_norm", True) or c.get("freq_dim", 256) != 256:
        raise InputError(f"{where}: cross_attn_norm, qk_norm and freq_dim must be True, True and 256 (as in every "
                         f"released Wan2.1 text-to-video model) to load into DiT3D")
    width = int(c.get("dim", 2048))
    return _config(width=width, heads=int(c.get("num_heads", 16)), depth=int(c.get("num_layers", 32)),
                   ffn=int(c.get("ffn_dim", 8192)), in_channels=int(c.get("in_dim", 16)),
                   out_channels=int(c.get("out_dim", 16)), text_dim=int(c.get("text_dim", 4096)),
                   patch=tuple(c.get("patch_size", (1, 2, 2))), eps=float(c.get("eps", 1e-6)))


def _config(width, heads, depth, ffn, in_channels, out_channels, text_dim, patch, eps) -> DiTConfig:
    return DiTConfig(in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, width=width, depth=depth,
                     heads=heads, patch_size=patch, mlp_ratio=ffn / width, mlp="gelu", norm_eps=eps, **WAN)


def incompatibilities(cfg: DiTConfig) -> list[str]:
    """What keeps `cfg` from being a Wan transformer (empty when it is one)."""
    want = dict(WAN, mlp="gelu", qk_norm=True, rope_theta=10000.0, frame_conditioning=False, absolute_position=False)
    return [f"{k}={getattr(cfg, k)!r} (Wan: {v!r})" for k, v in want.items() if getattr(cfg, k) != v]


def diffusers_config(cfg: DiTConfig) -> dict:
    """The WanTransformer3DModel config.json of a Wan-compatible DiTConfig."""
    problems = incompatibilities(cfg)
    if problems:
        raise InputError("this DiT cannot be exported as a Wan transformer: " + ", ".join(problems))
    return {"_class_name": DIFFUSERS_CLASS, "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.heads,
            "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_channels, "out_channels": cfg.output_channels,
            "text_dim": cfg.text_dim, "freq_dim": 256, "ffn_dim": int(cfg.width * cfg.mlp_ratio + 1e-6),
            "num_layers": cfg.depth, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": cfg.norm_eps,
            "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


# ---- weights ----------------------------------------------------------------------------------------

# our embedding layers -> diffusers' (the same linear maps, renamed)
_EMBEDDINGS = (("time_embed.0", "condition_embedder.time_embedder.linear_1"),
               ("time_embed.2", "condition_embedder.time_embedder.linear_2"),
               ("time_modulation.1", "condition_embedder.time_proj"),
               ("text_embed.0", "condition_embedder.text_embedder.linear_1"),
               ("text_embed.2", "condition_embedder.text_embedder.linear_2"))


def _out_rows(cfg: DiTConfig, to_ours: bool):
    """Reorders the output layer's rows between Wan's (pt, ph, pw, c) and our (c, pt, ph, pw)."""
    pt, ph, pw = cfg.patch_size
    wan, ours = "(pt ph pw c) ...", "(c pt ph pw) ..."
    pattern = f"{wan} -> {ours}" if to_ours else f"{ours} -> {wan}"
    return lambda w: rearrange(w, pattern, pt=pt, ph=ph, pw=pw)


def diffusers_to_ours(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A WanTransformer3DModel state dict as DiT3D's (pops what it converts; what is left over stays in `state`)."""
    take = state.pop
    out = {"embed.weight": take("patch_embedding.weight"), "embed.bias": take("patch_embedding.bias")}
    for ours, theirs in _EMBEDDINGS:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    for i in range(cfg.depth):
        b, d = f"blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[b + f"attn.qkv.{p}"] = torch.cat([take(d + f"attn1.to_{x}.{p}") for x in "qkv"])
            out[b + f"attn.proj.{p}"] = take(d + f"attn1.to_out.0.{p}")
            out[b + f"norm_cross.{p}"] = take(d + f"norm2.{p}")
            out[b + f"cross.q.{p}"] = take(d + f"attn2.to_q.{p}")
            out[b + f"cross.kv.{p}"] = torch.cat([take(d + f"attn2.to_{x}.{p}") for x in "kv"])
            out[b + f"cross.proj.{p}"] = take(d + f"attn2.to_out.0.{p}")
            out[b + f"mlp.fc1.{p}"] = take(d + f"ffn.net.0.proj.{p}")
            out[b + f"mlp.fc2.{p}"] = take(d + f"ffn.net.2.{p}")
        for attn, ours in (("attn1", "attn"), ("attn2", "cross")):
            out[b + f"{ours}.q_norm.weight"] = take(d + f"{attn}.norm_q.weight")
            out[b + f"{ours}.k_norm.weight"] = take(d + f"{attn}.norm_k.weight")
        out[b + "modulation"] = take(d + "scale_shift_table")
    out["out_table"] = take("scale_shift_table")
    rows = _out_rows(cfg, to_ours=True)
    out["out.weight"], out["out.bias"] = rows(take("proj_out.weight")), rows(take("proj_out.bias"))
    return out


def ours_to_diffusers(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """DiT3D's state dict (Wan-compatible config) as a WanTransformer3DModel's."""
    s, w = state, cfg.width
    out = {"patch_embedding.weight": s["embed.weight"], "patch_embedding.bias": s["embed.bias"]}
    for ours, theirs in _EMBEDDINGS:
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = s[f"{ours}.{p}"]
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        for p in ("weight", "bias"):
            for x, part in zip("qkv", s[b + f"attn.qkv.{p}"].split(w)):
                out[b + f"attn1.to_{x}.{p}"] = part
            out[b + f"attn1.to_out.0.{p}"] = s[b + f"attn.proj.{p}"]
            out[b + f"norm2.{p}"] = s[b + f"norm_cross.{p}"]
            out[b + f"attn2.to_q.{p}"] = s[b + f"cross.q.{p}"]
            for x, part in zip("kv", s[b + f"cross.kv.{p}"].split(w)):
                out[b + f"attn2.to_{x}.{p}"] = part
            out[b + f"attn2.to_out.0.{p}"] = s[b + f"cross.proj.{p}"]
            out[b + f"ffn.net.0.proj.{p}"] = s[b + f"mlp.fc1.{p}"]
            out[b + f"ffn.net.2.{p}"] = s[b + f"mlp.fc2.{p}"]
        for attn, ours in (("attn1", "attn"), ("attn2", "cross")):
            out[b + f"{attn}.norm_q.weight"] = s[b + f"{ours}.q_norm.weight"]
            out[b + f"{attn}.norm_k.weight"] = s[b + f"{ours}.k_norm.weight"]
        out[b + "scale_shift_table"] = s[b + "modulation"]
    out["scale_shift_table"] = s["out_table"]
    rows = _out_rows(cfg, to_ours=False)
    out["proj_out.weight"], out["proj_out.bias"] = rows(s["out.weight"]), rows(s["out.bias"])
    return {k: v.contiguous() for k, v in out.items()}
