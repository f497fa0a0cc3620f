import pytest
import torch

from models.config import DiTConfig
from models.dit import AttnProcessor, RotaryPosEmbed3D, VideoDiT, apply_rotary_emb


def make_dit(**kw):
    cfg = dict(hidden_size=48, num_layers=2, num_heads=2, freq_dim=32, zero_init=False, latent_channels=4, text_dim=16)
    torch.manual_seed(0)
    return VideoDiT(DiTConfig(**{**cfg, **kw})).eval()


def text(b=1, n=5, length=8, dim=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :n] = True
    return torch.randn(b, length, dim, generator=g), mask


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 1)])
@pytest.mark.parametrize("t,h,w", [(4, 16, 16), (2, 16, 24), (4, 24, 16), (8, 8, 8)])
def test_any_grid_gives_a_velocity_of_the_latent_shape(patch, t, h, w):
    dit = make_dit(patch_size=list(patch))
    x = torch.randn(2, 4, t, h, w)
    ctx, mask = text(2)
    with torch.no_grad():
        v = dit(x, torch.tensor([0.3, 0.9]), ctx, mask)
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_zero_init_starts_at_zero_velocity():
    dit = make_dit(zero_init=True)
    ctx, mask = text()
    with torch.no_grad():
        assert dit(torch.randn(1, 4, 2, 8, 8), torch.tensor([0.5]), ctx, mask).abs().max() == 0


def test_padded_text_tokens_are_masked_out():
    dit = make_dit()
    x, t = torch.randn(1, 4, 2, 8, 8), torch.tensor([0.5])
    ctx, mask = text(n=5)
    other = ctx.clone()
    other[:, 5:] = 100.0  # padding positions: must not matter
    with torch.no_grad():
        a, b = dit(x, t, ctx, mask), dit(x, t, other, mask)
        c = dit(x, t, other, torch.ones_like(mask))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-3)


def test_frame_conditioning_channels():
    dit = make_dit()
    assert dit.in_channels == 2 * 4 + 1
    x, t, (ctx, mask) = torch.randn(1, 4, 4, 8, 8), torch.tensor([0.5]), text()
    cond = torch.randn_like(x)
    with torch.no_grad():
        plain = dit(x, t, ctx, mask)
        assert torch.equal(plain, dit(x, t, ctx, mask, torch.zeros_like(x), torch.zeros(1, 4)))
        given = dit(x, t, ctx, mask, cond, torch.tensor([[1.0, 0, 0, 0]]))
    assert not torch.allclose(plain, given)


def test_rope_is_relative_and_follows_the_grid():
    rope = RotaryPosEmbed3D(head_dim=24)
    assert (rope.t_dim, rope.h_dim, rope.w_dim) == (8, 8, 8)
    cos, sin = rope((2, 3, 4), torch.device("cpu"))
    assert cos.shape == sin.shape == (1, 24, 1, 24)
    # <R_m q, R_n k> depends only on m - n: shift both positions by one step in width
    q, k = torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24)
    def rotated(i):
        c, s = cos[:, i:i + 1], sin[:, i:i + 1]
        return apply_rotary_emb(q, c, s), apply_rotary_emb(k, c, s)
    (q0, _), (_, k1), (q1, _), (_, k2) = rotated(0), rotated(1), rotated(1), rotated(2)
    assert torch.allclose((q0 * k1).sum(), (q1 * k2).sum(), atol=1e-5)


def test_attention_processor_can_be_swapped():
    dit = make_dit()
    x, t, (ctx, mask) = torch.randn(1, 4, 2, 8, 8), torch.tensor([0.5]), text()
    calls = []

    class Counting(AttnProcessor):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            calls.append(hidden_states.shape)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    with torch.no_grad():
        ref = dit(x, t, ctx, mask)
        dit.set_attn_processor(Counting())
        out = dit(x, t, ctx, mask)
    assert torch.equal(ref, out) and len(calls) == 2 * 2  # self + cross per block


def test_parallel_plan_names_real_modules():
    dit = make_dit(pooled_text=True)
    names = dict(dit.named_modules())
    assert set(VideoDiT._cp_plan) <= set(names)
    assert VideoDiT._cp_plan["blocks.0"]["hidden_states"].split_dim == 1
    assert VideoDiT._cp_plan["proj_out"].gather_dim == 1
    assert all(any(n.split(".")[-1] == keep or n == keep for n in names) for keep in VideoDiT._keep_in_fp32_modules)


def test_pooled_text_conditions_every_block_and_ignores_padding():
    from models.dit import pool_text

    states = torch.arange(24, dtype=torch.float32).reshape(1, 3, 8)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pool_text(states, mask), states[0, :2].mean(0, keepdim=True))
    dit = make_dit(pooled_text=True)
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([0.5])
    ctx, m = text()
    padded = ctx.clone()
    padded[~m] = 100.0  # whatever sits in the padding must not matter
    with torch.no_grad():
        a = dit(x, t, ctx, m)
        assert torch.allclose(a, dit(x, t, padded, m), atol=1e-5)
        dit.pooled_text_embedding[-1].bias.add_(1.0)  # the pooled path reaches the output
        assert not torch.allclose(a, dit(x, t, ctx, m), atol=1e-4)


def test_frame_positions_are_fractions_of_the_frame_at_any_size():
    from models.dit import FramePositionEmbed

    emb, cpu = FramePositionEmbed(dim=8), torch.device("cpu")
    small, large = emb.features((2, 2, 2), cpu), emb.features((3, 6, 6), cpu)  # rows in (t, h, w) order
    # the same place in the frame (centre at a quarter of its height and width) at two sizes
    assert torch.allclose(small[0], large[1 * 6 + 1], atol=1e-6)
    assert torch.allclose(small[4], large[36 + 1 * 6 + 1], atol=1e-6)  # and in the next frame
    assert len({tuple(r.tolist()) for r in large.round(decimals=4)}) == len(large)  # every token its own
    assert torch.equal(emb.features((3, 6, 6), cpu, slice(10, 50)), large[10:50])  # a shard: its rows
    assert make_dit(zero_init=True, frame_positions=True).pos_embedding.proj.weight.abs().max() == 0


def test_frame_positions_tell_tokens_apart_where_rope_cannot():
    # A uniform input (what pure noise is on average): every token's attention averages identical
    # values, so with rotary positions alone every token gets the same output wherever it lies.
    x, t, (ctx, mask) = torch.zeros(1, 4, 2, 8, 8), torch.tensor([0.9]), text()
    with torch.no_grad():
        plain = make_dit()(x, t, ctx, mask)
        placed = make_dit(frame_positions=True)(x, t, ctx, mask)

    def per_token(v):  # (tokens, values of one 1x2x2 patch)
        return v.reshape(1, 4, 2, 4, 2, 4, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(32, -1)

    assert torch.allclose(per_token(plain), per_token(plain)[:1].expand(32, -1), atol=1e-5)
    assert (per_token(placed) - per_token(placed).mean(0)).abs().amax(1).min() > 1e-3
