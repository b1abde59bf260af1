"""What every other module stands on: where the repository is, which device runs the model
and in which precision, and how a file is written so that nobody ever reads half of it.

The bottom of the package: it imports nothing of lilllm but `LilllmError`.
"""

import os
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from lilllm import LilllmError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICE_ENV_VAR = "LILLLM_DEVICE"
KNOWN_DEVICES = ("cpu", "cuda", "mps")


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: `name` if given, else $LILLLM_DEVICE, else cuda → mps → cpu."""
    name = str(name or os.environ.get(DEVICE_ENV_VAR) or "") or None
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in KNOWN_DEVICES:
        raise LilllmError(f"unknown device {name!r}: use one of {', '.join(KNOWN_DEVICES)} (e.g. cuda:1)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[kind]:
        raise LilllmError(f"device {name!r} is not available on this machine: use cpu, or unset {DEVICE_ENV_VAR}")
    return torch.device(name)


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in fp32); fp32 everywhere else."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def write_atomically(path, content: bytes | str | Callable) -> Path:
    """Write `content` (bytes, text, or a function that writes to the open binary file) to a
    temporary file beside `path`, flush it to disk, then rename it over `path`. A crash or a
    second process never leaves a half-written file: readers see the old one or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as file:
            if callable(content):
                content(file)
            else:
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it visible
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def repo_path(path) -> Path:
    """A path as the user gave it: relative paths are taken from the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def shown(path) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    path = Path(path)
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def import_datasets():
    """The `datasets` module, imported when first needed (it takes a second). Importing it
    loads tqdm.auto, which warns in Jupyter when ipywidgets is absent; lilllm shows no bars there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import datasets
    datasets.disable_progress_bars()
    return datasets
