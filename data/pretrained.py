"""Model checkpoints on disk: `config.json` (the typed config as JSON) beside `model.safetensors`.

No pickle anywhere: configs are plain JSON and weights are safetensors, so a checkpoint can be
inspected, diffed and loaded without running code from it. Both files are written atomically
(temporary file, then rename), so a crash never leaves a half-written checkpoint. `tokenizer` and
`dit3d` both save through here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_checkpoint(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor], kind: str) -> Path:
    """Write `config` (with `kind` recorded) and the weights into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(tmp_weights), metadata={"kind": kind})
    tmp_config = directory / f".{CONFIG_NAME}.tmp"
    tmp_config.write_text(json.dumps({"kind": kind, "config": config}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)  # last: a directory with a config is complete
    return directory


def load_checkpoint(directory: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from `directory`; a one-line error says what is missing or wrong."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"no {kind} checkpoint at {directory}: the directory does not exist")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"incomplete {kind} checkpoint at {directory}: {path.name} is missing "
                                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        record = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if record.get("kind") != kind:
        raise ValueError(f"{directory} holds a {record.get('kind')!r} checkpoint, not a {kind!r} one")
    return record["config"], load_file(str(weights_path))


def config_from_dict(config_cls, d: dict, what: str):
    """A config dataclass from its JSON dict; unknown fields are an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config fields {unknown}; known: {sorted(known)}")
    return config_cls(**d)


def save_model(model, directory: str | os.PathLike, kind: str) -> Path:
    """Save a module whose `config` is a dataclass."""
    return save_checkpoint(directory, dataclasses.asdict(model.config), model.state_dict(), kind)


def load_model(model_cls, config_cls, directory: str | os.PathLike, kind: str, map_location="cpu"):
    """Build `model_cls(config)` from a checkpoint written by `save_model` and load its weights.

    The constructor's random initialisation (overwritten by the checkpoint) runs on a forked generator, so
    loading a model never moves torch's global random state: a DiT built after loading its tokenizer gets
    the same initial weights from the same seed whatever the tokenizer's architecture."""
    config, state = load_checkpoint(directory, kind)
    from_dict = getattr(config_cls, "from_dict", None)
    with torch.random.fork_rng(devices=[]):
        model = model_cls(from_dict(config) if from_dict else config_from_dict(config_cls, config, kind))
    model.load_state_dict(state)
    return model.to(map_location)
