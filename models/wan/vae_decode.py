"""The Wan VAE's decode in time chunks and space tiles, the tiles spread over the ranks of a group.

    decoder = WanTiledDecoder(vae, group)            # group: a torch.distributed group, or None (one process)
    for start, video in decoder.iter_decode(z):      # z: (1, C, T', H', W') unnormalised latents
        ...                                          # video: (1, 3, frames, H, W) in [-1, 1], clamped

diffusers' `AutoencoderKLWan.tiled_decode` decodes each space tile over all its latent frames (one latent
frame per decoder call, the causal convolutions carrying their last inputs in the tile's feature cache),
keeps every tile of the whole clip, then blends neighbours (`blend_v`, `blend_h`), crops each tile to the
stride and clamps. At 1920x1088 x 20 s that is the whole clip in fp32 with the tiles' overlap on top (about
8 GB of pixels for Wan 2.1's 321 frames) before anything is returned. This module runs the same steps in
another order:

- time chunks: `chunk` latent frames at a time, every tile carrying its own feature cache from chunk to
  chunk, so only one chunk's pixels are alive (the cache is what makes it exact: a tile's decoder calls
  are the ones `tiled_decode` makes, frame for frame, with the same cache state);
- space tiles spread: the tiles are dealt round-robin to the group's ranks, each rank decodes (and keeps
  the feature caches of) its own share, and a chunk's tiles are all-gathered before the blend, so every
  rank gets the chunk's frames.

The tile grid, the per-frame decoder calls, `blend_v` / `blend_h` (called on the vae, in `tiled_decode`'s
order), the crop, `unpatchify` (Wan 2.2's patched VAE) and the clamp are diffusers' own, and blending and
clamping work frame by frame, so the frames are those of `vae.enable_tiling(); vae.decode(z)` with the vae's
tile settings (bit for bit on one rank and over a group on this CPU: tests/models/wan/test_wan_long.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

#: the largest frame (pixels) `WanVideoGenerator` decodes whole, as `WanPipeline` does; larger ones in tiles
UNTILED_MAX_PIXELS = 1280 * 720


class WanTiledDecoder:
    """A Wan VAE's tiled decode, streamed in chunks of `chunk` latent frames, its tiles spread over `group`.

    `group`: the ranks that share the work (None: this process alone, whatever group it is in).
    Every rank of the group must call `iter_decode` / `decode` with the same latents.
    """

    def __init__(self, vae: AutoencoderKLWan, group=None, chunk: int = 2):
        if chunk < 1:
            raise ValueError(f"chunk={chunk} must be at least one latent frame")
        self.vae, self.chunk = vae, chunk
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.cache_size = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
        # tiled_decode's grid: latent tiles and strides, and the pixel strides and blends (in patched pixels)
        self.tile = (vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio)
        self.stride = (vae.tile_sample_stride_height // ratio, vae.tile_sample_stride_width // ratio)
        self.sample_stride = (vae.tile_sample_stride_height // patch, vae.tile_sample_stride_width // patch)
        self.blend = (vae.tile_sample_min_height // patch - self.sample_stride[0],
                      vae.tile_sample_min_width // patch - self.sample_stride[1])

    def tiles(self, height: int, width: int) -> list[tuple[int, int]]:
        """The latent (row, column) offsets of the tiles over a (height, width) latent, row by row."""
        return [(i, j) for i in range(0, height, self.stride[0]) for j in range(0, width, self.stride[1])]

    def owner(self, index: int) -> int:
        """The rank that decodes the `index`-th tile."""
        return index % self.world

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The whole video (1, 3, frames, H, W): `iter_decode`'s chunks concatenated."""
        return torch.cat([video for _, video in self.iter_decode(z)], dim=2)

    @torch.inference_mode()
    def iter_decode(self, z: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first pixel frame, the chunk's video (1, 3, frames, H, W) in [-1, 1]) per chunk of latent frames."""
        if z.shape[0] != 1:
            raise ValueError(f"decodes one clip at a time, got a batch of {z.shape[0]}")
        _, _, frames, height, width = z.shape
        ratio, patch = self.vae.spatial_compression_ratio, self.vae.config.patch_size or 1
        out_h, out_w = height * ratio // patch, width * ratio // patch
        grid = self.tiles(height, width)
        mine = [n for n in range(len(grid)) if self.owner(n) == self.rank]
        caches = {n: [None] * self.cache_size for n in mine}
        first_pixel = 0
        for k0 in range(0, frames, self.chunk):
            decoded = {}
            for n in mine:
                i, j = grid[n]
                parts = []
                for k in range(k0, min(k0 + self.chunk, frames)):
                    tile = self.vae.post_quant_conv(z[:, :, k:k + 1, i:i + self.tile[0], j:j + self.tile[1]])
                    parts.append(self.vae.decoder(tile, feat_cache=caches[n], feat_idx=[0], first_chunk=k == 0))
                decoded[n] = torch.cat(parts, dim=2)
            tiles = self._gather(decoded, grid, height, width)
            video = self._blend(tiles, grid, height, width)[:, :, :, :out_h, :out_w]
            if self.vae.config.patch_size is not None:
                video = unpatchify(video, patch_size=self.vae.config.patch_size)
            video = torch.clamp(video, min=-1.0, max=1.0)
            yield first_pixel, video
            first_pixel += video.shape[2]

    def _gather(self, decoded: dict[int, torch.Tensor], grid: list[tuple[int, int]], height: int,
                width: int) -> list[torch.Tensor]:
        """Every tile of a chunk on every rank: each rank's own, padded to the largest tile, all-gathered."""
        if self.world == 1:
            return [decoded[n] for n in range(len(grid))]
        ratio, patch = self.vae.spatial_compression_ratio, self.vae.config.patch_size or 1
        pixels = [(min(self.tile[0], height - i) * ratio // patch, min(self.tile[1], width - j) * ratio // patch)
                  for i, j in grid]
        h, w = max(p[0] for p in pixels), max(p[1] for p in pixels)
        device = self._comm_device()
        # the chunk's pixel frames (a rank without tiles has none to say): the largest any rank decoded
        frames = torch.tensor([max((t.shape[2] for t in decoded.values()), default=0)], device=device)
        dist.all_reduce(frames, op=dist.ReduceOp.MAX, group=self.group)
        channels = self.vae.decoder.conv_out.out_channels
        per_rank = -(-len(grid) // self.world)
        mine = torch.zeros(per_rank, channels, int(frames), h, w, dtype=self.vae.dtype, device=device)
        for slot, n in enumerate(sorted(decoded)):
            tile = decoded[n]
            mine[slot, :, :, :tile.shape[3], :tile.shape[4]] = tile[0]
        decoded.clear()
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.group)
        del mine
        return [gathered[self.owner(n)][n // self.world:n // self.world + 1, :, :, :ph, :pw].clone()
                for n, (ph, pw) in enumerate(pixels)]

    def _blend(self, tiles: list[torch.Tensor], grid: list[tuple[int, int]], height: int,
               width: int) -> torch.Tensor:
        """`tiled_decode`'s blend and crop of one chunk's tiles (in place, in its order)."""
        columns = len(range(0, width, self.stride[1]))
        rows = [tiles[r:r + columns] for r in range(0, len(tiles), columns)]
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = self.vae.blend_v(rows[i - 1][j], tile, self.blend[0])
                if j > 0:
                    tile = self.vae.blend_h(row[j - 1], tile, self.blend[1])
                out_row.append(tile[:, :, :, :self.sample_stride[0], :self.sample_stride[1]])
            out_rows.append(torch.cat(out_row, dim=-1))
        return torch.cat(out_rows, dim=3)

    def _comm_device(self) -> torch.device:
        """Where the group's collectives take tensors: the GPU under NCCL, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
