"""What every other module stands on: where the repository is, which device runs the model
and in which precision, how several processes share a run, how Ctrl-C reaches a loop, and
how a file is written so that nobody ever reads half of it.

The bottom of the package: it imports nothing of lilllm but `LilllmError`.
"""

import importlib
import os
import platform
import re
import signal
import threading
import time
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


def autocast_dtype(device: torch.device, cpu_bf16: bool = False) -> torch.dtype | None:
    """The dtype the course autocasts to on `device`: bf16 on CUDA, and on a CPU when asked
    (cpu_bf16: a win only where the CPU multiplies bf16 fast, see `cpu_bf16_support`);
    None (plain fp32) elsewhere."""
    return torch.bfloat16 if device.type == "cuda" or (cpu_bf16 and device.type == "cpu") else None


def autocast_context(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast (matmuls in bf16, reductions in fp32) where `autocast_dtype` says so; fp32 elsewhere."""
    dtype = autocast_dtype(device, cpu_bf16)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Intel AMX tiles; AVX-512 with bf16 dot products


def cpu_bf16_support(cpuinfo="/proc/cpuinfo") -> list[str]:
    """The CPU features (of CPU_BF16_FLAGS, read from `cpuinfo`, Linux's) that make bf16 matmuls
    faster than fp32; empty where there are none or the system does not say (macOS, Windows):
    train in fp32 there."""
    try:
        with open(cpuinfo) as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def matmul_flops(device="cpu", size: int = 1024, seconds: float = 1.0, dtype: torch.dtype | None = None) -> float:
    """This machine's matrix-multiply throughput in FLOP/s, in `dtype` (default: the course's,
    fp32 on CPU, bf16 on CUDA): the ceiling that model FLOPs utilization (MFU) is measured against."""
    device = torch.device(device)
    dtype = dtype or autocast_dtype(device) or torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


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


def import_quietly(name: str):
    """Import module `name` (`datasets`, `transformers`: they take a second, so lilllm imports
    them when first needed). Both load tqdm.auto, which warns in Jupyter when ipywidgets is
    absent; lilllm shows no progress bars of theirs, so the warning says nothing useful."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        return importlib.import_module(name)


def import_datasets():
    """The `datasets` module, its progress bars off."""
    datasets = import_quietly("datasets")
    datasets.disable_progress_bars()
    return datasets


def distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) of this process, starting the process group when run by
    torchrun (nccl on GPUs, gloo on CPUs); (0, 1, 0) for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def mean_over_processes(value: float, world_size: int, device) -> float:
    """The mean of `value` over the processes of a run (itself for one process)."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / world_size


def from_rank0(flags: list[bool], world_size: int, device) -> list[bool]:
    """Rank 0's flags on every process: decisions such as "stop now" must agree."""
    if world_size == 1:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return [bool(v) for v in tensor.tolist()]


class StopOnInterrupt:
    """Ctrl-C sets a flag that a loop reads between steps (so it saves a consistent state and
    exits); a second Ctrl-C interrupts at once. Outside the main thread: no handler."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def machine() -> str:
    """Where a timing ran, in one line: the processor, the threads PyTorch uses, its version."""
    processor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # Linux names the model there; platform.processor() says only x86_64
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        processor = model.group(1).strip() if model else processor
    threads = torch.get_num_threads()
    return f"{processor}, {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}"
