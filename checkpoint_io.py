"""Files that are never half-written, and model folders: `config.json` (the typed config as JSON) beside
`model.safetensors`.

Every file we write goes through `atomic_path`: it is written under a temporary name in the same folder and
renamed over its final name only when complete, so a crash leaves the old file or the new one, never a
torn one, and no temporary is left behind when the write fails. Files keep the user's umask, as any other
tool's do.

No pickle in a model folder: configs are plain JSON and weights are safetensors, so a model can be inspected,
diffed and loaded without running code from it. (Training checkpoints are torch.distributed.checkpoint folders,
whose index torch writes as a pickle; `training.safe_dcp` reads it admitting only a checkpoint's own classes.) This module needs only torch and safetensors, so `dit3d`
and `tokenizer` save and load through it without importing the data stack (PyAV, webdataset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import InputError, MissingInputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed over `path` when the block ends without an error,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():  # some writers (safetensors) create their files -rw------- whatever the umask
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    try:  # read, not set: os.umask can only be read by changing it, which would race with other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and write (then remove) a file in it, so that a command learns that its output
    cannot be written before it computes anything; an InputError says why."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".write-test") as tmp:
            tmp.write_bytes(b"")
        (folder / ".write-test").unlink()
    except OSError as e:
        raise InputError(f"cannot write to {folder} ({e.strerror or e}): give an output folder you can write to") from None
    return folder


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it (a report's plots are made once, then freed)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 2, sort_keys: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder `new` in the place of `target` (a sibling): the old folder moves aside, `new`
    takes its name, then the old one is deleted. Readers see the old folder or the new one, never a mix; a
    kill between the two renames leaves the old one aside, which `recover_folder` puts back."""
    new, target = Path(new), Path(target)
    aside = target.with_name(f".{target.name}.old")
    recover_folder(target)
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def recover_folder(target: str | os.PathLike) -> None:
    """Undo a `replace_folder` killed between its renames: the old folder goes back where it was."""
    target = Path(target)
    aside = target.with_name(f".{target.name}.old")
    if not target.exists() and aside.is_dir():
        os.replace(aside, target)


def save_checkpoint(directory: str | os.PathLike, config: dict, state_dict: dict[str, torch.Tensor], kind: str,
                    step: int | None = None) -> Path:
    """Write `config` (with `kind`, and the training `step` the weights are from, recorded) and the weights into
    `directory`; the config last, so a folder with a config is complete."""
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": kind})
    record = {"kind": kind, "config": config} | ({} if step is None else {"step": step})
    write_json_atomic(directory / CONFIG_NAME, record)
    return directory


def model_folder(path: str | os.PathLike) -> Path:
    """The folder holding config.json for `path`: itself, or a train.py run folder's `model/`, so that every
    option taking a trained model takes either."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() and (path / "model" / WEIGHTS_NAME).is_file():
        return path / "model"  # a run folder: its own config.json is the run's, not a model's
    return path


def dit_folder(path: str | os.PathLike) -> Path:
    """The DiT folder of a trained model: a train.py run's model/dit/, a model folder's dit/, or `path` itself."""
    path = Path(path)
    for folder in (path / "model" / "dit", path / "dit"):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return path


def checkpoint_step(directory: str | os.PathLike) -> int | None:
    """The training step recorded with a checkpoint (None where none was)."""
    try:
        return json.loads((Path(directory) / CONFIG_NAME).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(directory: str | os.PathLike, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) from `directory` (or the `model/` folder of a run folder); a one-line error
    says what is missing or wrong."""
    directory = model_folder(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise MissingInputError(f"no {kind} checkpoint at {directory}: the directory does not exist")
    for exported in (directory, directory / "model"):
        if kind != "dit" and (exported / "pipeline.json").is_file():  # a train.py DiT run or its model/
            hint = f"; the tokenizer it was trained with is {exported / kind}" if (exported / kind / CONFIG_NAME).is_file() else ""
            raise InputError(f"{directory} is a trained text-to-video model (a DiT run), not a {kind} checkpoint: give "
                             f"a {kind} run folder{hint}")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInputError(f"incomplete {kind} checkpoint at {directory}: {path.name} is missing "
                                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME}; give the folder that holds them, "
                                    f"or the train.py run folder whose model/ does)")
    try:
        record = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path} is not valid JSON ({e}): re-export the checkpoint or pick another") from None
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else None
        raise InputError(f"{directory} holds a {found!r} checkpoint, not a {kind!r} one")
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as e:
        raise InputError(f"{weights_path} cannot be read ({e}): the file is damaged or truncated; re-export the "
                         f"checkpoint or pick another") from None
    return record["config"], weights


def config_from_dict(config_cls, d: dict, what: str):
    """A config dataclass from its JSON dict; unknown fields are an error that lists the known ones."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"unknown {what} config fields {unknown}; known: {sorted(known)}")
    return config_cls(**d)


def preset_config(presets: dict, name: str, overrides: dict, what: str):
    """presets[name] with some fields replaced; an unknown preset or field is an InputError listing the known."""
    if name not in presets:
        raise InputError(f"unknown {what} preset {name!r}; choose one of {', '.join(presets)}")
    known = {f.name for f in dataclasses.fields(presets[name])}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InputError(f"unknown {what} config field(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(presets[name], **overrides)


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
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"the weights in {model_folder(directory) / WEIGHTS_NAME} do not match their config: missing "
                         f"{sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                         f"{sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return model.to(map_location)
