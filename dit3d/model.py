"""DiT3D: a diffusion transformer over spacetime cuboid tokens of video latents.

    v = model(x, t, text, text_mask)   # x (B, C, T, H, W) latents, t (B,) in [0, 1], text (B, L, text_dim)

Latents are cut into (pt, ph, pw) cuboids, each a token (linear or Conv3d embedding). Every block has
full 3D self-attention over all the clip's tokens, with a 3D rotary embedding split over (t, h, w) (no
position table, so any T, H, W divisible by the patch works), cross-attention to the text tokens that
honours the padding mask, and an MLP; RMS norm on queries and keys. The flow time modulates every block
through adaLN-Zero, with one modulation projection shared by all blocks plus a learned table per block
(as PixArt-alpha and Wan do); the gates and the output layer start at zero, so each block starts as the
identity and the model's output starts at exactly zero. With `absolute_position`, sine-cosine features of
each token's (t, h, w) index are added to its embedding too: rotary tells attention how far apart two
tokens are, not where either is in the frame (with `absolute_time="fraction"`, time is how far through the
clip a token is, the same span at any length). Activation checkpointing, compile, sharding and sequence
parallelism are applied from outside (see `parallel/`), the last by swapping the `Attend` calls and the
`TokenLayout` below for versions that exchange tokens between ranks.

Known frames. With `frame_conditioning`, the input has one more channel that is 1 on the latent frames
given clean (`given`, (B, T) bool: the first frame for image-to-video, the first m for extension, the first
and last for interpolation) and 0 elsewhere, so every token sees which of its frames are known. With
nothing given the extra channel is zero and the model computes exactly what it computes without it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from errors import InputError

from .attention import attention, resolve_backend
from .config import DiTConfig, preset
from .rope import TimeScaling, apply_rope, rope_cos_sin, sincos_position


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, C * pt * ph * pw), tokens in raster order over (T/pt, H/ph, W/pw)."""
    pt, ph, pw = patch
    return rearrange(x, "b c (t pt) (h ph) (w pw) -> b (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, C * pt * ph * pw) -> (B, C, T, H, W): the inverse of `patchify`, one rearrange."""
    (t, h, w), (pt, ph, pw) = grid, patch
    return rearrange(tokens, "b (t h w) (c pt ph pw) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000 t for t in [0, 1]: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attend(nn.Module):
    """The attention call of a block, as a module so that sequence parallelism can wrap it from outside
    (parallel/ulysses.py swaps in one that exchanges heads for tokens around it). No parameters."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, v, key_mask=None):  # q (B, heads, N, D), k/v (B, heads, L, D) -> (B, heads, N, D)
        return attention(q, k, v, self.backend, key_mask=key_mask)


class TokenLayout(nn.Module):
    """Where the blocks' tokens live: here, all on this process. Sequence parallelism (parallel/ulysses.py)
    replaces it by one that gives each rank a contiguous slice of every sequence and gathers the output.

    split(h (B, N, width), cos, sin (..., N, head_dim)) -> this rank's tokens and their rotary angles;
    gather(out (B, n, C)) -> the whole sequence; `multiple`: sequence lengths must divide by it."""

    multiple = 1

    def split(self, h, cos, sin):
        return h, cos, sin

    def gather(self, out):
        return out


class HeadRMSNorm(nn.RMSNorm):
    """RMS norm of each head's channels, applied to (..., width) = (..., heads * head_dim) features."""

    def __init__(self, heads: int, head_dim: int, eps: float):
        super().__init__(head_dim, eps=eps)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unflatten(-1, (self.heads, -1))).flatten(-2)


def qk_norms(cfg: DiTConfig) -> tuple[nn.Module, nn.Module]:
    """The query and key norms of an attention layer: per head (ours), over the whole width (Wan), or none."""
    if not cfg.qk_norm:
        return nn.Identity(), nn.Identity()
    if cfg.qk_norm_over == "width":
        return nn.RMSNorm(cfg.width, eps=cfg.norm_eps), nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
    return HeadRMSNorm(cfg.heads, cfg.head_dim, cfg.norm_eps), HeadRMSNorm(cfg.heads, cfg.head_dim, cfg.norm_eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, backend: str):
        super().__init__()
        self.heads, self.rope_pairs = cfg.heads, cfg.rope_pairs
        self.attend = Attend(backend)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.q_norm, self.k_norm = qk_norms(cfg)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tokens stay outermost in memory, (B, N, heads, D), and attention gets (B, heads, N, D) views: the
        # kernels then write their output in that layout too, and merging the heads back is free (no copy)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, width) each
        q, k = self.q_norm(q), self.k_norm(k)  # per head or over the width: see HeadRMSNorm
        q, k, v = (rearrange(a, "b n (h d) -> b n h d", h=self.heads) for a in (q, k, v))
        q, k = apply_rope(q, cos, sin, self.rope_pairs), apply_rope(k, cos, sin, self.rope_pairs)
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), token_mask)  # (B, heads, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig, backend: str):
        super().__init__()
        self.heads, self.backend = cfg.heads, backend  # queries are local: no sequence exchange
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.q_norm, self.k_norm = qk_norms(cfg)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        k, v = self.kv(text).chunk(2, dim=-1)  # (B, L, width) each
        q, k = self.q_norm(self.q(x)), self.k_norm(k)
        q = rearrange(q, "b n (h d) -> b h n d", h=self.heads)  # a view of the layout SelfAttention keeps
        k, v = (rearrange(a, "b l (h d) -> b h l d", h=self.heads) for a in (k, v))
        out = attention(q, k, v, self.backend, key_mask=text_mask)  # (B, heads, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = int(cfg.width * cfg.mlp_ratio + 1e-6)  # 1536 * (8960 / 1536) is 8960, not 8959
        if self.swiglu:  # two thirds of the width keeps the parameter count of a GELU MLP
            hidden = 8 * math.ceil(2 * hidden / 3 / 8)
        self.fc1 = nn.Linear(cfg.width, 2 * hidden if self.swiglu else hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            a, b = h.chunk(2, dim=-1)
            return self.fc2(F.silu(a) * b)
        return self.fc2(F.gelu(h, approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg, backend)
        self.norm_cross = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.cross = CrossAttention(cfg, backend)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        # this block's part of the modulation, added to the projection shared by all blocks
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.width))

    def forward(self, x, shared_mod, cos, sin, text, text_mask, token_mask=None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (shared_mod + self.modulation).unbind(1)  # (B, width) each
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin, token_mask)
        x = x + self.cross(self.norm_cross(x), text, text_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT3D(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.time_scaling: TimeScaling | None = None  # rotary time frequencies for clips past the trained length
        pt, ph, pw = cfg.patch_size
        channels = cfg.in_channels + int(cfg.frame_conditioning)  # + the "given" flag channel
        if cfg.patch_embed == "conv":
            self.embed = nn.Conv3d(channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        else:
            self.embed = nn.Linear(channels * pt * ph * pw, cfg.width)
        self.time_embed = nn.Sequential(nn.Linear(256, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))  # shared by all blocks
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, cfg.width), nn.GELU(approximate="tanh"),
                                        nn.Linear(cfg.width, cfg.width))
        # a learned one-token "no caption", for caption dropout and classifier-free guidance
        self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) * 0.02)
        self.attention_backend = resolve_backend(cfg.attention_backend)  # once, here: see attention.py
        if cfg.sampler_embed:  # (guidance, steps) -> a term of the time embedding, as guidance-distilled FLUX does
            self.sampler_embed = nn.Sequential(nn.Linear(512, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))
        self.blocks = nn.ModuleList(DiTBlock(cfg, self.attention_backend) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=cfg.norm_eps)
        if cfg.out_modulation == "table":  # shift and scale = a learned table + the time embedding (Wan)
            self.out_table = nn.Parameter(torch.zeros(1, 2, cfg.width))
        else:
            self.out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.out = nn.Linear(cfg.width, cfg.output_channels * pt * ph * pw)
        self.layout = TokenLayout()
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiT3D":
        return cls(preset(name, **overrides))

    def initialize_weights(self) -> None:
        """Xavier for linear layers; zero for every modulation and the output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.embed, nn.Conv3d):
            nn.init.xavier_uniform_(self.embed.weight.view(self.embed.weight.shape[0], -1))
            nn.init.zeros_(self.embed.bias)
        nn.init.normal_(self.time_embed[0].weight, std=0.02)
        nn.init.normal_(self.time_embed[2].weight, std=0.02)
        out_modulation = [self.out_modulation[1]] if self.config.out_modulation == "linear" else []
        sampler = [self.sampler_embed[2]] if self.config.sampler_embed else []  # a student starts as its teacher
        for layer in (self.time_modulation[1], *out_modulation, self.out, *sampler):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---- shapes ---------------------------------------------------------------------------------

    def token_grid(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (T/pt, H/ph, W/pw) for latents of (T, H, W); a ValueError names the nearest valid sizes."""
        out = []
        for name, n, p in zip(("frames", "height", "width"), shape, self.config.patch_size):
            if n < p or n % p:
                lower = max(p, n // p * p)
                raise InputError(f"latent {name} {n} is not divisible by the patch size {p}: use "
                                 + (f"{lower} or {lower + p}" if lower != n else str(lower)))
            out.append(n // p)
        return tuple(out)

    # ---- text -----------------------------------------------------------------------------------

    def null_condition(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The "no caption" condition: tokens (B, 1, text_dim) and mask (B, 1)."""
        text = self.null_text[None].expand(batch, -1, -1)
        return text, torch.ones(batch, 1, dtype=torch.bool, device=text.device)

    def drop_captions(self, text: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor):
        """Replace the captions of the rows where `drop` (B,) is True by the null condition, keeping shapes."""
        drop = drop.to(text.device)
        null = torch.zeros_like(text)
        null[:, 0] = self.null_text.to(text.dtype)
        null_mask = torch.zeros_like(text_mask)
        null_mask[:, 0] = True
        return torch.where(drop[:, None, None], null, text), torch.where(drop[:, None], null_mask, text_mask)

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                given: torch.Tensor | None = None, sampler: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity (B, C, T, H, W) for latents x (B, C, T, H, W) at flow time t (B,) given text (B, L, text_dim)
        and its mask (B, L), True for real tokens (None: all real). `given` (B, T) bool marks the latent frames
        that are known and clean in x (needs `frame_conditioning`; None: none). `sampler` (B, 2): a distilled
        student's (guidance scale, sampler steps) (needs `sampler_embed`)."""
        cfg = self.config
        self._check_latents(x, batched=True)
        grid = self.token_grid(tuple(x.shape[2:]))
        cos, sin = rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta, x.device, torch.float32, cfg.rope_pairs,
                                self.time_scaling)  # (N, head_dim)
        h = self._run(self._embed(x, grid, given), cos, sin, t, text, text_mask, None, sampler)
        return unpatchify(h, grid, cfg.patch_size)

    def forward_varlen(self, xs: list[torch.Tensor], t: torch.Tensor, text: torch.Tensor,
                       text_mask: torch.Tensor | None = None,
                       given: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """A batch that mixes durations and sizes: latents xs[i] (C, T_i, H_i, W_i) -> velocities of the same shapes.

        Each clip keeps its own token grid and rotary positions; the token sequences are padded to the longest
        and the padding is masked out of self-attention (SDPA with a key mask, or xFormers packing the clips
        under a block-diagonal mask; see attention.py), so each result equals the clip's own forward pass.
        """
        cfg = self.config
        grids, tokens, coss, sins = [], [], [], []
        for i, x in enumerate(xs):
            self._check_latents(x, batched=False)
            grid = self.token_grid(tuple(x.shape[1:]))
            cos, sin = rope_cos_sin(grid, cfg.head_dim, cfg.rope_theta, x.device, torch.float32, cfg.rope_pairs,
                                    self.time_scaling)
            grids.append(grid)
            g = given[i] if given is not None else None
            tokens.append(self._embed(x[None], grid, None if g is None else g[None])[0])  # (N_i, width)
            coss.append(cos)
            sins.append(sin)
        lengths = [len(tk) for tk in tokens]
        n = -(-max(lengths) // self.layout.multiple) * self.layout.multiple
        pad = lambda parts, value: torch.stack([F.pad(p, (0, 0, 0, n - len(p)), value=value) for p in parts])  # noqa: E731
        token_mask = torch.arange(n, device=tokens[0].device)[None] < torch.tensor(lengths, device=tokens[0].device)[:, None]
        h = self._run(pad(tokens, 0.0), pad(coss, 1.0), pad(sins, 0.0), t, text, text_mask, token_mask)
        return [unpatchify(h[i : i + 1, :length], grid, cfg.patch_size)[0] for i, (length, grid) in enumerate(zip(lengths, grids))]

    def _check_latents(self, x: torch.Tensor, batched: bool) -> None:
        expected = 5 if batched else 4
        if x.ndim != expected or x.shape[-4] != self.config.in_channels:
            shape = "(B, {}, T, H, W)" if batched else "({}, T, H, W)"
            raise ValueError(f"expected latents {shape.format(self.config.in_channels)}, got shape {tuple(x.shape)}")

    def _embed(self, x: torch.Tensor, grid: tuple[int, int, int], given: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, H, W), its token grid and the given-frame flags (B, T) -> tokens (B, N, width)."""
        if self.config.frame_conditioning:
            b, _, t, h, w = x.shape
            flag = torch.zeros(b, 1, t, h, w, dtype=x.dtype, device=x.device)
            if given is not None:
                if given.shape != (b, t):
                    raise ValueError(f"given must be (batch, latent frames) = {(b, t)}, got {tuple(given.shape)}")
                flag = flag + given.to(device=x.device, dtype=x.dtype)[:, None, :, None, None]
            x = torch.cat([x, flag], dim=1)
        elif given is not None and bool(given.any()):
            raise InputError("this DiT was trained without frame conditioning, so it cannot take given frames "
                             "(train one with `train.py --stage dit --condition ...`)")
        if isinstance(self.embed, nn.Conv3d):
            h = self.embed(x).flatten(2).transpose(1, 2)
        else:
            h = self.embed(patchify(x, self.config.patch_size))
        if self.config.absolute_position:
            h = h + sincos_position(grid, self.config.width, self.config.rope_theta, x.device, h.dtype, self.time_scaling,
                                    time_fraction=self.config.absolute_time == "fraction")
        return h

    def run_blocks(self, h, shared, cos, sin, txt, text_mask, token_mask) -> torch.Tensor:
        """The blocks on tokens h (B, N, width) with the shared time modulation (B, 6, width) and embedded text
        (B, L, width); what step caching (dit3d/cache.py) stands in for on the steps it skips."""
        for block in self.blocks:
            h = block(h, shared, cos, sin, txt, text_mask, token_mask)
        return h

    def _run(self, h, cos, sin, t, text, text_mask, token_mask, sampler=None) -> torch.Tensor:
        """The transformer on embedded tokens h (B, N, width) -> output tokens (B, N, C_out * pt * ph * pw)."""
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        emb = self.time_embed(timestep_embedding(t).to(h.dtype))  # (B, width)
        if (sampler is not None) != self.config.sampler_embed:
            raise InputError("a distilled student needs its (guidance, steps) input and only a student takes one: "
                             "sample it through Pipeline / sample.py, which give it")
        if sampler is not None:  # guidance / 10 and steps / 10 as 'times', each through the time features
            features = torch.cat([timestep_embedding(sampler[:, 0] / 10), timestep_embedding(sampler[:, 1] / 10)], 1)
            emb = emb + self.sampler_embed(features.to(h.dtype))
        h, cos, sin = self.layout.split(h, cos, sin)  # (B, N / ranks, width) with sequence parallelism
        shared = self.time_modulation(emb).unflatten(1, (6, self.config.width))  # (B, 6, width)
        txt = self.text_embed(text)  # (B, L, width)
        h = self.run_blocks(h, shared, cos, sin, txt, text_mask, token_mask)
        if self.config.out_modulation == "table":
            shift, scale = (self.out_table + emb[:, None]).unbind(1)  # (B, width) each
        else:
            shift, scale = self.out_modulation(emb).chunk(2, dim=1)
        return self.layout.gather(self.out(modulate(self.norm_out(h), shift, scale)))  # (B, N, C_out * patch)


def with_frame_conditioning(model: "DiT3D") -> "DiT3D":
    """`model` with the known-frames input channel added (DiTConfig.frame_conditioning), its weights in that
    channel zero: with nothing given it computes exactly what `model` computes, and fine-tuning with
    --condition teaches it to read the flag (text-to-video into extension or image-to-video)."""
    if model.config.frame_conditioning:
        return model
    out = DiT3D(dataclasses.replace(model.config, frame_conditioning=True)).to(next(model.parameters()).device)
    state = model.state_dict()
    old = state["embed.weight"]  # linear (width, C * p), columns in (c pt ph pw) order; conv (width, C, pt, ph, pw)
    if old.ndim == 2:
        state["embed.weight"] = torch.cat([old, old.new_zeros(old.shape[0], old.shape[1] // model.config.in_channels)], 1)
    else:
        state["embed.weight"] = torch.cat([old, old.new_zeros(old.shape[0], 1, *old.shape[2:])], 1)
    out.load_state_dict(state)
    out.time_scaling = model.time_scaling
    return out

