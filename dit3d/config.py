"""The DiT's configuration: a typed dataclass with named presets, stored as JSON beside the weights."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from checkpoint_io import config_from_dict, preset_config
from errors import InputError


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 16  # latent channels (the tokenizer's)
    out_channels: int | None = None  # predicted channels; None: in_channels
    text_dim: int = 256  # width of the text encoder's tokens
    width: int = 384  # transformer width
    depth: int = 12  # blocks
    heads: int = 6  # attention heads; width / heads is the head dim (even, for the rotary pairs)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent voxels per token
    mlp_ratio: float = 4.0  # MLP hidden width over the model width
    mlp: str = "gelu"  # gelu (tanh approximation) | swiglu
    patch_embed: str = "linear"  # linear | conv (Conv3d with kernel = stride = patch; the same map, another layout)
    qk_norm: bool = True  # RMS norm of queries and keys, in self- and cross-attention
    qk_norm_over: str = "head"  # head: each head's channels | width: all heads' at once, before the split (Wan)
    rope_theta: float = 10000.0  # base of the rotary frequencies
    rope_pairs: str = "half"  # channels that rotate together: half (i, i + d/2) | adjacent (2i, 2i + 1), as Wan
    attention_backend: str = "sdpa"  # sdpa | xformers | reference; DIT3D_ATTENTION overrides
    norm_eps: float = 1e-6
    # one more input channel, 1 on latent frames given clean (image-to-video, extension, interpolation)
    frame_conditioning: bool = False
    # the output layer's shift and scale: linear (SiLU + a linear map of the time embedding) | table (a learned
    # (2, width) table plus the time embedding itself, as Wan)
    out_modulation: str = "linear"
    # add absolute sine-cosine features of each token's (t, h, w) place to its embedding, besides rotary
    absolute_position: bool = False
    # where a token is in time, for those features: index (its token frame, 0, 1, 2, ...: a clip longer than the
    # trained ones has places never seen) | fraction (how far through the clip, 0 at the first token frame and
    # 1 at the last, for any length)
    absolute_time: str = "index"
    # a distilled student's extra inputs (train.py --stage distill): the guidance scale it stands in for and the
    # number of sampler steps, embedded and added to the time embedding (zero at initialisation)
    sampler_embed: bool = False

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise InputError(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.width % self.heads:
            raise InputError(f"width {self.width} must be divisible by heads {self.heads}")
        if self.head_dim % 2:
            raise InputError(f"the head dim {self.head_dim} must be even: rotary embeddings rotate pairs of channels")
        if self.mlp not in ("gelu", "swiglu"):
            raise InputError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        for name, allowed in (("qk_norm_over", ("head", "width")), ("rope_pairs", ("half", "adjacent")),
                              ("absolute_time", ("index", "fraction")),
                              ("out_modulation", ("linear", "table"))):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")
        if self.patch_embed not in ("linear", "conv"):
            raise InputError(f"patch_embed must be 'linear' or 'conv', got {self.patch_embed!r}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return config_from_dict(cls, d, "DiT")


# what makes a DiTConfig Wan2.1's transformer, besides its sizes (see dit3d/wan.py)
WAN = dict(patch_embed="conv", qk_norm_over="width", rope_pairs="adjacent", out_modulation="table")

PRESETS: dict[str, DiTConfig] = {
    # tests and the CPU quickstart. absolute_position: with rotary alone, whether the quickstart learnt the
    # direction of motion depended on the initial weights (see docs/results/quickstart.md)
    "tiny": DiTConfig(width=96, depth=4, heads=4, text_dim=64, absolute_position=True),
    # DiT's sizes (Peebles & Xie): S, B, L, XL
    "S": DiTConfig(width=384, depth=12, heads=6),
    "B": DiTConfig(width=768, depth=12, heads=12, text_dim=512),
    "L": DiTConfig(width=1024, depth=24, heads=16, text_dim=1024),
    "XL": DiTConfig(width=1152, depth=28, heads=16, text_dim=1024),
    # Wan2.1's text-to-video transformers, exactly (DiT3D.from_pretrained loads their weights): width 1536, 30
    # layers, 12 heads, FFN 8960 (1.3B); width 5120, 40 layers, 40 heads, FFN 13824 (14B); UMT5 text (4096)
    "1.3B": DiTConfig(width=1536, depth=30, heads=12, mlp_ratio=8960 / 1536, text_dim=4096, **WAN),
    "14B": DiTConfig(width=5120, depth=40, heads=40, mlp_ratio=13824 / 5120, text_dim=4096, **WAN),
}


def preset(name: str, **overrides) -> DiTConfig:
    return preset_config(PRESETS, name, overrides, "DiT")
