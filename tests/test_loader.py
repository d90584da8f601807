"""`make_loader`: shards of real and synthetic video back as batches; bad samples skipped and counted;
train streams infinite and seeded; eval splits every sample exactly once across ranks and workers."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import free_port
from data import LATENT_EXT, ShardWriter, latent_sample, make_loader, read_clip
from data import shard_stream as stream_module
from data.make_shards import main as make_shards_main
from data.video_write import encode_mp4
from parallel import teardown_distributed

from .conftest import BIKES, CARPHONE, copy_clip, truncated_copy


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("real_videos")
    copy_clip(BIKES, src / "bikes.mp4", "cyclists on a street")
    copy_clip(CARPHONE, src / "carphone.mp4", "a man on the phone in a car")
    out = tmp_path_factory.mktemp("real_shards")
    assert make_shards_main(["--input", str(src), "--out", str(out), "--shard-size", "1"]) == 0
    return out


def test_real_clips_round_trip_through_the_loader(real_shards):
    batches = list(make_loader(real_shards, 2, 17, 64, mode="eval", num_workers=0, fps=12.5))
    assert len(batches) == 1
    b = batches[0]
    assert b["video"].shape == (2, 3, 17, 64, 64) and b["video"].dtype == torch.float32
    assert b["video"].min() >= -1 and b["video"].max() <= 1
    assert b["key"] == ["bikes", "carphone"]
    assert b["caption"] == ["cyclists on a street", "a man on the phone in a car"]
    assert b["fps"].tolist() == pytest.approx([12.5, 12.5])  # 25 fps at stride 2, 29.97 fps at stride 2.4
    assert b["meta"][0]["frames"] == 250
    # the loader decodes exactly what the reader decodes from the original file
    direct = read_clip(CARPHONE, 17, fps=12.5, size=64).to_tensor()
    torch.testing.assert_close(b["video"][1], direct, rtol=0, atol=0)


def test_images_in_shards_are_one_frame_videos(tmp_path):
    import av

    src = tmp_path / "media"
    src.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    av.VideoFrame.from_ndarray(pixels, format="rgb24").to_image().save(src / "still.png")
    (src / "still.txt").write_text("a still image")
    copy_clip(CARPHONE, src / "moving.mp4", "a moving picture")
    assert make_shards_main(["--input", str(src), "--out", str(tmp_path / "s")]) == 0
    with pytest.raises(ValueError, match="different shapes .* give a size"):
        list(make_loader(tmp_path / "s", 2, 1, None, mode="eval", num_workers=0))  # native sizes differ
    stills = make_loader(tmp_path / "s", 1, 1, 32, mode="eval", num_workers=0)
    got = {b["key"][0]: b for b in stills}
    assert got["still"]["video"].shape == (1, 3, 1, 32, 32) and got["still"]["fps"].item() == 0.0
    clips = make_loader(tmp_path / "s", 1, 17, 32, mode="eval", num_workers=0)
    assert [b["key"] for b in clips] == [["moving"]] and clips.skipped == {"too_short": 1}


def test_synthetic_shards_read_back_once_each_in_eval(synthetic_shards):
    loader = make_loader(synthetic_shards, 5, 17, 64, mode="eval", num_workers=2)
    keys, captions = [], {}
    for b in loader:
        assert b["video"].shape[1:] == (3, 17, 64, 64)
        keys += b["key"]
        captions.update(zip(b["key"], b["caption"]))
        for key, caption, meta in zip(b["key"], b["caption"], b["meta"]):
            assert meta["caption"] == caption and len(meta["centers"]) == 17
    assert sorted(keys) == [f"synth_{i:06d}" for i in range(24)]
    assert loader.skipped == {}
    assert loader.report() == "no samples skipped"


def _bad_sample_shards(tmp_path: Path) -> Path:
    """Two shards, each with good samples and bad ones of every kind the loader must survive."""
    good = encode_mp4(np.full((17, 32, 32, 3), 100, np.uint8), fps=8)
    short = encode_mp4(np.full((5, 32, 32, 3), 100, np.uint8), fps=8)
    out = tmp_path / "bad_shards"
    with ShardWriter(out, shard_size=5) as w:
        w.write({"__key__": "good0", "mp4": good, "txt": "fine"})
        w.write({"__key__": "truncated", "mp4": BIKES.read_bytes()[:200_000], "txt": "cut short"})
        w.write({"__key__": "textfile", "mp4": b"just some text", "txt": "lies"})
        w.write({"__key__": "nocaption", "mp4": good})
        w.write({"__key__": "good1", "mp4": good, "txt": "fine"})
        w.write({"__key__": "tooshort", "mp4": short, "txt": "five frames"})
        w.write({"__key__": "novideo", "txt": "only words", "json": {"fps": 8}})
        w.write({"__key__": "emptycaption", "mp4": good, "txt": "  \n"})
        w.write({"__key__": "good2", "mp4": good, "txt": "fine"})
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_reported(tmp_path, workers, caplog):
    shards = _bad_sample_shards(tmp_path)
    loader = make_loader(shards, 2, 17, 32, mode="eval", num_workers=workers)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == ["good0", "good1", "good2"]
    assert loader.skipped == {"corrupt": 2, "no_caption": 2, "too_short": 1, "no_video": 1}
    assert {r.key: r.reason for r in loader.skip_log}["truncated"] == "corrupt"
    assert loader.report() == ("skipped 6 samples (2 corrupt, 2 no_caption, 1 no_video, 1 too_short); 6 distinct bad "
                               "samples or shards (2 corrupt, 2 no_caption, 1 no_video, 1 too_short), the rest were "
                               "passes over them again")
    assert "skipped textfile" in caplog.text and "too_short" in caplog.text


def test_unreadable_shard_is_skipped(tmp_path, synthetic_shards):
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    truncated_copy(shards / "000002.tar", shards / "000002.tar", fraction=0.5)  # cut mid-member
    (shards / "000004.tar").write_bytes(b"garbage, not a tar")
    loader = make_loader(shards, 4, 17, 64, mode="eval", num_workers=0)
    keys = [k for b in loader for k in b["key"]]
    assert 16 <= len(keys) < 24 and len(set(keys)) == len(keys)
    assert loader.skipped["bad_shard"] == 1 and loader.skipped["truncated_shard"] == 1  # read once each (eval)
    assert {r.url for r in loader.skip_log if r.reason == "bad_shard"} == {str(shards / "000004.tar")}
    assert {r.url for r in loader.skip_log if r.reason == "truncated_shard"} == {str(shards / "000002.tar")}


def test_a_reader_that_skips_everything_stops_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "MAX_CONSECUTIVE_SKIPS", 25)
    with ShardWriter(tmp_path / "s", 2) as w:
        w.write({"__key__": "a", "mp4": b"text", "txt": "x"})
        w.write({"__key__": "b", "mp4": b"text", "txt": "y"})
    loader = make_loader(tmp_path / "s", 1, 1, 32, mode="train", num_workers=0)
    with pytest.raises(RuntimeError, match="skipped 25 samples in a row, the last for corrupt"):
        next(iter(loader))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_stream_is_infinite_random_and_seeded(synthetic_shards):
    def run(seed, workers=2):
        loader = make_loader(synthetic_shards, 4, 9, 48, mode="train", num_workers=workers, seed=seed, shuffle_buffer=4)
        return _take(loader, 15)

    a, b, c = run(0), run(0), run(1)
    keys_a = [k for batch in a for k in batch["key"]]
    assert len(keys_a) == 60 > 24  # more than one pass over the data
    assert set(keys_a) == {f"synth_{i:06d}" for i in range(24)}
    for x, y in zip(a, b):  # same seed, same layout: identical batches, pixels included
        assert x["key"] == y["key"]
        torch.testing.assert_close(x["video"], y["video"], rtol=0, atol=0)
    assert keys_a != [k for batch in c for k in batch["key"]]
    # windows and crops are random: the same clip does not always give the same pixels
    seen: dict[str, list[torch.Tensor]] = {}
    for batch in a:
        for k, v in zip(batch["key"], batch["video"]):
            seen.setdefault(k, []).append(v)
    assert any(not torch.equal(vs[0], vs[1]) for vs in seen.values() if len(vs) > 1)
    # 2 workers each own 3 of the 6 shards: the first batches of the two workers come from different shards
    first_two = [batch["key"] for batch in a[:2]]
    shard_of = lambda k: int(k.split("_")[1]) // 4  # noqa: E731
    assert not {shard_of(k) for k in first_two[0]} & {shard_of(k) for k in first_two[1]}


def test_train_streams_mirror_and_zoom_when_asked_and_eval_streams_never_do(real_shards):
    direct = read_clip(BIKES, 9, fps=12.5, size=64).to_tensor()
    mirrored = direct.flip(-1)
    # fixed windows and centred crops: each training clip of bikes is the centre crop or its mirror image
    loader = make_loader(real_shards, 1, 9, 64, mode="train", num_workers=0, fps=12.5, window="start",
                         crop="center", hflip=True, shuffle_buffer=1)
    bikes = [b["video"][0] for b in _take(loader, 16) if b["key"][0] == "bikes"]
    assert len(bikes) >= 4
    flipped = [torch.equal(v, mirrored) for v in bikes]
    assert all(f or torch.equal(v, direct) for v, f in zip(bikes, flipped)) and 0 < sum(flipped) < len(bikes)
    # zoomed random crops differ from plain random crops of the same seeded stream
    plain, zoomed = (_take(make_loader(real_shards, 2, 9, 64, mode="train", num_workers=0, fps=12.5, seed=3,
                                       zoom=zoom), 2) for zoom in ((1.0, 1.0), (2.0, 3.0)))
    assert [b["key"] for b in plain] == [b["key"] for b in zoomed]
    assert not any(torch.equal(p["video"], z["video"]) for p, z in zip(plain, zoomed))
    # eval streams read every clip as it is
    (batch,) = make_loader(real_shards, 2, 9, 64, mode="eval", num_workers=0, fps=12.5, zoom=(2.0, 3.0), hflip=True)
    torch.testing.assert_close(batch["video"][0], direct, rtol=0, atol=0)


@pytest.mark.parametrize("workers,taken", [(0, 4), (2, 5)])
def test_train_stream_resumes_exactly_where_its_state_was_taken(synthetic_shards, workers, taken):
    """A loader restored from `state_dict()` yields the batches the uninterrupted loader yields next,
    pixels included, also when the state was taken in the middle of a round over the workers."""
    make = lambda: make_loader(synthetic_shards, 3, 9, 48, mode="train", num_workers=workers, seed=5,  # noqa: E731
                               shuffle_buffer=4)
    whole = _take(make(), taken + 4)
    first = make()
    it = iter(first)
    for _ in range(taken):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # it travels as JSON in checkpoints
    resumed = make()
    assert resumed.load_state_dict(state)
    for x, y in zip(whole[taken:], _take(resumed, 4)):
        assert x["key"] == y["key"]
        torch.testing.assert_close(x["video"], y["video"], rtol=0, atol=0)
    # another layout cannot continue those streams: it says so and starts from the beginning
    other = make_loader(synthetic_shards, 3, 9, 48, mode="train", num_workers=1, seed=5, shuffle_buffer=4)
    assert other.load_state_dict(state) is (workers == 1)


def test_url_forms_agree(synthetic_shards, tmp_path):
    def keys(urls):
        return sorted(k for b in make_loader(urls, 8, 1, 32, mode="eval", num_workers=0) for k in b["key"])

    expected = [f"synth_{i:06d}" for i in range(24)]
    assert keys(synthetic_shards) == expected
    assert keys(str(synthetic_shards / "*.tar")) == expected
    assert keys(str(synthetic_shards / "{000000..000005}.tar")) == expected
    assert keys([str(synthetic_shards / "000000.tar"), str(synthetic_shards / "00000[1-5].tar")]) == expected
    assert keys(f"pipe:cat {synthetic_shards}/{{000000..000005}}.tar") == expected
    with pytest.raises(FileNotFoundError, match="no shards found"):
        make_loader(tmp_path, 1, 1, 32)
    with pytest.raises(FileNotFoundError, match="shard not found: .*000006.tar \\(and 3 more\\)"):
        make_loader(str(synthetic_shards / "{000000..000009}.tar"), 1, 1, 32)
    with pytest.raises(ValueError, match="use 13 or 17"):
        make_loader(synthetic_shards, 1, 16, 32)


def test_latent_shards(tmp_path):
    rng = np.random.default_rng(0)
    latents = {f"clip{i}": rng.standard_normal((16, 5, 8, 8)).astype(np.float16) for i in range(5)}
    with ShardWriter(tmp_path / "latents", 2) as w:
        for key, z in latents.items():
            w.write(latent_sample(key, z, f"caption {key}", {"frames": 17, "height": 64, "width": 64, "fps": 8.0}))
    members = sorted(n for n in os.listdir(tmp_path / "latents") if n.endswith(".tar"))
    assert members == ["000000.tar", "000001.tar", "000002.tar"]
    batches = list(make_loader(tmp_path / "latents", 2, 17, 64, mode="eval", num_workers=0))
    got = {k: z for b in batches for k, z in zip(b["key"], b["latents"])}
    assert batches[0]["latents"].shape == (2, 16, 5, 8, 8) and batches[0]["latents"].dtype == torch.float32
    assert batches[0]["caption"] == ["caption clip0", "caption clip1"]
    for key, z in latents.items():
        np.testing.assert_array_equal(got[key].numpy(), z.astype(np.float32))
    # latents of another clip length are refused, not mixed into the batch
    wrong = make_loader(tmp_path / "latents", 2, 33, 64, mode="eval", num_workers=0)
    assert list(wrong) == [] and wrong.skipped == {"too_short": 5}
    assert LATENT_EXT == "latents.npy"


def _eval_rank(rank: int, world: int, port: int, shards: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ok = False
    try:
        loader = make_loader(shards, 3, 5, 32, mode="eval", num_workers=2)  # rank and world from torch.distributed
        keys = [k for b in loader for k in b["key"]]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, keys)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
        ok = True
    finally:
        teardown_distributed(ok)


def test_eval_two_ranks_two_workers_read_disjoint_shards_covering_everything(synthetic_shards, tmp_path):
    out = tmp_path / "keys.json"
    mp.spawn(_eval_rank, args=(2, free_port(), str(synthetic_shards), str(out)), nprocs=2, join=True)
    per_rank = json.loads(out.read_text())
    shards_of = [{int(k.split("_")[1]) // 4 for k in keys} for keys in per_rank]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == [f"synth_{i:06d}" for i in range(24)]
    # reader g = rank * 2 + worker takes shards g, g + 4, ...: rank 0 reads shards 0, 1, 4, 5; rank 1 reads 2, 3
    assert shards_of == [{0, 1, 4, 5}, {2, 3}]


def test_a_shard_cut_off_mid_member_gives_what_it_holds_and_is_named_truncated(tmp_path):
    """A tar cut inside the member after a good sample: the good sample trains, the shard is reported as
    truncated (once per bad shard as well as per pass), and the run does not end. webdataset's grouping across
    shards merged that sample with the next pass's, skipping everything as 'duplicate file name'."""
    import tarfile

    from data.synthetic import SyntheticSpec, generate

    out = tmp_path / "shards"
    generate(out, 4, SyntheticSpec(frames=5, size=32), seed=0, shard_size=4)
    shard = out / "000000.tar"
    with tarfile.open(shard) as tar:
        third = tar.getmembers()[3]  # the second sample's first member
    shard.write_bytes(shard.read_bytes()[: third.offset_data + 600])
    loader = make_loader(str(out), 2, 5, 32, mode="train", num_workers=0)
    batches = [batch for _, batch in zip(range(3), loader)]
    assert all(k == "synth_000000" for b in batches for k in b["key"])
    assert loader.skipped["truncated_shard"] >= 3 and len(loader.unique_skips) == 1
    assert "ends after 1 readable samples" in loader.skip_log[0].detail
    assert "1 distinct bad samples or shards (1 truncated_shard)" in loader.report()
    state = loader.state_dict()
    resumed = make_loader(str(out), 2, 5, 32, mode="train", num_workers=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.unique_skips == loader.unique_skips


def test_files_whose_headers_lie_train_on_the_frames_that_decode_and_are_counted(tmp_path):
    """Shards of a clip claiming 40 frames and holding 24, and of one whose last frames do not decode: both train
    (windows from the frames that decode), and each is counted once in loader.short_files and the report."""
    from data.make_shards import main as make_shards_main

    from .conftest import write_faststart_mp4

    data = write_faststart_mp4(tmp_path / "whole.mp4", 40).read_bytes()
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "short.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (videos / "broken_end.mp4").write_bytes(data[: int(len(data) * 0.99)])
    for name in ("short", "broken_end"):
        (videos / f"{name}.txt").write_text(f"a {name} clip\n")
    assert make_shards_main(["--input", str(videos), "--out", str(tmp_path / "shards")]) == 0
    loader = make_loader(str(tmp_path / "shards"), 2, 17, 32, mode="train", num_workers=0, seed=3)
    batches = [batch for _, batch in zip(range(6), loader)]
    assert all(b["video"].shape == (2, 3, 17, 32, 32) for b in batches) and loader.samples_skipped == 0
    assert sorted(key for _, key in loader.short_files) == ["broken_end", "short"]
    assert "2 files decode fewer frames than they claim" in loader.report()


def _legacy_stream(urls, seed, reader, buffer):
    """The train reader's raw samples as the loader drew them before data/stream.py: the shards in a fresh
    seeded order each pass, through webdataset's shuffle. ReaderStream must draw the very same samples."""
    import random

    import webdataset as wds

    from data.tar_reader import shard_samples

    def source():
        rng = random.Random(f"shards-{seed}-{reader}")
        while True:
            order = list(urls)
            rng.shuffle(order)
            yield from ({"url": u} for u in order)

    samples = shard_samples(source(), lambda *_: None)
    return iter(wds.shuffle(buffer, initial=buffer // 4, rng=random.Random(f"samples-{seed}-{reader}"))(samples))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """60 tiny shards of 5 samples each (raw bytes only: the stream tests decode nothing)."""
    import tarfile

    root = tmp_path_factory.mktemp("many")
    urls = []
    for s in range(60):
        path = root / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(5):
                for ext, data in (("mp4", os.urandom(64)), ("txt", f"clip {s}-{i}".encode())):
                    info = tarfile.TarInfo(f"s{s:03d}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def test_the_reader_stream_draws_what_webdataset_shuffle_drew(many_shards):
    from data.stream import ReaderStream

    legacy = _legacy_stream(many_shards[:12], 3, 1, 16)
    ours = iter(ReaderStream(many_shards[:12], 3, 1, 16, lambda *_: None))
    assert [next(legacy)["__key__"] for _ in range(300)] == [next(ours)["__key__"] for _ in range(300)]


@pytest.mark.parametrize("drawn", [10, 2000])
def test_a_resumed_reader_stream_continues_exactly_and_reads_about_one_shard_and_its_buffer(many_shards, drawn,
                                                                                            monkeypatch):
    """Resumed after 10 or after 2,000 samples (7 passes over the shards), the stream continues with the
    uninterrupted one's samples, and reading them back costs about a shard and the buffer, not the 2,000."""
    import data.tar_reader
    from data.stream import ReaderStream

    buffer = 16
    whole = iter(ReaderStream(many_shards, 0, 0, buffer, lambda *_: None))
    head = [next(whole)["__key__"] for _ in range(drawn)]
    first = ReaderStream(many_shards, 0, 0, buffer, lambda *_: None)
    it = iter(first)
    assert [next(it)["__key__"] for _ in range(drawn)] == head
    state = json.loads(json.dumps(first.state()))
    read = [0]
    original = data.tar_reader.shard_samples

    def counting(sources, on_error):
        for sample in original(sources, on_error):
            read[0] += 1
            yield sample

    monkeypatch.setattr(data.tar_reader, "shard_samples", counting)
    resumed = iter(ReaderStream(many_shards, 0, 0, buffer, lambda *_: None, state=state))
    nxt = next(resumed)
    cost = read[0]  # samples read to give the first one
    later = [nxt["__key__"]] + [next(resumed)["__key__"] for _ in range(49)]
    assert later == [next(whole)["__key__"] for _ in range(50)]
    shard, spread = 5, len({u for u, _ in state["buffer"]})
    assert cost <= shard * (spread + 1) + 2, (cost, spread)  # the buffer's shards and the current one, at most
    assert cost <= shard * (buffer + 1) + 2  # a bound that does not depend on the step: never the thousands drawn
