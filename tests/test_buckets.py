"""Training in buckets of (frames, height, width): parsing and checking bucket lists, where each clip goes, the
schedule every rank shares, bucketed batches from mixed shards (synthetic clips of three aspect ratios and two
durations, PNG images, and the real test clips), their exact resume, and train.py under torchrun."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import BIKES, CARPHONE
from data import ShardWriter, make_loader, probe
from data.buckets import (PRESETS, Bucket, BucketSchedule, Packing, bucket_order, check_divisible, nearest_bucket,
                          parse_buckets)
from data.synthetic import SyntheticSpec, generate
from data.video_io import VideoInfo, check_frame_count
from errors import InputError
from tokenizer import save_vae

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = """# frames height width batch
9 32 32 2
9 32 48 2
9 48 32 2
9 32 64 1   # wide footage (the bikes clip is 2.35:1)
1 32 32 4   # images
"""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[list[str], Path]:
    """Shard folders: 30 synthetic clips of 9 frames at 32x48, 48x32 and 32x32, 5-frame clips (shorter than every
    bucket) and PNG images; and the two real clips (640x272 and 176x144); plus the bucket file."""
    root = tmp_path_factory.mktemp("mixed")
    spec = SyntheticSpec(fps=8.0, shapes=((9, 32, 48), (9, 48, 32), (9, 32, 32), (5, 32, 32), (1, 32, 32)))
    generate(root / "synth", 30, spec, seed=0, shard_size=6)  # 5 shards
    with ShardWriter(root / "real", shard_size=1) as writer:
        for i, path in enumerate((BIKES, CARPHONE)):
            writer.write({"__key__": f"real_{i}", "mp4": path.read_bytes(), "txt": f"real footage {path.stem}",
                          "json": probe(path).to_json()})
    bucket_file = root / "buckets.txt"
    bucket_file.write_text(BUCKETS)
    return [str(root / "synth"), str(root / "real")], bucket_file


# ---- bucket lists ---------------------------------------------------------------------------------------

def test_presets_keep_tokens_per_batch_about_even():
    for name in PRESETS:
        buckets = parse_buckets(name, batch_size=2)
        volumes = [b.batch_size * b.volume() for b in buckets]
        assert max(b.batch_size for b in buckets) > 2  # smaller buckets take more clips
        assert max(volumes) / min(volumes) < 2.5, name
        largest = max(buckets, key=lambda b: b.volume())
        assert largest.batch_size == 2
        aspects = {round(b.aspect, 2) for b in buckets}
        assert len(aspects) >= 3 and any(b.frames == 1 for b in buckets)  # landscape, portrait, square; images


def test_a_bucket_file_reads_and_a_typo_names_its_line_and_field(tmp_path):
    good = tmp_path / "b.txt"
    good.write_text(BUCKETS)
    buckets = parse_buckets(str(good), batch_size=8)
    assert [b.shape for b in buckets][:2] == [(9, 32, 32), (9, 32, 48)] and buckets[3].batch_size == 1
    bad = tmp_path / "bad.txt"
    bad.write_text("9 32 32 2\n9 32 4B 2\n")
    with pytest.raises(InputError, match=r"bad.txt:2: width must be a whole number, got '4B'"):
        parse_buckets(str(bad))
    bad.write_text("9 32\n")
    with pytest.raises(InputError, match=r"bad.txt:1: expected 'frames height width \[batch\]'"):
        parse_buckets(str(bad))
    bad.write_text("9 32 32\n9 32 32 4\n")
    with pytest.raises(InputError, match="listed twice"):
        parse_buckets(str(bad))
    with pytest.raises(InputError, match="neither a preset"):
        parse_buckets(str(tmp_path / "missing.txt"))


def test_a_shape_the_model_cannot_divide_names_the_nearest_valid_one():
    with pytest.raises(InputError, match=r"bucket 9x40x68: .* multiples of 16 and 16 .* nearest valid shape is 9x48x64"):
        check_divisible([Bucket(9, 32, 32, 1), Bucket(9, 40, 68, 1)], (16, 16), check_frame_count)
    with pytest.raises(InputError, match=r"bucket 8x32x32: .*1 \+ 4k"):
        check_divisible([Bucket(8, 32, 32, 1)], (16, 16), check_frame_count)


def test_each_clip_goes_to_the_nearest_aspect_ratio_whose_duration_it_fills():
    buckets = parse_buckets("64p", batch_size=1)  # 64x64, 64x96, 96x64 at 1, 9 and 17 frames
    names = lambda order: [buckets[i].name for i in order]  # noqa: E731
    video = lambda w, h, frames: VideoInfo(24.0, frames, w, h, frames / 24, "h264")  # noqa: E731
    assert names(bucket_order(buckets, video(1920, 1080, 100), fps=None))[0] == "17x64x96"  # 16:9
    assert names(bucket_order(buckets, video(1080, 1920, 100), fps=None))[0] == "17x96x64"  # 9:16
    assert names(bucket_order(buckets, video(600, 560, 100), fps=None))[0] == "17x64x64"  # nearly square
    assert names(bucket_order(buckets, video(1920, 1080, 12), fps=None))[0] == "9x64x96"  # too short for 17
    assert names(bucket_order(buckets, video(1920, 1080, 40), fps=8.0))[0] == "9x64x96"  # 17 at 8 fps needs 49
    assert bucket_order(buckets, video(1920, 1080, 5), fps=None) == []  # shorter than every bucket
    image = VideoInfo(0.0, 1, 1920, 1080, 0.0, "png")
    assert names(bucket_order(buckets, image, fps=None)) == ["1x64x96", "1x64x64", "1x96x64"]
    assert nearest_bucket([[17, 64, 96], [9, 64, 64]], 17, 720, 1280) == (17, 64, 96)


def test_the_schedule_is_the_same_everywhere_and_keeps_every_prefix_within_two_batches_of_its_share():
    buckets = parse_buckets("64p", batch_size=2)
    counts = [30, 0, 0, 20, 5, 5, 10, 60, 40]
    a, b = BucketSchedule(buckets, counts, seed=3), BucketSchedule(buckets, counts, seed=3)
    seq = [a(n) for n in range(3000)]
    assert [b(n) for n in range(2999, -1, -1)][::-1] == seq  # random access equals the sequence
    walk = b.start()
    assert [b.advance(walk, n) for n in range(5, 3000, 7)] == seq[5::7]  # a reader's walk over its own batches
    assert walk["n"] == 2994 + 1  # past the last batch it asked for
    other = BucketSchedule(buckets, counts, seed=4)
    assert seq != [other(n) for n in range(3000)]
    share = [c / bk.batch_size for c, bk in zip(counts, buckets)]
    share = [s / sum(share) for s in share]
    seen = Counter()
    for n, k in enumerate(seq, 1):
        seen[k] += 1
        for i, p in enumerate(share):
            assert abs(seen[i] - n * p) <= 2
    assert seen[1] == seen[2] == 0  # buckets no sample fits are never drawn
    with pytest.raises(InputError, match="no sample of the data fits any bucket"):
        BucketSchedule(buckets, [0] * len(buckets), seed=0)


# ---- bucketed batches ------------------------------------------------------------------------------------

def bucketed(mixed, **kwargs):
    urls, bucket_file = mixed
    kwargs = {"num_workers": 0, "seed": 1, "shuffle_buffer": 8, "backlog": 8} | kwargs
    return make_loader(urls, 2, None, None, buckets=parse_buckets(str(bucket_file)), **kwargs)


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_every_batch_holds_one_bucket_the_same_on_every_rank(mixed):
    loaders = [bucketed(mixed, rank=r, world_size=2) for r in (0, 1)]
    runs = [take(loader, 24) for loader in loaders]
    schedule = loaders[0].dataset.schedule
    for n, (a, b) in enumerate(zip(*runs)):
        assert a["bucket"] == b["bucket"] == schedule.buckets[schedule(n)].name
        bucket = schedule.buckets[schedule(n)]
        assert a["video"].shape == b["video"].shape == (bucket.batch_size, 3, *bucket.shape)
        assert set(a["key"]).isdisjoint(b["key"])  # the ranks read their own shards
    used = Counter(batch["bucket"] for batch in runs[0])
    assert {"9x32x32", "9x32x48", "9x48x32", "1x32x32"} <= set(used)  # both aspects, squares and images
    keys = {k for run in runs for batch in run for k in batch["key"]}
    assert keys & {"real_0", "real_1"}  # the real footage trains too
    skipped = loaders[0].skipped + loaders[1].skipped
    assert skipped["too_short"] > 0 and set(skipped) <= {"too_short", "bucket_full"}


def test_the_bucket_of_the_real_clips_follows_their_aspect_ratio(mixed):
    loader = bucketed(mixed, world_size=1, rank=0)
    seen = {}
    for batch in take(loader, 60):
        for key in batch["key"]:
            seen.setdefault(key, batch["bucket"])
    assert seen["real_0"] == "9x32x64"  # bikes, 640x272: the widest bucket
    assert seen["real_1"] == "9x32x32"  # carphone, 176x144 (1.22): the square one
    assert all(seen[k] == "1x32x32" for k in seen if k.startswith("synth") and k in pngs(mixed))


def pngs(mixed) -> set[str]:
    from data import iter_shard_samples
    return {s["__key__"] for s in iter_shard_samples(mixed[0][0]) if "png" in s}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_bucketed_stream_takes_the_same_batches(mixed, workers):
    reference = bucketed(mixed, num_workers=workers)
    it = iter(reference)
    cut = None
    for n in range(1, 40):
        next(it)
        state = reference.state_dict()
        if n >= 4 and any(r.get("backlog") for r in state["readers"].values()):
            cut = n
            break
    assert cut is not None, "no cut point with samples waiting in a backlog"
    expected = [next(it) for _ in range(6)]
    resumed = bucketed(mixed, num_workers=workers)
    assert resumed.load_state_dict(json.loads(json.dumps(state)))
    got = take(resumed, 6)
    for a, b in zip(expected, got):
        assert a["bucket"] == b["bucket"] and a["key"] == b["key"]
        assert torch.equal(a["video"], b["video"])  # the same windows and crops


def test_train_in_buckets_under_torchrun(mixed, tmp_path):
    """Two processes (gloo) train the tokenizer on the mixed shards in buckets: both ranks take the bucket of
    each step (the loop checks it every step in its one collective), images and videos in one run, and the
    per-bucket counts reach the metrics."""
    urls, bucket_file = mixed
    out = tmp_path / "run"
    from bench.common import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train.py"), "--stage", "tokenizer", "--data", urls[0], "--out", str(out), "--buckets",
           str(bucket_file), "--steps", "8", "--log-every", "8", "--num-workers", "1", "--shuffle-buffer", "8",
           "--pca-init-clips", "4", "--stats-batches", "1", "--wandb", "disabled",
           "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    counts = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("bucket_samples/")}
    assert "1x32x32" in counts and len(counts) >= 3, counts
    assert all(v % 2 == 0 for v in counts.values())  # the same bucket and batch on both ranks
    trainer = json.loads((out / "checkpoints" / "step_00000008" / "trainer.json").read_text())
    assert trainer["samples_seen"] == sum(counts.values())  # each batch's own size, over both ranks
    assert "buckets (" in proc.stderr + proc.stdout  # the scan's table at the start


@pytest.mark.slow
def test_a_stopped_bucketed_run_under_torchrun_resumes_on_the_uninterrupted_curve(mixed, tmp_path):
    """Two processes, buckets: stopped after step 3 and resumed, the run takes the batches the uninterrupted run
    takes (the same loss at every later step, the same per-bucket counts)."""
    urls, bucket_file = mixed

    def run(out: Path, *extra: str) -> None:
        from bench.common import free_port
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "train.py"), "--stage", "tokenizer", "--data", urls[0], "--out", str(out), "--buckets",
               str(bucket_file), "--steps", "6", "--log-every", "1", "--num-workers", "1", "--shuffle-buffer", "8",
               "--pca-init-clips", "4", "--stats-batches", "1", "--checkpoint-every", "3", "--wandb", "disabled",
               "--no-progress", "--device", "cpu", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "whole")
    run(tmp_path / "split", "--exit-after", "3")
    run(tmp_path / "split")
    records = {name: {r["step"]: r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                      if "loss" in r} for name in ("whole", "split")}
    assert sorted(records["split"]) == sorted(records["whole"]) == list(range(1, 7))
    for step in range(4, 7):
        assert records["split"][step]["loss"] == pytest.approx(records["whole"][step]["loss"], rel=1e-6)
    counts = lambda r: {k: v for k, v in r.items() if k.startswith("bucket_samples/")}  # noqa: E731
    assert counts(records["split"][6]) == counts(records["whole"][6])


def test_bad_bucket_options_are_one_line_errors(mixed, tmp_path, capsys):
    import train
    urls, _ = mixed
    bad = tmp_path / "bad.txt"
    bad.write_text("9 36 32 2\n")
    common = ["--stage", "tokenizer", "--data", urls[0], "--wandb", "disabled", "--device", "cpu", "--no-progress"]
    assert train.main(common + ["--out", str(tmp_path / "a"), "--buckets", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "nearest valid shape is 9x40x32" in err and "Traceback" not in err
    bad.write_text("9 32 32 2\n17 32 thirty-two\n")
    assert train.main(common + ["--out", str(tmp_path / "b"), "--buckets", str(bad)]) == 2
    assert "bad.txt:2: width must be a whole number, got 'thirty-two'" in capsys.readouterr().err


def test_latent_shards_at_mixed_shapes_train_in_the_same_buckets(mixed, tmp_path):
    """tokenizer.encode --buckets writes each clip at its bucket's shape; the DiT trains on those latents in the
    same buckets."""
    import train
    from tokenizer import CausalVAE
    from tokenizer.encode import main as encode_main

    urls, bucket_file = mixed
    torch.manual_seed(0)
    vae = CausalVAE.from_preset("tiny")
    vae.set_latent_stats(torch.zeros(16), torch.ones(16))
    save_vae(vae, tmp_path / "vae")
    assert encode_main(["--ckpt", str(tmp_path / "vae"), "--data", urls[0], "--out", str(tmp_path / "latents"),
                        "--buckets", str(bucket_file), "--workers", "0", "--device", "cpu"]) == 0
    from data import iter_shard_samples
    shapes = Counter()
    for s in iter_shard_samples(tmp_path / "latents"):
        meta = json.loads(s["json"])
        z = np.load(io.BytesIO(s["latents.npy"]))
        assert z.shape[1:] == (1 + (meta["frames"] - 1) // 4, meta["height"] // 8, meta["width"] // 8)
        shapes[(meta["frames"], meta["height"], meta["width"])] += 1
    assert {(9, 32, 48), (9, 48, 32), (9, 32, 32), (1, 32, 32)} <= set(shapes)
    loader = make_loader(tmp_path / "latents", 2, None, None, num_workers=0, buckets=parse_buckets(str(bucket_file)))
    for batch in take(loader, 8):
        f, h, w = (int(v) for v in batch["bucket"].split("x"))
        assert batch["latents"].shape[2:] == (1 + (f - 1) // 4, h // 8, w // 8)
    out = tmp_path / "dit"
    assert train.main(["--stage", "dit", "--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "latents"), "--latents",
                       "--buckets", str(bucket_file), "--out", str(out), "--steps", "4", "--num-workers", "0",
                       "--preview-steps", "1", "--wandb", "disabled", "--no-progress", "--log-every", "4"]) == 0
    spec = json.loads((out / "model" / "pipeline.json").read_text())
    assert [1, 32, 32] in spec["buckets"] and [9, 48, 32] in spec["buckets"]
    # and a few-step student of it, distilled in the same buckets (each batch one shape, images included)
    student = tmp_path / "student"
    assert train.main(["--stage", "distill", "--init", str(out), "--vae", str(tmp_path / "vae"), "--data",
                       str(tmp_path / "latents"), "--latents", "--buckets", str(bucket_file), "--out", str(student),
                       "--steps", "4", "--num-workers", "0", "--distill-steps", "2", "--teacher-steps", "4",
                       "--wandb", "disabled", "--no-progress", "--log-every", "1"]) == 0
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert len({k for r in records for k in r if k.startswith("bucket_samples/")}) >= 2  # batches of several shapes
    assert json.loads((student / "model" / "pipeline.json").read_text())["buckets"] == spec["buckets"]


# ---- packing ---------------------------------------------------------------------------------------------

def test_packed_batches_fill_the_budget_and_resume_exactly(mixed):
    urls, bucket_file = mixed
    packing = Packing(budget=40, temporal=4, cell=(1, 16, 16), pool=8)  # 9x32x32: 12 tokens, 1x32x32: 4
    make = lambda: make_loader(urls, 2, None, None, num_workers=0, seed=1, shuffle_buffer=8,  # noqa: E731
                               buckets=parse_buckets(str(bucket_file)), packing=packing)
    loader = make()
    it = iter(loader)
    batches = [next(it) for _ in range(5)]
    for batch in batches:
        assert batch["packed"] and len(batch["video"]) == len(batch["tokens"]) == len(batch["key"])
        assert sum(batch["tokens"]) <= 40
        for video, n in zip(batch["video"], batch["tokens"]):
            assert packing.tokens(video.shape[1:]) == n
    assert len({tuple(v.shape) for b in batches for v in b["video"]}) >= 3  # mixed shapes in one batch
    assert sum(sum(b["tokens"]) for b in batches) / (40 * len(batches)) > 0.8  # the budget is well used
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(it) for _ in range(4)]
    resumed = make()
    assert resumed.load_state_dict(state)
    for a, b in zip(expected, take(resumed, 4)):
        assert a["key"] == b["key"] and all(torch.equal(x, y) for x, y in zip(a["video"], b["video"]))
    with pytest.raises(InputError, match="the bucket 9x32x64 alone is 24 tokens"):
        make_loader(urls, 2, None, None, buckets=parse_buckets(str(bucket_file)),
                    packing=Packing(budget=23, temporal=4, cell=(1, 16, 16)))


def test_a_packed_batch_trains_as_each_clip_alone(mixed, tmp_path):
    """One forward_varlen over clips of mixed shapes gives each clip's own velocity, and the packed loss is the
    token-weighted mean of the losses the clips have alone (each its own noise, time and time shift)."""
    from parallel import Env
    from training.dit_stage import DiTStage
    from training.options import build_parser
    from tokenizer import CausalVAE

    torch.manual_seed(0)
    vae = CausalVAE.from_preset("tiny")
    vae.set_latent_stats(torch.zeros(16), torch.ones(16))
    save_vae(vae, tmp_path / "vae")
    args = build_parser().parse_args(["--stage", "dit", "--data", mixed[0][0], "--vae", str(tmp_path / "vae"),
                                      "--out", str(tmp_path / "run"), "--caption-dropout", "0.5"])
    stage = DiTStage(args, Env(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    stage.model.eval()
    gen = torch.Generator().manual_seed(0)
    videos = [torch.rand(3, *shape, generator=gen) * 2 - 1 for shape in ((9, 32, 48), (1, 32, 32), (9, 48, 32), (5, 32, 32))]
    keys = [f"k{i}" for i in range(len(videos))]
    captions = ["a red circle moving up", "a blue square", "a green triangle moving left", "x"]
    packed = {"video": videos, "packed": True, "tokens": [0] * 4, "key": keys, "caption": captions,
              "fps": torch.zeros(4), "meta": [{}] * 4}
    with torch.no_grad():
        loss, logs = stage.loss(stage.model, packed, step=7)
        alone = [stage.loss(stage.model, {"video": v[None], "key": [k], "caption": [c], "fps": torch.zeros(1),
                                          "meta": [{}]}, step=7)[0] for v, k, c in zip(videos, keys, captions)]
        text, mask = stage.encode_text(stage.model, captions)
        latents = [stage.vae.encode(v[None]).mean[0] for v in videos]
        t = torch.tensor([0.2, 0.5, 0.7, 0.9])
        together = stage.model(latents, t, text, mask)
        for i, z in enumerate(latents):
            own = stage.model(z[None], t[i : i + 1], text[i : i + 1], mask[i : i + 1])[0]
            torch.testing.assert_close(together[i], own, atol=2e-5, rtol=1e-4)
    tokens = [math.prod(stage.model.dit.token_grid(tuple(z.shape[1:]))) for z in latents]
    torch.testing.assert_close(loss, sum(n * a for n, a in zip(tokens, alone)) / sum(tokens), atol=1e-5, rtol=1e-5)
    assert logs["pack/padding"] == pytest.approx(1 - sum(tokens) / (4 * max(tokens)))


def test_the_scan_reads_each_samples_json_and_probes_only_those_without(mixed, tmp_path):
    from data.loader import scan_buckets
    from data.samples import buckets_for
    from data.tar_reader import expand_urls, shard_samples

    urls, bucket_file = mixed
    buckets = parse_buckets(str(bucket_file))
    with ShardWriter(tmp_path / "bare", shard_size=4) as writer:  # no KEY.json: the scan must probe the file
        writer.write({"__key__": "bare_bikes", "mp4": BIKES.read_bytes(), "txt": "bikes"})
    shards = expand_urls(urls) + expand_urls(str(tmp_path / "bare"))
    counts, scanned, problems = scan_buckets(shards, buckets, None, 10_000)
    expected = Counter()
    for sample in shard_samples(({"url": u} for u in shards), lambda *_: None):
        fit = buckets_for(sample, buckets, None)
        expected[fit[0] if fit else None] += 1
    assert scanned == sum(expected.values()) == 33 and problems == Counter({"too_short": expected[None]})
    assert counts == [expected[i] for i in range(len(buckets))]
    assert counts[3] == 2  # both wide clips (bikes with and without its KEY.json) in 9x32x64
