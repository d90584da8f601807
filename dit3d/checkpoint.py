"""DiT3D folders: ours (`config.json` + `model.safetensors`), and Wan2.1's transformer in either of its layouts.

    model = load_dit("runs/dit/model/dit")                  # ours, a train.py run folder, or a Wan folder
    model = load_dit("Wan2.1-T2V-1.3B-Diffusers")           # a diffusers pipeline folder: its transformer/
    save_dit(model, "out/")                                 # our folder
    save_diffusers(model, "out/transformer")                # a Wan-compatible DiT as a WanTransformer3DModel

The model file holds the model and nothing else; reading and writing its folders is here, with the Wan names
mapped by dit3d/wan.py (which imports neither this module nor the model). Layouts on disk:
- ours: `config.json` with "kind": "dit" and our `DiTConfig`, beside `model.safetensors`;
- diffusers: `config.json` with "_class_name": "WanTransformer3DModel" and `diffusion_pytorch_model.safetensors`
  (or shards listed in `diffusion_pytorch_model.safetensors.index.json`); a whole diffusers pipeline folder
  (model_index.json) is read from its `transformer/`;
- original (the Wan2.1 release): `config.json` with "_class_name": "WanModel" (dim, ffn_dim, num_heads, ...), the
  same file names, keys such as `blocks.0.self_attn.q.weight` and `head.modulation`.
Nothing is downloaded; a missing file is an error naming its path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint_io import CONFIG_NAME, atomic_path, load_model, save_model, write_json_atomic
from errors import InputError, MissingInputError

from .config import DiTConfig
from .model import DiT3D
from .wan import (DIFFUSERS_CLASS, INDEX, ORIGINAL_CLASS, WEIGHTS, config_from_diffusers, config_from_original,
                  diffusers_config, diffusers_to_ours, original_to_diffusers, ours_to_diffusers)


def load_dit(directory, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> DiT3D:
    """Our checkpoint folder (or a train.py run folder), or Wan2.1's transformer in the diffusers or the original
    layout (a diffusers Wan pipeline folder too: its transformer/), cast to `dtype`."""
    if not wan_format(directory):
        return load_model(DiT3D, DiTConfig, directory, kind="dit", map_location=map_location)
    cfg, state = load_wan(directory, dtype)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (14B: 56 GB)
        model = DiT3D(cfg)
    state["null_text"] = torch.zeros(1, cfg.text_dim, dtype=state["out_table"].dtype)  # Wan has none
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(map_location)


def save_dit(model: DiT3D, directory) -> Path:
    """Our folder: config.json + model.safetensors."""
    return save_model(model, directory, kind="dit")


def wan_format(directory: str | Path) -> str | None:
    """'diffusers' or 'original' when `directory` holds a Wan transformer (or is a diffusers pipeline folder
    with one in transformer/), else None."""
    directory = _transformer_folder(Path(directory))
    config = _read_config(directory) if (directory / CONFIG_NAME).is_file() else {}
    name = config.get("_class_name")
    if name == DIFFUSERS_CLASS:
        return "diffusers"
    if name == ORIGINAL_CLASS or ("dim" in config and "num_heads" in config and "kind" not in config):
        return "original"
    if name is not None:
        raise InputError(f"{directory} holds a {name}, neither a DiT checkpoint of ours nor a Wan transformer "
                         f"(\"_class_name\": \"{DIFFUSERS_CLASS}\" or \"{ORIGINAL_CLASS}\")")
    return None


def _transformer_folder(directory: Path) -> Path:
    if (directory / "model_index.json").is_file() and (directory / "transformer").is_dir():
        return directory / "transformer"
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} is not a model config (a JSON object)")
    return config


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers-named safetensors checkpoint: one file, or the shards its index lists."""
    index = directory / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise InputError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        if len(found) != 1:
            raise MissingInputError(f"no weights in {directory}: expected {WEIGHTS} or {INDEX} with its shards"
                                    + (f" (found {', '.join(found)})" if found else ""))
        files = found
    state = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise MissingInputError(f"{path} is missing (listed in {index.name})")
        try:
            state.update(load_file(str(path)))
        except SafetensorError as e:
            raise InputError(f"{path} cannot be read ({e}): the file is damaged or truncated") from None
    return state


def load_wan(directory: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(our config, our state dict) of the Wan transformer in `directory` (either layout), cast to `dtype`
    (None: as stored). Keys the config does not expect, or that it expects and are missing, are an InputError
    listing them, in the folder's own names."""
    root = Path(directory)
    directory = _transformer_folder(root)
    layout = wan_format(directory)
    if layout is None:
        raise InputError(f"{root} holds no Wan transformer: expected a config.json with \"_class_name\": "
                         f"\"{DIFFUSERS_CLASS}\" (diffusers) or \"{ORIGINAL_CLASS}\" (the original Wan2.1 release)")
    config = _read_config(directory)
    cfg = (config_from_diffusers if layout == "diffusers" else config_from_original)(config, directory)
    state = read_weights(directory)
    if layout == "original":
        state = original_to_diffusers(state)
    with torch.device("meta"):  # the names and shapes the config expects, without allocating them
        expected = {k: tuple(v.shape) for k, v in ours_to_diffusers(DiT3D(cfg).state_dict(), cfg).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("norm_added_q.weight"))
    wrong = sorted(f"{k} {tuple(state[k].shape)} (expected {expected[k]})" for k in set(expected) & set(state)
                   if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        show = lambda xs: f"{xs[:6]}{' ...' if len(xs) > 6 else ''}"  # noqa: E731
        raise InputError(f"the weights in {directory} do not match its config.json ({layout} layout): missing "
                         f"{show(missing)}, unexpected {show(unexpected)}, wrong shapes {show(wrong)}")
    ours = diffusers_to_ours(state, cfg)
    if dtype is not None:
        ours = {k: v.to(dtype) for k, v in ours.items()}
    return cfg, ours


def save_diffusers(model: DiT3D, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a Wan-compatible DiT3D as a WanTransformer3DModel folder (config.json + safetensors), which
    `WanTransformer3DModel.from_pretrained` and our `load_dit` both load. The weights are written first and the
    config last, each atomically, so a folder with a config is complete."""
    directory = Path(directory)
    cfg = model.config
    config = diffusers_config(cfg)
    state = ours_to_diffusers({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    state = {k: (v if dtype is None else v.to(dtype)).cpu().contiguous() for k, v in state.items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json_atomic(directory / CONFIG_NAME, config)
    return directory
