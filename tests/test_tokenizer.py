import json

import numpy as np
import pytest
import torch

from lilllm import LilllmError
from lilllm.data import load_text, train_val_split
from lilllm.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    load_tokenizer,
    train_hf_bpe,
    train_tokenizer,
)

HARD_TEXTS = [
    "",
    "a",
    "Hello, world!",
    "naïve café, Straße, Ελληνικά, русский, 日本語の文章, 한국어",
    "emoji: 👍🏽 🧑‍🚀 🇫🇷 and a lone 😀",
    "windows\r\nline\r\nendings\r\n",
    "\ttabs\tand\t\ttabs\n\t",
    "runs of spaces:" + " " * 40 + "end" + " " * 17,
    "\n\n\n  \n \t \r\n",
    "it's they're I'll we've 123 4567 3.14",
    "<|endoftext|> looks special but is text here <|user|>",
]


@pytest.fixture(scope="module")
def corpus():
    return load_text()


@pytest.fixture(scope="module")
def trained(corpus):
    """(the `tokenizers` original, our tiktoken-served copy), 512 tokens, train split only."""
    train, _ = train_val_split(corpus)
    hf = train_hf_bpe(train, 512)
    return hf, BPETokenizer.from_hf(hf)


@pytest.fixture(scope="module")
def bpe(trained):
    return trained[1]


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_round_trip_on_hard_text(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.decode_bytes(ids) == text.encode()
    assert not set(ids) & set(bpe.special_ids.values())


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_ids_match_tokenizers(trained, text):
    hf, bpe = trained
    hf.encode_special_tokens = True  # treat special-token strings as text, like encode()
    assert bpe.encode(text) == hf.encode(text).ids


def test_char_round_trip_on_hard_text():
    char = CharTokenizer.train(HARD_TEXTS)
    for text in HARD_TEXTS:
        assert char.decode(char.encode(text)) == text


def test_tiktoken_matches_tokenizers_on_the_whole_corpus(trained, corpus):
    hf, bpe = trained
    ids = bpe.encode(corpus)
    assert ids == hf.encode(corpus).ids
    assert bpe.decode(ids) == corpus


def test_vocabulary_layout(bpe):
    assert bpe.vocab_size == 512
    assert list(bpe.special_ids) == list(SPECIAL_TOKENS)
    assert sorted(bpe.special_ids.values()) == list(range(512 - len(SPECIAL_TOKENS), 512))
    assert {"<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"} <= set(SPECIAL_TOKENS)
    # every single byte is a token, so any text encodes
    assert {bytes([b]) for b in range(256)} <= set(bpe.token_bytes)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_are_atomic(kind, bpe):
    tokenizer = bpe if kind == "bpe" else CharTokenizer.train("abc xyz\n")
    s = tokenizer.special_ids
    text = "abc<|user|>xyz <|assistant|><|end|>\n<|endoftext|>"
    ids = tokenizer.encode(text, allow_special=True)
    assert [i for i in ids if i in s.values()] == [s["<|user|>"], s["<|assistant|>"], s["<|end|>"], s["<|endoftext|>"]]
    # each special is one token, and the text around it encodes on its own
    user = ids.index(s["<|user|>"])
    assert ids[:user] == tokenizer.encode("abc")
    assert ids[user + 1 : ids.index(s["<|assistant|>"])] == tokenizer.encode("xyz ")
    assert tokenizer.decode(ids) == text


def test_special_strings_are_ordinary_text_by_default(bpe):
    ids = bpe.encode("<|endoftext|>")
    assert len(ids) > 1 and bpe.special_ids["<|endoftext|>"] not in ids
    assert bpe.decode(ids) == "<|endoftext|>"


def test_decode_of_a_cut_character_replaces_it(bpe):
    ids = bpe.encode("😀")
    assert len(ids) > 1  # 4 UTF-8 bytes, rare in shakespeare: several tokens
    head = bpe.decode_bytes(ids[:1])
    assert head == "😀".encode()[: len(head)] and len(head) < 4
    assert bpe.decode(ids[:1]) == "\ufffd" * len(head.decode("utf-8", errors="replace"))
    assert "\ufffd" in bpe.decode(ids[:1])


def test_decode_accepts_arrays_and_tensors(bpe):
    ids = bpe.encode("To be, or not to be")
    assert bpe.decode(np.array(ids, dtype=np.uint16)) == bpe.decode(torch.tensor(ids)) == "To be, or not to be"


def test_training_is_deterministic(corpus, bpe):
    train, _ = train_val_split(corpus)
    assert BPETokenizer.train(train, 512).fingerprint == bpe.fingerprint
    assert CharTokenizer.train(train).fingerprint == CharTokenizer.train(train).fingerprint


def test_fingerprint_tells_tokenizers_apart(bpe):
    other = BPETokenizer.train("a small different text, with some pairs to merge " * 20, 280)
    assert other.fingerprint != bpe.fingerprint
    assert CharTokenizer.train("ab").fingerprint != CharTokenizer.train("abc").fingerprint


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_load_identity(kind, bpe, corpus, tmp_path):
    tokenizer = bpe if kind == "bpe" else CharTokenizer.train(corpus)
    loaded = load_tokenizer(tokenizer.save(tmp_path / "tok.json"))
    assert type(loaded) is type(tokenizer)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.vocab_size == tokenizer.vocab_size and loaded.special_ids == tokenizer.special_ids
    assert loaded.encode(corpus) == tokenizer.encode(corpus)


def test_char_tokenizer_is_nanogpts(corpus):
    char = CharTokenizer.train(corpus)
    chars = sorted(set(corpus))
    assert len(chars) == 65 and char.vocab_size == 65 + len(SPECIAL_TOKENS)
    assert char.encode("hii there") == [chars.index(c) for c in "hii there"]


def test_train_tokenizer_picks_the_kind(corpus):
    assert isinstance(train_tokenizer("char", "abc"), CharTokenizer)
    assert isinstance(train_tokenizer("bpe", "abc " * 100, 264), BPETokenizer)


# --- bad input -------------------------------------------------------------------------

def test_vocabulary_too_small():
    with pytest.raises(LilllmError, match=r"vocabulary size 263 is too small .* at least 256 bytes \+ 8 special tokens = 264"):
        BPETokenizer.train("some text", 263)


@pytest.mark.parametrize("texts", ["", [], ["", ""]])
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_empty_corpus(kind, texts):
    with pytest.raises(LilllmError, match="training corpus is empty"):
        train_tokenizer(kind, texts, 300 if kind == "bpe" else None)


def test_corpus_too_small_for_the_vocabulary():
    with pytest.raises(LilllmError, match=r"corpus is too small for 1000 tokens: it ran out of pairs to merge at 26\d; use a vocabulary size of at most 26\d"):
        BPETokenizer.train("abab", 1000)


@pytest.mark.parametrize("bad_id", [512, 10**6, -1])
def test_unknown_token_id_in_decode(bpe, bad_id):
    with pytest.raises(LilllmError, match=rf"token id {bad_id} is not in this tokenizer's vocabulary \(ids 0 to 511\)"):
        bpe.decode([1, 2, bad_id])


def test_unknown_character_for_the_char_tokenizer():
    with pytest.raises(LilllmError, match=r"character 'z' is not in this character tokenizer's vocabulary"):
        CharTokenizer.train("abc").encode("abz")


def test_char_vocab_size_is_set_by_the_text():
    with pytest.raises(LilllmError, match=r"3 characters \+ 8 special tokens = 11, not 300"):
        CharTokenizer.train("abc", 300)


def test_unknown_kind_and_missing_vocab_size():
    with pytest.raises(LilllmError, match="unknown tokenizer kind 'wordpiece': use one of char, bpe"):
        train_tokenizer("wordpiece", "abc", 300)
    with pytest.raises(LilllmError, match="BPE tokenizer needs a vocabulary size"):
        train_tokenizer("bpe", "abc")


def test_tokenizer_file_missing(tmp_path):
    with pytest.raises(LilllmError, match=r"tokenizer file .*nope.json is missing"):
        load_tokenizer(tmp_path / "nope.json")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00", b"not json", b'{"vocab": {}}', b"[1, 2]"])
def test_file_that_is_not_a_tokenizer(tmp_path, content):
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(LilllmError, match="is not a lilllm tokenizer"):
        load_tokenizer(path)


def test_corrupt_tokenizer_file(tmp_path):
    path = CharTokenizer.train("abc").save(tmp_path / "tok.json")
    content = json.loads(path.read_text())
    content["chars"] = "abd"
    path.write_text(json.dumps(content))
    with pytest.raises(LilllmError, match="is corrupt: its content does not match its fingerprint"):
        load_tokenizer(path)
    del content["chars"]
    path.write_text(json.dumps(content))
    with pytest.raises(LilllmError, match="corrupt tokenizer"):
        load_tokenizer(path)


def test_tokenizer_with_other_special_tokens(tmp_path):
    path = CharTokenizer.train("abc").save(tmp_path / "tok.json")
    content = json.loads(path.read_text())
    content["special_tokens"] = ["<|endoftext|>"]
    path.write_text(json.dumps(content))
    with pytest.raises(LilllmError, match="other special tokens than this version"):
        load_tokenizer(path)


def test_cli_bench_tokenizer(capsys):
    from lilllm.cli import main

    assert main(["bench", "tokenizer", "--vocab-size", "300", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert {"train_s", "hf_mb_s", "tiktoken_mb_s", "speedup"} <= set(result)
    assert result["ids_identical"] is True and result["vocab_size"] == 300
    assert all(result[key] > 0 for key in ("train_s", "hf_mb_s", "tiktoken_mb_s", "speedup"))
    assert any("identical ids: yes" in line for line in lines)
