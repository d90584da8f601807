"""Tokenizer folders: ours (`config.json` + `model.safetensors`), or a diffusers video autoencoder's
`save_pretrained` folder, behind one pair of calls.

    vae = load_tokenizer("runs/vae/model")            # a CausalVAE, or a DiffusersVAE for a diffusers folder
    save_tokenizer(vae, "out/")                       # either kind, as it loads again
    vae = load_vae("runs/vae/model"); save_vae(vae, "out/")   # ours alone

The model file holds the model and nothing else; reading and writing its folders is here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from checkpoint_io import load_model, save_model

from .config import VAEConfig
from .diffusers_vae import DiffusersVAE, is_diffusers_folder
from .model import CausalVAE


def load_vae(directory, map_location: str | torch.device = "cpu") -> CausalVAE:
    """Our CausalVAE from its folder (or a train.py tokenizer run folder)."""
    return load_model(CausalVAE, VAEConfig, directory, kind="tokenizer", map_location=map_location)


def save_vae(vae: CausalVAE, directory) -> Path:
    return save_model(vae, directory, kind="tokenizer")


def load_tokenizer(directory: str | Path, map_location: str | torch.device = "cpu") -> CausalVAE | DiffusersVAE:
    """Our CausalVAE from its folder, or a diffusers video autoencoder from a save_pretrained folder."""
    if is_diffusers_folder(directory):
        return DiffusersVAE.from_pretrained(directory, map_location)
    return load_vae(directory, map_location)


def save_tokenizer(vae: CausalVAE | DiffusersVAE, directory) -> None:
    """Write either kind of tokenizer so that load_tokenizer gives it back."""
    if isinstance(vae, DiffusersVAE):
        vae.save_pretrained(directory)
    else:
        save_vae(vae, directory)
