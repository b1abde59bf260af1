"""RMSNorm and LayerNorm against torch's references, their invariances, and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lilllm.layers.norm import NORMS, LayerNorm, RMSNorm

SHAPES = [(7,), (3, 16), (2, 5, 32), (2, 3, 4, 8)]


def random_weights(norm: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights (and bias), so parity checks cover the affine part too."""
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    return norm


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_matches_torch(shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    norm = random_weights(RMSNorm(shape[-1], eps=1e-6))
    expected = F.rms_norm(x, (shape[-1],), norm.weight, eps=1e-6)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_torch(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    norm = random_weights(LayerNorm(shape[-1], eps=1e-6, bias=bias))
    assert (norm.bias is None) == (not bias)
    expected = F.layer_norm(x, (shape[-1],), norm.weight, norm.bias, eps=1e-6)
    torch.testing.assert_close(norm(x), expected)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_bf16_input_is_normalised_in_fp32_and_cast_back(kind):
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * 10).to(torch.bfloat16)
    norm = random_weights(NORMS[kind](64))
    y = norm(x)
    assert y.dtype == torch.bfloat16
    # The fp32 computation on the same (bf16-rounded) numbers, rounded once at the end.
    with torch.no_grad():
        if kind == "rmsnorm":
            reference = F.rms_norm(x.float(), (64,), norm.weight, eps=norm.eps)
        else:
            reference = F.layer_norm(x.float(), (64,), norm.weight, norm.bias, eps=norm.eps)
    assert torch.equal(y, reference.to(torch.bfloat16))


def test_default_eps_and_init():
    rms, ln = NORMS["rmsnorm"](8), NORMS["layernorm"](8, eps=1e-3)
    assert rms.eps == 1e-5 and ln.eps == 1e-3
    assert torch.equal(rms.weight, torch.ones(8)) and torch.equal(ln.weight, torch.ones(8))
    assert torch.equal(ln.bias, torch.zeros(8))
    assert [name for name, _ in LayerNorm(8, bias=False).named_parameters()] == ["weight"]


@pytest.mark.parametrize("alpha", [1e-2, 0.5, 3.0, 1e3])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_scale_invariance(kind, alpha):
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    norm = random_weights(NORMS[kind](32, eps=0.0))
    torch.testing.assert_close(norm(alpha * x), norm(x))


def test_only_layernorm_is_invariant_to_a_shift():
    torch.manual_seed(0)
    x, shift = torch.randn(5, 32), 2.5
    torch.testing.assert_close(LayerNorm(32, eps=0.0)(x + shift), LayerNorm(32, eps=0.0)(x))
    assert not torch.allclose(RMSNorm(32, eps=0.0)(x + shift), RMSNorm(32, eps=0.0)(x), atol=1e-2)


def test_rmsnorm_output_has_unit_rms():
    torch.manual_seed(0)
    y = RMSNorm(64, eps=0.0)(torch.randn(10, 64) * 7)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(10))


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_gradients_match_torch(kind):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    norm = random_weights(NORMS[kind](16))
    weight_ref = norm.weight.detach().clone().requires_grad_()
    if kind == "rmsnorm":
        reference = F.rms_norm(x_ref, (16,), weight_ref, eps=norm.eps)
    else:
        bias_ref = norm.bias.detach().clone().requires_grad_()
        reference = F.layer_norm(x_ref, (16,), weight_ref, bias_ref, eps=norm.eps)
    upstream = torch.randn(3, 4, 16)
    (norm(x) * upstream).sum().backward()
    (reference * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(norm.weight.grad, weight_ref.grad)
    if kind == "layernorm":
        torch.testing.assert_close(norm.bias.grad, bias_ref.grad)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_fp16_activations_above_256_do_not_overflow(kind):
    torch.manual_seed(0)
    x = (torch.randn(4, 256) * 300).half()  # x² > 65504, the largest fp16 number
    assert torch.isinf(x.pow(2)).any()
    y = NORMS[kind](256)(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), NORMS[kind](256)(x.float()), rtol=1e-3, atol=1e-3)
