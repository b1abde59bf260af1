"""Token files, their cache, batches and local corpora (the text itself: test_corpus.py)."""

import json

import numpy as np
import pytest
import torch

import lilllm.data
from lilllm import LilllmError
from lilllm.cli import main
from lilllm.data import (
    SPLIT_AT,
    get_batch,
    load_corpus,
    load_prepared,
    load_text,
    prepare,
    prepare_tokens,
    prepared_dataset,
    token_dtype,
    train_val_split,
)
from lilllm.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def splits():
    return train_val_split(load_text())


@pytest.fixture(scope="module")
def bpe(splits):
    return BPETokenizer.train(splits[0], 300)


@pytest.fixture(scope="module")
def prepared(bpe, splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    bpe.save(out / "tokenizer.json")
    prepare_tokens(bpe, *splits, out)
    return load_prepared(out)


def test_token_files_hold_each_split_encoded(prepared, bpe, splits):
    train, val = splits
    assert prepared.train.dtype == np.uint16 and prepared.meta["dtype"] == "uint16"
    assert prepared.train.tolist() == bpe.encode(train)
    assert prepared.val.tolist() == bpe.encode(val)
    assert bpe.decode(prepared.val) == val  # the split boundary survives tokenization


def test_meta_records_tokenizer_counts_and_bytes(prepared, bpe):
    meta = prepared.meta
    assert meta["fingerprint"] == bpe.fingerprint and meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(prepared.train), len(prepared.val))
    assert (meta["train_bytes"], meta["val_bytes"]) == (SPLIT_AT, 1_115_394 - SPLIT_AT)  # ASCII: one byte a character
    assert meta["special_ids"] == bpe.special_ids


def test_the_split_boundary():
    text = load_text()
    train, val = train_val_split(text)
    assert (len(train), len(val)) == (1_003_854, 111_540) and train + val == text
    assert SPLIT_AT == int(len(text) * 0.9)  # nanoGPT's rule, which load_corpus applies to any single text


def test_token_dtype():
    assert token_dtype(2048) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32


def test_documents_are_separated_by_endoftext(tmp_path):
    docs = ["first doc", "second one", "third"]
    tok = CharTokenizer.train(docs + ["val doc"])
    meta = prepare_tokens(tok, docs, ["val doc"], tmp_path)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).tolist()
    eot = tok.special_ids["<|endoftext|>"]
    assert train == tok.encode("first doc<|endoftext|>second one<|endoftext|>third", allow_special=True)
    assert train.count(eot) == 2 and train[0] != eot
    assert meta["train_bytes"] == sum(len(d) for d in docs) and meta["train_documents"] == 3


def test_get_batch_shapes_and_the_one_token_shift(prepared):
    x, y = get_batch(prepared.train, batch_size=6, block_size=16, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # with distinct token values, each row shows where its window starts
    tokens = np.arange(50_000, dtype=np.uint16)
    x, y = get_batch(tokens, batch_size=6, block_size=16)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]
        assert row_x == list(range(start, start + 16)) and row_y == list(range(start + 1, start + 17))


def test_get_batch_is_seeded_and_covers_the_last_token():
    tokens = np.arange(10, dtype=np.uint16)
    a = get_batch(tokens, 4, 3, torch.Generator().manual_seed(1))
    b = get_batch(tokens, 4, 3, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x, y = get_batch(tokens, 200, 9, torch.Generator().manual_seed(0))  # only one window fits
    assert x.tolist() == [list(range(9))] * 200 and y.tolist() == [list(range(1, 10))] * 200


def test_get_batch_too_few_tokens():
    with pytest.raises(LilllmError, match="has 8 tokens, too few for windows of 8 \\+ 1"):
        get_batch(np.arange(8, dtype=np.uint16), 2, 8)


# --- the cache in data/ -----------------------------------------------------------------

def test_prepared_dataset_builds_caches_and_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setattr(lilllm.data, "DATA_DIR", tmp_path)
    data = prepared_dataset("bpe", 300)
    assert data.path == tmp_path / "tinyshakespeare-bpe-300"
    assert data.tokenizer.vocab_size == 300 and data.meta["val_bytes"] == 111_540
    built = (data.path / "train.bin").stat().st_mtime_ns
    assert prepared_dataset("bpe", 300).meta == data.meta
    assert (data.path / "train.bin").stat().st_mtime_ns == built  # cached: not rebuilt

    # the tokenizer changed: the token files no longer match it, so both are rebuilt
    BPETokenizer.train("a different tokenizer " * 50, 280).save(data.path / "tokenizer.json")
    rebuilt = prepared_dataset("bpe", 300)
    assert rebuilt.tokenizer.fingerprint == data.tokenizer.fingerprint and rebuilt.meta == data.meta
    # a truncated token file is rebuilt too
    (data.path / "val.bin").write_bytes(b"\x00\x00")
    assert prepared_dataset("bpe", 300).val.tolist() == data.val.tolist()


def test_prepared_dataset_char(tmp_path, monkeypatch):
    monkeypatch.setattr(lilllm.data, "DATA_DIR", tmp_path)
    data = prepared_dataset("char")
    assert data.path.name == "tinyshakespeare-char" and data.tokenizer.vocab_size == 73
    assert len(data.train) == data.meta["train_bytes"] == SPLIT_AT


# --- token files that don't match ----------------------------------------------------------

def test_token_files_from_another_tokenizer(prepared):
    other = CharTokenizer.train("abc")
    with pytest.raises(LilllmError, match="were made by another tokenizer .* rebuild them with `lilllm prepare`"):
        load_prepared(prepared.path, other)


def test_truncated_token_file(prepared, tmp_path):
    for name in ("tokenizer.json", "meta.json", "train.bin"):
        (tmp_path / name).write_bytes((prepared.path / name).read_bytes())
    (tmp_path / "val.bin").write_bytes((prepared.path / "val.bin").read_bytes()[:-2])
    with pytest.raises(LilllmError, match=r"val.bin does not match meta.json: expected [\d,]+ bytes, found [\d,]+ bytes"):
        load_prepared(tmp_path)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(LilllmError, match=r"val.bin does not match meta.json: .* found no file"):
        load_prepared(tmp_path)


def test_missing_or_corrupt_meta(prepared, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((prepared.path / "tokenizer.json").read_bytes())
    with pytest.raises(LilllmError, match="meta.json is missing"):
        load_prepared(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(LilllmError, match="meta.json is corrupt"):
        load_prepared(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(LilllmError, match="tokenizer file .* is missing"):
        load_prepared(tmp_path)


# --- local corpora through datasets -------------------------------------------------------

def test_a_single_text_file_splits_like_nanogpt(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text(load_text())
    train, val = load_corpus([path])
    assert (train["text"], val["text"]) == tuple([t] for t in train_val_split(load_text()))


def test_jsonl_documents_split_90_10(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": f"document {i}"}) + "\n" for i in range(20)))
    train, val = load_corpus([path], text_field="body")
    assert train["text"] == [f"document {i}" for i in range(18)] and val["text"] == ["document 18", "document 19"]


def test_parquet_through_the_whole_pipeline(tmp_path):
    import datasets

    docs = [f"row {i}: some words, some more words." for i in range(10)]
    datasets.Dataset.from_dict({"text": docs}).to_parquet(tmp_path / "docs.parquet")
    data = prepare("bpe", 264, inputs=[tmp_path / "docs.parquet"], out_dir=tmp_path / "out")
    eot = data.tokenizer.special_ids["<|endoftext|>"]
    assert data.tokenizer.decode(data.val) == docs[9]
    assert data.tokenizer.decode(data.train) == "<|endoftext|>".join(docs[:9])
    assert list(data.train).count(eot) == 8 and data.meta["val_documents"] == 1


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "input file .*missing.txt is missing"),
    ("notes.md", "# hi", "cannot read .*notes.md: use .txt, .jsonl, .json or .parquet files"),
    ("bad.jsonl", '{"text": "ok"}\n{not json\n', "cannot read .*bad.jsonl as json"),
    ("other.jsonl", '{"body": "x"}\n', "the input has no 'text' field \\(it has body\\)"),
])
def test_bad_corpus_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(LilllmError, match=message):
        load_corpus([path])


def test_mixed_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(LilllmError, match="mixed input formats"):
        load_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"])


def test_an_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LilllmError, match="training corpus is empty"):
        prepare("bpe", 300, inputs=[tmp_path / "empty.txt"], out_dir=tmp_path / "out")


# --- the command line ----------------------------------------------------------------------

def test_cli_prepare(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(load_text()[:200_000])
    assert main(["prepare", "--vocab-size", "300", "--input", str(corpus), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "300-token bpe tokenizer" in printed and "val: " in printed
    data = load_prepared(tmp_path / "out")
    assert data.meta["train_bytes"] == 180_000 and load_tokenizer(tmp_path / "out" / "tokenizer.json").vocab_size == 300


def test_cli_prepare_bad_input_is_one_line(tmp_path, capsys):
    assert main(["prepare", "--vocab-size", "100", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vocabulary size 100 is too small") and err.count("\n") == 1
