"""The Hugging Face door, offline: course models exported and loaded by transformers give the
same logits, greedy tokens, token ids and chat strings; Llama and GPT-2 models made by
transformers load as course models; each model either side cannot hold is refused in one line."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never download anything
os.environ["HF_DATASETS_OFFLINE"] = "1"

import functools
import json
import sys

import pytest
import torch
import transformers
from jinja2.exceptions import TemplateError
from transformers import AutoModelForCausalLM, AutoTokenizer

from lilllm import LilllmError
from lilllm.chat import chat_prompt, plain_prompt, render_conversation
from lilllm.checkpoint import load_model
from lilllm.cli import main as cli_main
from lilllm.config import ModelConfig
from lilllm.data import load_text, train_val_split
from lilllm.hf import export, load
from lilllm.model import GPT
from lilllm.sampling import generate
from lilllm.tokenizer import BPETokenizer, CharTokenizer
from lilllm.train import make_config, train

ATOL = 1e-4
SMALL = dict(d_model=64, n_layers=2, n_heads=4, block_size=64)
# (preset, overrides): both families, and the settings each maps beside its preset's
MODELS = {
    "default": ("default", {}),
    "default-untied-mqa-wide-heads": ("default", {"tie_embeddings": False, "n_kv_heads": 1, "head_dim": 24,
                                                  "rope_base": 500.0, "norm_eps": 1e-6, "ffn_hidden": 96}),
    "gpt2": ("gpt2", {}),
    "gpt2-without-biases-untied": ("gpt2", {"bias": False, "tie_embeddings": False, "ffn_hidden": 80}),
    "gpt2-tanh-gelu": ("gpt2", {"ffn": "gelu_tanh"}),  # GPT-2's own activation: gelu_new
}
CONVERSATIONS = [
    [{"role": "user", "content": "Who speaks next?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a king."},
     {"role": "assistant", "content": "Richard."}, {"role": "user", "content": "Another,\nplease: é 日"}],
    [{"role": "user", "content": "  spaces  \n\n"}, {"role": "assistant", "content": ""}],
]


def scrambled(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random and large enough that each mapping matters (norm gains and biases
    around 1, not their init's 1 and 0) and greedy choices are clear; eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1.0 if param.dim() == 1 else noise)
    return module.eval()


@pytest.fixture(scope="module")
def val_text():
    return train_val_split(load_text())[1]


@pytest.fixture(scope="module")
def bpe():
    """A 512-token byte-level BPE of the train split, as tests/test_tokenizer.py trains it."""
    return BPETokenizer.train(train_val_split(load_text())[0], 512)


def course_model(name: str, vocab_size: int) -> GPT:
    preset, overrides = MODELS[name]
    return scrambled(GPT(ModelConfig.preset(preset, vocab_size=vocab_size, **{**SMALL, **overrides})))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model(ids)
    return output[0] if isinstance(output, tuple) else output.logits


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, bpe, tmp_path_factory):
    """(course model, its folder, transformers' model of it), the chat template "lilllm"."""
    model = course_model(request.param, bpe.vocab_size)
    folder = export((model, bpe), tmp_path_factory.mktemp(request.param), template="lilllm")
    return model, folder, AutoModelForCausalLM.from_pretrained(folder).eval()


# --- export -------------------------------------------------------------------------------------

def test_export_writes_the_class_of_the_family(exported):
    model, folder, hf_model = exported
    family = "LlamaForCausalLM" if model.config.positions == "rope" else "GPT2LMHeadModel"
    assert type(hf_model).__name__ == family
    if family == "GPT2LMHeadModel":
        assert hf_model.config.activation_function == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[model.config.ffn]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                        "tokenizer_config.json"]


def test_transformers_computes_the_same_logits(exported, bpe, val_text):
    model, _, hf_model = exported
    ids = torch.tensor([bpe.encode(val_text[:400])[:model.config.block_size]])
    assert torch.allclose(logits(hf_model, ids), logits(model, ids), atol=ATOL)


def test_transformers_greedy_generation_gives_the_same_tokens(exported, bpe):
    model, _, hf_model = exported
    prompt = bpe.encode("KING RICHARD III:\nNow is the winter")
    hf_model.generation_config.eos_token_id = None  # the course's generate does not stop either
    with torch.no_grad():
        hf_ids = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=20, pad_token_id=0)
    ours = generate(model, prompt, 20, temperature=0)
    assert hf_ids[0, len(prompt):].tolist() == ours and len(ours) == 20


def test_round_trip_export_then_load_gives_the_same_model_and_tokenizer(exported, bpe, val_text):
    model, folder, _ = exported
    loaded, tokenizer = load(folder)
    ids = torch.tensor([bpe.encode(val_text[:400])[:model.config.block_size]])
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=ATOL)
    assert isinstance(tokenizer, BPETokenizer) and tokenizer.fingerprint == bpe.fingerprint


def test_the_exported_bpe_gives_the_same_ids_and_text(bpe, val_text, tmp_path):
    folder = export((course_model("default", bpe.vocab_size), bpe), tmp_path)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in (val_text[:20_000], "é 日本 it's  <|user|> ok\n\n\t x"):
        ids = hf_tokenizer(text)["input_ids"]  # no token added: the course adds none either
        assert ids == bpe.encode(text, allow_special=True)
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.convert_ids_to_tokens(bpe.special_ids["<|end|>"]) == "<|end|>"


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_lilllm_chat_template_renders_the_same_string_and_ids(exported, bpe, messages):
    _, folder, _ = exported
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == bpe.decode(chat_prompt(bpe, messages))
    assert hf_tokenizer(prompt)["input_ids"] == chat_prompt(bpe, messages)
    rendered, _ = render_conversation(bpe, messages, need_assistant=False)
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == bpe.decode(rendered)


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                      [{"role": "tool", "content": "a"}]])
def test_the_chat_template_refuses_what_lilllm_chat_refuses(exported, messages):
    hf_tokenizer = AutoTokenizer.from_pretrained(exported[1])
    with pytest.raises(TemplateError, match="system message may only come first|unknown role tool"):
        hf_tokenizer.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_plain_template_renders_the_same_string(bpe, messages, tmp_path):
    folder = export((course_model("default", bpe.vocab_size), bpe), tmp_path)  # no template named: plain
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == bpe.decode(plain_prompt(bpe, messages))


# --- a trained checkpoint, from the command line (a character tokenizer) --------------------------

@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("run")
    settings = [f"--data_dir={small_data}", f"--out_dir={out_dir}", "--steps=6", "--model.d_model=32",
                "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.block_size=16",
                "--batch_size=4", "--warmup=2", "--eval_interval=0"]
    train(make_config("tiny", settings), progress=False)
    return out_dir / "last.pt"


def test_lilllm_export_writes_a_folder_transformers_loads(checkpoint, tmp_path, capsys):
    assert cli_main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "config.json, model.safetensors, tokenizer.json, tokenizer_config.json" in out
    assert f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r})" in out
    model, tokenizer, _ = load_model(checkpoint, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = load_text()[27_000:29_000]  # small_data's val split: characters the tokenizer knows
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text) and hf_tokenizer.decode(tokenizer.encode(text)) == text
    ids = torch.tensor([tokenizer.encode(text)[:16]])
    assert torch.allclose(logits(hf_model, ids), logits(model, ids), atol=ATOL)
    plain = [{"role": "user", "content": "Good morrow.\n"}, {"role": "assistant", "content": "And to you."}]
    assert hf_tokenizer.apply_chat_template(plain, tokenize=False) == tokenizer.decode(plain_prompt(tokenizer, plain))
    loaded, loaded_tokenizer = load(tmp_path / "hf")
    assert isinstance(loaded_tokenizer, CharTokenizer) and loaded_tokenizer.fingerprint == tokenizer.fingerprint
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=ATOL)


def test_lilllm_export_reports_an_error_in_one_line(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


# --- load: models transformers made -----------------------------------------------------------------

HF_MODELS = {
    "llama-gqa-tied": lambda: transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rope_theta=5000.0),
    "llama-untied-wide-heads": lambda: transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-5),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu"),
    "gpt2-untied-n-inner": lambda: transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=80, activation_function="gelu",
        tie_word_embeddings=False, layer_norm_epsilon=1e-6),
    "gpt2-as-released": lambda: transformers.GPT2Config(  # the default activation, gelu_new: GPT-2's own
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt2-pytorch-tanh": lambda: transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, activation_function="gelu_pytorch_tanh"),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_load_reads_a_model_transformers_saved(name, tmp_path):
    hf_model = scrambled(AutoModelForCausalLM.from_config(HF_MODELS[name]()))
    hf_model.save_pretrained(tmp_path)
    model, tokenizer = load(tmp_path)
    assert tokenizer is None  # the folder has none
    ids = torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(model, ids), logits(hf_model, ids), atol=ATOL)


# --- refusals, each in one line -------------------------------------------------------------------

@pytest.mark.parametrize("preset, overrides, message", [
    ("default", {"attention": "plga", "plga": {"a_dff": 8, "n_units": 1}}, "PLGA attention"),
    ("default", {"ffn": "moe", "moe": {"n_experts": 2, "top_k": 1}}, "a mixture-of-experts ffn"),
    ("default", {"layers": [{"ffn": "gelu"}, {}]}, "a per-layer mix of kinds"),
    ("palm", {"positions": "rope", "norm": "rmsnorm", "norm_bias": True}, "the parallel block"),
    ("default", {"positions": "xpos"}, "xpos positions"),
    ("default", {"positions": "sinusoidal"}, "sinusoidal positions"),
    ("default", {"qk_norm": "rms"}, "qk_norm=rms"),
    ("default", {"n_layers": 4, "sharing": {}}, "shared blocks"),
    ("default", {"norm_placement": "post"}, "post-norm blocks"),
    ("default", {"norm": "layernorm"}, "layernorm with rope positions"),
    ("default", {"ffn": "gelu"}, "a gelu ffn with rope positions"),
    ("default", {"ffn": "relu2"}, "a relu2 ffn with rope positions"),
    ("gpt2", {"ffn": "relu2"}, "a relu2 ffn with learned positions"),
    ("default", {"bias": True}, "biases in a Llama-style model"),
    ("default", {"positions": "learned"}, "rmsnorm with learned positions"),
    ("gpt2", {"norm_bias": False}, "norm_bias=False"),
    ("gpt2", {"n_kv_heads": 2}, "grouped key/value heads with learned positions"),
    ("gpt2", {"head_dim": 8}, "head_dim × n_heads ≠ d_model"),
])
def test_export_refuses_what_neither_class_holds_in_one_line(bpe, preset, overrides, message, tmp_path):
    config = ModelConfig.preset(preset, vocab_size=bpe.vocab_size, **{**SMALL, **overrides})
    with pytest.raises(LilllmError, match="cannot hold this model: .*" + message) as error:
        export((GPT(config), bpe), tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_export_refuses_a_tokenizer_of_another_size(bpe, tmp_path):
    with pytest.raises(LilllmError, match="the tokenizer has 512 tokens but the model 600"):
        export((GPT(ModelConfig(vocab_size=600, **SMALL)), bpe), tmp_path)


@pytest.mark.parametrize("config, message", [
    (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "rope scaling \\(linear\\)"),
    (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, attention_bias=True), "attention or mlp biases"),
    (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, mlp_bias=True), "attention or mlp biases"),
    (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu"), "hidden_act=gelu"),
    (transformers.GPT2Config(n_embd=64, n_head=4, activation_function="relu"), "activation_function=relu"),
    (transformers.GPT2Config(n_embd=64, n_head=4, activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
     "attention scaled otherwise"),
    (transformers.MistralConfig(hidden_size=64, num_attention_heads=4), "MistralForCausalLM|a mistral model"),
])
def test_load_refuses_what_the_course_does_not_compute_in_one_line(config, message, tmp_path):
    config.save_pretrained(tmp_path)  # config.json alone: load refuses before it reads any weight
    with pytest.raises(LilllmError, match=message) as error:
        load(tmp_path)
    assert "\n" not in str(error.value)


def test_load_refuses_a_tokenizer_the_course_cannot_serve_but_loads_the_weights_without_it(bpe, tmp_path):
    folder = export((course_model("default", bpe.vocab_size), bpe), tmp_path)
    content = json.loads((folder / "tokenizer.json").read_text())
    content["added_tokens"] = content["added_tokens"][:1]  # GPT-2's way: <|endoftext|> alone
    (folder / "tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(LilllmError, match="not a tokenizer the course serves with the same ids.*tokenizer=False"):
        load(folder)
    model, tokenizer = load(folder, tokenizer=False)
    assert tokenizer is None and isinstance(model, GPT)


def test_load_refuses_a_folder_without_config_and_says_how_to_install_transformers(tmp_path, monkeypatch):
    with pytest.raises(LilllmError, match="has no config.json"):
        load(tmp_path)
    HF_MODELS["gpt2"]().save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(LilllmError, match=r'needs transformers: pip install -e "\.\[dev\]"'):
        load(tmp_path)


# --- the benchmark: one model, generated by lilllm and by transformers -----------------------------

def test_bench_generate_hf_times_one_model_in_both(monkeypatch, capsys):
    import lilllm.bench as bench

    small = ModelConfig(vocab_size=300, block_size=16, d_model=32, n_layers=1, n_heads=2)
    monkeypatch.setattr(bench, "bench_generate_hf", functools.partial(bench.bench_generate_hf, config=small))
    assert cli_main(["bench", "generate", "--hf", "--lengths", "4", "8", "--prompt-len", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "lilllm / transformers" in out[1]
    line = json.loads(out[-1])  # the figures, as every benchmark ends
    assert list(line["ratio"]) == ["4", "8"] and line["block_size"] == 16
    assert min(line["lilllm_tokens_s"].values()) > 0 and min(line["transformers_tokens_s"].values()) > 0
    assert cli_main(["bench", "generate", "--hf", "--device", "cuda"]) == 2
    assert "--hf times lilllm and transformers on the CPU" in capsys.readouterr().err
