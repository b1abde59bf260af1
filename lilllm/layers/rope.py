"""Positions: the fixed sinusoidal table of "Attention Is All You Need" (Vaswani et al.,
arXiv 1706.03762), rotary position embeddings, RoPE (Su et al., RoFormer, arXiv
2104.09864), and xPos (Sun et al., "A Length-Extrapolatable Transformer", arXiv 2212.10554).

RoPE rotates each query and key vector by an angle proportional to its position, in d/2
independent 2-D planes, each with its own frequency θ_i = base^(−2i/d). The score of a
rotated pair then depends only on how far apart the two positions are.

xPos is RoPE plus a scale: at position t, plane i of a query is multiplied by
ζ_i^((t − c)/s) and the same plane of a key divided by it, so the score of positions m ≥ j
gains the factor ζ_i^((m − j)/s) ≤ 1: a decay with distance, strongest on the fastest
planes. The centre c cancels; it only keeps the exponents small.

Layout: half-split (GPT-NeoX, Hugging Face Llama): plane i pairs coordinates i and
i + d/2, so the tables repeat the frequencies as [θ0 .. θ_{d/2−1}, θ0 .. θ_{d/2−1}].
The interleaved layout (GPT-J, Meta's Llama) pairs 2i and 2i+1; the two are the same
operator up to a fixed permutation of head coordinates (notebook 03 shows it).
"""

import torch

from lilllm import LilllmError


def _check_positive_even(name: str, value: int) -> None:
    if value <= 0 or value % 2:
        raise LilllmError(f"{name} must be a positive even number (it splits into 2-D planes), got {value}")


def rope_angles(head_dim: int, max_seq_len: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m·θ_i for every position m < max_seq_len, each (max_seq_len, head_dim),
    fp32 (in bf16, m·θ would lose the angle for positions past a few hundred)."""
    _check_positive_even("head_dim", head_dim)
    if max_seq_len <= 0:
        raise LilllmError(f"max_seq_len must be positive, got {max_seq_len}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,) θ_i
    positions = torch.arange(max_seq_len, dtype=torch.float32)  # (T_max,)
    angles = torch.outer(positions, inv_freq)  # (T_max, d/2): m·θ_i
    angles = torch.cat([angles, angles], dim=-1)  # (T_max, d): half-split layout
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] → [−x2, x1] over the last dimension: the 90° turn of every plane (i, i + d/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., d/2) each
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by the angles of its T positions (and multiply it
    by `scale`, xPos's (T, head_dim) rows, if given).

    `cos` and `sin` are (T, head_dim) rows of `rope_angles`, already sliced to the
    positions of x: `cos[:T]` for a whole sequence, `cos[start:start + T]` for T new
    tokens after `start` cached ones. Computed in fp32, returned in x's dtype.
    """
    T, head_dim = x.shape[-2], x.shape[-1]
    if cos.shape[-1] != head_dim:
        raise LilllmError(f"the angle tables are for head_dim {cos.shape[-1]} but x has head_dim {head_dim}: "
                          "build them with rope_angles(head_dim, ...)")
    if cos.shape[0] < T:
        raise LilllmError(f"x has {T} positions but the angle table slice has only {cos.shape[0]}: positions "
                          "beyond the table; build rope_angles with a larger max_seq_len")
    if cos.shape[0] != T:
        raise LilllmError(f"the angle table slice has {cos.shape[0]} rows but x has {T} positions: "
                          "pass cos[start:start + T] and sin[start:start + T]")
    x32 = x.float()
    rotated = x32 * cos + rotate_half(x32) * sin  # (B, n_heads, T, head_dim)
    return (rotated if scale is None else rotated * scale).to(x.dtype)


XPOS_GAMMA = 0.4  # ζ_i = (i/(d/2) + γ) / (1 + γ): from 0.29 on the fastest plane to nearly 1 on the slowest


def xpos_scales(head_dim: int, start: int, n_positions: int, centre: int, scale_base: float = 512.0) -> torch.Tensor:
    """xPos's σ(t) = ζ^((t − centre)/scale_base) for positions start .. start+n_positions-1,
    (n_positions, head_dim) in the half-split layout of `rope_angles`, fp32."""
    _check_positive_even("head_dim", head_dim)
    half = head_dim // 2
    cpu = dict(dtype=torch.float32, device="cpu")  # built on the CPU (checked there), moved by the caller
    zeta = (torch.arange(half, **cpu) / half + XPOS_GAMMA) / (1 + XPOS_GAMMA)  # (d/2,)
    power = (torch.arange(start, start + n_positions, **cpu) - centre) / scale_base  # (T,)
    scale = zeta ** power[:, None]  # (T, d/2)
    if not (torch.isfinite(scale) & torch.isfinite(scale.reciprocal())).all():  # keys are divided by σ
        raise LilllmError(f"xPos scales for positions up to {start + n_positions - 1} leave fp32's range: "
                          "restart generation from a fresh cache")
    return torch.cat([scale, scale], dim=-1)  # (T, d)


def rotate_queries_keys(q, k, cos, sin, xpos_scale=None):
    """RoPE on queries and keys; with xPos scales σ, the queries are multiplied by σ and the
    keys divided by it (so a score depends on the two positions' distance only)."""
    if xpos_scale is None:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return apply_rope(q, cos, sin, xpos_scale), apply_rope(k, cos, sin, xpos_scale.reciprocal())


def sinusoidal_positions(max_seq_len: int, dim: int) -> torch.Tensor:
    """The fixed absolute table of Vaswani et al., (max_seq_len, dim), added to token
    embeddings: PE[m, 2i] = sin(m·θ_i), PE[m, 2i+1] = cos(m·θ_i), θ_i = 10000^(−2i/dim)."""
    _check_positive_even("dim", dim)
    if max_seq_len <= 0:
        raise LilllmError(f"max_seq_len must be positive, got {max_seq_len}")
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T_max, dim/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (T_max, dim/2, 2)
    return table.flatten(-2)  # (T_max, dim): sin and cos interleaved
