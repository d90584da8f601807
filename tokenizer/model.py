"""CausalVAE: a causal 3D VAE that compresses video 4x in time and 8x in space (by default).

Layout. The first frame is replicated `temporal_factor - 1` times on the past side, so a clip of
1 + 4k frames becomes k + 1 groups of 4 frames; time-to-depth and space-to-depth then fold each group's
(4, p, p) pixels into channels, and every layer after that runs at the latent frame rate. Latent frame
j therefore sees only groups 0..j, that is frames 0..4j: causal by construction, and a single image is
one group. Strided stages halve the spatial size until it is spatial_factor smaller.

Causality. Every temporal convolution pads on the past side only, replicating the first frame, and
the only normalisation is an RMS norm over channels at each voxel: nothing mixes frames except causal
convolutions. So the latents of the first 1 + 4j frames do not depend on later frames.

Chunks. A `CausalCache` carries, for each temporal convolution, the last `kernel - 1` frames it saw.
Encoding or decoding chunk by chunk with one cache gives the whole-clip result exactly, with memory
bounded by the chunk length.

Shortcuts. Down- and up-sampling blocks add non-parametric shortcuts (space-to-channel then channel
averaging; channel duplication then channel-to-space, as in DC-AE), and so do the latent ends of the
encoder and decoder, so the network starts close to a linear patch codec and trains quickly.
"""

from __future__ import annotations

import math

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

from errors import InputError

from .config import VAEConfig, preset


class CausalCache:
    """The past frames each temporal convolution needs when the next chunk arrives.

    One cache serves one pass over one clip (encode or decode); start a new one for the next clip.
    """

    def __init__(self):
        self._frames: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor | None:
        return self._frames.get(key)

    def put(self, key: str, frames: torch.Tensor) -> None:
        self._frames[key] = frames

    def __len__(self) -> int:
        return len(self._frames)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frames.values())


class CausalConv3d(nn.Module):
    """Conv3d over (T, H, W) that pads time on the past side only, replicating the first frame."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], spatial_stride: int = 1):
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(1, spatial_stride, spatial_stride), padding=(0, kh // 2, kw // 2))
        self.cache_key = ""  # set by CausalVAE to the module's name

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.time_pad:
            past = cache.get(self.cache_key) if cache is not None else None
            if past is None:  # the clip's first chunk: replicate its first frame
                past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)  # (B, C, pad + T, H, W)
            if cache is not None:
                cache.put(self.cache_key, x[:, :, -self.time_pad :])
        return self.conv(x)


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each voxel: never mixes frames or positions."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps) * self.weight.view(1, -1, 1, 1, 1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kt: int):
        super().__init__()
        self.norm1 = ChannelRMSNorm(channels)
        self.conv1 = CausalConv3d(channels, channels, (kt, 3, 3))
        self.norm2 = ChannelRMSNorm(channels)
        self.conv2 = CausalConv3d(channels, channels, (kt, 3, 3))
        nn.init.zeros_(self.conv2.conv.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.conv.bias)

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        return x + self.conv2(F.silu(self.norm2(h)), cache)


class Downsample(nn.Module):
    """Halve H and W: a strided causal conv plus space-to-channel, averaged down to `cout` channels."""

    def __init__(self, cin: int, cout: int, kt: int):
        super().__init__()
        self.conv = CausalConv3d(cin, cout, (kt, 3, 3), spatial_stride=2)
        self.group = 4 * cin // cout

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        shortcut = rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=2, q=2)  # (B, 4C, T, H/2, W/2)
        shortcut = reduce(shortcut, "b (c g) t h w -> b c t h w", "mean", g=self.group)
        return self.conv(x, cache) + shortcut


class Upsample(nn.Module):
    """Double H and W: a causal conv to 4 x `cout` channels then channel-to-space, plus duplicated channels."""

    def __init__(self, cin: int, cout: int, kt: int):
        super().__init__()
        self.conv = CausalConv3d(cin, 4 * cout, (kt, 3, 3))
        self.repeats = 4 * cout // cin

    def forward(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        h = self.conv(x, cache) + repeat(x, "b c t h w -> b (c r) t h w", r=self.repeats)
        return rearrange(h, "b (c p q) t h w -> b c t (h p) (w q)", p=2, q=2)  # (B, cout, T, 2H, 2W)


class PixelRefine(nn.Module):
    """video + conv(SiLU(conv(video))): 3x3 convolutions at the pixel resolution, one frame at a time.

    Frames are folded into the batch and run as 2D convolutions in channels-last layout: with 3 and 8
    channels that takes 0.55 to 0.75 of the time of the same kernels as (1, 3, 3) 3D convolutions on the CPU
    (bench/tokenizer_refine_speed.py)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = rearrange(video, "b c t h w -> (b t) c h w").contiguous(memory_format=torch.channels_last)
        frames = frames + self.conv2(F.silu(self.conv1(frames)))
        return rearrange(frames, "(b t) c h w -> b c t h w", b=video.shape[0])


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        kt, fine, chans = cfg.temporal_kernel, cfg.fine_kernel, cfg.channels
        last = len(chans) - 1
        patch_dim = cfg.in_channels * cfg.temporal_factor * cfg.patch_size**2
        self.conv_in = CausalConv3d(patch_dim, chans[0], (kt if last == 0 else fine, 3, 3))
        self.stages = nn.ModuleList()
        for i, c in enumerate(chans):
            stage = nn.ModuleList(ResBlock(c, kt if i == last else fine) for _ in range(cfg.encoder_blocks))
            if i < last:
                stage.append(Downsample(c, chans[i + 1], fine))
            self.stages.append(stage)
        self.mid = nn.ModuleList(ResBlock(chans[-1], kt) for _ in range(cfg.mid_blocks))
        self.norm_out = ChannelRMSNorm(chans[-1])
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels, (kt, 3, 3))
        nn.init.constant_(self.conv_out.conv.bias[cfg.latent_channels :], cfg.logvar_init)
        self.latent_channels = cfg.latent_channels
        self.linear = None
        if cfg.linear_codec:  # each latent cell from its own pixel block: no time extent, so causal
            s = cfg.cell_patches
            self.linear = nn.Conv3d(patch_dim, cfg.latent_channels, (1, s, s), stride=(1, s, s), bias=False)

    def forward(self, patches: torch.Tensor, cache: CausalCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv_in(patches, cache)
        for block in [b for stage in self.stages for b in stage] + list(self.mid):
            h = block(h, cache)
        moments = self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, 2L, t, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        if self.linear is not None:
            mean = mean + self.linear(patches)
        else:
            mean = mean + reduce(h, "b (l g) t h w -> b l t h w", "mean", l=self.latent_channels)
        return mean, logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        kt, chans = cfg.temporal_kernel, cfg.channels
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[-1], (kt, 3, 3))
        self.repeats = chans[-1] // cfg.latent_channels
        self.mid = nn.ModuleList(ResBlock(chans[-1], kt) for _ in range(cfg.mid_blocks))
        fine, last = cfg.fine_kernel, len(chans) - 1
        self.stages = nn.ModuleList()
        for i in reversed(range(len(chans))):
            stage = nn.ModuleList(ResBlock(chans[i], kt if i == last else fine) for _ in range(cfg.decoder_blocks))
            if i > 0:
                stage.append(Upsample(chans[i], chans[i - 1], fine))
            self.stages.append(stage)
        self.norm_out = ChannelRMSNorm(chans[0])
        patch_dim = cfg.in_channels * cfg.temporal_factor * cfg.patch_size**2
        self.conv_out = CausalConv3d(chans[0], patch_dim, (kt if last == 0 else fine, 3, 3))
        self.linear = None
        self.block = cfg.cell_patches
        if cfg.linear_codec:  # each cell's block of patches from the cells around it, then depth-to-space
            k = 2 * cfg.linear_context + 1
            self.linear = CausalConv3d(cfg.latent_channels, patch_dim * self.block**2, (cfg.linear_frames, k, k))
            nn.init.zeros_(self.linear.conv.weight)  # silent until fitted (tokenizer.linear_codec.fit_linear_codec) or trained
            nn.init.zeros_(self.linear.conv.bias)

    def forward(self, z: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        h = self.conv_in(z, cache) + repeat(z, "b l t h w -> b (l r) t h w", r=self.repeats)
        for block in list(self.mid) + [b for stage in self.stages for b in stage]:
            h = block(h, cache)
        out = self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, C * pt * p * p, t, H/p, W/p)
        if self.linear is None:
            return out
        return out + rearrange(self.linear(z, cache), "b (d i j) t h w -> b d t (h i) (w j)", i=self.block, j=self.block)


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), per latent element."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device  # a CPU generator for a GPU posterior
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, 1)) summed over each sample's latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


def _nearest_multiples(n: int, m: int) -> str:
    lower = max(m, n // m * m)
    return f"{lower} or {lower + m}" if lower != n else str(n)


def check_video_shape(video: torch.Tensor, channels: int, tf: int, sf: int) -> None:
    """An InputError naming the nearest valid sizes unless video is (B, channels, 1 + tf k, H, W) with H and W
    divisible by sf."""
    if video.ndim != 5 or video.shape[1] != channels:
        raise InputError(f"expected video (B, {channels}, T, H, W), got shape {tuple(video.shape)}")
    t, h, w = video.shape[2:]
    if (t - 1) % tf:
        lower = 1 + (t - 1) // tf * tf
        raise InputError(f"the frame count must be 1 + {tf}k (1, {1 + tf}, {1 + 2 * tf}, ...); got {t}: use {lower} or {lower + tf}")
    for name, n in (("height", h), ("width", w)):
        if n % sf:
            raise InputError(f"{name} {n} is not divisible by the spatial factor {sf}: use {_nearest_multiples(n, sf)}")


class CausalVAE(nn.Module):
    """Video (B, 3, 1 + 4k, H, W) in [-1, 1]  <->  latents (B, 16, 1 + k, H/8, W/8)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.refine = PixelRefine(config.in_channels, config.refine_channels) if config.refine_channels else None
        # per-channel latent statistics measured on data, so that normalize() gives unit-scale latents
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
        for name, module in self.named_modules():
            if isinstance(module, CausalConv3d):
                module.cache_key = name

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CausalVAE":
        return cls(preset(name, **overrides))

    # ---- shapes ---------------------------------------------------------------------------------

    def check_video(self, video: torch.Tensor) -> None:
        """Raise an InputError naming the nearest valid sizes unless video is (B, C, 1 + tk, H, W) with H, W
        divisible by the spatial factor."""
        check_video_shape(video, self.config.in_channels, self.config.temporal_factor, self.config.spatial_factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.config
        return cfg.latent_channels, 1 + (frames - 1) // cfg.temporal_factor, height // cfg.spatial_factor, width // cfg.spatial_factor

    def patchify(self, video: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Latent frames [start, stop) of the space-to-depth input, folded from only the pixel frames they hold
        (a chunk never copies the whole clip): frame 0 is replicated to fill the first group."""
        stop = self.latent_shape(*video.shape[2:])[1] if stop is None else stop
        a, b = self.pixel_range(start, stop)
        return self._fold(video[:, :, a:b], first=start == 0)

    def pixel_range(self, start: int, stop: int) -> tuple[int, int]:
        """The pixel frames [a, b) that latent frames [start, stop) encode from and decode to."""
        tf = self.config.temporal_factor
        return (0 if start == 0 else 1 + tf * (start - 1)), 1 + tf * (stop - 1)

    def pixel_ranges(self, frames: int, chunk: int) -> list[tuple[int, int]]:
        """The pixel frames each step of `chunk` latent frames takes, in order, for a clip of `frames` frames
        (what `encode_stream` is given and `decode_stream` gives back)."""
        latent = self.latent_shape(frames, 1, 1)[1]
        return [self.pixel_range(i, min(i + chunk, latent)) for i in range(0, latent, self._chunk(chunk))]

    def _fold(self, part: torch.Tensor, first: bool) -> torch.Tensor:
        cfg = self.config
        if first:
            part = torch.cat([part[:, :, :1].expand(-1, -1, cfg.temporal_factor - 1, -1, -1), part], dim=2)
        return rearrange(part, "b c (t pt) (h ph) (w pw) -> b (c pt ph pw) t h w", pt=cfg.temporal_factor,
                         ph=cfg.patch_size, pw=cfg.patch_size)

    def decode_bytes(self, height: int, width: int, chunk: int, dtype_bytes: int = 4) -> float:
        """About how much memory decoding one chunk of `chunk` latent frames to (height, width) holds at its peak:
        each decoder stage's widest block (about ten tensors of its width live, over the chunk and the past frames
        its temporal convolutions add), the output patches and the pixel refinement; on the CPU it came out 1.06-1.48x
        the measured peak for the tiny and small presets at 128x192 and 256x256. An estimate for sizing a run
        (sample.py --dry-run), not a measurement."""
        cfg = self.config
        p, t = cfg.patch_size, chunk + cfg.temporal_kernel - 1
        pixels = cfg.temporal_factor * chunk * height * width  # pixel frames x pixels the chunk decodes to
        stages = sum(10 * c * (height // (p * 2**i)) * (width // (p * 2**i)) for i, c in enumerate(cfg.channels)) * t
        out = 2 * cfg.in_channels * pixels + 2 * cfg.refine_channels * pixels
        return (stages + out) * dtype_bytes

    def encode_step(self, part: torch.Tensor, cache: CausalCache, first: bool) -> DiagonalGaussian:
        """The posterior of one pixel chunk (B, C, b - a, H, W), as `pixel_ranges` cuts a clip, given the cache
        of the chunks before it (`first`: the clip's first chunk; the cache starts empty)."""
        return DiagonalGaussian(*self.encoder(self._fold(part, first), cache))

    def decode_step(self, latents: torch.Tensor, cache: CausalCache, first: bool) -> torch.Tensor:
        """The video frames of one latent chunk, given the cache of the chunks before it."""
        self._check_latents(latents)
        return self._pixels(self.decoder(latents, cache), first=first)

    def encode_stream(self, parts) -> Iterator[DiagonalGaussian]:
        """The posterior of each pixel chunk in turn, as `pixel_ranges` cuts a clip: the whole-clip posterior, a
        step at a time, with memory bounded by the chunk; the clip need never be held whole."""
        cache = CausalCache()
        for i, part in enumerate(parts):
            yield self.encode_step(part, cache, first=i == 0)

    def decode_stream(self, latent_parts) -> Iterator[torch.Tensor]:
        """The video frames of each latent chunk in turn: the whole-clip decode, a step at a time."""
        cache = CausalCache()
        for i, latents in enumerate(latent_parts):
            yield self.decode_step(latents, cache, first=i == 0)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return rearrange(patches, "b (c pt ph pw) t h w -> b c (t pt) (h ph) (w pw)",
                         c=cfg.in_channels, pt=cfg.temporal_factor, ph=cfg.patch_size, pw=cfg.patch_size)

    def _pixels(self, patches: torch.Tensor, first: bool) -> torch.Tensor:
        """The decoder's output patches as frames (without the replicated copies of frame 0 where `first`, the
        clip's first chunk), refined at the pixel resolution where the config asks."""
        video = self.unpatchify(patches)
        if first:
            video = video[:, :, self.config.temporal_factor - 1 :]
        return video if self.refine is None else self.refine(video)

    # ---- encode / decode ------------------------------------------------------------------------

    def halo(self) -> tuple[int, int]:
        """How many latent cells beyond a tile's edge can change the encoder's and the decoder's output inside it:
        the spatial receptive radius of each, rounded up. Tiles computed with this margin and cropped equal the
        whole-frame result, so tiling leaves no seams to blend."""
        cfg = self.config
        last = len(cfg.channels) - 1
        enc = 1.0  # conv_in, in pixels of the first stage's grid
        for i in range(len(cfg.channels)):
            enc += (2 * cfg.encoder_blocks + (1 if i < last else 0)) * 2**i
        enc += (2 * cfg.mid_blocks + 1) * 2**last  # mid blocks and conv_out
        dec = 1.0 + 2 * cfg.mid_blocks  # conv_in and mid, in latent cells
        for i in range(last, -1, -1):
            dec += (2 * cfg.decoder_blocks + (1 if i > 0 else 0)) / 2 ** (last - i)
        dec += 1 / 2**last  # conv_out
        dec += 2 / cfg.spatial_factor if cfg.refine_channels else 0  # the two 3x3 convs on pixels
        if cfg.linear_codec:
            dec = max(dec, cfg.linear_context)
        return math.ceil(enc / 2**last) + 1, math.ceil(dec) + 1

    def _tiled(self, x: torch.Tensor, tile: int, halo: int, in_scale: int, out_scale: int, run) -> list[torch.Tensor]:
        """Run `run` on tiles of tile x tile pixels of x (..., H, W), each grown by `halo` latent cells of
        context on every side, and stitch the results' tile interiors together. x has `in_scale` and the
        results `out_scale` elements per latent cell along each side (the spatial factor for pixels, 1 for
        latents); `run` returns a tuple of tensors, and so does this."""
        s = self.config.spatial_factor
        if tile < s or tile % s:
            raise InputError(f"tile must be a positive multiple of the spatial factor {s}, got {tile}")
        cells_h, cells_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
        outs = None
        for (y0, y1), (gy0, gy1) in self._tiles(cells_h, tile // s, halo):
            for (x0, x1), (gx0, gx1) in self._tiles(cells_w, tile // s, halo):
                parts = run(x[..., gy0 * in_scale : gy1 * in_scale, gx0 * in_scale : gx1 * in_scale])
                if outs is None:
                    outs = [p.new_empty(*p.shape[:-2], cells_h * out_scale, cells_w * out_scale) for p in parts]
                inner = (..., slice((y0 - gy0) * out_scale, (y1 - gy0) * out_scale),
                         slice((x0 - gx0) * out_scale, (x1 - gx0) * out_scale))
                for out, part in zip(outs, parts):
                    out[..., y0 * out_scale : y1 * out_scale, x0 * out_scale : x1 * out_scale] = part[inner]
        return outs

    @staticmethod
    def _tiles(size: int, tile: int, halo: int):
        """(start, stop) of each tile along one axis (latent cells), and of the tile grown by the halo."""
        for a in range(0, size, tile):
            b = min(size, a + tile)
            yield (a, b), (max(0, a - halo), min(size, b + halo))

    def encode(self, video: torch.Tensor, chunk: int | None = None, tile: int | None = None) -> DiagonalGaussian:
        """The posterior over latents (B, L, 1 + k, H/s, W/s). `chunk`: latent frames per step (bounded memory);
        `tile`: encode tiles of tile x tile pixels (a multiple of the spatial factor) for very large frames,
        each with enough context around it that the result equals the whole-frame one."""
        self.check_video(video)
        if tile is not None:
            def encode_tile(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                posterior = self.encode(part, chunk)
                return posterior.mean, posterior.logvar

            return DiagonalGaussian(*self._tiled(video, tile, self.halo()[0], self.config.spatial_factor, 1, encode_tile))
        frames = self.latent_shape(*video.shape[2:])[1]
        if chunk is None or chunk >= frames:
            return DiagonalGaussian(*self.encoder(self.patchify(video), None))  # (B, C * pt * p * p, 1 + k, ...)
        parts = list(self.encode_stream(video[:, :, a:b] for a, b in self.pixel_ranges(video.shape[2], chunk)))
        return DiagonalGaussian(torch.cat([p.mean for p in parts], dim=2), torch.cat([p.logvar for p in parts], dim=2))

    def decode(self, latents: torch.Tensor, chunk: int | None = None, tile: int | None = None) -> torch.Tensor:
        """Video (B, C, 1 + 4k, H, W) from latents (B, L, 1 + k, h, w). `chunk`: latent frames per step;
        `tile`: decode tiles of tile x tile pixels with context, equal to the whole-frame result."""
        self._check_latents(latents)
        b, _, t, h, w = latents.shape
        cfg = self.config
        if tile is not None:
            return self._tiled(latents, tile, self.halo()[1], 1, cfg.spatial_factor,
                               lambda part: (self.decode(part, chunk),))[0]
        if chunk is None or chunk >= t:
            return self._pixels(self.decoder(latents, None), first=True)
        out = latents.new_empty(b, cfg.in_channels, 1 + (t - 1) * cfg.temporal_factor, h * cfg.spatial_factor, w * cfg.spatial_factor)
        start = 0
        for frames in self.decode_chunks(latents, chunk):
            out[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return out

    def decode_chunks(self, latents: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
        """Decode `chunk` latent frames at a time, yielding their video frames in order, so a long video can
        be written to disk as it is decoded, with memory bounded by the chunk."""
        self._check_latents(latents)
        yield from self.decode_stream(latents[:, :, i : i + chunk] for i in range(0, latents.shape[2], self._chunk(chunk)))

    def forward(self, video: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, for training."""
        posterior = self.encode(video)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latents (B, {self.config.latent_channels}, t, h, w), got shape {tuple(latents.shape)}")

    @staticmethod
    def _chunk(chunk: int) -> int:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1 latent frame, got {chunk}")
        return chunk

    # ---- latent statistics ----------------------------------------------------------------------

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.latent_mean.copy_(mean.reshape(-1))
        self.latent_std.copy_(std.reshape(-1).clamp_min(1e-6))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents with per-channel zero mean and unit std (for the DiT)."""
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
