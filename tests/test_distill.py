"""train.py --stage distill on tiny models: the student starts as its teacher's conditional velocity, trains,
records its sampler so that sample.py needs no flags, resumes on the curve of an uninterrupted run, takes the
same steps on two processes as on one, and ships as LoRA adapters; bad requests get one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sample
import train
from dit3d import DiT3D, load_dit
from pipeline import Pipeline
from tests.test_train import losses, one_line_error, run_cli
from tests.conftest import write_tiny_dit_inputs

FAST = ["--frames", "5", "--size", "32", "--wandb", "disabled", "--no-progress", "--warmup", "1", "--log-every", "1",
        "--preview-steps", "2", "--batch-size", "2", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    write_tiny_dit_inputs(root)
    assert train.main(["--stage", "dit", "--data", str(root / "shards"), "--vae", str(root / "vae"), "--out",
                       str(root / "teacher"), "--steps", "4", "--num-workers", "0", "--checkpoint-every", "0", *FAST]) == 0
    return root / "teacher"


def distill_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    root = teacher.parent
    return ["--stage", "distill", "--init", str(teacher), "--data", str(root / "shards"), "--vae", str(root / "vae"),
            "--out", str(out), *FAST, *extra]


def test_the_student_starts_as_its_teachers_conditional_velocity(teacher):
    dit = load_dit(teacher / "model" / "dit").eval()
    student = DiT3D(type(dit.config)(**(vars(dit.config) | {"sampler_embed": True}))).eval()
    missing, _ = student.load_state_dict(dit.state_dict(), strict=False)
    assert missing and all(k.startswith("sampler_embed.") for k in missing)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 16, 2, 4, 4, generator=g), torch.randn(3, 4, dit.config.text_dim, generator=g)
    t = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        plain = dit(x, t, text)
        for w, steps in ((1.0, 1.0), (5.0, 4.0), (8.0, 8.0)):
            torch.testing.assert_close(student(x, t, text, sampler=torch.tensor([[w, steps]] * 3)), plain)
    with pytest.raises(Exception, match="distilled student needs its"):
        student(x, t, text)


def test_the_student_trains_records_its_sampler_and_samples_with_no_flags(teacher, tmp_path, capsys):
    out = tmp_path / "student"
    assert train.main(distill_args(teacher, out, "--steps", "3", "--distill-steps", "1", "2", "4", "--teacher-steps",
                                   "8", "--distill-guidance", "2", "6", "--num-workers", "0")) == 0
    spec = json.loads((out / "model" / "pipeline.json").read_text())
    assert spec["sampler"]["steps"] == 4 and spec["sampler"]["guidance"] == 4.0
    assert spec["sampler"]["student"] | {"teacher": None} == {"steps": [1, 2, 4], "guidance": [2.0, 6.0],
                                                              "teacher_steps": 8, "teacher": None}
    trained, start = load_dit(out / "model" / "dit"), load_dit(teacher / "model" / "dit")
    assert trained.config.sampler_embed and not start.config.sampler_embed
    assert any(not torch.equal(a, trained.state_dict()[k]) for k, a in start.state_dict().items())
    calls = []
    pipe = Pipeline.load(out)
    forward = pipe.model.forward
    pipe.model.forward = lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k)
    pipe.generate(["a red circle moving left"], 5, 32, 32, steps=4, guidance=4.0, seeds=[0])
    assert calls == [1, 1, 1, 1]  # one pass a step, no unconditional twin
    capsys.readouterr()
    video = tmp_path / "s.mp4"
    assert sample.main(["--ckpt", str(out), "--prompt", "a red circle moving left", "--out", str(video),
                        "--no-progress"]) == 0
    assert video.stat().st_size > 0
    assert sample.main(["--ckpt", str(out), "--prompt", "x", "--steps", "50", "--out", str(video), "--no-progress"]) == 2
    assert one_line_error(capsys, r"distilled to sample in 1, 2, 4 step\(s\).*--steps 50 is none of them")
    assert sample.main(["--ckpt", str(out), "--prompt", "x", "--guidance", "9", "--steps", "1", "--out", str(video),
                        "--no-progress"]) == 0
    assert "stands in for guidance 2 to 6, and 9 is outside" in capsys.readouterr().err


def test_a_stopped_distillation_resumes_on_the_uninterrupted_curve(teacher, tmp_path):
    common = ["--steps", "4", "--checkpoint-every", "2", "--num-workers", "1", "--distill-steps", "2", "4",
              "--teacher-steps", "4"]
    assert train.main(distill_args(teacher, tmp_path / "whole", *common)) == 0
    assert train.main(distill_args(teacher, tmp_path / "split", *common, "--exit-after", "2")) == 0
    second = run_cli(distill_args(teacher, tmp_path / "split", *common))
    assert "resuming" in second.stderr + second.stdout
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert whole.keys() == split.keys() == {1, 2, 3, 4}
    assert [split[k] for k in (3, 4)] == pytest.approx([whole[k] for k in (3, 4)], rel=1e-5)


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_take_the_steps_of_one(teacher, tmp_path, parallel):
    common = ["--steps", "2", "--checkpoint-every", "0", "--batch-size", "2", "--teacher-steps", "4"]
    assert train.main(distill_args(teacher, tmp_path / "one", *common, "--grad-accum", "2", "--num-workers", "2")) == 0
    run_cli(distill_args(teacher, tmp_path / "two", *common, "--num-workers", "1", "--parallel", parallel), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2}
    assert [one[k] for k in one] == pytest.approx([two[k] for k in one], rel=1e-5)


@pytest.mark.slow
def test_sequence_parallel_distillation_takes_the_steps_of_one_process(teacher, tmp_path):
    # --sp-size 2 on 2 ranks: one replica whose ranks read the same captions and each hold half the student's
    # tokens (the teacher runs whole on each); it must take the steps of one process
    common = ["--steps", "2", "--checkpoint-every", "0", "--teacher-steps", "4", "--num-workers", "1"]
    assert train.main(distill_args(teacher, tmp_path / "one", *common)) == 0
    run_cli(distill_args(teacher, tmp_path / "sp", *common, "--sp-size", "2"), nproc=2)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert one.keys() == two.keys() == {1, 2}
    assert [one[k] for k in one] == pytest.approx([two[k] for k in one], rel=1e-5)


def test_a_lora_student_is_adapters_on_its_teacher_sampled_without_guidance(teacher, tmp_path, capsys):
    out = tmp_path / "lora"
    assert train.main(distill_args(teacher, out, "--steps", "2", "--lora-rank", "4", "--distill-steps", "4",
                                   "--teacher-steps", "8", "--num-workers", "0", "--checkpoint-every", "0")) == 0
    spec = json.loads((out / "model" / "pipeline.json").read_text())
    assert "lora" in spec and spec["sampler"]["guidance"] == 1.0 and spec["sampler"]["steps"] == 4
    capsys.readouterr()
    video = tmp_path / "l.mp4"
    assert sample.main(["--ckpt", str(out), "--prompt", "a blue square moving up", "--guidance", "5", "--out",
                        str(video), "--no-progress"]) == 0
    assert "distilled out of guidance" in capsys.readouterr().err
    assert train.main(distill_args(teacher, tmp_path / "bad", "--steps", "1", "--lora-rank", "4", "--distill-steps",
                                   "2", "4")) == 2
    assert one_line_error(capsys, "a LoRA student has no inputs for the step count")


@pytest.mark.parametrize("extra,says", [
    (["--init", ""], "needs --init TEACHER"),
    (["--distill-steps", "3", "--teacher-steps", "16"], "must each divide --teacher-steps 16"),
    (["--distill-guidance", "6", "2"], "1 <= LO <= HI"),
])
def test_bad_distillation_options_are_one_line_errors(teacher, tmp_path, capsys, extra, says):
    args = distill_args(teacher, tmp_path / "x", "--steps", "1") + extra
    assert train.main(args) == 2
    assert one_line_error(capsys, says)


def test_the_few_step_bench_compares_samplers_caching_and_students(teacher, tmp_path):
    from bench import few_step

    student = tmp_path / "student"
    assert train.main(distill_args(teacher, student, "--steps", "1", "--distill-steps", "2", "--teacher-steps", "4",
                                   "--num-workers", "0", "--checkpoint-every", "0")) == 0
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle moving left\na blue square moving up\n")
    out = tmp_path / "few"
    assert few_step.main(["--teacher", str(teacher), "--captions", str(captions), "--student", str(student), "--k", "1",
                          "--cache", "1e9", "--out", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert rows["teacher, euler 2 steps (reference)"]["passes"] == 4 and rows["teacher, euler 4 steps"]["passes"] == 8
    assert rows["teacher, euler 2 steps, cache 1e+09"]["passes"] == 4  # two steps: the first and last always run
    assert rows["student student, 2 steps"]["passes"] == 2 and rows["teacher, euler 2 steps (reference)"]["gap"] == 0
    assert 0 < rows["student student, 2 steps"]["gap"] and "| student student, 2 steps | 2.0 |" in out.with_suffix(".md").read_text()
