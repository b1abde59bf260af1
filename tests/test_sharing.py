"""Shared blocks that diverge during training (progressive diverging, seed 004, fixed): the
layer-to-block map, a switch that leaves the logits unchanged, what trains after it, the
optimizer rebuilt over exactly the trainable parameters, and checkpoints that rebuild the stage (the runs that resume bit for bit: test_train.py)."""

import pytest
import torch

from lilllm.config import ConfigError, ModelConfig
from lilllm.layers.lora import LoRALinear
from lilllm.model import GPT
from lilllm.train import make_config, make_optimizer, train_step

# 4 layers that start as 1 block run 4 times, then 2 blocks twice each, then 4 blocks.
TINY = dict(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, n_layers=4, block_size=16)


def shared_model(**sharing) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**TINY, sharing={"repeats": 4, **sharing}))


def adapters(model: GPT) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def test_layers_map_onto_shared_blocks_and_each_switch_halves_the_repeats():
    model = shared_model()
    assert len(model.blocks) == 1 and model.layer_blocks() == [model.blocks[0]] * 4
    model.diverge()
    assert len(model.blocks) == 2 and model.layer_blocks() == [model.blocks[0]] * 2 + [model.blocks[1]] * 2
    model.diverge()
    assert model.layer_blocks() == list(model.blocks) and model.sharing_stage.item() == 2
    with pytest.raises(Exception, match="no \\(further\\) switch"):
        model.diverge()


def test_a_shared_blocks_gradient_is_the_sum_over_the_layers_that_run_it():
    model = shared_model()
    unshared = GPT(ModelConfig(**TINY))
    unshared.load_state_dict({name.replace("blocks.0.", f"blocks.{i}."): p for name, p in model.state_dict().items()
                              if name != "sharing_stage" for i in range(4)} | {
        name: p for name, p in model.state_dict().items() if not name.startswith("blocks.") and name != "sharing_stage"})
    ids = torch.randint(0, 50, (2, 16))
    for m in (model, unshared):
        m(ids, ids)[1].backward()
    for name, param in model.blocks[0].named_parameters():
        summed = sum(dict(unshared.blocks[i].named_parameters())[name].grad for i in range(4))
        torch.testing.assert_close(param.grad, summed, rtol=1e-5, atol=1e-7)


def test_each_switch_leaves_the_logits_unchanged_and_adds_adapters_that_start_at_zero():
    model = shared_model().eval()
    ids = torch.randint(0, 50, (2, 16))
    before = model(ids)[0]
    for _ in range(2):
        model.diverge()
        torch.testing.assert_close(model(ids)[0], before, rtol=0, atol=1e-6)
        assert len(adapters(model)) == 4 * len(model.blocks)  # q, k, v, out in every block
        assert all(torch.count_nonzero(a.lora_B) == 0 for a in adapters(model))
        with torch.no_grad():
            for a in adapters(model):  # make the next switch merge something
                a.lora_B.normal_(std=0.02)
        before = model(ids)[0]


def test_parameter_counts_per_stage():
    model, r, C, kv = shared_model(), 8, 32, 2 * 8  # 2 key/value heads of 8
    block = sum(p.numel() for p in model.blocks[0].parameters())
    rest = model.parameter_counts()["total"] - block
    lora = r * (C + C) + 2 * r * (C + kv) + r * (C + C)  # q, k and v, out
    model.diverge()
    assert model.parameter_counts()["total"] == rest + 2 * (block + lora)
    model.diverge()
    assert model.parameter_counts()["total"] == rest + 4 * (block + lora)  # the old adapter merged, a fresh one
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = 4 * (2 * C * C + 2 * C * kv)  # 4 blocks of frozen q, out (C x C) and k, v (C x kv) weights
    assert trainable == model.parameter_counts()["total"] - frozen


def test_after_a_switch_the_optimizer_holds_the_trainable_parameters_and_only_they_move():
    model = shared_model()
    model.advance(0.5)  # past 1/3: one switch
    assert model.sharing_stage.item() == 1
    config = make_config("tiny", ["--weight_decay=0.0"])
    optimizer = make_optimizer(model, config)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 50, (2, 16))
    train_step(model, optimizer, [(ids, ids)], 1e-2, config, step=0)
    after = dict(model.named_parameters())
    for name, p in after.items():
        moved = not torch.equal(p, before[name])
        if ".base." in name or name.endswith("lora_A"):  # frozen; A's first gradient is 0 while B = 0
            assert not moved, name
        elif name.endswith("lora_B") or ".ffn." in name:
            assert moved, name


def test_advance_changes_nothing_without_sharing_or_before_the_first_switch():
    assert not GPT(ModelConfig(**TINY)).advance(0.9)
    model = shared_model()
    assert not model.advance(0.2) and model.advance(0.4) and not model.advance(0.5) and model.advance(0.7)


@pytest.mark.parametrize("sharing, match", [
    ({"repeats": 8}, "does not divide n_layers"),
    ({"repeats": 2}, "cannot be halved"),
    ({"switches": [0.5, 0.2]}, "increasing fractions"),
    ({"lora_rank": 0}, "lora_rank"),
])
def test_bad_sharing_settings_are_named(sharing, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**TINY, sharing={"repeats": 4, **sharing})
    with pytest.raises(ConfigError, match="identical sequential blocks"):
        ModelConfig(**{**TINY, "ffn": "moe"}, moe={}, sharing={})
