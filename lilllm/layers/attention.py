"""Causal self-attention with grouped key/value heads, and the KV cache.

Each of `n_heads` query heads attends over the past with its own scores
softmax(q·kᵀ / √head_dim); keys and values have `n_kv_heads` heads, each shared by a
group of n_heads // n_kv_heads query heads:

- n_kv_heads == n_heads: multi-head attention (MHA; Vaswani et al., arXiv 1706.03762);
- n_kv_heads == 1: multi-query attention (MQA; Shazeer, arXiv 1911.02150);
- in between: grouped-query attention (GQA; Ainslie et al., arXiv 2305.13245).

Fewer key/value heads mean fewer weights and, above all, a smaller KV cache.

Two paths compute the same thing: `manual_attention` writes out the masked softmax (the
notebook teaches it, the tests compare against it), `sdpa_attention` calls PyTorch's
fused `F.scaled_dot_product_attention`. The layer uses SDPA unless told otherwise.

QK-norm (`config.qk_norm`) normalises each query and key head vector before the scores, so
no score can grow past a bound however large the weights get (Dehghani et al., arXiv
2302.05442; Wortsman et al., arXiv 2309.14322):

- "l2": unit length times a learned gain per coordinate, scores multiplied by a fixed
  temperature τ instead of 1/√head_dim (PaLM-rlhf-pytorch's form);
- "rms": an RMSNorm per head vector, then the usual 1/√head_dim. Since
  RMSNorm(x) = √head_dim · x/|x|, this is "l2" with τ = √head_dim.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.layers.norm import RMSNorm
from lilllm.layers.rope import rotate_queries_keys
from lilllm.layers.sublayer import Sublayer


class LayerCache:
    """The keys and values one attention layer has seen, each (B, n_kv_heads, T_cached, head_dim).
    Keys are stored already rotated (RoPE) at their absolute positions, never re-rotated."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.size(2)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions and return all cached keys and values."""
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)  # (B, n_kv_heads, T_cached + T, head_dim)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values


class KVCache:
    """One `LayerCache` per layer, and `position`: the absolute position of the next token.

    Usage: `cache = KVCache(n_layers)`, then `model(prompt, cache=cache)` (prefill) and
    `model(next_id, cache=cache)` per new token; the model reads the new tokens'
    positions from `cache.position` and advances it. `crop(n)` keeps only the last n
    cached positions (a rolling window) but leaves `position` alone: the next token still
    sits at its true absolute position. With RoPE that is exact, since scores depend only
    on the distance between positions; learned or sinusoidal absolute positions end at
    `block_size`, so with those, generation past it must restart from a fresh cache.
    """

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.position = 0

    def __len__(self) -> int:
        return len(self.layers[0])  # cached positions (the same in every layer)

    def crop(self, n_keep: int) -> None:
        """Keep the last `n_keep` positions of every layer."""
        if n_keep < 0:
            raise LilllmError(f"crop keeps n_keep ≥ 0 positions, got {n_keep}")
        for layer in self.layers:
            if layer.keys is not None:
                start = max(layer.keys.size(2) - n_keep, 0)
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """(n_queries, n_keys) bool, True where a query may attend to a key. The queries are
    the last n_queries of the n_keys positions, so query i sees keys 0 .. n_keys - n_queries + i."""
    ones = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
    return ones.tril(diagonal=n_keys - n_queries)


def manual_attention(q, k, v, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Causal attention written out. q (B, n_heads, T, hd); k, v (B, n_kv_heads, S, hd), S ≥ T.
    The scores are q·k times `scale`, by default 1/√hd."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)  # (B, n_heads, S, hd): kv head j serves query heads j·g .. j·g+g-1
    v = v.repeat_interleave(groups, dim=1)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # (B, n_heads, T, S)
    mask = causal_mask(q.size(2), k.size(2), q.device)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # each row sums to 1 over the past
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    return weights @ v  # (B, n_heads, T, hd)


def sdpa_attention(q, k, v, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """The same as `manual_attention`, with PyTorch's fused kernel."""
    T, S = q.size(2), k.size(2)
    if T == S:  # no cache, or a cache that was empty: the usual triangle
        mask, is_causal = None, T > 1
    elif T == 1:  # one new token sees every cached position
        mask, is_causal = None, False
    else:  # several new tokens after a cache: the triangle sits in the bottom-right corner
        mask, is_causal = causal_mask(T, S, q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          dropout_p=dropout_p, scale=scale, enable_gqa=k.size(1) != q.size(1))


class CausalSelfAttention(Sublayer):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.d_model, self.n_heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.qk_norm = config.qk_norm
        self.scale = 1 / math.sqrt(self.head_dim)  # what multiplies q·k
        if config.qk_norm == "l2":  # gains shared by all heads, one per coordinate
            self.q_gain = nn.Parameter(torch.ones(self.head_dim))
            self.k_gain = nn.Parameter(torch.ones(self.head_dim))
            self.scale = config.qk_temperature
        elif config.qk_norm == "rms":
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # False: the written-out path (same numbers, slower)

    def new_cache(self) -> LayerCache:
        """An empty cache for this layer (`GPT.new_cache` asks every attention layer for one)."""
        return LayerCache()

    def input_projections(self) -> list[nn.Linear]:
        """The layers that read the input; a parallel block computes them in one matmul with
        the feed-forward network's and calls `attend` (model.py, ParallelBlock)."""
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cache: LayerCache | None = None, xpos_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C). cos/sin (T, head_dim): RoPE angles of x's positions, or None for no
        rotation; xpos_scale (T, head_dim): xPos's scales, or None. With a cache, x holds the
        new positions only; the cache supplies the past."""
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, cache, xpos_scale)

    def attend(self, q, k, v, cos=None, sin=None, cache: LayerCache | None = None, xpos_scale=None) -> torch.Tensor:
        """The attention of projected inputs: q (B, T, n_heads·hd), k and v (B, T, n_kv_heads·hd) → (B, T, C)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, hd)
        if self.qk_norm == "l2":  # before the positions: normalising after xPos would undo its scale
            q, k = F.normalize(q, dim=-1) * self.q_gain, F.normalize(k, dim=-1) * self.k_gain
        elif self.qk_norm == "rms":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # rotate before caching: cached keys keep their absolute positions
            q, k = rotate_queries_keys(q, k, cos, sin, xpos_scale)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, n_kv_heads, S, hd), S = cached + T
        attend = sdpa_attention if self.use_sdpa else manual_attention
        y = attend(q, k, v, dropout_p=self.dropout if self.training else 0.0, scale=self.scale)  # (B, n_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads·hd): heads side by side
        return self.resid_dropout(self.out_proj(y))


def cache_bytes(config: ModelConfig, n_positions: int, bytes_per_value: int = 4) -> int:
    """Memory of a KV cache holding n_positions: keys and values, in every layer, for
    n_kv_heads heads of head_dim values each."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * n_positions * bytes_per_value
