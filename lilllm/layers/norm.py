"""Normalisation layers: LayerNorm (Ba et al., arXiv 1607.06450) and RMSNorm (Zhang &
Sennrich, arXiv 1910.07467), written out so every step is visible.

Both normalise each vector over its last dimension (the model width C) and then scale
it by a learned per-channel `weight`. LayerNorm also subtracts the mean and adds a
learned `bias`; RMSNorm drops both and only divides by the root mean square.

Both compute in fp32 and cast the result back to the input's dtype: in fp16, x² overflows
for any activation above 256 (fp16 stops at 65504) and the output becomes zeros or NaN;
in bf16 every intermediate (x², the mean, the reciprocal) is rounded to 8 significant
bits. In fp32 the result is rounded once, at the end, for the price of a few casts.
"""

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) * weight, over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (..., C), fp32 for the sum of squares (see the module docstring)
        rms_inv = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return (x32 * rms_inv * self.weight.float()).to(x.dtype)


class LayerNorm(nn.Module):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dimension.
    The variance is the biased one (divide by C), as in `torch.nn.LayerNorm`."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # (..., C)
        centred = x32 - x32.mean(dim=-1, keepdim=True)  # (..., C)
        std_inv = torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        y = centred * std_inv * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


# The config names a norm by one of these keys: NORMS[config.norm](dim, eps=...).
NORMS = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
