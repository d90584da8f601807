"""A CausalVAE's start: the linear codec fitted to data, so that training learns only what a linear code misses.

    kept = fit_linear_codec(vae, clips)   # clips (B, 3, 1 + 4k, H, W) in [-1, 1]; the share of energy kept

The encoder's linear path becomes the top latent_channels principal directions (uncentred) of the
tf x sf x sf pixel blocks; the decoder's, which reads the cells around each block and the previous latent
frames, becomes the least-squares decoder of those latents (ridge-regularised). With no context
(linear_context=0, linear_frames=1) that decoder is the transpose of the encoder: the best linear block code.
The network's output layers are zeroed, so the model is then exactly its linear codec. A least-squares fit
over data is not the model's own computation, so it lives here, not in tokenizer/model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .model import CausalVAE


@torch.no_grad()
def fit_linear_codec(vae: CausalVAE, videos: torch.Tensor, ridge: float = 1e-6, batch: int = 16) -> float:
    """Fit `vae`'s linear codec to `videos` (B, 3, 1 + 4k, H, W) in place, with the network's output layers
    zeroed. The decoder's fit is ridge-regularised by `ridge` times the mean feature energy; the sums are
    accumulated `batch` clips at a time, so memory does not grow with the clip count. Returns the fraction of
    the blocks' energy the codec reconstructs."""
    cfg = vae.config
    if not cfg.linear_codec:
        raise ValueError("this tokenizer has no linear codec path (linear_codec=False)")
    vae.check_video(videos)
    s = cfg.cell_patches
    conv = vae.decoder.linear
    kt, k = conv.conv.kernel_size[0], conv.conv.kernel_size[1]

    def blocks_of(part):  # (cells, D s s): every latent cell's pixel block, and the patches
        patches = vae.patchify(part.float())  # (b, D, t, H/p, W/p)
        return rearrange(patches, "b d t (h i) (w j) -> (b t h w) (d i j)", i=s, j=s).double(), patches

    def features_of(patches):  # (cells, L kt k k): the decoder conv's causal, zero-padded input at each cell
        latents = vae.encoder.linear(patches)  # (b, L, t, h, w)
        past = latents[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        padded = F.pad(torch.cat([past, latents], dim=2), (k // 2,) * 4)
        t, h, w = latents.shape[2:]
        taps = [padded[:, :, a : a + t, b : b + h, c : c + w] for a in range(kt) for b in range(k) for c in range(k)]
        return rearrange(torch.stack(taps, 2), "b l n t h w -> (b t h w) (l n)").double()

    parts = videos.split(batch)
    energy = sum(blocks.T @ blocks for blocks, _ in map(blocks_of, parts))  # (D s s, D s s)
    _, eigenvectors = torch.linalg.eigh(energy)  # eigenvalues ascending
    basis = eigenvectors[:, -cfg.latent_channels :].flip(1).T  # (L, D s s), strongest first
    vae.encoder.linear.weight.copy_(basis.reshape(cfg.latent_channels, -1, 1, s, s))

    gram = cross = 0
    for blocks, patches in map(blocks_of, parts):
        features = features_of(patches)
        gram, cross = gram + features.T @ features, cross + features.T @ blocks
    regularised = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    solution = torch.linalg.solve(regularised, cross)  # (L kt k k, D s s)
    conv.conv.weight.copy_(solution.T.reshape(conv.conv.weight.shape))
    conv.conv.bias.zero_()  # no intercept: with no context the fit is then exactly the encoder's transpose
    for out in (vae.encoder.conv_out.conv, vae.decoder.conv_out.conv):
        out.weight.zero_()
    vae.encoder.conv_out.conv.bias[: cfg.latent_channels].zero_()
    vae.decoder.conv_out.conv.bias.zero_()
    # |B - F S|^2 = |B|^2 - 2 <S, F'B> + <S, F'F S>
    residual = energy.trace() - 2 * (solution * cross).sum() + (solution * (gram @ solution)).sum()
    return float(1 - residual / energy.trace())
