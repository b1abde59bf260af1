"""Causal self-attention: the written-out path against PyTorch's references, causality,
the KV cache (decode == full forward for MHA, GQA and MQA), and cropping the cache."""

import pytest
import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.layers.attention import (
    CausalSelfAttention, KVCache, LayerCache, causal_mask, manual_attention, sdpa_attention,
)
from lilllm.layers.rope import apply_rope, rope_angles

N_HEADS = 4
KV_LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}  # name → n_kv_heads, for 4 query heads


def qkv(n_kv_heads, T=6, S=None, B=2, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    S = S or T
    q = torch.randn(B, N_HEADS, T, head_dim, generator=generator)
    k = torch.randn(B, n_kv_heads, S, head_dim, generator=generator)
    v = torch.randn(B, n_kv_heads, S, head_dim, generator=generator)
    return q, k, v


def layer(n_kv_heads, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=10, d_model=32, n_heads=N_HEADS, n_kv_heads=n_kv_heads, **overrides)
    return CausalSelfAttention(config).eval()


def test_causal_mask_is_the_bottom_right_triangle():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # two new queries after two cached keys: they sit at positions 2 and 3
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("n_kv_heads", KV_LAYOUTS.values(), ids=KV_LAYOUTS.keys())
def test_manual_path_matches_sdpa_with_repeated_keys_and_values(n_kv_heads):
    q, k, v = qkv(n_kv_heads)
    groups = N_HEADS // n_kv_heads
    reference = F.scaled_dot_product_attention(
        q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), is_causal=True)
    torch.testing.assert_close(manual_attention(q, k, v), reference)
    torch.testing.assert_close(sdpa_attention(q, k, v), reference)


def test_manual_path_matches_a_loop_over_heads_and_queries():
    q, k, v = qkv(n_kv_heads=2, T=4)
    out = manual_attention(q, k, v)
    for b in range(2):
        for h in range(N_HEADS):
            kv_head = h // 2  # query heads 0, 1 share kv head 0; heads 2, 3 share kv head 1
            for t in range(4):
                scores = k[b, kv_head, : t + 1] @ q[b, h, t] / 8 ** 0.5  # (t+1,): the past only
                expected = scores.softmax(dim=0) @ v[b, kv_head, : t + 1]
                torch.testing.assert_close(out[b, h, t], expected)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("n_kv_heads", KV_LAYOUTS.values(), ids=KV_LAYOUTS.keys())
def test_both_paths_agree_when_queries_follow_cached_keys(n_kv_heads, T):
    q, k, v = qkv(n_kv_heads, T=T, S=7)
    torch.testing.assert_close(sdpa_attention(q, k, v), manual_attention(q, k, v))


@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("n_kv_heads", KV_LAYOUTS.values(), ids=KV_LAYOUTS.keys())
def test_the_layer_gives_the_same_output_on_both_paths_and_is_causal(n_kv_heads, rope):
    attn = layer(n_kv_heads)
    x = torch.randn(2, 9, 32)
    cos, sin = rope_angles(8, 9) if rope else (None, None)
    out = attn(x, cos, sin)
    attn.use_sdpa = False
    torch.testing.assert_close(attn(x, cos, sin), out)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 32)  # change the future: the first 5 outputs must not move
    torch.testing.assert_close(attn(changed, cos, sin)[:, :5], out[:, :5])
    assert not torch.allclose(attn(changed, cos, sin)[:, 5:], out[:, 5:])


def test_parameter_count_by_hand():
    for n_kv_heads in KV_LAYOUTS.values():
        attn = layer(n_kv_heads)
        # q and out: 32 × 32 each; k and v: 32 × (n_kv_heads · 8) each
        assert sum(p.numel() for p in attn.parameters()) == 2 * 32 * 32 + 2 * 32 * n_kv_heads * 8
    with_bias = layer(2, bias=True)
    assert sum(p.numel() for p in with_bias.parameters()) == 2 * 32 * 32 + 2 * 32 * 16 + 32 + 16 + 16 + 32


def run_with_cache(attn, x, chunks, cos=None, sin=None):
    """Feed x (B, T, C) through attn in chunks of the given sizes, with one cache."""
    cache, outputs, start = LayerCache(), [], 0
    for size in chunks:
        angles = (cos[start:start + size], sin[start:start + size]) if cos is not None else (None, None)
        outputs.append(attn(x[:, start:start + size], *angles, cache=cache))
        start += size
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("chunks", [[1] * 8, [5, 1, 1, 1], [3, 2, 1, 2]], ids=["tokens", "prompt", "offsets"])
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("n_kv_heads", KV_LAYOUTS.values(), ids=KV_LAYOUTS.keys())
def test_decoding_with_a_cache_equals_one_full_forward(n_kv_heads, use_sdpa, chunks):
    attn = layer(n_kv_heads)
    attn.use_sdpa = use_sdpa
    x = torch.randn(2, 8, 32)
    cos, sin = rope_angles(8, 8)
    decoded, cache = run_with_cache(attn, x, chunks, cos, sin)
    torch.testing.assert_close(decoded, attn(x, cos, sin))
    assert cache.keys.shape == cache.values.shape == (2, n_kv_heads, 8, 8)  # (B, n_kv_heads, T, head_dim)


def test_the_cache_holds_keys_rotated_at_their_absolute_positions():
    attn = layer(2)
    x = torch.randn(1, 6, 32)
    cos, sin = rope_angles(8, 6)
    _, cache = run_with_cache(attn, x, [4, 1, 1], cos, sin)
    k = attn.k_proj(x).view(1, 6, 2, 8).transpose(1, 2)  # (B, n_kv_heads, T, head_dim), unrotated
    torch.testing.assert_close(cache.keys, apply_rope(k, cos, sin))


def test_crop_keeps_the_last_positions_and_the_absolute_position():
    cache = KVCache(n_layers=2)
    for layer_cache in cache.layers:
        layer_cache.update(torch.arange(10.0).view(1, 1, 10, 1), torch.zeros(1, 1, 10, 1))
    cache.position = 10
    cache.crop(4)
    assert len(cache) == 4 and cache.position == 10
    assert cache.layers[1].keys.flatten().tolist() == [6.0, 7.0, 8.0, 9.0]
    cache.crop(6)  # keeping more than there is keeps everything
    assert len(cache) == 4
    cache.crop(0)
    assert len(cache) == 0
    assert len(KVCache(n_layers=3)) == 0


def test_crop_rejects_a_negative_size():
    with pytest.raises(LilllmError, match="crop keeps n_keep ≥ 0 positions, got -1"):
        KVCache(n_layers=1).crop(-1)


def test_with_rope_a_cropped_cache_equals_a_fresh_pass_over_the_window():
    # Only distances between positions enter the scores, so a window kept at absolute
    # positions 6..9 scores the next token (at 10) as a fresh pass at 0..3 (then 4) does.
    attn = layer(2)
    x = torch.randn(1, 11, 32)
    cos, sin = rope_angles(8, 11)
    cache = KVCache(n_layers=1)
    attn(x[:, :10], cos[:10], sin[:10], cache=cache.layers[0])
    cache.crop(4)
    windowed = attn(x[:, 10:], cos[10:11], sin[10:11], cache=cache.layers[0])
    fresh = attn(x[:, 6:], cos[:5], sin[:5])[:, -1:]
    torch.testing.assert_close(windowed, fresh, atol=1e-5, rtol=1e-4)
