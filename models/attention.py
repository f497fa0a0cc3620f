"""Attention that also returns its log-sum-exp, for ring attention's merge (`models/parallel.py`).

Ring attention computes a query block's softmax against one K/V block at a time and merges the partial
results by their log-sum-exp (LSE): out = sum_i exp(lse_i - lse) * out_i with lse = logaddexp_i lse_i.
It needs a kernel that gives the LSE beside the output, and never the S x S score matrix (a Wan 480p x
81-frame clip is 32,760 tokens: 4.3 GB of fp32 scores per head-batch slice). PyTorch's own SDPA kernels
return it through their aten ops; `attention_kernel` picks one by device and dtype:

    cpu                     "cpu_flash"  aten._scaled_dot_product_flash_attention_for_cpu (what SDPA runs)
    cuda, fp16/bf16, sm80+  "flash"      aten._scaled_dot_product_flash_attention (FlashAttention-2)
    cuda, otherwise         "efficient"  aten._scaled_dot_product_efficient_attention (xFormers' kernel;
                                         fp32 too, any sm50+), compute_log_sumexp=True
    anything else           "chunked"    plain maths over query chunks: O(chunk x S) memory, never S x S

Keys past the real sequence (sp padding) are never masked here: the caller passes only the valid keys,
so no kernel needs a mask and the flash kernel (which takes none) always applies.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention_kernel", "attention_with_lse", "merge_attention", "QUERY_CHUNK"]

#: queries per chunk of the "chunked" fallback: its scores are (B, h, QUERY_CHUNK, Sk) fp32 at a time
QUERY_CHUNK = 1024


def attention_kernel(device: torch.device, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """Which kernel `attention_with_lse` runs for inputs on `device` in `dtype` (see the module doc).
    `capability`: the CUDA device's (major, minor); None: asked of torch."""
    if device.type == "cpu":
        return "cpu_flash"
    if device.type == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability(device)
        if dtype in (torch.float16, torch.bfloat16) and capability >= (8, 0):
            return "flash"
        return "efficient"
    return "chunked"


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       kernel: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, h, Sq, d) over k, v (B, h, Sk, d): the output (B, h, Sq, d), in q's dtype,
    and the log-sum-exp of each query's scaled scores (B, h, Sq), fp32. `kernel`: `attention_kernel`'s
    name (None: chosen for q)."""
    kernel = kernel or attention_kernel(q.device, q.dtype)
    if kernel == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse.float()
    if kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse.float()
    if kernel == "efficient":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., :q.shape[-2]].float()  # the kernel pads the LSE's query axis to its block size
    if kernel != "chunked":
        raise ValueError(f"unknown attention kernel {kernel!r}")
    outs, lses = [], []
    scale = 1.0 / math.sqrt(q.shape[-1])
    kf, vf = k.float(), v.float()
    for start in range(0, q.shape[-2], QUERY_CHUNK):
        scores = (q[..., start:start + QUERY_CHUNK, :].float() @ kf.transpose(-1, -2)) * scale
        lse = scores.logsumexp(dim=-1)
        outs.append((torch.exp(scores - lse[..., None]) @ vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def merge_attention(out: torch.Tensor | None, lse: torch.Tensor | None, part: torch.Tensor, part_lse: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over the union of two key sets from the two partial results (out, lse) and
    (part, part_lse), fp32; `out` None: `part` alone."""
    part, part_lse = part.float(), part_lse.float()
    if out is None:
        return part, part_lse
    new = torch.logaddexp(lse, part_lse)
    return out * torch.exp(lse - new)[..., None] + part * torch.exp(part_lse - new)[..., None], new
