"""Model checkpoints on disk: `config.json` (the typed config as JSON) beside `model.safetensors`.

No pickle anywhere: configs are plain JSON and weights are safetensors, so a checkpoint can be
inspected, diffed and loaded without running code from it. Both files are written atomically
(temporary file, then rename), so a crash never leaves a half-written checkpoint. `tokenizer` and
`dit3d` both save through here.
"""

from __future__ import annotations

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
