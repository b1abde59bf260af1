"""Power Law Graph Attention: SDPA as the special case G_LM = I, positivity, the DAG loss
(exact values, the log-domain method against the naive one), gradients, the reference's
parameter counts, the full Gram's causality leak, the caches, sequential scoring."""

import math

import pytest
import torch

from lilllm.config import ConfigError, ModelConfig, PLGAConfig
from lilllm.layers.attention import CausalSelfAttention
from lilllm.layers.plga import PLGAttention, PLGACache, dag_loss, dag_loss_naive, log_trace_expm
from lilllm.model import GPT, deductive_outputs, one_pass_nats, sequential_nats

TINY = dict(vocab_size=64, block_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=None, bias=True,
            attention="plga", norm="layernorm", norm_placement="post")
SMALL_LEARNER = {"a_dff": 16, "n_units": 2, "n_glu": 2}


def tiny_model(seed=0, gram="full", **overrides):
    """A small PLDR model. At initialisation P ≈ 0, so A_P ≈ all-ones and G_LM barely
    depends on the input, and the head's small weights squash the logits; larger W, P, a
    and head weights make the metric (and its leak) easy to see."""
    torch.manual_seed(seed)
    plga = {**SMALL_LEARNER, "gram": gram, **overrides.pop("plga", {})}
    model = GPT(ModelConfig(**{**TINY, "plga": plga, **overrides})).eval()
    for layer in model.modules():
        if isinstance(layer, PLGAttention):
            with torch.no_grad():
                for tensor in (layer.W, layer.P, layer.a):
                    tensor.normal_(0, 0.5)
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    return model


def test_identity_metric_gives_back_sdpa_with_the_same_projections():
    config = ModelConfig(**{**TINY, "plga": SMALL_LEARNER})
    torch.manual_seed(0)
    plga, sdpa = PLGAttention(config), CausalSelfAttention(config)
    sdpa.load_state_dict({k: v for k, v in plga.state_dict().items() if k.split(".")[0].endswith("proj")})
    with torch.no_grad():  # G_LM = a·A_P + b_a = I
        plga.a.zero_()
        plga.b_a.copy_(torch.eye(config.head_dim).expand_as(plga.b_a))
    from lilllm.layers.rope import rope_angles
    cos, sin = rope_angles(config.head_dim, 10)
    x = torch.randn(2, 10, config.d_model)
    torch.testing.assert_close(plga(x, cos, sin), sdpa(x, cos, sin))


@pytest.mark.parametrize("gram", ["full", "causal"])
def test_the_metric_is_positive_and_the_shapes_follow_the_gram(gram):
    model = tiny_model(gram=gram)
    ids = torch.randint(0, 64, (3, 12))
    outputs = deductive_outputs(model, ids)
    assert len(outputs) == 2
    T = 1 if gram == "full" else 12
    for out in outputs:
        for tensor in (out.A, out.A_LM, out.A_P, out.G_LM):
            assert tensor.shape == (3, 4, T, 8, 8)
        assert (out.A_LM > 0).all() and (out.A_P > 0).all()
        assert out.probs.shape == (3, 4, 12, 12)
        torch.testing.assert_close(out.probs.sum(-1), torch.ones(3, 4, 12))
        assert (out.probs.triu(diagonal=1) == 0).all()  # causal over keys


def test_deductive_outputs_are_none_for_softmax_layers():
    model = tiny_model(layers=[{"attention": "softmax"}, {}])
    outputs = deductive_outputs(model, torch.randint(0, 64, (1, 5)))
    assert outputs[0] is None and outputs[1] is not None


def test_dag_of_a_strictly_upper_triangular_matrix_is_zero():
    M = torch.randn(5, 16, 16).triu(diagonal=1) * 3
    torch.testing.assert_close(dag_loss(M), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("c", [0.0, 0.5, 2.0, 30.0])
def test_dag_of_c_times_identity_is_c_squared(c):
    torch.testing.assert_close(dag_loss(c * torch.eye(8)), torch.tensor(c * c), rtol=1e-4, atol=1e-5)  # fp32 squarings


def test_the_log_domain_dag_matches_the_naive_one_where_that_is_finite():
    torch.manual_seed(0)
    M = torch.randn(6, 16, 16, dtype=torch.float64) * torch.tensor([0.01, 0.1, 0.3, 0.5, 1.0, 1.5]).view(6, 1, 1).double()
    naive = _naive64(M)
    assert torch.isfinite(naive).all()
    torch.testing.assert_close(dag_loss(M.float()).double(), naive, rtol=1e-4, atol=1e-5)


def _naive64(M):
    trace = torch.linalg.matrix_exp(M * M).diagonal(dim1=-2, dim2=-1).sum(-1)
    return (trace / M.size(-1)).log().abs()


def test_the_log_domain_dag_stays_finite_where_the_naive_one_overflows():
    torch.manual_seed(0)
    M = torch.rand(3, 32, 32) * torch.tensor([3.0, 10.0, 40.0]).view(3, 1, 1)  # all-positive: Perron root ≫ 88
    assert torch.isinf(dag_loss_naive(M)).all()
    assert torch.isinf(_naive64(M.double())[1:]).all()  # fp64 overflows too
    values = dag_loss(M)
    assert torch.isfinite(values).all() and (values > 88).all()
    # exact against the eigenvalues (M∘M is symmetric here, so they are real): log Σ e^λ − log d
    N = (M * M).double()
    N = (N + N.transpose(-2, -1)) / 2
    eig = torch.linalg.eigvalsh(N)
    expected = torch.logsumexp(eig, dim=-1) - math.log(32)
    torch.testing.assert_close(dag_loss(N.sqrt().float()).double(), expected, rtol=1e-4, atol=1e-3)


def test_log_trace_expm_gives_each_matrix_its_own_number_of_squarings():
    small, large = 0.01 * torch.eye(4), 50.0 * torch.eye(4)
    batched = log_trace_expm(torch.stack([small, large]))
    torch.testing.assert_close(batched, torch.stack([log_trace_expm(small), log_trace_expm(large)]), rtol=1e-4, atol=0)
    torch.testing.assert_close(batched, torch.tensor([0.01 + math.log(4), 50.0 + math.log(4)]), rtol=1e-4, atol=1e-6)


def test_gradients_reach_every_plga_tensor_through_the_loss_and_the_dag_terms():
    model = tiny_model(plga={"dag_alm": 0.001, "dag_ap": 0.005, "dag_glm": 0.005}).train()
    ids = torch.randint(0, 64, (2, 12))
    _, loss = model(ids, ids)
    assert set(model.last_auxiliary) == {"dag_alm", "dag_ap", "dag_glm"}
    loss.backward()
    for name in ("W", "b", "P", "a", "b_a"):
        grad = getattr(model.blocks[0].attn, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_the_dag_terms_are_added_to_the_loss_with_their_weights():
    model = tiny_model(plga={"dag_ap": 0.01})
    ids = torch.randint(0, 64, (2, 12))
    logits, loss = model(ids, ids)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    assert set(model.last_auxiliary) == {"dag_ap"}
    A_P = [out.A_P for out in deductive_outputs(model, ids)]
    expected = 0.01 * torch.stack([dag_loss(a).mean() for a in A_P]).mean()  # averaged over layers
    torch.testing.assert_close(loss, ce + expected)
    unweighted = tiny_model()
    unweighted(ids, ids)
    assert unweighted.last_auxiliary == {}


@pytest.mark.parametrize("name, total, learner, plga_tensors", [
    ("pldr-v500", 109.7e6, 529_856, 5 * 14 * 64 * 64),
    ("pldr-v900", 118.3e6, 1_640_848, 5 * 17 * 64 * 64),
])
def test_the_reference_presets_have_the_reference_parameter_counts(name, total, learner, plga_tensors):
    with torch.device("meta"):
        model = GPT(ModelConfig.preset(name, vocab_size=32_000))
    assert abs(model.parameter_counts()["total"] - total) < 0.05e6
    layer = model.blocks[0].attn
    assert sum(p.numel() for p in layer.learner.parameters()) == learner
    assert sum(getattr(layer, n).numel() for n in ("W", "b", "P", "a", "b_a")) == plga_tensors


@pytest.mark.parametrize("gram, leaks", [("full", True), ("causal", False)])
def test_the_full_gram_leaks_the_future_and_the_causal_one_does_not(gram, leaks):
    model = tiny_model(gram=gram)
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 64  # only the last token differs
    with torch.no_grad():
        before, after = model(ids)[0][0, :-1], model(changed)[0][0, :-1]  # every earlier position
    difference = (before - after).abs().max().item()
    assert (difference > 1e-4) if leaks else (difference < 1e-5)


def test_the_softmax_model_does_not_leak():
    model = tiny_model(attention="softmax")
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0][0, :-1], model(changed)[0][0, :-1])


def test_the_causal_gram_cache_gives_the_uncached_logits():
    model = tiny_model(gram="causal")
    ids = torch.randint(0, 64, (2, 12))
    cache = model.new_cache()
    assert all(isinstance(layer, PLGACache) for layer in cache.layers)
    with torch.no_grad():
        full = model(ids)[0]
        steps = [model(ids[:, :5], cache=cache)[0]] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_the_full_gram_cache_freezes_the_prompts_metric_as_the_reference_does():
    model = tiny_model(gram="full")
    ids = torch.randint(0, 64, (2, 12))
    cache = model.new_cache()
    with torch.no_grad():
        prefill = model(ids[:, :5], cache=cache)[0]
        torch.testing.assert_close(prefill, model(ids[:, :5])[0])
        frozen = [layer.deduced for layer in cache.layers]
        steps = [prefill] + [model(ids[:, t:t + 1], cache=cache)[0] for t in range(5, 12)]
        assert all(layer.deduced is f for layer, f in zip(cache.layers, frozen))
        # = one uncached pass in which every layer uses the prompt's metric
        for block, deduced in zip(model.blocks, frozen):
            block.attn.deduce = lambda q, cache=None, deduced=deduced: deduced
        torch.testing.assert_close(torch.cat(steps, dim=1), model(ids)[0], rtol=1e-4, atol=1e-5)
        del model.blocks[0].attn.deduce, model.blocks[1].attn.deduce
        assert not torch.allclose(torch.cat(steps, dim=1), model(ids)[0], atol=1e-4)  # recomputation differs


def test_sequential_scoring_equals_one_pass_for_a_causal_model_only():
    windows = torch.randint(0, 64, (3, 11))
    causal, full = tiny_model(gram="causal"), tiny_model(gram="full")
    assert sequential_nats(causal, windows) == pytest.approx(one_pass_nats(causal, windows), rel=1e-5)
    assert sequential_nats(full, windows) != pytest.approx(one_pass_nats(full, windows), rel=1e-5)


def test_post_norm_blocks_normalise_their_output_and_the_input():
    model = tiny_model()
    assert model.config.norm_placement == "post"
    outputs = []
    model.blocks[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 7)))
    x = outputs[0]  # LayerNorm at its initial gain 1 and bias 0: mean 0, variance 1 per position
    torch.testing.assert_close(x.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)


def test_plga_config_round_trips_and_is_checked():
    config = ModelConfig.preset("pldr-tiny", vocab_size=100)
    assert isinstance(config.plga, PLGAConfig) and config.plga.dag_ap == 0.005
    assert ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match='kind "plga" needs its settings'):
        ModelConfig(vocab_size=10, attention="plga")
    with pytest.raises(ConfigError, match='kind "plga" needs its settings'):
        ModelConfig(vocab_size=10, n_layers=2, layers=[{}, {"attention": "plga"}])
    with pytest.raises(ConfigError, match="unknown plga.gram kind"):
        PLGAConfig(gram="prefix")
    with pytest.raises(ConfigError, match="plga.dag_ap=-1"):
        PLGAConfig(dag_ap=-1)
    with pytest.raises(ConfigError, match="plga.n_units must be a positive"):
        PLGAConfig(n_units=0)
    with pytest.raises(ConfigError, match="plga.a_dff_depth must be a positive"):
        PLGAConfig(a_dff_depth=0)
    with pytest.raises(ConfigError, match="plga has unknown key"):
        ModelConfig(vocab_size=10, attention="plga", plga={"dff": 3})
    with pytest.raises(ConfigError, match="unknown norm_placement kind"):
        ModelConfig(vocab_size=10, norm_placement="sandwich")
