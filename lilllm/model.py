"""The decoder-only language model: token embedding (+ absolute positions, if any), a
stack of blocks (sequential, or PaLM's parallel), a final norm and an output head over the
vocabulary. With `config.sharing`, several layers run one block (progressive diverging,
whose blocks split in two during training: `advance`, `diverge`).

    from lilllm.model import GPT, ModelConfig
    model = GPT(ModelConfig.preset("default", vocab_size=2048))  # or "gpt2"

One class builds both the Llama-style default and the GPT-2-style baseline; the config
decides every difference (see config.py). Beside `forward`, the model answers what a
training loop asks of it (`auxiliary_loss`, `after_optimizer_step`, `layer_metrics`,
`flops_per_token`) by asking each of its sublayers (layers/sublayer.py). At the end, three
ways to read a trained model: the nats it gives a text, in one pass or token by token (a
causality check), and PLGA's deductive outputs.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.layers.attention import CausalSelfAttention, KVCache, LayerCache
from lilllm.layers.ffn import GeluMLP, GeluTanhMLP, ReluSquaredMLP, SwiGLU
from lilllm.layers.lora import add_lora, merge_lora
from lilllm.layers.moe import MoE
from lilllm.layers.norm import NORMS, LayerNorm
from lilllm.layers.plga import DeductiveOutputs, PLGAttention
from lilllm.layers.rope import rope_angles, sinusoidal_positions, xpos_scales
from lilllm.layers.sublayer import Sublayer

__all__ = ["GPT", "Block", "ParallelBlock", "ModelConfig", "KVCache", "IGNORE_INDEX", "summed_cross_entropy"]

# The kinds a config can name (config.py lists the names; a test keeps both in step):
# each block builds ATTENTIONS[kind](config) and FFNS[kind](config).
ATTENTIONS = {"softmax": CausalSelfAttention, "plga": PLGAttention}
FFNS = {"swiglu": SwiGLU, "gelu": GeluMLP, "gelu_tanh": GeluTanhMLP, "relu2": ReluSquaredMLP, "moe": MoE}

INIT_STD = 0.02  # GPT-2's initialisation of every weight matrix and embedding
# The layers name their projection back into the residual stream like this; the model
# shrinks its initialisation (see GPT._init_weights).
RESIDUAL_PROJECTIONS = ("out_proj", "down")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # what diverging copies adapt with LoRA
IGNORE_INDEX = -100  # a target equal to this is not scored (padding, or tokens the loss leaves out)


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Total nats of `targets` (...,) under `logits` (..., V), in fp32, skipping IGNORE_INDEX:
    the sum, not the mean, so scores of batches of any shape add up exactly."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def make_norm(config: ModelConfig) -> nn.Module:
    """The config's norm over the model width; a LayerNorm keeps its bias unless norm_bias=False."""
    if config.norm == "layernorm":
        return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.norm_bias)
    return NORMS[config.norm](config.d_model, eps=config.norm_eps)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + ffn(norm(x)). Normalising the
    input of each branch, not the sum, leaves a clean residual path from the embedding
    to the head (Xiong et al., arXiv 2002.04745)."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        kinds = config.layer(index)
        self.post_norm = config.norm_placement == "post"
        self.attn_norm = make_norm(config)
        self.attn = ATTENTIONS[kinds.attention](config)
        self.ffn_norm = make_norm(config)
        self.ffn = FFNS[kinds.ffn](config)

    def forward(self, x, cos=None, sin=None, cache: LayerCache | None = None, xpos_scale=None):
        if self.post_norm:  # the original Transformer's order, and PLDR-LLM's: normalise each sum
            x = self.attn_norm(x + self.attn(x, cos, sin, cache, xpos_scale))  # (B, T, C)
            return self.ffn_norm(x + self.ffn(x))
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, xpos_scale)  # (B, T, C)
        return x + self.ffn(self.ffn_norm(x))  # (B, T, C)


class ParallelBlock(nn.Module):
    """PaLM's block (Chowdhery et al., arXiv 2204.02311): y = x + attn(n) + ffn(n), n = norm(x).
    Both branches read the same normalised input, so their input projections (attention's
    q, k, v and the feed-forward's gate and up) are one matmul with the five matrices side by
    side, [q | k | v | gate | up]. They stay separate parameters, so a checkpoint, a parameter
    count or a per-layer mix sees the usual names; `fuse = False` runs them one by one (the
    same numbers). Sublayers that cannot be split (a mixture of experts) always run unfused."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        kinds = config.layer(index)
        self.norm = make_norm(config)
        self.attn = ATTENTIONS[kinds.attention](config)
        self.ffn = FFNS[kinds.ffn](config)
        self.fuse = bool(self.attn.input_projections() and self.ffn.input_projections())

    def forward(self, x, cos=None, sin=None, cache: LayerCache | None = None, xpos_scale=None):
        n = self.norm(x)  # (B, T, C): read by both branches
        if not self.fuse:
            return x + self.attn(n, cos, sin, cache, xpos_scale) + self.ffn(n)
        attn_in, ffn_in = self.attn.input_projections(), self.ffn.input_projections()
        layers = attn_in + ffn_in
        weight = torch.cat([layer.weight for layer in layers])  # (q + k + v + 2·hidden, C): one matrix
        bias = torch.cat([layer.bias for layer in layers]) if layers[0].bias is not None else None
        outputs = F.linear(n, weight, bias).split([layer.out_features for layer in layers], dim=-1)
        attn = self.attn.attend(*outputs[:len(attn_in)], cos, sin, cache, xpos_scale)  # (B, T, C)
        return x + attn + self.ffn.from_projections(*outputs[len(attn_in):])


BLOCKS = {"sequential": Block, "parallel": ParallelBlock}


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        elif config.positions == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_positions(config.block_size, config.d_model),
                                 persistent=False)
        else:  # rope or xpos: fixed tables, rebuilt on load, so not saved with the weights
            cos, sin = rope_angles(config.head_dim, config.block_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            if config.positions == "xpos":
                self.register_buffer("xpos_scale", self._xpos_scales(0, config.block_size), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        n_blocks = config.n_layers // config.sharing.repeats if config.sharing else config.n_layers
        self.blocks = nn.ModuleList(BLOCKS[config.block](config, i) for i in range(n_blocks))
        if config.sharing:  # how many times the blocks have split: saved, so a checkpoint rebuilds them
            self.register_buffer("sharing_stage", torch.tensor(0))
        self.norm = make_norm(config)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix both reads tokens in and scores them out
            self.head.weight = self.tok_emb.weight
        self.last_auxiliary: dict[str, torch.Tensor] = {}  # the auxiliary terms of the last loss, detached
        self.apply(self._init_weights)
        # Each block adds two branch outputs to the residual stream; scale them down so the
        # stream's variance at init does not grow with depth (GPT-2, Radford et al. 2019).
        residual_std = INIT_STD / math.sqrt(2 * config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(tuple(f"{proj}.weight" for proj in RESIDUAL_PROJECTIONS)):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self) -> KVCache:
        """An empty KV cache for `forward(..., cache=...)`: each attention layer makes its
        own (PLGA keeps more than keys and values)."""
        cache = KVCache(self.config.n_layers)
        cache.layers = [block.attn.new_cache() for block in self.layer_blocks()]
        return cache

    def layer_blocks(self) -> list[nn.Module]:
        """The block each of the n_layers layers runs, in order: each its own, or with sharing,
        each block `repeats` times in a row (a repeat halves at each switch)."""
        if self.config.sharing is None:
            return list(self.blocks)
        repeats = self.config.n_layers // len(self.blocks)
        return [self.blocks[layer // repeats] for layer in range(self.config.n_layers)]

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ids (B, T) → logits (B, T, vocab_size), and the mean cross-entropy over the
        targets (B, T) when given (positions whose target is -100 are ignored), plus the
        auxiliary training terms of the layers that have them (see `_auxiliary_loss`).
        With a cache, ids are the new tokens only, at positions cache.position onwards."""
        B, T = ids.shape
        if ids.numel() and not 0 <= ids.min().item() <= ids.max().item() < self.config.vocab_size:
            bad = ids.min().item() if ids.min().item() < 0 else ids.max().item()
            raise LilllmError(f"token id {bad} is outside the model's vocabulary (0 to {self.config.vocab_size - 1}): "
                              "encode the text with the tokenizer the model was trained with")
        start = cache.position if cache is not None else 0
        x = self.tok_emb(ids)  # (B, T, C)
        cos = sin = xpos_scale = None
        if self.config.rotary:
            cos, sin, xpos_scale = self._rotary(start, T)  # (T, head_dim) each; xpos_scale None for rope
        else:
            if start + T > self.config.block_size:
                raise LilllmError(f"positions {start}..{start + T - 1} pass block_size={self.config.block_size}, "
                                  f"where {self.config.positions} positions end: feed at most block_size tokens "
                                  "(with a cache, start a fresh one on the last tokens)")
            if self.config.positions == "learned":
                x = x + self.pos_emb(torch.arange(start, start + T, device=ids.device))  # (T, C) broadcast
            else:
                x = x + self.pos_table[start:start + T]
        x = self.dropout(x)
        if self.config.norm_placement == "post":  # post-norm blocks end normalised; normalise the input instead
            x = self.norm(x)
        layer_caches = cache.layers if cache is not None else [None] * self.config.n_layers
        for block, layer_cache in zip(self.layer_blocks(), layer_caches):
            x = block(x, cos, sin, layer_cache, xpos_scale)  # (B, T, C)
        if cache is not None:
            cache.position += T
        logits = self.head(x if self.config.norm_placement == "post" else self.norm(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
            loss = loss + self.auxiliary_loss()
        return logits, loss

    # --- what a training loop asks of the model ---------------------------------------------

    def sublayers(self) -> list[Sublayer]:
        """Every block's attention and feed-forward layer, in order."""
        return [layer for block in self.blocks for layer in (block.attn, block.ffn)]

    def auxiliary_loss(self) -> torch.Tensor | float:
        """The sum of the extra training terms of the last forward pass (e.g. a mixture of
        experts' balance loss), as the sublayers report them. Each name is averaged over the
        layers that report it, so the weight does not grow with depth. The terms are kept,
        detached, in `last_auxiliary` for the log."""
        terms: dict[str, list[torch.Tensor]] = {}
        for layer in self.sublayers():
            for name, value in layer.auxiliary_losses().items():
                terms.setdefault(name, []).append(value)
        means = {name: torch.stack(values).mean() for name, values in terms.items()}
        self.last_auxiliary = {name: value.detach() for name, value in means.items()}
        return sum(means.values(), 0.0)

    def after_optimizer_step(self) -> None:
        """Let each sublayer update what the optimizer does not own (an MoE's balancing bias)."""
        for layer in self.sublayers():
            layer.after_optimizer_step()

    def advance(self, progress: float) -> bool:
        """Called by the trainer before each step with how far the run has come (0 → 1). True
        means the model changed its set of parameters, so the optimizer must be built again;
        only a model with sharing does, once at each fraction in sharing.switches."""
        if self.config.sharing is None:
            return False
        passed = sum(progress >= fraction for fraction in self.config.sharing.switches)
        changed = False
        while self.sharing_stage.item() < passed:
            self.diverge()
            changed = True
        return changed

    @torch.no_grad()
    def diverge(self) -> None:
        """Progressive diverging's switch: every block becomes two copies of itself, so every
        layer still computes what it did (the logits do not change). In each copy the attention
        projections freeze and a fresh LoRA adapter (B = 0: no change yet) learns their update;
        an adapter from the previous stage is merged into the frozen weights first. Feed-forward
        and norms keep training in full."""
        sharing = self.config.sharing
        if sharing is None or self.sharing_stage.item() >= len(sharing.switches):
            raise LilllmError("this model has no (further) switch to make: see config.sharing.switches")
        copies = []
        for block in self.blocks:
            for _ in range(2):
                twin = copy.deepcopy(block)
                merge_lora(twin.attn)
                add_lora(twin.attn, ATTENTION_PROJECTIONS, sharing.lora_rank, sharing.lora_alpha, freeze_rest=False)
                copies.append(twin)
        self.blocks = nn.ModuleList(copies)
        self.sharing_stage += 1

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, after first diverging as often as the saved model had, so that its
        blocks and adapters exist under the saved names and shapes."""
        if self.config.sharing is not None and "sharing_stage" in state_dict:
            while self.sharing_stage.item() < int(state_dict["sharing_stage"]):
                self.diverge()
        return super().load_state_dict(state_dict, strict, assign)

    def layer_metrics(self) -> dict[str, float]:
        """What each layer measures about itself, keyed "name/layer": "maxvio/2" is the MaxVio
        of layer 2's mixture of experts."""
        return {f"{name}/{index}": value for index, block in enumerate(self.blocks)
                for layer in (block.attn, block.ffn) for name, value in layer.metrics().items()}

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward (PaLM's estimate, Chowdhery et al.,
        arXiv 2204.02311): 6 per weight (multiply-add, twice more backward) plus the attention
        scores and mixing, 12·layers·d_model·block_size. A learned position table is a lookup."""
        c = self.config
        n_weights = sum(p.numel() for name, p in self.named_parameters()
                        if not name.startswith(("pos_emb.", "blocks.")))  # blocks: counted per layer that runs them
        n_weights += sum(p.numel() for block in self.layer_blocks() for p in block.parameters())
        return 6 * n_weights + 12 * c.n_layers * c.d_model * c.block_size

    def _rotary(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE angles (and xPos scales) for positions start .. start+T-1. Past block_size
        (generation with a cropped cache) they are computed on the fly: neither has a last position."""
        cos, sin = self.rope_cos, self.rope_sin
        if start + T > cos.size(0):
            cos, sin = rope_angles(self.config.head_dim, start + T, self.config.rope_base)
            cos, sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        if self.config.positions != "xpos":
            return cos[start:start + T], sin[start:start + T], None
        scale = self.xpos_scale[start:start + T] if start + T <= self.xpos_scale.size(0) else \
            self._xpos_scales(start, T).to(self.xpos_scale.device)
        return cos[start:start + T], sin[start:start + T], scale

    def _xpos_scales(self, start: int, T: int) -> torch.Tensor:
        """xPos scales centred on the middle of the context, block_size // 2: any fixed centre
        gives the same scores (it cancels), and this one keeps the exponents within ±0.5·block/scale_base."""
        c = self.config
        return xpos_scales(c.head_dim, start, T, centre=c.block_size // 2, scale_base=c.xpos_scale_base)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by component (frozen ones too); a tied or shared tensor counts once."""
        counts = dict.fromkeys(["embedding", "positions", "attention", "ffn", "norms", "head"], 0)
        for name, param in self.named_parameters():  # shared (tied) tensors are listed once
            if name.startswith("tok_emb."):
                part = "embedding"
            elif name.startswith("pos_emb."):
                part = "positions"
            elif name.startswith("head."):
                part = "head"
            elif ".attn." in name:
                part = "attention"
            elif ".ffn." in name:
                part = "ffn"
            else:
                part = "norms"
            counts[part] += param.numel()
        counts["total"] = sum(counts.values())
        return counts

    def active_parameter_count(self) -> int:
        """Parameters one token's forward pass uses: the total, less the routed experts each
        mixture-of-experts layer leaves out (it runs top_k of its n_experts per token)."""
        unused = sum(m.parameter_counts()["total"] - m.parameter_counts()["active"]
                     for m in self.modules() if isinstance(m, MoE))
        return self.parameter_counts()["total"] - unused


# --- reading a trained model ---------------------------------------------------------------

@torch.no_grad()
def one_pass_nats(model: GPT, windows: torch.Tensor) -> float:
    """Total nats of the targets windows[:, 1:] (windows (B, T + 1)), all scored in one
    forward pass."""
    logits, _ = model(windows[:, :-1])  # (B, T, V)
    return summed_cross_entropy(logits, windows[:, 1:]).item()


@torch.no_grad()
def sequential_nats(model: GPT, windows: torch.Tensor) -> float:
    """The same total with each target scored from its own prefix alone: one uncached
    forward pass per position. For a causal model this equals `one_pass_nats`; for a model
    that peeks at later tokens (PLGA's full Gram) it is the score without the future."""
    total = 0.0
    for t in range(1, windows.size(1)):
        logits, _ = model(windows[:, :t])  # (B, t, V)
        total += summed_cross_entropy(logits[:, -1], windows[:, t]).item()
    return total


@torch.no_grad()
def deductive_outputs(model: GPT, ids: torch.Tensor) -> list[DeductiveOutputs | None]:
    """Run `model` on ids (B, T); per layer, the deductive outputs of its PLGA attention
    (None where a layer has another kind)."""
    layers = [block.attn for block in model.blocks]
    plga = [layer for layer in layers if isinstance(layer, PLGAttention)]
    for layer in plga:
        layer.record = True
    try:
        model(ids)
    finally:
        for layer in plga:
            layer.record = False
    return [layer.deduced if isinstance(layer, PLGAttention) else None for layer in layers]
