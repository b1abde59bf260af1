"""Feed-forward networks: the width rules, parameter counts by hand, and the formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from lilllm.config import ModelConfig
from lilllm.layers.ffn import GeluMLP, GeluTanhMLP, ReluSquaredMLP, SwiGLU, gelu_hidden, swiglu_hidden


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("d_model, expected", [(128, 352), (96, 256), (192, 512), (768, 2048), (100, 288)])
def test_swiglu_hidden_is_two_thirds_of_four_d_rounded_up_to_32(d_model, expected):
    assert swiglu_hidden(d_model) == expected
    assert expected % 32 == 0 and 8 * d_model / 3 <= expected < 8 * d_model / 3 + 32


def test_parameter_counts_by_hand():
    config = ModelConfig(vocab_size=10, d_model=128)
    assert gelu_hidden(128) == 512
    assert n_params(GeluMLP(config)) == 2 * 128 * 512
    assert n_params(SwiGLU(config)) == 3 * 128 * 352
    with_bias = ModelConfig(vocab_size=10, d_model=128, bias=True)
    assert n_params(GeluMLP(with_bias)) == 2 * 128 * 512 + 512 + 128
    assert n_params(SwiGLU(with_bias)) == 3 * 128 * 352 + 2 * 352 + 128


@pytest.mark.parametrize("d_model", [128, 256, 768])
def test_the_two_thirds_rule_keeps_swiglu_within_5_percent_of_gelu(d_model):
    config = ModelConfig(vocab_size=10, d_model=d_model, n_heads=2)
    ratio = n_params(SwiGLU(config)) / n_params(GeluMLP(config))
    assert 1.0 <= ratio < 1.05


def test_an_explicit_hidden_width_overrides_the_rule():
    config = ModelConfig(vocab_size=10, d_model=64, ffn_hidden=100)
    assert SwiGLU(config).up.out_features == GeluMLP(config).up.out_features == 100


def test_the_outputs_follow_the_formulas():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=10, d_model=32, n_heads=2, bias=True)
    x = torch.randn(2, 5, 32)
    gelu, swiglu = GeluMLP(config), SwiGLU(config)
    expected = F.linear(F.gelu(F.linear(x, gelu.up.weight, gelu.up.bias)), gelu.down.weight, gelu.down.bias)
    torch.testing.assert_close(gelu(x), expected)
    gate = x @ swiglu.gate.weight.T + swiglu.gate.bias
    up = x @ swiglu.up.weight.T + swiglu.up.bias
    expected = (gate * torch.sigmoid(gate) * up) @ swiglu.down.weight.T + swiglu.down.bias  # SiLU(a) = a·σ(a)
    torch.testing.assert_close(swiglu(x), expected)



def test_the_tanh_gelu_is_gpt2s_formula_and_differs_from_the_exact_one():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=10, d_model=32, n_heads=2, bias=True)
    x = torch.randn(2, 5, 32) * 3
    tanh_mlp = GeluTanhMLP(config)
    h = F.linear(x, tanh_mlp.up.weight, tanh_mlp.up.bias)
    gpt2_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))  # GPT-2's code
    torch.testing.assert_close(tanh_mlp(x), F.linear(gpt2_gelu, tanh_mlp.down.weight, tanh_mlp.down.bias))
    exact = GeluMLP(config)
    exact.load_state_dict(tanh_mlp.state_dict())
    assert not torch.allclose(exact(x), tanh_mlp(x), atol=1e-5)  # close, but another function


def test_relu_squared_is_zero_below_and_a_square_above():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=10, d_model=32, n_heads=2)
    mlp = ReluSquaredMLP(config)
    x = torch.randn(2, 5, 32)
    h = x @ mlp.up.weight.T
    torch.testing.assert_close(mlp(x), torch.where(h > 0, h * h, torch.zeros_like(h)) @ mlp.down.weight.T)
    assert sum(p.numel() for p in mlp.parameters()) == sum(p.numel() for p in GeluMLP(config).parameters())
