"""Our LPIPS equals the `lpips` package's on the same weights (its real linear heads, a random VGG16)."""

from __future__ import annotations

import pytest
import torch

from evaluation.lpips import LPIPS

from .conftest import write_reference_lpips_weights

# the reference package builds its VGG through torchvision's deprecated `pretrained=` arguments
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:torchvision")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return write_reference_lpips_weights(tmp_path_factory.mktemp("lpips_weights"))


def test_matches_the_reference_implementation(weights):
    ref, vgg_path, heads = weights
    ours = LPIPS.from_local(vgg_path, heads)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 48, 64, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expected = ref(a, b).flatten()
        got = ours(a, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.min() > 0
    assert ours(a, a).abs().max() < 1e-6
    torch.testing.assert_close(ours(b, a), got, rtol=1e-5, atol=1e-6)


def test_video_is_the_mean_over_frames(weights):
    _, vgg_path, heads = weights
    ours = LPIPS.from_local(vgg_path, heads)
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        per_frame = torch.stack([ours(x[:, :, t], y[:, :, t]) for t in range(3)], dim=1)
        torch.testing.assert_close(ours.video(x, y), per_frame.mean(1))


def test_missing_or_wrong_files(weights, tmp_path):
    _, vgg_path, heads = weights
    with pytest.raises(FileNotFoundError, match="no VGG16 backbone weights at .*nope.pth: LPIPS needs local weight files"):
        LPIPS.from_local(tmp_path / "nope.pth", heads)
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an LPIPS linear-head file"):
        LPIPS.from_local(vgg_path, tmp_path / "bad.pth")
