"""sample.py with a tiny model trained inside the test: mp4s of the requested shape, determinism, the
denoising trajectory, the Euler solver against diffusers, the token budget and the bad-input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from evaluation.motion_score import read_frames
from dit3d.flow import sample as flow_sample
from tests.conftest import write_tiny_dit_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample_run")
    write_tiny_dit_inputs(root)
    args = ["--stage", "dit", "--data", str(root / "shards"), "--vae", str(root / "vae"), "--out", str(root / "dit"),
            "--frames", "9", "--size", "32", "--steps", "3", "--batch-size", "2", "--num-workers", "0",
            "--checkpoint-every", "0", "--wandb", "disabled", "--no-progress", "--preview-steps", "2", "--warmup", "1"]
    assert train.main(args) == 0
    return root / "dit"


def test_videos_have_the_requested_shape_and_their_prompts_beside_them(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert sample.main(["--ckpt", str(run_dir), "--prompt", "a red circle moving right", "--prompt", "a blue square",
                        "--frames", "13", "--height", "32", "--width", "48", "--steps", "3", "--videos-per-prompt", "2",
                        "--out", str(out), "--no-progress", "--png", "--gif"]) == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["a_blue_square_0.mp4", "a_blue_square_1.mp4",
                                        "a_red_circle_moving_right_0.mp4", "a_red_circle_moving_right_1.mp4"]
    for v in videos:
        assert read_frames(v).shape == (13, 32, 48, 3)
        assert v.with_suffix(".png").is_file() and v.with_suffix(".gif").is_file()
    assert (out / "a_blue_square_1.txt").read_text().strip() == "a blue square"
    assert "13x32x48 is a shape this model never trained on; the nearest it did is 9x32x32" in capsys.readouterr().err
    # the training run's defaults: 9 frames at 32x32
    assert sample.main(["--ckpt", str(run_dir / "model"), "--prompt", "x", "--out", str(tmp_path / "one.mp4"),
                        "--no-progress"]) == 0
    assert read_frames(tmp_path / "one.mp4").shape == (9, 32, 32, 3)


def test_same_seed_same_video_and_a_video_does_not_depend_on_its_batch(run_dir, tmp_path):
    common = ["--ckpt", str(run_dir), "--steps", "3", "--no-progress", "--cfg", "3"]
    prompt = "a red circle moving right"
    # the same command in three processes writes the same file, byte for byte
    for n in "abc":
        subprocess.run([sys.executable, "sample.py", *common, "--prompt", prompt, "--seed", "5", "--out",
                        str(tmp_path / f"{n}.mp4")], cwd=ROOT, check=True, capture_output=True)
    a, b, c = ((tmp_path / f"{n}.mp4").read_bytes() for n in "abc")
    assert a == b == c
    sample.main(common + ["--prompt", prompt, "--seed", "6", "--out", str(tmp_path / "other_seed.mp4")])
    assert not np.array_equal(read_frames(tmp_path / "a.mp4"), read_frames(tmp_path / "other_seed.mp4"))
    # alone (batch 1) or the first of eight prompts of other lengths (batch 8): the same frames, exactly
    others = ["a blue square", "another prompt, much longer than the first one, with words", "x", "green", "a",
              "two yellow triangles moving up and down", "zz"]
    sample.main(common + ["--prompt", prompt, "--seed", "5", "--batch-size", "1", "--lossless", "--out",
                          str(tmp_path / "alone.mp4")])
    sample.main(common + [a for p in [prompt, *others] for a in ("--prompt", p)] + [
        "--seed", "5", "--batch-size", "8", "--lossless", "--out", str(tmp_path / "batch")])
    alone = read_frames(tmp_path / "alone.mp4")
    assert np.array_equal(read_frames(tmp_path / "batch" / "a_red_circle_moving_right.mp4"), alone)
    assert (tmp_path / "batch" / "a_red_circle_moving_right.mp4").read_bytes() == (tmp_path / "alone.mp4").read_bytes()
    sample.main(common + [a for p in [prompt, *others] for a in ("--prompt", p)] + [
        "--seed", "5", "--batch-size", "8", "--out", str(tmp_path / "lossy_batch")])
    assert (tmp_path / "lossy_batch" / "a_red_circle_moving_right.mp4").read_bytes() == a


def test_save_trajectory_writes_one_prediction_per_step(run_dir, tmp_path):
    assert sample.main(["--ckpt", str(run_dir), "--prompt", "a green triangle moving up", "--steps", "4",
                        "--save-trajectory", "--out", str(tmp_path), "--no-progress"]) == 0
    steps = sorted((tmp_path / "a_green_triangle_moving_up.trajectory").glob("step_*.mp4"))
    assert [s.name for s in steps] == [f"step_{i:03d}.mp4" for i in range(4)]
    assert read_frames(steps[0]).shape == (9, 32, 32, 3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_diffusers_flow_match_euler_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    def velocity(x, t):
        return torch.tanh(x) * t.view(-1, 1, 1) + torch.sin(3 * x)

    steps = 7
    noise = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = flow_sample(velocity, noise, steps, shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].to(torch.float64)
        x = scheduler.step(velocity(x, sigma.expand(2)), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_dry_run_prints_the_token_budget(run_dir, capsys):
    assert sample.main(["--ckpt", str(run_dir), "--frames", "17", "--height", "64", "--width", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 17 frames at 64x64 -> latents (16, 5, 8, 8) -> patch (1, 2, 2): 5 x 4 x 4 = 80 tokens; 272 without 4x in time
    assert "latents (16, 5, 8, 8) -> 80 tokens (272 without temporal compression)" in out
    assert "TFLOP" in out and "GiB" in out
    # per --sp-size (divisors of the tiny DiT's 4 heads): 80 tokens split 1, 2 and 4 ways
    assert "| 1 | 80 |" in out and "| 2 | 40 |" in out and "| 4 | 20 |" in out and "smallest --sp-size that fits here: 1" in out


def test_sequence_parallel_sampling_gives_the_same_video(run_dir, tmp_path):
    import os
    import subprocess
    import sys

    from bench.common import free_port

    common = ["--ckpt", str(run_dir), "--prompt", "a red circle moving right", "--prompt", "a blue square", "--videos-per-prompt", "2",
              "--frames", "13", "--steps", "3", "--cfg", "3", "--batch-size", "2", "--no-progress", "--png"]
    assert sample.main(common + ["--out", str(tmp_path / "one")]) == 0
    root = Path(sample.__file__).parent
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for name, extra in (("sp", ["--sp-size", "2"]), ("dp", [])):  # one sequence group of 2; two groups of 1
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                               str(free_port()), str(root / "sample.py"), *common, *extra, "--out", str(tmp_path / name)],
                              capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        names = sorted(p.name for p in (tmp_path / name).glob("*.png"))
        assert names == sorted(p.name for p in (tmp_path / "one").glob("*.png")) and len(names) == 4
        for n in names:
            a = np.asarray(Image.open(tmp_path / "one" / n), dtype=int)
            b = np.asarray(Image.open(tmp_path / name / n), dtype=int)
            assert np.abs(a - b).max() <= 1, (name, n)


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "{missing}", "--prompt", "x"], "no checkpoint at"),
    (["--ckpt", "{shards}", "--prompt", "x"], "is not a trained DiT"),
    (["--ckpt", "{run}", "--prompt", "x", "--frames", "12"], "frames must be 1 + 4k"),
    (["--ckpt", "{run}", "--prompt", "x", "--height", "36"], "height 36 is not divisible by the spatial factor 8"),
    (["--ckpt", "{run}", "--prompt", "x", "--height", "24"], "latent height 3 is not divisible by the patch size 2"),
    (["--ckpt", "{run}", "--prompts", "{empty}"], "has no prompts"),
    (["--ckpt", "{run}"], "no prompt: give --prompt"),
    (["--ckpt", "{run}", "--prompt", "x", "--cache-threshold", "-1"], "--cache-threshold must be at least 0"),
    (["--ckpt", "{run}", "--prompt", "x", "--cache-threshold", "0.1", "--sp-size", "2"], "use one or the other"),
])
def test_bad_input_gets_a_one_line_error(run_dir, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fill = {"missing": str(tmp_path / "nope"), "shards": str(tmp_path), "run": str(run_dir), "empty": str(empty)}
    assert sample.main([a.format(**fill) for a in args] + ["--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_step_caching_reports_what_it_skipped_and_keeps_the_trajectory(run_dir, tmp_path, capsys):
    out = tmp_path / "c.mp4"
    assert sample.main(["--ckpt", str(run_dir), "--prompt", "a red circle moving right", "--steps", "6",
                        "--cache-threshold", "1e9", "--save-trajectory", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "step caching at 1e+09: the DiT's blocks skipped on 8 of 12 video passes (67%)" in err  # guided: 2 rows
    assert len(list(out.with_suffix(".trajectory").glob("step_*.mp4"))) == 6 and out.stat().st_size > 0


def test_a_video_is_the_same_float_for_float_in_any_batch(run_dir):
    """Below the uint8 rounding that the file test above could hide: the latents and the decoded video of a prompt
    are the same floats alone and beside seven prompts of other lengths (the text is padded to the encoder's most,
    not the batch's longest; each video is decoded on its own; the matrix products are oneMKL's strict mode, as in
    every command: cpu_math)."""
    from cpu_math import strict_cpu_math
    from pipeline import Pipeline

    pipe = Pipeline.load(run_dir)
    assert strict_cpu_math() or not torch.backends.mkl.is_available()
    prompt = "a red circle moving right"
    others = ["a blue square", "another prompt, much longer than the first one, with words", "x", "green", "a",
              "two yellow triangles moving up and down", "zz"]
    kw = dict(frames=9, height=32, width=32, steps=3, guidance=3.0)
    alone = pipe.generate([prompt], seeds=[5], **kw)
    batch = pipe.generate([prompt, *others], seeds=[5, 1, 2, 3, 4, 6, 7, 8], **kw)
    assert torch.equal(alone[0], batch[0])
    assert torch.equal(pipe.decode(alone)[0], pipe.decode(batch)[0])


def test_memory_is_counted_whole_and_a_run_that_cannot_fit_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    from pipeline import Pipeline

    pipe = Pipeline.load(run_dir)
    b = pipe.budget(33, 32, 32, steps=3, guidance=3.0, batch=2, text_tokens=pipe.text_tokens(), decode_chunk=2)
    weights = sum(p.numel() * 4 for m in (pipe.model, pipe.vae) for p in m.parameters()) / 2**30
    assert b["weights_gb"] == pytest.approx(weights) and b["decode_gb"] > 0
    latents = 4 * (2 * 2) * (16 * 9 * 4 * 4) * 4 / 2**30  # 4 copies of the batch's latents, with guidance's twins
    assert b["memory_gb"] == pytest.approx(b["weights_gb"] + latents + max(b["denoise_gb"] - latents, b["decode_gb"]))
    # more than is free: refused before sampling, unless forced
    monkeypatch.setattr(sample, "free_memory_gb", lambda device: b["weights_gb"] / 2)
    common = ["--ckpt", str(run_dir), "--prompt", "a red circle", "--steps", "1", "--no-progress"]
    assert sample.main(common + ["--out", str(tmp_path / "a.mp4")]) == 2
    err = capsys.readouterr().err
    assert "needs about" in err and "give --force to try anyway" in err and not (tmp_path / "a.mp4").exists()
    assert sample.main(common + ["--out", str(tmp_path / "b.mp4"), "--force"]) == 0
    assert "going on (--force)" in capsys.readouterr().err and (tmp_path / "b.mp4").is_file()


def test_the_split_advised_is_one_this_host_can_run():
    rows = [{"sp": 1, "memory_gb": 10.0}, {"sp": 2, "memory_gb": 6.0}, {"sp": 4, "memory_gb": 4.0}]
    assert sample.smallest_split(rows, free=7.0, gpus=8).startswith("smallest --sp-size that fits here: 2")
    assert sample.smallest_split(rows, free=5.0, gpus=2).startswith(  # fits a GPU at 4 ranks, but there are 2
        "no --sp-size fits on this host's 2 GPU(s): --sp-size 4 fits GPUs like this one, across hosts")
    # on the CPU the ranks share one memory, each with its own weights: 2 ranks of 4 GiB need 8
    cpu = [{"sp": 1, "memory_gb": 10.0}, {"sp": 2, "memory_gb": 4.0}, {"sp": 4, "memory_gb": 3.0}]
    assert sample.smallest_split(cpu, free=9.0, gpus=0).startswith("smallest --sp-size that fits here: 2")
    assert sample.smallest_split(cpu, free=11.0, gpus=0).startswith("smallest --sp-size that fits here: 1")
    assert sample.smallest_split(cpu, free=7.0, gpus=0).startswith("no --sp-size fits in this host's memory")


def test_a_video_is_written_chunk_by_chunk_with_the_bytes_of_the_whole(run_dir, tmp_path):
    from data import encode_mp4
    from pipeline import Pipeline

    pipe = Pipeline.load(run_dir)
    z = pipe.generate(["a red circle moving right"], frames=33, height=32, width=32, steps=2, guidance=3.0, seeds=[0])
    chunks = list(pipe.decode_chunks(z[0], chunk=2))
    assert len(chunks) == 5 and [c.shape[1] for c in chunks] == [5, 8, 8, 8, 4]
    whole = pipe.decode(z, chunk=2)[0]
    assert torch.equal(torch.cat(chunks, 1), whole)
    args = sample.build_parser().parse_args(["--ckpt", "x", "--out", str(tmp_path)])
    sample.write_outputs(tmp_path / "v.mp4", iter(chunks), "a red circle moving right", 8.0, args, 3.0)
    assert (tmp_path / "v.mp4").read_bytes() == encode_mp4(whole, 8.0)


def test_extrapolate_acts_past_the_trained_length_only(run_dir, tmp_path, capsys):
    """The run trained on 9-frame clips (3 latent frames): --extrapolate changes nothing at 9 frames (and says
    so) and changes the video at 4x."""
    common = ["--ckpt", str(run_dir), "--prompt", "a red circle moving right", "--steps", "2", "--no-progress",
              "--lossless"]
    for frames in ("9", "33"):
        sample.main(common + ["--frames", frames, "--out", str(tmp_path / f"plain_{frames}.mp4")])
        for method in ("riflex", "ntk", "pi"):
            sample.main(common + ["--frames", frames, "--extrapolate", method, "--out", str(tmp_path / f"{method}_{frames}.mp4")])
    err = capsys.readouterr().err
    assert "--extrapolate riflex changes nothing here: 9 frames are 3 token frames, and the model trained on up to 3" in err
    # the tiny preset of this run places time by token-frame index: 33 frames go past every place it saw, which
    # only position interpolation (of those features too) serves: one warning per other setting at 33 frames
    warning = ("this model adds absolute features of each token frame's index and trained on up to 3 (9 frames): 33 "
               "frames place 6 token frame(s) where it has never seen one")
    assert err.count(warning) == 3 and "--extrapolate pi interpolates those features" in err
    for method in ("riflex", "ntk", "pi"):
        assert (tmp_path / f"{method}_9.mp4").read_bytes() == (tmp_path / "plain_9.mp4").read_bytes()
        assert not np.array_equal(read_frames(tmp_path / f"{method}_33.mp4"), read_frames(tmp_path / "plain_33.mp4"))


def test_a_run_trained_for_a_length_records_it_and_samples_with_it(run_dir, tmp_path, capsys):
    """train.py --extrapolate riflex --extrapolate-frames 33 fine-tunes with RIFLEx's frequencies for 33 frames:
    pipeline.json records them, loading puts them back (at every length, the trained one too), and another
    --extrapolate at sampling, or a target no longer than the training clips, is a one-line error."""
    from pipeline import Pipeline
    from dit3d.rope import TimeScaling

    root = run_dir.parent
    args = ["--stage", "dit", "--data", str(root / "shards"), "--vae", str(root / "vae"), "--init", str(run_dir),
            "--frames", "9", "--size", "32", "--steps", "2", "--batch-size", "2", "--num-workers", "0",
            "--checkpoint-every", "0", "--wandb", "disabled", "--no-progress", "--preview-steps", "1", "--warmup", "1"]
    assert train.main(args + ["--out", str(tmp_path / "ft"), "--extrapolate", "riflex", "--extrapolate-frames", "33"]) == 0
    spec = json.loads((tmp_path / "ft" / "model" / "pipeline.json").read_text())
    assert spec["time_scaling"] == {"method": "riflex", "trained": 3, "target": 9}
    pipe = Pipeline.load(tmp_path / "ft")
    assert pipe.model.dit.time_scaling == TimeScaling("riflex", 3, 9)
    pipe.extrapolate_time(None, 9)
    assert pipe.model.dit.time_scaling == TimeScaling("riflex", 3, 9)  # kept: the weights expect it
    assert Pipeline.load(run_dir).model.dit.time_scaling is None
    common = ["--ckpt", str(tmp_path / "ft"), "--prompt", "a red circle", "--steps", "1", "--no-progress"]
    assert sample.main(common + ["--frames", "33", "--out", str(tmp_path / "a.mp4")]) == 0
    assert sample.main(common + ["--frames", "33", "--extrapolate", "ntk", "--out", str(tmp_path / "b.mp4")]) == 2
    assert ("this model was trained with --extrapolate riflex (for 9 token frames), which its weights expect at every "
            "length: drop --extrapolate ntk") in capsys.readouterr().err
    assert train.main(args + ["--out", str(tmp_path / "short"), "--extrapolate", "riflex", "--extrapolate-frames", "9"]) == 2
    assert ("--extrapolate-frames 9 is 3 token frames, no more than the 3 of the longest clips trained on (9 frames): "
            "give a longer length") in capsys.readouterr().err
    assert train.main(args + ["--out", str(tmp_path / "alone"), "--extrapolate", "pi"]) == 2
    assert "--extrapolate METHOD and --extrapolate-frames FRAMES go together" in capsys.readouterr().err


def test_the_motion_bench_compares_lengths_and_extrapolations(run_dir, tmp_path):
    from bench import motion

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle moving right\na blue square moving up\n")
    out = tmp_path / "length.json"
    assert motion.main(["--ckpt", str(run_dir), "--captions", str(captions), "--k", "1", "--steps", "2",
                        "--frames", "9", "33", "--extrapolate", "none", "riflex", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["frames"], r["extrapolate"]) for r in results] == [(9, "none"), (9, "riflex"), (33, "none"), (33, "riflex")]
    assert all(r["trained_frames"] == 9 and r["videos"] == 2 for r in results)
    scores = {(r["frames"], r["extrapolate"]): [s["direction"] for s in r["scores"]] for r in results}
    assert scores[(9, "none")] == scores[(9, "riflex")]  # nothing changes at the trained length


def test_the_shape_bench_separates_the_causes(run_dir, tmp_path):
    """bench/shape.py on a tiny run: every measure present, each a share in [0, 1], the word effects of the
    shape and the colour at every noise level; the clips of a group differ in one word only."""
    from bench import shape
    from pipeline import Pipeline

    captions, videos, groups, kinds = shape.rendered(Pipeline.load(run_dir), 1)
    assert len(captions) == 3 + 5 and list(kinds) == ["shape"] * 3 + ["colour"] * 5 and set(groups) == {0}
    assert len({c.split()[1] for c in captions[:3]}) == 1 and len({c.split()[2] for c in captions[:3]}) == 3
    out = tmp_path / "shape"
    assert shape.main(["--ckpt", str(run_dir), "--clips", "1", "--guidance", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.with_suffix(".json").read_text())
    assert r["clips"] == 3 and set(r["word effect"]) == {f"{k}@{t}" for k in ("shape", "colour") for t in shape.NOISE_LEVELS}
    shares = [r["tokenizer"], *r["recovery"].values(), *r["guidance"].values()]
    assert all(0 <= v <= 1 for v in shares) and all(v >= 0 for v in r["word effect"].values())
    assert "| shape@0.6 |" in out.with_suffix(".md").read_text()
