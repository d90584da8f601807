"""The tokenizer's configuration: a typed dataclass with named presets, stored as JSON beside the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from checkpoint_io import config_from_dict, preset_config
from errors import InputError


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # RGB
    latent_channels: int = 16  # channels of the latent grid
    temporal_factor: int = 4  # frames per latent frame after the first: T = 1 + temporal_factor * k
    spatial_factor: int = 8  # pixels per latent cell along each side
    patch_size: int = 4  # space-to-depth at the input; the rest of spatial_factor is done by strided stages
    channels: tuple[int, ...] = (64, 128)  # width of each stage; len(channels) - 1 stages halve the size
    encoder_blocks: int = 2  # residual blocks per encoder stage
    decoder_blocks: int = 2  # residual blocks per decoder stage
    mid_blocks: int = 1  # residual blocks at the latent resolution, in each of encoder and decoder
    temporal_kernel: int = 3  # causal conv kernel along time (at the latent frame rate) at the latent resolution
    # the same kernel in the layers at finer resolutions (the space-to-depth input and output, the stages before
    # the last, the down- and up-sampling): None for temporal_kernel. 1 makes those layers, where most of the
    # computation is, per latent frame: the tiny preset's training then takes 600 steps in the time 400 took with
    # 3 (800 with 1 everywhere; docs/results/tokenizer.md)
    fine_temporal_kernel: int | None = None
    logvar_init: float = -6.0  # initial posterior log-variance bias: start nearly deterministic
    # a linear codec beside the network: the encoder maps each tf x sf x sf pixel block to its latent cell;
    # the decoder rebuilds each block from the latent cells around it (linear_context on each side) in this
    # and the previous linear_frames - 1 latent frames (causal). init_linear_codec() makes the encoder the
    # data's principal directions and the decoder their least-squares inverse; the network learns the rest
    linear_codec: bool = True
    linear_context: int = 1
    linear_frames: int = 2
    # a residual refinement at the pixel resolution after the decoder: a 3x3 conv to this many channels, SiLU, a
    # 3x3 conv back to RGB (zero-initialised, so a fresh model starts as without it), frame by frame. The decoder
    # above it ends in a linear map from each feature cell to a whole patch of pixels; this is the one place a
    # nonlinearity sees single pixels, and it sharpens what that map blurs. 0: none
    refine_channels: int = 0

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))
        for name in ("temporal_factor", "spatial_factor", "patch_size"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise InputError(f"{name} must be a power of two, got {v}")
        downs = len(self.channels) - 1
        if self.patch_size * 2**downs != self.spatial_factor:
            raise InputError(
                f"patch_size ({self.patch_size}) x 2^(stages - 1) ({2**downs}) must equal spatial_factor "
                f"({self.spatial_factor}); change patch_size or the number of channels entries"
            )
        for a, b in zip(self.channels, self.channels[1:]):
            if (4 * a) % b:
                raise InputError(f"stage widths {a} -> {b}: 4 x {a} must be divisible by {b} (space-to-channel shortcut)")
        if self.channels[-1] % self.latent_channels:
            raise InputError(f"the last width {self.channels[-1]} must be a multiple of latent_channels {self.latent_channels}")
        if self.linear_context < 0 or self.linear_frames < 1:
            raise InputError(f"linear_context must be >= 0 and linear_frames >= 1, got {self.linear_context} and "
                             f"{self.linear_frames}")
        if self.temporal_kernel < 1 or (self.fine_temporal_kernel is not None and self.fine_temporal_kernel < 1):
            raise InputError(f"temporal_kernel and fine_temporal_kernel must be at least 1, got {self.temporal_kernel} "
                             f"and {self.fine_temporal_kernel}")
        if self.refine_channels < 0:
            raise InputError(f"refine_channels must be 0 (no refinement) or more, got {self.refine_channels}")

    @property
    def compression(self) -> tuple[int, int, int]:
        return self.temporal_factor, self.spatial_factor, self.spatial_factor

    @property
    def fine_kernel(self) -> int:
        """The temporal kernel of the layers at finer resolutions than the latents."""
        return self.temporal_kernel if self.fine_temporal_kernel is None else self.fine_temporal_kernel

    @property
    def cell_patches(self) -> int:
        """Side of one latent cell in input patches (after the patch_size space-to-depth)."""
        return self.spatial_factor // self.patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return config_from_dict(cls, d, "tokenizer")


PRESETS: dict[str, VAEConfig] = {
    # tests and the CPU quickstart: 0.5M parameters; its linear path is the per-block code (no context), and its
    # network works on each latent frame alone (temporal kernel 1): 1.8x the training steps of kernel 3 in the same
    # time, which on the quickstart's clips reconstructs more than the temporal context does. Its encoder's network
    # is the convolutions around the mid block alone, and its decoder refines the pixels with 16 channels: with the
    # quickstart's recipe the shape comes back right in 97-98% of unseen clips against 88-89% (docs/results/tokenizer.md)
    "tiny": VAEConfig(channels=(32, 64), encoder_blocks=0, decoder_blocks=1, mid_blocks=1, linear_context=0,
                      linear_frames=1, temporal_kernel=1, refine_channels=16),
    # CPU training in tens of minutes: 9.2M parameters
    "small": VAEConfig(channels=(64, 128), encoder_blocks=2, decoder_blocks=3, mid_blocks=1),
    # the field's size (Wan-VAE 127M, CogVideoX 215M): 173M parameters
    "base": VAEConfig(patch_size=2, channels=(128, 256, 512), encoder_blocks=2, decoder_blocks=3, mid_blocks=2),
}


def preset(name: str, **overrides) -> VAEConfig:
    return preset_config(PRESETS, name, overrides, "tokenizer")
