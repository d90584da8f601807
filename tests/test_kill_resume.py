"""kill -9 at random moments: a 2-process DiT run killed 20 times, each time resumed, must end with the
uninterrupted run's loss curve and weights, and model/ must be one step's whole export after every kill.
Slow (a few minutes): `python -m pytest -m slow tests/test_kill_resume.py`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.common import free_port
from data.synthetic import SyntheticSpec, generate
from tokenizer import CausalVAE, save_vae

ROOT = Path(__file__).resolve().parents[1]
KILLS = 20


def command(shards: Path, vae: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(ROOT / "train.py"), "--stage", "dit", "--data", str(shards), "--vae", str(vae), "--out", str(out),
            "--frames", "5", "--size", "32", "--steps", "8", "--batch-size", "2", "--num-workers", "1",
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--log-every", "1", "--preview-steps", "1",
            "--warmup", "2", "--lr", "1e-3", "--wandb", "disabled", "--no-progress"]


def export_steps(model: Path) -> set:
    """The steps that model/'s parts say they are from (empty when there is no model/ yet)."""
    if not model.exists():
        return set()
    return {json.loads((model / "pipeline.json").read_text())["step"],
            *(json.loads((model / part / "config.json").read_text())["step"] for part in ("dit", "text"))}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def kill_run(proc: subprocess.Popen, run: Path) -> None:
    """SIGKILL to torchrun's process group and to every process training into `run`: torchrun starts each rank in
    a session of its own, so killing its group alone left the ranks running on, orphaned."""
    ranks = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--out" in args and args.index(b"--out") + 1 < len(args) and args[args.index(b"--out") + 1] == bytes(run):
            ranks.append(int(cmdline.parent.name))
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_run_killed_twenty_times_ends_as_the_uninterrupted_one(tmp_path):
    shards = tmp_path / "shards"
    generate(shards, 16, SyntheticSpec(frames=9, size=32), seed=0, shard_size=4)
    vae = tmp_path / "vae"
    torch.manual_seed(0)
    tokenizer = CausalVAE.from_preset("tiny")
    tokenizer.set_latent_stats(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 2.0, 16))
    save_vae(tokenizer, vae)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    started = time.perf_counter()
    whole = subprocess.run(command(shards, vae, tmp_path / "whole"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    duration = time.perf_counter() - started

    rng, kills, runs, landed = random.Random(0), 0, 0, []
    while kills < KILLS:  # runs that finish before the next kill are checked, and a fresh one is started
        run = tmp_path / f"killed_{runs}"
        while kills < KILLS:
            proc = subprocess.Popen(command(shards, vae, run), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=rng.uniform(0.25 * duration, 0.8 * duration))
                break  # finished before the kill
            except subprocess.TimeoutExpired:
                kill_run(proc, run)  # torchrun and both ranks at once
                proc.wait()
            kills += 1
            done = sorted((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else []
            landed.append(done[-1].name if done else "before the first checkpoint")
            assert len(export_steps(run / "model")) <= 1, f"model/ mixes steps after kill {kills}"
        final = subprocess.run(command(shards, vae, run), env=env, cwd=ROOT, capture_output=True, text=True)
        assert final.returncode == 0, final.stderr[-3000:]
        check_equal(tmp_path / "whole", run)
        runs += 1
    print(f"{kills} kills over {runs} runs; the newest checkpoint at each kill: {landed}")


def check_equal(reference_run: Path, run: Path) -> None:
    reference, resumed = losses(reference_run), losses(run)
    assert resumed.keys() == reference.keys() == set(range(1, 9))
    assert [resumed[k] for k in range(1, 9)] == pytest.approx([reference[k] for k in range(1, 9)], rel=1e-5)
    for part in ("dit", "text"):
        a = load_file(reference_run / "model" / part / "model.safetensors")
        b = load_file(run / "model" / part / "model.safetensors")
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert export_steps(run / "model") == {8}
