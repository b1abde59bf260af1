"""Two optimizers beside torch's AdamW: StableAdamW, and Muon (for the hidden matrices, paired
with AdamW on the rest by `Optimizers`).

StableAdamW is AdamW that slows down, one tensor at a time, when a gradient arrives that its
second-moment estimate did not see coming (Wortsman et al., "Stable and low-precision training
for large-scale vision-language models", arXiv 2304.13013).

Adam divides each gradient by sqrt(v), a running average of past squared gradients. With
β2 = 0.99 or more, v remembers a long past and moves slowly; if the gradient suddenly grows
(a loss spike, an embedding row that was rare until now), g / sqrt(v) becomes large, the step
is far bigger than the ones before it, and training can diverge. The paper measures how
surprising the gradient is with one number per parameter tensor,

    rms = sqrt(mean(g² / v̂))        (v̂ already includes this step's g²),

which is about 1 while gradients are steady, and divides that tensor's learning rate by
rms / clip_threshold whenever it is above 1: the tensor takes a smaller step, the others carry
on. With clip_threshold=math.inf nothing is ever cut and this is exactly AdamW.

Weight decay is decoupled, as in AdamW, and uses the cut rate: θ ← θ·(1 − η·λ). That follows
the authors' own code; another published implementation decays with the uncut lr. The two
differ only on steps that are cut, and both are AdamW when nothing is.
"""

import torch


class StableAdamW(torch.optim.Optimizer):
    """AdamW with a per-tensor learning rate lr / max(1, rms / clip_threshold) (see the
    module docstring). Param groups may set any argument; `lr` is read from each group at
    every step, so a schedule that writes group["lr"] works as it does with AdamW."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip_threshold: float = 1.0):
        # `not x > 0` rather than `x <= 0`, so that NaN is refused too.
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0 <= beta < 1 for beta in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be zero or positive, got {weight_decay}")
        if not clip_threshold > 0:
            raise ValueError(f"clip_threshold must be positive (math.inf: never cut), got {clip_threshold}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "clip_threshold": clip_threshold}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. `closure`, if given, recomputes
        the loss (with gradients on) and its value is returned, as with torch's optimizers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue  # frozen, or not reached by this loss: no update, no decay
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")

                state = self.state[p]
                if not state:
                    # Each tensor counts its own steps, like torch's AdamW: one that first
                    # gets a gradient late starts its bias correction at t = 1, not at the
                    # global step, so its first moments are not under-corrected.
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # m, same shape as p
                    state["exp_avg_sq"] = torch.zeros_like(p)  # v, same shape as p
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]

                m.lerp_(g, 1 - beta1)  # m = β1·m + (1−β1)·g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = β2·v + (1−β2)·g²
                m_hat = m / (1 - beta1**t)  # bias corrections: m and v start at zero
                v_hat = v / (1 - beta2**t)

                # One scalar per tensor, kept as a 0-d tensor: `.item()` would make the CPU
                # wait for the GPU at every parameter. The floor eps² keeps entries whose
                # gradient has always been zero from dividing by zero.
                rms = (g.square() / v_hat.clamp_min(eps**2)).mean().sqrt()  # ()
                eta = lr / (rms / group["clip_threshold"]).clamp_min(1.0)  # () the cut rate

                p.mul_(1 - eta * group["weight_decay"])  # decoupled decay, at the cut rate
                p.sub_(eta * m_hat / (v_hat.sqrt() + eps))
        return loss


# --- Muon for the hidden matrices, AdamW for the rest --------------------------------------------

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon's default


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  coefficients=NS_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ for G = U·S·Vᵀ: every singular value of G pushed towards 1 (to between
    about 0.7 and 1.2: the coefficients trade exactness for speed), the directions kept. The
    quintic iteration X ← aX + (bA + cA²)X, A = XXᵀ, from X = G/‖G‖_F (so that no singular
    value exceeds 1), on G's wide orientation (A is then the smaller Gram matrix)."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = the smaller side
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # aX + (bA + cA²)X
    return x.T if g.size(0) > g.size(1) else x


def newton_schulz_flops(shape, steps: int = 5) -> int:
    """The FLOPs of `newton_schulz` on a matrix of `shape` (2 per multiply-add): per iteration
    XXᵀ (2m²n), A·A (2m³) and (bA + cA²)·X (2m²n), m the smaller side and n the larger."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., 2024): SGD with Nesterov momentum whose update, per matrix, is
    orthogonalised by `newton_schulz` before it is applied, scaled by √max(1, rows/cols), with
    decoupled weight decay. The same step as torch.optim.Muon (tests/test_optim.py checks it
    bit for bit with ns_dtype=bfloat16), with one change: torch orthogonalises in bf16, which
    is fast on GPUs but, at this course's matrix sizes on a CPU, 20–30 times slower than fp32
    (bf16 matmuls that small take a slow path). ns_dtype=None (the default) orthogonalises in
    bf16 on CUDA and in fp32 elsewhere."""

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None):
        if not lr > 0 or not weight_decay >= 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"bad Muon settings: lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                             f"ns_steps={ns_steps}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps, "ns_dtype": ns_dtype})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dim() != 2:
                    raise ValueError(f"Muon updates matrices only, not a tensor of shape {tuple(p.shape)}")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - mu)  # m ← μ·m + (1−μ)·g
                nesterov = p.grad.lerp(buffer, mu)  # (1−μ)·g + μ·m: the momentum, looked one step ahead
                dtype = group["ns_dtype"] or (torch.bfloat16 if p.is_cuda else torch.float32)
                update = newton_schulz(nesterov, group["ns_steps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)
        return loss

    def newton_schulz_flops(self) -> int:
        """The FLOPs of one step's orthogonalisations: work the model's FLOPs per token leave out."""
        return sum(newton_schulz_flops(p.shape, group["ns_steps"]) for group in self.param_groups
                   for p in group["params"])


class Optimizers:
    """Several optimizers over disjoint parameters, used as one: `lilllm train --optimizer=muon`
    steps `Muon` on the blocks' 2-D weights and AdamW on the embedding, the head and every
    vector, as Muon's authors prescribe: the orthogonalised update is meant for hidden
    matrices, not for the embedding's rows or the head's outputs. `param_groups` lists the groups of all of them,
    so a schedule that writes group["lr"] reaches every group (each group's "lr_ratio", if it
    has one, scales the schedule's rate: Muon's peak rate differs from AdamW's); `state_dict`
    holds each optimizer's state, so a run resumes exactly."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def newton_schulz_flops(self) -> int:
        return sum(optimizer.newton_schulz_flops() for optimizer in self.optimizers if isinstance(optimizer, Muon))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
