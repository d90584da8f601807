"""One train.py per run folder, a record of how the run started that no failed invocation rewrites, resumes
that refuse another model's options, and Ctrl-C that keeps the work: each as a user meets it, in real
processes where it takes two."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from training.run_folder import LOCK_NAME, effective_args

from .test_reliability import FAST, dit, errors_in, shards, vae_run  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parents[1]


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended first:\n{proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def test_a_second_train_on_the_same_out_is_refused_and_a_killed_one_leaves_no_lock(shards, vae_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = dit(shards, vae_run, run, "--steps", "100000", "--checkpoint-every", "0")
    first = _start(args)
    try:
        _wait_for(lambda: len(_steps_logged(run)) >= 1, first)
        second = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert second.returncode == 2
        line, = errors_in(second.stderr)
        assert line.startswith(f"error: {run} is in use by another train.py (pid {first.pid} on ")
        assert line.endswith("): wait for it to end, or give another --out")
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.communicate()
    assert (run / LOCK_NAME).is_file()
    steps = _steps_logged(run)
    assert steps == sorted(set(steps))  # one writer: no step twice
    assert train.main(dit(shards, vae_run, run, "--steps", "2", "--checkpoint-every", "0")) == 0


def test_ctrl_c_writes_a_checkpoint_says_one_line_and_the_run_resumes(shards, vae_run, tmp_path):  # noqa: F811
    """SIGINT to the whole process group, as a terminal sends it, decoding workers included."""
    run = tmp_path / "run"
    args = dit(shards, vae_run, run, "--steps", "100000", "--checkpoint-every", "0", "--num-workers", "2")
    proc = _start(args, start_new_session=True)
    try:
        _wait_for(lambda: len(_steps_logged(run)) >= 2, proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and last.endswith(
        " (Ctrl-C): checkpoint written; run the same command to resume")
    step = int(last.split()[3])
    assert (run / "checkpoints" / f"step_{step:08d}" / "trainer.json").is_file()
    assert json.loads((run / "model" / "pipeline.json").read_text())["step"] == step
    resumed = subprocess.run([sys.executable, "train.py", *args[:-4], "--steps", str(step + 1)], cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {step} of {step + 1}" in resumed.stderr


@pytest.fixture(scope="module")
def other_vae(shards, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("vae2") / "run"
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(out), "--steps", "1", "--seed", "1",
                       "--pca-init-clips", "0", "--stats-batches", "1", *FAST]) == 0
    return out


def test_a_resume_refuses_another_model_and_records_the_other_changes(shards, vae_run, other_vae, tmp_path, capsys,  # noqa: F811
                                                                       monkeypatch):
    run = tmp_path / "run"
    assert train.main(dit(shards, vae_run, run, "--steps", "3", "--exit-after", "1")) == 0
    started = (run / "config.json").read_bytes()
    capsys.readouterr()

    assert train.main(dit(shards, other_vae, run, "--steps", "3")) == 2
    line, = errors_in(capsys.readouterr().err)
    assert line == (f"error: --vae {other_vae} is another tokenizer than {run} was trained with (--vae {vae_run}): its "
                    f"latents are another latent space; give that one to resume the run (a folder may move, but not "
                    f"change), or another --out to start a new one")
    assert train.main(dit(shards, vae_run, run, "--steps", "3", "--text-encoder", "words")) == 2
    line, = errors_in(capsys.readouterr().err)
    assert line.startswith(f"error: --text-encoder words is another text encoder than {run} was trained with "
                           f"(--text-encoder bytes)") and "damaged" not in line
    assert (run / "config.json").read_bytes() == started  # failed invocations leave the record alone

    moved = tmp_path / "moved_vae"
    shutil.copytree(vae_run, moved)  # the same tokenizer in another place resumes
    assert train.main(dit(shards, moved, run, "--steps", "4", "--lr", "5e-4")) == 0
    assert "resuming" in capsys.readouterr().err
    record = json.loads((run / "config.json").read_text())
    assert record["args"]["steps"] == 3 and record["args"]["vae"] == str(vae_run)  # how it started
    assert record["resumes"] == [{"step": 1, "changed": {"steps": 4, "lr": 5e-4, "exit_after": 0}, "world_size": 1}]
    assert effective_args(record)["lr"] == 5e-4

    import sample  # Ctrl-C while sampling: one line saying what was written
    real, calls = sample.write_outputs, []

    def interrupted_second(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(sample, "write_outputs", interrupted_second)
    capsys.readouterr()
    out = tmp_path / "samples"
    assert sample.main(["--ckpt", str(run), "--prompt", "a red circle", "--num", "3", "--batch-size", "1",
                        "--steps", "1", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted (Ctrl-C): 1 of 3 videos written, each whole, in {out}"
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in out.iterdir()) == [calls[0].name, calls[0].with_suffix(".txt").name]
