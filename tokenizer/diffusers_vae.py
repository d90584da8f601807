"""The field's video autoencoders, from local diffusers folders, behind our tokenizer's interface.

    vae = load_tokenizer("path/to/Wan2.1-T2V-1.3B-Diffusers/vae")   # (tokenizer/checkpoint.py) or one of ours
    z = vae.encode(video).mean               # video (B, 3, T, H, W) in [-1, 1]; T follows the model's rule
    video = vae.decode(z)
    z_dit = vae.normalize(z)                 # the latent scale the model's own pipeline hands its transformer

Supported classes, with the frame rule, compression and latent normalisation each declares:

| class | frames | compression (t x h x w) | normalisation (what the diffusers pipeline does) |
|---|---|---|---|
| AutoencoderKLWan (Wan2.1; Wan2.2 with its config) | 1 + 4k | 4 x 8 x 8 (Wan2.2: 4 x 16 x 16) | (z - latents_mean) / latents_std |
| AutoencoderKLCogVideoX | 1 + 4k | 4 x 8 x 8 | z x scaling_factor |
| AutoencoderKLHunyuanVideo | 1 + 4k | 4 x 8 x 8 | z x scaling_factor |
| AutoencoderKLLTXVideo | 1 + 8k | 8 x 32 x 32 | (z - latents_mean) x scaling_factor / latents_std (saved buffers) |

`tile` switches on the model's own tiling: "auto" with the model's default tiles, which it applies only to
frames larger than a tile (and, for HunyuanVideo and LTX-Video, to clips longer than a temporal tile), the way
to fit long or large clips; or tiles of `tile` pixels overlapping by a quarter. The tiles are blended: unlike
our CausalVAE's exact tiles it is an approximation, and `tokenizer.evaluate` reports how far from the
whole-clip result it lands. Batch slicing (one clip at a time, exact) is always on. `chunk` is accepted for the interface; the wrapped models already walk time their
own way (Wan with a causal cache frame group by frame group, CogVideoX in frame batches, HunyuanVideo and
LTX-Video whole clips unless tiled). Nothing is downloaded: a folder without config.json, or of a class not
listed, is a one-line error.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from checkpoint_io import replace_folder
from errors import InputError, MissingInputError

from .model import DiagonalGaussian, check_video_shape

TILE_ATTRIBUTES = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_min_num_frames",
                   "tile_sample_stride_height", "tile_sample_stride_width", "tile_sample_stride_num_frames")
SUPPORTED = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo")


@dataclass(frozen=True)
class WrappedConfig:
    """What callers read of a tokenizer's config, for a wrapped model."""

    class_name: str
    in_channels: int
    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    @property
    def compression(self) -> tuple[int, int, int]:
        return self.temporal_factor, self.spatial_factor, self.spatial_factor


def _factors(name: str, model) -> tuple[int, int]:
    """(temporal, spatial) compression the model declares."""
    c = model.config
    if name == "AutoencoderKLWan":
        return int(c.scale_factor_temporal), int(c.scale_factor_spatial)
    if name == "AutoencoderKLCogVideoX":
        return int(c.temporal_compression_ratio), 2 ** (len(c.block_out_channels) - 1)
    return int(model.temporal_compression_ratio), int(model.spatial_compression_ratio)


class DiffusersVAE(nn.Module):
    """A diffusers video autoencoder with CausalVAE's calls: check_video, latent_shape, encode (a posterior),
    decode, normalize / denormalize, config.temporal_factor / spatial_factor / latent_channels."""

    def __init__(self, model: nn.Module, class_name: str):
        super().__init__()
        if class_name not in SUPPORTED:
            raise InputError(f"{class_name} is not a supported video autoencoder; supported: {', '.join(SUPPORTED)}")
        self.model = model.eval()
        temporal, spatial = _factors(class_name, model)
        c = model.config
        latent = int(c.z_dim if class_name == "AutoencoderKLWan" else c.latent_channels)
        self.config = WrappedConfig(class_name, 3, latent, temporal, spatial)  # RGB video (Wan2.2's 12 are after its patchify)
        mean, std, scale = self._normalisation()
        self.register_buffer("latent_mean", mean, persistent=False)
        self.register_buffer("latent_std", std, persistent=False)
        self.scale = scale
        self._tile: int | str | None = None
        # the model's own tile sizes, for tile="auto"; slicing (one batch element at a time) is exact, so it stays on
        self._default_tiles = {k: getattr(model, k) for k in TILE_ATTRIBUTES if hasattr(model, k)}
        model.enable_slicing()

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mean, std, scale) with normalize(z) = (z - mean) * scale / std, as the model's pipeline does it."""
        name, c, n = self.config.class_name, self.model.config, self.config.latent_channels
        zeros, ones = torch.zeros(n), torch.ones(n)
        if name == "AutoencoderKLWan":
            return torch.tensor(c.latents_mean, dtype=torch.float32), torch.tensor(c.latents_std, dtype=torch.float32), 1.0
        if name == "AutoencoderKLLTXVideo":
            return self.model.latents_mean.detach().float().clone(), self.model.latents_std.detach().float().clone(), float(c.scaling_factor)
        return zeros, ones, float(c.scaling_factor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DiffusersVAE":
        directory = Path(directory)
        config = directory / "config.json"
        if not config.is_file():
            raise MissingInputError(f"no config.json in {directory}: give a local diffusers autoencoder folder "
                                    f"(save_pretrained's layout); nothing is downloaded")
        name = json.loads(config.read_text()).get("_class_name")
        if name not in SUPPORTED:
            raise InputError(f"{directory} holds {name or 'a model without _class_name'} (config.json), not a video "
                             f"autoencoder this adapter supports: {', '.join(SUPPORTED)}")
        try:
            import diffusers
        except ImportError as e:
            raise InputError(f"{directory} is a diffusers {name}: pip install diffusers to use it ({e})") from None
        model = getattr(diffusers, name).from_pretrained(directory, low_cpu_mem_usage=False).to(map_location)
        return cls(model, name)

    def save_pretrained(self, directory: str | Path) -> None:
        """The model's own save_pretrained folder, written beside `directory` and renamed into place whole."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        replace_folder(tmp, directory)

    # ---- shapes ---------------------------------------------------------------------------------

    def check_video(self, video: torch.Tensor) -> None:
        check_video_shape(video, self.config.in_channels, self.config.temporal_factor, self.config.spatial_factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        c = self.config
        return c.latent_channels, 1 + (frames - 1) // c.temporal_factor, height // c.spatial_factor, width // c.spatial_factor

    # ---- encode / decode ------------------------------------------------------------------------

    def _set_tiling(self, tile: int | str | None) -> None:
        """The model's own tiling: "auto" with its default tiles (it tiles only frames larger than a tile, and
        HunyuanVideo and LTX-Video clips longer than a temporal tile), an int for tiles of that many pixels
        overlapping by a quarter, None for none."""
        if tile == self._tile:
            return
        accepted = inspect.signature(self.model.enable_tiling).parameters
        if tile is None:
            self.model.disable_tiling()
        elif tile == "auto":
            self.model.enable_tiling(**{k: v for k, v in self._default_tiles.items() if k in accepted})
        else:
            if tile % self.config.spatial_factor:
                raise InputError(f"tile {tile} is not a multiple of the spatial factor {self.config.spatial_factor}")
            wanted = {"tile_sample_min_height": tile, "tile_sample_min_width": tile,
                      "tile_sample_stride_height": tile * 3 // 4, "tile_sample_stride_width": tile * 3 // 4}
            self.model.enable_tiling(**{k: v for k, v in wanted.items() if k in accepted})
        self._tile = tile

    def encode(self, video: torch.Tensor, chunk: int | None = None, tile: int | str | None = None) -> DiagonalGaussian:
        """The posterior over latents (B, L, 1 + k, H/s, W/s) of video (B, 3, 1 + tk, H, W) in [-1, 1]."""
        self.check_video(video)
        self._set_tiling(tile)
        dist = self.model.encode(video.to(self.model.dtype)).latent_dist
        return DiagonalGaussian(dist.mean.float(), dist.logvar.float())

    def decode_bytes(self, height: int, width: int, chunk: int, dtype_bytes: int = 4, frames: int = 0) -> float:
        """About how much memory decoding `frames` frames to (height, width) holds at its peak: the wrapped model
        walks time itself (a latent frame at a time for the causal ones), its widest stage at full resolution
        holding about four tensors of its width for a latent frame's pixel frames, and it returns the whole
        video. An estimate for sizing a run, not a measurement."""
        channels = list(getattr(self.model.config, "block_out_channels", None) or [128])
        tf = self.config.temporal_factor
        stages = sum(4 * c * (height // 2**i) * (width // 2**i) for i, c in enumerate(channels)) * tf
        return (stages + 3 * max(frames, tf) * height * width) * dtype_bytes

    def decode(self, latents: torch.Tensor, chunk: int | None = None, tile: int | str | None = None) -> torch.Tensor:
        """Video (B, 3, 1 + tk, H, W) from latents (B, L, 1 + k, h, w)."""
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, t, h, w), got shape {tuple(latents.shape)}")
        self._set_tiling(tile)
        kwargs = {}
        if getattr(self.model.config, "timestep_conditioning", False):  # LTX-Video 0.9.1+: decode at timestep 0
            kwargs["temb"] = torch.zeros(latents.shape[0], device=latents.device, dtype=self.model.dtype)
        return self.model.decode(latents.to(self.model.dtype), **kwargs).sample.float()

    def forward(self, video: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(video)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode()), posterior

    # ---- latent normalisation -------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return (z - self.latent_mean.view(shape)) * self.scale / self.latent_std.view(shape)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return z * self.latent_std.view(shape) / self.scale + self.latent_mean.view(shape)


def is_diffusers_folder(directory: str | Path) -> bool:
    config = Path(directory) / "config.json"
    try:
        return config.is_file() and "_class_name" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
