"""The whole model: parameter counts by hand, loss at initialisation, the KV cache through
every layer, positions, tied heads, per-layer kinds, masked targets, the scaled init."""

import math

import pytest
import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.layers.attention import CausalSelfAttention
from lilllm.layers.ffn import GeluMLP, SwiGLU
from lilllm.layers.norm import LayerNorm, RMSNorm
from lilllm.model import GPT, ModelConfig

TINY = dict(vocab_size=64, block_size=16, d_model=32, n_layers=2, n_heads=4)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def test_parameter_counts_of_the_default_by_hand():
    counts = GPT(ModelConfig.preset("default", vocab_size=2048)).parameter_counts()
    d, layers, kv_width, hidden = 128, 4, 2 * 32, 352  # 2 kv heads of 32; SwiGLU 2/3 · 4d → 352
    assert counts == {
        "embedding": 2048 * d,
        "positions": 0,
        "attention": layers * (2 * d * d + 2 * d * kv_width),
        "ffn": layers * 3 * d * hidden,
        "norms": (2 * layers + 1) * d,
        "head": 0,  # tied to the embedding
        "total": 1_000_576,
    }


def test_parameter_counts_of_the_gpt2_baseline_by_hand():
    counts = GPT(ModelConfig.preset("gpt2", vocab_size=2048, tie_embeddings=False)).parameter_counts()
    d, layers, block = 128, 4, 256
    assert counts == {
        "embedding": 2048 * d,
        "positions": block * d,
        "attention": layers * 4 * (d * d + d),  # q, k, v, out with biases
        "ffn": layers * (2 * d * 4 * d + 4 * d + d),
        "norms": (2 * layers + 1) * 2 * d,  # weight and bias
        "head": 2048 * d,
        "total": 1_350_400,
    }
    assert counts["total"] == sum(p.numel() for p in GPT(ModelConfig.preset(
        "gpt2", vocab_size=2048, tie_embeddings=False)).parameters())


@pytest.mark.parametrize("preset", ["default", "gpt2"])
def test_loss_at_initialisation_is_close_to_log_vocab(preset):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(preset, vocab_size=512, n_layers=2))
    ids, targets = torch.randint(0, 512, (2, 2, 64))
    _, loss = model(ids, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


def test_forward_returns_logits_for_every_position_and_no_loss_without_targets():
    logits, loss = tiny()(torch.randint(0, 64, (3, 7)))
    assert logits.shape == (3, 7, 64) and loss is None


def test_targets_of_minus_100_are_left_out_of_the_loss():
    model = tiny()
    ids, targets = torch.randint(0, 64, (2, 2, 8))
    logits, _ = model(ids)
    masked = targets.clone()
    masked[:, :3] = -100
    _, loss = model(ids, masked)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 3:].flatten(0, 1), targets[:, 3:].flatten()))


@pytest.mark.parametrize("positions", ["rope", "learned", "sinusoidal"])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_prefill_then_decoding_equals_one_full_forward(n_kv_heads, positions):
    model = tiny(n_kv_heads=n_kv_heads, positions=positions)
    ids = torch.randint(0, 64, (2, 12))
    full, _ = model(ids)
    cache = model.new_cache()
    pieces = [model(ids[:, :5], cache=cache)[0], model(ids[:, 5:7], cache=cache)[0]]  # prompt, then an offset chunk
    pieces += [model(ids[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    assert len(cache) == cache.position == 12


def test_sdpa_and_the_manual_path_give_the_same_logits():
    model = tiny(n_kv_heads=2)
    ids = torch.randint(0, 64, (2, 10))
    logits, _ = model(ids)
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.use_sdpa = False
    torch.testing.assert_close(model(ids)[0], logits)


def test_rope_generation_continues_past_block_size_with_a_cropped_cache():
    model = tiny()
    cache = model.new_cache()
    model(torch.randint(0, 64, (1, 16)), cache=cache)
    for _ in range(4):
        cache.crop(15)
        logits, _ = model(torch.randint(0, 64, (1, 1)), cache=cache)
    assert cache.position == 20 and len(cache) == 16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_absolute_positions_stop_at_block_size(positions):
    model = tiny(positions=positions)
    with pytest.raises(LilllmError, match=f"positions 0..16 pass block_size=16, where {positions} positions end"):
        model(torch.randint(0, 64, (1, 17)))
    cache = model.new_cache()
    model(torch.randint(0, 64, (1, 16)), cache=cache)
    with pytest.raises(LilllmError, match="positions 16..16 pass block_size=16"):
        model(torch.randint(0, 64, (1, 1)), cache=cache)


def test_learned_positions_are_a_table_and_rope_tables_are_not_saved():
    learned = tiny(positions="learned")
    assert learned.pos_emb.weight.shape == (16, 32)
    assert not any("rope" in name for name in tiny().state_dict())
    assert "rope_cos" in dict(tiny().named_buffers())


def test_a_saved_model_loads_into_a_fresh_one_with_the_same_outputs():
    model, fresh = tiny(seed=0), tiny(seed=1)
    ids = torch.randint(0, 64, (1, 8))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids)[0], model(ids)[0])


def test_tied_and_untied_heads():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.parameter_counts()["total"] - tied.parameter_counts()["total"] == 64 * 32


def test_the_config_picks_the_norm_and_feed_forward_classes():
    model = tiny(norm="layernorm", ffn="gelu", norm_eps=1e-6)
    assert isinstance(model.norm, LayerNorm) and isinstance(model.blocks[0].ffn, GeluMLP)
    assert isinstance(tiny().blocks[0].attn_norm, RMSNorm)
    x, norm = torch.randn(2, 3, 32), model.blocks[1].ffn_norm
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    torch.testing.assert_close(norm(x), F.layer_norm(x, (32,), norm.weight, norm.bias, eps=1e-6))


def test_a_per_layer_list_builds_the_kinds_it_names():
    model = tiny(n_layers=3, layers=[{"ffn": "gelu"}, {}, {"ffn": "gelu"}])
    assert [type(block.ffn) for block in model.blocks] == [GeluMLP, SwiGLU, GeluMLP]
    assert all(isinstance(block.attn, CausalSelfAttention) for block in model.blocks)
    logits, _ = model(torch.randint(0, 64, (1, 5)))
    assert logits.shape == (1, 5, 64)


def test_residual_projections_start_smaller_as_depth_grows():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, d_model=256, n_layers=8, n_heads=4))
    expected = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert block.attn.out_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.ffn.down.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_auxiliary_losses_of_layers_are_averaged_per_name_and_added_to_the_loss():
    model = tiny(n_layers=3)
    reported = [{"balance": torch.tensor(1.0), "other": torch.tensor(0.5)}, {}, {"balance": torch.tensor(3.0)}]
    for block, terms in zip(model.blocks, reported):
        block.ffn.auxiliary_losses = lambda terms=terms: terms  # a layer with training terms
    ids = torch.randint(0, 64, (2, 8))
    logits, loss = model(ids, ids)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
    torch.testing.assert_close(loss, cross_entropy + (1.0 + 3.0) / 2 + 0.5)
    assert model.last_auxiliary == {"balance": 2.0, "other": 0.5}


@pytest.mark.parametrize("bad", [-1, 64, 10_000])
def test_token_ids_outside_the_vocabulary_are_refused_in_one_line(bad):
    ids = torch.tensor([[1, 2, bad, 3]])
    with pytest.raises(LilllmError, match=f"token id {bad} is outside the model's vocabulary \\(0 to 63\\)"):
        tiny()(ids)


def test_the_training_hooks_are_methods_of_the_model_over_its_sublayers():
    from lilllm.layers.sublayer import Sublayer

    model = tiny(n_layers=2, ffn="moe", moe={"balance": "aux_free", "bias_update_rate": 0.1}).train()
    assert len(model.sublayers()) == 4 and all(isinstance(layer, Sublayer) for layer in model.sublayers())
    assert model.layer_metrics() == {}  # nothing measured before a step
    model(torch.randint(0, 64, (2, 8)))
    model.after_optimizer_step()  # every MoE layer closes its step: MaxVio, and the bias moves
    assert set(model.layer_metrics()) == {"maxvio/0", "maxvio/1"}
    assert all(block.ffn.expert_bias.abs().sum() > 0 for block in model.blocks)
    n_weights = sum(p.numel() for p in model.parameters())
    assert model.flops_per_token() == 6 * n_weights + 12 * 2 * 32 * 16
