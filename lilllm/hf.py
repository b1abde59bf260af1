"""The door to Hugging Face: a course model out as a folder that `transformers` loads with no
custom code (`export`), and a Llama or GPT-2 folder in as a course model (`load`).

    from lilllm.hf import export, load
    export("runs/tiny/best.pt", "hf/tiny")        # or export((model, tokenizer), "hf/tiny")
    model, tokenizer = load("hf/tiny")           # a GPT of lilllm.model, and the course tokenizer

    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_model = AutoModelForCausalLM.from_pretrained("hf/tiny")  # the same logits, within 1e-4

The folder holds four files:

- config.json: the settings, under the names of one of two Hugging Face classes. The course's
  two families are two classes there: the Llama-style default (RMSNorm, RoPE, softmax
  attention with grouped key/value heads, SwiGLU, no biases) is `LlamaForCausalLM`; the gpt2
  preset (LayerNorm, learned positions, a GELU MLP, multi-head attention) is `GPT2LMHeadModel`.
  Anything else (PLGA, a mixture of experts, the parallel block, xPos, QK-norm, post-norm...)
  neither class computes, so `export` refuses it in one line naming what does not fit.
- model.safetensors: the weights, renamed (the table below). A tied head is stored once, as
  the embedding, which is how Hugging Face stores it.
- tokenizer.json: the course tokenizer rebuilt for the `tokenizers` library, which serves the
  same ids. A BPE's merges are recovered from its ranks (`bpe_merges`); a character tokenizer
  becomes a BPE without merges, whose tokens are the characters (a character it never saw is
  dropped there, where the course refuses it).
- tokenizer_config.json: the special tokens and the chat template, in Jinja, that renders the
  very string `lilllm.chat` renders: the checkpoint's template ("lilllm" after `lilllm sft`),
  else "plain", as `lilllm chat` picks.

The weights, course name → Hugging Face name (layer i; GPT-2 under `transformer.h.i.`):

    course                     LlamaForCausalLM                         GPT2LMHeadModel
    tok_emb                    model.embed_tokens                       transformer.wte
    pos_emb                    (RoPE: no weights)                       transformer.wpe
    blocks.i.attn_norm         model.layers.i.input_layernorm           ln_1
    blocks.i.attn.q/k/v_proj   model.layers.i.self_attn.q/k/v_proj      attn.c_attn (q, k, v side by side)
    blocks.i.attn.out_proj     model.layers.i.self_attn.o_proj          attn.c_proj
    blocks.i.ffn_norm          model.layers.i.post_attention_layernorm  ln_2
    blocks.i.ffn.gate/up/down  model.layers.i.mlp.gate/up/down_proj     mlp.c_fc (up), mlp.c_proj (down)
    norm                       model.norm                               transformer.ln_f
    head                       lm_head                                  lm_head

GPT-2 keeps its linear layers as `Conv1D`, whose weight is (in, out): the transpose of
`nn.Linear`'s (out, in). It always has biases: a course model built with bias=False gets zeros.
Hugging Face's Llama rotates in the half-split layout of layers/rope.py, so q and k need no
permutation.

`load` reads a folder `save_pretrained` or `export` wrote, refusing in one line what the course
cannot compute (rope scaling, Llama's optional biases, another activation, other architectures).
GPT-2's own activation, the tanh approximation of GELU, is the course's `gelu_tanh` ffn.
Its tokenizer is a course tokenizer only when the folder's is one the course serves with the
same ids: exactly what `export` writes (`course_tokenizer`). Others (GPT-2's own, with one
special token) are refused; `load(folder, tokenizer=False)` then imports the weights alone, and
texts are encoded with `transformers.AutoTokenizer` instead.

One difference remains, a Hugging Face convention: its tokenizer turns special-token strings
inside a text into special tokens (the course's `encode` never does, so a message cannot forge
a role marker). `transformers` and `safetensors` come with the dev extra (`pip install -e
".[dev]"`), not with the course: this module imports them only when it needs them.
"""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from lilllm import LilllmError
from lilllm.chat import BEGIN, END, ROLE_TOKENS, chat_template, stop_ids
from lilllm.checkpoint import load_model
from lilllm.config import ModelConfig
from lilllm.model import GPT
from lilllm.runtime import import_quietly, write_atomically
from lilllm.tokenizer import SPECIAL_TOKENS, BPETokenizer, CharTokenizer, Tokenizer, _gpt2_byte_to_char

ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
# GPT-2's activation_function for each of the course's GELU MLPs: the exact GELU, and the tanh
# approximation GPT-2 was trained with (which Hugging Face computes as gelu_new, and the same
# formula through PyTorch's kernel as gelu_pytorch_tanh)
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
GPT2_TANH_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _require(module: str):
    """A module of `safetensors` or `transformers`, imported when first needed: the course
    runs without them."""
    try:
        return import_quietly(module)
    except ImportError:
        raise LilllmError(f'the Hugging Face door needs {module.split(".")[0]}: pip install -e ".[dev]"') from None


def import_transformers():
    """`transformers`, as lilllm uses it: imported quietly, its progress bars (on stderr) off."""
    transformers = _require("transformers")
    transformers.logging.disable_progress_bar()
    return transformers


# --- which Hugging Face class holds a course model ----------------------------------------------

def hf_architecture(config: ModelConfig) -> str:
    """"llama" or "gpt2": the family whose Hugging Face class computes what `config` computes.
    Raises a LilllmError naming every setting neither can hold."""
    kinds = {(config.layer(i).attention, config.layer(i).ffn) for i in range(config.n_layers)}
    attentions, ffns = {attention for attention, _ in kinds}, {ffn for _, ffn in kinds}
    problems = []
    if len(kinds) > 1:
        problems.append("a per-layer mix of kinds")
    if "plga" in attentions:
        problems.append("PLGA attention")
    if "moe" in ffns:
        problems.append("a mixture-of-experts ffn")
    if config.block == "parallel":
        problems.append("the parallel block")
    if config.norm_placement == "post":
        problems.append("post-norm blocks")
    if config.qk_norm != "none":
        problems.append(f"qk_norm={config.qk_norm}")
    if config.sharing is not None:
        problems.append("shared blocks (config.sharing)")
    if config.positions == "rope":  # the position kind picks the family: RoPE is Llama's
        if config.norm != "rmsnorm":
            problems.append("layernorm with rope positions (Llama normalises with RMSNorm)")
        for kind in sorted(ffns - {"swiglu", "moe"}):
            problems.append(f"a {kind} ffn with rope positions (Llama's MLP is SwiGLU)")
        if config.bias:
            problems.append("biases in a Llama-style model")
    elif config.positions == "learned":  # GPT-2's
        if config.norm != "layernorm":
            problems.append("rmsnorm with learned positions (GPT-2 normalises with LayerNorm)")
        if not config.norm_bias:
            problems.append("norm_bias=False (GPT-2's LayerNorm has a bias)")
        for kind in sorted(ffns - set(GPT2_ACTIVATIONS) - {"moe"}):
            problems.append(f"a {kind} ffn with learned positions (GPT-2's MLP is GELU)")
        if config.n_kv_heads != config.n_heads:
            problems.append("grouped key/value heads with learned positions (GPT-2 is multi-head)")
        if config.head_dim * config.n_heads != config.d_model:
            problems.append("head_dim × n_heads ≠ d_model (GPT-2 splits the width into its heads)")
    else:
        problems.append(f"{config.positions} positions")
    if problems:
        raise LilllmError(f"Hugging Face's {' and '.join(ARCHITECTURES.values())} cannot hold this model: "
                          f"{'; '.join(problems)}")
    return "llama" if config.positions == "rope" else "gpt2"


# --- the weights: one table for both directions -------------------------------------------------

# Per layer: the course tensors (several are put side by side) → the Hugging Face tensor.
LLAMA_LAYER = [
    (["attn_norm.weight"], "input_layernorm.weight"),
    (["attn.q_proj.weight"], "self_attn.q_proj.weight"),
    (["attn.k_proj.weight"], "self_attn.k_proj.weight"),
    (["attn.v_proj.weight"], "self_attn.v_proj.weight"),
    (["attn.out_proj.weight"], "self_attn.o_proj.weight"),
    (["ffn_norm.weight"], "post_attention_layernorm.weight"),
    (["ffn.gate.weight"], "mlp.gate_proj.weight"),
    (["ffn.up.weight"], "mlp.up_proj.weight"),
    (["ffn.down.weight"], "mlp.down_proj.weight"),
]
GPT2_LAYER = [
    (["attn_norm.weight"], "ln_1.weight"),
    (["attn_norm.bias"], "ln_1.bias"),
    (["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"], "attn.c_attn.weight"),
    (["attn.q_proj.bias", "attn.k_proj.bias", "attn.v_proj.bias"], "attn.c_attn.bias"),
    (["attn.out_proj.weight"], "attn.c_proj.weight"),
    (["attn.out_proj.bias"], "attn.c_proj.bias"),
    (["ffn_norm.weight"], "ln_2.weight"),
    (["ffn_norm.bias"], "ln_2.bias"),
    (["ffn.up.weight"], "mlp.c_fc.weight"),
    (["ffn.up.bias"], "mlp.c_fc.bias"),
    (["ffn.down.weight"], "mlp.c_proj.weight"),
    (["ffn.down.bias"], "mlp.c_proj.bias"),
]


def weight_map(config: ModelConfig) -> list[tuple[list[str], str]]:
    """Every Hugging Face tensor of the model, by name, with the course tensors it is made of
    (one, or GPT-2's q, k and v side by side). GPT-2's biases are listed even when the course
    model has none."""
    if hf_architecture(config) == "llama":
        names = [(["tok_emb.weight"], "model.embed_tokens.weight")]
        names += [([f"blocks.{i}.{course}" for course in courses], f"model.layers.{i}.{hf}")
                  for i in range(config.n_layers) for courses, hf in LLAMA_LAYER]
        return names + [(["norm.weight"], "model.norm.weight"), (["head.weight"], "lm_head.weight")]
    names = [(["tok_emb.weight"], "transformer.wte.weight"), (["pos_emb.weight"], "transformer.wpe.weight")]
    names += [([f"blocks.{i}.{course}" for course in courses], f"transformer.h.{i}.{hf}")
              for i in range(config.n_layers) for courses, hf in GPT2_LAYER]
    return names + [(["norm.weight"], "transformer.ln_f.weight"), (["norm.bias"], "transformer.ln_f.bias"),
                    (["head.weight"], "lm_head.weight")]


def is_conv1d_weight(hf_name: str) -> bool:
    """GPT-2's c_attn, c_proj and c_fc are Conv1D layers: weight (in, out), nn.Linear's transposed."""
    return hf_name.startswith("transformer.h.") and ".c_" in hf_name and hf_name.endswith(".weight")


def hf_weights(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names and layouts, on the CPU."""
    state = model.state_dict()
    tensors = {}
    for courses, hf_name in weight_map(model.config):
        if hf_name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # Hugging Face stores a tied head once, as the embedding
        tensor = torch.cat([_course_tensor(state, name) for name in courses])  # (Σ out, in) or (Σ out,)
        tensors[hf_name] = (tensor.t() if is_conv1d_weight(hf_name) else tensor).detach().cpu().contiguous()
    return tensors


def _course_tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """state[name]; a bias the model was built without (bias=False) is zeros, since GPT-2 always has one."""
    if name in state:
        return state[name]
    weight = state[name.removesuffix("bias") + "weight"]
    return weight.new_zeros(weight.size(0))


def course_weights(hf_state: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """The inverse of `hf_weights`: a state dict for `model` from Hugging Face's tensors."""
    sizes = {name: tensor.size(0) for name, tensor in model.state_dict().items()}
    state = {}
    for courses, hf_name in weight_map(model.config):
        tensor = hf_state[hf_name].float()
        tensor = tensor.t() if is_conv1d_weight(hf_name) else tensor
        state.update(zip(courses, tensor.split([sizes[name] for name in courses])))
    return state


# --- the settings ---------------------------------------------------------------------------------

def hf_config(model: GPT, tokenizer: Tokenizer) -> dict:
    """config.json: every setting under the Hugging Face class's name for it."""
    c = model.config
    family = hf_architecture(c)  # first: refuses what neither class holds
    common = {"vocab_size": c.vocab_size, "tie_word_embeddings": c.tie_embeddings,
              # <|endoftext|> starts a text; it or the end of a chat turn ends one (lilllm.chat.stop_ids)
              "bos_token_id": tokenizer.special_ids[BEGIN], "eos_token_id": stop_ids(tokenizer),
              "torch_dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}
    hidden = model.blocks[0].ffn.up.out_features  # the width the module has, whichever rule set it
    if family == "llama":
        return {"architectures": [ARCHITECTURES["llama"]], "model_type": "llama", **common,
                "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "intermediate_size": hidden,
                "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_base, "rope_scaling": None,
                "max_position_embeddings": c.block_size, "attention_bias": False, "mlp_bias": False,
                "attention_dropout": c.dropout}
    return {"architectures": [ARCHITECTURES["gpt2"]], "model_type": "gpt2", **common,
            "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": hidden,
            "n_positions": c.block_size, "layer_norm_epsilon": c.norm_eps,
            "activation_function": GPT2_ACTIVATIONS[c.layer(0).ffn],  # one kind in every layer (hf_architecture)
            "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "resid_pdrop": c.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}


# --- the tokenizer ------------------------------------------------------------------------------

def bpe_merges(tokenizer: BPETokenizer) -> list[tuple[bytes, bytes]]:
    """The merges of a byte-level BPE, in rank order. tiktoken keeps only ranks; `tokenizers`
    wants, for each learned token, the pair it joins. That pair is what BPE makes of the
    token's bytes with the merges ranked before it: exactly two pieces."""
    ranks = {token: rank for rank, token in enumerate(tokenizer.token_bytes)}
    merges = []
    for rank, token in enumerate(tokenizer.token_bytes):
        if len(token) == 1:
            continue  # a byte of the base alphabet: nothing joins it
        pieces = [bytes([byte]) for byte in token]
        while len(pieces) > 2:  # tiktoken's rule: join the adjacent pair of lowest rank first
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(pieces, pieces[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            pieces[best:best + 2] = [pieces[best] + pieces[best + 1]]
        if len(pieces) != 2:
            raise LilllmError(f"token {rank} ({token!r}) is not the merge of two tokens ranked before it: "
                              "this BPE has no Hugging Face form")
        merges.append((pieces[0], pieces[1]))
    return merges


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """tokenizer.json: the same ids, served by the `tokenizers` library."""
    if isinstance(tokenizer, CharTokenizer):
        # a BPE without merges and without a pre-tokenizer splits the text into characters
        hf = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(tokenizer.chars)}, merges=[]))
        hf.decoder = decoders.Fuse()  # the characters joined as they are (no spaces between tokens)
    else:
        char_of = _gpt2_byte_to_char()  # `tokenizers` spells each byte as a printable character, GPT-2's way
        as_text = lambda token: "".join(char_of[byte] for byte in token)
        vocab = {as_text(token): i for i, token in enumerate(tokenizer.token_bytes)}
        merges = [(as_text(a), as_text(b)) for a, b in bpe_merges(tokenizer)]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, as train_hf_bpe's
        hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(SPECIAL_TOKENS))  # after the ordinary vocabulary, as in the course
    return hf.to_str()


def chat_template_jinja(name: str) -> str:
    """The Jinja twin of lilllm.chat's template `name`, for tokenizer_config.json."""
    chat_template(name)  # refuses an unknown name
    if name == "plain":  # plain_prompt: each message a speech of a play, ending in a blank line
        return "{%- for message in messages -%}{{- message['content'].strip('\\n') + '\\n\\n' -}}{%- endfor -%}"
    # render_conversation, then chat_prompt's <|assistant|>; check_conversation's two rules
    return ("{%- set role_tokens = " + json.dumps(ROLE_TOKENS) + " -%}"
            "{{- '" + BEGIN + "' -}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in role_tokens -%}"
            "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
            "{%- elif message['role'] == 'system' and not loop.first -%}"
            "{{- raise_exception('a system message may only come first') -}}"
            "{%- endif -%}"
            "{{- role_tokens[message['role']] + message['content'] + '" + END + "' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '" + ROLE_TOKENS["assistant"] + "' -}}{%- endif -%}")


def tokenizer_config(block_size: int, template: str) -> dict:
    """tokenizer_config.json: the generic fast tokenizer class (it reads tokenizer.json as it is),
    the special tokens and the chat template."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BEGIN, "eos_token": BEGIN,
            "clean_up_tokenization_spaces": False,  # decode returns the text, spaces untouched
            "model_max_length": block_size, "chat_template": chat_template_jinja(template)}


# --- export ---------------------------------------------------------------------------------------

def export(source, out_dir, template: str | None = None) -> Path:
    """Write `source`, a checkpoint path or a (model, tokenizer) pair, as a Hugging Face folder
    at `out_dir` (FILES). `template` names the chat template (default: the checkpoint's, else
    "plain"). Everything is checked before anything is written."""
    if isinstance(source, tuple):
        model, tokenizer = source
        template = template or "plain"
    else:
        model, tokenizer, state = load_model(source, device="cpu")
        template = template or state.get("chat_template", "plain")
    safetensors_torch = _require("safetensors.torch")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise LilllmError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model {model.config.vocab_size}: "
                          "export a model with the tokenizer it was trained with")
    files = {"config.json": json.dumps(hf_config(model, tokenizer), indent=2),  # refuses what Hugging Face cannot hold
             "tokenizer.json": tokenizer_json(tokenizer),
             "tokenizer_config.json": json.dumps(tokenizer_config(model.config.block_size, template),
                                                 indent=2, ensure_ascii=False),
             "model.safetensors": safetensors_torch.save(hf_weights(model), metadata={"format": "pt"})}
    out_dir = Path(out_dir)
    for name, content in files.items():
        write_atomically(out_dir / name, content)
    return out_dir


def loading_code(folder) -> str:
    """The line of Python that loads an exported folder with transformers."""
    return (f"from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}); "
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})")


def transformers_model(folder):
    """transformers' model of a local folder, in eval mode: what `loading_code`'s line builds."""
    return import_transformers().AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


# --- load -----------------------------------------------------------------------------------------

def course_config(hf) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama or GPT-2 config (transformers' object), refusing
    in one line what the course's layers do not compute."""
    problems = []
    if hf.model_type == "llama":
        # transformers 5 keeps RoPE's settings in rope_parameters, 4 in rope_theta and rope_scaling
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"rope scaling ({rope.get('rope_type', rope.get('type'))})")
        if hf.hidden_act != "silu":
            problems.append(f"hidden_act={hf.hidden_act} (SwiGLU gates with silu)")
        if hf.attention_bias or getattr(hf, "mlp_bias", False):
            problems.append("attention or mlp biases")
        values = dict(d_model=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
                      n_kv_heads=hf.num_key_value_heads, head_dim=getattr(hf, "head_dim", None),
                      ffn_hidden=hf.intermediate_size, norm_eps=hf.rms_norm_eps,
                      rope_base=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
                      block_size=hf.max_position_embeddings)
    elif hf.model_type == "gpt2":
        gelu = "gelu" if hf.activation_function == "gelu" else "gelu_tanh"
        if hf.activation_function not in ("gelu", *GPT2_TANH_ACTIVATIONS):
            problems.append(f"activation_function={hf.activation_function} (the course's MLPs compute gelu, "
                            f"gelu_new and gelu_pytorch_tanh)")
        if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx or hf.add_cross_attention:
            problems.append("attention scaled otherwise than by 1/√head_dim, or cross-attention")
        values = dict(d_model=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head, n_kv_heads=None,
                      ffn=gelu, ffn_hidden=hf.n_inner or 4 * hf.n_embd, norm="layernorm",
                      norm_eps=hf.layer_norm_epsilon, positions="learned", bias=True, block_size=hf.n_positions)
    else:
        raise LilllmError(f"a {hf.model_type} model: lilllm.hf.load reads {' and '.join(ARCHITECTURES.values())} "
                          "folders only")
    if problems:
        raise LilllmError(f"this {ARCHITECTURES[hf.model_type]} has what the course's layers do not compute: "
                          f"{'; '.join(problems)}")
    return ModelConfig(vocab_size=hf.vocab_size, tie_embeddings=hf.tie_word_embeddings, **values)


def _canonical(tokenizer_text: str) -> dict:
    """What decides a tokenizer.json's ids, in one spelling: merges as pairs (older files
    write "a b"), added tokens as (id, text, special); no version, padding or truncation."""
    content = json.loads(tokenizer_text)
    model = dict(content["model"])
    model["merges"] = [merge.split(" ") if isinstance(merge, str) else list(merge) for merge in model.get("merges", [])]
    added = [(token["id"], token["content"], token["special"]) for token in content.get("added_tokens", [])]
    return {**{key: content.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder")},
            "model": model, "added_tokens": added}


def course_tokenizer(folder) -> Tokenizer | None:
    """The course tokenizer of a folder's tokenizer.json (None if it has none). Only a
    tokenizer the course serves with the same ids is read: one whose content `export` would
    write again (`_canonical`); anything else is refused in one line."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    refusal = (f"{path} is not a tokenizer the course serves with the same ids (a byte-level BPE with "
               f"merges in rank order, or characters, then the course's {len(SPECIAL_TOKENS)} special tokens): "
               "load(folder, tokenizer=False) and encode with transformers' AutoTokenizer")
    byte_of = {char: byte for byte, char in _gpt2_byte_to_char().items()}
    try:
        content = json.loads(text)
        vocab = content["model"]["vocab"] if content["model"].get("type") == "BPE" else {}
        ordinary = sorted(vocab, key=vocab.get)  # the tokens in id order
        if content.get("pre_tokenizer"):  # a byte-level BPE: each character of a token stands for a byte
            candidate = BPETokenizer([bytes(byte_of[char] for char in token) for token in ordinary])
        else:  # no pre-tokenizer: the course's characters, one token each
            candidate = CharTokenizer("".join(ordinary)) if all(len(token) == 1 for token in ordinary) else None
        same = candidate is not None and _canonical(tokenizer_json(candidate)) == _canonical(text)
    except (KeyError, TypeError, ValueError, LilllmError):  # not JSON, a character that stands for no byte...
        same = False
    if not same:
        raise LilllmError(refusal)
    return candidate


def load(folder, tokenizer: bool = True) -> tuple[GPT, Tokenizer | None]:
    """A course GPT (in eval mode, fp32, on the CPU) from a local Hugging Face folder of a
    LlamaForCausalLM or GPT2LMHeadModel, and its course tokenizer (`course_tokenizer`; None
    when the folder has none, or with tokenizer=False). Nothing is downloaded."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LilllmError(f"{folder} has no config.json: give the folder of a Hugging Face model "
                          "(save_pretrained or lilllm export wrote it)")
    transformers = import_transformers()
    try:
        hf = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise LilllmError(f"{folder}/config.json cannot be read ({reason})") from None
    if any(name not in ARCHITECTURES.values() for name in hf.architectures or []):
        raise LilllmError(f"a {', '.join(hf.architectures)}: lilllm.hf.load reads "
                          f"{' and '.join(ARCHITECTURES.values())} folders only")
    model = GPT(course_config(hf))
    course = course_tokenizer(folder) if tokenizer else None
    if course is not None and course.vocab_size != model.config.vocab_size:
        raise LilllmError(f"{folder} is inconsistent: its tokenizer has {course.vocab_size} tokens, its model "
                          f"{model.config.vocab_size}")
    model.load_state_dict(course_weights(transformers_model(folder).state_dict(), model))
    return model.eval(), course
