"""Mixture-of-experts feed-forward: many SwiGLU experts, each token uses a few of them.

A router scores the `n_experts` experts for every token; the token goes to the `top_k`
best, and their outputs are summed with gate weights (Shazeer et al., arXiv 1701.06538;
Switch Transformer, arXiv 2101.03961; Mixtral, arXiv 2401.04088). Optional shared
experts see every token, without a gate (DeepSeekMoE, arXiv 2401.06066). Total weights
grow with the number of experts; the weights one token uses grow only with top_k.

    scores  s = softmax(x·W_r) or sigmoid(x·W_r)       (T, E)
    choose  the top_k experts of s (+ bias b, aux_free balancing only)
    gates   g = the chosen s, divided by their sum      (T, k)   (renormalize=True)
    output  y = shared(x) + Σ_j g_j · expert_{chosen_j}(x)

Renormalising makes softmax-then-top-k equal to Mixtral's top-k-then-softmax, and keeps
sigmoid gates summing to 1 as DeepSeek-V3 does; without it a token's gates sum to the
probability mass it was given.

A router left alone sends most tokens to a few experts. Three ways to balance (config
`balance`):
- "none";
- "aux_loss": add α·E·Σ_i f_i·P_i to the loss, where f_i is the fraction of the T·k routed
  slots that went to expert i and P_i the router's mean probability for it. It equals α
  when the router is uniform, whatever the top_k, and grows as load concentrates;
- "aux_free" (Wang et al., arXiv 2408.15664): a per-expert bias b is added to the scores
  to *choose* experts, never to the gate values. After each optimizer step,
  b_i += u·sign(mean load − load_i): under-loaded experts become easier to choose. The
  bias is a buffer: no gradient, no optimizer, saved in checkpoints.

MaxVio = (max_i load_i − mean load) / mean load measures the imbalance of one step.
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn

from lilllm.config import ModelConfig
from lilllm.layers.ffn import SwiGLU, swiglu_hidden
from lilllm.layers.sublayer import Sublayer


class MoE(Sublayer):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = moe = config.moe
        hidden = moe.expert_hidden or swiglu_hidden(config.d_model)
        expert_config = dataclasses.replace(config, ffn="swiglu", ffn_hidden=hidden, layers=None)
        self.router = nn.Linear(config.d_model, moe.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(expert_config) for _ in range(moe.n_experts))
        # n shared experts of width h are one SwiGLU of width n·h: the same sum of hidden units.
        self.shared = None
        if moe.n_shared:
            self.shared = SwiGLU(dataclasses.replace(expert_config, ffn_hidden=moe.n_shared * hidden))
        # Only "aux_free" moves the bias; it stays zero otherwise. A buffer: saved, never trained.
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts))
        self.pending_load = None  # tokens per expert since the last optimizer step (training only)
        self.last_load = None  # the load of the last optimizer step
        self.aux_loss = None  # the auxiliary loss of the last training forward pass

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) → scores (N, E), chosen experts (N, k), gate weights (N, k)."""
        logits = self.router(x)  # (N, E)
        scores = logits.softmax(dim=-1) if self.config.router == "softmax" else logits.sigmoid()
        # The bias decides which experts a token uses, never how much of each it takes.
        chosen = (scores + self.expert_bias).topk(self.config.top_k, dim=-1).indices  # (N, k)
        gates = scores.gather(-1, chosen)  # (N, k)
        if self.config.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return scores, chosen, gates

    def dispatch(self, x: torch.Tensor, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Σ_j gates[t, j] · expert_{chosen[t, j]}(x[t]) for every token t: x (N, C) → (N, C).
        One batched call per expert on the tokens that chose it."""
        out = torch.zeros_like(x)  # (N, C)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which slot
            # An expert no token chose still runs (on 0 rows): its weights get a zero gradient,
            # which DistributedDataParallel expects from every parameter.
            weighted = gates[token, slot].unsqueeze(-1) * expert(x[token])  # (n_e, C)
            out = out.index_add(0, token, weighted)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(B * T, C)  # (N, C): routing is per token, whatever its sequence
        scores, chosen, gates = self.route(flat)
        out = self.dispatch(flat, chosen, gates)  # (N, C)
        if self.shared is not None:
            out = out + self.shared(flat)
        self.aux_loss = None
        if self.training:  # evaluation must not count towards the balance of training steps
            load = torch.bincount(chosen.flatten(), minlength=self.config.n_experts).float()  # (E,)
            self.pending_load = load if self.pending_load is None else self.pending_load + load
            if self.config.balance == "aux_loss":
                self.aux_loss = self.config.aux_loss_weight * balance_loss(scores, load)
        return out.reshape(B, T, C)  # (B, T, C)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """The weighted balance loss of the last training forward pass (the model adds it)."""
        return {} if self.aux_loss is None else {"moe_aux": self.aux_loss}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Close the step: add up its load over processes, and move the aux_free bias.
        Called once per optimizer step, after all gradient-accumulation micro-steps."""
        if self.pending_load is None:
            return
        load, self.pending_load = self.pending_load, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every process must see the same load, or their biases drift apart
        if self.config.balance == "aux_free":
            self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
        self.last_load = load

    def metrics(self) -> dict[str, float]:
        """MaxVio of the last optimizer step (the trainer logs it per layer)."""
        return {} if self.last_load is None else {"maxvio": max_violation(self.last_load)}

    def parameter_counts(self) -> dict[str, int]:
        """Weights in the layer ("total") and weights one token uses ("active")."""
        total = sum(p.numel() for p in self.parameters())
        per_expert = sum(p.numel() for p in self.experts[0].parameters())
        return {"total": total, "active": total - (self.config.n_experts - self.config.top_k) * per_expert}


def balance_loss(scores: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """E·Σ_i f_i·P_i (unweighted): f = load / load.sum() (not differentiable), P = the mean
    over tokens of each token's scores normalised to sum to 1. scores (N, E), load (E,).
    1 for a uniform router; up to E when one expert takes every token with certainty."""
    fraction = load / load.sum()  # (E,) f_i
    mean_prob = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0)  # (E,) P_i
    return scores.size(-1) * (fraction * mean_prob).sum()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max load − mean load) / mean load: 0 when perfectly balanced."""
    mean = load.float().mean()
    return ((load.max() - mean) / mean).item()
