"""Power Law Graph Attention (PLGA), the attention of PLDR-LLM (Gokden, arXiv 2410.16703;
first in the Power Law Graph Transformer, arXiv 2107.02039).

Scaled dot-product attention (SDPA) scores query i against key j with a fixed bilinear
form, q_i·k_j / √dk. PLGA learns the form, q_i · G_LM · k_j / √dk, where G_LM is a dk×dk
matrix per sequence and head, deduced from the queries themselves:

1. A0 = Qᵀ·Q, the Gram matrix of the (rotated) queries: Σ_t q_t q_tᵀ, (B, H, dk, dk);
2. A = metric learner(A0): LayerNorm, then residual units of SwiGLU blocks acting on the
   last axis, each unit post-LN; the learner's weights are shared by all heads;
3. A_LM = iSwiGLU(W·A + b) + 1e-9 with iSwiGLU(u) = u·silu(u) ≥ 0: the metric tensor, > 0;
4. A_P = A_LM ** P, elementwise, one learned exponent per entry: the potential tensor;
5. G_LM = a·A_P + b_a: the energy-curvature tensor;
6. scores (Q·G_LM)·Kᵀ / √dk, causal mask, softmax, times V, output projection.

W, b, P, a, b_a are per head, (H, dk, dk); `W·A` and `a·A_P` are matrix products per head.
With G_LM = I this is SDPA: the layer computes Q' = Q·G_LM and hands Q' to SDPA.
A, A_LM, A_P and G_LM are the layer's "deductive outputs"; the logits are its inductive one.
The learner and the power stage run in fp32: tiny bases to negative powers explode in bf16.

The Gram and causality. The reference sums the Gram over *every* position of the
sequence, so position t's attention depends on later tokens, its own target included.
`gram="full"` does that (faithful); `gram="causal"` (ours, not in any reference) uses the
prefix sum Σ_{s≤t} q_s q_sᵀ: one metric per position, (B, H, T, dk, dk), affordable only
for small models. Deductive tensors are (B, H, T', dk, dk): T' = 1 (full) or T (causal).
`lilllm.model.sequential_nats` scores a model token by token, each target from its prefix alone: the
honest number for a full-Gram model, whose one-pass score has seen the future.

The KV cache. Causal Gram: exact; the cache keeps keys, values and the running Gram sum
(past `block_size` the sum keeps its dropped positions). Full Gram: the reference's
(v510) cached-A behaviour: the prompt's metric is computed once, at prefill, and frozen;
generation without a cache recomputes it from the whole prefix every step (v500). The
two give different numbers: a full-Gram model's earlier positions change as tokens arrive.

The DAG loss (NOTEARS, Zheng et al., arXiv 1803.01422): h(M) = |log(tr(exp(M∘M)) / dk)|
is 0 iff M∘M is a weighted acyclic graph. PLDR-LLM adds the mean of h over layers,
batch and heads for A_LM, A_P and G_LM, each with its own weight. exp(M∘M) overflows fp32
and fp64 for trained models (h ≈ 10³), so `log_trace_expm` works in the log domain.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm.config import ModelConfig
from lilllm.layers.attention import LayerCache, causal_mask, sdpa_attention
from lilllm.layers.norm import LayerNorm
from lilllm.layers.rope import rotate_queries_keys
from lilllm.layers.sublayer import Sublayer

LEARNER_EPS = 1e-6  # the reference's LayerNorm eps inside the metric learner
METRIC_FLOOR = 1e-9  # A_LM ≥ 1e-9 > 0, so A_LM ** P is defined for every real P


# --- the metric learner: A0 → A ---------------------------------------------------------------

class GatedUnit(nn.Module):
    """SwiGLU with biases over the last axis: out(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden)
        self.up = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, width)

    def forward(self, x):
        return self.out(F.silu(self.gate(x)) * self.up(x))  # (..., width) → (..., hidden) → (..., width)


class ResidualUnit(nn.Module):
    """n_glu gated units in a row, then add the input and normalise (post-LN)."""

    def __init__(self, width: int, hidden: int, n_glu: int):
        super().__init__()
        self.glus = nn.Sequential(*(GatedUnit(width, hidden) for _ in range(n_glu)))
        self.norm = LayerNorm(width, eps=LEARNER_EPS)

    def forward(self, a):
        return self.norm(a + self.glus(a))


class MetricLearner(nn.Module):
    """A0 (..., dk, dk) → A (..., dk, dk). Every layer acts on the last axis: each row of
    each matrix is one "token" of width dk. v500 normalises A0 and runs the units at width
    dk; v900 (`depth` set) first widens the rows to `depth` (Linear + LayerNorm) and
    narrows them back at the end (Linear + LayerNorm)."""

    def __init__(self, head_dim: int, hidden: int, n_units: int, n_glu: int, depth: int | None = None):
        super().__init__()
        width = depth or head_dim
        self.widen = nn.Linear(head_dim, width) if depth else nn.Identity()
        self.in_norm = LayerNorm(width, eps=LEARNER_EPS)
        self.units = nn.Sequential(*(ResidualUnit(width, hidden, n_glu) for _ in range(n_units)))
        self.narrow = (nn.Sequential(nn.Linear(width, head_dim), LayerNorm(head_dim, eps=LEARNER_EPS))
                       if depth else nn.Identity())

    def forward(self, gram):
        return self.narrow(self.units(self.in_norm(self.widen(gram))))


def iswiglu(u: torch.Tensor) -> torch.Tensor:
    """u·silu(u) = u²·σ(u) ≥ 0: SwiGLU with identity weights, PLDR-LLM's positivity map."""
    return u * F.silu(u)


# --- the layer -----------------------------------------------------------------------------

@dataclass
class DeductiveOutputs:
    """What one PLGA layer deduced, each (B, H, T', dk, dk) (T' = 1 full Gram, T causal),
    and its attention probabilities (B, H, T, S)."""

    A: torch.Tensor  # the metric learner's output
    A_LM: torch.Tensor  # metric tensor, > 0
    A_P: torch.Tensor  # potential tensor A_LM ** P
    G_LM: torch.Tensor  # energy-curvature tensor: the bilinear form of the scores
    probs: torch.Tensor | None = None


class PLGACache(LayerCache):
    """Keys and values, and the Gram's state: the running sum of q qᵀ (causal Gram), or
    the prefill's deductive outputs (full Gram, frozen as in the reference's v510)."""

    def __init__(self):
        super().__init__()
        self.gram: torch.Tensor | None = None  # (B, H, 1, dk, dk)
        self.deduced: DeductiveOutputs | None = None


class PLGAttention(Sublayer):
    def __init__(self, config: ModelConfig):
        super().__init__()
        plga = config.plga
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        H, dk = self.n_heads, self.head_dim
        self.q_proj = nn.Linear(config.d_model, H * dk, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_heads * dk, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_heads * dk, bias=config.bias)
        self.out_proj = nn.Linear(H * dk, config.d_model, bias=config.bias)
        self.learner = MetricLearner(dk, plga.a_dff, plga.n_units, plga.n_glu, plga.a_dff_depth)
        # Per head: W, P and a from Glorot (xavier) normal over the whole (H, dk, dk) tensor,
        # as the PyTorch reference (v510) does; so P starts near 0 and A_P near all-ones.
        self.W = nn.Parameter(nn.init.xavier_normal_(torch.empty(H, dk, dk)))
        self.b = nn.Parameter(torch.zeros(H, dk, dk))
        self.P = nn.Parameter(nn.init.xavier_normal_(torch.empty(H, dk, dk)))
        self.a = nn.Parameter(nn.init.xavier_normal_(torch.empty(H, dk, dk)))
        self.b_a = nn.Parameter(torch.zeros(H, dk, dk))
        self.causal_gram = plga.gram == "causal"
        self.dag_weights = {"dag_alm": plga.dag_alm, "dag_ap": plga.dag_ap, "dag_glm": plga.dag_glm}
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.record = False  # True: keep the deductive outputs (and probabilities) in self.deduced
        self.deduced: DeductiveOutputs | None = None
        self._dag_inputs: list[torch.Tensor] | None = None  # A_LM, A_P, G_LM of the last forward

    def new_cache(self) -> PLGACache:
        return PLGACache()

    def gram(self, q: torch.Tensor, cache: PLGACache | None) -> torch.Tensor:
        """q (B, H, T, dk) fp32 → A0 (B, H, 1, dk, dk) full, or (B, H, T, dk, dk) causal."""
        if not self.causal_gram:
            return (q.transpose(-2, -1) @ q).unsqueeze(2)  # (B, H, dk, T) @ (B, H, T, dk): Σ_t q_t q_tᵀ
        outer = q.unsqueeze(-1) * q.unsqueeze(-2)  # (B, H, T, dk, dk): q_t q_tᵀ
        grams = outer.cumsum(dim=2)  # position t sums positions ≤ t
        if cache is not None:
            if cache.gram is not None:
                grams = grams + cache.gram  # the cached positions come before these
            cache.gram = grams[:, :, -1:]
        return grams

    def deduce(self, q: torch.Tensor, cache: PLGACache | None = None) -> DeductiveOutputs:
        """The metric of queries q (B, H, T, dk): steps 1-5 of the module docstring, in fp32."""
        with torch.autocast(q.device.type, enabled=False):
            A = self.learner(self.gram(q.float(), cache))  # (B, H, T', dk, dk)
            # (H, dk, dk) → (H, 1, dk, dk): one matrix per head, broadcast over batch and T'
            W, b, P, a, b_a = (p.unsqueeze(1) for p in (self.W, self.b, self.P, self.a, self.b_a))
            A_LM = iswiglu(W @ A + b) + METRIC_FLOOR  # W·A: a matrix product per head
            A_P = A_LM ** P  # elementwise power, elementwise exponent
            G_LM = a @ A_P + b_a
        return DeductiveOutputs(A, A_LM, A_P, G_LM)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cache: PLGACache | None = None, xpos_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) → (B, T, C), as CausalSelfAttention (cos/sin: RoPE angles of x's positions)."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, dk)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, dk)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, dk)
        if cos is not None:
            q, k = rotate_queries_keys(q, k, cos, sin, xpos_scale)
        frozen = cache is not None and not self.causal_gram and cache.deduced is not None
        deduced = cache.deduced if frozen else self.deduce(q, cache)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H_kv, S, dk), S = cached + T
            if not self.causal_gram:
                cache.deduced = deduced  # computed at prefill, reused by every later step
        # Q' = Q·G_LM: row vectors times the metric, per position. Then it is SDPA.
        q_metric = (q.float().unsqueeze(-2) @ deduced.G_LM).squeeze(-2).to(v.dtype)  # (B, H, T, 1, dk) → (B, H, T, dk)
        y = sdpa_attention(q_metric, k, v, dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, dk)
        if self.record:
            deduced.probs = attention_probs(q_metric, k)
            self.deduced = deduced
        if any(self.dag_weights.values()):
            self._dag_inputs = [deduced.A_LM, deduced.A_P, deduced.G_LM]
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C)
        return self.resid_dropout(self.out_proj(y))

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The weighted DAG terms of the last forward pass: weight · mean of h over batch,
        heads (and positions, for the causal Gram). Terms of weight 0 are not computed."""
        if self._dag_inputs is None:
            return {}
        return {name: weight * dag_loss(tensor).mean()
                for (name, weight), tensor in zip(self.dag_weights.items(), self._dag_inputs) if weight}


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax of q·kᵀ/√dk, (B, H, T, S): the probabilities SDPA used."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, H, S, dk)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    return scores.masked_fill(~causal_mask(q.size(2), k.size(2), q.device), float("-inf")).softmax(dim=-1)


# --- the DAG loss ------------------------------------------------------------------------------

def exp_small(X: torch.Tensor, terms: int = 10) -> torch.Tensor:
    """exp(X) for matrices X (..., d, d) with ‖X‖∞ ≤ 1/2: the Taylor series to X^terms/terms!,
    by Horner's rule. The first term left out is below 0.5¹¹/11! ≈ 1e-11. Only matmuls, so
    its backward pass is cheap (torch.linalg.matrix_exp's is several times slower on a CPU)."""
    eye = torch.eye(X.size(-1), dtype=X.dtype, device=X.device)
    Y = eye
    for k in range(terms, 0, -1):
        Y = eye + X @ Y / k  # I + X/k·(I + X/(k+1)·(...))
    return Y


def log_trace_expm(N: torch.Tensor) -> torch.Tensor:
    """log tr exp(N) for N (..., d, d) with entries ≥ 0, without ever forming exp(N):
    scaling and squaring in the log domain. Choose s with ‖N‖∞ / 2^s ≤ 1/2, take
    Y = exp(N / 2^s) (small, accurate); then square s times, dividing Y by its largest
    entry m each time and keeping log of the scale: α ← 2α + log m. At the end
    exp(N) = e^α · Y, so log tr exp(N) = α + log tr Y. Each matrix gets its own s."""
    with torch.no_grad():
        row_sums = N.abs().sum(dim=-1).amax(dim=-1)  # (...): ‖N‖∞
        squarings = torch.log2(row_sums / 0.5).ceil().clamp(min=0)  # (...)
    Y = exp_small(N / (2.0 ** squarings)[..., None, None])
    log_scale = torch.zeros_like(squarings)
    for step in range(int(squarings.max().item()) if N.numel() else 0):
        Z = Y @ Y
        top = Z.detach().amax(dim=(-2, -1))  # (...) m; log tr Z = log m + log tr(Z/m) for any m
        active = squarings > step  # matrices that still have squarings left
        Y = torch.where(active[..., None, None], Z / top[..., None, None], Y)
        log_scale = torch.where(active, 2 * log_scale + top.log(), log_scale)
    return log_scale + Y.diagonal(dim1=-2, dim2=-1).sum(-1).log()


def dag_loss(M: torch.Tensor) -> torch.Tensor:
    """h(M) = |log(tr(exp(M∘M)) / d)| for each matrix of M (..., d, d), in fp32: ≥ 0, and 0
    exactly when M∘M is the weighted adjacency matrix of a directed acyclic graph."""
    with torch.autocast(M.device.type, enabled=False):
        M = M.float()
        return (log_trace_expm(M * M) - math.log(M.size(-1))).abs()


def dag_loss_naive(M: torch.Tensor) -> torch.Tensor:
    """The same, straight from the definition: exp(M∘M) overflows once h passes ~88 in fp32."""
    M = M.float()
    trace = torch.linalg.matrix_exp(M * M).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (trace / M.size(-1)).log().abs()
