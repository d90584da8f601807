"""Known-frame conditioning: which latent frames of a training clip are given clean.

One mechanism serves image-to-video, extension and interpolation. During training each sample draws a mode:

    image        the first latent frame is given (it encodes the first pixel frame alone: the tokenizer is causal)
    extend       the first m latent frames are given, m uniform in 1 .. T - 1 (continue a clip from its tail)
    interpolate  the first and the last latent frames are given (fill in between two keyframes)
    none         nothing is given (text-to-video)

with the probabilities of `ConditionConfig` (the rest is `none`). Given frames enter the model clean, flagged
by an input channel (`DiTConfig.frame_conditioning`), and are left out of the loss (`flow.flow_loss`); the
sampler keeps them exactly at every step (`flow.sample(given=...)`).

`FrameSelection` picks the latent frames a training clip trains on (every K-th for a keyframe model, a window
of N) and draws each sample's mode: `select` returns the frames and which of them are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from errors import InputError

MODES = ("image", "extend", "interpolate")


@dataclass(frozen=True)
class ConditionConfig:
    image: float = 0.0
    extend: float = 0.0
    interpolate: float = 0.0

    def __post_init__(self):
        probs = [getattr(self, m) for m in MODES]
        if min(probs) < 0 or sum(probs) > 1 + 1e-9:
            raise InputError(f"condition probabilities must be at least 0 and sum to at most 1, got "
                             + ", ".join(f"{m}={getattr(self, m)}" for m in MODES))

    @property
    def active(self) -> bool:
        return any(getattr(self, m) > 0 for m in MODES)

    @classmethod
    def parse(cls, items: list[str] | None) -> "ConditionConfig":
        """From ["image=0.2", "extend=0.3", ...]; an InputError names what was wrong."""
        values = {}
        for item in items or []:
            name, sep, value = item.partition("=")
            if not sep or name not in MODES:
                raise InputError(f"condition {item!r}: expected MODE=PROBABILITY with MODE one of {', '.join(MODES)}")
            try:
                values[name] = float(value)
            except ValueError:
                raise InputError(f"condition {item!r}: {value!r} is not a probability") from None
        return cls(**values)

    def draw(self, generator: torch.Generator, frames: int) -> tuple[str, int]:
        """(mode, m) for one sample of `frames` latent frames: m is the number of leading frames given by
        `extend`. A mode the clip is too short for (extension of one frame, interpolation of fewer than three)
        falls back to `none`. Always draws the same two numbers, so the stream does not depend on the result."""
        u = torch.rand((), generator=generator).item()
        m = 1 + int(torch.randint(max(1, frames - 1), (), generator=generator))
        mode, edge = "none", 0.0
        for name in MODES:
            edge += getattr(self, name)
            if u < edge:
                mode = name
                break
        if (mode in ("image", "extend") and frames < 2) or (mode == "interpolate" and frames < 3):
            mode = "none"
        return mode, m


def given_mask(mode: str, frames: int, m: int = 1) -> torch.Tensor:
    """(frames,) bool, True on the latent frames that `mode` gives."""
    mask = torch.zeros(frames, dtype=torch.bool)
    if mode == "image":
        mask[0] = True
    elif mode == "extend":
        if not 1 <= m < frames:
            raise ValueError(f"extension gives 1 to {frames - 1} of {frames} latent frames, got {m}")
        mask[:m] = True
    elif mode == "interpolate":
        mask[0] = mask[-1] = True
    elif mode != "none":
        raise ValueError(f"unknown condition mode {mode!r}; choose none or one of {', '.join(MODES)}")
    return mask


@dataclass(frozen=True)
class FrameSelection:
    """Which latent frames of a training clip the DiT trains on, and which of those are given clean."""

    condition: ConditionConfig = ConditionConfig()
    stride: int = 1  # every stride-th latent frame first (a keyframe model)
    window: int = 0  # then this many of them (0: all)

    def __post_init__(self):
        if self.stride < 1 or self.window < 0:
            raise InputError(f"the latent stride must be at least 1 and the window at least 0, got stride "
                             f"{self.stride} and window {self.window}")

    def frames(self, t: int) -> int:
        """Latent frames a clip of t latent frames trains on."""
        t = -(-t // self.stride)
        return min(t, self.window) if self.window else t

    def select(self, z: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (B, C, T, H, W) -> (B, C, frames(T), H, W) and the given frames ((B, frames(T)) bool, or None when
        conditioning is off), drawing sample i's mode from generators[i]. A window starts at the clip's first
        frame unless the window's own first frame is given (extension, interpolation): then anywhere, so that
        given frames from the middle of a clip are seen in training, as they are when a long video is extended."""
        frames = self.frames(z.shape[2])
        z = z[:, :, ::self.stride]
        if not self.condition.active and frames == z.shape[2]:
            return z, None
        parts, masks = [], []
        for i, g in enumerate(generators):
            mode, m = self.condition.draw(g, frames) if self.condition.active else ("none", 1)
            last = z.shape[2] - frames
            start = int(torch.randint(last + 1, (), generator=g)) if mode in ("extend", "interpolate") else 0
            parts.append(z[i, :, start:start + frames])
            masks.append(given_mask(mode, frames, m))
        given = torch.stack(masks).to(z.device) if self.condition.active else None
        return torch.stack(parts), given
