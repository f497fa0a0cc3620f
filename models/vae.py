"""The video autoencoder: pixels (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, T/ft, H/fs, W/fs).

A small convolutional VAE in the style of the causal video VAEs of Open-Sora and Wan:

    encoder: conv_in → [ResBlocks → Downsample] per level → mid ResBlock → norm → conv_out (mean, logvar)
    decoder: conv_in → mid ResBlock → [ResBlocks → Upsample] per level → norm → conv_out

Two choices keep it cheap on CPUs and ready for long clips:

* Every 3D convolution is factorised "(2+1)D" (R(2+1)D, Tran et al. 2018): a 3×3 convolution over
  each frame followed by a kernel-3 convolution across frames. On CPUs, PyTorch's dense 3×3×3
  Conv3d measured 4–13x slower than this pair at 16–128 channels; the factorised form has the
  same receptive field with fewer weights.
* Time is causal: temporal convolutions only look back (the clip's first frame is replicated as
  padding) and norms act on each voxel (RMS over channels, as in Wan). So the latent of frame
  group j depends only on frames up to j, and decoding can later run in temporal chunks with a
  cache of the last two frames per temporal conv, giving the same result as decoding at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import VAEConfig


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channel axis of (B, C, T, H, W), one gain per channel; per voxel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight


class FrameConv(nn.Conv2d):
    """A 2D convolution applied to every frame of (B, C, T, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, _, _ = x.shape
        y = super().forward(x.transpose(1, 2).flatten(0, 1))  # (B*T, C, H, W)
        return y.unflatten(0, (b, t)).transpose(1, 2)


class CausalTemporalConv(nn.Conv3d):
    """A (k, 1, 1) convolution across frames that only looks back.

    The front is padded with copies of the first frame: k - 1 frames at stride 1 (length kept),
    k - 2 at stride 2 (length halved for an even frame count).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1):
        super().__init__(in_channels, out_channels, (kernel_size, 1, 1), stride=(stride, 1, 1))
        self.causal_padding = kernel_size - stride

    stream = None  # a _CausalStream while decoding in chunks: the last frames carried between calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.causal_padding:
            carried = None if self.stream is None else self.stream.frames.get((self.stream.key, id(self)))
            x = torch.cat([x[:, :, :1]] * self.causal_padding + [x] if carried is None else [carried, x], dim=2)
            if self.stream is not None:
                if self.stride[0] != 1:
                    raise RuntimeError("chunked (streamed) convolution needs stride 1")
                self.stream.frames[(self.stream.key, id(self))] = x[:, :, -self.causal_padding:].clone()
        return super().forward(x)


class Conv2Plus1d(nn.Module):
    """A factorised 3×3×k convolution: spatial 3×3 per frame, then a causal temporal kernel k
    (k = 1: the spatial convolution alone)."""

    def __init__(self, in_channels: int, out_channels: int, temporal_kernel: int = 3):
        super().__init__()
        self.spatial = FrameConv(in_channels, out_channels, 3, padding=1)
        self.temporal = CausalTemporalConv(out_channels, out_channels, temporal_kernel) if temporal_kernel > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x)
        return x if self.temporal is None else self.temporal(x)


class ResBlock(nn.Module):
    """norm → SiLU → conv → norm → SiLU → conv, plus a (1×1 projected) skip."""

    def __init__(self, in_channels: int, out_channels: int, temporal_kernel: int = 3):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = Conv2Plus1d(in_channels, out_channels, temporal_kernel)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.conv2 = Conv2Plus1d(out_channels, out_channels, temporal_kernel)
        self.skip = FrameConv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve height and width (strided 3×3 conv) and/or the frame count (strided causal conv)."""

    def __init__(self, channels: int, spatial: bool, temporal: bool):
        super().__init__()
        self.spatial = FrameConv(channels, channels, 3, stride=2, padding=1) if spatial else None
        self.temporal = CausalTemporalConv(channels, channels, 3, stride=2) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is not None:
            x = self.spatial(x)
        if self.temporal is not None:
            x = self.temporal(x)
        return x


class Upsample(nn.Module):
    """Double the frame count and/or height and width (nearest, 3×3 conv).

    Time (`depth_to_time` False): repeat every frame, then a causal kernel-3 conv. Time
    (`depth_to_time` True, as Wan's VAE): a causal kernel-3 conv at the coarse rate with twice the
    channels, whose two halves become the two frames; `depth_to_time_weights` turns the first
    kind's weights into the second's with the same outputs. The last conv also narrows the
    channels to the next (finer) level's width, so no conv runs at the finer resolution with the
    coarser level's width.
    """

    def __init__(self, in_channels: int, out_channels: int, spatial: bool, temporal: bool,
                 depth_to_time: bool = False):
        super().__init__()
        self.depth_to_time = depth_to_time
        width = in_channels if spatial else out_channels
        self.temporal = (CausalTemporalConv(in_channels, 2 * width if depth_to_time else width, 3)
                         if temporal else None)
        self.spatial = FrameConv(in_channels, out_channels, 3, padding=1) if spatial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal is not None:
            if self.depth_to_time:
                y = self.temporal(x)  # (B, 2C, T, H, W): channels [even frame | odd frame]
                b, c2, t, h, w = y.shape
                x = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
            else:
                x = self.temporal(x.repeat_interleave(2, dim=2))
        if self.spatial is not None:
            x = self.spatial(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
        return x


def depth_to_time_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A "repeat" upsample's temporal conv (C_out, C_in, 3, 1, 1) as the "depth_to_time" conv
    (2 C_out, C_in, 3, 1, 1) that gives the same frames.

    After repeating, frame 2i sees the coarse frames (i-1, i-1, i) and frame 2i+1 sees (i-1, i, i)
    (the causal padding repeats frame 0 in both), so the even half's taps are (0, w0 + w1, w2) and
    the odd half's (0, w0, w1 + w2) over the coarse frames (i-2, i-1, i).
    """
    w0, w1, w2 = weight.unbind(dim=2)
    zero = torch.zeros_like(w0)
    even = torch.stack([zero, w0 + w1, w2], dim=2)
    odd = torch.stack([zero, w0, w1 + w2], dim=2)
    return torch.cat([even, odd]), None if bias is None else torch.cat([bias, bias])


def convert_temporal_upsample(state: dict[str, torch.Tensor], vae: VideoAutoencoder) -> dict[str, torch.Tensor]:
    """A VAE state dict of a "repeat" decoder (keys as `vae.state_dict()`), with its upsampling
    convs turned into `vae`'s "depth_to_time" ones (`depth_to_time_weights`); other keys as they are.
    Loading the result into `vae` gives the old model's frames (to float rounding)."""
    out = dict(state)
    for name, module in vae.named_modules():
        if isinstance(module, Upsample) and module.depth_to_time and module.temporal is not None:
            key = f"{name}.temporal"
            if state[f"{key}.weight"].shape[0] * 2 == module.temporal.weight.shape[0]:
                weight, bias = depth_to_time_weights(state[f"{key}.weight"], state.get(f"{key}.bias"))
                out[f"{key}.weight"], out[f"{key}.bias"] = weight, bias
    return out


def _level_steps(cfg: VAEConfig) -> list[tuple[bool, bool]]:
    """(spatial, temporal) halving for each step from level i to i+1: space first, time last."""
    levels = len(cfg.block_out_channels) - 1
    ks, kt = int(math.log2(cfg.spatial_compression)), int(math.log2(cfg.temporal_compression))
    return [(i < ks, i >= levels - kt) for i in range(levels)]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        steps = _level_steps(cfg)
        k = cfg.temporal_kernel
        self.conv_in = Conv2Plus1d(cfg.in_channels, ch[0], k)
        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(ch):
            in_ch = ch[max(i - 1, 0)]
            level = nn.Sequential(*[ResBlock(in_ch if j == 0 else out_ch, out_ch, k)
                                    for j in range(cfg.layers_per_block)])
            if i < len(steps) and any(steps[i]):
                level.append(Downsample(out_ch, *steps[i]))
            self.down_blocks.append(level)
        self.mid_block = ResBlock(ch[-1], ch[-1], k)
        self.norm_out = ChannelRMSNorm(ch[-1])
        self.conv_out = Conv2Plus1d(ch[-1], 2 * cfg.latent_channels, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        steps = _level_steps(cfg)
        k = cfg.temporal_kernel
        self.conv_in = Conv2Plus1d(cfg.latent_channels, ch[-1], k)
        self.mid_block = ResBlock(ch[-1], ch[-1], k)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(ch))):  # deepest level first
            level = nn.Sequential(*[ResBlock(ch[i], ch[i], k) for _ in range(cfg.layers_per_block + 1)])
            if i > 0:
                spatial, temporal = steps[i - 1]
                level.append(Upsample(ch[i], ch[i - 1], spatial, temporal,
                                      depth_to_time=cfg.temporal_upsample == "depth_to_time")
                             if spatial or temporal else FrameConv(ch[i], ch[i - 1], 1))
            self.up_blocks.append(level)
        self.norm_out = ChannelRMSNorm(ch[0])
        self.conv_out = Conv2Plus1d(ch[0], cfg.in_channels, k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), in the raw latent space.

    `mode()` and `sample()` return scaled latents (what the DiT sees); `kl()` is KL(q || N(0, I))
    per sample, summed over latent dims.
    """

    def __init__(self, moments: torch.Tensor, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor

    def mode(self) -> torch.Tensor:
        return (self.mean - self.shift_factor) * self.scaling_factor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return (self.mean + self.std * eps - self.shift_factor) * self.scaling_factor

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(dim=1)


class VideoAutoencoder(nn.Module):
    """Encode (B, 3, T, H, W) pixel clips in [-1, 1] to (B, C, T/ft, H/fs, W/fs) latents and back.

    T must be a multiple of `temporal_compression`, H and W of `spatial_compression`.
    """

    _keep_in_fp32_modules = ["norm_out"]

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_compression

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_compression

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a clip of that many frames and that size."""
        self._check(frames, height, width)
        fs, ft = self.spatial_compression, self.temporal_compression
        return self.config.latent_channels, frames // ft, height // fs, width // fs

    def encode(self, x: torch.Tensor, return_posterior: bool = False) -> torch.Tensor | DiagonalGaussian:
        """Latents (the posterior mean, scaled) of pixel clips; or the posterior itself for training."""
        self._check(*x.shape[2:])
        posterior = DiagonalGaussian(self.encoder(x), self.config.scaling_factor, self.config.shift_factor)
        return posterior if return_posterior else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel clips (B, 3, T, H, W), roughly in [-1, 1] (not clamped), from scaled latents."""
        z = z / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(z)

    def decode_tiled(self, z: torch.Tensor, tile: tuple[int, int, int] = (4, 32, 32), overlap: int = 8,
                     group=None) -> torch.Tensor | None:
        """`decode` in bounded memory; with a process `group`, spread over its ranks.

        The video (B, 3, T, H, W) is returned on rank 0 of the group (None on the others; every
        rank must call with the same latents). See `iter_decode_tiled` for `tile` and `overlap`;
        a clip too long to hold decoded should be consumed chunk by chunk from it instead.
        """
        chunks = [c for c in self.iter_decode_tiled(z, tile, overlap, group) if c is not None]
        return torch.cat(chunks, dim=2) if chunks else None

    def iter_decode_tiled(self, z: torch.Tensor, tile: tuple[int, int, int] = (4, 32, 32), overlap: int = 8,
                          group=None, uint8: bool = False) -> Iterator[torch.Tensor]:
        """Decoded frames of scaled latents (B, C, T', H', W'), as consecutive chunks in time.

        Time: chunks of `tile[0]` latent frames (tile[0]·ft pixel frames) decoded one after the
        other; every causal temporal conv keeps the last k-1 frames of its input from the chunk
        before (the overlap a chunk needs, carried instead of recomputed), so the chunks are
        exactly the frames of `decode`, to float rounding, for any chunk length.
        Space: tiles of `tile[1]` x `tile[2]` latent pixels overlapping by at least `overlap`,
        mixed in the overlaps by linear ramps that skip each tile's outer pixels within the
        decoder's receptive radius where the overlap is wide enough: an overlap of twice the radius
        (`decoder_receptive_field`) or more is exact, a smaller one blends the seams.
        Memory: one tile's activations, the tiles' carried frames and one chunk of pixels, however
        long the clip.

        With a process `group`, tile j is decoded by rank j mod size (each rank streams its tiles
        through time) and sent to rank 0, which blends and yields the chunks; the other ranks yield
        None per chunk, so all ranks iterate (and may stop) in step. `uint8`: chunks in [0, 255] as
        uint8 (a video encoder's input).
        """
        import torch.distributed as dist

        b, _, t, h, w = z.shape
        ft, fs = self.temporal_compression, self.spatial_compression
        th, tw = max(1, min(tile[1], h)), max(1, min(tile[2], w))
        hs, ws = _tile_starts(h, th, min(overlap, th - 1)), _tile_starts(w, tw, min(overlap, tw - 1))
        margin = decoder_receptive_field(self.decoder)[1] * fs
        wy, wx = _blend_weights(hs, th, fs, margin), _blend_weights(ws, tw, fs, margin)
        tiles = [(i, j) for i in range(len(hs)) for j in range(len(ws))]
        size = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        tt = max(1, tile[0])
        with _streaming(self.decoder) as stream:
            for a in range(0, t, tt):
                e = min(a + tt, t)
                frames = (e - a) * ft
                out = weight = None
                if rank == 0 and len(tiles) > 1:
                    out = z.new_zeros(b, 3, frames, h * fs, w * fs)
                    weight = z.new_zeros(1, 1, 1, h * fs, w * fs)
                for n, (i, j) in enumerate(tiles):
                    owner = n % size
                    if owner != rank and rank != 0:
                        continue
                    if owner == rank:
                        stream.key = n  # this tile's carried frames
                        piece = self.decode(z[:, :, a:e, hs[i]:hs[i] + th, ws[j]:ws[j] + tw]).to(z.dtype)
                        if rank != 0:
                            dist.send(piece.contiguous(), dst=dist.get_global_rank(group, 0))
                            continue
                    else:
                        piece = z.new_empty(b, 3, frames, th * fs, tw * fs)
                        dist.recv(piece, src=dist.get_global_rank(group, owner))
                    wgt = (wy[i][:, None] * wx[j][None, :]).to(piece.dtype)
                    ys = slice(hs[i] * fs, (hs[i] + th) * fs)
                    xs = slice(ws[j] * fs, (ws[j] + tw) * fs)
                    if len(tiles) == 1:
                        out = piece
                    else:
                        out[:, :, :, ys, xs] += piece * wgt
                        weight[..., ys, xs] += wgt
                    del piece
                if rank != 0:
                    yield None
                    continue
                video = out if len(tiles) == 1 else out.div_(weight)
                del out
                if uint8:  # in place: no second chunk-sized buffer
                    video = video.float().clamp_(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
                yield video

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (for the VAE's training loss: recon + beta * KL)."""
        posterior = self.encode(x, return_posterior=True)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check(self, frames: int, height: int, width: int) -> None:
        fs, ft = self.spatial_compression, self.temporal_compression
        if frames % ft or height % fs or width % fs:
            raise ValueError(f"clip of {frames} frames at {width}x{height} does not fit the VAE: frames must be "
                             f"a multiple of {ft}, width and height multiples of {fs}")


# --- tiled decoding -----------------------------------------------------------------------------


def decoder_receptive_field(decoder: Decoder) -> tuple[int, int]:
    """(latent frames, latent pixels): how far back in time and how far sideways in space one
    decoded voxel can see, walked off the decoder's layers (rounded up, plus one to be safe)."""
    state = {"rate_t": 1.0, "rate_s": 1.0, "back": 0.0, "radius": 0.0}

    def walk(m: nn.Module) -> None:
        if isinstance(m, Upsample):
            if m.temporal is not None:
                if m.depth_to_time:  # the conv runs at the coarse rate, then the rate doubles
                    walk(m.temporal)
                    state["rate_t"] *= 2
                else:
                    state["rate_t"] *= 2
                    walk(m.temporal)
            if m.spatial is not None:
                state["rate_s"] *= 2
                walk(m.spatial)
        elif isinstance(m, CausalTemporalConv):
            state["back"] += (m.kernel_size[0] - 1) * m.stride[0] / state["rate_t"]
        elif isinstance(m, FrameConv):
            state["radius"] += (m.kernel_size[0] // 2) / state["rate_s"]
        elif isinstance(m, ResBlock):
            walk(m.conv1)
            walk(m.conv2)
        else:
            for child in m.children():
                walk(child)

    walk(decoder)
    return math.ceil(state["back"]) + 1, math.ceil(state["radius"]) + 1


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of tiles of `tile` covering [0, size), neighbours sharing >= `overlap`."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list[int], tile: int, scale: int, margin: int) -> list[torch.Tensor]:
    """Per tile, weights over its `tile·scale` output pixels: 1 inside, and across each overlap
    with a neighbour a linear ramp complementary to the neighbour's, which is 0 on the `margin`
    pixels nearest the tile's own cut edge when the overlap is wider than twice the margin."""
    n_out = tile * scale
    pos = torch.arange(n_out, dtype=torch.float64) + 0.5
    weights = []
    for i, s0 in enumerate(starts):
        wgt = torch.ones(n_out, dtype=torch.float64)
        if i > 0:  # shared with the tile before: its first o pixels
            o = (starts[i - 1] + tile - s0) * scale
            m = min(margin, (o - 1) // 2)
            wgt = torch.minimum(wgt, ((pos - m) / (o - 2 * m)).clamp(0, 1))
        if i < len(starts) - 1:  # shared with the tile after: its last o pixels
            o = (s0 + tile - starts[i + 1]) * scale
            m = min(margin, (o - 1) // 2)
            wgt = torch.minimum(wgt, ((n_out - pos - m) / (o - 2 * m)).clamp(0, 1))
        weights.append(wgt.float())
    return weights


class _CausalStream:
    """Frames carried by each causal temporal conv between chunks, per tile (`key`)."""

    def __init__(self):
        self.key = None
        self.frames: dict = {}


class _streaming:
    """Within the block, the decoder's causal convs carry their last input frames between calls."""

    def __init__(self, decoder: nn.Module):
        self.convs = [m for m in decoder.modules() if isinstance(m, CausalTemporalConv)]

    def __enter__(self) -> _CausalStream:
        stream = _CausalStream()
        for conv in self.convs:
            conv.stream = stream
        return stream

    def __exit__(self, *exc) -> None:
        for conv in self.convs:
            conv.stream = None
