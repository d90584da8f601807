"""train.py for real: both stages train; 2-process DDP (torchrun, gloo) equals one process with the same
global batch; a stopped and resumed run continues the uninterrupted loss curve; FSDP2 steps run and resume;
SIGTERM checkpoints; a NaN loss stops the run naming the step; bad options get one-line errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import training.loop
from bench.common import free_port
from training.dit_stage import DiTStage
from training.options import build_parser
from data.synthetic import SyntheticSpec, generate
from tokenizer import CausalVAE, load_vae, save_vae

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--frames", "5", "--size", "32", "--wandb", "disabled", "--no-progress", "--warmup", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards")
    generate(out, 32, SyntheticSpec(frames=9, size=48), seed=0, shard_size=8)  # 4 shards
    return out


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """A tiny tokenizer with random weights and set latent statistics: the DiT stage only needs it frozen."""
    torch.manual_seed(0)
    vae = CausalVAE.from_preset("tiny")
    vae.set_latent_stats(torch.linspace(-0.5, 0.5, 16), torch.linspace(0.5, 2.0, 16))
    out = tmp_path_factory.mktemp("vae")
    save_vae(vae, out)
    return out


def run_cli(args: list[str], nproc: int = 1, **kwargs) -> subprocess.CompletedProcess:
    """train.py in fresh processes, as users run it: plain python, or torchrun with `nproc` processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port())] if nproc > 1 else [sys.executable]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(launcher + [str(ROOT / "train.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def one_line_error(capsys, pattern: str) -> bool:
    """The command printed one error line, `error: ...` matching pattern, and no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in err and re.search(pattern, errors[0]) is not None


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def dit_args(shards: Path, vae_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "dit", "--data", str(shards), "--vae", str(vae_dir), "--out", str(out), "--preview-steps", "2",
            "--log-every", "1", *FAST, *extra]


def test_the_dit_starts_from_the_same_weights_whatever_the_tokenizer(shards, vae_dir, tmp_path):
    """The seed alone sets the DiT's initial weights: loading a tokenizer of another architecture (whose
    constructor draws other random numbers before its checkpoint overwrites them) must not change them."""
    from parallel import Env

    other = tmp_path / "other_vae"
    save_vae(CausalVAE.from_preset("tiny", linear_context=1, linear_frames=2, decoder_blocks=2), other)
    env = Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    initial = []
    for vae in (vae_dir, other):
        torch.manual_seed(0)
        stage = DiTStage(build_parser().parse_args(dit_args(shards, vae, tmp_path / "run")), env)
        initial.append(stage.model.state_dict())
    assert initial[0].keys() == initial[1].keys()
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])


def test_precision_picks_the_forward_dtype():
    from training.stage import compute_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype(cpu, "auto") is None and compute_dtype(cuda, "auto") == torch.bfloat16
    assert compute_dtype(cpu, "bf16") == torch.bfloat16 and compute_dtype(cuda, "bf16") == torch.bfloat16
    assert compute_dtype(cpu, "fp32") is None and compute_dtype(cuda, "fp32") is None
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        compute_dtype(cpu, "fp16")


def test_bf16_precision_runs_the_tokenizer_forward_in_bf16_on_the_cpu_and_keeps_float32_weights(shards, tmp_path):
    """--precision bf16 autocasts the tokenizer's forward on the CPU too (AMX CPUs step ~1.5x faster); the
    reconstruction reaches the loss as float32, and the weights and their gradients stay float32."""
    from parallel import Env
    from training.tokenizer_stage import TokenizerStage

    env = Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    batch = {"video": torch.rand(2, 3, 5, 32, 32) * 2 - 1, "key": ["a", "b"]}
    seen = {}
    for precision in ("auto", "fp32", "bf16"):
        args = build_parser().parse_args(["--stage", "tokenizer", "--data", str(shards), "--out", str(tmp_path),
                                          "--frames", "5", "--size", "32", "--precision", precision])
        torch.manual_seed(0)
        stage = TokenizerStage(args, env)
        dtypes = []
        stage.model.decoder.conv_out.conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        loss, _ = stage.loss(stage.model, batch, step=0)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in stage.model.parameters()
                   if p.grad is not None)
        seen[precision] = dtypes[0], loss.item()
    assert [seen[k][0] for k in ("auto", "fp32", "bf16")] == [torch.float32, torch.float32, torch.bfloat16]
    assert seen["auto"][1] == seen["fp32"][1]
    assert seen["bf16"][1] != seen["auto"][1] and seen["bf16"][1] == pytest.approx(seen["auto"][1], rel=0.05)


def test_the_dit_trains_with_bf16_precision_on_the_cpu(shards, vae_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(dit_args(shards, vae_dir, out, "--steps", "2", "--batch-size", "2", "--num-workers", "0",
                               "--checkpoint-every", "0", "--precision", "bf16")) == 0
    assert len(losses(out)) == 2 and all(math.isfinite(v) for v in losses(out).values())
    assert json.loads((out / "config.json").read_text())["args"]["precision"] == "bf16"


def test_the_precision_bench_times_both_precisions_of_both_models(tmp_path, capsys):
    from bench.precision import main as precision_bench

    out = tmp_path / "precision.json"
    assert precision_bench(["--tokenizer", "tiny", "--batch", "1", "--dit", "tiny", "--dit-tokens", "256",
                            "--repeats", "2", "--rounds", "1", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["preset"]) for r in results] == [("tokenizer", "tiny"), ("dit", "tiny")]
    for r in results:
        assert len(r["seconds"]["fp32"]) == len(r["seconds"]["bf16"]) == 2 and r["bf16_over_fp32"] > 0
        assert 0 < r["loss_rel_diff"] < 0.05  # bf16 changes the loss, a little
    assert "| tokenizer tiny | 1 x 17x64x64 |" in capsys.readouterr().out


GLOBAL_BATCH_4 = ["--steps", "4", "--batch-size", "2", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def one_process_run(shards, vae_dir, tmp_path_factory) -> Path:
    """The reference for the data-parallel runs: global batch 4 as 1 process x 2 micro-batches of 2 clips.
    With 2 workers its readers are those of 2 ranks x 1 worker, and each clip's noise, time and caption dropout
    depend on the clip and the step alone, so 2 ranks x 2 clips must take the same steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    assert train.main(dit_args(shards, vae_dir, out, *GLOBAL_BATCH_4, "--grad-accum", "2", "--num-workers", "2")) == 0
    return out


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(shards, vae_dir, one_process_run, tmp_path):
    run_cli(dit_args(shards, vae_dir, tmp_path / "ddp", *GLOBAL_BATCH_4, "--num-workers", "1"), nproc=2)
    one, ddp = losses(one_process_run), losses(tmp_path / "ddp")
    assert one.keys() == ddp.keys() == {1, 2, 3, 4}
    assert [one[k] for k in one] == pytest.approx([ddp[k] for k in one], rel=1e-5)
    for part in ("dit", "text"):
        a = load_file(one_process_run / "model" / part / "model.safetensors")
        b = load_file(tmp_path / "ddp" / "model" / part / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert not torch.equal(a["position"], torch.zeros_like(a["position"]))


def test_sequence_parallel_two_processes_equal_one_process(shards, vae_dir, tmp_path, capsys):
    # --sp-size 2 on 2 ranks: one data-parallel replica whose two ranks read the same clips and each hold half
    # of every clip's tokens (the tiny DiT has 4 heads, 2 per rank). It must take the steps of one process.
    common = ["--steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--num-workers", "1"]
    assert train.main(dit_args(shards, vae_dir, tmp_path / "one", *common)) == 0
    sp = run_cli(dit_args(shards, vae_dir, tmp_path / "sp", *common, "--sp-size", "2"), nproc=2)
    assert "1 data-parallel x 2 sequence-parallel" in sp.stdout + sp.stderr
    one, two = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert [one[k] for k in (1, 2)] == pytest.approx([two[k] for k in (1, 2)], rel=1e-5)
    for part in ("dit", "text"):
        a = load_file(tmp_path / "one" / "model" / part / "model.safetensors")
        b = load_file(tmp_path / "sp" / "model" / part / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert train.main(dit_args(shards, vae_dir, tmp_path / "bad", *common, "--sp-size", "2")) == 2
    assert "--sp-size 2 must divide the number of processes" in capsys.readouterr().err


def test_a_stopped_run_resumes_on_the_loss_curve_of_an_uninterrupted_one(shards, vae_dir, tmp_path, capsys):
    """The reference and the first part run in this process; the resumed part in a fresh one, as after a kill."""
    common = ["--steps", "6", "--batch-size", "3", "--num-workers", "2", "--checkpoint-every", "2"]
    assert train.main(dit_args(shards, vae_dir, tmp_path / "whole", *common)) == 0
    capsys.readouterr()
    assert train.main(dit_args(shards, vae_dir, tmp_path / "split", *common, "--exit-after", "3")) == 0
    assert "stopped at step 3" in capsys.readouterr().err
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    del config["args"]["zoom"], config["args"]["hflip"]  # as a run started before these options existed
    (tmp_path / "split" / "config.json").write_text(json.dumps(config))
    second = run_cli(dit_args(shards, vae_dir, tmp_path / "split", *common))
    assert "resuming" in second.stderr + second.stdout and "step 3 of 6" in second.stderr + second.stdout
    changed = re.search(r"options changed since .* was started: (.*)", second.stderr + second.stdout)
    assert changed and changed.group(1) == "exit_after"  # options newer than the run, at their defaults: unchanged
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert split.keys() == whole.keys() == set(range(1, 7))  # the log is one curve, no step twice
    assert [split[k] for k in range(4, 7)] == pytest.approx([whole[k] for k in range(4, 7)], rel=1e-6)
    a = load_file(tmp_path / "whole" / "model" / "dit" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "dit" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # checkpoints are complete folders; older ones pruned to --keep-checkpoints
    done = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("step_*"))
    assert done == ["step_00000004", "step_00000006"]
    assert not list((tmp_path / "split" / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow  # 31 s: FSDP2 stays in the default run through the tokenizer stage test below
def test_fsdp2_equals_one_process_and_resumes(shards, vae_dir, one_process_run, tmp_path):
    # the DDP test's reference, against 2 ranks x 2 clips sharded by FSDP2, stopped after step 2 and resumed
    fsdp = [*GLOBAL_BATCH_4, "--num-workers", "1", "--parallel", "fsdp"]
    run_cli(dit_args(shards, vae_dir, tmp_path / "fsdp", *fsdp, "--exit-after", "2"), nproc=2)
    proc = run_cli(dit_args(shards, vae_dir, tmp_path / "fsdp", *fsdp), nproc=2)
    assert "step 2 of 4" in proc.stderr + proc.stdout
    one, sharded = losses(one_process_run), losses(tmp_path / "fsdp")
    assert sorted(sharded) == [1, 2, 3, 4]
    assert [sharded[k] for k in (1, 2, 3, 4)] == pytest.approx([one[k] for k in (1, 2, 3, 4)], rel=1e-5)
    a = load_file(one_process_run / "model" / "dit" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "model" / "dit" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    state = load_file(tmp_path / "fsdp" / "model" / "dit" / "model.safetensors")  # gathered full weights
    from dit3d import DiT3D, load_dit

    model = load_dit(tmp_path / "fsdp" / "model" / "dit")  # they load into a plain model
    assert set(state) == set(model.state_dict())
    # both ranks ran the preview model (FSDP needs it), rank 0 alone wrote the videos
    previews = tmp_path / "fsdp" / "previews"
    assert [p.name for p in previews.iterdir()] == ["step_00000004"]
    assert list((previews / "step_00000004").glob("*.mp4"))


def test_the_tokenizer_stage_under_fsdp2_equals_one_process(shards, tmp_path):
    """FSDP2 shards the tokenizer too; its encode and decode (previews, latent statistics) are not its forward,
    so they run with the parameters gathered. With the discriminator on, 2 ranks take one process's steps."""
    common = ["--stage", "tokenizer", "--data", str(shards), "--steps", "2", "--batch-size", "2", "--checkpoint-every",
              "0", "--log-every", "1", "--disc-weight", "0.5", "--disc-start", "0", "--pca-init-clips", "0",
              "--stats-batches", "100", *FAST]  # the statistics over every clip, however the ranks split them
    assert train.main([*common, "--out", str(tmp_path / "one"), "--grad-accum", "2", "--num-workers", "2"]) == 0
    run_cli([*common, "--out", str(tmp_path / "fsdp"), "--num-workers", "1", "--parallel", "fsdp"], nproc=2)
    one, sharded = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert [sharded[k] for k in (1, 2)] == pytest.approx([one[k] for k in (1, 2)], rel=1e-4)
    a, b = load_vae(tmp_path / "one" / "model"), load_vae(tmp_path / "fsdp" / "model")
    torch.testing.assert_close(b.latent_std, a.latent_std, rtol=1e-4, atol=1e-5)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(shards, vae_dir, tmp_path):
    out = tmp_path / "preempted"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *dit_args(shards, vae_dir, out, "--steps", "100000",
                            "--batch-size", "2", "--num-workers", "1", "--checkpoint-every", "0")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    assert "preempted (SIGTERM)" in output
    step = json.loads((out / "checkpoints" / "latest").parent.joinpath(
        (out / "checkpoints" / "latest").read_text().strip(), "trainer.json").read_text())["step"]
    assert step == max(losses(out)) >= 1


def test_tokenizer_stage_trains_with_the_discriminator_and_measures_latent_stats(shards, tmp_path, monkeypatch):
    streams = []
    real_make_loader = training.loop.make_loader
    monkeypatch.setattr(training.loop, "make_loader", lambda *a, **kw: streams.append(kw) or real_make_loader(*a, **kw))
    out = tmp_path / "vae"
    args = ["--stage", "tokenizer", "--data", str(shards), "--out", str(out), "--steps", "24", "--batch-size", "4",
            "--num-workers", "0", "--checkpoint-every", "0", "--log-every", "4", "--disc-weight", "0.5",
            "--disc-start", "12", "--image-prob", "0.25", "--stats-batches", "2", "--pca-init-clips", "0", *FAST,
            # from random weights (no fitted codec) the tiny preset's encoder without residual blocks takes longer
            # than these 24 steps to get going (L1 0.25 -> 0.21); with one block it gets below 0.6 of its first error
            "--override", "encoder_blocks=1",
            "--zoom", "1", "1.5", "--hflip"]
    args[args.index("--lr") + 1] = "3e-3"
    assert train.main(args) == 0
    assert (streams[0]["zoom"], streams[0]["hflip"]) == ([1.0, 1.5], True)  # the crop options reach the stream
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    l1 = [r["l1"] for r in records if "l1" in r]
    assert l1[-1] < 0.6 * l1[0]
    assert any("d_loss" in r and "adaptive_weight" in r for r in records)  # the GAN term switched on
    vae = load_vae(out / "model")
    assert not torch.allclose(vae.latent_std, torch.ones(16))  # measured, not the defaults
    z = vae.normalize(vae.encode(torch.zeros(1, 3, 5, 32, 32)).mode())
    assert z.shape == (1, 16, 2, 4, 4)
    assert list((out / "previews").glob("step_*/*.mp4"))


def test_a_nan_loss_stops_the_run_and_names_the_step(shards, vae_dir, tmp_path, monkeypatch, capsys):
    real_loss = DiTStage.loss

    def loss(self, model, batch, step):
        value, logs = real_loss(self, model, batch, step)
        return (value * float("nan"), logs) if step == 3 else (value, logs)

    monkeypatch.setattr(DiTStage, "loss", loss)
    out = tmp_path / "nan"
    assert train.main(dit_args(shards, vae_dir, out, "--steps", "8", "--batch-size", "2", "--num-workers", "0",
                               "--checkpoint-every", "2")) == 2
    assert one_line_error(capsys, r"the loss is nan .* at step 4: the run has diverged; .*step_00000002")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert max(losses(out)) == 3


def test_bad_options_get_one_line_errors(shards, vae_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--seed", "1"])  # a quickstart option without `quickstart` before it
    assert "put the quickstart's options after its name (`python train.py quickstart --seed 1`)" in capsys.readouterr().err
    assert train.main(["--stage", "dit", "--data", str(shards), "--out", str(tmp_path / "a"), *FAST]) == 2
    assert one_line_error(capsys, "--stage dit needs --vae")
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(tmp_path / "b"), "--frames", "12"]) == 2
    assert one_line_error(capsys, r"--frames must be 1 \+ 4k.*got 12: use 9 or 13")
    run = tmp_path / "c"
    assert train.main(dit_args(shards, vae_dir, run, "--steps", "1", "--batch-size", "2", "--num-workers", "0")) == 0
    # previews of the manifest's captions are scored by the motion benchmark and logged
    preview = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert preview["motion/videos"] >= 1 and 0 <= preview["motion/direction"] <= 1 and preview["previews"]
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(run), *FAST, "--steps", "1"]) == 2
    assert one_line_error(capsys, "holds a dit run")
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(tmp_path / "d"), *FAST,
                       "--override", "widht=3"]) == 2
    assert one_line_error(capsys, r"unknown tokenizer config field\(s\) \['widht'\]")
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(tmp_path / "e"), *FAST,
                       "--zoom", "0.5", "2"]) == 2
    assert one_line_error(capsys, r"--zoom takes LO HI with 1 <= LO <= HI .*got 0.5 2")
    assert train.main(dit_args(shards, vae_dir, tmp_path / "f", "--latents", "--hflip")) == 2
    assert one_line_error(capsys, r"--zoom and --hflip change how videos are cropped; latent shards")


def test_the_word_text_encoder_trains_and_samples(shards, vae_dir, tmp_path):
    from dit3d.text import WordTextEncoder
    from pipeline import Pipeline

    run = tmp_path / "words"
    assert train.main(dit_args(shards, vae_dir, run, "--steps", "1", "--batch-size", "2", "--num-workers", "0",
                               "--checkpoint-every", "0", "--text-encoder", "words")) == 0
    assert json.loads((run / "model" / "pipeline.json").read_text())["text_encoder"] == "words"
    pipe = Pipeline.load(run)
    assert isinstance(pipe.model.text, WordTextEncoder)
    latents = pipe.generate(["a red circle moving left"], frames=5, height=32, width=32, steps=2, guidance=3.0, seeds=[0])
    assert pipe.decode(latents).shape == (1, 3, 5, 32, 32)


def test_quickstart_completes_with_few_steps(tmp_path, capsys):
    assert train.main(["quickstart", "--out", str(tmp_path / "qs"), "--clips", "48", "--tokenizer-steps", "6",
                       "--dit-steps", "6", "--sample-steps", "2", "--samples-per-prompt", "1", "--no-progress"]) == 0
    proc = capsys.readouterr()
    samples = sorted((tmp_path / "qs" / "samples").glob("*.mp4"))
    assert len(samples) == 8 and all(s.with_suffix(".txt").is_file() for s in samples)
    assert "held out of training" in proc.out and "sample.py --ckpt" in proc.out
    assert "--frames 49 --extrapolate pi" in proc.out  # the longer clips, in one pass
    assert "| held_out |" in proc.out  # the motion scores, split by seen and held-out captions
    summary = json.loads((tmp_path / "qs" / "motion_scores.json").read_text())["summary"]
    assert summary["held_out"]["videos"] == 5 and summary["seen"]["videos"] == 3
    manifest = tmp_path / "qs" / "shards" / "manifest.json"
    assert json.loads(manifest.read_text())["spec"]["object_size"] == [0.22, 0.30]
    from quickstart import main as quickstart_main, quickstart_parser
    from data.synthetic import generate as write_clips

    calls = []
    with pytest.MonkeyPatch.context() as m:  # another object size writes the clips afresh (and nothing else here)
        m.setattr("quickstart.generate", lambda out, n, spec, **kw: calls.append(spec.object_size) or
                  write_clips(out, n, spec, **kw))
        m.setattr("quickstart.train", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
        quickstart_main(["--out", str(tmp_path / "qs"), "--clips", "48", "--object-size", "0.32", "0.42", "--no-progress"])
    assert calls == [(0.32, 0.42)] and json.loads(manifest.read_text())["spec"]["object_size"] == [0.32, 0.42]
    assert quickstart_parser().parse_args([]).object_size == [0.22, 0.30]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(shards, vae_dir, tmp_path):
    common = ["--steps", "2", "--batch-size", "2", "--num-workers", "0", "--checkpoint-every", "0"]
    assert train.main(dit_args(shards, vae_dir, tmp_path / "eager", *common)) == 0
    assert train.main(dit_args(shards, vae_dir, tmp_path / "compiled", *common, "--compile")) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [compiled[k] for k in (1, 2)] == pytest.approx([eager[k] for k in (1, 2)], rel=1e-3)


@pytest.mark.slow
def test_compiled_blocks_under_sequence_parallelism_train_like_eager_ones(shards, vae_dir, tmp_path):
    """--compile with --sp-size 2: the compiled blocks call the Ulysses exchanges (autograd Functions over
    blocking collectives, where the graph breaks) and must still take one eager process's steps."""
    common = ["--steps", "2", "--batch-size", "2", "--num-workers", "1", "--checkpoint-every", "0"]
    run_cli(dit_args(shards, vae_dir, tmp_path / "eager", *common))
    run_cli(dit_args(shards, vae_dir, tmp_path / "sp", *common, "--compile", "--sp-size", "2"), nproc=2)
    eager, sp = losses(tmp_path / "eager"), losses(tmp_path / "sp")
    assert [sp[k] for k in (1, 2)] == pytest.approx([eager[k] for k in (1, 2)], rel=1e-3)


@pytest.mark.parametrize("option, value, says", [
    ("--lr", "nan", r"--lr must be in \(0, inf\), got nan"), ("--lr", "-1", r"--lr must be in \(0, inf\), got -1"),
    ("--beta1", "1.5", r"--beta1 must be in \[0, 1\), got 1.5"), ("--num-workers", "-1", r"--num-workers must be in \[0"),
    ("--ema-decay", "2", r"--ema-decay must be in \[0, 1\), got 2"), ("--weight-decay", "-1", r"--weight-decay must be in"),
    ("--warmup", "-3", r"--warmup must be in \[0, inf\), got -3"), ("--grad-clip", "inf", r"--grad-clip must be in"),
    ("--keep-checkpoints", "0", r"--keep-checkpoints must be in \[1"), ("--image-prob", "1.5", "--image-prob must be in"),
])
def test_numbers_out_of_range_are_one_line_before_anything_runs(shards, tmp_path, capsys, option, value, says):
    out = tmp_path / "run"
    assert train.main(["--stage", "tokenizer", "--data", str(shards), "--out", str(out), *FAST, option, value]) == 2
    assert one_line_error(capsys, says)
    assert not out.exists()


def test_an_exploding_loss_stops_the_run_before_its_weights_are_exported(shards, vae_dir, tmp_path, capsys):
    """--lr 1e6: the loss goes from about 2 to 1e15 in one step, still finite, and to NaN in the next. The run
    stops at the jump; the checkpoint and export of the weights that gave it are set aside, never resumed or
    sampled from; the export that is left records a finite run."""
    out = tmp_path / "diverging"
    args = dit_args(shards, vae_dir, out, "--steps", "8", "--batch-size", "2", "--num-workers", "0",
                    "--checkpoint-every", "1", "--warmup", "0", "--keep-checkpoints", "8")
    args[args.index("--lr") + 1] = "1e6"
    assert train.main(args) == 2
    (line,) = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert re.search(r"the loss is \S+, \S+ times the median of the last \d+ steps' .* the run has diverged", line), line
    bad = int(re.search(r"at step (\d+)", line).group(1)) - 1  # the weights of this step gave the exploding loss
    assert all(math.isfinite(l) and l < 1e3 for s, l in losses(out).items() if s <= bad)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert f"diverged_step_{bad:08d}" in ckpts and f"step_{bad:08d}" not in ckpts
    if bad > 1:
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{bad - 1:08d}"
        assert f"The last good checkpoint is {out / 'checkpoints' / f'step_{bad - 1:08d}'}" in line
    else:
        assert not (out / "checkpoints" / "latest").exists() and "The last good checkpoint is none" in line
    assert (out / f"model.diverged_step_{bad:08d}").is_dir() and not (out / "model").exists()
    record = json.loads((out / f"model.diverged_step_{bad:08d}" / "run.json").read_text())
    assert record["step"] == bad and record["losses_finite"] and not record["finished"]
    # resuming with a learning rate that does not diverge goes on from the last good checkpoint
    args[args.index("--lr") + 1] = "1e-3"
    assert train.main(args) == 0
    assert json.loads((out / "model" / "run.json").read_text()) | {"recent_loss": 0} == {
        "step": 8, "steps": 8, "finished": True, "recent_loss": 0, "losses_finite": True}
