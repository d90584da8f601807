"""A run folder's record and its one writer.

- `RunLock`: one train.py per run folder. Rank 0 holds an advisory lock (flock) on OUT/train.lock for as long as
  it runs; a second train.py on the same --out is refused at start with the holder's pid, host and start time.
  The kernel drops the lock when its process ends however it ends, so a killed run never leaves it stuck.
- `resolve_run`: OUT/config.json records how the run started (its options, model, world size, and an identity
  of each folder it was built from: --vae, --init, --text-encoder) and, in `resumes`, what each resume changed
  and from which step. It is written when the run starts, and on a resume only once the checkpoint has loaded,
  so an invocation that fails changes nothing in it. Options that shape what the model computes (another
  tokenizer, text encoder, initialisation, LoRA, latent normalisation) cannot change on resume: they are refused
  naming the option and the run's value; the others are recorded with the step they took effect.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

from checkpoint_io import check_writable, write_json_atomic
from errors import InputError

from .options import build_parser

log = logging.getLogger("train")

# options that change nothing a run computes: changing them on resume is not worth a warning
COSMETIC = {"no_progress", "wandb", "wandb_project", "wandb_run_name", "log_every", "preview_every", "num_workers"}
# options a resume cannot change: the model would go on in another latent space, on other text, from other
# weights; the folder options are compared by what the folder holds, so a moved folder is still the same one
FOLDERS = ("vae", "init", "text_encoder")
SHAPING = FOLDERS + ("text_padding", "latent_norm", "lora_rank", "lora_alpha", "lora_targets")
LOCK_NAME = "train.lock"


class RunLock:
    """An exclusive lock on OUT/train.lock while this process trains into OUT (see the module's docstring)."""

    def __init__(self, out: Path):
        check_writable(out)  # a read-only or impossible --out is one line before anything is built
        self.path = out / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise InputError(f"{out} is in use by another train.py ({holder}): wait for it to end, or give another "
                             f"--out") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def folder_identity(value: str | None) -> str | None:
    """What a folder option names, independent of where the folder lies: a hash of its files' names, sizes and
    first and last MiB (a run folder stands for its model/); a value that is not a path (a built-in text
    encoder's name) is itself."""
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        return str(value)
    if (path / "model").is_dir():
        path = path / "model"
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


def effective_args(record: dict) -> dict:
    """The options the run has now: those it started with, then each resume's changes in turn."""
    args = dict(record["args"])
    for change in record.get("resumes", []):
        args.update(change["changed"])
    return args


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_run(args, stage, env, resuming: bool) -> tuple[dict, dict | None]:
    """(the run's record, the resume entry to add once the checkpoint loads, or None). Starting (no
    checkpoint yet), OUT/config.json is written now; resuming, it is checked: another stage or model, or a
    changed SHAPING option, is an error; the other changes make the resume entry."""
    out = Path(args.out)
    identity = {k: folder_identity(getattr(args, k, None)) for k in FOLDERS}
    started = json.loads(json.dumps({"args": vars(args), "model": stage.config_dict(), "world_size": env.world,
                                     "identity": identity}, default=str))  # as it reads back from disk
    current = started["args"]
    config_path = out / "config.json"
    old = json.loads(config_path.read_text()) if config_path.is_file() else None
    if old is not None:
        _check_model(old, args, started["model"], out)
    if old is None or not resuming:
        if env.main:
            write_json_atomic(config_path, started, sort_keys=False)
        return started, None
    parser = build_parser()  # an option newer than the run is unchanged where it keeps its default
    before = effective_args(old)
    was = lambda k: before[k] if k in before else json.loads(json.dumps(parser.get_default(k), default=str))  # noqa: E731
    old_identity = old.get("identity", {})
    for key in SHAPING:
        if key in FOLDERS and key in old_identity:
            if old_identity[key] != identity[key]:
                raise InputError(_refusal(key, was(key), current[key], out, moved=True))
        elif was(key) != current[key]:
            raise InputError(_refusal(key, was(key), current[key], out))
    changed = {k: v for k, v in current.items() if was(k) != v and k not in COSMETIC and k not in SHAPING}
    if changed and env.main:
        log.warning("options changed since %s was started: %s", out, ", ".join(sorted(changed)))
    entry = {"changed": changed, "world_size": env.world} if changed or env.world != old.get("world_size") else None
    return old, entry


def _check_model(old: dict, args, model: dict, out: Path) -> None:
    if old["args"]["stage"] != args.stage or old["model"] != model:
        raise InputError(f"{out} holds a {old['args']['stage']} run with another model configuration; give "
                         f"another --out, or the same --stage, --preset and --override to resume it")


def _refusal(key: str, was, now, out: Path, moved: bool = False) -> str:
    what, why = {"vae": ("another tokenizer", ": its latents are another latent space"),
                 "text_encoder": ("another text encoder", ""), "init": ("other starting weights", "")}.get(
        key, ("another setting", ": it changes what the model computes"))
    note = " (a folder may move, but not change)" if moved and Path(str(now)).exists() else ""
    return (f"{_flag(key)} {now} is {what} than {out} was trained with ({_flag(key)} {was}){why}; give that one "
            f"to resume the run{note}, or another --out to start a new one")


def record_resume(record: dict, entry: dict | None, step: int, out: Path, main: bool) -> dict:
    """Add what this resume changed, from `step` on, to the run's record (once its checkpoint has loaded)."""
    if entry is None:
        return record
    record = record | {"resumes": record.get("resumes", []) + [{"step": step} | entry]}
    if main:
        write_json_atomic(out / "config.json", record, sort_keys=False)
    return record
