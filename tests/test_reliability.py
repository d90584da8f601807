"""Nothing half-written, nothing lost: faults injected where a user meets them (a damaged checkpoint, a kill
while pruning or exporting, a full disk, an unwritable output, bad values and files), each with what the user
must see: one line naming the problem, and the last good state intact and used."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from bench.common import free_port
from checkpoint_io import save_checkpoint
from data.synthetic import SyntheticSpec, generate
from tokenizer import CausalVAE

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--frames", "5", "--size", "32", "--wandb", "disabled", "--no-progress", "--warmup", "2", "--lr", "1e-3",
        "--batch-size", "2", "--num-workers", "0", "--preview-steps", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    generate(out, 16, SyntheticSpec(frames=9, size=48), seed=0, shard_size=4)
    return out


@pytest.fixture(scope="module")
def vae_run(shards, tmp_path_factory) -> Path:
    """A tokenizer run folder (not its model/): the DiT stage takes either."""
    out = tmp_path_factory.mktemp("vae") / "run"
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(out), "--steps", "1",
                       "--pca-init-clips", "0", "--stats-batches", "1", *FAST]) == 0
    return out


def dit(shards: Path, vae: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "dit", "--data", str(shards), "--vae", str(vae), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def dit_run(shards, vae_run, tmp_path_factory) -> Path:
    """4 steps with checkpoints at 2 and 4 (kept), and its model/ export."""
    out = tmp_path_factory.mktemp("dit") / "run"
    assert train.main(dit(shards, vae_run, out, "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "3")) == 0
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def errors_in(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_the_dit_stage_takes_a_tokenizer_run_folder_or_its_model(dit_run, vae_run):
    assert json.loads((dit_run / "config.json").read_text())["args"]["vae"] == str(vae_run)
    assert (vae_run / "model" / "config.json").is_file() and not (vae_run / "config.json").read_text().count('"kind"')


@pytest.mark.parametrize("damage", ["truncated shard", "garbage metadata", "garbage trainer.json"])
def test_a_damaged_latest_checkpoint_is_named_and_the_one_before_it_resumed(dit_run, shards, vae_run, tmp_path, damage,
                                                                           capsys):
    run = tmp_path / "run"
    shutil.copytree(dit_run, run)
    newest = run / "checkpoints" / "step_00000004"
    if damage == "truncated shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "garbage metadata":
        (newest / ".metadata").write_bytes(b"\x00garbage" * 10)
    else:
        (newest / "trainer.json").write_text("{not json")
    assert train.main(dit(shards, vae_run, run, "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "3")) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "step_00000004" in warnings[0] and "Traceback" not in err, err
    assert any("resuming" in line and "step 2 of 5" in line for line in err.splitlines())
    whole = losses(dit_run)
    assert losses(run)[3] == pytest.approx(whole[3], rel=1e-6) and losses(run)[4] == pytest.approx(whole[4], rel=1e-6)


class RunsACommand:
    """A hostile `.metadata`: unpickled, it runs a shell command (here it only writes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_checkpoint_runs_nothing_and_is_refused_by_name(dit_run, shards, vae_run, tmp_path, capsys):
    import pickle

    run, marker = tmp_path / "run", tmp_path / "the-command-ran"
    shutil.copytree(dit_run, run)
    (run / "checkpoints" / "step_00000004" / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    assert train.main(dit(shards, vae_run, run, "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "3")) == 0
    err = capsys.readouterr().err
    assert not marker.exists()
    (warning,) = [line for line in err.splitlines() if "step_00000004" in line and "refused" in line]
    assert "could run code" in warning and "system" in warning and "Traceback" not in err, err
    assert any("resuming" in line and "step 2 of 5" in line for line in err.splitlines())
    exported = {p.suffix for p in (run / "model").rglob("*") if p.is_file()}
    assert exported <= {".json", ".safetensors", ".txt"}, exported  # what sample.py loads holds no pickle


def test_when_every_checkpoint_is_damaged_one_line_names_them(dit_run, shards, vae_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(dit_run, run)
    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / ".metadata").write_bytes(b"garbage")
    assert train.main(dit(shards, vae_run, run, "--steps", "5")) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "every checkpoint" in line and "step_00000002" in line and "step_00000004" in line


def test_a_kill_while_pruning_never_leaves_a_checkpoint_that_looks_complete(tmp_path, monkeypatch):
    from parallel import Env
    from training import checkpoint

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = root / f"step_{step:08d}"
        folder.mkdir(parents=True)
        (folder / "__0_0.distcp").write_bytes(b"tensors")
        (folder / "trainer.json").write_text("{}")
    ckpts = checkpoint.Checkpoints(root, Env(rank=0, world=1, local_rank=0, device=torch.device("cpu")), keep=1)

    def killed_rmtree(path, *args, **kwargs):  # the tensors go, then the process dies
        (Path(path) / "__0_0.distcp").unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpts.remove(root / "step_00000002")
    assert ckpts.complete() == [root / "step_00000004"]
    monkeypatch.undo()
    checkpoint.Checkpoints(root, ckpts.env, keep=1)  # the next start clears what the kill left
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]


def test_a_failed_export_leaves_the_previous_model_whole_and_mixed_parts_are_refused(shards, vae_run, tmp_path,
                                                                                     monkeypatch):
    import pipeline

    run = tmp_path / "run"
    real = pipeline.save_checkpoint

    def dies_on_text_at_step_4(directory, config, state, kind, step=None):
        if kind.startswith("text") and step == 4:
            raise KeyboardInterrupt("killed while exporting")
        return real(directory, config, state, kind, step)

    monkeypatch.setattr(pipeline, "save_checkpoint", dies_on_text_at_step_4)
    assert train.main(dit(shards, vae_run, run, "--steps", "4", "--checkpoint-every", "2")) == 130  # Ctrl-C: one line
    model = run / "model"
    steps = {json.loads((model / part / "config.json").read_text())["step"] for part in ("dit", "text")}
    assert steps == {2} and json.loads((model / "pipeline.json").read_text())["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    pipeline.Pipeline.load(run)  # loads
    # a model/ assembled from two steps is refused with one line
    record = json.loads((model / "text" / "config.json").read_text())
    (model / "text" / "config.json").write_text(json.dumps(record | {"step": 6}))
    with pytest.raises(pipeline.InputError, match=r"mixes parts from different training steps \(pipeline.json: step 2, "
                                                  r"dit: step 2, text: step 6\)"):
        pipeline.Pipeline.load(run)


def test_a_full_disk_is_one_line_and_leaves_no_temporary(dit_run, shards, vae_run, tmp_path, monkeypatch, capsys):
    from training import checkpoint

    run = tmp_path / "run"
    shutil.copytree(dit_run, run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.dcp, "save", full)
    assert train.main(dit(shards, vae_run, run, "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3")) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "no space left on" in line and ".step_00000006.tmp" in line and "step_00000004" in line
    assert not list((run / "checkpoints").glob(".*"))
    # and before writing, the free space is checked against the last checkpoint's size
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert train.main(dit(shards, vae_run, run, "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "3")) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "for the next checkpoint: 0 MB free" in line and "the last checkpoint is" in line


def test_files_we_write_follow_the_umask(tmp_path):
    from data import write_video

    old = os.umask(0o022)
    try:
        write_video(tmp_path / "v.mp4", torch.zeros(3, 1, 16, 16), fps=8)
        save_checkpoint(tmp_path / "ckpt", {}, {"w": torch.zeros(2)}, kind="x")
    finally:
        os.umask(old)
    for path in (tmp_path / "v.mp4", tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt" / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


# ---- sample.py and the other commands ------------------------------------------------------------------


def test_sample_checks_its_output_and_options_before_it_samples(dit_run, tmp_path, monkeypatch, capsys):
    import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "generate_latents", lambda *a, **k: pytest.fail("sampled before failing"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--out", str(blocker / "videos")], f"cannot write to {blocker / 'videos'}"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--frames", "0"], "--frames must be a positive integer"),
        (["--height", "0"], "--height must be at least 1, got 0"),
        (["--cfg", "-3"], "--guidance must be at least 0"),
    ]
    for extra, message in cases:
        assert sample.main(["--ckpt", str(dit_run), "--prompt", "a red circle moving left", *extra]) == 2
        (line,) = errors_in(capsys.readouterr().err)
        assert message in line, (extra, line)
    prompts = tmp_path / "prompts.bin"
    prompts.write_bytes(bytes(range(128, 256)))
    assert sample.main(["--ckpt", str(dit_run), "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert f"the prompt file {prompts} is not UTF-8 text" in line


def test_a_truncated_weights_file_is_named(dit_run, vae_run, tmp_path, capsys):
    from tokenizer.evaluate import main as evaluate_main

    run = tmp_path / "run"
    shutil.copytree(dit_run, run)
    weights = run / "model" / "dit" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert sample.main(["--ckpt", str(run), "--prompt", "a red circle moving left", "--out", str(tmp_path / "o")]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert f"{weights} cannot be read" in line and "re-export" in line
    vae = tmp_path / "vae"
    shutil.copytree(vae_run / "model", vae)
    (vae / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert evaluate_main(["--ckpt", str(vae), "--data", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert f"{vae / 'model.safetensors'} cannot be read" in line


def test_under_torchrun_bad_input_is_said_once_and_every_rank_exits_2(shards, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "train.py"), "--stage", "dit", "--data", str(shards), "--out",
                           str(tmp_path / "run"), *FAST], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "--stage dit needs --vae" in line]
    assert len(said) == 1, proc.stderr[-3000:]
    # every rank exits 2 (torchrun reports the first to finish, and may stop the other before it does)
    assert "exitcode  : 2" in proc.stderr and "exitcode  : 1 " not in proc.stderr
    assert 'train.py", line' not in proc.stderr  # no rank printed a traceback (torchrun prints its own report)


def test_careless_hands_get_one_line_each(dit_run, vae_run, shards, tmp_path, capsys):
    """Issue 50, item 11: each of these was a traceback or silently wrong."""
    from tokenizer.evaluate import main as evaluate_main
    from data.make_shards import main as make_shards_main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # an --out that cannot be written: one line from every command, before anything is built or read
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(blocker / "run"), *FAST]) == 2
    assert f"cannot write to {blocker / 'run'}" in errors_in(capsys.readouterr().err)[0]
    footage = tmp_path / "footage"
    footage.mkdir()
    shutil.copy(Path(__file__).parent / "assets" / "clips" / "bikes.mp4", footage / "bikes.mp4")
    (footage / "bikes.txt").write_text("bikes")
    assert make_shards_main(["--input", str(footage), "--out", str(blocker / "shards")]) == 2
    assert f"cannot write to {blocker / 'shards'}" in errors_in(capsys.readouterr().err)[0]
    assert evaluate_main(["--ckpt", str(vae_run), "--data", str(footage), "--out", str(blocker / "eval"),
                          "--frames", "9", "--size", "32", "--windows", "1"]) == 2
    assert f"cannot write to {blocker / 'eval'}" in errors_in(capsys.readouterr().err)[0]
    # a DiT run given where a tokenizer goes is named as one, with the way to its tokenizer
    assert sample.main(["--ckpt", str(dit_run), "--prompt", "a red circle", "--vae", str(dit_run),
                        "--out", str(tmp_path / "s1")]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "is a trained text-to-video model (a DiT run), not a tokenizer checkpoint" in line
    assert str(dit_run / "model" / "tokenizer") in line
    # --text-encoder on a run whose encoder is built in is refused, not ignored
    assert sample.main(["--ckpt", str(dit_run), "--prompt", "a red circle", "--text-encoder", str(tmp_path),
                        "--out", str(tmp_path / "s2")]) == 2
    assert "trained with the built-in 'bytes' text encoder" in errors_in(capsys.readouterr().err)[0]
    # a pipeline.json without its text encoder
    broken = tmp_path / "broken"
    shutil.copytree(dit_run / "model", broken)
    spec = json.loads((broken / "pipeline.json").read_text())
    del spec["text_encoder"]
    (broken / "pipeline.json").write_text(json.dumps(spec))
    assert sample.main(["--ckpt", str(broken), "--prompt", "a red circle", "--out", str(tmp_path / "s3")]) == 2
    assert "pipeline.json has no 'text_encoder'" in errors_in(capsys.readouterr().err)[0]
    # a zero-byte .tar as --data
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert train.main(["--stage", "tokenizer", "--data", str(empty), "--out", str(tmp_path / "r"), *FAST]) == 2
    assert "empty.tar" in errors_in(capsys.readouterr().err)[0]


def _poisoned(model_dir: Path, target: Path, scale: float) -> Path:
    """A copy of an export whose every weight is multiplied by `scale` (inf or NaN when it overflows): the weights
    of a run that diverged."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, target)
    for weights in target.rglob("model.safetensors"):
        save_file({k: v * scale if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))
    return target


def test_a_diverged_model_or_absurd_guidance_is_an_error_not_a_black_video(dit_run, vae_run, tmp_path, capsys):
    from tokenizer.evaluate import main as evaluate_main

    common = ["--prompt", "a red circle moving left", "--steps", "2", "--no-progress"]
    diverged = _poisoned(dit_run / "model", tmp_path / "diverged", float("nan"))
    out = tmp_path / "s.mp4"
    assert sample.main(["--ckpt", str(diverged), *common, "--out", str(out)]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "are not finite (NaN or inf): the model at" in line and str(diverged) in line
    assert not out.exists()
    assert sample.main(["--ckpt", str(dit_run), *common, "--cfg", "1e30", "--out", str(out)]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert "--guidance 1e+30 is far too large" in line and not out.exists()
    # a tokenizer whose weights blew up is named, not scored
    footage = tmp_path / "footage"
    footage.mkdir()
    shutil.copy(Path(__file__).parent / "assets" / "clips" / "bikes.mp4", footage / "bikes.mp4")
    blown = _poisoned(vae_run / "model", tmp_path / "blown", 1e30)
    assert evaluate_main(["--ckpt", str(blown), "--data", str(footage), "--out", str(tmp_path / "eval"),
                          "--frames", "9", "--size", "32", "--windows", "1"]) == 2
    (line,) = errors_in(capsys.readouterr().err)
    assert f"({blown}): its latents of bikes.mp4 are" in line and "the tokenizer has diverged" in line
    assert not (tmp_path / "eval" / "report.json").exists()


def test_ctrl_c_in_tokenizer_evaluate_is_one_line(vae_run, tmp_path, monkeypatch, capsys):
    import tokenizer.evaluate as ev

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    footage = tmp_path / "footage"
    footage.mkdir()
    shutil.copy(Path(__file__).parent / "assets" / "clips" / "bikes.mp4", footage / "bikes.mp4")
    assert ev.main(["--ckpt", str(vae_run), "--data", str(footage), "--out", str(tmp_path / "eval"),
                    "--frames", "9", "--size", "32"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"interrupted (Ctrl-C): no report written; the side-by-side videos finished so far are in {tmp_path / 'eval' / 'videos'}"]
