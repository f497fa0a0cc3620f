"""The video diffusion transformer: a DiT over spacetime latent patches (Sora; Peebles & Xie 2023).

Read top to bottom (as diffusers' transformer_wan.py): attention processor → attention module →
embeddings → 3D rotary positions → block → model.

    latents (B, 2C+1, T', H', W')   noisy latents ‖ clean conditioning latents ‖ frame mask
      → patchify (pt, ph, pw) → linear → tokens (B, N, D),  N = T'/pt · H'/ph · W'/pw
      → blocks: x += gate · SelfAttn(modulate(LN(x)))        3D RoPE on q, k; adaLN-Zero from t
                x += CrossAttn(LN(x), text)                   text key padding mask
                x += gate · MLP(modulate(LN(x)))
      → modulate(LN(x)) → linear → unpatchify → velocity (B, C, T', H', W')

Positions are computed from the grid of each call, so one model takes any size, aspect ratio and
duration: 3D RoPE in self-attention, and (with `frame_positions`) an embedding of each token's frame
index and of its place as a fraction of the frame's height and width. The attention maths lives in
`AttnProcessor`; a sequence-parallel processor (DeepSpeed-Ulysses) replaces it per module with
`set_attn_processor`, and where tokens are split and gathered is declared once in `VideoDiT._cp_plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import DiTConfig
from models.step_cache import StepCache, run_blocks

# --- context-parallel plan entries (the shape of diffusers' ContextParallelInput/Output) ----------


@dataclass(frozen=True)
class ContextParallelInput:
    """Split this input (or output, with split_output=True) of a module along `split_dim`."""

    split_dim: int
    expected_dims: int | None = None
    split_output: bool = False


@dataclass(frozen=True)
class ContextParallelOutput:
    """Gather this module's output along `gather_dim` from all ranks."""

    gather_dim: int
    expected_dims: int | None = None


# --- attention ----------------------------------------------------------------------------------


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of (B, N, heads, head_dim) by the angles of each position."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 0::2]  # one angle per pair
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class AttnProcessor:
    """Scaled dot-product attention over (B, N, heads, head_dim), single process.

    The reference every parallel processor is compared against. Inputs are the module that owns the
    projections, the query stream, and optionally a context (cross-attention), a boolean key mask
    (B, M), True = attend, and rotary (cos, sin) for the query/key positions.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))  # (B, N, heads, head_dim)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        mask = None if attention_mask is None else attention_mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out(out)


class Attention(nn.Module):
    """The weights of one multi-head attention; the maths is delegated to `self.processor`."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: bool = True,
                 eps: float = 1e-6, processor: AttnProcessor | None = None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim, dim)
        self.to_v = nn.Linear(context_dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.processor = processor or AttnProcessor()

    def set_processor(self, processor) -> None:
        self.processor = processor

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


# --- embeddings ---------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of timesteps t (B,) in [0, 1], scaled to [0, 1000] (DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t → sinusoid → MLP → (B, D), the conditioning vector c of adaLN."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class TextProjection(nn.Module):
    """Text encoder states (B, L, text_dim) → the model width (B, L, D)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(text_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


def pool_text(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked mean of text token states (B, L, D) → (B, D) (sentence-transformers' pooling)."""
    if mask is None:
        return states.mean(dim=1)
    m = mask.to(states.dtype)[..., None]
    return (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def token_coordinates(grid: tuple[int, int, int], device: torch.device,
                      tokens: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, row, column) indices of a grid's tokens in (t, h, w) order, or of `tokens` only."""
    _, h, w = grid
    idx = torch.arange(grid[0] * h * w, device=device)
    if tokens is not None:
        idx = idx[tokens]
    return idx // (h * w), idx // w % h, idx % w


class RotaryPosEmbed3D(nn.Module):
    """3D RoPE: the head dim is split into time, height and width parts, each rotated by its axis.

    As in Wan: height and width get 2·(head_dim // 6) dims each, time the rest. Positions are the
    integer token coordinates of the actual grid, so nothing is tied to one size or duration.
    Returns (cos, sin), each (1, N, 1, head_dim), in token order (t, h, w); with `tokens` (a
    slice of the token axis), only those rows, equal to the same rows of the full tables.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - self.h_dim - self.w_dim
        self.theta = theta

    def _axis(self, n: int, dim: int, device: torch.device) -> torch.Tensor:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv_freq)  # (n, dim/2)
        return angles.repeat_interleave(2, dim=-1)  # (n, dim): one angle per rotated pair, twice

    def forward(self, grid: tuple[int, int, int], device: torch.device,
                tokens: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t, h, w = grid
        if tokens is not None:  # only the tokens [start, stop) of the grid (a sequence-parallel shard)
            ti, hi, wi = token_coordinates(grid, device, tokens)
            angles = torch.cat([
                self._axis(t, self.t_dim, device)[ti],
                self._axis(h, self.h_dim, device)[hi],
                self._axis(w, self.w_dim, device)[wi],
            ], dim=-1).reshape(1, ti.numel(), 1, self.t_dim + self.h_dim + self.w_dim)
            return angles.cos().float(), angles.sin().float()
        angles = torch.cat([
            self._axis(t, self.t_dim, device)[:, None, None, :].expand(t, h, w, -1),
            self._axis(h, self.h_dim, device)[None, :, None, :].expand(t, h, w, -1),
            self._axis(w, self.w_dim, device)[None, None, :, :].expand(t, h, w, -1),
        ], dim=-1).reshape(1, t * h * w, 1, -1)
        return angles.cos().float(), angles.sin().float()


class FramePositionEmbed(nn.Module):
    """Where each token lies in the clip, as a vector added to the tokens (B, N, D) before the blocks.

    3D RoPE is relative: attention sees offsets between tokens, never where a token is. At pure
    noise nothing in the input says which frame comes first or where the frame's left edge is, so
    "moves right" cannot say where the object starts or which way is forward. This adds sinusoidal
    features of each token's latent frame index and of its centre as a fraction of the frame's
    height and width (0-1, so a position means the same at every size and aspect ratio, as
    PixArt-alpha's interpolated position embeddings), through a linear layer (zero at the start
    with `zero_init`, so a trained model it is added to is unchanged until it learns to use it).
    """

    def __init__(self, dim: int, freqs: int = 4):
        super().__init__()
        self.freqs = freqs
        self.proj = nn.Linear(6 * freqs, dim)

    def features(self, grid: tuple[int, int, int], device: torch.device,
                 tokens: slice | None = None) -> torch.Tensor:
        """(N, 6·freqs) float32 features of the grid's tokens in (t, h, w) order, or of `tokens` only."""
        _, h, w = grid
        ti, hi, wi = token_coordinates(grid, device, tokens)
        k = torch.arange(self.freqs, dtype=torch.float32, device=device)
        time = ti.float()[:, None] * 10000.0 ** (-k / self.freqs)         # frame index, 1 … 1e-3 rad
        y = (hi.float()[:, None] + 0.5) / h * math.pi * 2.0 ** k          # fraction of the height
        x = (wi.float()[:, None] + 0.5) / w * math.pi * 2.0 ** k          # fraction of the width
        angles = torch.cat([time, y, x], dim=-1)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, grid: tuple[int, int, int], device: torch.device, tokens: slice | None = None) -> torch.Tensor:
        """(1, N, D): the embedding of every token of `grid` (or of `tokens`, a slice of them)."""
        return self.proj(self.features(grid, device, tokens).to(self.proj.weight.dtype))[None]


# --- the block ----------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Self-attention (3D RoPE) → cross-attention to text → MLP, with adaLN-Zero on the first and last.

    `adaLN_modulation` maps the timestep vector c to (shift, scale, gate) for attention and MLP;
    zero-initialised gates make the block start as the identity (DiT's adaLN-Zero).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, qk_norm=qk_norm, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.attn2 = Attention(dim, heads, qk_norm=qk_norm, eps=eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb: tuple[torch.Tensor, torch.Tensor],
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(temb).chunk(6, dim=-1)
        x = hidden_states
        x = x + gate_msa[:, None] * self.attn1(modulate(self.norm1(x), shift_msa, scale_msa), rotary_emb=rotary_emb)
        x = x + self.attn2(self.norm2(x), encoder_hidden_states, attention_mask=encoder_attention_mask)
        x = x + gate_mlp[:, None] * self.ffn(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


# --- the model ----------------------------------------------------------------------------------


class VideoDiT(nn.Module):
    """Predicts the flow-matching velocity v = noise - x0 of a latent video, given text and t.

    Args:
        config: a `DiTConfig`:
            patch_size: (pt, ph, pw) latent voxels per token.
            hidden_size: token width D.
            num_layers: transformer blocks.
            num_heads: attention heads (head dim = D / heads, split over t/h/w by the 3D RoPE).
            mlp_ratio: MLP width / D.
            freq_dim: sinusoidal timestep features.
            rope_theta: rotary base.
            qk_norm: RMS norm on queries and keys.
            eps: norm epsilon.
            zero_init: adaLN-Zero initialisation (else fully random).
            latent_channels: C, channels of the latent video (from the VAE).
            text_dim: width of the text encoder's token states.

    Inputs of `forward`: the noisy latents (B, C, T', H', W'), the timestep t (B,) in [0, 1], the
    text states (B, L, text_dim) with a boolean mask (B, L) (True = real token), and optional frame
    conditioning: clean latents (B, C, T', H', W') and a per-latent-frame mask (B, T') (1 = given).
    Both are concatenated to the noisy latents as channels (zeros where nothing is given), so one
    model serves text→video, image→video and extension (Open-Sora).
    """

    # Context parallelism (sequence split across ranks), declared as in diffusers: the rotary
    # tables and the token stream are split on the token axis where they enter the blocks, and
    # gathered again at the output projection. Text tokens are not split (every rank's queries
    # attend to all of them).
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    # Numerically delicate: kept in fp32 when the rest is cast to half precision.
    _keep_in_fp32_modules = ["time_embedding", "pooled_text_embedding", "adaLN_modulation", "norm_out"]
    _no_split_modules = ["TransformerBlock"]

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c, d = config.latent_channels, config.hidden_size
        pt, ph, pw = config.patch_size
        self.patch_size = (pt, ph, pw)
        self.in_channels = 2 * c + 1  # noisy latents ‖ conditioning latents ‖ frame mask
        self.out_channels = c

        self.patch_embedding = nn.Linear(self.in_channels * pt * ph * pw, d)
        self.time_embedding = TimestepEmbedding(config.freq_dim, d)
        self.text_embedding = TextProjection(config.text_dim, d)
        # pooled text → the adaLN conditioning vector (same MLP shape as the timestep's)
        self.pooled_text_embedding = (nn.Sequential(nn.Linear(config.text_dim, d), nn.SiLU(), nn.Linear(d, d))
                                      if config.pooled_text else None)
        self.rope = RotaryPosEmbed3D(d // config.num_heads, config.rope_theta)
        self.pos_embedding = FramePositionEmbed(d) if config.frame_positions else None
        self.blocks = nn.ModuleList([
            TransformerBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm, config.eps)
            for _ in range(config.num_layers)
        ])
        self.norm_out = nn.LayerNorm(d, eps=config.eps, elementwise_affine=False)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.proj_out = nn.Linear(d, c * pt * ph * pw)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) embeddings, zeros for adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embedding.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedding.linear_2.weight, std=0.02)
        if self.config.zero_init:
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            layers = [self.adaLN_out[-1], self.proj_out]
            if self.pos_embedding is not None:  # added to a trained model, it changes nothing at first
                layers.append(self.pos_embedding.proj)
            for layer in layers:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def set_attn_processor(self, processor) -> None:
        """Use `processor` (e.g. a sequence-parallel one) for every attention module."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.set_processor(processor)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) → (B, N, C·pt·ph·pw), tokens in (t, h, w) order."""
        b, c, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, N, C·pt·ph·pw) → (B, C, T, H, W)."""
        b = x.shape[0]
        (gt, gh, gw), (pt, ph, pw) = grid, self.patch_size
        x = x.reshape(b, gt, gh, gw, self.out_channels, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, self.out_channels, gt * pt, gh * ph, gw * pw)

    def token_grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The (T, H, W) grid of patches of latents shaped (B, C, T', H', W')."""
        t, h, w = latent_shape[2:]
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent grid {t}x{h}x{w} is not a multiple of the patch size {self.patch_size}")
        return t // pt, h // ph, w // pw

    def input_tokens(self, hidden_states: torch.Tensor, cond_latents: torch.Tensor | None,
                     cond_mask: torch.Tensor | None) -> torch.Tensor:
        """Patchified input channels (noisy latents, conditioning latents, frame mask), not embedded."""
        b, _, t, h, w = hidden_states.shape
        if cond_latents is None:
            cond_latents = torch.zeros_like(hidden_states)
        if cond_mask is None:
            cond_mask = hidden_states.new_zeros(b, t)
        mask_channel = cond_mask.to(hidden_states.dtype)[:, None, :, None, None].expand(b, 1, t, h, w)
        return self.patchify(torch.cat([hidden_states, cond_latents.to(hidden_states.dtype), mask_channel], dim=1))

    def embed_tokens(self, tokens: torch.Tensor, grid: tuple[int, int, int], rows: slice | None = None) -> torch.Tensor:
        """Patchified inputs (B, N, ·) → token stream (B, N, D), frame positions added; `rows` says
        which tokens of the grid these are when they are only a slice of it (a sequence shard)."""
        x = self.patch_embedding(tokens)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(grid, x.device, rows).to(x.dtype)
        return x

    def embed_conditions(self, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                         encoder_attention_mask: torch.Tensor | None, batch: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(temb, text context, boolean text mask): what every block is conditioned on."""
        temb = self.time_embedding(timestep.expand(batch) if timestep.ndim == 0 else timestep)
        context = self.text_embedding(encoder_hidden_states)
        mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        if self.pooled_text_embedding is not None:
            temb = temb + self.pooled_text_embedding(pool_text(encoder_hidden_states, mask).to(temb.dtype))
        return temb, context, mask

    def output_tokens(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The final adaptive norm and projection: hidden tokens → patch velocities."""
        shift, scale = self.adaLN_out(temb).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(x), shift, scale))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, cond_latents: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None, step_cache: StepCache | None = None) -> torch.Tensor:
        """The velocity; with `step_cache` (`models/step_cache.py`) the blocks after the first may be skipped."""
        grid = self.token_grid(hidden_states.shape)
        x = self.embed_tokens(self.input_tokens(hidden_states, cond_latents, cond_mask), grid)
        rotary_emb = self.rope(grid, x.device)
        temb, context, mask = self.embed_conditions(timestep, encoder_hidden_states, encoder_attention_mask,
                                                    hidden_states.shape[0])
        x = run_blocks(self.blocks, x, (context, temb, rotary_emb, mask), step_cache)
        return self.unpatchify(self.output_tokens(x, temb), grid)
