"""RoPE against hand-written references (explicit 2x2 rotations, the interleaved layout),
its relative-position property, the KV-cache offset, dtypes and errors; the sinusoidal table."""

import math

import pytest
import torch

from lilllm import LilllmError
from lilllm.layers.rope import apply_rope, rope_angles, rotate_half, sinusoidal_positions


def rope(x, start=0, base=10000.0):
    """apply_rope on x (B, H, T, d) at positions start .. start+T-1."""
    T, d = x.shape[-2:]
    cos, sin = rope_angles(d, start + T, base)
    return apply_rope(x, cos[start:start + T], sin[start:start + T])


def test_angle_tables():
    cos, sin = rope_angles(8, 5, base=100.0)
    assert cos.shape == sin.shape == (5, 8) and cos.dtype == sin.dtype == torch.float32
    theta = [100.0 ** (-2 * i / 8) for i in range(4)]
    for m in range(5):
        expected = [m * t for t in theta] * 2  # half-split: the frequencies twice over
        torch.testing.assert_close(cos[m], torch.tensor(expected).cos())
        torch.testing.assert_close(sin[m], torch.tensor(expected).sin())


def test_rotate_half():
    assert rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist() == [-3.0, -4.0, 1.0, 2.0]


def test_matches_explicit_2x2_rotations():
    torch.manual_seed(0)
    d, T, base = 6, 4, 10000.0
    x = torch.randn(1, 1, T, d)
    y = rope(x, base=base)
    half = d // 2
    for m in range(T):
        for i in range(half):
            angle = m * base ** (-2 * i / d)
            rotation = torch.tensor([[math.cos(angle), -math.sin(angle)],
                                     [math.sin(angle), math.cos(angle)]])
            plane = torch.stack([x[0, 0, m, i], x[0, 0, m, i + half]])  # half-split pairs i, i + d/2
            expected = rotation @ plane
            torch.testing.assert_close(torch.stack([y[0, 0, m, i], y[0, 0, m, i + half]]), expected)


def interleaved_rope(x, base=10000.0):
    """The GPT-J / Meta Llama layout, written independently: plane i is (2i, 2i+1),
    rotated as a complex number by e^{i m θ_i}."""
    T, d = x.shape[-2:]
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    rotations = torch.polar(torch.ones(T, d // 2, dtype=torch.float64),
                            torch.outer(torch.arange(T, dtype=torch.float64), theta))  # (T, d/2)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())  # (B, H, T, d/2)
    return torch.view_as_real(pairs * rotations).flatten(-2).to(x.dtype)  # (B, H, T, d)


@pytest.mark.parametrize("head_dim", [2, 8, 64])
def test_half_split_equals_interleaved_up_to_a_permutation(head_dim):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, head_dim)
    # Interleaved coordinate order as seen from the half-split layout: 0, d/2, 1, d/2+1, ...
    perm = torch.stack([torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2], -1).flatten()
    torch.testing.assert_close(rope(x)[..., perm], interleaved_rope(x[..., perm]), rtol=1e-5, atol=1e-5)


def test_layouts_differ_without_the_permutation():
    x = torch.randn(1, 1, 10, 8)
    assert not torch.allclose(rope(x), interleaved_rope(x), atol=1e-3)


def test_scores_depend_only_on_relative_distance():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(d), torch.randn(d)
    cos, sin = rope_angles(d, 80)

    def rotated(v, pos):
        return apply_rope(v.view(1, 1, 1, d), cos[pos:pos + 1], sin[pos:pos + 1]).flatten()

    def score(m, n):
        return rotated(q, m) @ rotated(k, n)

    for offset in [0, 1, 5, -3]:
        scores = torch.stack([score(m, m - offset) for m in [10, 17, 30, 63]])
        torch.testing.assert_close(scores, scores[0].expand(4), rtol=1e-5, atol=1e-5)
    assert not torch.isclose(score(10, 9), score(10, 5))


def test_offset_equals_slicing_the_full_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 16)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, :, 7:], start=7), full[:, :, 7:])
    torch.testing.assert_close(rope(x[:, :, 11:], start=11), full[:, :, 11:])


def test_rotation_preserves_norms_and_position_zero():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 50, 32) * 5
    y = rope(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_cast_back(dtype):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 300, 8).to(dtype)
    y = rope(x)
    assert y.dtype == dtype
    # Computed in fp32 from the same inputs, rounded once at the end.
    cos, sin = rope_angles(8, 300)
    expected = x.float() * cos + rotate_half(x.float()) * sin
    torch.testing.assert_close(y, expected.to(dtype), rtol=0, atol=0)


def test_errors():
    with pytest.raises(LilllmError, match="head_dim must be a positive even number"):
        rope_angles(7, 10)
    with pytest.raises(LilllmError, match="max_seq_len must be positive"):
        rope_angles(8, 0)
    cos, sin = rope_angles(8, 10)
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(LilllmError, match="positions beyond the table"):
        apply_rope(x, cos[8:12], sin[8:12])  # only 2 rows left
    with pytest.raises(LilllmError, match=r"pass cos\[start:start \+ T\]"):
        apply_rope(x, cos, sin)  # not sliced
    with pytest.raises(LilllmError, match="head_dim 8 but x has head_dim 4"):
        apply_rope(torch.randn(1, 1, 4, 4), cos[:4], sin[:4])
    with pytest.raises(LilllmError, match="dim must be a positive even number"):
        sinusoidal_positions(10, 5)


def test_sinusoidal_table_follows_the_paper():
    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8)
    for pos in [0, 1, 17, 49]:
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
