"""The video tokenizer: a causal 3D VAE (4x temporal, 8x spatial compression, 16 latent channels by default)."""

from .config import PRESETS, VAEConfig, preset
from .diffusers_vae import DiffusersVAE
from .model import CausalCache, CausalConv3d, CausalVAE, DiagonalGaussian
from .checkpoint import load_tokenizer, load_vae, save_tokenizer, save_vae
from .linear_codec import fit_linear_codec

__all__ = ["PRESETS", "CausalCache", "CausalConv3d", "CausalVAE", "DiagonalGaussian", "DiffusersVAE", "VAEConfig",
           "fit_linear_codec", "load_tokenizer", "load_vae", "preset", "save_tokenizer", "save_vae"]
