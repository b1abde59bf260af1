"""Sampling and generation: each logits filter on hand-made logits (the exact kept set),
their order, greedy decoding, seeded reproducibility, cached == uncached generation for
every attention kind and position kind, the rolling window past the context, stop tokens,
streaming, every bad input, the benchmark, and the sample/chat/bench commands."""

import io
import json
import math
import re

import pytest
import torch

from lilllm import LilllmError
from lilllm.cli import main as cli_main
from lilllm.config import ModelConfig
from lilllm.bench import bench_generate
from lilllm.chat import chat_template, plain_prompt, stop_ids
from lilllm.checkpoint import load_model
from lilllm.data import load_text, prepare
from lilllm.layers.attention import cache_bytes
from lilllm.model import GPT
from lilllm.sampling import (apply_temperature, check_prompt, decode_stream, encode_prompt, generate, generate_tokens,
                             process_logits, sample_next, stream, top_k_filter, top_p_filter, until_blank_line)
from lilllm.tokenizer import BPETokenizer, CharTokenizer
from lilllm.train import BEST, make_config, train

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def small_model(seed=0, block_size=16, vocab_size=40, n_layers=2, **overrides) -> GPT:
    """A random model whose weights are large enough that its greedy choices vary."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, block_size=block_size, d_model=32, n_layers=n_layers, n_heads=4,
                         **overrides)
    model = GPT(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model.eval()


# --- the filters, one at a time ------------------------------------------------------------

def test_temperature_divides_and_works_in_fp32():
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert torch.equal(apply_temperature(logits, 2.0), torch.tensor([1.0, 0.5, 0.0]))
    tiny = apply_temperature(torch.tensor([3.0, 1.0], dtype=torch.float16), 1e-4)
    assert tiny.dtype == torch.float32 and torch.isfinite(tiny).all()  # in fp16 it would be inf


def test_temperature_sharpens_below_one_and_flattens_above():
    entropy = lambda t: -(process_logits(LOGITS, temperature=t).softmax(-1) * process_logits(
        LOGITS, temperature=t).log_softmax(-1)).sum()
    assert entropy(0.5) < entropy(1.0) < entropy(2.0)
    assert torch.allclose(process_logits(LOGITS, temperature=1.0).softmax(-1), PROBS)


def test_top_k_keeps_the_k_highest():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert kept(top_k_filter(logits, 2)) == {1, 2}
    assert kept(top_k_filter(logits, 1)) == {1}
    assert kept(top_k_filter(logits, 10)) == {0, 1, 2, 3}  # k ≥ V: nothing removed
    assert kept(top_k_filter(torch.tensor([1.0, 3.0, 3.0, 0.0]), 1)) == {1, 2}  # ties with the k-th stay
    rows = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 0.0, 1.0, 2.0]])
    assert torch.isfinite(top_k_filter(rows, 2)).tolist() == [[False, True, True, False], [True, False, False, True]]


@pytest.mark.parametrize("p, expected", [(0.4, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3}),
                                         (1e-9, {0})])
def test_top_p_keeps_the_token_that_crosses_p(p, expected):
    """Probabilities 0.5, 0.3, 0.15, 0.05: the nucleus is the shortest prefix whose mass reaches p."""
    assert kept(top_p_filter(LOGITS, p)) == expected
    shuffled = torch.tensor([2, 0, 3, 1])  # the same logits in another order: the same tokens kept
    assert kept(top_p_filter(LOGITS[shuffled], p)) == {int((shuffled == i).nonzero()) for i in expected}


def test_top_p_keeps_ties_with_the_cutoff():
    assert kept(top_p_filter(torch.tensor([1.0, 1.0, 0.0]), 0.3)) == {0, 1}


def test_neutral_settings_change_nothing():
    assert torch.equal(process_logits(LOGITS, temperature=1.0, top_k=0, top_p=1.0), LOGITS)


def test_order_is_temperature_then_top_k_then_top_p():
    # Temperature 2 flattens 0.5/0.3/0.15/0.05 to 0.38/0.29/0.21/0.12: three tokens reach 0.75.
    assert kept(process_logits(LOGITS, temperature=2.0, top_p=0.75)) == {0, 1, 2}
    assert kept(apply_temperature(top_p_filter(LOGITS, 0.75), 2.0)) == {0, 1}  # top-p first: two
    # Top-k 3 renormalises to 0.53/0.32/0.16: two tokens reach 0.82; on the full distribution, three.
    assert kept(process_logits(LOGITS, top_k=3, top_p=0.82)) == {0, 1}
    assert kept(top_k_filter(top_p_filter(LOGITS, 0.82), 3)) == {0, 1, 2}


def test_greedy_is_argmax_and_draws_no_random_numbers():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    for options in ({"temperature": 0.0}, {"top_k": 1}, {"temperature": 0.0, "top_p": 0.5}):
        assert torch.equal(sample_next(logits, generator=generator, **options), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)


def test_samples_come_only_from_the_kept_set_in_proportion():
    logits = LOGITS.expand(4000, 4)  # 4,000 independent draws at once
    draws = sample_next(logits, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03  # renormalised over the kept set: 0.625


# --- generation -------------------------------------------------------------------------

KINDS = {
    "mha": {"n_kv_heads": 4}, "gqa": {"n_kv_heads": 2}, "mqa": {"n_kv_heads": 1},
    "learned": {"n_kv_heads": 2, "positions": "learned", "norm": "layernorm", "ffn": "gelu"},
    "sinusoidal": {"n_kv_heads": 4, "positions": "sinusoidal"},
    "palm": {"n_kv_heads": 1, "block": "parallel", "positions": "xpos", "norm": "layernorm", "norm_bias": False,
             "qk_norm": "l2"},
}
SETTINGS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 7}}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_uncached_within_the_context(kind, setting):
    model = small_model(**KINDS[kind])
    prompt = [3, 1, 4, 1, 5]
    cached = generate(model, prompt, 11, **SETTINGS[setting])  # 5 + 11 = block_size 16
    assert len(cached) == 11 and len(set(cached)) > 2
    assert cached == generate(model, prompt, 11, use_cache=False, **SETTINGS[setting])


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_absolute_positions_past_the_context_recompute_the_window(kind):
    """Learned positions end at block_size: past it each step recomputes the last block_size
    tokens, exactly what the uncached path does."""
    model = small_model(**KINDS[kind])
    for setting in SETTINGS.values():
        cached = generate(model, [2, 7], 50, **setting)
        assert len(cached) == 50 and cached == generate(model, [2, 7], 50, use_cache=False, **setting)


@pytest.mark.parametrize("positions", ["rope", "xpos"])
def test_rope_rolling_window_equals_recomputing_with_one_layer(positions):
    """With one layer, cached keys depend only on their token and position, and RoPE (and xPos)
    scores only on distances: the rolling window then sees exactly what recomputing the last
    block_size tokens sees (with more layers the cached keys remember an older context)."""
    model = small_model(n_layers=1, n_kv_heads=2, positions=positions)
    for setting in SETTINGS.values():
        cached = generate(model, [5, 9, 2], 60, **setting)
        assert cached == generate(model, [5, 9, 2], 60, use_cache=False, **setting)


def test_rope_rolling_window_keeps_the_cache_within_the_context_and_positions_absolute(monkeypatch):
    model = small_model(n_kv_heads=2)
    calls = []
    forward = model.forward

    def spy(ids, targets=None, cache=None):
        calls.append((ids.size(1), len(cache), cache.position))
        return forward(ids, targets, cache)

    monkeypatch.setattr(model, "forward", spy)
    prompt = list(range(20))  # longer than the context: the prefill keeps its last 16 tokens
    out = generate(model, prompt, 40, temperature=0)
    assert len(out) == 40
    assert calls[0] == (16, 0, 0)  # one prefill of block_size tokens
    for step, (n_new, cached, position) in enumerate(calls[1:], start=1):
        assert (n_new, cached, position) == (1, 15, 15 + step)  # one token, a full window, its true position


def test_stop_tokens_end_generation_and_are_not_returned():
    model = small_model()
    full = generate(model, [1, 2, 3], 12, temperature=0)
    first_new = next(i for i, token in enumerate(full) if token not in full[:i] and i >= 2)
    assert generate(model, [1, 2, 3], 12, temperature=0, stop_ids=[full[first_new]]) == full[:first_new]
    assert generate(model, [1, 2, 3], 0, temperature=0) == []


def test_seeded_sampling_is_reproducible():
    model = small_model()
    first = generate(model, [1], 15, seed=3)
    assert first == generate(model, [1], 15, seed=3)
    assert first != generate(model, [1], 15, seed=4)


# --- streaming ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE with few merges: 'é' and '日' are split over several byte tokens."""
    return BPETokenizer.train("the cat sat on the mat, the hat " * 20, vocab_size=256 + 8 + 10)


def test_decode_stream_never_splits_a_character(bpe):
    text = "thé 日本 cat"
    ids = bpe.encode(text)
    assert len(ids) > len(text.encode()) - 12  # most characters are bytes here, several per character
    pieces = list(decode_stream(bpe, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "日" in pieces or any(piece.startswith("日") for piece in pieces)


def test_decode_stream_ends_an_unfinished_character_like_decode(bpe):
    ids = bpe.encode("a日")[:-1]  # the last byte of 日 missing
    assert "".join(decode_stream(bpe, ids)) == bpe.decode(ids) == "a\ufffd"


def test_stream_reassembles_to_the_generated_text(bpe):
    model = small_model(vocab_size=bpe.vocab_size)
    prompt = bpe.encode("the cat")
    text = "".join(stream(model, bpe, prompt, 40, seed=1))
    assert text == bpe.decode(generate(model, prompt, 40, seed=1)) and text


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"temperature": -0.5}, "temperature=-0.5 is negative"),
    ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, r"top_p=0.0 must lie in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must lie in \(0, 1\]"),
    ({"top_p": -0.1}, r"top_p=-0.1 must lie in \(0, 1\]"),
    ({"top_k": -1}, "top_k=-1 must be a whole number ≥ 0"),
    ({"top_k": 2.5}, "top_k=2.5 must be a whole number"),
])
def test_bad_sampling_settings_are_refused_before_generating(options, match):
    model = small_model()
    with pytest.raises(LilllmError, match=match):
        generate_tokens(model, [1, 2], 5, **options)  # raised by the call, before any step


def test_bad_prompts_and_lengths_are_refused():
    model = small_model()
    with pytest.raises(LilllmError, match="the prompt is empty"):
        generate_tokens(model, [], 5)
    with pytest.raises(LilllmError, match="prompt token id 40 is outside the model's vocabulary"):
        generate_tokens(model, [1, 40], 5)
    with pytest.raises(LilllmError, match="max_new_tokens=-1"):
        generate_tokens(model, [1], -1)
    with pytest.raises(LilllmError, match="the prompt is empty"):
        encode_prompt(CharTokenizer("abc"), "")
    with pytest.raises(LilllmError, match="character '€' is not in this character tokenizer's vocabulary"):
        encode_prompt(CharTokenizer("abc"), "a€")
    with pytest.raises(LilllmError, match="unknown chat template 'fancy'"):
        chat_template("fancy")
    assert check_prompt(torch.tensor([1, 2]), 40) == [1, 2]


def test_plain_prompt_and_stop_ids():
    tokenizer = CharTokenizer("abc\n")
    messages = [{"role": "user", "content": "ab\n"}, {"role": "assistant", "content": "ca\n"}]
    assert chat_template("plain") is plain_prompt
    assert tokenizer.decode(plain_prompt(tokenizer, messages)) == "ab\n\nca\n\n"  # speeches, as in the play
    assert stop_ids(tokenizer) == [tokenizer.special_ids["<|endoftext|>"], tokenizer.special_ids["<|end|>"]]


@pytest.mark.parametrize("pieces, expected", [
    (["Nay, answer me", "\n", "\nFRANCISCO:"], "Nay, answer me"),  # the blank line comes in two pieces
    (["Stand,\nand unfold", " yourself.\n\nLong"], "Stand,\nand unfold yourself."),  # one newline is kept
    (["no blank line\n"], "no blank line"),
    (["\n\nat once"], ""),
])
def test_until_blank_line_ends_a_reply_where_the_speech_ends(pieces, expected):
    assert "".join(until_blank_line(pieces)) == expected


# --- the benchmark ------------------------------------------------------------------------

def test_cache_bytes_matches_the_cache():
    model = small_model(n_kv_heads=2)
    cache = model.new_cache()
    model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache_bytes(model.config, 9) == held


def test_bench_generate_reports_both_paths():
    config = ModelConfig(vocab_size=64, block_size=32, d_model=32, n_layers=1, n_heads=2)
    result = bench_generate(lengths=(4, 8, 40), prompt_len=4, configs={"small": config})
    rows = result["models"]["small"]["rows"]
    assert [row["new_tokens"] for row in rows] == [4, 8, 40]
    assert [row["same_tokens"] for row in rows] == [True, True, None]
    assert all(row["cached_tokens_s"] > 0 and row["uncached_tokens_s"] > 0 for row in rows)
    line = result["line"]["small"]
    assert line["speedup_512"] is None and line["cache_bytes_full"] == cache_bytes(config, 32)


def test_bench_generate_times_the_model_learners_train_and_the_default():
    from lilllm.bench import generation_models
    from lilllm.train import TrainConfig

    models = generation_models(vocab_size=2048)
    assert models["tiny"] == TrainConfig().model_config(2048)
    assert models["default"] == ModelConfig(vocab_size=2048)
    assert (models["tiny"].n_layers, models["tiny"].block_size) == (2, 128)


# --- the command line ---------------------------------------------------------------------

SMALL = ["--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1",
         "--model.block_size=16", "--batch_size=4", "--warmup=2", "--eval_interval=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A character-level model trained for a few steps on the first 20,000 characters."""
    folder = tmp_path_factory.mktemp("sampling")
    (folder / "small.txt").write_text(load_text()[:20_000])
    prepare("char", None, [folder / "small.txt"], folder / "data")
    train(make_config("tiny", [f"--data_dir={folder / 'data'}", f"--out_dir={folder / 'run'}", "--steps=3", *SMALL]),
          progress=False)
    return folder / "run" / BEST


def test_cli_sample_prints_the_seeded_continuation(checkpoint, capsys):
    args = ["sample", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "5",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"]
    capsys.readouterr()
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert cli_main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == printed
    model, tokenizer, _ = load_model(checkpoint, "cpu")
    expected = tokenizer.decode(generate(model, tokenizer.encode("ROMEO:"), 30, temperature=0.8, top_k=20,
                                         top_p=0.9, seed=5, stop_ids=stop_ids(tokenizer)))
    assert printed == "ROMEO:" + expected + "\n"  # the prompt, then its continuation


def test_cli_sample_dims_the_prompt_on_a_terminal(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert cli_main(["sample", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("\033[2mROMEO:\033[0m")


class Terminal(io.StringIO):
    """Typed input: what `lilllm chat` reads when a person types."""

    def isatty(self):
        return True


def chat(checkpoint, monkeypatch, typed: str, *, terminal=False, replies=None) -> list[str]:
    """Run `lilllm chat` on `typed`; with `replies` (a function of the prompt's ids giving text
    pieces) instead of the model. Returns the prompts the model was given, as text."""
    import lilllm.sampling

    _, tokenizer, _ = load_model(checkpoint, "cpu")
    prompts, real_stream = [], lilllm.sampling.stream

    def recording_stream(model, tokenizer_, prompt_ids, max_new_tokens, **options):
        prompts.append(tokenizer.decode(prompt_ids))
        return replies(prompt_ids) if replies else real_stream(model, tokenizer_, prompt_ids, max_new_tokens, **options)

    monkeypatch.setattr(lilllm.sampling, "stream", recording_stream)
    monkeypatch.setattr("sys.stdin", Terminal(typed) if terminal else io.StringIO(typed))
    assert cli_main(["chat", str(checkpoint), "--max-new-tokens", "12", "--seed", "0"]) == 0
    return prompts


def test_cli_chat_reads_piped_turns(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    chat(checkpoint, monkeypatch, "Good morrow.\nWhat news?\n")
    out = capsys.readouterr().out
    replies = [line for line in out.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 2


def test_cli_chat_says_a_pretrained_model_is_not_chat_tuned(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    chat(checkpoint, monkeypatch, "Good morrow.\n")
    note = capsys.readouterr().err
    assert "is a pretrained model, not chat-tuned" in note and "fine-tune one with `lilllm sft`" in note


def test_cli_chat_ends_on_exit_or_quit_without_sending_it(checkpoint, capsys, monkeypatch):
    for word in ("exit", "quit", " Quit "):
        prompts = chat(checkpoint, monkeypatch, f"Good morrow.\n{word}\nNever read.\n")
        assert len(prompts) == 1 and word.strip().lower() not in prompts[0].lower()


def test_cli_chat_stops_a_pretrained_model_at_the_end_of_its_speech(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    speech = lambda prompt: iter(["BERNARDO:\nLong live", " the king!\n", "\nFRANCISCO:\nYou come"])
    prompts = chat(checkpoint, monkeypatch, "Who's there?\nWhat news?\n", replies=speech)
    assert "assistant: BERNARDO:\nLong live the king!\n" in capsys.readouterr().out
    assert "FRANCISCO" not in prompts[1]  # the history holds the speech as it was shown
    assert prompts[1].endswith("Who's there?\n\nBERNARDO:\nLong live the king!\n\nWhat news?\n\n")


def test_cli_chat_stops_a_chat_tuned_model_at_its_end_of_turn(checkpoint, capsys, monkeypatch, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "chat_template": "lilllm"}, tmp_path / "tuned.pt")  # as lilllm sft names it
    used = []

    def recording_generate(model, prompt_ids, max_new_tokens, **options):
        used.append(options["stop_ids"])
        return iter([])

    monkeypatch.setattr("lilllm.sampling.generate_tokens", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("Who's there?\n"))
    capsys.readouterr()
    assert cli_main(["chat", str(tmp_path / "tuned.pt")]) == 0
    captured = capsys.readouterr()
    _, tokenizer, _ = load_model(checkpoint, "cpu")
    assert used == [stop_ids(tokenizer)] and tokenizer.special_ids["<|end|>"] in used[0]
    assert "not chat-tuned" not in captured.err


def test_cli_chat_ctrl_c_stops_the_reply_not_the_chat(checkpoint, capsys, monkeypatch):
    def interrupted(prompt):
        yield "Long live"
        raise KeyboardInterrupt  # what Ctrl-C raises while the model writes

    capsys.readouterr()
    prompts = chat(checkpoint, monkeypatch, "Who's there?\nWhat news?\n", replies=interrupted)
    assert len(prompts) == 2  # the chat went on to the second message
    assert capsys.readouterr().out.count("Long live [stopped]\n") == 2


def test_cli_chat_reports_a_message_it_cannot_encode_and_goes_on(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    prompts = chat(checkpoint, monkeypatch, "日本\nGood morrow.\n")  # a character model never saw these
    assert "error: character '日' is not in" in capsys.readouterr().err
    assert len(prompts) == 1 and "日" not in prompts[0]


def test_cli_chat_ends_input_on_a_new_line(checkpoint, capsys, monkeypatch):
    capsys.readouterr()
    chat(checkpoint, monkeypatch, "", terminal=True)  # Ctrl-D at once
    assert capsys.readouterr().out.endswith("you: \n")


@pytest.mark.parametrize("args, match", [
    (["--temperature", "-1"], "temperature=-1.0 is negative"),
    (["--top-p", "0"], r"top_p=0.0 must lie in \(0, 1\]"),
    (["--top-k", "-3"], "top_k=-3 must be a whole number"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "日本"], "character '日' is not in this character tokenizer's vocabulary"),
])
def test_cli_sample_errors_are_one_line(checkpoint, capsys, args, match):
    capsys.readouterr()
    assert cli_main(["sample", str(checkpoint), "--prompt", "A", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert re.search(match, captured.err)


def test_cli_missing_checkpoint(tmp_path, capsys):
    for command in (["sample", str(tmp_path / "absent.pt"), "--prompt", "A"], ["chat", str(tmp_path / "absent.pt")]):
        assert cli_main(command) == 2
        assert "is missing" in capsys.readouterr().err


def test_cli_bench_generate_ends_with_a_json_line(capsys, monkeypatch):
    import lilllm.bench as bench

    small = ModelConfig(vocab_size=64, block_size=16, d_model=32, n_layers=1, n_heads=2)
    monkeypatch.setattr(bench, "generation_models", lambda: {"tiny": small, "default": small})
    assert cli_main(["bench", "generate", "--lengths", "4", "8"]) == 0
    captured = capsys.readouterr()
    lines = json.loads(captured.out.strip().splitlines()[-1])
    assert set(lines) == {"tiny", "default"}
    for line in lines.values():
        assert line["speedup_512"] is None and set(line["tokens_s_cached"]) == {"4", "8"}
        assert all(math.isfinite(v) and v > 0 and round(v, 2) == v for v in line["speedup"].values())
        assert all(isinstance(v, int) for v in line["tokens_s_cached"].values())  # rounded to whole tokens/s
    assert captured.err.count("new tokens:") == 4  # progress, one line per model and length, off stdout


def test_cli_bench_generate_writes_the_readmes_table(capsys, monkeypatch, tmp_path):
    import lilllm.bench as bench

    small = ModelConfig(vocab_size=64, block_size=16, d_model=32, n_layers=1, n_heads=2)
    monkeypatch.setattr(bench, "generation_models", lambda: {"tiny": small})
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n<!-- bench generate -->\nan old table\n<!-- /bench generate -->\nThe end.\n")
    command = ["bench", "generate", "--lengths", "4", "--repeats", "1", "--markdown", "--readme", str(readme)]
    assert cli_main(command) == 0
    printed = capsys.readouterr().out
    written = readme.read_text()
    assert "an old table" not in written and written.startswith("# Results\n") and written.endswith("The end.\n")
    table = written.split("<!-- bench generate -->\n")[1].split("\n<!-- /bench generate -->")[0]
    assert table in printed
    assert f"Measured with `lilllm {' '.join(command)}` on " in table and f"torch {torch.__version__}" in table
    assert "| `tiny` (1 layers, context 16) | 4 |" in table
    readme.write_text("no markers here\n")
    assert cli_main(command) == 2
    assert "needs one <!-- bench generate --> line" in capsys.readouterr().err


def test_the_tokenizer_benchmarks_table():
    from lilllm.bench import markdown_tokenizer
    from lilllm.runtime import machine

    result = {"vocab_size": 2048, "repeats": 3, "megabytes": 1.115, "tokens": 390696, "ids_identical": True,
              "train_s": 0.53, "hf_mb_s": 1.54, "tiktoken_mb_s": 15.6, "speedup": 10.1}
    table = markdown_tokenizer(result, "lilllm bench tokenizer --readme")
    assert table.startswith("Measured with `lilllm bench tokenizer --readme` on ") and machine() in table
    assert "| training the 2,048-token BPE on the train split | 0.53 s |" in table
    assert "| the same with `tiktoken` | 15.6 MB/s (10.1× faster) |" in table
    assert "| identical ids | yes, over all 390,696 tokens |" in table


@pytest.mark.parametrize("call, match", [
    (lambda x: apply_temperature(x, -0.5), "temperature=-0.5 is negative"),
    (lambda x: apply_temperature(x, 0), "temperature=0 means greedy"),
    (lambda x: apply_temperature(x, float("nan")), "temperature=nan"),
    (lambda x: top_k_filter(x, -2), "top_k=-2 must be a whole number"),
    (lambda x: top_k_filter(x, 0), "top_k=0 switches top-k off"),
    (lambda x: top_k_filter(x, 2.5), "top_k=2.5 must be a whole number"),
    (lambda x: top_p_filter(x, 0.0), "top_p=0.0 must lie in"),
    (lambda x: top_p_filter(x, 1.5), "top_p=1.5 must lie in"),
    (lambda x: process_logits(x, temperature=-1), "temperature=-1 is negative"),
    (lambda x: process_logits(x, top_p=2), "top_p=2 must lie in"),
    (lambda x: sample_next(x, temperature=-1), "temperature=-1 is negative"),
    (lambda x: sample_next(x, top_k=-1), "top_k=-1"),
    (lambda x: sample_next(x, top_p=float("nan")), "top_p=nan"),
])
def test_the_public_helpers_check_their_own_settings(call, match):
    with pytest.raises(LilllmError, match=match):
        call(torch.randn(2, 10))
