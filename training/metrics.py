"""Metrics: OUT/metrics.jsonl on rank 0, and wandb when enabled (online with WANDB_API_KEY, else offline)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from checkpoint_io import write_text_atomic
from parallel import Env

log = logging.getLogger("train")


class MetricsLog:
    def __init__(self, path: Path, env: Env, args, resolved: dict, resumed_step: int):
        self.path, self.env, self.wandb = path, env, None
        if not env.main:
            return
        if path.is_file():  # a resumed run: drop what an interrupted run logged after its last checkpoint
            write_text_atomic(path, "".join(line + "\n" for line in path.read_text().splitlines()
                                            if _step(line) is not None and _step(line) <= resumed_step))
        mode = args.wandb
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        if mode != "disabled":
            try:
                import wandb  # here, not at the top: it takes a second to import, and most test runs disable it

                id_file = path.parent / "wandb_id"
                run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
                write_text_atomic(id_file, run_id)
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_run_name, dir=str(path.parent),
                                        config=resolved, mode=mode, id=run_id, resume="allow")
            except Exception as e:  # logging must never stop training
                log.warning("wandb could not start (%s: %s); logging to %s only", type(e).__name__, e, path)

    def write(self, record: dict, videos: list[Path] = ()) -> None:
        if not self.env.main:
            return
        if videos:
            record = record | {"previews": [str(v) for v in videos]}
        with self.path.open("a") as f:  # appended line by line: a kill loses at most the last, partial, line
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            import wandb

            try:
                data = {k: v for k, v in record.items() if k not in ("step", "previews")}
                data |= {f"preview/{Path(p).stem}": wandb.Video(str(p), format="mp4") for p in videos}
                self.wandb.log(data, step=record["step"])
            except Exception as e:  # logging must never stop training
                log.warning("wandb logging failed (%s: %s); metrics go on to %s", type(e).__name__, e, self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _step(line: str) -> int | None:
    """The step of a metrics line; None for a line a kill cut short."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None
