"""The data: the vendored tiny-shakespeare text, checked on load, and its train/val split;
token files (any local text/jsonl/parquet corpus → tokenizer → train.bin/val.bin), cached
under data/ and rebuilt when absent or stale; random (x, y) training batches."""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lilllm import LilllmError
from lilllm.runtime import REPO_ROOT, import_datasets, write_atomically
from lilllm.tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer, load_tokenizer, train_tokenizer

DATA_DIR = REPO_ROOT / "data"
TINYSHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
# What the vendored file must be, byte for byte (it is Karpathy's char-rnn tiny-shakespeare).
EXPECTED = {TINYSHAKESPEARE: (1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")}
# nanoGPT's split: the first 90% of characters train, the last 10% validate.
SPLIT_AT = 1_003_854


def verify_text_file(path: Path) -> None:
    """Raise a LilllmError naming the file, the expected and actual size or sha256, and
    how to restore it, unless the file is exactly what the course expects."""
    path = Path(path)
    size, sha256 = EXPECTED[path]
    restore = f"restore it with `git checkout -- {path.relative_to(REPO_ROOT)}`"
    if not path.is_file():
        raise LilllmError(f"{path} is missing: {restore}")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise LilllmError(f"{path} is corrupt: expected {size:,} bytes, found {actual_size:,}; {restore}")
    actual_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual_sha256 != sha256:
        raise LilllmError(f"{path} is corrupt: expected sha256 {sha256}, found {actual_sha256}; {restore}")


def load_text(path: Path = TINYSHAKESPEARE) -> str:
    """The whole text of a vendored corpus, verified first."""
    verify_text_file(path)
    return Path(path).read_text(encoding="utf-8")


def train_val_split(text: str, split_at: int = SPLIT_AT) -> tuple[str, str]:
    """(train, val): characters before `split_at` and from it on."""
    return text[:split_at], text[split_at:]


# --- token files ------------------------------------------------------------------------
# A prepared dataset is a folder: tokenizer.json, train.bin and val.bin (the token ids of
# each split, flat, uint16 or uint32) and meta.json (what the ids mean and how many there are).
# Documents are joined with <|endoftext|> between them; a single text (tiny-shakespeare) is one
# document, so its token files are exactly its encoding.

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
SPLITS = ("train", "val")
VAL_FRACTION = 0.1  # int(0.9 * 1,115,394) = SPLIT_AT: the generic split reproduces nanoGPT's


@dataclass
class PreparedData:
    """A prepared dataset: its tokenizer, the token ids of each split (memory-mapped) and meta."""

    path: Path
    tokenizer: Tokenizer
    train: np.memmap
    val: np.memmap
    meta: dict


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids below 65,536 (half the disk and memory of uint32)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _as_documents(documents):
    """A datasets.Dataset with a "text" column, from a string, a list of strings or a Dataset."""
    datasets = import_datasets()
    if isinstance(documents, datasets.Dataset):
        return documents
    return datasets.Dataset.from_dict({"text": [documents] if isinstance(documents, str) else list(documents)})


def prepare_tokens(tokenizer: Tokenizer, train, val, out_dir, progress: bool = False) -> dict:
    """Encode each split (a string, a list of documents or a datasets.Dataset with a "text"
    column) into out_dir/{train,val}.bin, then write meta.json and return it."""
    datasets = import_datasets()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    dtype = token_dtype(tokenizer.vocab_size)
    eot = tokenizer.special_ids["<|endoftext|>"]

    def encode(batch, indices):
        ids = [tokenizer.encode(text) for text in batch["text"]]
        return {
            "ids": [([eot] if i > 0 else []) + doc for i, doc in zip(indices, ids)],  # eot between documents
            "n_bytes": [len(text.encode()) for text in batch["text"]],
        }

    meta = {"tokenizer": tokenizer.kind, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name, "special_ids": tokenizer.special_ids}
    for split, documents in zip(SPLITS, (train, val)):
        documents = _as_documents(documents)
        encoded = documents.map(encode, batched=True, with_indices=True, remove_columns=documents.column_names,
                                desc=f"tokenizing {split}", keep_in_memory=True,
                                new_fingerprint=f"{tokenizer.fingerprint}-{split}")  # no cache files; no hashing of `encode`

        def write(file):
            for batch in encoded.iter(batch_size=1000):
                for ids in batch["ids"]:
                    file.write(np.asarray(ids, dtype=dtype).tobytes())

        write_atomically(out_dir / f"{split}.bin", write)
        meta[f"{split}_tokens"] = (out_dir / f"{split}.bin").stat().st_size // dtype.itemsize
        meta[f"{split}_bytes"] = sum(encoded["n_bytes"])
        meta[f"{split}_documents"] = len(documents)
    if not meta["train_tokens"] or not meta["val_tokens"]:
        raise LilllmError(f"the {'train' if not meta['train_tokens'] else 'val'} split has no tokens: give a larger corpus")
    write_atomically(out_dir / META_FILE, json.dumps(meta, indent=1) + "\n")
    return meta


def load_prepared(out_dir, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Open a prepared dataset, checking that its token files match its tokenizer (the one
    saved beside them, or `tokenizer` if given)."""
    out_dir = Path(out_dir)
    tokenizer = tokenizer or load_tokenizer(out_dir / TOKENIZER_FILE)
    rebuild = "rebuild them with `lilllm prepare`"
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except FileNotFoundError:
        raise LilllmError(f"{out_dir / META_FILE} is missing: {rebuild}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LilllmError(f"{out_dir / META_FILE} is corrupt (not JSON): {rebuild}") from None
    if meta.get("fingerprint") != tokenizer.fingerprint:
        raise LilllmError(f"the token files in {out_dir} were made by another tokenizer (fingerprint {meta.get('fingerprint')}, "
                          f"not {tokenizer.fingerprint}): {rebuild}")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        path = out_dir / f"{split}.bin"
        expected = meta[f"{split}_tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            found = f"{path.stat().st_size:,} bytes" if path.is_file() else "no file"
            raise LilllmError(f"{path} does not match {META_FILE}: expected {expected:,} bytes, found {found}; {rebuild}")
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
    return PreparedData(out_dir, tokenizer, splits["train"], splits["val"], meta)


def load_corpus(files, text_field: str = "text"):
    """(train, val) documents from local files, offline, with `datasets`: .txt files (one
    document each), .jsonl/.json or .parquet (one document per row, its `text_field`).
    One document splits at 90% of its characters; several, at 90% of the documents."""
    datasets = import_datasets()
    files = [Path(f) for f in files]
    builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    for f in files:
        if not f.is_file():
            raise LilllmError(f"input file {f} is missing")
        if f.suffix not in builders:
            raise LilllmError(f"cannot read {f}: use .txt, .jsonl, .json or .parquet files")
    kinds = {builders[f.suffix] for f in files}
    if len(kinds) != 1:
        raise LilllmError(f"mixed input formats ({', '.join(sorted(f.suffix for f in files))}): give files of one format")
    builder = kinds.pop()
    options = {"sample_by": "document"} if builder == "text" else {}
    try:
        documents = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as err:  # datasets raises many kinds of errors on malformed files
        raise LilllmError(f"cannot read {', '.join(map(str, files))} as {builder}: {str(err).splitlines()[0]}") from None
    if text_field not in documents.column_names:
        raise LilllmError(f"the input has no {text_field!r} field (it has {', '.join(documents.column_names)}): "
                          "choose the field that holds the text")
    documents = documents.select_columns([text_field])
    if text_field != "text":
        documents = documents.rename_column(text_field, "text")
    if len(documents) == 1:
        train, val = train_val_split(documents[0]["text"], int(len(documents[0]["text"]) * (1 - VAL_FRACTION)))
        return _as_documents(train), _as_documents(val)
    n_train = int(len(documents) * (1 - VAL_FRACTION))
    return documents.select(range(n_train)), documents.select(range(n_train, len(documents)))


def default_dir(kind: str, vocab_size: int | None, corpus: str = "tinyshakespeare") -> Path:
    """Where a corpus prepared with a tokenizer goes by default: data/<corpus>-<kind>[-<vocab size>]."""
    return DATA_DIR / (f"{corpus}-{kind}" + (f"-{vocab_size}" if vocab_size else ""))


def _default_vocab_size(kind: str, vocab_size: int | None) -> int | None:
    """A BPE's vocabulary size defaults to the course's; a character tokenizer's is set by its text."""
    return DEFAULT_VOCAB_SIZE if kind == "bpe" and vocab_size is None else vocab_size


def prepare(kind: str = "bpe", vocab_size: int | None = None, inputs=None, out_dir=None,
            text_field: str = "text", progress: bool = False) -> PreparedData:
    """Train a tokenizer on the train split of `inputs` (default: tiny-shakespeare), save it
    and write the token files of both splits into `out_dir` (default: under data/)."""
    vocab_size = _default_vocab_size(kind, vocab_size)
    if inputs:
        train, val = load_corpus(inputs, text_field)
        out_dir = Path(out_dir or default_dir(kind, vocab_size, corpus=Path(inputs[0]).stem))
    else:
        train, val = (_as_documents(t) for t in train_val_split(load_text()))
        out_dir = Path(out_dir or default_dir(kind, vocab_size))
    start = time.perf_counter()
    tokenizer = train_tokenizer(kind, train["text"], vocab_size)
    if progress:
        print(f"trained a {tokenizer.vocab_size:,}-token {kind} tokenizer on the train split "
              f"({len(train):,} document(s)) in {time.perf_counter() - start:.2f} s", flush=True)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    prepare_tokens(tokenizer, train, val, out_dir, progress)
    return load_prepared(out_dir)


def prepared_dataset(kind: str = "bpe", vocab_size: int | None = None, progress: bool = False) -> PreparedData:
    """The course's tiny-shakespeare token files for a tokenizer (default: the course's BPE),
    cached in data/: built on first use, rebuilt when a file is missing or corrupt or the
    tokenizer changed."""
    vocab_size = _default_vocab_size(kind, vocab_size)
    out_dir = default_dir(kind, vocab_size)
    try:
        data = load_prepared(out_dir)
        if data.tokenizer.kind == kind and (kind == "char" or data.tokenizer.vocab_size == vocab_size):
            return data
    except LilllmError:
        pass  # absent or stale: rebuild below
    return prepare(kind, vocab_size, out_dir=out_dir, progress=progress)


def get_batch(tokens, batch_size: int, block_size: int, generator: torch.Generator | None = None,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens: x, and y = the next token of each
    position (x shifted left by one). Both (B, T) int64."""
    if len(tokens) <= block_size:
        raise LilllmError(f"the token file has {len(tokens):,} tokens, too few for windows of {block_size} + 1: "
                          "use a smaller block size or more text")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    windows = np.stack([tokens[i : i + block_size + 1] for i in starts]).astype(np.int64)  # (B, T + 1)
    windows = torch.from_numpy(windows)
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each
    return x.to(device), y.to(device)
