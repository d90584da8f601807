"""bench/tokenizer_diagnosis.py's measurements: the spectrum bands, the edge masks, and the linear path alone."""

from __future__ import annotations

import math

import torch

from bench.tokenizer_diagnosis import BANDS, band_energy, diagnose, edge_masks, linear_only
from tokenizer import CausalVAE, fit_linear_codec


def test_a_sinusoid_lands_in_its_band_and_parseval_holds():
    h = w = 64
    for cycles_per_pixel in (1 / 64 * 1, 3 / 64, 6 / 64, 12 / 64, 24 / 64):
        x = torch.cos(2 * math.pi * cycles_per_pixel * torch.arange(w)).expand(1, 1, 1, h, w)
        energy = band_energy(x)
        band = next(i for i, (lo, hi) in enumerate(zip(BANDS[:-1], BANDS[1:])) if lo <= cycles_per_pixel < hi)
        assert energy.argmax().item() == band and energy[band] / energy.sum() > 0.999
    x = torch.randn(2, 3, 2, 16, 16)
    assert torch.isclose(band_energy(x).sum(), x.double().pow(2).sum() * 16 * 16, rtol=1e-9)  # unnormalised FFT


def test_edges_are_where_the_gradient_is():
    video = torch.zeros(1, 3, 2, 32, 32)
    video[..., 16:] = 1.0  # one vertical edge
    edges, flat = edge_masks(video)
    assert edges[..., 15:17].all() and not edges[..., :12].any() and flat[..., :12].all()


def test_a_fresh_linear_codec_is_its_linear_path_alone():
    torch.manual_seed(0)
    model = CausalVAE.from_preset("tiny").eval()
    clips = torch.rand(4, 3, 9, 32, 32) * 2 - 1
    fit_linear_codec(model, clips)  # the network's output layers are zeroed: the model is its linear codec
    with torch.no_grad():
        whole = model.decode(model.encode(clips[:1]).mean)
        assert torch.allclose(linear_only(model, clips[:1]), whole, atol=1e-5)
        report = diagnose({"a": lambda v: model.decode(model.encode(v).mean), "same": lambda v: v}, [clips[:1]], 4)
    assert report["same"]["psnr"] >= 99 and report["a"]["psnr"] < 40
    assert all(v < 0 for v in report["a"]["band_error_db"][:2])  # the low bands are kept


def test_the_reconstruction_term_is_l1_or_squared_error():
    from tokenizer.losses import LossConfig, reconstruction_loss
    from tokenizer.model import DiagonalGaussian
    from training.options import build_parser

    video, recon = torch.zeros(1, 3, 1, 4, 4), torch.full((1, 3, 1, 4, 4), 0.5)
    posterior = DiagonalGaussian(torch.zeros(1, 4, 1, 1, 1), torch.zeros(1, 4, 1, 1, 1))
    l1, _, logs = reconstruction_loss(video, recon, posterior, LossConfig())
    mse, _, _ = reconstruction_loss(video, recon, posterior, LossConfig(recon="mse"))
    assert l1.item() == 0.5 and mse.item() == 0.25 and logs["mse"] == 0.25
    args = build_parser().parse_args(["--stage", "tokenizer", "--data", "d", "--out", "o", "--recon-loss", "mse"])
    assert args.recon_loss == "mse"


def test_the_boundary_weight_moves_the_pixel_term_to_where_latent_groups_meet():
    """Frames 1 + 4k and 4k (k > 0) are the groups' ends; the weights average 1, so an even error keeps its loss,
    and an error only at the ends weighs boundary_weight times one only inside."""
    from tokenizer.losses import LossConfig, frame_weights, reconstruction_loss
    from tokenizer.model import DiagonalGaussian

    w = frame_weights(9, 4, 3.0)
    assert torch.allclose(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert [i for i in range(9) if w[i] > 1] == [1, 4, 5, 8] and w[1] / w[0] == 3.0
    assert frame_weights(1, 4, 3.0).tolist() == [1.0]  # an image: nothing to weigh
    posterior = DiagonalGaussian(torch.zeros(1, 4, 3, 1, 1), torch.zeros(1, 4, 3, 1, 1))
    video = torch.zeros(1, 3, 9, 4, 4)
    even = torch.full_like(video, 0.5)
    at_ends, inside = torch.zeros_like(video), torch.zeros_like(video)
    at_ends[:, :, [1, 4]] = 0.5
    inside[:, :, [2, 3]] = 0.5
    for recon in ("l1", "mse"):
        plain, weighted = LossConfig(recon=recon), LossConfig(recon=recon, boundary_weight=3.0)
        loss = lambda r, cfg: reconstruction_loss(video, r, posterior, cfg)[0].item()  # noqa: E731
        assert abs(loss(even, weighted) - loss(even, plain)) < 1e-6
        assert abs(loss(at_ends, weighted) / loss(inside, weighted) - 3.0) < 1e-5
        assert abs(loss(at_ends, plain) - loss(inside, plain)) < 1e-7


def test_the_motion_scorer_reads_reconstructions_of_synthetic_clips(tmp_path):
    """Held-out synthetic clips: the originals score 100% for presence, colour and shape; a blur that smears
    the object's corners loses its shape."""
    from bench.tokenizer_diagnosis import read_windows
    from data.synthetic import SyntheticSpec, generate

    generate(tmp_path, 6, SyntheticSpec(frames=9), seed=5)
    windows, _, captions = read_windows(str(tmp_path), 9, 64, 2)
    assert len(windows) == 6 and all(c.startswith("a ") for c in captions)
    blur = lambda v: torch.nn.functional.avg_pool3d(v, (1, 9, 9), stride=1, padding=(0, 4, 4), count_include_pad=False)  # noqa: E731
    with torch.no_grad():
        report = diagnose({"same": lambda v: v, "blurred": blur}, windows, 4, captions)
    assert report["same"]["motion"] == {"presence": 1.0, "color": 1.0, "shape": 1.0, "clips": 6}
    assert report["blurred"]["motion"]["shape"] < 1.0
