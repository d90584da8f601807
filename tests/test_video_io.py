"""PyAV reading and writing: windows, fps strides, seeking, resizing, images, mp4 output, bad files."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from data.video_io import (
    ClipTooShortError,
    VideoInfo,
    iter_clip,
    _resize_plan,
    VideoReadError,
    check_frame_count,
    probe,
    read_clip,
    read_video,
    tensor_to_frames,
)
from data.video_write import encode_mp4, write_video

from .conftest import BIKES, CARPHONE, truncated_copy, write_faststart_mp4


def decode_all(path) -> np.ndarray:
    """Every frame at native size, decoded from the start with plain PyAV: the reference."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def bikes_frames() -> np.ndarray:
    return decode_all(BIKES)


def test_frame_count_rule_names_nearest_valid_counts():
    for n in (1, 5, 17, 33, 129):
        check_frame_count(n)
    with pytest.raises(ValueError, match="got 16: use 13 or 17"):
        check_frame_count(16)
    with pytest.raises(ValueError, match="got 2: use 1 or 5"):
        check_frame_count(2)
    for bad in (0, -3, 4.0, True):
        with pytest.raises(ValueError, match="1 \\+ 4k"):
            check_frame_count(bad)
    with pytest.raises(ValueError, match="use 13 or 17"):
        read_clip(BIKES, 16)


def test_probe_real_clips():
    bikes, carphone = probe(BIKES), probe(CARPHONE)
    assert (bikes.fps, bikes.frames, bikes.width, bikes.height, bikes.codec) == (25.0, 250, 640, 272, "h264")
    assert bikes.duration == pytest.approx(10.0)
    assert carphone.fps == pytest.approx(30000 / 1001) and carphone.frames == 120
    assert (carphone.width, carphone.height) == (176, 144)
    assert probe(BIKES.read_bytes()) == bikes  # bytes and paths agree


def test_native_window_matches_plain_decode(bikes_frames):
    clip = read_clip(BIKES, 17, start=40)
    assert clip.frames.dtype == np.uint8 and clip.frames.shape == (17, 272, 640, 3)
    np.testing.assert_array_equal(clip.frames, bikes_frames[40:57])
    assert (clip.start, clip.stride, clip.fps) == (40, 1.0, 25.0)


BIKES_KEYFRAMES = (0, 30, 76, 137, 187, 242)


@pytest.mark.parametrize("start", [0, 29, 30, 31, 100, 186, 187, 233])
def test_seeking_gives_exactly_the_frames_of_decoding_from_the_start(start, bikes_frames):
    seeked = read_clip(BIKES, 17, start=start, seek=True)
    from_start = read_clip(BIKES, 17, start=start, seek=False)
    np.testing.assert_array_equal(seeked.frames, from_start.frames)
    np.testing.assert_array_equal(seeked.frames, bikes_frames[start : start + 17])
    # seeking decodes from the last keyframe at or before the window, not from frame 0
    keyframe = max(k for k in BIKES_KEYFRAMES if k <= start)
    assert seeked.decoded == start - keyframe + 17
    assert from_start.decoded == start + 17


def test_target_fps_sets_the_stride(bikes_frames):
    clip = read_clip(BIKES, 9, fps=12.5, start=10)  # 25 fps -> every 2nd frame
    assert clip.stride == 2.0 and clip.fps == 12.5
    np.testing.assert_array_equal(clip.frames, bikes_frames[10:27:2])
    # a target faster than the file keeps the file's own rate
    fast = read_clip(BIKES, 5, fps=60)
    assert fast.stride == 1.0 and fast.fps == 25.0
    # a fractional stride takes the nearest source frames: 29.97 / 10 = 2.997
    reference = decode_all(CARPHONE)
    clip = read_clip(CARPHONE, 9, fps=10)
    assert clip.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(clip.frames, reference[[round(i * 2.997) for i in range(9)]])


def test_window_positions():
    total, n, stride = 250, 17, 2.0
    last_start = total - 1 - (n - 1) * stride
    assert read_clip(BIKES, n, fps=12.5, start="center", size=32).start == int(last_start) // 2
    starts = {read_clip(BIKES, n, fps=12.5, start="random", size=32, rng=np.random.default_rng(s)).start for s in range(8)}
    assert len(starts) > 1 and all(0 <= s <= last_start for s in starts)
    a = read_clip(BIKES, n, start="random", size=32, rng=np.random.default_rng(3))
    b = read_clip(BIKES, n, start="random", size=32, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.frames, b.frames)


def test_resize_short_side_then_crop():
    clip = read_clip(BIKES, 5, size=64)  # 640x272 -> 151x64 -> centre 64x64
    assert clip.frames.shape == (5, 64, 64, 3)
    rect = read_clip(BIKES, 5, size=(48, 80))
    assert rect.frames.shape == (5, 48, 80, 3)
    full = read_clip(BIKES, 5, size=(64, 151))  # the whole resized frame
    np.testing.assert_array_equal(clip.frames, full.frames[:, :, 43:107])
    crops = [read_clip(BIKES, 5, size=64, crop="random", rng=np.random.default_rng(s)).frames for s in range(4)]
    assert any(not np.array_equal(crops[0], c) for c in crops[1:])
    with pytest.raises(ValueError, match="crop must be"):
        read_clip(BIKES, 5, size=64, crop="middle")


def test_zoom_takes_random_crops_from_the_frame_scaled_up_by_a_drawn_factor():
    # 640x272 covering 64x64 at zoom 2: 301x128, and the crop is a window of that whole resized frame
    rh, rw, top, left, th, tw = _resize_plan(272, 640, 64, "random", np.random.default_rng(7), (2.0, 2.0))
    assert (rh, rw, th, tw) == (128, 301, 64, 64)
    zoomed = read_clip(BIKES, 5, size=64, crop="random", zoom=(2.0, 2.0), rng=np.random.default_rng(7)).frames
    whole = read_clip(BIKES, 5, size=(128, 301)).frames
    np.testing.assert_array_equal(zoomed, whole[:, top:top + 64, left:left + 64])
    # a range: factors drawn across it (log-uniform), never outside
    heights = [_resize_plan(272, 640, 64, "random", np.random.default_rng(s), (1.0, 4.0))[0] for s in range(64)]
    assert min(heights) >= 64 and max(heights) <= 256 and min(heights) < 96 and max(heights) > 180
    # without a zoom the crop draws exactly what it drew before zoom existed, so seeded streams are unchanged
    r = np.random.default_rng(5)
    assert _resize_plan(272, 640, 64, "random", np.random.default_rng(5)) == (64, 151, int(r.integers(0, 1)),
                                                                               int(r.integers(0, 88)), 64, 64)
    assert _resize_plan(272, 640, 64, "center", None, (1.0, 4.0)) == (64, 151, 0, 43, 64, 64)  # centre crops: no zoom
    with pytest.raises(ValueError, match="1 <= lo <= hi"):
        _resize_plan(272, 640, 64, "random", None, (0.5, 2.0))


def test_float_output_range_and_layout():
    video = read_video(CARPHONE, 17, size=64)
    assert video.shape == (3, 17, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0 and video.min() < -0.5 and video.max() > 0.5
    np.testing.assert_array_equal(tensor_to_frames(video), read_clip(CARPHONE, 17, size=64).frames)


def test_clip_too_short():
    with pytest.raises(ClipTooShortError, match="has 120"):
        read_clip(CARPHONE, 33, fps=5)  # stride 6: needs 193 source frames
    with pytest.raises(ClipTooShortError):
        read_clip(BIKES, 17, start=240)


def test_image_reads_as_one_frame_video(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "still.png"
    av.VideoFrame.from_ndarray(pixels, format="rgb24").to_image().save(path)
    info = probe(path)
    assert (info.frames, info.width, info.height, info.fps) == (1, 40, 24, 0.0)
    clip = read_clip(path, 1)
    np.testing.assert_array_equal(clip.frames[0], pixels)
    assert read_clip(path.read_bytes(), 1, size=16).frames.shape == (1, 16, 16, 3)
    with pytest.raises(ClipTooShortError, match="one-frame video"):
        read_clip(path, 5)


def test_write_mp4_round_trip(tmp_path):
    frames = np.zeros((9, 48, 64, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, None, :]
    for i in range(9):
        frames[i, 10:26, 4 + 4 * i : 20 + 4 * i] = (40, 220, 90)
    path = write_video(tmp_path / "out" / "clip.mp4", frames, fps=12)
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]  # no temporary file left
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.format.name, s.width, s.height) == ("h264", "yuv420p", 64, 48)
        assert s.average_rate == 12
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    # a float tensor in [-1, 1] writes the same frames, and the same file
    as_tensor = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert np.array_equal(tensor_to_frames(as_tensor), frames)
    assert encode_mp4(as_tensor, 12) == path.read_bytes()
    with pytest.raises(ValueError, match="even width and height"):
        encode_mp4(frames[:, :47], 12)


def test_the_same_frames_give_the_same_mp4_bytes_every_time():
    """As PyAV opens libx264 (slice threads, AVX-512 where the CPU has it), 60 encodes of these frames gave 2-3
    files; encode_mp4's frame threads without AVX-512 give one (bench/mp4_determinism.py measures both)."""
    from bench.mp4_determinism import noisy_frames

    frames = noisy_frames()
    assert len({encode_mp4(frames, 8) for _ in range(60)}) == 1
    clip = read_video(BIKES, 17, size=(128, 128))
    assert len({encode_mp4(clip, 8) for _ in range(20)}) == 1


def test_lossless_mp4_decodes_to_exactly_the_frames(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 30, 42, 3), dtype=np.uint8)  # odd halves: no chroma halving
    path = write_video(tmp_path / "x.mp4", frames, fps=8, lossless=True)
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(decoded, frames)
    assert encode_mp4(frames, 8, lossless=True) == path.read_bytes()


def test_unreadable_files_raise_read_errors(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is a shopping list, not a video\n")
    with pytest.raises(VideoReadError):
        probe(text)
    with pytest.raises(VideoReadError):
        read_clip(text, 1)
    junk = tmp_path / "junk.png"  # some demuxer opens it, with no frame size: an error, not a ZeroDivisionError
    junk.write_bytes(b"not an image")
    with pytest.raises(VideoReadError):
        read_clip(junk, 1, size=32)
    with pytest.raises(VideoReadError):
        probe(truncated_copy(BIKES, tmp_path / "cut.mp4"))  # index at the end: cut off
    faststart = write_faststart_mp4(tmp_path / "fs.mp4", 33)
    assert probe(faststart).frames == 33
    cut = truncated_copy(faststart, tmp_path / "fs_cut.mp4")  # index first: opens, frames missing
    info = probe(cut)  # what is there counts, not what the header claims
    assert info.declared_frames == 33 and 10 < info.frames < 33
    with pytest.raises(ClipTooShortError):
        read_clip(cut, 33)


def test_files_whose_headers_lie_are_read_for_the_frames_that_decode(tmp_path):
    """Two shapes of the same lie, as shared sample clips show them: a header claiming 40 frames of which 24 are
    present, and one whose 40 frames are all present but the last few do not decode (a broken slice)."""
    whole = write_faststart_mp4(tmp_path / "whole.mp4", 40)
    data = whole.read_bytes()
    (tmp_path / "short.mp4").write_bytes(data[: int(len(data) * 0.6)])
    (tmp_path / "broken_end.mp4").write_bytes(data[: int(len(data) * 0.99)])
    short = probe(tmp_path / "short.mp4")
    assert short.declared_frames == 40 and short.frames < 30
    clip = read_clip(tmp_path / "short.mp4", 17, start="center", info=short)
    assert clip.frames.shape[0] == 17
    broken = probe(tmp_path / "broken_end.mp4")
    assert broken.frames == 40 and broken.declared_frames == 0  # every packet is there; the last ones are damaged
    last = read_clip(tmp_path / "broken_end.mp4", 17, start=23, info=broken)  # the last window the header allows
    assert last.available is not None and last.available < 40 and last.start == last.available - 17
    reference = read_clip(whole, 17, start=last.start)
    assert np.abs(last.frames.astype(int) - reference.frames.astype(int)).max() == 0  # the frames that decode, exactly


def _variable_rate_clip(path, times: list[float]) -> None:
    """Frame i shows a bar at x = 5 i, at time times[i] (milliseconds in the file)."""
    from fractions import Fraction

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 256, 32, "yuv420p"
        s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            img = np.zeros((32, 256, 3), np.uint8)
            img[:, 5 * i : 5 * i + 5] = 255
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = round(t * 1000), Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())


@pytest.mark.parametrize("start", ["start", "center", 20, 23])
def test_variable_rate_video_is_sampled_by_time(tmp_path, start):
    """A phone clip's rate varies: here 30 frames a second for a second, then 5 a second for three. Each frame of
    a window is the one on screen at its time, not the next one and not a count of frames."""
    times = [i / 30 for i in range(30)] + [1 + i / 5 for i in range(15)]
    path = tmp_path / "vfr.mp4"
    _variable_rate_clip(path, times)
    info = probe(path)
    clip = read_clip(path, 5, fps=2.5, start=start)
    shown = [int(np.argmax(f[16, :, 0] > 128)) // 5 for f in clip.frames]
    rate = info.fps
    for j, index in enumerate(shown):
        slot = clip.start + round(j * clip.stride)
        at = slot / rate + 0.25 / rate  # the slot's time, with the reader's tolerance of a quarter of a slot
        on_screen = max(i for i, t in enumerate(times) if t <= at)
        assert index == on_screen, (start, j, slot, index, on_screen)


def _with_display_matrix(src, path, degrees: float, hflip: bool = False) -> None:
    """`src`'s own packets, remuxed with a display matrix (what a phone writes for a portrait clip)."""
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        copy.set_display_rotation(degrees, hflip=hflip)  # counterclockwise, then mirrored (PyAV's convention)
        for packet in inp.demux(stream):
            if packet.dts is not None:
                packet.stream = copy
                out.mux(packet)


@pytest.mark.parametrize("degrees, hflip, name", [
    (-90, False, "rot270"), (90, False, "rot90"), (180, False, "rot180"), (0, True, "hflip"),
    (90, True, "antitranspose"), (-90, True, "transpose")])
def test_a_clip_with_a_display_matrix_is_read_as_it_is_shown(tmp_path, degrees, hflip, name):
    """A real clip given a display matrix reads as a player shows it: turned counterclockwise by `degrees`, then
    mirrored, with the width and height of the shown frame (a portrait phone clip buckets and trains upright)."""
    path = tmp_path / "phone.mp4"
    _with_display_matrix(BIKES, path, degrees, hflip)
    stored = read_clip(BIKES, 5).frames  # (T, 272, 640, 3)

    def shown(frames):
        turned = np.rot90(frames, round(degrees / 90), axes=(1, 2))
        return turned[:, :, ::-1] if hflip else turned

    info, plain = probe(path), probe(BIKES)
    assert info.orientation == name
    swapped = abs(degrees) == 90
    assert (info.width, info.height) == ((plain.height, plain.width) if swapped else (plain.width, plain.height))
    assert np.array_equal(read_clip(path, 5).frames, shown(stored))
    # resized and cropped to a shape in the shown orientation: the stored frames at the turned shape, turned
    # (34 x 64: the 640 x 272 frame scales to 80 x 34, 8 columns cropped on each side, so the crops are alike)
    size = (64, 34) if swapped else (34, 64)
    expect = shown(read_clip(BIKES, 5, size=(34, 64)).frames)
    assert np.array_equal(read_clip(path, 5, size=size).frames, expect)
    assert np.array_equal(read_clip(path, 5, size=size, info=info).frames, expect)  # as a shard's record says
    assert np.array_equal(np.stack(list(iter_clip(path, 5, size=size))), expect)  # a frame at a time
    assert VideoInfo.from_json(info.to_json()) == info
