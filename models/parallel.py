"""One DiT replica over a group of ranks: sequence (USP), tensor and CFG parallelism.

The single-process `VideoDiT` + `FlowMatchSampler` stay the reference; this module wraps them,
as xDiT and diffusers do, so every layout gives the same latents to float rounding:

    group of sp·tp·cfg ranks (one torch.distributed group; gloo on CPUs, NCCL on GPUs)
      cfg  — the conditional and unconditional passes of guidance on two ranks; the two
             velocities are all-gathered and mixed after every forward (`ParallelSampler`)
      sp   — the spacetime tokens split over sp ranks where they enter the blocks and gathered at
             `proj_out` (the model's `_cp_plan`); self-attention is USP (Fang & Zhao 2024):
             DeepSpeed-Ulysses all-to-all over heads (`DistributedAttention`) inside a ring
             attention over the sequence (online softmax over K/V blocks passed round the ring),
             sp = ulysses · ring, so sp may exceed the head count. A token count that sp does
             not divide is padded at the end; padded keys are left out of every softmax and
             padded outputs dropped at the gather, so they change nothing.
      tp   — Megatron: q/k/v and fc1 split by output (whole heads per rank), to_out and fc2 by
             input with an all-reduce; the q/k RMS norms (over all heads) all-reduce their sum
             of squares; the adaLN modulation is split by output and all-gathered.

Ranks are laid out cfg-major, tp-minor: rank = ((c·ring + r)·ulysses + u)·tp + t, so a tp group
(the most traffic) is contiguous, then the Ulysses group (all-to-all), then the ring (P2P).

    mesh = build_mesh(ParallelConfig(sp=2, tp=2), dit.config, guidance=4.5)  # refuses bad layouts
    pdit = parallelize(dit, mesh)                                           # shards dit in place
    latents = ParallelSampler(mesh, steps, guidance, shift).sample(pdit, noise, text, ...)

Every rank gets the same arguments (noise from the request's seed, the same text states) and
returns the same latents; rank 0's are the result. Inference only (no autograd through the
collectives). Never imports Ray.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.attention import attention_kernel, attention_with_lse, merge_attention
from models.config import DiTConfig, LayerWidths, ParallelConfig, ParallelConfigError, check_layout
from models.dit import (
    Attention,
    AttnProcessor,
    ContextParallelInput,
    ContextParallelOutput,
    FeedForward,
    TransformerBlock,
    VideoDiT,
    apply_rotary_emb,
)
from models.sampler import FlowMatchSampler
from models.step_cache import StepCache, run_blocks

__all__ = ["ParallelMesh", "build_mesh", "init_distributed", "parallelize", "ParallelVideoDiT", "ParallelSampler",
           "USPAttnProcessor", "TokenShard",
           "ColumnParallelLinear", "RowParallelLinear", "TPRMSNorm"]


def _backend_of(group) -> str:
    return str(dist.get_backend(group)).lower()


def init_distributed(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                     backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Join this process to the replica's group: gloo on CPUs, NCCL on GPUs (rank 0 at master).

    DeepSpeed's `DistributedAttention` sends through `deepspeed.comm`, which `build_mesh`
    initialises on the existing group when a layout uses Ulysses (`deepspeed.init_distributed`);
    on CPUs its first use in a venv JIT-compiles a shared-memory op (cached in TORCH_EXTENSIONS_DIR).
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr,
                       "MASTER_PORT": str(master_port), "LOCAL_RANK": os.environ.get("LOCAL_RANK", str(rank))})
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))


def _init_deepspeed_comm() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=_backend_of(None), verbose=False)


@dataclass
class ParallelMesh:
    """The process groups of one layout inside one replica group (group ranks, see the module doc).

    A group is None where its degree is 1 (nothing to communicate).
    """

    config: ParallelConfig
    ulysses: int
    ring: int
    group: object  # the replica's group (None: the default world; `replica_group` names it either way)
    rank: int  # rank in `group`
    cfg_rank: int
    sp_rank: int  # = ring_rank · ulysses + ulysses_rank: which token shard this rank holds
    ulysses_rank: int
    ring_rank: int
    tp_rank: int
    cfg_group: object = None
    sp_group: object = None
    ulysses_group: object = None
    ring_group: object = None
    tp_group: object = None

    @property
    def replica_group(self):
        """The replica's process group for collectives over all its ranks (the default world where `group` is None)."""
        import torch.distributed as dist

        return self.group if self.group is not None else dist.group.WORLD

    @property
    def sp(self) -> int:
        return self.config.sp

    @property
    def tp(self) -> int:
        return self.config.tp

    @property
    def cfg(self) -> int:
        return self.config.cfg

    @property
    def world_size(self) -> int:
        return self.config.world_size


def build_mesh(config: ParallelConfig, dit: DiTConfig | LayerWidths, group=None,
               guidance: float | None = None) -> ParallelMesh:
    """Check the layout against the model (its config or `LayerWidths`) and the group, then create its
    process groups.

    Every rank of the default world must call this (in the same order), as `new_group` requires.
    `guidance`: the default guidance scale, to refuse cfg=2 with guidance 1 at start-up.
    """
    if not dist.is_initialized():
        raise ParallelConfigError("parallel layout needs an initialised process group (see init_distributed)")
    world = dist.get_world_size(group)
    u, r = check_layout(config, dit, world, guidance)
    tp, cfg = config.tp, config.cfg
    me = dist.get_rank(group)
    granks = dist.get_process_group_ranks(group) if group is not None else list(range(world))

    def index(c, ri, ui, t):
        return ((c * r + ri) * u + ui) * tp + t

    coords = {index(c, ri, ui, t): (c, ri, ui, t)
              for c in range(cfg) for ri in range(r) for ui in range(u) for t in range(tp)}
    c0, r0, u0, t0 = coords[me]
    mesh = ParallelMesh(config, u, r, group, me, c0, r0 * u + u0, u0, r0, t0)

    def make(name, members_of):
        # every rank creates every group of this kind (new_group is collective), keeps its own
        seen, mine = [], None
        for coord in coords.values():
            members = sorted(index(*m) for m in members_of(*coord))
            if members in seen:
                continue
            seen.append(members)
            g = dist.new_group([granks[i] for i in members], backend=_backend_of(group))
            if me in members:
                mine = g
        setattr(mesh, name, mine)

    if cfg > 1:
        make("cfg_group", lambda c, ri, ui, t: [(k, ri, ui, t) for k in range(cfg)])
    if config.sp > 1:
        make("sp_group", lambda c, ri, ui, t: [(c, a, b, t) for a in range(r) for b in range(u)])
    if u > 1:
        make("ulysses_group", lambda c, ri, ui, t: [(c, ri, k, t) for k in range(u)])
    if r > 1:
        make("ring_group", lambda c, ri, ui, t: [(c, k, ui, t) for k in range(r)])
    if tp > 1:
        make("tp_group", lambda c, ri, ui, t: [(c, ri, ui, k) for k in range(tp)])
    if u > 1:
        _init_deepspeed_comm()
    return mesh


# --- tensor-parallel layers (Megatron) ----------------------------------------------------------


def all_gather_cat(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `x` of the group, concatenated in rank order along `dim` (on every rank)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ColumnParallelLinear(nn.Module):
    """This rank's block of a linear's outputs (rows tp_rank·out/tp ...); optionally all-gathered."""

    def __init__(self, linear: nn.Linear, group, gather_output: bool = False):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        out = linear.out_features // size
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(linear.weight.detach()[rank * out:(rank + 1) * out].clone(), requires_grad=False)
        self.bias = (None if linear.bias is None else
                     nn.Parameter(linear.bias.detach()[rank * out:(rank + 1) * out].clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return all_gather_cat(y, self.group, -1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """This rank's block of a linear's inputs; partial products all-reduced, then the bias."""

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        inp = linear.in_features // size
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * inp:(rank + 1) * inp].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class TPRMSNorm(nn.Module):
    """An RMS norm over a width split across the tp group: the sum of squares is all-reduced."""

    def __init__(self, norm: nn.RMSNorm, group):
        super().__init__()
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.full_dim = norm.normalized_shape[-1]
        local = self.full_dim // size
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.group = group
        self.weight = nn.Parameter(norm.weight.detach()[rank * local:(rank + 1) * local].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ss = x.float().pow(2).sum(dim=-1, keepdim=True)
        dist.all_reduce(ss, group=self.group)
        return (x.float() * torch.rsqrt(ss / self.full_dim + self.eps)).type_as(x) * self.weight


def _shard_attention(attn: Attention, group) -> None:
    tp = dist.get_world_size(group)
    attn.to_q = ColumnParallelLinear(attn.to_q, group)
    attn.to_k = ColumnParallelLinear(attn.to_k, group)
    attn.to_v = ColumnParallelLinear(attn.to_v, group)
    attn.to_out = RowParallelLinear(attn.to_out, group)
    if isinstance(attn.norm_q, nn.RMSNorm):
        attn.norm_q = TPRMSNorm(attn.norm_q, group)
        attn.norm_k = TPRMSNorm(attn.norm_k, group)
    attn.heads //= tp


def _shard_block(block: TransformerBlock, group) -> None:
    _shard_attention(block.attn1, group)
    _shard_attention(block.attn2, group)
    ffn: FeedForward = block.ffn
    ffn.fc1 = ColumnParallelLinear(ffn.fc1, group)
    ffn.fc2 = RowParallelLinear(ffn.fc2, group)
    block.adaLN_modulation[-1] = ColumnParallelLinear(block.adaLN_modulation[-1], group, gather_output=True)


# --- sequence parallelism: USP attention --------------------------------------------------------


@dataclass
class TokenShard:
    """The token split of the current forward: n real tokens, `local` per rank (the last ranks'
    shares padded at the end), this rank's real tokens [start, stop)."""

    n_tokens: int = 0
    local: int = 0
    start: int = 0
    stop: int = 0

    def split(self, n_tokens: int, mesh: ParallelMesh) -> None:
        """Set the split of `n_tokens` over the mesh's sp ranks, as seen by this rank."""
        self.n_tokens, self.local = n_tokens, -(-n_tokens // mesh.sp)
        self.start = min(mesh.sp_rank * self.local, n_tokens)
        self.stop = min(self.start + self.local, n_tokens)


class USPAttnProcessor(AttnProcessor):
    """Self-attention over a token shard: Ulysses all-to-all (heads) around ring attention (sequence).

    Each rank holds `local` consecutive tokens (B, local, heads/tp, d). The Ulysses all-to-all over
    `ulysses` ranks turns that into (B, ulysses·local, heads/tp/ulysses, d): a ring block of
    consecutive tokens with fewer heads. Ring attention then passes each block's K/V round the
    `ring` ranks and merges the partial softmaxes by their log-sum-exp. Keys at or beyond
    `n_tokens` (the padding) are left out; a block of padding only is skipped. The partial softmaxes come
    from `models.attention.attention_with_lse` (a flash kernel with its LSE on CUDA, never S x S).
    """

    def __init__(self, mesh: ParallelMesh, shard: TokenShard):
        self.mesh, self.shard = mesh, shard
        self.dist_attn = None
        if mesh.ulysses > 1:
            from deepspeed.sequence.layer import DistributedAttention

            self.dist_attn = DistributedAttention(self._ring_attention, mesh.ulysses_group, scatter_idx=2, gather_idx=1)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:  # cross-attention: every query sees all text tokens
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))  # (B, local, heads/tp, d)
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # this shard's positions
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)
        if self.dist_attn is not None:
            out = self.dist_attn(query, key, value, batch_dim_idx=0)
        else:
            out = self._ring_attention(query, key, value)
        return self.project_out(attn, out.flatten(2, 3).type_as(query))

    def project_out(self, attn: Attention, hidden_states: torch.Tensor) -> torch.Tensor:
        """The attention module's output projection (a model whose module differs overrides this)."""
        return attn.to_out(hidden_states)

    def _ring_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, S, h, d) → (B, S, h, d): queries of this ring block against the keys of all blocks."""
        mesh, n = self.mesh, self.shard.n_tokens
        block = query.shape[1]  # S = ulysses · local
        q = query.transpose(1, 2)
        kv = torch.stack([key.transpose(1, 2), value.transpose(1, 2)]).contiguous()  # (2, B, h, S, d)
        kernel = attention_kernel(q.device, q.dtype)

        if mesh.ring == 1:
            valid = min(n, block)  # keys past the real tokens (padding) are left out, not masked
            return attention_with_lse(q, kv[0, ..., :valid, :], kv[1, ..., :valid, :], kernel)[0].transpose(1, 2)

        ring, me, group = mesh.ring, mesh.ring_rank, mesh.ring_group
        out = lse = None
        for step in range(ring):
            src = (me - step) % ring  # whose K/V this is
            reqs = []
            if step < ring - 1:  # pass this block on while computing with it
                nxt = torch.empty_like(kv)
                reqs = [dist.isend(kv, group=group, group_dst=(me + 1) % ring),
                        dist.irecv(nxt, group=group, group_src=(me - 1) % ring)]
            valid = min(n - src * block, block)  # this block's real keys; none: a block of padding only
            if valid > 0:
                o, s = attention_with_lse(q, kv[0, ..., :valid, :], kv[1, ..., :valid, :], kernel)
                out, lse = merge_attention(out, lse, o, s)
            for req in reqs:
                req.wait()
            if reqs:
                kv = nxt
        return out.to(query.dtype).transpose(1, 2)


# --- the parallel model -------------------------------------------------------------------------


class ParallelVideoDiT(nn.Module):
    """A `VideoDiT` whose forward runs over the sp × tp ranks of a mesh; same inputs and output.

    Follows the model's `_cp_plan`: the token stream and the rotary tables are split on the
    token axis where they enter the blocks and the output is gathered at `proj_out`. The split is
    made before the patch embedding (a per-token linear, so the same tokens result) so that no
    rank ever holds the whole token stream at model width; the rotary tables are computed for the
    rank's tokens only. Returns the full velocity (B, C, T', H', W') on every rank.
    """

    def __init__(self, dit: VideoDiT, mesh: ParallelMesh):
        super().__init__()
        self.dit, self.mesh = dit, mesh
        self.config = dit.config
        plan = getattr(dit, "_cp_plan", {})
        rope_split = plan.get("rope", {}).get(0)
        gather = plan.get("proj_out")
        block_split = plan.get("blocks.0", {}).get("hidden_states")
        if mesh.sp > 1 and not (isinstance(rope_split, ContextParallelInput) and rope_split.split_dim == 1
                                and isinstance(block_split, ContextParallelInput) and block_split.split_dim == 1
                                and isinstance(gather, ContextParallelOutput) and gather.gather_dim == 1):
            raise ParallelConfigError("the model's _cp_plan does not split tokens on axis 1; sp > 1 is not supported")
        self.shard = TokenShard()
        if mesh.sp > 1:
            processor = USPAttnProcessor(mesh, self.shard)
            for block in dit.blocks:
                block.attn1.set_processor(processor)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, cond_latents: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None, step_cache: StepCache | None = None) -> torch.Tensor:
        dit, mesh = self.dit, self.mesh
        if mesh.sp == 1:
            return dit(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, cond_latents, cond_mask,
                       step_cache=step_cache)
        grid = dit.token_grid(hidden_states.shape)
        n = grid[0] * grid[1] * grid[2]
        self.shard.split(n, mesh)
        local, start, stop = self.shard.local, self.shard.start, self.shard.stop

        x = self._embed(hidden_states, cond_latents, cond_mask, grid, start, stop)  # (B, stop-start, D)
        cos, sin = dit.rope(grid, x.device, tokens=slice(start, stop))
        if stop - start < local:  # padding at the end of the sequence
            pad = local - (stop - start)
            x = F.pad(x, (0, 0, 0, pad))
            cos, sin = F.pad(cos, (0, 0, 0, 0, 0, pad)), F.pad(sin, (0, 0, 0, 0, 0, pad))

        temb, context, mask = dit.embed_conditions(timestep, encoder_hidden_states, encoder_attention_mask,
                                                   hidden_states.shape[0])
        if step_cache is not None:  # the padding at the end of the last shard is left out of its decision
            step_cache.real_tokens = stop - start
        x = run_blocks(dit.blocks, x, (context, temb, (cos, sin), mask), step_cache)

        x = dit.output_tokens(x, temb)  # (B, local, C·pt·ph·pw)
        x = all_gather_cat(x, mesh.sp_group, dim=1)[:, :n]
        return dit.unpatchify(x, grid)

    def _embed(self, hidden_states, cond_latents, cond_mask, grid, start, stop) -> torch.Tensor:
        """Patch embedding of tokens [start, stop) only: built from the latent frames they lie in."""
        dit = self.dit
        b = hidden_states.shape[0]
        pt = dit.patch_size[0]
        per_frame = grid[1] * grid[2]
        if stop <= start:
            return hidden_states.new_zeros(b, 0, dit.config.hidden_size)
        f0, f1 = start // per_frame, -(-stop // per_frame)  # token frames holding the shard
        sl = slice(f0 * pt, f1 * pt)
        tokens = dit.input_tokens(hidden_states[:, :, sl],
                                  None if cond_latents is None else cond_latents[:, :, sl],
                                  None if cond_mask is None else cond_mask[:, sl])
        tokens = tokens[:, start - f0 * per_frame:stop - f0 * per_frame]
        return dit.embed_tokens(tokens, grid, slice(start, stop))


def parallelize(dit: VideoDiT, mesh: ParallelMesh) -> ParallelVideoDiT:
    """Shard `dit` in place for this rank (tp: weights split; sp: USP self-attention) and wrap it.

    Every rank must pass the same weights. The full block weights are dropped (only this rank's
    share is kept), so the weight memory per rank falls with tp.
    """
    dit.requires_grad_(False)
    if mesh.tp > 1:
        for block in dit.blocks:
            _shard_block(block, mesh.tp_group)
    return ParallelVideoDiT(dit, mesh)


# --- CFG parallelism: the sampler ---------------------------------------------------------------


class ParallelSampler(FlowMatchSampler):
    """`FlowMatchSampler` whose guided velocity is computed by the mesh (same steps, same result).

    With cfg=2, cfg rank 0 runs the conditional pass and rank 1 the unconditional one; the two
    velocities are all-gathered and mixed identically on both. With cfg=1 the [cond; uncond]
    batch of the reference goes through the (sp/tp-sharded) model as one forward.
    """

    def __init__(self, mesh: ParallelMesh, steps: int = 20, guidance: float = 4.5, shift: float = 1.0):
        super().__init__(steps, guidance, shift)
        self.mesh = mesh

    def velocity_fn(self, model, guidance, text, text_mask, uncond_text, uncond_mask, cond_latents, cond_mask,
                    step_cache: StepCache | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        mesh = self.mesh
        if mesh.cfg == 1:
            return super().velocity_fn(model, guidance, text, text_mask, uncond_text, uncond_mask,
                                       cond_latents, cond_mask, step_cache)
        check_layout(mesh.config, model.config, guidance=guidance)
        my_text, my_mask = (text, text_mask) if mesh.cfg_rank == 0 else (uncond_text, uncond_mask)
        extra = {} if step_cache is None else {"step_cache": step_cache}
        if step_cache is not None:  # the conditional rank decides, the unconditional one adds zeros
            step_cache.cond_rows = slice(None) if mesh.cfg_rank == 0 else None

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = model(x, t.expand(x.shape[0]), my_text, my_mask, cond_latents, cond_mask, **extra).float()
            parts = [torch.empty_like(v) for _ in range(2)]
            dist.all_gather(parts, v, group=mesh.cfg_group)
            v_cond, v_uncond = parts
            return v_uncond + guidance * (v_cond - v_uncond)

        return velocity
