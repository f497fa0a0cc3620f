"""models/attention.py: the kernel chosen per device and dtype, its log-sum-exp, and the ring's merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models.attention as attention
from models.attention import attention_kernel, attention_with_lse, merge_attention


def qkv(sq=37, sk=53, heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, s, dim, generator=g).to(device, dtype) for s in (sq, sk, sk)]


@pytest.mark.parametrize("device,dtype,capability,kernel", [
    ("cpu", torch.float32, None, "cpu_flash"),
    ("cpu", torch.bfloat16, None, "cpu_flash"),
    ("cuda", torch.bfloat16, (9, 0), "flash"),     # H100
    ("cuda", torch.float16, (8, 0), "flash"),      # A100
    ("cuda", torch.bfloat16, (7, 5), "efficient"),  # T4: no FlashAttention-2
    ("cuda", torch.float32, (9, 0), "efficient"),  # flash takes half precision only
    ("mps", torch.float32, None, "chunked"),
])
def test_the_kernel_follows_device_and_dtype(device, dtype, capability, kernel):
    assert attention_kernel(torch.device(device), dtype, capability) == kernel


@pytest.mark.parametrize("kernel", ["cpu_flash", "chunked"])
def test_output_and_lse_are_softmax_attention(kernel, monkeypatch):
    monkeypatch.setattr(attention, "QUERY_CHUNK", 8)  # several query chunks for the fallback
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, kernel)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() < 1e-5
    assert lse.shape == (1, 2, 37) and (lse - scores.logsumexp(-1)).abs().max() < 1e-5


@pytest.mark.parametrize("kernel", ["cpu_flash", "chunked"])
def test_merging_key_blocks_by_lse_is_full_attention(kernel):
    """Ring attention's arithmetic: the keys in 4 uneven blocks, merged in any order, give attention over all."""
    q, k, v = qkv()
    bounds = [0, 5, 20, 21, 53]
    out = lse = None
    for a, b in reversed(list(zip(bounds, bounds[1:]))):
        out, lse = merge_attention(out, lse, *attention_with_lse(q, k[..., a:b, :], v[..., a:b, :], kernel))
    full, full_lse = attention_with_lse(q, k, v, kernel)
    assert (out - full).abs().max() < 1e-5 and (lse - full_lse).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_match_sdpa_and_never_hold_the_score_matrix(dtype):
    """On a GPU: the chosen kernel's output and LSE against SDPA's maths, and a 32,760-token sequence (Wan
    480p x 81 frames) whose fp32 score matrix alone would be 4.3 GB stays under 1 GB of peak memory."""
    q, k, v = qkv(sq=300, sk=700, heads=4, dim=64, dtype=dtype, device="cuda")
    out, lse = attention_with_lse(q, k, v)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    scores = q.float() @ k.float().transpose(-1, -2) / 8.0
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (out.float() - ref).abs().max() < tol and (lse - scores.logsumexp(-1)).abs().max() < tol
    s = 32760
    q, k, v = qkv(sq=s, sk=s, heads=1, dim=128, dtype=dtype, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out, lse = attention_with_lse(q, k, v)
    torch.cuda.synchronize()
    assert out.shape == q.shape and torch.isfinite(lse).all()
    assert torch.cuda.max_memory_allocated() - base < 1 << 30
