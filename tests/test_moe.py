"""Mixture of experts: the vectorised dispatch against a token-by-token reference, gate
normalisation, the balance loss's known values, the aux-loss-free bias (selection only, no
gradient, counts summed over accumulation and over processes), heterogeneous models,
active and total parameters, and the config's errors."""

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from lilllm.config import ConfigError, MoEConfig, ModelConfig
from lilllm.layers.moe import MoE, balance_loss, max_violation
from lilllm.model import GPT

D = 16


def make_moe(seed=0, d_model=D, **moe):
    torch.manual_seed(seed)
    layer = MoE(ModelConfig(vocab_size=32, d_model=d_model, n_heads=2, ffn="moe",
                            moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "expert_hidden": 8, **moe})))
    for param in layer.parameters():  # larger than the model's init, so routing is far from uniform
        torch.nn.init.normal_(param, std=0.5)
    return layer


def per_token_reference(layer: MoE, x):
    """The layer written the slow, obvious way: route each token alone, run its experts one by one."""
    B, T, C = x.shape
    rows = []
    for token in x.reshape(B * T, C):
        scores = layer.router(token)  # (E,)
        scores = scores.softmax(-1) if layer.config.router == "softmax" else scores.sigmoid()
        keys = (scores + layer.expert_bias).tolist()
        chosen = sorted(range(len(keys)), key=lambda e: -keys[e])[:layer.config.top_k]
        total = sum(scores[e] for e in chosen) if layer.config.renormalize else 1.0
        row = sum(scores[e] / total * layer.experts[e](token) for e in chosen)
        if layer.shared is not None:
            row = row + layer.shared(token)
        rows.append(row)
    return torch.stack(rows).reshape(B, T, C)


@pytest.mark.parametrize("moe", [
    {}, {"router": "sigmoid"}, {"renormalize": False}, {"n_shared": 2}, {"top_k": 1}, {"top_k": 4},
    {"router": "sigmoid", "balance": "aux_free"},
])
def test_dispatch_matches_the_per_token_reference_in_outputs_and_gradients(moe):
    layer = make_moe(**moe).double()  # float64: the two orders of summation agree to ~1e-15
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))  # routing with a bias too
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    inputs = [x, *layer.parameters()]
    grads = torch.autograd.grad(out.square().sum(), inputs)
    expected = per_token_reference(layer, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs, allow_unused=True)
    torch.testing.assert_close(out, expected)
    for tensor, grad, expected_grad in zip(inputs, grads, expected_grads):
        # an expert no token chose: zero gradient here, none at all in the reference
        torch.testing.assert_close(grad, torch.zeros_like(tensor) if expected_grad is None else expected_grad)


def test_renormalised_softmax_gates_equal_a_softmax_over_the_chosen_logits():
    layer = make_moe(n_experts=6, top_k=3)
    x = torch.randn(10, D)
    _, chosen, gates = layer.route(x)
    torch.testing.assert_close(gates, layer.router(x).gather(-1, chosen).softmax(-1))  # Mixtral's order
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))


def test_without_renormalisation_the_gates_are_the_raw_scores():
    layer = make_moe(renormalize=False)
    x = torch.randn(10, D)
    scores, chosen, gates = layer.route(x)
    torch.testing.assert_close(gates, scores.gather(-1, chosen))
    assert (gates.sum(-1) < 1).all()  # two of four softmax probabilities


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_with_a_uniform_router_the_aux_loss_is_its_weight(top_k):
    layer = make_moe(top_k=top_k, aux_loss_weight=0.01)
    with torch.no_grad():
        layer.router.weight.zero_()  # every expert scores 1/E
    layer.train()(torch.randn(3, 7, D))
    assert layer.auxiliary_losses()["moe_aux"].item() == pytest.approx(0.01)


def test_the_balance_loss_grows_with_concentration_and_reaches_the_number_of_experts():
    balanced = balance_loss(torch.full((8, 4), 0.25), torch.tensor([2.0, 2, 2, 2]))
    collapsed = balance_loss(torch.tensor([[1.0, 0, 0, 0]] * 8), torch.tensor([8.0, 0, 0, 0]))
    assert (balanced.item(), collapsed.item()) == (pytest.approx(1.0), pytest.approx(4.0))


def test_the_aux_loss_reaches_the_router_and_only_in_aux_loss_mode():
    layer = make_moe(balance="aux_loss").train()
    layer(torch.randn(2, 5, D))
    (grad,) = torch.autograd.grad(layer.auxiliary_losses()["moe_aux"], layer.router.weight)
    assert grad.abs().sum() > 0
    for balance in ("none", "aux_free"):
        layer = make_moe(balance=balance).train()
        layer(torch.randn(2, 5, D))
        assert layer.auxiliary_losses() == {}
    layer = make_moe(balance="aux_loss").eval()
    layer(torch.randn(2, 5, D))
    assert layer.auxiliary_losses() == {}  # evaluation scores the language model alone


def test_the_bias_is_a_buffer_that_gets_no_gradient():
    layer = make_moe(balance="aux_free").train()
    assert "expert_bias" in dict(layer.named_buffers()) and "expert_bias" in layer.state_dict()
    assert all(param is not layer.expert_bias for param in layer.parameters())
    layer(torch.randn(2, 5, D)).sum().backward()
    assert layer.expert_bias.grad is None and not layer.expert_bias.requires_grad


def test_the_bias_changes_which_experts_are_chosen_but_not_the_gate_values():
    layer = make_moe(balance="aux_free", renormalize=False)
    x = torch.randn(20, D)
    scores, chosen, gates = layer.route(x)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 10.0]))  # force experts 2 and 3
    biased_scores, biased_chosen, biased_gates = layer.route(x)
    assert not torch.equal(chosen.sort(-1).values, biased_chosen.sort(-1).values)
    assert (biased_chosen.sort(-1).values == torch.tensor([2, 3])).all()
    torch.testing.assert_close(biased_scores, scores)
    torch.testing.assert_close(biased_gates, scores.gather(-1, biased_chosen))  # the bias is not in the gates


def test_the_bias_moves_towards_underloaded_experts_once_per_step():
    layer = make_moe(balance="aux_free", bias_update_rate=0.01).train()
    with torch.no_grad():
        layer.router.weight[0] += 5.0 * layer.router.weight[1]  # load up expert 0 ...
    layer(torch.randn(4, 8, D))
    load = layer.pending_load.clone()
    layer.after_optimizer_step()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.expert_bias, expected)
    assert torch.equal(layer.last_load, load)
    assert layer.expert_bias[load.argmax()] < 0 < layer.expert_bias[load.argmin()]
    layer.after_optimizer_step()  # nothing routed since: the bias stays
    torch.testing.assert_close(layer.expert_bias, expected)


def test_counts_are_summed_over_gradient_accumulation_and_skip_evaluation():
    layer = make_moe(balance="aux_free", bias_update_rate=0.01).train()
    micro_batches = [torch.randn(2, 8, D) for _ in range(3)]
    loads = []
    for x in micro_batches:
        _, chosen, _ = layer.route(x.reshape(-1, D))
        loads.append(torch.bincount(chosen.flatten(), minlength=4).float())
        layer(x)
    layer.eval()(torch.randn(5, 8, D))  # an evaluation between micro-steps must not count
    layer.after_optimizer_step()
    total = sum(loads)
    assert torch.equal(layer.last_load, total) and total.sum() == 3 * 16 * 2
    torch.testing.assert_close(layer.expert_bias, 0.01 * torch.sign(total.mean() - total))
    assert layer.metrics() == {"maxvio": pytest.approx(max_violation(total))}


@pytest.mark.parametrize("balance", ["none", "aux_loss"])
def test_only_aux_free_moves_the_bias(balance):
    layer = make_moe(balance=balance).train()
    layer(torch.randn(2, 8, D))
    layer.after_optimizer_step()
    assert torch.equal(layer.expert_bias, torch.zeros(4)) and layer.last_load.sum() == 32


def test_max_violation():
    assert max_violation(torch.tensor([4.0, 4, 4, 4])) == 0.0
    assert max_violation(torch.tensor([10.0, 2, 2, 2])) == pytest.approx(1.5)  # (10 − 4) / 4
    assert make_moe().metrics() == {}  # before the first step


def _ddp_worker(rank, world_size, store_path, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=world_size)
    layer = make_moe(balance="aux_free", bias_update_rate=0.01).train()
    generator = torch.Generator().manual_seed(rank)  # each process routes different tokens
    for _ in range(3):
        layer(torch.randn(2, 8, D, generator=generator))
        local = layer.pending_load.clone()
        layer.after_optimizer_step()
    results[rank] = (layer.expert_bias.clone(), local, layer.last_load.clone())
    torch.distributed.destroy_process_group()


def test_under_ddp_the_bias_stays_identical_on_every_process(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), results), nprocs=2)
        (bias0, local0, load0), (bias1, local1, load1) = results[0], results[1]
    assert not torch.equal(local0, local1)  # the processes saw different loads ...
    torch.testing.assert_close(load0, local0 + local1)  # ... and both used their sum
    torch.testing.assert_close(load1, load0)
    assert torch.equal(bias0, bias1) and bias0.abs().sum() > 0


def test_a_heterogeneous_model_builds_and_trains_a_step():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, block_size=16, d_model=32, n_layers=3, n_heads=4, ffn="moe",
                         layers=[{"ffn": "swiglu"}, {}, {"ffn": "gelu"}],
                         moe={"n_experts": 4, "top_k": 1, "n_shared": 1, "balance": "aux_free"})
    model = GPT(config).train()
    assert [type(block.ffn).__name__ for block in model.blocks] == ["SwiGLU", "MoE", "GeluMLP"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 16))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    optimizer.step()
    for module in model.modules():
        if hasattr(module, "after_optimizer_step"):
            module.after_optimizer_step()
    moe = model.blocks[1].ffn
    assert moe.last_load.sum() == 4 * 15 and moe.expert_bias.abs().sum() > 0
    assert math.isfinite(model(ids[:, :-1], ids[:, 1:])[1].item())


def test_the_model_adds_the_mean_aux_loss_over_layers_and_logs_it():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, d_model=32, n_layers=3, n_heads=4, ffn="moe",
                            layers=[{}, {"ffn": "swiglu"}, {}], moe={"aux_loss_weight": 0.5})).train()
    ids = torch.randint(0, 64, (2, 16))
    logits, loss = model(ids, ids)
    cross_entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    terms = [block.ffn.aux_loss for block in model.blocks if isinstance(block.ffn, MoE)]
    assert len(terms) == 2 and min(t.item() for t in terms) >= 0.5 * (1 - 1e-6)  # ≥ α: f·P ≥ 1/E overall
    torch.testing.assert_close(loss, cross_entropy + (terms[0] + terms[1]) / 2)
    assert set(model.last_auxiliary) == {"moe_aux"} and not model.last_auxiliary["moe_aux"].requires_grad
    model.eval()
    logits, loss = model(ids, ids)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()))


def test_active_and_total_parameters_by_hand():
    d, E, k, h, layers = 128, 8, 2, 176, 4
    model = GPT(ModelConfig.preset("moe", vocab_size=2048))
    expert = 3 * d * h
    counts = model.parameter_counts()
    dense = GPT(ModelConfig.preset("default", vocab_size=2048)).parameter_counts()
    assert counts["ffn"] == layers * (d * E + E * expert)  # router + experts
    assert counts["total"] == dense["total"] - dense["ffn"] + counts["ffn"]
    assert model.active_parameter_count() == counts["total"] - layers * (E - k) * expert
    # two experts of half the dense width: the default's active weights plus the routers
    assert model.active_parameter_count() == dense["total"] + layers * d * E
    shared = make_moe(n_experts=4, top_k=1, n_shared=2, expert_hidden=8)
    assert shared.parameter_counts() == {"total": D * 4 + 4 * 3 * D * 8 + 3 * D * 16,
                                         "active": D * 4 + 3 * D * 8 + 3 * D * 16}
    assert GPT(ModelConfig(vocab_size=64, n_layers=2)).active_parameter_count() == \
        GPT(ModelConfig(vocab_size=64, n_layers=2)).parameter_counts()["total"]


def test_the_moe_config_round_trips_through_json():
    config = ModelConfig(vocab_size=50, n_layers=2, layers=[{"ffn": "swiglu"}, {"ffn": "moe"}],
                         moe=MoEConfig(n_experts=6, top_k=3, n_shared=1, router="sigmoid", balance="aux_free"))
    again = ModelConfig.from_json(config.to_json())
    assert again == config and isinstance(again.moe, MoEConfig)
    assert ModelConfig.preset("moe", vocab_size=50).moe == MoEConfig(expert_hidden=176)


@pytest.mark.parametrize("values, match", [
    ({"moe": {"n_experts": 4, "top_k": 5}}, "moe.top_k=5 is more than moe.n_experts=4"),
    ({"moe": {"n_experts": 0}}, "moe.n_experts must be a positive whole number"),
    ({"moe": {"top_k": 0}}, "moe.top_k must be a positive whole number"),
    ({"moe": {"n_shared": -1}}, r"moe.n_shared must be a whole number ≥ 0"),
    ({"moe": {"expert_hidden": 0}}, "moe.expert_hidden must be a positive whole number"),
    ({"moe": {"router": "relu"}}, "unknown moe.router kind 'relu': choose one of softmax, sigmoid"),
    ({"moe": {"balance": "capacity"}}, "unknown moe.balance kind 'capacity': choose one of none, aux_loss, aux_free"),
    ({"moe": {"aux_loss_weight": -0.1}}, "must be ≥ 0"),
    ({"moe": {"experts": 8}}, r"moe has unknown key\(s\) experts"),
    ({"moe": None}, 'an ffn of kind "moe" needs its settings'),
    ({"moe": None, "ffn": "swiglu", "layers": [{}, {"ffn": "moe"}]}, 'an ffn of kind "moe" needs its settings'),
    ({"moe": {}, "layers": [{}, {}, {}]}, "the per-layer list has length 3 but n_layers=2"),
])
def test_bad_moe_settings_are_rejected_with_a_message_naming_them(values, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({"vocab_size": 50, "n_layers": 2, "ffn": "moe", **values})


# --- training: the loop calls the step hook, logs the terms and MaxVio, reads MoE configs from JSON -----

SMALL_RUN = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=2", "--model.n_kv_heads=1",
             "--model.block_size=16", "--batch_size=4", "--grad_accum=2", "--warmup=1", "--log_interval=1",
             "--eval_interval=0", "--steps=3"]


@pytest.mark.parametrize("balance", ["none", "aux_loss", "aux_free"])
def test_training_an_moe_config_from_a_json_file(small_data, tmp_path, monkeypatch, balance):
    from lilllm.progress import read_metrics
    from lilllm.train import make_config, train

    moe = {"n_experts": 4, "top_k": 2, "balance": balance, "bias_update_rate": 0.01}
    path = tmp_path / "moe.json"
    path.write_text(json.dumps({"model": {"ffn": "moe", "layers": [{"ffn": "swiglu"}, {}], "moe": moe}}))
    calls = []
    step_hook = MoE.after_optimizer_step
    monkeypatch.setattr(MoE, "after_optimizer_step", lambda self: (calls.append(self), step_hook(self)))
    config = make_config("tiny", [f"--data_dir={small_data}", f"--out_dir={tmp_path / 'run'}", *SMALL_RUN], path)
    result = train(config, progress=False)
    layer = result.model.blocks[1].ffn
    assert calls == [layer] * 3  # once per optimizer step, not per micro-step
    assert layer.last_load.sum() == 2 * 4 * 16 * 2  # micro-steps × batch × block × top_k
    records = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert [sorted(k for k in r if "/" in k or "aux" in k) for r in records] == \
        [["maxvio/1"] + (["moe_aux"] if balance == "aux_loss" else [])] * 3
    if balance == "aux_loss":
        assert all(r["moe_aux"] >= 0.01 * (1 - 1e-6) for r in records)  # α·E·Σ f·P ≥ α
    if balance == "aux_free":
        assert 0 < layer.expert_bias.abs().max() <= 3 * 0.01 + 1e-6  # at most u per step
    else:
        assert not layer.expert_bias.any()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]["blocks.1.ffn.expert_bias"]
    assert torch.equal(saved, layer.expert_bias)  # the bias is part of the checkpoint


def test_moe_settings_from_the_command_line():
    from lilllm.train import make_config

    config = make_config("tiny", ["--model.ffn=moe", '--model.moe={"n_experts": 4, "top_k": 1}'])
    assert config.model_config(vocab_size=100).moe == MoEConfig(n_experts=4, top_k=1)
