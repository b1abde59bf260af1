"""PaLM's pieces (chapter 11): the parallel block and its fused projection, xPos, QK-norm,
bias-free LayerNorm and the presets, each checked against the property that defines it."""

import math

import pytest
import torch
import torch.nn.functional as F

from lilllm.config import ConfigError, ModelConfig
from lilllm.layers.attention import CausalSelfAttention
from lilllm.layers.norm import LayerNorm
from lilllm.layers.rope import XPOS_GAMMA, rope_angles, rotate_queries_keys, xpos_scales
from lilllm.model import GPT, ParallelBlock


def palm(**overrides) -> GPT:
    torch.manual_seed(0)
    values = {"vocab_size": 50, "block_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64,
              **overrides}
    return GPT(ModelConfig.preset("palm", **values)).eval()


# --- the parallel block ------------------------------------------------------------------------

def test_parallel_block_fused_equals_unfused_equals_the_formula():
    block = palm().blocks[0]
    x = torch.randn(2, 9, 32)
    cos, sin = rope_angles(8, 9)
    fused = block(x, cos, sin)
    block.fuse = False
    unfused = block(x, cos, sin)
    n = F.layer_norm(x, (32,), block.norm.weight, None, eps=1e-5)  # one bias-free LayerNorm, read twice
    formula = x + block.attn(n, cos, sin) + block.ffn(n)
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused, formula, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(fused, x)  # both branches add something


def test_parallel_block_fuses_swiglu_and_gelu_but_not_a_mixture_of_experts():
    assert palm().blocks[0].fuse and palm(ffn="gelu").blocks[0].fuse
    moe = palm(ffn="moe", moe={"n_experts": 4, "top_k": 1}).blocks[0]
    assert isinstance(moe, ParallelBlock) and not moe.fuse
    mixed = palm(layers=[{"ffn": "moe"}, {}], moe={"n_experts": 4, "top_k": 1})  # per-layer mixes keep working
    assert [block.fuse for block in mixed.blocks] == [False, True]
    assert mixed(torch.randint(50, (1, 8)))[0].shape == (1, 8, 50)


def test_parallel_block_with_zero_output_projections_is_the_identity():
    block = palm().blocks[0]
    torch.nn.init.zeros_(block.attn.out_proj.weight)
    torch.nn.init.zeros_(block.ffn.down.weight)
    x = torch.randn(2, 5, 32)
    cos, sin = rope_angles(8, 5)
    torch.testing.assert_close(block(x, cos, sin), x, atol=0, rtol=0)


def test_parallel_block_has_one_norm_and_the_mqa_cache():
    sequential, parallel = palm(block="sequential"), palm()
    counts = sequential.parameter_counts()["norms"] - parallel.parameter_counts()["norms"]
    assert counts == 2 * 32  # one LayerNorm gain fewer per block, no biases anywhere
    assert all(block.attn.k_proj.out_features == 8 for block in parallel.blocks)  # one key head of head_dim 8


# --- xPos --------------------------------------------------------------------------------------

def test_xpos_scales_follow_the_formula_and_cancel_their_centre():
    zeta = (torch.arange(4) / 4 + XPOS_GAMMA) / (1 + XPOS_GAMMA)  # head_dim 8: 4 planes
    assert zeta[0].item() == pytest.approx(0.4 / 1.4)
    scale = xpos_scales(8, start=3, n_positions=5, centre=10, scale_base=512.0)
    expected = zeta ** ((torch.arange(3, 8)[:, None] - 10) / 512)
    torch.testing.assert_close(scale, torch.cat([expected, expected], dim=-1))
    # q·σ(m) times k/σ(j): the product depends on m − j only, whatever the centre
    a, b = xpos_scales(8, 0, 20, centre=0), xpos_scales(8, 0, 20, centre=17)
    torch.testing.assert_close(a[15] / a[4], b[15] / b[4])


def test_xpos_decays_a_plane_zero_score_by_zeta_to_the_distance():
    head_dim, base = 8, 512.0
    e0 = torch.zeros(1, 1, 1, head_dim)
    e0[..., 0] = 1.0  # a vector in plane 0 only (coordinates 0 and 4)
    cos, sin = rope_angles(head_dim, 1000)
    scale = xpos_scales(head_dim, 0, 1000, centre=500, scale_base=base)
    q, k = rotate_queries_keys(e0.expand(1, 1, 1000, head_dim), e0.expand(1, 1, 1000, head_dim), cos, sin, scale)
    zeta0 = XPOS_GAMMA / (1 + XPOS_GAMMA)
    for distance in (0, 1, 100, 700):
        score = (q[0, 0, 900] * k[0, 0, 900 - distance]).sum()
        assert score.item() == pytest.approx(math.cos(distance * 1.0) * zeta0 ** (distance / base), abs=1e-5)


def test_xpos_with_an_infinite_scale_base_is_rope_exactly():
    rope, xpos = palm(positions="rope"), palm(xpos_scale_base=1e30)  # σ = ζ^(±1e-28) = 1 in fp32
    xpos.load_state_dict(rope.state_dict())
    ids = torch.randint(50, (2, 20))
    assert torch.equal(rope(ids)[0], xpos(ids)[0])


def test_xpos_attention_is_unchanged_by_shifting_every_position():
    attn = palm().blocks[0].attn
    x = torch.randn(1, 12, 32)
    outputs = []
    for start in (0, 45, 300):
        cos, sin = rope_angles(8, start + 12)
        scale = xpos_scales(8, start, 12, centre=16)
        outputs.append(attn(x, cos[start:], sin[start:], xpos_scale=scale))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outputs[0], outputs[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prefill", [1, 7])
def test_xpos_cached_decode_equals_one_full_forward(prefill):
    model = palm(qk_norm="l2")
    ids = torch.randint(50, (2, 30))
    full = model(ids)[0]
    cache = model.new_cache()
    steps = [model(ids[:, :prefill], cache=cache)[0]]
    steps += [model(ids[:, t:t + 1], cache=cache)[0] for t in range(prefill, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_xpos_past_the_context_is_computed_on_the_fly_and_refused_where_fp32_ends():
    model = palm()
    cache = model.new_cache()
    cache.position = 1000  # far past block_size 32: positions 1000.. have no table rows
    assert torch.isfinite(model(torch.randint(50, (1, 3)), cache=cache)[0]).all()
    cache = model.new_cache()
    cache.position = 10**6
    with pytest.raises(Exception, match="xPos scales for positions up to"):
        model(torch.randint(50, (1, 1)), cache=cache)


# --- QK-norm -----------------------------------------------------------------------------------

def test_qk_norm_l2_makes_unit_vectors_and_rms_is_l2_at_temperature_sqrt_head_dim():
    config = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, qk_norm="l2", norm_eps=1e-12)
    torch.manual_seed(0)
    l2 = CausalSelfAttention(config)
    seen = {}
    original = F.normalize
    x = torch.randn(2, 6, 32)
    cos, sin = rope_angles(8, 6)

    def spy(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        seen.setdefault("norms", []).append(out.norm(dim=-1))
        return out

    F.normalize = spy
    try:
        l2(x, cos, sin)
    finally:
        F.normalize = original
    for norms in seen["norms"]:
        torch.testing.assert_close(norms, torch.ones_like(norms))  # gains are 1 at init

    rms_config = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, qk_norm="rms", norm_eps=1e-12)
    at_sqrt_d = ModelConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, qk_norm="l2", qk_temperature=math.sqrt(8))
    rms, l2_sqrt_d = CausalSelfAttention(rms_config), CausalSelfAttention(at_sqrt_d)
    l2_sqrt_d.load_state_dict({name: value for name, value in l2.state_dict().items()})
    rms.load_state_dict({name: value for name, value in l2.state_dict().items() if "gain" not in name}, strict=False)
    torch.testing.assert_close(rms(x, cos, sin), l2_sqrt_d(x, cos, sin), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(l2(x, cos, sin), l2_sqrt_d(x, cos, sin))  # τ = 8 is another temperature


@pytest.mark.parametrize("kind", ["l2", "rms"])
def test_qk_norm_makes_attention_blind_to_the_size_of_q_and_k(kind):
    # Without QK-norm, multiplying W_q and W_k by 30 multiplies every score by 900 (a one-hot
    # softmax); with it, the scores, and so the output, do not change.
    config = ModelConfig(vocab_size=50, d_model=32, n_heads=4, qk_norm=kind, norm_eps=1e-12)
    torch.manual_seed(0)
    attn, plain = CausalSelfAttention(config), CausalSelfAttention(ModelConfig(vocab_size=50, d_model=32, n_heads=4))
    plain.load_state_dict(attn.state_dict(), strict=False)
    x, (cos, sin) = torch.randn(1, 6, 32), rope_angles(8, 6)
    before, plain_before = attn(x, cos, sin), plain(x, cos, sin)
    with torch.no_grad():
        for layer in (attn, plain):
            layer.q_proj.weight.mul_(30)
            layer.k_proj.weight.mul_(30)
    torch.testing.assert_close(attn(x, cos, sin), before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain(x, cos, sin), plain_before, atol=1e-3)


# --- the model around the blocks ---------------------------------------------------------------

def test_bias_free_layernorm_is_layernorm_without_beta():
    norm, x = LayerNorm(16, bias=False), torch.randn(3, 16)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    torch.testing.assert_close(norm(x), F.layer_norm(x, (16,), norm.weight, None, eps=1e-5))
    assert not any(name.endswith("norm.bias") for name, _ in palm().named_parameters())


def test_palm_preset_ties_the_head_and_a_target_of_id_zero_counts():
    model = palm()
    assert model.head.weight is model.tok_emb.weight
    ids, targets = torch.randint(50, (2, 8)), torch.zeros(2, 8, dtype=torch.long)  # every target is token 0
    logits, loss = model(ids, targets)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # nothing ignored
    torch.testing.assert_close(loss, expected)
    assert loss > 0


def test_palm_150m_has_the_seeds_parameter_count():
    config = ModelConfig.preset("palm-150m", vocab_size=50304)
    D, H, dh, F_, L = 768, 8, 128, 4 * 768, 12
    per_block = D * (H * dh + 2 * dh + 2 * F_) + H * dh * D + F_ * D + D  # fused in, attention out, ffn out, norm
    with torch.device("meta"):  # counts without allocating 145M weights
        model = GPT(config)
    assert model.parameter_counts()["total"] == L * per_block + 50304 * D + D == 144_811_776


@pytest.mark.parametrize("overrides, match", [
    ({"block": "parallel", "norm_placement": "post"}, "needs norm_placement='pre'"),
    ({"norm_bias": False}, "has none to remove"),
    ({"qk_norm": "l2", "attention": "plga", "plga": {}}, "use qk_norm='none' with plga"),
    ({"block": "diagonal"}, "unknown block kind"),
    ({"qk_norm": "l3"}, "unknown qk_norm kind"),
    ({"positions": "xpos", "head_dim": 7}, "xpos rotates pairs"),
    ({"xpos_scale_base": 0.0}, "xpos_scale_base must be positive"),
    ({"d_model": 30, "n_heads": 4}, "or set head_dim"),
])
def test_bad_palm_settings_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(vocab_size=50, **overrides)


def test_an_explicit_head_dim_may_differ_from_the_width_split():
    model = GPT(ModelConfig(vocab_size=50, d_model=30, n_heads=4, head_dim=16, n_kv_heads=1)).eval()
    assert model.blocks[0].attn.q_proj.out_features == 64 and model.blocks[0].attn.out_proj.out_features == 30
    ids = torch.randint(50, (1, 10))
    cache = model.new_cache()
    torch.testing.assert_close(torch.cat([model(ids[:, :4], cache=cache)[0], model(ids[:, 4:], cache=cache)[0]], 1),
                               model(ids)[0], atol=1e-5, rtol=1e-4)
