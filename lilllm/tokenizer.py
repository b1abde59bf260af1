"""Tokenizers: text → token ids → text.

Two kinds behind one interface (`train`, `encode`, `decode`, `decode_bytes`, `save`,
`vocab_size`, `special_ids`, `fingerprint`; `load_tokenizer` reads either back from a file,
`tokenizer_from_dict` from the copy every checkpoint carries):

- `CharTokenizer`: one id per character of the training text (nanoGPT's baseline).
- `BPETokenizer`: a byte-level BPE (GPT-2's recipe). `tokenizers` learns the merges from
  the train split; `tiktoken` serves them, with the very same ids, several times faster.

Both register the same special tokens after their ordinary vocabulary. `encode(text)`
treats special-token strings in the text as ordinary text (so a corpus can never inject
them); `encode(text, allow_special=True)` turns them into their ids, never split and never
merged with their neighbours.
"""

import base64
import hashlib
import json
import re
from pathlib import Path

import tiktoken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lilllm import LilllmError
from lilllm.runtime import write_atomically

# End of text (the separator between documents), the chat roles and end of turn the SFT
# chapter uses, and spares, so a later use never changes the ids of the others.
N_RESERVED = 3
SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>") + tuple(
    f"<|reserved_{i}|>" for i in range(N_RESERVED)
)
# GPT-2's pre-tokenizer split: contractions, letters, digits, other symbols and whitespace
# runs become separate pieces; BPE merges only inside a piece. `tokenizers`' ByteLevel
# pre-tokenizer uses the same expression, which is why tiktoken reproduces its ids.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The course's vocabulary size (notebook 01 measures why): 2,048 tokens carry ~2.6 bytes each
# on the val split, 2.6x fewer tokens than characters; doubling to 4,096 gains only 13% more
# bytes per token, while a small model pays for every extra embedding row.
DEFAULT_VOCAB_SIZE = 2048
FORMAT = "lilllm-tokenizer"
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


class Tokenizer:
    """What both kinds share: a table `token_bytes` (id → the bytes it stands for) for the
    ordinary tokens, the special tokens after it, decoding, saving and the fingerprint."""

    kind = ""

    def __init__(self, token_bytes: list[bytes]):
        self.token_bytes = token_bytes
        self.special_ids = {name: len(token_bytes) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = len(token_bytes) + len(SPECIAL_TOKENS)
        self._id_bytes = token_bytes + [name.encode() for name in SPECIAL_TOKENS]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        raise NotImplementedError

    @property
    def ordinary_vocab_size(self) -> int:
        """How many ids are ordinary tokens: the special tokens come after them."""
        return len(self.token_bytes)

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes of `ids`; a multi-byte character may be cut at either end (streaming
        output keeps the bytes until the character is complete)."""
        ids = [int(i) for i in ids]  # also accepts numpy arrays and tensors
        unknown = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if unknown is not None:
            raise LilllmError(f"token id {unknown} is not in this tokenizer's vocabulary (ids 0 to {self.vocab_size - 1}): "
                              "were the ids made by another tokenizer?")
        return b"".join([self._id_bytes[i] for i in ids])

    def decode(self, ids) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a cut character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _content(self) -> dict:
        """Everything that defines the tokenizer, as JSON-ready data (saved, and hashed)."""
        return {"format": FORMAT, "kind": self.kind, "special_tokens": list(SPECIAL_TOKENS)}

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer's content: equal fingerprints, equal ids."""
        canonical = json.dumps(self._content(), sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        """The tokenizer as JSON-ready data, with its fingerprint (checked when read back)."""
        return {**self._content(), "fingerprint": self.fingerprint}

    def save(self, path) -> Path:
        """Write the tokenizer as a JSON file, atomically."""
        return write_atomically(path, json.dumps(self.to_dict(), ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


def _check_corpus(texts) -> list[str]:
    """The training texts as a list (a single string is one text), refusing an empty corpus."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not any(texts):
        raise LilllmError("the training corpus is empty: give the tokenizer some text to learn from")
    return texts


class CharTokenizer(Tokenizer):
    """One token per character that occurs in the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.char_to_id = {c: i for i, c in enumerate(chars)}
        super().__init__([c.encode() for c in chars])

    @classmethod
    def train(cls, texts, vocab_size: int | None = None) -> "CharTokenizer":
        """Learn the characters of `texts` (a string or strings). Its vocabulary size is set
        by the text; `vocab_size`, if given, must equal it (the interface is shared with BPE)."""
        texts = _check_corpus(texts)
        chars = "".join(sorted(set().union(*texts)))
        tokenizer = cls(chars)
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise LilllmError(f"a character tokenizer's vocabulary is set by its text: {len(chars)} characters + "
                              f"{len(SPECIAL_TOKENS)} special tokens = {tokenizer.vocab_size}, not {vocab_size}; "
                              "leave the vocabulary size out")
        return tokenizer

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.char_to_id[c] for c in text]
        except KeyError:
            unknown = next(c for c in text if c not in self.char_to_id)
            raise LilllmError(f"character {unknown!r} is not in this character tokenizer's vocabulary: train it on text "
                              "that contains it, or use the byte-level BPE tokenizer, which encodes any text") from None

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._encode_ordinary(text)
        ids = []
        # re.split with a capturing group alternates: text, special, text, special, ...
        for i, piece in enumerate(_SPECIAL_SPLIT.split(text)):
            ids.extend([self.special_ids[piece]] if i % 2 else self._encode_ordinary(piece))
        return ids

    def _content(self) -> dict:
        return {**super()._content(), "chars": self.chars}


def _gpt2_byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which `tokenizers`' byte-level vocabulary
    uses: printable Latin-1 bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def train_hf_bpe(texts, vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE with `tokenizers` (GPT-2's recipe) and register the special
    tokens after the learned vocabulary: `vocab_size` counts them."""
    texts = _check_corpus(texts)
    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise LilllmError(f"vocabulary size {vocab_size} is too small for a byte-level BPE: it needs at least "
                          f"256 bytes + {len(SPECIAL_TOKENS)} special tokens = {smallest}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text encodes
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    learned = hf.get_vocab_size()
    if learned != vocab_size - len(SPECIAL_TOKENS):
        most = learned + len(SPECIAL_TOKENS)
        raise LilllmError(f"the corpus is too small for {vocab_size} tokens: it ran out of pairs to merge at {most}; "
                          f"use a vocabulary size of at most {most}, or more text")
    hf.add_special_tokens(list(SPECIAL_TOKENS))
    return hf


class BPETokenizer(Tokenizer):
    """A byte-level BPE served by tiktoken. `token_bytes[i]` is the byte string of id i, and
    i is also its merge rank: tiktoken merges the pair whose result has the lowest id first."""

    kind = "bpe"

    def __init__(self, token_bytes: list[bytes]):
        super().__init__(token_bytes)
        self.encoding = tiktoken.Encoding(
            name=f"lilllm-bpe-{len(token_bytes)}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks={b: rank for rank, b in enumerate(token_bytes)},
            special_tokens=self.special_ids,
        )

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Learn merges from `texts` (a string or strings) with `tokenizers`."""
        return cls.from_hf(train_hf_bpe(texts, vocab_size))

    @classmethod
    def from_hf(cls, hf: HFTokenizer) -> "BPETokenizer":
        """The same tokenizer as a `tokenizers` byte-level BPE: its ids become ranks."""
        char_to_byte = {c: b for b, c in _gpt2_byte_to_char().items()}
        vocab = hf.get_vocab(with_added_tokens=False)
        by_id = sorted(vocab, key=vocab.get)
        return cls([bytes(char_to_byte[c] for c in token) for token in by_id])

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def _content(self) -> dict:
        tokens = [base64.b64encode(b).decode("ascii") for b in self.token_bytes]
        return {**super()._content(), "pattern": GPT2_PATTERN, "tokens": tokens}


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


def train_tokenizer(kind: str, texts, vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe") on `texts`."""
    if kind not in TOKENIZERS:
        raise LilllmError(f"unknown tokenizer kind {kind!r}: use one of {', '.join(TOKENIZERS)}")
    if kind == "bpe" and vocab_size is None:
        raise LilllmError("a BPE tokenizer needs a vocabulary size (e.g. 2048)")
    return TOKENIZERS[kind].train(texts, vocab_size)


def load_tokenizer(path) -> Tokenizer:
    """Read a tokenizer saved by `save`, whichever kind, checking its fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise LilllmError(f"tokenizer file {path} is missing: train one with `lilllm prepare`")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LilllmError(f"{path} is not a lilllm tokenizer file (not JSON): train one with `lilllm prepare`") from None
    return tokenizer_from_dict(content, where=str(path))


def tokenizer_from_dict(content, where: str = "the tokenizer") -> Tokenizer:
    """The tokenizer `to_dict` described, whichever kind, checking its fingerprint; `where`
    names its source in errors (a file, a checkpoint)."""
    retrain = "retrain it with `lilllm prepare`"
    if not isinstance(content, dict) or content.get("format") != FORMAT or content.get("kind") not in TOKENIZERS:
        raise LilllmError(f"{where} is not a lilllm tokenizer: train one with `lilllm prepare`")
    if content.get("special_tokens") != list(SPECIAL_TOKENS):
        raise LilllmError(f"{where} has other special tokens than this version of lilllm: {retrain}")
    try:
        if content["kind"] == "char":
            tokenizer = CharTokenizer(content["chars"])
        else:
            tokenizer = BPETokenizer([base64.b64decode(t, validate=True) for t in content["tokens"]])
    except (KeyError, TypeError, ValueError):
        raise LilllmError(f"{where} is a corrupt tokenizer (missing or malformed fields): {retrain}") from None
    if tokenizer.fingerprint != content.get("fingerprint"):
        raise LilllmError(f"{where} is corrupt: its content does not match its fingerprint; {retrain}")
    return tokenizer
