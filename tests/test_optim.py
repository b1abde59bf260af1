"""StableAdamW against torch's AdamW: equal when nothing is cut, the update divided by rms
when a gradient spikes, lr·sign(g) on the first step, and an exact resume from a state_dict.
Muon: torch's step against one written from its definition, the split of the model's
parameters between Muon and AdamW, and `Optimizers` stepping and resuming them as one."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from lilllm.config import ModelConfig
from lilllm.model import GPT
from lilllm.optim import Muon, Optimizers, StableAdamW, newton_schulz, newton_schulz_flops
from lilllm.train import TrainConfig, make_optimizer

BETAS, EPS = (0.9, 0.99), 1e-8


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Matrices decayed, vectors not, as lilllm.train.make_optimizer does."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh batch per step, the same for every model that asks for the same step."""
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def backward(model: nn.Module, step: int) -> None:
    x, y = batch(step)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def rms_of_next_step(optimizer: StableAdamW, p: torch.Tensor) -> float:
    """The rms the next step will compute for p, worked out from p.grad and the stored state."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    state = optimizer.state[p]
    t = state.get("step", 0) + 1
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(p)) + (1 - beta2) * p.grad**2
    v_hat = v / (1 - beta2**t)
    return (p.grad**2 / v_hat.clamp_min(EPS**2)).mean().sqrt().item()


def test_without_clipping_it_is_adamw():
    torch.manual_seed(0)
    model = make_model()
    late = nn.Parameter(torch.randn(3))  # no gradient for the first 10 steps
    twin, twin_late = copy.deepcopy(model), copy.deepcopy(late)
    ours = StableAdamW(groups(model) + [{"params": [late]}], lr=1e-2, betas=BETAS, eps=EPS,
                       clip_threshold=math.inf)
    reference = torch.optim.AdamW(groups(twin) + [{"params": [twin_late], "weight_decay": 0.0}],
                                  lr=1e-2, betas=BETAS, eps=EPS)
    for step in range(20):
        for optimizer in (ours, reference):  # a schedule writes group["lr"] before each step
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 * (1 - step / 40)
        for m, extra in ((model, late), (twin, twin_late)):
            x, y = batch(step)
            m.zero_grad(set_to_none=True)
            extra.grad = None
            loss = ((m(x) - y) ** 2).mean() + ((extra * y).mean() if step >= 10 else 0)
            loss.backward()
        ours.step()
        reference.step()
        for p, q in zip([*model.parameters(), late], [*twin.parameters(), twin_late]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert ours.state[late]["step"] == 10  # counted from its first gradient, as AdamW does


def test_default_threshold_is_adamw_while_rms_stays_below_one():
    # Not true in general: on a smooth quadratic the gradient shrinks at first (rms < 1), but
    # once the iterate overshoots it can grow again and rms passes 1. So compare step by step
    # only while every tensor's rms, computed here, is at most 1.
    torch.manual_seed(0)
    layer = nn.Linear(10, 4)
    x, y = torch.randn(64, 10), torch.randn(64, 4)  # one fixed batch: a smooth quadratic loss
    twin = copy.deepcopy(layer)
    ours = StableAdamW(layer.parameters(), lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.1)
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.1)
    compared = 0
    for _ in range(30):
        for m in (layer, twin):
            m.zero_grad(set_to_none=True)
            ((m(x) - y) ** 2).mean().backward()
        if max(rms_of_next_step(ours, p) for p in layer.parameters()) > 1 + 1e-6:
            break
        ours.step()
        reference.step()
        for p, q in zip(layer.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        compared += 1
    assert compared >= 5


# With decay, too: the decay uses the cut rate, so the whole update is still AdamW's over rms.
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_gradient_spike_divides_the_adamw_update_by_rms(weight_decay):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32))
    ours = StableAdamW([w], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    steady = torch.randn(32)
    for _ in range(10):
        w.grad = steady + 0.1 * torch.randn(32)
        ours.step()

    w.grad = 100 * steady  # the spike
    twin = copy.deepcopy(w)
    twin.grad = w.grad.clone()
    reference = torch.optim.AdamW([twin], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    reference.load_state_dict(copy.deepcopy(ours.state_dict()))  # the same m, v and step count
    rms = rms_of_next_step(ours, w)
    assert rms > 2

    before = w.detach().clone()
    ours.step()
    reference.step()
    torch.testing.assert_close(before - w, (before - twin) / rms)


def test_the_first_step_is_lr_times_the_sign_of_the_gradient():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(100))
    w.grad = torch.randn(100)
    before = w.detach().clone()
    StableAdamW([w], lr=1e-3).step()
    # m̂ = g and v̂ = g² at t = 1, so the step is lr·g / (|g| + eps), and rms = 1 cuts nothing.
    # The tolerance, 0.1% of lr, is fp32 rounding of weights near 1 (spacing about 1e-7).
    torch.testing.assert_close(before - w, 1e-3 * w.grad.sign(), rtol=0, atol=1e-6)


def test_resuming_from_a_state_dict_is_exact():
    torch.manual_seed(0)
    model = make_model()
    optimizer = StableAdamW(groups(model), lr=1e-2, clip_threshold=0.5)  # low, so some steps are cut
    for step in range(5):
        backward(model, step)
        optimizer.step()

    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)  # as a checkpoint would
    saved.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = StableAdamW(groups(resumed_model), lr=1.0)  # the saved groups replace these settings
    resumed.load_state_dict(torch.load(saved, weights_only=True))

    for step in range(5, 10):
        for m, opt in ((model, optimizer), (resumed_model, resumed)):
            backward(m, step)
            opt.step()
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("argument", [
    {"lr": 0.0}, {"lr": -1e-3}, {"lr": math.nan}, {"betas": (1.0, 0.99)}, {"betas": (0.9, -0.1)},
    {"eps": 0.0}, {"weight_decay": -0.1}, {"clip_threshold": 0.0}, {"clip_threshold": -1.0},
])
def test_bad_arguments_are_refused(argument):
    with pytest.raises(ValueError, match=next(iter(argument))):
        StableAdamW([nn.Parameter(torch.zeros(2))], **argument)


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(5, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        StableAdamW(embedding.parameters()).step()


# --- Muon ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # tall (orthogonalised as its transpose) and wide
def test_muon_in_bf16_is_torch_muon_bit_for_bit(shape):
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(*shape)), nn.Parameter(torch.randn(*shape))
    with torch.no_grad():
        theirs.copy_(ours)
    mine = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    torchs = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    for step in range(4):
        grad = torch.randn(*shape, generator=torch.Generator().manual_seed(step))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        torchs.step()
        assert torch.equal(ours, theirs), step
    assert torch.equal(mine.state[ours]["momentum_buffer"], torchs.state[theirs]["momentum_buffer"])


def test_muon_in_fp32_stays_close_to_bf16_and_cpu_defaults_to_fp32():
    grad = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = newton_schulz(grad), newton_schulz(grad, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (fp32 - bf16.float()).abs().max() < 0.05  # the same iteration, rounded differently
    weight = nn.Parameter(torch.zeros(32, 64))
    weight.grad = grad
    Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0).step()  # no momentum: the update is NS(g) itself
    torch.testing.assert_close(weight.detach(), -fp32)


def test_newton_schulz_pushes_every_singular_value_towards_one():
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) @ torch.diag(torch.logspace(-2, 1, 64))
    before, after = torch.linalg.svdvals(g), torch.linalg.svdvals(newton_schulz(g))
    assert before.max() / before.min() > 100  # a badly conditioned gradient...
    assert 0.6 < after.min() and after.max() < 1.25  # ...comes out with singular values near 1


@pytest.mark.parametrize("shape", [(32, 64), (64, 32)])
def test_newton_schulz_flops_match_torchs_count(shape):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        newton_schulz(torch.randn(shape), steps=3)
    assert newton_schulz_flops(shape, steps=3) == counter.get_total_flops()
    weights = [nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(16, 8))]
    muon = Muon(weights, ns_steps=3)
    assert muon.newton_schulz_flops() == newton_schulz_flops(shape, 3) + newton_schulz_flops((16, 8), 3)
    assert Optimizers(muon, torch.optim.AdamW([nn.Parameter(torch.zeros(4))])).newton_schulz_flops() == \
        muon.newton_schulz_flops()


def test_muon_refuses_a_tensor_that_is_not_a_matrix_and_bad_settings():
    bias = nn.Parameter(torch.zeros(4))
    bias.grad = torch.ones(4)
    with pytest.raises(ValueError, match="matrices only"):
        Muon([bias]).step()
    with pytest.raises(ValueError, match="bad Muon settings"):
        Muon([bias], lr=0.0)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_once():
    model = GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, block_size=16, tie_embeddings=False))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = [names[id(p)] for group in adamw.param_groups for p in group["params"]]
    assert in_muon == {name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("blocks.")}
    assert sorted(in_muon | set(in_adamw)) == sorted(names.values()) and len(in_adamw) == len(set(in_adamw))
    assert {"tok_emb.weight", "head.weight"} <= set(in_adamw) and not in_muon & set(in_adamw)
    assert [group.get("lr_ratio", 1.0) for group in optimizer.param_groups] == [20.0, 1.0, 1.0]


def test_optimizers_resume_from_a_state_dict_exactly():
    def run(model, optimizer, steps):
        for step in steps:
            backward(model, step)
            optimizer.step()

    def pair(model):
        first, second = list(model.children())[0], list(model.children())[2]
        return Optimizers(Muon([first.weight], lr=0.02),
                          torch.optim.AdamW([first.bias, second.weight, second.bias], lr=1e-3))

    torch.manual_seed(0)
    straight = make_model()
    split = copy.deepcopy(straight)
    run(straight, pair(straight), range(6))
    optimizer = pair(split)
    run(split, optimizer, range(3))
    saved = io.BytesIO()
    torch.save({"model": split.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = make_model()
    resumed.load_state_dict(state["model"])
    optimizer = pair(resumed)
    optimizer.load_state_dict(state["optimizer"])
    run(resumed, optimizer, range(3, 6))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
