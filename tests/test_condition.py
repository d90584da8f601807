"""Known-frame conditioning: image-to-video, extension and interpolation.

The mode draw and the masks; the model with nothing given computes what the unconditioned model computes; the
loss ignores given frames; the sampler keeps them exactly; a training run with --condition, and sample.py's
--image, --keyframes and --video --extend on it, with the given frames back after decoding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from evaluation.motion_score import read_frames
from data.video_io import read_clip, read_image, read_last_frames
from data.video_write import write_video
from dit3d import DiT3D
from dit3d.condition import ConditionConfig, FrameSelection, given_mask
from dit3d.flow import flow_loss, sample as flow_sample
from pipeline import Pipeline
from tests.conftest import write_tiny_dit_inputs
from training.stage import sample_generator


# ---- modes and masks --------------------------------------------------------------------------------


def test_condition_config_parses_draws_and_rejects_bad_input():
    cfg = ConditionConfig.parse(["image=0.25", "extend=0.5", "interpolate=0.25"])
    assert cfg.active and (cfg.image, cfg.extend, cfg.interpolate) == (0.25, 0.5, 0.25)
    assert not ConditionConfig.parse(None).active
    for bad in (["image"], ["video=0.2"], ["image=abc"], ["image=0.7", "extend=0.7"], ["extend=-0.1"]):
        with pytest.raises(ValueError):
            ConditionConfig.parse(bad)
    g = torch.Generator().manual_seed(0)
    draws = [cfg.draw(g, 5) for _ in range(2000)]
    counts = {m: sum(d[0] == m for d in draws) / len(draws) for m in ("image", "extend", "interpolate", "none")}
    assert abs(counts["image"] - 0.25) < 0.04 and abs(counts["extend"] - 0.5) < 0.04 and counts["none"] == 0
    assert {m for mode, m in draws if mode == "extend"} == {1, 2, 3, 4}
    # a clip too short for a mode trains on text alone
    assert ConditionConfig(image=1.0).draw(g, 1)[0] == "none"
    assert ConditionConfig(interpolate=1.0).draw(g, 2)[0] == "none"


def test_given_masks():
    assert given_mask("none", 5).tolist() == [False] * 5
    assert given_mask("image", 5).tolist() == [True, False, False, False, False]
    assert given_mask("extend", 5, 3).tolist() == [True, True, True, False, False]
    assert given_mask("interpolate", 5).tolist() == [True, False, False, False, True]
    with pytest.raises(ValueError):
        given_mask("extend", 5, 5)


def test_select_frames_windows_and_strides():
    """Windows start at the clip's start unless their first frame is given; --latent-stride keeps every K-th."""
    z = torch.arange(17.0).view(1, 1, 17, 1, 1).expand(8, 2, 17, 2, 2).contiguous()
    keys = [f"k{i}" for i in range(8)]

    def stage(condition: ConditionConfig, window: int, stride: int):
        selection = FrameSelection(condition, stride, window)
        return lambda step: selection.select(z, [sample_generator(0, step, k, "condition") for k in keys])

    frames, given = stage(ConditionConfig(), 0, 4)(0)
    assert given is None and frames[0, 0, :, 0, 0].tolist() == [0, 4, 8, 12, 16]
    frames, given = stage(ConditionConfig(), 5, 1)(0)
    assert given is None and frames[:, 0, :, 0, 0].tolist() == [[0, 1, 2, 3, 4]] * 8
    starts = set()
    for step in range(4):
        frames, given = stage(ConditionConfig(extend=1.0), 5, 1)(step)
        assert frames.shape == (8, 2, 5, 2, 2) and given.shape == (8, 5)
        for row, flags in zip(frames[:, 0, :, 0, 0], given):
            first = int(row[0])
            assert row.tolist() == list(range(first, first + 5))  # contiguous
            m = int(flags.sum())
            assert 1 <= m <= 4 and flags[:m].all()  # the first m frames given
            starts.add(first)
    assert len(starts) > 3  # anywhere in the clip
    frames, given = stage(ConditionConfig(image=1.0), 5, 1)(0)
    assert (frames[:, 0, 0, 0, 0] == 0).all() and given[:, 0].all() and not given[:, 1:].any()


# ---- model, loss, sampler ---------------------------------------------------------------------------


def test_nothing_given_is_the_unconditioned_model():
    torch.manual_seed(0)
    cfg = DiT3D.from_preset("tiny", in_channels=4, depth=2).config
    plain = DiT3D(cfg)
    cond = DiT3D(dataclasses.replace(cfg, frame_conditioning=True))
    for m in (plain, cond):  # non-zero outputs, so that the comparison means something
        torch.nn.init.normal_(m.out.weight, std=0.1)
        torch.nn.init.normal_(m.time_modulation[1].weight, std=0.1)
    state = plain.state_dict()
    cond_state = cond.state_dict()
    per_channel = state["embed.weight"].shape[1] // cfg.in_channels  # patchify is channel-major
    state["embed.weight"] = torch.cat([state["embed.weight"], cond_state["embed.weight"][:, -per_channel:]], dim=1)
    cond.load_state_dict(state)
    x, t = torch.randn(2, 4, 3, 4, 4), torch.rand(2)
    text = torch.randn(2, 5, cfg.text_dim)
    expected = plain(x, t, text)
    assert expected.abs().mean() > 0
    torch.testing.assert_close(cond(x, t, text), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond(x, t, text, given=torch.zeros(2, 3, dtype=torch.bool)), expected, rtol=0, atol=1e-6)
    flagged = cond(x, t, text, given=torch.tensor([[True, False, False], [False, False, False]]))
    assert not torch.allclose(flagged[0], expected[0]) and torch.allclose(flagged[1], expected[1], atol=1e-6)
    with pytest.raises(ValueError, match="without frame conditioning"):
        plain(x, t, text, given=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="given must be"):
        cond(x, t, text, given=torch.ones(2, 4, dtype=torch.bool))


def test_loss_ignores_given_frames():
    torch.manual_seed(0)
    v, target = torch.randn(3, 4, 5, 2, 2), torch.randn(3, 4, 5, 2, 2)
    generate_mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, False],
                                  [True] * 5])
    loss = flow_loss(v, target, generate_mask)
    changed = v.clone()
    changed[0, :, 0] += 10
    changed[1, :, [0, 1, 4]] -= 7
    assert torch.equal(flow_loss(changed, target, generate_mask), loss)
    changed[1, :, 2] += 1
    assert not torch.equal(flow_loss(changed, target, generate_mask), loss)
    # each sample averaged over its generated frames, then the samples averaged
    per = [((v[i] - target[i]) ** 2)[:, generate_mask[i]].mean() for i in range(3)]
    torch.testing.assert_close(loss, torch.stack(per).mean())
    torch.testing.assert_close(flow_loss(v, target, None), torch.nn.functional.mse_loss(v, target))


@pytest.mark.parametrize("solver", ["euler", "heun", "unipc", "dpm++"])
def test_sampler_keeps_given_frames_exactly(solver):
    torch.manual_seed(0)
    known = torch.randn(2, 3, 4, 2, 2)
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    seen = []

    def velocity(x, t):
        seen.append(x.clone())
        return torch.sin(x) + t.view(-1, 1, 1, 1, 1)

    out = flow_sample(velocity, torch.randn(2, 3, 4, 2, 2), 5, 2.0, solver, given=(known, mask))
    for x in seen + [out]:
        assert torch.equal(x.permute(0, 2, 1, 3, 4)[mask], known.permute(0, 2, 1, 3, 4)[mask])
    assert not torch.equal(out.permute(0, 2, 1, 3, 4)[~mask], known.permute(0, 2, 1, 3, 4)[~mask])


# ---- train.py --condition and sample.py's known frames ----------------------------------------------


def tiny_run(root: Path, name: str, extra: list[str]) -> Path:
    if not (root / "shards").is_dir():
        write_tiny_dit_inputs(root)
    args = ["--stage", "dit", "--data", str(root / "shards"), "--vae", str(root / "vae"), "--out", str(root / name),
            "--frames", "9", "--size", "32", "--steps", "3", "--batch-size", "4", "--num-workers", "0",
            "--checkpoint-every", "0", "--wandb", "disabled", "--no-progress", "--preview-steps", "2", "--warmup", "1"]
    assert train.main(args + extra) == 0
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("condition_runs")
    return {"cond": tiny_run(root, "cond", ["--condition", "image=0.3", "extend=0.3", "interpolate=0.3"]),
            "plain": tiny_run(root, "plain", ["--steps", "1"]), "root": root}


@pytest.mark.parametrize("embed", ["linear", "conv"])
def test_frame_conditioning_added_to_a_trained_dit_changes_nothing_until_frames_are_given(embed):
    from dit3d.model import with_frame_conditioning

    torch.manual_seed(0)
    plain = DiT3D(DiT3D.from_preset("tiny", in_channels=4, depth=2, patch_embed=embed).config)
    for p in plain.parameters():  # away from the zero-output initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    cond = with_frame_conditioning(plain)
    assert cond.config.frame_conditioning and with_frame_conditioning(cond) is cond
    x, t, text = torch.randn(2, 4, 3, 4, 4), torch.rand(2), torch.randn(2, 5, plain.config.text_dim)
    with torch.no_grad():
        expected = plain(x, t, text)
        torch.testing.assert_close(cond(x, t, text, given=torch.zeros(2, 3, dtype=torch.bool)), expected, rtol=0, atol=1e-6)
        flag = cond.embed.weight[:, -1] if embed == "conv" else cond.embed.weight[:, -cond.embed.weight.shape[1] // 5:]
        flag.add_(0.1 * torch.randn_like(flag))  # the flag's weights trained: a given frame counts, nothing else changes
        torch.testing.assert_close(cond(x, t, text), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(cond(x, t, text, given=torch.tensor([[True, False, False]] * 2)), expected, atol=1e-4)


def test_fine_tuning_a_text_to_video_run_with_condition_adds_the_flag(runs, capsys):
    """--init a run trained without frame conditioning, with --condition: it fine-tunes into extension (the
    flag's channel added at zero); with LoRA, which cannot train that channel, a one-line error."""
    ft = tiny_run(runs["root"], "plain_to_extend", ["--init", str(runs["plain"]), "--condition", "extend=0.5", "--steps", "2"])
    assert json.loads((ft / "model" / "dit" / "config.json").read_text())["config"]["frame_conditioning"] is True
    args = ["--stage", "dit", "--data", str(runs["root"] / "shards"), "--vae", str(runs["root"] / "vae"), "--out",
            str(runs["root"] / "lora_extend"), "--init", str(runs["plain"]), "--condition", "extend=0.5", "--lora-rank", "4",
            "--frames", "9", "--size", "32", "--steps", "1", "--num-workers", "0", "--wandb", "disabled", "--no-progress"]
    assert train.main(args) == 2
    assert "adds an input channel that LoRA adapters cannot train: fine-tune it fully (drop --lora-rank)" in capsys.readouterr().err


def test_training_with_condition_records_it(runs):
    model = runs["cond"] / "model"
    assert json.loads((model / "dit" / "config.json").read_text())["config"]["frame_conditioning"] is True
    assert json.loads((model / "pipeline.json").read_text())["condition"] == {"image": 0.3, "extend": 0.3,
                                                                                 "interpolate": 0.3}
    metrics = [json.loads(line) for line in (runs["cond"] / "metrics.jsonl").read_text().splitlines()]
    assert any(0 < m.get("given_frames", 0) < 1 for m in metrics)


def frame_png(path: Path, rgb: tuple[int, int, int], box: tuple[int, int]) -> Path:
    image = np.full((1, 32, 32, 3), 20, dtype=np.uint8)
    image[0, box[0]:box[0] + 10, box[1]:box[1] + 10] = rgb
    from PIL import Image

    Image.fromarray(image[0]).save(path)
    return path


def test_image_and_keyframes_come_back_after_decoding(runs, tmp_path):
    pipe = Pipeline.load(runs["cond"])
    first = frame_png(tmp_path / "a.png", (230, 40, 40), (4, 4))
    last = frame_png(tmp_path / "b.png", (230, 40, 40), (18, 18))
    args = sample.build_parser().parse_args(["--ckpt", str(runs["cond"]), "--prompt", "a red square moving right",
                                             "--keyframes", str(first), str(last), "--steps", "3"])
    known = sample.KnownFrames(args, pipe, 9, 32, 32, 8.0)
    sampler = dict(steps=3, guidance=3.0)
    z = known.generate(["a red square moving right"] * 2, [0, 1], sampler)
    image = read_image(first, 32, 32)
    torch.testing.assert_close(z[:, :, 0], pipe.encode(image[None, :, None])[:, :, 0].expand(2, -1, -1, -1))
    torch.testing.assert_close(z[:, :, -1:], pipe.held_latent(read_image(last, 32, 32)[None]).expand(2, -1, -1, -1, -1))
    video = pipe.decode(z)
    # the tokenizer is causal: the first output frame is the image's own reconstruction
    reconstruction = pipe.decode(pipe.encode(image[None, :, None]))[0, :, 0]
    torch.testing.assert_close(video[0, :, 0], reconstruction, atol=1e-5, rtol=0)
    # and from the command line: an mp4, and a lossless contact sheet whose first frame is the reconstruction
    out = tmp_path / "i2v.mp4"
    assert sample.main(["--ckpt", str(runs["cond"]), "--prompt", "a red square moving right", "--image", str(first),
                        "--steps", "3", "--out", str(out), "--png", "--no-progress"]) == 0
    assert read_frames(out).shape == (9, 32, 32, 3)
    from PIL import Image

    sheet = np.asarray(Image.open(out.with_suffix(".png")))
    expected = ((reconstruction.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(sheet[:32, :32].astype(float) - expected).max() <= 1  # uint8 rounding


def test_extend_continues_a_clip_and_keeps_it(runs, tmp_path):
    clip = tmp_path / "clip.mp4"
    frames = np.stack([np.full((32, 32, 3), 10 * i, dtype=np.uint8) for i in range(14)])  # 14: the tail 13 are used
    frames[:, 8:18, 8:18] = (40, 200, 70)
    write_video(clip, torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1, fps=8.0)
    out = tmp_path / "longer.mp4"
    assert sample.main(["--ckpt", str(runs["cond"]), "--prompt", "a green square moving left", "--video", str(clip),
                        "--extend", "8", "--context", "1", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert read_frames(out).shape == (13 + 8, 32, 32, 3)
    # at the pipeline level: the clip's latents are kept exactly, and the new ones follow
    pipe = Pipeline.load(runs["cond"])
    tail = read_last_frames(clip, 32, 32, 8.0, 4)
    assert tail.shape[1] == 13
    torch.testing.assert_close(tail[:, 0], read_clip(clip, 1, size=(32, 32), start=1).to_tensor()[:, 0])
    latents = pipe.encode(tail[None])
    z = pipe.extend(latents, ["a green square moving left"], 2, window=3, context=1, seeds=[0], steps=2, guidance=3.0)
    assert z.shape[2] == latents.shape[2] + 2 and torch.equal(z[:, :, :latents.shape[2]], latents)
    # the same seed gives the same continuation, alone or in a batch
    both = pipe.extend(latents.expand(2, -1, -1, -1, -1), ["a green square moving left", "another prompt"], 2, window=3,
                       context=1, seeds=[0, 9], steps=2, guidance=3.0)
    torch.testing.assert_close(both[:1], z, atol=1e-4, rtol=0)


def test_known_frame_errors(runs, tmp_path, capsys):
    image = frame_png(tmp_path / "a.png", (230, 40, 40), (4, 4))
    plain = Pipeline.load(runs["plain"])  # the library refuses given frames too (the DiT itself checks)
    shape = plain.latent_shape(9, 32, 32)
    given = plain.condition(shape, {0: torch.zeros(1, shape[0], 1, *shape[2:])})
    with pytest.raises(ValueError, match="without frame conditioning"):
        plain.generate_latents(["x"], shape, steps=1, guidance=1.0, seeds=[0], given=given)
    cases = [
        (["--ckpt", str(runs["plain"]), "--image", str(image)], "without frame conditioning"),
        (["--ckpt", str(runs["cond"]), "--image", str(tmp_path / "missing.png")], "no image at"),
        (["--ckpt", str(runs["cond"]), "--extend", "8"], "--extend and --context continue a clip"),
        (["--ckpt", str(runs["cond"]), "--video", str(image), "--extend", "6"], "a positive multiple of 4"),
        (["--ckpt", str(runs["cond"]), "--video", str(image), "--extend", "8", "--context", "3"], "--context must be"),
    ]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases.append((["--ckpt", str(runs["cond"]), "--image", str(tmp_path / "bad.png")], "cannot read the image"))
    for argv, message in cases:
        assert sample.main(argv + ["--prompt", "x", "--steps", "1", "--out", str(tmp_path / "o.mp4"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err


def test_the_length_bench_puts_one_pass_beside_extension(runs, tmp_path):
    """bench/length.py on a model trained with frame conditioning: at 2x the trained 9 frames, one pass (as
    trained and with position interpolation) and window-by-window extension, scored on the same captions and
    seeds; extension's first window is the 1x video itself (the same seed, kept exactly, decoded causally)."""
    from bench import length

    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle moving right\na blue square moving up\n")
    out = tmp_path / "length"
    assert length.main(["--ckpt", str(runs["cond"]), "--captions", str(captions), "--k", "1", "--lengths", "1", "2",
                        "--modes", "none", "pi", "extend", "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["frames"], r["mode"]) for r in results] == [(9, "none"), (17, "none"), (17, "pi"), (17, "extend")]
    assert all(r["videos"] == 2 and len(r["tracks"][0]) == r["frames"] for r in results)
    assert results[3]["tracks"][0][:9] == results[0]["tracks"][0] and results[3]["tracks"][1][:9] == results[0]["tracks"][1]
    assert "identity" in results[1]["summary"]["all"] and out.with_suffix(".png").stat().st_size > 0
    assert "| 17 (2x) | extend | 2 |" in out.with_suffix(".md").read_text()
    both = tmp_path / "both"  # two runs' files combined: here the same run twice, so every range is one value
    assert length.main(["--combine", str(out.with_suffix(".json")), str(out.with_suffix(".json")), "--out", str(both)]) == 0
    presence = results[3]["summary"]["all"]["presence"]
    assert f"| 17 (2x) | extend | 2 | {presence:.3f} [{presence:.2f}, {presence:.2f}] |" in both.with_suffix(".md").read_text()
    cost = length.cost(str(runs["cond"]), "a red circle", [9], [18])
    assert cost[0]["tokens_per_s"] > 0 and cost[0]["peak_mb"] > 0 and cost[0]["decode_peak_mb"] > 0  # MiB-scale: no order
