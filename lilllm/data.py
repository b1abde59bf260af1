"""The data: the vendored tiny-shakespeare text, checked on load, and its train/val split."""

import hashlib
from pathlib import Path

from lilllm import LilllmError
from lilllm.env import REPO_ROOT

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
