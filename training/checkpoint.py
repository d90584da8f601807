"""Training checkpoints: OUT/checkpoints/step_NNNNNNNN/ holds the sharded tensors (model, EMA, optimiser and
a stage's own, by torch.distributed.checkpoint), trainer.json (step, samples seen, scheduler) and
rank{r}.json (each rank's RNG states and data-stream position).

Each is written into a temporary folder that is renamed when complete, then `latest` is replaced: a killed
run leaves the last checkpoint intact. trainer.json is written last, so a folder holding it is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from checkpoint_io import write_json_atomic, write_text_atomic
from parallel import Env, barrier


class Checkpoints:
    def __init__(self, root: Path, env: Env, keep: int):
        self.root, self.env, self.keep = root, env, keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / "trainer.json").is_file():
                return path
        done = sorted(p for p in self.root.glob("step_*") if (p / "trainer.json").is_file())
        return done[-1] if done else None

    def save(self, step: int, tensors: dict, trainer_state: dict, rank_state: dict) -> Path:
        name = f"step_{step:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.env.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        dcp.save(tensors, checkpoint_id=tmp)
        write_json_atomic(tmp / f"rank{self.env.rank}.json", rank_state, indent=None)
        barrier()
        if self.env.main:
            write_json_atomic(tmp / "trainer.json", trainer_state)  # last: marks it complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            write_text_atomic(self.root / "latest", name + "\n")
            for old in sorted(self.root.glob("step_*"))[: -max(1, self.keep)]:  # the newest is the one just written
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    def load(self, path: Path, tensors: dict) -> tuple[dict, dict]:
        """Fills `tensors` in place; returns (trainer state, this rank's state)."""
        dcp.load(tensors, checkpoint_id=path)
        rank_state = json.loads((path / f"rank{self.env.rank}.json").read_text())
        return json.loads((path / "trainer.json").read_text()), rank_state


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
