"""Wan's transformer over a group of ranks: USP self-attention, Megatron TP and CFG on two ranks.

diffusers' `WanTransformer3DModel` stays the model and its forward is not touched; reelforge's parallel
pieces (`models/parallel.py`) are applied to it from outside, as xDiT and cache-dit do:

    mesh = build_mesh(layout, wan_layer_widths(folder), group)   # the process groups (models.parallel)
    parallelize_wan(transformer, mesh)                            # shards in place, hooks the token split
    pred = guided_prediction(transformer, x, t, cond, uncond, guidance, mesh)

tp   Megatron, where cache-dit's `tp_plan_wan` splits: in every block the self- and cross-attention's
     to_q / to_k / to_v by output (whole heads per rank) and to_out[0] by input (all-reduced), the FFN's
     net[0].proj by output and net[2] by input. The q/k RMSNorm spans all heads
     (`rms_norm_across_heads`), so it becomes `TPRMSNorm`: the sum of squares is all-reduced over the
     tp group. Everything between the blocks (embeddings, modulation, norms, proj_out) stays whole.
sp   the model's own `_cp_plan` is carried out with forward hooks: rope's (cos, sin) and blocks.0's
     hidden_states are split on the token axis, and so is TI2V-5B's per-token timestep (2-D; a 1-D
     timestep is left whole, as diffusers' hooks do); proj_out's output is all-gathered. Self-attention
     (attn1) is reelforge's `USPAttnProcessor` (Ulysses all-to-all over heads around ring attention)
     through the attention-processor API; cross-attention to the text stays diffusers' and local. A token
     count that sp does not divide is padded at the end: padded keys are masked, padded outputs dropped.
cfg  `guided_prediction`: cfg rank 0 runs the conditional pass, rank 1 the unconditional one; the two are
     all-gathered and mixed with WanPipeline's arithmetic, so every rank holds the one-rank prediction.

Every rank gets the same inputs and returns the same prediction. Inference only.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformerBlock

from models.config import ParallelConfigError
from models.parallel import (
    ColumnParallelLinear,
    ParallelMesh,
    RowParallelLinear,
    TokenShard,
    TPRMSNorm,
    USPAttnProcessor,
    all_gather_cat,
)
from models.wan.step_cache import WanStepCache

__all__ = ["WanUSPAttnProcessor", "guided_prediction", "parallelize_wan"]

#: where `_cp_plan` must split (module → entry) for the hooks below to carry it out; all on the token axis
REQUIRED_PLAN = (("rope", 0), ("rope", 1), ("blocks.0", "hidden_states"), ("proj_out", None))


class WanUSPAttnProcessor(USPAttnProcessor):
    """`USPAttnProcessor` for a `WanAttention` (self-attention over this rank's token shard).

    The projections, q/k norms and rotary embedding are the same maths as diffusers' `WanAttnProcessor`
    (Wan's rotary tables repeat each angle for both members of a pair, so reelforge's
    `apply_rotary_emb` gives the same numbers); only the output projection differs: Wan's `to_out` is
    [Linear, Dropout].
    """

    def project_out(self, attn: WanAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        return attn.to_out[1](attn.to_out[0](hidden_states))


def parallelize_wan(transformer: WanTransformer3DModel, mesh: ParallelMesh) -> TokenShard | None:
    """Shard `transformer` in place for this rank of `mesh` (tp: weights split; sp: USP self-attention and
    the token split of its `_cp_plan`). Every rank must pass the same weights; each keeps its share only.
    Returns the sp token split each forward sets (None without sp)."""
    transformer.requires_grad_(False)
    for block in transformer.blocks:
        for attn in (block.attn1, block.attn2):
            if getattr(attn, "fused_projections", False) or attn.add_k_proj is not None:
                raise ParallelConfigError("parallel Wan supports text-to-video transformers with unfused q/k/v "
                                          "projections only (no image context, no fuse_projections)")
    if mesh.tp > 1:
        for block in transformer.blocks:
            _shard_block(block, mesh.tp_group)
    if mesh.sp > 1:
        shard = TokenShard()
        _hook_token_split(transformer, mesh, shard)
        processor = WanUSPAttnProcessor(mesh, shard)
        for block in transformer.blocks:
            block.attn1.set_processor(processor)
        return shard
    return None


def guided_prediction(model: WanTransformer3DModel, x: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor,
                      uncond: torch.Tensor | None, guidance: float, mesh: ParallelMesh | None = None,
                      image_states: torch.Tensor | None = None,
                      step_cache: WanStepCache | None = None) -> torch.Tensor:
    """WanPipeline's prediction at one step: the model's for the prompt's text states `cond` and, with
    guidance (`uncond` given), uncond + guidance x (cond - uncond). With cfg=2 in `mesh` the two passes
    run on the two cfg ranks and are all-gathered: the same arithmetic, so the single rank's result.
    `image_states`: a Wan 2.1 I2V / FLF2V picture's CLIP states, given to both passes (WanImageToVideoPipeline).
    `step_cache`: the step cache's hooks on `model` (`models/wan/step_cache.py`), told which pass runs."""

    def forward(text: torch.Tensor, name: str) -> torch.Tensor:
        if step_cache is not None:
            step_cache.pass_(name)
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                     encoder_hidden_states_image=image_states, return_dict=False)[0]

    if uncond is None:
        return forward(cond, "cond")
    if mesh is not None and mesh.cfg == 2:
        mine = forward(cond, "cond") if mesh.cfg_rank == 0 else forward(uncond, "uncond")
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=mesh.cfg_group)
        pred, pred_uncond = parts
    else:
        pred, pred_uncond = forward(cond, "cond"), forward(uncond, "uncond")
    return pred_uncond + guidance * (pred - pred_uncond)


# --- tp -----------------------------------------------------------------------------------------------


def _shard_attention(attn: WanAttention, group) -> None:
    attn.to_q = ColumnParallelLinear(attn.to_q, group)
    attn.to_k = ColumnParallelLinear(attn.to_k, group)
    attn.to_v = ColumnParallelLinear(attn.to_v, group)
    attn.to_out[0] = RowParallelLinear(attn.to_out[0], group)
    attn.norm_q = TPRMSNorm(attn.norm_q, group)
    attn.norm_k = TPRMSNorm(attn.norm_k, group)
    attn.heads //= dist.get_world_size(group)


def _shard_block(block: WanTransformerBlock, group) -> None:
    _shard_attention(block.attn1, group)
    _shard_attention(block.attn2, group)
    block.ffn.net[0].proj = ColumnParallelLinear(block.ffn.net[0].proj, group)
    block.ffn.net[2] = RowParallelLinear(block.ffn.net[2], group)


# --- sp: the model's _cp_plan as forward hooks ------------------------------------------------------------


def _hook_token_split(model: WanTransformer3DModel, mesh: ParallelMesh, shard: TokenShard) -> None:
    """Carry out the model's `_cp_plan` with reelforge's padded token split over the mesh's sp group.

    A forward pre-hook on the model sets the split from the latent's token grid; each plan entry then
    becomes a hook on its module: inputs split before its forward, `split_output` entries (rope) after
    it, `ContextParallelOutput` (proj_out) all-gathered after it. The plan is refused (one line) unless
    it splits where `REQUIRED_PLAN` says, and every split is on the token axis (1).
    """
    plan = getattr(model, "_cp_plan", None) or {}
    entries = [(module_id, key, spec) for module_id, entry in plan.items()
               for key, spec in (entry.items() if isinstance(entry, dict) else [(None, entry)])]
    axes = {getattr(spec, "split_dim", getattr(spec, "gather_dim", None)) for _, _, spec in entries}
    if not set(REQUIRED_PLAN) <= {(m, k) for m, k, _ in entries} or axes != {1}:
        raise ParallelConfigError(f"{type(model).__name__}._cp_plan does not split the tokens on axis 1 where "
                                  f"reelforge expects; sp > 1 is not supported for it")
    pt, ph, pw = model.config.patch_size

    def set_split(module, args, kwargs):
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, t, h, w = latents.shape
        shard.split((t // pt) * (h // ph) * (w // pw), mesh)

    model.register_forward_pre_hook(set_split, with_kwargs=True, prepend=True)
    for module_id, entry in plan.items():
        module = model.get_submodule(module_id)
        if not isinstance(entry, dict):
            module.register_forward_hook(_gather_hook(entry, mesh, shard))
            continue
        inputs = {name: spec for name, spec in entry.items() if not spec.split_output}
        outputs = {index: spec for index, spec in entry.items() if spec.split_output}
        if inputs:
            module.register_forward_pre_hook(_split_inputs_hook(module, inputs, shard), with_kwargs=True)
        if outputs:
            module.register_forward_hook(_split_outputs_hook(outputs, shard))


def _split_tokens(x: torch.Tensor, spec, shard: TokenShard) -> torch.Tensor:
    """This rank's tokens [start, stop) of `x` along the spec's axis, zero-padded to `shard.local`;
    a tensor of another rank than the spec expects is not split (a 1-D timestep)."""
    if not torch.is_tensor(x) or (spec.expected_dims is not None and x.dim() != spec.expected_dims):
        return x
    dim = spec.split_dim
    if x.shape[dim] != shard.n_tokens:
        raise RuntimeError(f"sequence split: expected {shard.n_tokens} tokens on axis {dim}, got shape "
                           f"{tuple(x.shape)}")
    part = x.narrow(dim, shard.start, shard.stop - shard.start)
    pad = shard.local - part.shape[dim]
    if pad:
        shape = list(part.shape)
        shape[dim] = pad
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part


def _split_inputs_hook(module: torch.nn.Module, inputs: dict, shard: TokenShard):
    positions = {name: i for i, name in enumerate(inspect.signature(module.forward).parameters)}

    def hook(module, args, kwargs):
        args = list(args)
        for name, spec in inputs.items():
            if name in kwargs:
                kwargs[name] = _split_tokens(kwargs[name], spec, shard)
            elif positions.get(name, len(args)) < len(args):
                args[positions[name]] = _split_tokens(args[positions[name]], spec, shard)
        return tuple(args), kwargs

    return hook


def _split_outputs_hook(outputs: dict, shard: TokenShard):
    def hook(module, args, output):
        if torch.is_tensor(output):
            return _split_tokens(output, outputs[0], shard) if 0 in outputs else output
        return type(output)(_split_tokens(x, outputs[i], shard) if i in outputs else x for i, x in enumerate(output))

    return hook


def _gather_hook(spec, mesh: ParallelMesh, shard: TokenShard):
    def hook(module, args, output):
        if spec.expected_dims is not None and output.dim() != spec.expected_dims:
            return output
        return all_gather_cat(output, mesh.sp_group, spec.gather_dim).narrow(spec.gather_dim, 0, shard.n_tokens)

    return hook
