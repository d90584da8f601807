"""Training checkpoints: OUT/checkpoints/step_NNNNNNNN/ holds the sharded tensors (model, EMA, optimiser and
a stage's own, by torch.distributed.checkpoint), trainer.json (step, samples seen, scheduler) and
rank{r}.json (each rank's RNG states and data-stream position).

What survives what:
- A checkpoint is written into a temporary folder renamed when complete, then `latest` is replaced; trainer.json
  is written last inside it, so a folder holding it is complete. A kill at any moment leaves the previous one.
- An old checkpoint is pruned by first renaming it aside (`.step_N.old`), so a kill while it is deleted
  never leaves a `step_N/` that looks complete without its tensors.
- Resuming tries the newest complete checkpoint first; a damaged one (a truncated shard, garbage metadata or
  JSON) is named in a warning and the next one is tried.
- Loading runs no code from the run folder: the tensors' index and the optimiser's plain values, which
  torch.distributed.checkpoint keeps as pickles, are read by `training.safe_dcp`, which admits only what a
  checkpoint holds; a hostile file is refused, named, and the checkpoint before it tried.
- A full disk: before each checkpoint the free space is checked against the previous checkpoint's size, and a
  write that runs out of space removes its temporary folder; either way one line says so, and the last
  checkpoint is intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from checkpoint_io import write_json_atomic, write_text_atomic
from errors import InputError
from parallel import Env, all_reduce_sum, barrier

from . import safe_dcp

log = logging.getLogger("train")


class Checkpoints:
    def __init__(self, root: Path, env: Env, keep: int):
        self.root, self.env, self.keep = root, env, keep
        if env.main and root.is_dir():  # what a killed save or prune left behind
            for leftover in list(root.glob(".step_*.tmp")) + list(root.glob(".step_*.old")):
                shutil.rmtree(leftover, ignore_errors=True)
        barrier()

    def complete(self) -> list[Path]:
        """The complete checkpoints, newest first."""
        return sorted((p for p in self.root.glob("step_*") if (p / "trainer.json").is_file()), reverse=True)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[0] if done else None

    def save(self, step: int, tensors: dict, trainer_state: dict, rank_state: dict, reserve_bytes: int = 0) -> Path:
        """Write checkpoint `step`; `reserve_bytes` more will be written beside it (the model export), and the
        free space is checked for both against the previous checkpoint's size."""
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        self._check_space(reserve_bytes)
        failed = None
        if self.env.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        try:
            dcp.save(tensors, checkpoint_id=tmp)
            write_json_atomic(tmp / f"rank{self.env.rank}.json", rank_state, indent=None)
        except (Exception, CheckpointException) as e:  # every rank learns that one failed below, and all stop alike
            failed = e
        if all_reduce_sum([float(failed is not None)], self.env.device)[0]:
            if self.env.main:
                shutil.rmtree(tmp, ignore_errors=True)
            if failed is None or out_of_space(failed):
                raise InputError(f"no space left on {mount_point(self.root)} while writing {tmp}; the last "
                                 f"checkpoint is {self.latest() or 'none'}; free some space and run the same "
                                 f"command to resume") from None
            raise failed
        if self.env.main:
            write_json_atomic(tmp / "trainer.json", trainer_state)  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text_atomic(self.root / "latest", name + "\n")
            for old in self.complete()[max(1, self.keep):]:  # the newest is the one just written
                self.remove(old)
        barrier()
        return final

    def set_aside(self, from_step: int) -> list[Path]:
        """Rename the checkpoints of `from_step` on to diverged_step_N (kept for a look; never resumed from) and
        point `latest` at the newest one left. Rank 0 only."""
        aside = []
        for ckpt in self.complete():
            if int(ckpt.name.removeprefix("step_")) >= from_step:
                target = ckpt.with_name("diverged_" + ckpt.name)
                shutil.rmtree(target, ignore_errors=True)
                aside.append(ckpt.rename(target))
        if aside:
            newest = self.latest()
            if newest is None:
                (self.root / "latest").unlink(missing_ok=True)
            else:
                write_text_atomic(self.root / "latest", newest.name + "\n")
        return aside

    def remove(self, path: Path) -> None:
        """Delete a checkpoint: renamed aside first, so that no partly deleted folder looks complete."""
        aside = path.with_name(f".{path.name}.old")
        os.replace(path, aside)
        shutil.rmtree(aside)

    def load(self, path: Path, tensors: dict) -> tuple[dict, dict]:
        """Fills `tensors` in place; returns (trainer state, this rank's state)."""
        safe_dcp.load(tensors, path)
        rank_state = json.loads((path / f"rank{self.env.rank}.json").read_text())
        return json.loads((path / "trainer.json").read_text()), rank_state

    def load_newest(self, tensors_for) -> tuple[Path, dict, dict, dict] | None:
        """(path, tensors, trainer state, rank state) of the newest checkpoint that loads on every rank, or
        None when there is none. `tensors_for()` gives a fresh state dict to fill. A damaged checkpoint is
        named in a warning and the next one tried; if all are damaged, one error names them."""
        damaged = []
        for path in self.complete():
            tensors = tensors_for()
            problem = None
            root_logger = logging.getLogger()  # torch.distributed.checkpoint logs its own tracebacks there
            level = root_logger.level
            root_logger.setLevel(logging.ERROR)
            try:
                trainer_state, rank_state = self.load(path, tensors)
            except (Exception, CheckpointException) as e:  # a damaged file can fail in any way; try the next one
                problem = describe(e)
                if isinstance(e, safe_dcp.UnsafeCheckpointError):  # loading it could run code: never load it
                    problem = f"refused, as loading it could run code: {e}"
            finally:
                root_logger.setLevel(level)
            if not all_reduce_sum([float(problem is not None)], self.env.device)[0]:
                return path, tensors, trainer_state, rank_state
            damaged.append(path.name)
            if self.env.main:
                log.warning("warning: checkpoint %s %s; trying the one before it", path,
                            problem if problem and problem.startswith("refused") else
                            f"is damaged ({problem or 'unreadable on another rank'})")
        if damaged:
            raise InputError(f"every checkpoint in {self.root} is damaged ({', '.join(damaged)}); nothing to resume "
                             f"from: remove them to start afresh, or restore one from a copy")
        return None

    def _check_space(self, reserve_bytes: int) -> None:
        previous = self.latest()
        if previous is None:
            return
        need = folder_bytes(previous) + reserve_bytes
        free = shutil.disk_usage(self.root).free
        short = all_reduce_sum([float(free < need)], self.env.device)[0]
        if short:
            raise InputError(f"no space left on {mount_point(self.root)} for the next checkpoint: "
                             f"{free / 2**20:.0f} MB free, the last one took {need / 2**20:.0f} MB; the last "
                             f"checkpoint is {previous}; free some space and run the same command to resume")


def describe(e: BaseException) -> str:
    """`Type: first line of the message`, looking through CheckpointException to the failure it wraps."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def out_of_space(e: BaseException) -> bool:
    """Whether an exception (or one it wraps, as torch.distributed.checkpoint does) is a full disk."""
    seen, todo = set(), [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "unexpected pos" in str(e):  # the latter: torch's zip writer
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def rng_state(device: torch.device) -> dict:
    """Every random stream a rank draws from (torch, Python, NumPy, CUDA) as JSON-able lists, each with its
    position, so that a resumed run draws the numbers the uninterrupted one would have."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
