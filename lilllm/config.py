"""The model's configuration: one dataclass describes a model, validates itself on
construction, and round-trips through JSON (every checkpoint stores it).

The Llama-style default and the GPT-2-style baseline are the same class with different
values (`ModelConfig.preset`). An optional per-layer list lets one model mix attention
and feed-forward kinds across layers:

    ModelConfig(vocab_size=2048, n_layers=2, layers=[{"ffn": "gelu"}, {}])

builds a GELU MLP in layer 0 and the model-wide kind (SwiGLU) in layer 1.
"""

import dataclasses
import json
import math
from dataclasses import dataclass

from lilllm import LilllmError

# The kinds each setting may name. Dicts from these names to classes build the layers
# (ATTENTIONS and FFNS in model.py, NORMS in layers/norm.py); a test checks that they agree.
ATTENTION_KINDS = ("softmax", "plga")  # softmax: scaled dot-product, n_kv_heads picks MHA/GQA/MQA; plga: ModelConfig.plga
FFN_KINDS = ("swiglu", "gelu", "gelu_tanh", "relu2", "moe")  # gelu_tanh: GPT-2's approximate GELU; relu2: ReLU²; moe: a mixture of SwiGLU experts, set by ModelConfig.moe
NORM_KINDS = ("rmsnorm", "layernorm")
POSITION_KINDS = ("rope", "xpos", "learned", "sinusoidal")  # xpos: RoPE with a decay by distance (layers/rope.py)
ROTARY_POSITIONS = ("rope", "xpos")  # positions that rotate q and k: no table, so no last position
BLOCK_KINDS = ("sequential", "parallel")  # x + attn, then + ffn (Llama, GPT-2); or x + attn(n) + ffn(n) from one norm n (PaLM)
QK_NORM_KINDS = ("none", "l2", "rms")  # normalise each query and key head vector before the scores (layers/attention.py)
NORM_PLACEMENTS = ("pre", "post")  # normalise each branch's input (pre) or each residual sum (post)
GRAM_KINDS = ("full", "causal")  # which queries PLGA's Gram sums: all of the sequence, or the prefix
ROUTER_KINDS = ("softmax", "sigmoid")  # how a mixture-of-experts layer scores its experts
BALANCE_KINDS = ("none", "aux_loss", "aux_free")  # how it keeps the experts evenly loaded


class ConfigError(LilllmError, ValueError):
    """A model configuration that cannot describe a model."""


@dataclass
class LayerSpec:
    """Per-layer overrides; None means "the model-wide kind"."""

    attention: str | None = None
    ffn: str | None = None


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward layer (layers/moe.py): each token goes to the
    `top_k` of `n_experts` SwiGLU experts its router scores highest, plus `n_shared`
    experts every token uses."""

    n_experts: int = 8  # routed experts
    top_k: int = 2  # experts per token
    n_shared: int = 0  # always-on experts without a gate (DeepSeekMoE, arXiv 2401.06066)
    expert_hidden: int | None = None  # each expert's SwiGLU width; None: the dense rule for d_model
    router: str = "softmax"  # expert scores: softmax over experts, or an independent sigmoid each
    renormalize: bool = True  # gate weights: the k chosen scores divided by their sum
    balance: str = "aux_loss"  # none, aux_loss (Switch, arXiv 2101.03961) or aux_free (arXiv 2408.15664)
    aux_loss_weight: float = 0.01  # α of the auxiliary loss (balance="aux_loss")
    bias_update_rate: float = 1e-3  # u, the bias step per optimizer step (balance="aux_free")

    def __post_init__(self):
        check_finite("moe.", dataclasses.asdict(self))
        for name in ("n_experts", "top_k"):
            _check_positive_int(f"moe.{name}", getattr(self, name))
        if self.expert_hidden is not None:
            _check_positive_int("moe.expert_hidden", self.expert_hidden)
        if isinstance(self.n_shared, bool) or not isinstance(self.n_shared, int) or self.n_shared < 0:
            raise ConfigError(f"moe.n_shared must be a whole number ≥ 0, got {self.n_shared!r}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"moe.top_k={self.top_k} is more than moe.n_experts={self.n_experts}: "
                              "a token cannot choose more experts than there are")
        _check_kind("moe.router", self.router, ROUTER_KINDS)
        _check_kind("moe.balance", self.balance, BALANCE_KINDS)
        if not self.aux_loss_weight >= 0 or not self.bias_update_rate >= 0:
            raise ConfigError(f"moe.aux_loss_weight={self.aux_loss_weight} and moe.bias_update_rate="
                              f"{self.bias_update_rate} must be ≥ 0")


@dataclass
class PLGAConfig:
    """Power Law Graph Attention (layers/plga.py), PLDR-LLM's attention. The defaults are
    the v500 reference's learner: 8 residual units of 2 SwiGLU blocks of width 170."""

    a_dff: int = 170  # hidden width of the metric learner's SwiGLU blocks
    n_units: int = 8  # residual units (num_reslayerA)
    n_glu: int = 2  # SwiGLU blocks per unit (num_denseA)
    a_dff_depth: int | None = None  # v900: the learner's width (112); None: head_dim, as v500
    gram: str = "full"  # full: the reference's (sees the future); causal: prefix sums (ours)
    dag_alm: float = 0.0  # weights of the DAG loss of A_LM, A_P and G_LM (0: not computed)
    dag_ap: float = 0.0
    dag_glm: float = 0.0

    def __post_init__(self):
        check_finite("plga.", dataclasses.asdict(self))
        for name in ("a_dff", "n_units", "n_glu"):
            _check_positive_int(f"plga.{name}", getattr(self, name))
        if self.a_dff_depth is not None:
            _check_positive_int("plga.a_dff_depth", self.a_dff_depth)
        _check_kind("plga.gram", self.gram, GRAM_KINDS)
        for name in ("dag_alm", "dag_ap", "dag_glm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"plga.{name}={getattr(self, name)} must be ≥ 0 (0 switches that DAG term off)")


@dataclass
class SharingConfig:
    """Shared blocks that diverge as training goes on: seed 004's progressive diverging
    (swortaljuju/lmsmall), with its bookkeeping fixed. The model's n_layers layers start as
    n_layers / repeats blocks, each applied `repeats` times in a row. At each fraction of the
    run in `switches`, every block becomes two copies of itself (half the repeats): the copies'
    attention projections are frozen and adapted by LoRA (layers/lora.py), their feed-forward
    and norms train in full. switches=[]: a model that shares its blocks to the end."""

    repeats: int = 4  # applications of each block at the start: n_layers / repeats blocks
    switches: list[float] = dataclasses.field(default_factory=lambda: [1 / 3, 2 / 3])  # fractions of the run
    lora_rank: int = 8  # the seed's rank and alpha: a scale alpha / rank of 2
    lora_alpha: float = 16.0

    def __post_init__(self):
        check_finite("sharing.", dataclasses.asdict(self))
        _check_positive_int("sharing.repeats", self.repeats)
        _check_positive_int("sharing.lora_rank", self.lora_rank)
        if not self.lora_alpha > 0:
            raise ConfigError(f"sharing.lora_alpha must be positive, got {self.lora_alpha}")
        if not isinstance(self.switches, list) or not all(0 < f < 1 for f in self.switches) or \
                self.switches != sorted(set(self.switches)):
            raise ConfigError(f"sharing.switches must be increasing fractions of the run between 0 and 1, "
                              f"got {self.switches!r}")
        if self.repeats % 2 ** len(self.switches):
            raise ConfigError(f"each switch halves the repeats: sharing.repeats={self.repeats} cannot be halved "
                              f"{len(self.switches)} time(s); use a multiple of {2 ** len(self.switches)}")


@dataclass
class ModelConfig:
    """Everything that determines a model's architecture. The defaults are the course's
    Llama-style CPU model: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int  # from the tokenizer
    block_size: int = 256  # context length: the most positions the model is trained on
    d_model: int = 128  # width of the residual stream, C
    n_layers: int = 4  # decoder blocks
    n_heads: int = 4  # query heads, each head_dim wide
    n_kv_heads: int | None = 2  # key/value heads: n_heads → MHA, 1 → MQA, between → GQA; None: n_heads
    head_dim: int | None = None  # each head's width; None: d_model // n_heads (PaLM's heads are wider)
    attention: str = "softmax"  # every layer's attention: softmax or plga (ATTENTION_KINDS)
    ffn: str = "swiglu"  # every layer's feed-forward: swiglu, gelu, gelu_tanh, relu2 or moe (FFN_KINDS)
    ffn_hidden: int | None = None  # None: the feed-forward kind's own rule (layers/ffn.py)
    norm: str = "rmsnorm"  # rmsnorm or layernorm
    norm_eps: float = 1e-5  # added under the norm's square root
    norm_bias: bool = True  # LayerNorm's added bias (PaLM has none); RMSNorm never has one
    norm_placement: str = "pre"  # pre: x + f(norm(x)), the default; post: norm(x + f(x)), PLDR-LLM's
    block: str = "sequential"  # sequential or parallel (PaLM's: both branches read one norm)
    positions: str = "rope"  # rope, xpos, learned or sinusoidal
    rope_base: float = 10000.0  # RoPE's θ: the slowest pair turns once in about 2π·θ positions
    xpos_scale_base: float = 512.0  # xPos: a plane's scores shrink by its ζ (0.29 to 0.99) per this many positions
    qk_norm: str = "none"  # none, l2 (unit length, learned gains, temperature qk_temperature) or rms
    qk_temperature: float = 8.0  # qk_norm=l2: the scores are τ·cos(q, k)·gains, not q·k/√head_dim
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix
    dropout: float = 0.0  # on attention weights and each sublayer's output, in training only
    bias: bool = False  # biases in the linear layers
    layers: list[LayerSpec] | None = None  # optional, one entry per layer
    moe: MoEConfig | None = None  # the settings of every "moe" feed-forward layer
    plga: PLGAConfig | None = None  # the settings of every "plga" attention layer
    sharing: SharingConfig | None = None  # shared blocks that diverge during training (progressive diverging)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:  # the usual split of the width into heads
            _check_positive_int("d_model", self.d_model)
            _check_positive_int("n_heads", self.n_heads)
            if self.d_model % self.n_heads:
                raise ConfigError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}: choose n_heads so "
                                  "that d_model // n_heads is a whole head size, or set head_dim")
            self.head_dim = self.d_model // self.n_heads
        if isinstance(self.moe, dict):  # from JSON
            self.moe = _nested(MoEConfig, self.moe, "moe")
        if isinstance(self.plga, dict):
            self.plga = _nested(PLGAConfig, self.plga, "plga")
        if isinstance(self.sharing, dict):
            self.sharing = _nested(SharingConfig, self.sharing, "sharing")
        if self.layers is not None:
            self.layers = [_layer_spec(entry, i) for i, entry in enumerate(self.layers)]
        self._validate()

    @property
    def rotary(self) -> bool:
        """Whether positions enter by rotating queries and keys (RoPE, xPos), not by a table added
        to the embeddings: such a model has no last position."""
        return self.positions in ROTARY_POSITIONS

    def layer(self, index: int) -> LayerSpec:
        """The attention and feed-forward kinds of layer `index`, overrides applied."""
        spec = self.layers[index] if self.layers is not None else LayerSpec()
        return LayerSpec(attention=spec.attention or self.attention, ffn=spec.ffn or self.ffn)

    def _validate(self):
        check_finite("", {field.name: getattr(self, field.name) for field in dataclasses.fields(self)})
        for name in ("vocab_size", "block_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            _check_positive_int(name, getattr(self, name))
        if self.ffn_hidden is not None:
            _check_positive_int("ffn_hidden", self.ffn_hidden)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}: "
                              "each key/value head must serve the same number of query heads")
        _check_kind("attention", self.attention, ATTENTION_KINDS)
        _check_kind("ffn", self.ffn, FFN_KINDS)
        _check_kind("norm", self.norm, NORM_KINDS)
        _check_kind("positions", self.positions, POSITION_KINDS)
        _check_kind("block", self.block, BLOCK_KINDS)
        _check_kind("qk_norm", self.qk_norm, QK_NORM_KINDS)
        if self.rotary and self.head_dim % 2:
            raise ConfigError(f"{self.positions} rotates pairs of coordinates, so head_dim ({self.head_dim}) "
                              "must be even: change d_model, n_heads or head_dim")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions pair sin and cos, so d_model={self.d_model} must be even")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("rope_base", "xpos_scale_base", "qk_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.norm_bias and self.norm != "layernorm":
            raise ConfigError(f"norm_bias=False removes LayerNorm's bias, but norm={self.norm!r} has none to remove")
        if self.block == "parallel" and self.norm_placement == "post":
            raise ConfigError("a parallel block normalises its input once, before both branches: it needs "
                              "norm_placement='pre'")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout is a probability in [0, 1), got {self.dropout}")
        if self.layers is not None:
            if len(self.layers) != self.n_layers:
                raise ConfigError(f"the per-layer list has length {len(self.layers)} but n_layers={self.n_layers}: "
                                  "give one entry per layer ({} keeps the model-wide kinds)")
            for i, spec in enumerate(self.layers):
                if spec.attention is not None:
                    _check_kind(f"layers[{i}].attention", spec.attention, ATTENTION_KINDS)
                if spec.ffn is not None:
                    _check_kind(f"layers[{i}].ffn", spec.ffn, FFN_KINDS)
        _check_kind("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        if self.plga is None and any(self.layer(i).attention == "plga" for i in range(self.n_layers)):
            raise ConfigError('an attention of kind "plga" needs its settings: pass plga={} (the v500 '
                              "learner) or plga={'a_dff': 64, 'n_units': 2, ...}")
        if self.qk_norm != "none" and any(self.layer(i).attention == "plga" for i in range(self.n_layers)):
            raise ConfigError(f"qk_norm={self.qk_norm!r} normalises softmax attention's queries and keys; "
                              "PLGA layers compute their scores differently: use qk_norm='none' with plga")
        if self.moe is None and any(self.layer(i).ffn == "moe" for i in range(self.n_layers)):
            raise ConfigError('an ffn of kind "moe" needs its settings: pass moe={} (the defaults) or '
                              "moe={'n_experts': 8, 'top_k': 2, ...}")

        if self.sharing is not None:
            self._validate_sharing()

    def _validate_sharing(self):
        if self.n_layers % self.sharing.repeats:
            raise ConfigError(f"sharing.repeats={self.sharing.repeats} does not divide n_layers={self.n_layers}: "
                              "each shared block must cover the same number of layers")
        if self.layers is not None or self.attention != "softmax" or self.ffn == "moe" or self.block != "sequential":
            raise ConfigError("sharing needs identical sequential blocks of softmax attention without a mixture of "
                              "experts (copies of one block must be the same kind; LoRA adapts plain projections)")

    # --- presets and serialisation ---------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named configuration with some values changed:
        `ModelConfig.preset("gpt2", vocab_size=2048, n_layers=6)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # nested LayerSpecs become dicts too

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        check_keys(cls, values, "the model config")
        if "vocab_size" not in values:
            raise ConfigError("vocab_size is missing: pass the tokenizer's vocabulary size")
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"the config is not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError("a config in JSON must be an object of key: value pairs")
        return cls.from_dict(values)


# Named configurations. "default" is the dataclass defaults (Llama-style); "gpt2" is the
# baseline of GPT-2 (Radford et al., 2019) at the same size: LayerNorm, learned absolute
# positions, a GELU MLP, full multi-head attention, biases everywhere.
PRESETS = {
    "default": {},
    "gpt2": {"n_kv_heads": None, "ffn": "gelu", "norm": "layernorm", "positions": "learned", "bias": True},
    # The default with every feed-forward a mixture of 8 SwiGLU experts of half the dense
    # width, 2 per token: as many active weights per token as the default, 4x the total.
    "moe": {"ffn": "moe", "moe": {"n_experts": 8, "top_k": 2, "expert_hidden": 176}},
    # PLDR-LLM (Gokden, arXiv 2410.16703) as its reference's seed configs: PLGA in every
    # layer, post-LN blocks, LayerNorm, a SwiGLU with biases of width floor(8·d/3), half-split
    # RoPE, multi-head, an untied head. ≈110M and ≈118M weights at a 32k vocabulary.
    "pldr-v500": {"block_size": 1024, "d_model": 896, "n_layers": 5, "n_heads": 14, "n_kv_heads": None,
                  "attention": "plga", "ffn_hidden": 2389, "norm": "layernorm", "norm_eps": 1e-6,
                  "norm_placement": "post", "tie_embeddings": False, "bias": True, "plga": {}},
    "pldr-v900": {"block_size": 1024, "d_model": 1088, "n_layers": 3, "n_heads": 17, "n_kv_heads": None,
                  "attention": "plga", "ffn_hidden": 2901, "norm": "layernorm", "norm_eps": 1e-6,
                  "norm_placement": "post", "tie_embeddings": False, "bias": True,
                  "plga": {"a_dff": 300, "a_dff_depth": 112}},
    # PaLM (Chowdhery et al., arXiv 2204.02311) as the PaLM-rlhf-pytorch code the PaLM seed trains:
    # parallel blocks, one key/value head (MQA), xPos, LayerNorm without bias, no linear biases,
    # a tied head and a SwiGLU of hidden width 4·d_model (not the 8/3 rule): at the course size.
    "palm": {"block": "parallel", "n_kv_heads": 1, "positions": "xpos", "norm": "layernorm", "norm_bias": False,
             "ffn_hidden": 4 * 128},
    # The seed's palm_150m_8k_v0: 12 layers of width 768, 8 heads of 128 (wider than 768 / 8),
    # an 8k context; 144.8M weights at its 50,304-token vocabulary.
    "palm-150m": {"block_size": 8192, "d_model": 768, "n_layers": 12, "n_heads": 8, "head_dim": 128, "n_kv_heads": 1,
                  "block": "parallel", "positions": "xpos", "norm": "layernorm", "norm_bias": False,
                  "ffn_hidden": 4 * 768},
    # Progressive diverging (seed 004) at the course's width: 12 layers that start as 3 shared
    # blocks, become 6 at a third of the run and 12 at two thirds.
    "diverging": {"n_layers": 12, "sharing": {}},
    # The same architecture at the course default's size, for a CPU: 4 layers of width 128,
    # 4 heads of 32, a learner of 2 units, the default's tied head and SwiGLU width; the DAG
    # weights of the v500 "dagreg" recipe.
    "pldr-tiny": {"n_kv_heads": None, "attention": "plga", "norm": "layernorm", "norm_eps": 1e-6,
                  "norm_placement": "post", "bias": True,
                  "plga": {"a_dff": 64, "n_units": 2, "dag_alm": 0.001, "dag_ap": 0.005, "dag_glm": 0.005}},
}


def _layer_spec(entry, index: int) -> LayerSpec:
    if isinstance(entry, LayerSpec):
        return entry
    if not isinstance(entry, dict):
        raise ConfigError(f"layers[{index}] must be a dict such as {{'ffn': 'gelu'}}, got {entry!r}")
    check_keys(LayerSpec, entry, f"layers[{index}]")
    return LayerSpec(**entry)


def _nested(cls, values: dict, name: str):
    """A nested settings dataclass (such as MoEConfig) from a plain dict."""
    check_keys(cls, values, name)
    return cls(**values)


def check_keys(cls, values: dict, where: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls`, naming the known ones (every
    settings reader uses this: model configs, their nested parts, training settings)."""
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}: known keys are {', '.join(known)}")


def check_finite(where: str, values: dict) -> None:
    """Refuse NaN and infinity among the numbers of a config: they pass every `>` check
    (inf) or none (NaN) and would only show up later, as a NaN loss."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}{name}={value} is not a finite number")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")


def _check_kind(name: str, value: str, kinds: tuple[str, ...]) -> None:
    if value not in kinds:
        raise ConfigError(f"unknown {name} kind {value!r}: choose one of {', '.join(kinds)}")
