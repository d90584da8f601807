"""rFVD: the Fréchet distance against SciPy's formulation, and the I3D path with a tiny scripted detector."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from tokenizer.evaluate import main as evaluate_main
from evaluation.fvd import FrechetVideoDistance, frechet_distance, fvd_from_features, to_i3d_input

from .conftest import CARPHONE, copy_clip
from tokenizer import save_vae

# the field's I3D is a TorchScript file, and PyTorch now flags TorchScript as deprecated
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:torch.jit")


def test_frechet_distance_equals_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((50, 6)) * 1.5 + 0.3
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    ours = frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(expected, rel=1e-8)
    assert fvd_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-8)
    assert fvd_from_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 clips"):
        fvd_from_features(torch.zeros(1, 6), torch.zeros(3, 6))


def test_fvd_with_a_local_detector(i3d_path):
    fvd = FrechetVideoDistance.from_local(i3d_path)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 3, 5, 48, 64, generator=g) * 2 - 1
    same = FrechetVideoDistance.from_local(i3d_path)
    same.update(real, real)
    assert same.compute() == pytest.approx(0.0, abs=1e-6)
    fvd.update(real[:3], (real[:3] * 0.5).clamp(-1, 1))
    fvd.update(real[3:], (real[3:] * 0.5).clamp(-1, 1))
    assert fvd.count == 6 and fvd.compute() > 1e-3
    manual = fvd_from_features(fvd.features(real), fvd.features((real * 0.5).clamp(-1, 1)))
    assert fvd.compute() == pytest.approx(manual, rel=1e-5)  # float32 detector, batches of 3 vs 6


def test_i3d_input_is_224_centre_crop():
    x = torch.rand(2, 3, 4, 48, 96) * 2 - 1
    y = to_i3d_input(x)
    assert y.shape == (2, 3, 4, 224, 224) and y.min() >= -1 and y.max() <= 1
    # a horizontal ramp stays a ramp, centred: the crop takes the middle of the resized frame
    ramp = torch.linspace(-1, 1, 96).expand(1, 3, 1, 48, 96)
    out = to_i3d_input(ramp)[0, 0, 0, 112]
    assert out[0] < 0 < out[-1] and abs(out.mean().item()) < 0.02


def test_missing_detector(tmp_path):
    with pytest.raises(FileNotFoundError, match="no I3D detector at .*nope.pt"):
        FrechetVideoDistance.from_local(tmp_path / "nope.pt")


def test_evaluate_reports_rfvd(i3d_path, tmp_path):
    from .test_tokenizer import randomized
    from tokenizer import CausalVAE

    torch.manual_seed(0)
    save_vae(randomized(CausalVAE.from_preset("tiny")), tmp_path / "vae")
    (tmp_path / "v").mkdir()
    copy_clip(CARPHONE, tmp_path / "v" / "carphone.mp4", None)
    assert evaluate_main(["--ckpt", str(tmp_path / "vae"), "--data", str(tmp_path / "v"), "--frames", "5", "--size", "32",
                          "--windows", "4", "--no-videos", "--out", str(tmp_path / "e"), "--i3d", str(i3d_path)]) == 0
    (report,) = json.loads((tmp_path / "e" / "report.json").read_text())["tokenizers"].values()
    mean = report["mean"]
    assert mean["rfvd_clips"] == 4 and mean["rfvd"] > 0 and mean["baseline_rfvd"] > 0
    assert "rFVD" in (tmp_path / "e" / "report.md").read_text()
