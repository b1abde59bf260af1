"""Seed 004's "Convolution Attention" model, its causality leak, and a causal hourglass.

The seed (swortaljuju/lmsmall, conv_attention.py) shrinks the sequence and widens the
residual stream level by level, with attention at every level: 1024 tokens of width 48
become 256 of width 96, 64 of 192 and 16 of 384, then grow back. Two convolutions move
between levels:

- a compressor, LayerNorm → Conv1d(e → 2e, kernel 4, stride 4) over the sequence axis: each
  group of 4 tokens becomes one position, twice as wide;
- an expander, LayerNorm → Conv1d(in_channels=L, out_channels=4L, kernel 2, stride 2) applied
  to the (B, L, e) tensor *without a transpose*. Conv1d reads it as (batch, channels,
  length), so the channels are the sequence positions: each of the 4L new positions is a
  learned mix of all L old ones, later ones included.

That expander is a dense token-mixing matrix, like MLP-Mixer's, and it leaks: position 0's
logits depend on token 1023. The seed also trains on targets 64 tokens ahead (y[t] =
x[t + 64]), so 960 of its 1024 targets are tokens the model receives as input: its low loss
is mostly copying through the leak, not language modelling. The compressor leaks a little
too: group g reads tokens 4g..4g+3, so position 4g would see three later tokens even with an
honest expander.

The causal hourglass keeps the seed's levels and blocks and changes three things:

1. Shift right by factor - 1 before each compressor (Nawrot et al., "Hierarchical Transformers
   Are More Efficient Language Models", arXiv 2110.13711): coarse position g then reads
   tokens factor·g - factor + 1 .. factor·g, never a later one.
2. Expand with ConvTranspose1d(2e → e, kernel factor, stride factor) over the sequence axis:
   coarse position g feeds fine positions factor·g .. factor·g + factor - 1 only.
3. A U-Net skip around each level, h = skip + expand(u): without it, fine positions after
   factor·g would never see their own recent tokens (the coarse path stops at token factor·g).

`ConvAttentionLM(HourglassConfig(..., causal=False))` is the seed's model, layer for layer;
`causal=True` is the fix. `earlier_logits_changed` is the test that tells them apart.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.config import ConfigError, ModelConfig
from lilllm.layers.norm import LayerNorm
from lilllm.model import GPT, IGNORE_INDEX, INIT_STD, RESIDUAL_PROJECTIONS, Block

__all__ = ["HourglassConfig", "ConvAttentionLM", "Compressor", "PositionMixingExpander", "CausalExpander",
           "lookahead_batch", "earlier_logits_changed", "visible_target_fraction"]


@dataclass
class HourglassConfig:
    """The conv-attention model. The defaults are the seed's widths, heads and levels at a
    256-token context, causal, with next-token targets; `HourglassConfig.seed()` is the seed's
    own size and objective."""

    vocab_size: int  # from the tokenizer
    block_size: int = 256  # context length; a multiple of factor**levels
    d_model: int = 48  # width of the finest level; level l is d_model·widen**l wide
    n_heads: int = 6  # attention heads at every level (so the heads widen with the levels)
    levels: int = 3  # compressions on the way down (and expansions on the way up)
    factor: int = 4  # each level is factor times shorter
    widen: int = 2  # and widen times wider
    causal: bool = True  # False: the seed's leaking layout; True: the shifted, skip-connected hourglass
    lookahead: int = 1  # which target each position learns, x[t + lookahead]: the seed's model uses 64

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "d_model", "n_heads", "levels", "factor", "widen", "lookahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.causal, bool):
            raise ConfigError(f"causal must be True or False, got {self.causal!r}")
        if self.factor < 2:
            raise ConfigError(f"factor={self.factor} does not shorten the sequence: use 2 or more")
        if self.block_size % self.factor ** self.levels:
            raise ConfigError(f"block_size={self.block_size} must be a multiple of factor**levels="
                              f"{self.factor ** self.levels}, so that every level has whole groups")
        if self.d_model % self.n_heads:
            raise ConfigError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}: every level's width "
                              "must split into whole heads")

    @classmethod
    def seed(cls, causal: bool = False, vocab_size: int = 50257) -> "HourglassConfig":
        """The seed's size: 1024 tokens, widths 48 to 384, GPT-2's vocabulary; the faithful model
        learns targets 64 tokens ahead, as the seed's data loader gives them, the causal one the next token."""
        return cls(vocab_size=vocab_size, block_size=1024, causal=causal, lookahead=1 if causal else 64)

    @property
    def n_blocks(self) -> int:
        """One block at each end, two after every compressor and every other expander: 12 at 3 levels."""
        return 4 * self.levels


def block_config(config: HourglassConfig, width: int, length: int) -> ModelConfig:
    """GPT-2's decoder block (LayerNorm with bias, multi-head attention, GELU MLP of 4·width)
    at one level's width and length, as the seed's AttentionMlpBlock."""
    return ModelConfig.preset("gpt2", vocab_size=config.vocab_size, block_size=length, d_model=width,
                              n_heads=config.n_heads, n_layers=config.n_blocks)


class Compressor(nn.Module):
    """(B, L, e) → (B, L/factor, widen·e): each group of `factor` positions becomes one position.
    With shift = factor - 1 the rows first move that many places later, so group g reads tokens
    factor·g - factor + 1 .. factor·g: none after factor·g, the first fine position it feeds."""

    def __init__(self, width: int, factor: int, widen: int, shift: int):
        super().__init__()
        self.norm = LayerNorm(width)
        self.conv = nn.Conv1d(width, widen * width, kernel_size=factor, stride=factor)
        self.shift = shift

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)  # (B, L, e)
        if self.shift:  # shift zero rows in at the start; the last `shift` rows fall off the end
            x = F.pad(x, (0, 0, self.shift, -self.shift))  # (B, L, e)
        x = self.conv(x.transpose(1, 2))  # (B, e, L) → (B, widen·e, L/factor): the conv slides over positions
        return x.transpose(1, 2)  # (B, L/factor, widen·e)


class PositionMixingExpander(nn.Module):
    """The seed's expander, (B, L, e) → (B, factor·L, e/widen), which leaks the future: the conv
    is applied without a transpose, so its channels are the L positions and every new position
    is a weighted sum over all of them. It also fixes the model to one length, L."""

    def __init__(self, length: int, width: int, factor: int, widen: int):
        super().__init__()
        self.norm = LayerNorm(width)
        self.conv = nn.Conv1d(length, factor * length, kernel_size=widen, stride=widen)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Conv1d reads (B, L, e) as (batch, channels = L positions, length = e features)
        return self.conv(self.norm(h))  # (B, factor·L, e/widen)


class CausalExpander(nn.Module):
    """(B, L, e) → (B, factor·L, e/widen) over the sequence axis: coarse position g writes fine
    positions factor·g .. factor·g + factor - 1 and nothing else (kernel = stride = factor)."""

    def __init__(self, width: int, factor: int, widen: int):
        super().__init__()
        self.norm = LayerNorm(width)
        self.conv = nn.ConvTranspose1d(width, width // widen, kernel_size=factor, stride=factor)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.norm(h).transpose(1, 2))  # (B, e, L) → (B, e/widen, factor·L)
        return x.transpose(1, 2)  # (B, factor·L, e/widen)


class ConvAttentionLM(nn.Module):
    """Token and learned position embeddings; Block(e0); per level down a compressor and two
    blocks; per level up an expander and two blocks (one at the finest level); a final norm and
    the tied head. No skips in the seed's layout; the causal one adds each level's input back
    after its expander."""

    def __init__(self, config: HourglassConfig):
        super().__init__()
        self.config = config
        c = config
        widths = [c.d_model * c.widen ** level for level in range(c.levels + 1)]  # 48, 96, 192, 384
        lengths = [c.block_size // c.factor ** level for level in range(c.levels + 1)]  # 256, 64, 16, 4
        indices = iter(range(c.n_blocks))  # each block's index, in the order the forward pass runs them

        def blocks(level: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(block_config(c, widths[level], lengths[level]), next(indices)) for _ in range(n))

        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model)
        self.entry = blocks(0, 1)
        shift = c.factor - 1 if c.causal else 0
        self.compressors = nn.ModuleList(Compressor(widths[level], c.factor, c.widen, shift)
                                         for level in range(c.levels))
        self.down_blocks = nn.ModuleList(blocks(level + 1, 2) for level in range(c.levels))
        up_levels = list(reversed(range(c.levels)))  # the way up starts at the bottom
        self.expanders = nn.ModuleList(
            CausalExpander(widths[level + 1], c.factor, c.widen) if c.causal
            else PositionMixingExpander(lengths[level + 1], widths[level + 1], c.factor, c.widen)
            for level in up_levels)
        self.up_blocks = nn.ModuleList(blocks(level, 2 if level else 1) for level in up_levels)
        self.norm = LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied, as the seed's wte and lm_head
        self.last_auxiliary: dict[str, torch.Tensor] = {}  # no auxiliary losses: train_step reads this
        # GPT-2's init for linear layers and embeddings (the convolutions keep PyTorch's, as
        # in the seed), the residual projections scaled down by the depth, 2·12 at 3 levels
        self.apply(GPT._init_weights)
        residual_std = INIT_STD / math.sqrt(2 * c.n_blocks)
        for name, param in self.named_parameters():
            if name.endswith(tuple(f"{proj}.weight" for proj in RESIDUAL_PROJECTIONS)):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def forward(self, ids: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, T) → logits (B, T, vocab_size), and the mean cross-entropy over targets (B, T)
        when given (-100 is not scored). The seed's model reads exactly block_size tokens; the
        causal one any T ≤ block_size, right-padded inside to whole groups."""
        c = self.config
        T = ids.size(1)
        if not c.causal and T != c.block_size:
            raise LilllmError(f"the seed's conv-attention model reads exactly block_size={c.block_size} tokens "
                              f"(its expanders' channels are the positions), got {T}: pad or crop the input")
        if not 0 < T <= c.block_size:
            raise LilllmError(f"got {T} tokens, but the model reads 1 to block_size={c.block_size}: crop the input")
        if not 0 <= ids.min().item() <= ids.max().item() < c.vocab_size:
            raise LilllmError(f"a token id is outside the model's vocabulary (0 to {c.vocab_size - 1}): "
                              "encode the text with the tokenizer the model was trained with")
        # Right padding to whole groups at every level: later positions cannot change earlier
        # ones in a causal model, so the pad's value does not matter.
        padded = ids if T % c.factor ** c.levels == 0 else F.pad(ids, (0, -T % c.factor ** c.levels))  # (B, T')
        h = self.tok_emb(padded) + self.pos_emb(torch.arange(padded.size(1), device=ids.device))  # (B, T', C0)
        h = self.run(self.entry, h)
        skips = []  # each level's input to its compressor; only the causal layout adds them back
        for compress, blocks in zip(self.compressors, self.down_blocks):
            skips.append(h)
            h = self.run(blocks, compress(h))  # (B, L, e) → (B, L/factor, widen·e)
        for expand, blocks, skip in zip(self.expanders, self.up_blocks, reversed(skips)):
            h = expand(h)  # (B, L, e) → (B, factor·L, e/widen)
            if c.causal:  # U-Net skip: the coarse path stops at token factor·g, the skip brings the rest
                h = skip + h
            h = self.run(blocks, h)
        logits = self.head(self.norm(h))[:, :T]  # (B, T, vocab_size): the padded positions dropped
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @staticmethod
    def run(blocks: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
        for block in blocks:  # learned positions were added at the input: no rotary angles
            h = block(h)  # (B, L, e)
        return h

    def after_optimizer_step(self) -> None:
        """Nothing to update beyond the optimizer's step (train_step calls this hook)."""

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters by component; the tied head counts once, under embedding."""
        def count(modules) -> int:
            return sum(p.numel() for module in modules for p in module.parameters())
        counts = {"embedding": self.tok_emb.weight.numel(), "positions": self.pos_emb.weight.numel(),
                  "blocks": count(m for m in self.modules() if isinstance(m, Block)),
                  "compressors": count(self.compressors), "expanders": count(self.expanders),
                  "norms": count([self.norm])}
        counts["total"] = sum(counts.values())
        return counts


def lookahead_batch(tokens, batch_size: int, block_size: int, lookahead: int, generator: torch.Generator | None = None,
                    device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's batches: `batch_size` random windows x of `block_size` tokens of the 1-D stream
    `tokens` (numpy or torch), and y[b, t] = the token `lookahead` places after x[b, t]. With
    lookahead=1 this is lilllm.data.get_batch, window for window. Both (B, T) int64."""
    span = block_size + lookahead  # tokens one window reads, its targets included
    if len(tokens) < span:
        raise LilllmError(f"the token stream has {len(tokens):,} tokens, too few for windows of {block_size} "
                          f"+ {lookahead}: use a smaller block size or more text")
    starts = torch.randint(len(tokens) - span + 1, (batch_size,), generator=generator).tolist()
    windows = np.stack([np.asarray(tokens[i:i + span]) for i in starts]).astype(np.int64)  # (B, T + lookahead)
    windows = torch.from_numpy(windows)
    x, y = windows[:, :block_size], windows[:, lookahead:]  # (B, T) each
    return x.to(device), y.to(device)


@torch.no_grad()
def earlier_logits_changed(model: nn.Module, ids: torch.Tensor, position: int) -> int:
    """Change the token at `position` of ids (B, T) to another id and count the positions
    t < position whose logits change at all (exact comparison, in eval mode). A causal model
    gives 0; the seed's gives `position`."""
    changed_ids = ids.clone()
    changed_ids[:, position] = (ids[:, position] + 1) % model.config.vocab_size
    was_training = model.training
    model.eval()
    before, _ = model(ids)  # (B, T, V)
    after, _ = model(changed_ids)
    model.train(was_training)
    differs = (before[:, :position] != after[:, :position]).any(dim=2).any(dim=0)  # (position,): any row, any logit
    return int(differs.sum().item())


def visible_target_fraction(block_size: int, lookahead: int) -> float:
    """The share of targets x[t + lookahead] that lie inside the input window itself: tokens
    a model that sees its whole window can copy. The seed: (1024 - 64) / 1024 = 0.9375."""
    return max(block_size - lookahead, 0) / block_size
