"""The vendored tiny-shakespeare file: verified on load, split where nanoGPT splits it."""

import pytest

import lilllm.data
from lilllm import LilllmError
from lilllm.data import SPLIT_AT, TINYSHAKESPEARE, load_text, train_val_split, verify_text_file


def test_the_vendored_text_checks_out_and_splits_90_10():
    text = load_text()
    assert len(text) == 1_115_394 == len(text.encode("utf-8"))  # pure ASCII: characters are bytes
    train, val = train_val_split(text)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert train + val == text
    assert val.startswith(text[SPLIT_AT:SPLIT_AT + 20])


@pytest.fixture
def copy_of_corpus(tmp_path, monkeypatch):
    """A copy of the corpus under tmp_path that lilllm.data checks like the real one."""
    path = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(TINYSHAKESPEARE.read_bytes())
    monkeypatch.setattr(lilllm.data, "REPO_ROOT", tmp_path)
    monkeypatch.setitem(lilllm.data.EXPECTED, path, lilllm.data.EXPECTED[TINYSHAKESPEARE])
    return path


def test_a_corrupt_file_names_the_file_both_hashes_and_the_fix(copy_of_corpus):
    data = bytearray(copy_of_corpus.read_bytes())
    data[100] ^= 1  # one flipped bit, same size
    copy_of_corpus.write_bytes(bytes(data))
    with pytest.raises(LilllmError) as err:
        verify_text_file(copy_of_corpus)
    message = str(err.value)
    assert str(copy_of_corpus) in message and "corrupt" in message
    assert "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed" in message
    assert "git checkout -- data/tinyshakespeare/input.txt" in message


def test_a_truncated_file_is_reported_by_size(copy_of_corpus):
    copy_of_corpus.write_bytes(copy_of_corpus.read_bytes()[:1000])
    with pytest.raises(LilllmError, match="expected 1,115,394 bytes, found 1,000"):
        load_text(copy_of_corpus)


def test_a_missing_file_is_reported_with_the_fix(copy_of_corpus):
    copy_of_corpus.unlink()
    with pytest.raises(LilllmError, match="is missing: restore it with `git checkout"):
        load_text(copy_of_corpus)
