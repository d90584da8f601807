"""The video tokenizer: a causal 3D VAE (4x temporal, 8x spatial compression, 16 latent channels by default)."""

from .config import PRESETS, VAEConfig, preset
from .diffusers_vae import DiffusersVAE, load_tokenizer
from .model import CausalCache, CausalConv3d, CausalVAE, DiagonalGaussian

__all__ = ["PRESETS", "CausalCache", "CausalConv3d", "CausalVAE", "DiagonalGaussian", "DiffusersVAE", "VAEConfig", "load_tokenizer", "preset"]
