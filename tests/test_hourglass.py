"""Seed 004's conv-attention model and the causal hourglass (lilllm/hourglass.py): the seed's
layout leaks every later token into every earlier position, the fixed one leaks nothing (by
perturbation and by gradient), the missing pre-shift leaks exactly within a bottom group,
shapes and parameter counts match the seed's table, and the shared training step runs it."""

import math

import numpy as np
import pytest
import torch

from lilllm import LilllmError
from lilllm.config import ConfigError
from lilllm.data import get_batch
from lilllm.hourglass import (CausalExpander, ConvAttentionLM, HourglassConfig, PositionMixingExpander,
                              earlier_logits_changed, lookahead_batch, visible_target_fraction)
from lilllm.train import evaluate, make_config, make_optimizer, train_step

VOCAB, T, WIDTH = 64, 256, 24  # the seed's levels, heads and groups at half its width
POSITIONS = [1, 3, 63, 64, 65, 200, T - 1]  # group starts and ends at every level, and the last position


def small_model(causal: bool) -> ConvAttentionLM:
    torch.manual_seed(0)
    return ConvAttentionLM(HourglassConfig(vocab_size=VOCAB, block_size=T, d_model=WIDTH, causal=causal)).eval()


@pytest.fixture(scope="module")
def causal_model():
    return small_model(causal=True)


@pytest.fixture(scope="module")
def seed_model():
    return small_model(causal=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


# --- causality ---------------------------------------------------------------------------------

@pytest.mark.parametrize("position", POSITIONS)
def test_the_causal_hourglass_keeps_earlier_logits_bit_identical(causal_model, ids, position):
    assert earlier_logits_changed(causal_model, ids, position) == 0


@pytest.mark.parametrize("position", POSITIONS)
def test_the_seeds_expanders_let_a_token_change_every_earlier_position(seed_model, ids, position):
    assert earlier_logits_changed(seed_model, ids, position) == position


@pytest.mark.parametrize("position", POSITIONS)
def test_without_the_pre_shift_a_token_leaks_to_the_start_of_its_bottom_group(ids, position):
    model = small_model(causal=True)
    for compressor in model.compressors:
        compressor.shift = 0
    changed = ids.clone()
    changed[:, position] = (ids[:, position] + 1) % VOCAB
    with torch.no_grad():
        differs = (model(ids)[0] != model(changed)[0])[:, :position].any(dim=2).any(dim=0)  # (position,)
    group = model.config.factor ** model.config.levels  # 64 tokens per bottom position
    assert differs.nonzero().flatten().tolist() == list(range(group * (position // group), position))
    assert earlier_logits_changed(model, ids, position) == position % group


def test_no_logit_has_a_gradient_from_a_later_embedding(ids):
    """d logits[:, t].sum() / d embedding[:, s] = 0 for every s > t: one backward pass, one
    copy of the input per t (the rows of a batch do not mix)."""
    model = small_model(causal=True)  # its own: the hook stays on it
    ts = [0, 3, 4, 63, 64, 100, 191, 192, T - 2]
    embedded = []

    def keep_gradient(module, inputs, output):  # the token embeddings; positions add to them, same gradient
        output.retain_grad()
        embedded.append(output)

    model.tok_emb.register_forward_hook(keep_gradient)
    logits, _ = model(ids[:1].expand(len(ts), T))  # (len(ts), T, V)
    torch.stack([logits[row, t].sum() for row, t in enumerate(ts)]).sum().backward()
    grad = embedded[0].grad  # (len(ts), T, C)
    for row, t in enumerate(ts):
        assert torch.all(grad[row, t + 1:] == 0), f"logits at {t} have a gradient from a later token"
        assert grad[row, t].abs().sum() > 0  # the position itself does count


def test_a_causal_model_reads_any_length_by_right_padding(causal_model, ids):
    with torch.no_grad():
        full, _ = causal_model(ids)  # (B, T, V)
        same_padded_length, _ = causal_model(ids[:, :200])  # padded to 256: the same shapes as the full input
        shorter, _ = causal_model(ids[:, :100])  # padded to 128
    assert same_padded_length.shape == (2, 200, VOCAB) and shorter.shape == (2, 100, VOCAB)
    assert torch.equal(same_padded_length, full[:, :200])
    torch.testing.assert_close(shorter, full[:, :100], rtol=0, atol=1e-5)  # other shapes, other kernels


def test_the_seeds_model_reads_exactly_block_size_tokens_and_both_refuse_bad_ids(causal_model, seed_model, ids):
    with pytest.raises(LilllmError, match="exactly block_size=256"):
        seed_model(ids[:, :100])
    with pytest.raises(LilllmError, match="1 to block_size=256"):
        causal_model(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(LilllmError, match="outside the model's vocabulary"):
        causal_model(torch.full((1, 8), VOCAB))


# --- the seed's shapes and sizes ---------------------------------------------------------------

# After each compressor and expander at the seed's size (spec §2.2's table): (length, width).
SEED_SHAPES = [(256, 96), (64, 192), (16, 384), (64, 192), (256, 96), (1024, 48)]


@pytest.mark.parametrize("causal", [False, True])
def test_shapes_after_each_compressor_and_expander_match_the_seeds_table(causal):
    model = ConvAttentionLM(HourglassConfig.seed(causal=causal, vocab_size=VOCAB)).eval()
    shapes = []
    for module in [*model.compressors, *model.expanders]:
        module.register_forward_hook(lambda m, inputs, output: shapes.append(tuple(output.shape)))
    with torch.no_grad():
        logits, _ = model(torch.zeros(1, 1024, dtype=torch.long))
    assert [shape[1:] for shape in shapes] == SEED_SHAPES
    assert logits.shape == (1, 1024, VOCAB)
    expander = CausalExpander if causal else PositionMixingExpander
    assert all(isinstance(module, expander) for module in model.expanders)


@pytest.mark.parametrize("causal, total, expanders", [(False, 9_244_080, 561_792), (True, 9_071_040, 388_752)])
def test_parameter_counts_at_the_seeds_size(causal, total, expanders):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = ConvAttentionLM(HourglassConfig.seed(causal=causal))
    counts = model.parameter_counts()
    assert counts["total"] == total == sum(p.numel() for p in model.parameters())  # the tied head once
    assert counts["expanders"] == expanders and counts["compressors"] == 388_416
    assert counts["embedding"] == 50257 * 48 and counts["positions"] == 1024 * 48


# --- data and training ---------------------------------------------------------------------------

def test_lookahead_batches_are_the_seeds_and_next_token_ones_are_get_batchs():
    tokens = np.arange(5000, dtype=np.uint16)
    x, y = lookahead_batch(tokens, 4, 1024, 64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 1024) and x.dtype == torch.int64
    assert torch.equal(y, x + 64) and torch.equal(y[:, :960], x[:, 64:])  # 960 targets are in the input
    ours = lookahead_batch(torch.from_numpy(tokens.astype(np.int64)), 3, 32, 1, torch.Generator().manual_seed(5))
    theirs = get_batch(tokens, 3, 32, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    with pytest.raises(LilllmError, match="too few"):
        lookahead_batch(tokens[:1000], 1, 1000, 1)


def test_visible_target_fraction():
    assert visible_target_fraction(1024, 64) == 960 / 1024 == 0.9375
    assert visible_target_fraction(256, 1) == 255 / 256
    assert visible_target_fraction(64, 100) == 0


@pytest.mark.parametrize("causal", [True, False])
def test_the_shared_training_step_and_evaluation_run_the_model(causal):
    torch.manual_seed(0)
    config = HourglassConfig(vocab_size=VOCAB, block_size=64, d_model=24, n_heads=3, levels=2, causal=causal,
                             lookahead=1 if causal else 16)
    model = ConvAttentionLM(config)
    train_config = make_config("tiny")
    optimizer = make_optimizer(model, train_config)
    tokens = np.random.default_rng(0).integers(VOCAB, size=2000).astype(np.uint16)
    batch = lookahead_batch(tokens, 4, config.block_size, config.lookahead, torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_step(model, optimizer, [batch, batch], 1e-3, train_config, step=0)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()))
    if causal:  # 1999 targets: 31 windows of 64, then a tail of 15 that the model pads
        scores = evaluate(model, tokens, n_bytes=2000, block_size=config.block_size, batch_size=8)
        assert math.isfinite(scores["val_bpb"]) and model.training


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"block_size": 100}, "multiple of factor\\*\\*levels=64"),
    ({"d_model": 50}, "does not divide d_model=50"),
    ({"factor": 1}, "does not shorten"),
    ({"levels": 0}, "levels must be a positive whole number"),
    ({"widen": True}, "widen must be a positive whole number"),
    ({"lookahead": 0}, "lookahead must be a positive whole number"),
    ({"causal": "yes"}, "causal must be True or False"),
])
def test_bad_configs_are_refused_with_the_reason(changes, message):
    with pytest.raises(ConfigError, match=message):
        HourglassConfig(vocab_size=VOCAB, **changes)


def test_the_seed_config_is_the_seeds_size_and_objective():
    faithful, causal = HourglassConfig.seed(), HourglassConfig.seed(causal=True)
    assert (faithful.block_size, faithful.d_model, faithful.vocab_size, faithful.lookahead) == (1024, 48, 50257, 64)
    assert causal.causal and causal.lookahead == 1 and faithful.n_blocks == 12
