"""The model config: presets, validation errors, per-layer overrides, JSON round trip."""

import dataclasses

import pytest

from lilllm import LilllmError
from lilllm.config import ATTENTION_KINDS, FFN_KINDS, NORM_KINDS, ConfigError, LayerSpec, ModelConfig
from lilllm.layers.attention import CausalSelfAttention
from lilllm.layers.ffn import GeluMLP, GeluTanhMLP, ReluSquaredMLP, SwiGLU
from lilllm.layers.moe import MoE
from lilllm.layers.norm import NORMS
from lilllm.layers.plga import PLGAttention
from lilllm.model import ATTENTIONS, FFNS


def test_the_default_preset_is_the_dataclass_defaults_and_llama_style():
    config = ModelConfig.preset("default", vocab_size=2048)
    assert config == ModelConfig(vocab_size=2048)
    assert (config.norm, config.positions, config.ffn, config.bias) == ("rmsnorm", "rope", "swiglu", False)
    assert 1 < config.n_kv_heads < config.n_heads  # grouped-query


def test_the_gpt2_preset_differs_only_where_gpt2_does():
    default, gpt2 = ModelConfig.preset("default", vocab_size=2048), ModelConfig.preset("gpt2", vocab_size=2048)
    changed = {f.name for f in dataclasses.fields(ModelConfig) if getattr(default, f.name) != getattr(gpt2, f.name)}
    assert changed == {"n_kv_heads", "ffn", "norm", "positions", "bias"}
    assert gpt2.n_kv_heads == gpt2.n_heads  # full multi-head attention


def test_presets_take_overrides_and_gpt2_stays_multi_head():
    config = ModelConfig.preset("gpt2", vocab_size=100, n_heads=8)
    assert (config.vocab_size, config.n_heads, config.n_kv_heads) == (100, 8, 8)


def test_n_kv_heads_none_means_multi_head():
    assert ModelConfig(vocab_size=10, n_heads=4, n_kv_heads=None).n_kv_heads == 4


@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 130}, "n_heads=4 does not divide d_model=130"),
    ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
    ({"d_model": 12, "n_heads": 4}, "head_dim .* must be even"),
    ({"vocab_size": 0}, "vocab_size must be a positive whole number"),
    ({"n_layers": -1}, "n_layers must be a positive whole number"),
    ({"block_size": 2.5}, "block_size must be a positive whole number"),
    ({"n_heads": True}, "n_heads must be a positive whole number"),
    ({"ffn_hidden": 0}, "ffn_hidden must be a positive whole number"),
    ({"attention": "linear"}, "unknown attention kind 'linear'"),
    ({"ffn": "relu"}, "unknown ffn kind 'relu'"),
    ({"norm": "batchnorm"}, "unknown norm kind 'batchnorm'"),
    ({"positions": "alibi"}, "unknown positions kind 'alibi'"),
    ({"norm_eps": 0.0}, "norm_eps must be positive"),
    ({"rope_base": -1.0}, "rope_base must be positive"),
    ({"dropout": 1.0}, r"dropout is a probability in \[0, 1\)"),
    ({"layers": [{}, {}]}, "the per-layer list has length 2 but n_layers=4"),
    ({"n_layers": 1, "layers": [{"ffn": "relu"}]}, r"unknown layers\[0\].ffn kind 'relu'"),
    ({"n_layers": 1, "layers": [{"attention": "mamba"}]}, r"unknown layers\[0\].attention kind 'mamba'"),
    ({"n_layers": 1, "layers": [{"experts": 8}]}, r"layers\[0\] has unknown key\(s\) experts"),
    ({"n_layers": 1, "layers": ["gelu"]}, r"layers\[0\] must be a dict"),
    ({"rope_base": float("inf")}, "rope_base=inf is not a finite number"),
    ({"norm_eps": float("nan")}, "norm_eps=nan is not a finite number"),
    ({"dropout": float("nan")}, "dropout=nan is not a finite number"),
    ({"ffn": "moe", "moe": {"aux_loss_weight": float("inf")}}, "moe.aux_loss_weight=inf is not a finite number"),
    ({"attention": "plga", "plga": {"dag_ap": float("nan")}}, "plga.dag_ap=nan is not a finite number"),
])
def test_bad_values_are_rejected_with_a_message_naming_them(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**{"vocab_size": 10, **overrides})


def test_an_odd_head_dim_is_fine_without_rope():
    assert ModelConfig(vocab_size=10, d_model=12, n_heads=4, positions="learned").head_dim == 3


def test_config_errors_are_lilllm_errors_and_value_errors():
    with pytest.raises(LilllmError):
        ModelConfig(vocab_size=-5)
    with pytest.raises(ValueError):
        ModelConfig(vocab_size=-5)


def test_unknown_preset_is_rejected():
    with pytest.raises(ConfigError, match="unknown preset 'llama': choose one of default, gpt2"):
        ModelConfig.preset("llama", vocab_size=10)


def test_json_round_trip_keeps_every_value_including_the_per_layer_list():
    config = ModelConfig(vocab_size=300, n_layers=2, ffn_hidden=64, dropout=0.1,
                         layers=[{"ffn": "gelu"}, LayerSpec()])
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert again.layers == [LayerSpec(ffn="gelu"), LayerSpec()]


def test_from_dict_rejects_unknown_keys_and_a_missing_vocab_size():
    values = ModelConfig(vocab_size=10).to_dict()
    with pytest.raises(ConfigError, match="has unknown key.* n_experts: known keys are"):
        ModelConfig.from_dict({**values, "n_experts": 8})
    del values["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size is missing"):
        ModelConfig.from_dict(values)


def test_from_json_rejects_what_is_not_a_json_object():
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{vocab_size: 10")
    with pytest.raises(ConfigError, match="must be an object"):
        ModelConfig.from_json("[1, 2]")


def test_layer_resolves_the_overrides_against_the_model_wide_kinds():
    config = ModelConfig(vocab_size=10, n_layers=3, layers=[{"ffn": "gelu"}, {}, {"ffn": "swiglu"}])
    assert [config.layer(i).ffn for i in range(3)] == ["gelu", "swiglu", "swiglu"]
    assert {config.layer(i).attention for i in range(3)} == {"softmax"}
    assert ModelConfig(vocab_size=10).layer(0) == LayerSpec(attention="softmax", ffn="swiglu")


def test_the_kind_lists_match_the_layer_dicts():
    assert set(ATTENTION_KINDS) == set(ATTENTIONS)
    assert set(FFN_KINDS) == set(FFNS)
    assert set(NORM_KINDS) == set(NORMS)
    assert FFNS == {"swiglu": SwiGLU, "gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "relu2": ReluSquaredMLP, "moe": MoE}
    assert ATTENTIONS == {"softmax": CausalSelfAttention, "plga": PLGAttention}
