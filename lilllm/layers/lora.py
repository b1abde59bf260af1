"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685).

Fine-tuning changes a pretrained weight W0 (d_out × d_in) by some ΔW. LoRA trains that change
in factored form and keeps W0 frozen:

    h = W0 x + b + (α/r) · B A x,    A: (r, d_in),  B: (d_out, r),  r ≪ min(d_in, d_out)

- B starts at zero, so ΔW = (α/r)·BA = 0 and the adapted model starts as the pretrained one,
  logit for logit. A starts random, or B's gradient (which is (α/r)·∂L/∂h (Ax)ᵀ) would be
  zero too and nothing would ever move. On the first step A's gradient is zero (it goes
  through B); only B moves.
- The scale α/r: the update of h for a given step grows with α, so α and the learning rate
  are coupled. Dividing by r lets you change the rank without retuning the learning rate much.
  The paper sets α to the first r it tries and does not tune it (rsLoRA uses α/√r instead).
- The cost: r·(d_in + d_out) trained parameters per matrix instead of d_in·d_out. For the
  course's model (d_model 128, 4 layers) LoRA on q and v at r = 8 trains 14,336 numbers.
- After training, ΔW can be added into W0 (`merge_lora`): the model is the plain architecture
  again, with no extra cost at inference.

`add_lora(model, ("q_proj", "v_proj"))` wraps the named projections in `LoRALinear` and freezes
everything else; `lora_state_dict` keeps only the adapters, a small file.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm import LilllmError


def check_settings(rank: int, alpha: float, dropout: float) -> None:
    """A one-line error for a rank, alpha or dropout LoRA cannot use."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise LilllmError(f"LoRA rank={rank!r}: use a positive whole number, such as 8")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise LilllmError(f"LoRA alpha={alpha!r}: use a positive number (the scale is alpha / rank)")
    if not 0 <= dropout < 1:
        raise LilllmError(f"LoRA dropout={dropout!r}: use a probability in [0, 1)")


class LoRALinear(nn.Module):
    """h = W0 x + b + (alpha/rank) · B A dropout(x); W0 and b (the wrapped `base`) frozen.

    A is initialised Kaiming-uniform with a = √5, i.e. U(−1/√d_in, 1/√d_in), as loralib (the
    paper's code) and peft do; the paper itself says Gaussian. B is zeros. Dropout acts on the
    LoRA path's input only. `merge()` adds ΔW into W0 for inference; switching a merged layer
    to training mode unmerges it first (as loralib does): training on W0 + ΔW while the
    adapters also add ΔW would count it twice."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_settings(rank, alpha, dropout)
        self.base = base.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W0 + ΔW, for code that reads a projection's weight directly
        (PaLM's parallel block multiplies q, k, v, gate and up as one matrix). That path has
        no room for the LoRA path's own dropout, so it refuses to train with one."""
        if self.merged:
            return self.base.weight
        if self.training and self.dropout.p > 0:
            raise LilllmError("a fused matmul reads this LoRA layer's weight, which skips its dropout: "
                              "use LoRA dropout 0, or run the block unfused (ParallelBlock.fuse = False)")
        return self.base.weight + self.delta_weight().to(self.base.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha/rank) · B A, (out, in), in fp32: a small delta added to bf16 weights
        would otherwise be rounded away."""
        return self.scale * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += ΔW: the forward is then the base layer's alone."""
        if self.merged:
            raise LilllmError("this LoRA layer is already merged: merging again would add its delta twice")
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 −= ΔW: back to the frozen weight plus the adapters."""
        if not self.merged:
            raise LilllmError("this LoRA layer is not merged: there is no delta to take out of its weight")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        weight = self.base.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))  # the sum in fp32, rounded once

    def train(self, mode: bool = True):
        if mode and self.merged:
            self.unmerge()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # (..., d_in) → (..., r) → (..., d_out)
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scale={self.scale:g}, merged={self.merged}"


def add_lora(model: nn.Module, targets, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             freeze_rest: bool = True) -> list[str]:
    """Replace every nn.Linear whose attribute name (the last part of its dotted name) is in
    `targets` (e.g. ("q_proj", "v_proj")) by a LoRALinear wrapping it; with `freeze_rest`, every
    other parameter gets requires_grad=False. Returns the dotted names wrapped. A target that
    names no linear layer is refused, naming those there are; so is a tied matrix (a head that
    shares the token embedding: adapting it would change the input embedding too)."""
    check_settings(rank, alpha, dropout)  # before the model changes
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise LilllmError("the model already has LoRA layers: merge them (merge_lora) before adding others")
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    present = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [target for target in targets if target not in present]
    if unknown or not targets:
        raise LilllmError(f"LoRA target(s) {', '.join(unknown) or '(none given)'}: the model has no such linear "
                          f"layer; choose among {', '.join(present)}")
    chosen = [name for name in linears if name.rsplit(".", 1)[-1] in targets]
    names_of = {}  # parameter → every name it has: a tied matrix has two
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for name in chosen:
        if len(tied := names_of[id(linears[name].weight)]) > 1:
            others = ", ".join(n for n in tied if n != f"{name}.weight")
            raise LilllmError(f"LoRA on {name} would also change {others}: its weight is tied; "
                              "adapt other layers, or train without tie_embeddings")
    if freeze_rest:
        model.requires_grad_(False)
    for name in chosen:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, LoRALinear(linears[name], rank, alpha, dropout))
    return chosen


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRALinear into a plain nn.Linear holding W0 + ΔW, in place (the module is
    replaced), so the model is again the plain architecture, saveable as a normal checkpoint.
    Returns how many were folded."""
    folded = [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    for name, module in folded:
        if not module.merged:
            module.merge()
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, module.base)
    return len(folded)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' weights (the lora_A and lora_B entries of the state dict): load them
    into the same base model wrapped by the same `add_lora` with `load_state_dict(..., strict=False)`."""
    return {name: tensor for name, tensor in model.state_dict().items() if name.endswith((".lora_A", ".lora_B"))}


def lora_parameter_count(model: nn.Module) -> int:
    """The adapters' parameters: r·(d_in + d_out) per wrapped matrix."""
    return sum(module.lora_A.numel() + module.lora_B.numel()
               for module in model.modules() if isinstance(module, LoRALinear))
