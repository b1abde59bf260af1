"""Feed-forward networks: the position-wise MLP of every decoder block.

- `GeluMLP`: widen to 4·d, GELU (Hendrycks & Gimpel, arXiv 1606.08415), back to d. The
  exact GELU, x·Φ(x); `GeluTanhMLP` uses the paper's tanh approximation, which GPT-2 itself was
  trained with (Hugging Face calls it "gelu_new"), so its weights compute the same here.
  `ReluSquaredMLP` is the same two matrices with ReLU(x)², the activation that So et al.'s
  search found (Primer, arXiv 2109.08668) and today's speedruns use.
- `SwiGLU`, Llama's (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202):
  a SiLU-activated gate multiplies a second up-projection elementwise. It has three
  matrices instead of two, so its hidden width is 2/3 of 4·d to keep the parameter count
  about the same.

Both read the config the same way, so the model builds either with `FFNS[kind](config)`
(model.py). Each runs in two halves, the input projections and `from_projections`, so a
parallel block can compute its input projections together with attention's.
The last projection of each is named `down`: it writes into the residual stream, and the
model gives it a smaller initialisation (see model.py).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm.config import ModelConfig
from lilllm.layers.sublayer import Sublayer

SWIGLU_MULTIPLE = 32  # round SwiGLU's hidden width up to a multiple of this (friendlier matmul shapes)


def gelu_hidden(d_model: int) -> int:
    """GPT-2's rule: the hidden layer is four times the width."""
    return 4 * d_model


def swiglu_hidden(d_model: int, multiple: int = SWIGLU_MULTIPLE) -> int:
    """2/3 of 4·d, rounded up to a multiple of `multiple`: 3 matrices of d × (8d/3) hold
    as many weights as GELU's 2 matrices of d × 4d."""
    return multiple * math.ceil(2 * 4 * d_model / 3 / multiple)


class GeluMLP(Sublayer):
    approximate = "none"  # F.gelu's: the exact GELU

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_hidden or gelu_hidden(config.d_model)
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def input_projections(self) -> list[nn.Linear]:
        return [self.up]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_projections(self.up(x))  # (B, T, C) → (B, T, H) → (B, T, C)

    def activation(self, up: torch.Tensor) -> torch.Tensor:
        return F.gelu(up, approximate=self.approximate)

    def from_projections(self, up: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(up)))  # (B, T, H) → (B, T, C)


class GeluTanhMLP(GeluMLP):
    approximate = "tanh"  # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): GPT-2's


class ReluSquaredMLP(GeluMLP):
    def activation(self, up: torch.Tensor) -> torch.Tensor:
        return F.relu(up).square()  # 0 for x < 0, x² above: sparse, and no exp to compute


class SwiGLU(Sublayer):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_hidden or swiglu_hidden(config.d_model)
        self.gate = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def input_projections(self) -> list[nn.Linear]:
        return [self.gate, self.up]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_projections(self.gate(x), self.up(x))  # (B, T, C) → two (B, T, H) → (B, T, C)

    def from_projections(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        # the gate decides, per hidden unit, how much of `up` passes
        return self.dropout(self.down(F.silu(gate) * up))  # (B, T, H) → (B, T, C)

