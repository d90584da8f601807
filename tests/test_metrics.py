"""PSNR and SSIM agree with scikit-image on the same frames; the equal-floats baseline is what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data import read_clip
from evaluation.metrics import MAX_PSNR, equal_floats_baseline, psnr, ssim, ssim_frames, to_unit_range

from .conftest import BIKES, CARPHONE


def video_pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real frames in [0, 1] (B, 3, T, H, W) and a degraded copy: blur-like averaging plus noise."""
    clips = [read_clip(p, 5, size=(48, 64)).frames for p in (BIKES, CARPHONE)]
    a = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).double() / 255  # (2, 3, 5, 48, 64)
    g = torch.Generator().manual_seed(seed)
    b = (0.5 * a + 0.5 * a.roll(1, dims=-1) + 0.03 * torch.randn(a.shape, generator=g, dtype=a.dtype)).clamp(0, 1)
    return a, b


def test_ssim_equals_scikit_image():
    a, b = video_pair()
    ours = ssim_frames(a, b)  # (B, T)
    for i in range(a.shape[0]):
        for t in range(a.shape[2]):
            x = a[i, :, t].permute(1, 2, 0).numpy()
            y = b[i, :, t].permute(1, 2, 0).numpy()
            ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1, channel_axis=-1)
            assert ours[i, t].item() == pytest.approx(ref, abs=1e-7)
    torch.testing.assert_close(ssim(a, b), ours.mean(1))
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_psnr_equals_scikit_image_over_each_whole_video():
    a, b = video_pair(1)
    ours = psnr(a, b)
    for i in range(a.shape[0]):
        ref = peak_signal_noise_ratio(a[i].numpy(), b[i].numpy(), data_range=1)
        assert ours[i].item() == pytest.approx(ref, abs=1e-9)
    assert psnr(a, a).tolist() == [MAX_PSNR, MAX_PSNR]


def test_ssim_rejects_tiny_frames_and_mismatched_shapes():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 1, 8, 8), torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(1, 3, 1, 16, 16), torch.zeros(1, 3, 2, 16, 16))


def test_equal_floats_baseline():
    video = torch.rand(1, 3, 17, 128, 128) * 2 - 1
    latent_shape = (16, 5, 16, 16)  # a 16-channel latent at 4x8x8
    out = equal_floats_baseline(video, latent_shape)
    assert out.shape == video.shape
    # a smooth video survives the baseline almost unchanged; noise does not
    t, y, x = torch.meshgrid(torch.linspace(0, 1, 17), torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    smooth = torch.stack([torch.sin(2 * x + t), torch.cos(3 * y), x * y * 2 - 1])[None] * 0.8
    assert psnr(to_unit_range(equal_floats_baseline(smooth, latent_shape)), to_unit_range(smooth)).item() > 35
    assert psnr(to_unit_range(out), to_unit_range(video)).item() < 15


def test_seam_ratios_find_a_step_where_latent_groups_meet():
    from evaluation.metrics import frame_errors, group_starts, seam_ratios

    assert group_starts(17, 4) == [1, 5, 9, 13] and group_starts(9, 8) == [1] and group_starts(1, 4) == []
    g = torch.Generator().manual_seed(0)
    original = torch.rand(2, 3, 17, 8, 8, generator=g)
    smooth = original + 0.01 * torch.randn(original.shape, generator=g)
    sq, motion = frame_errors(original, smooth)
    even = seam_ratios(sq, motion, 4)
    assert 0.7 < even["error_ratio"] < 1.4 and 0.7 < even["motion_ratio"] < 1.4
    jumped = smooth.clone()
    jumped[:, :, 5:9] += 0.1  # the group starting at frame 5 is offset: a jump into it and out of it
    jumped[:, :, 13:] -= 0.1
    sq, motion = frame_errors(original, jumped)
    seam = seam_ratios(sq, motion, 4)
    assert seam["motion_ratio"] > 2 and seam["group_starts"] == [1, 5, 9, 13]
    # the motion error is exactly the change of the difference between frames
    sq1, m1 = frame_errors(original[:1, :, :3], original[:1, :, :3] + torch.tensor([0.0, 0.1, 0.3]).view(1, 1, 3, 1, 1))
    assert torch.allclose(m1, torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64))
    assert torch.allclose(sq1, torch.tensor([0.0, 0.01, 0.09], dtype=torch.float64))
