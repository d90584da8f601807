"""The generator: a spacetime-patch diffusion transformer, its attention backends and text encoders."""

from .attention import BACKENDS, attention, resolve_backend
from .config import PRESETS, DiTConfig, preset
from .model import DiT3D, patchify, unpatchify
from .checkpoint import load_dit, save_diffusers, save_dit

__all__ = ["BACKENDS", "PRESETS", "DiT3D", "DiTConfig", "attention", "load_dit", "patchify", "preset", "resolve_backend", "save_diffusers", "save_dit", "unpatchify"]
