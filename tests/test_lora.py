"""LoRA (layers/lora.py): identity at init, merged == unmerged, only the adapters learn, the
first step's asymmetry, the α/r scale, dropout, the adapter state dict, folding into a plain
model, and the refusals."""

import pytest
import torch
import torch.nn as nn

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.layers.lora import LoRALinear, add_lora, lora_parameter_count, lora_state_dict, merge_lora
from lilllm.model import GPT

CONFIG = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, block_size=16, tie_embeddings=False)


def small_gpt(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**CONFIG, **changes})).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(seed))  # (B, T)


def randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    """A non-zero B, as training would leave it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def test_at_init_the_adapted_model_is_the_base_model_bit_for_bit():
    model = small_gpt()
    before, _ = model(ids())
    wrapped = add_lora(model, ("q_proj", "v_proj"))
    assert wrapped == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    after, _ = model(ids())
    assert torch.equal(before, after)


@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_merged_equals_unmerged_and_unmerge_restores_the_weight(block):
    model = small_gpt(block=block)
    add_lora(model, ("q_proj", "v_proj", "up"))
    randomize_adapters(model)
    layer = model.blocks[0].attn.q_proj
    w0 = layer.base.weight.clone()
    unmerged, _ = model(ids())
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()
    assert not torch.equal(layer.base.weight, w0)
    merged, _ = model(ids())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    with pytest.raises(LilllmError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    with pytest.raises(LilllmError, match="not merged"):
        layer.unmerge()


def test_training_mode_unmerges_a_merged_layer():
    layer = LoRALinear(nn.Linear(8, 4), rank=2, alpha=4)
    w0 = layer.base.weight.clone()
    nn.init.normal_(layer.lora_B)
    layer.eval().merge()
    layer.train()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_only_the_adapters_are_trainable_and_only_they_get_gradients():
    model = small_gpt()
    add_lora(model, ("q_proj", "v_proj"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{p}.lora_{m}" for i in range(2) for p in ("q_proj", "v_proj") for m in "AB"}
    randomize_adapters(model)
    _, loss = model.train()(ids(), ids(3))
    loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == ("lora_" in name), name


def test_the_trainable_count_is_r_times_d_in_plus_d_out():
    model = GPT(ModelConfig(vocab_size=64))  # the default table: d_model 128, 4 heads of 32, 2 KV heads, 4 layers
    add_lora(model, ("q_proj", "v_proj"), rank=8)
    assert lora_parameter_count(model) == sum(p.numel() for p in model.parameters() if p.requires_grad) == 14_336
    assert lora_parameter_count(model) == 4 * 8 * ((128 + 128) + (128 + 64))


def test_the_first_step_moves_only_b():
    model = small_gpt()
    add_lora(model, ("q_proj", "v_proj"))
    layer = model.blocks[0].attn.q_proj
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _, loss = model.train()(ids(), ids(3))
    loss.backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0  # ∂L/∂A = (α/r)·Bᵀ(∂L/∂h)xᵀ and B = 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    optimizer.step()
    assert torch.equal(layer.lora_A, a0) and not torch.equal(layer.lora_B, b0)


def test_doubling_alpha_doubles_the_change():
    base = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    changes = []
    for alpha in (4.0, 8.0):
        torch.manual_seed(0)
        layer = LoRALinear(base, rank=2, alpha=alpha)
        nn.init.normal_(layer.lora_B)
        changes.append(layer(x) - base(x))
        assert torch.equal(layer.delta_weight(), alpha / 2 * (layer.lora_B @ layer.lora_A))
    torch.testing.assert_close(changes[1], 2 * changes[0])


def test_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=4, dropout=0.5)
    x = torch.randn(5, 16)
    assert torch.equal(layer.train()(x), layer(x))  # B = 0: no LoRA path, so nothing to drop
    nn.init.normal_(layer.lora_B)
    assert not torch.equal(layer.train()(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    expected = layer.base(x) + x @ layer.delta_weight().T
    torch.testing.assert_close(layer(x), expected)


def test_the_adapter_state_dict_holds_only_the_adapters_and_reproduces_the_logits():
    model = small_gpt()
    add_lora(model, ("q_proj", "v_proj"))
    randomize_adapters(model)
    adapters = lora_state_dict(model)
    assert sorted(adapters) == sorted(f"blocks.{i}.attn.{p}.lora_{m}" for i in range(2) for p in ("q_proj", "v_proj")
                                      for m in "AB")
    fresh = small_gpt()  # the same base weights, new (untrained) adapters
    add_lora(fresh, ("q_proj", "v_proj"))
    missing, unexpected = fresh.load_state_dict(adapters, strict=False)
    assert not unexpected and all("lora_" not in name for name in missing)
    assert torch.equal(fresh(ids())[0], model(ids())[0])


def test_merge_lora_gives_back_the_plain_model_with_the_same_logits():
    model = small_gpt()
    add_lora(model, ("q_proj", "v_proj", "gate", "down"))
    randomize_adapters(model)
    adapted, _ = model(ids())
    assert merge_lora(model) == 8
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    plain = small_gpt(seed=5)
    plain.load_state_dict(model.state_dict())  # strict: exactly the plain architecture's names
    torch.testing.assert_close(plain(ids())[0], adapted, atol=1e-5, rtol=0)


def test_a_wrapped_layer_can_be_merged_before_folding():
    model = small_gpt()
    add_lora(model, "v_proj")
    randomize_adapters(model)
    adapted, _ = model(ids())
    model.blocks[0].attn.v_proj.merge()
    assert merge_lora(model) == 2  # the merged one is folded as it is, not merged twice
    torch.testing.assert_close(model(ids())[0], adapted, atol=1e-5, rtol=0)


def test_refusals():
    with pytest.raises(LilllmError, match=r"LoRA target\(s\) query: the model has no such linear layer; choose among "
                                          r"down, gate, head, k_proj, out_proj, q_proj, up, v_proj$"):
        add_lora(small_gpt(), ("q_proj", "query"))
    model = small_gpt()
    with pytest.raises(LilllmError, match="LoRA rank=0"):
        add_lora(model, "q_proj", rank=0)
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed
    with pytest.raises(LilllmError, match=r"head would also change tok_emb\.weight"):
        add_lora(small_gpt(tie_embeddings=True), ("head",))
    model = small_gpt()
    add_lora(model, "q_proj")
    with pytest.raises(LilllmError, match="already has LoRA layers"):
        add_lora(model, "v_proj")
    for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(alpha=float("nan")), dict(dropout=1.0)):
        with pytest.raises(LilllmError, match="LoRA"):
            LoRALinear(nn.Linear(4, 4), **{"rank": 2, "alpha": 2, **bad})


def test_a_fused_parallel_block_refuses_to_skip_lora_dropout():
    model = small_gpt(block="parallel")
    add_lora(model, "q_proj", dropout=0.1)
    model.train()
    with pytest.raises(LilllmError, match="skips its dropout"):
        model(ids())
    model.blocks[0].fuse = model.blocks[1].fuse = False
    model(ids())
