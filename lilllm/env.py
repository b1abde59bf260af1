"""The environment report (`lilllm env`): is everything the course needs installed (and which
build of torch), which device will run the model, and is the data file intact?"""

import os
import platform
import re
from dataclasses import dataclass
from importlib import metadata

import torch

from lilllm import LilllmError
from lilllm.data import TINYSHAKESPEARE, verify_text_file
from lilllm.runtime import DEVICE_ENV_VAR, REPO_ROOT, cpu_bf16_support, matmul_flops, pick_device


@dataclass
class Check:
    ok: bool
    message: str

    def __str__(self) -> str:
        return f"[{'OK' if self.ok else 'FAIL'}] {self.message}"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): the leading dotted numbers, for comparing versions."""
    leading = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in leading.group().split(".")) if leading else ()


def _requirements() -> list[tuple[str, str]]:
    """(name, minimum version) of each runtime dependency, read from the installed
    package's metadata, so pyproject.toml stays the one place they are written."""
    try:
        requires = metadata.requires("lilllm") or []
    except metadata.PackageNotFoundError:
        raise LilllmError('lilllm is not installed: run `pip install -e ".[dev]"` in the repository') from None
    pairs = []
    for req in requires:
        if "extra ==" in req:
            continue
        name, _, minimum = req.partition(">=")
        pairs.append((name.strip(), minimum.split(",")[0].strip()))
    return pairs


def check_requirements() -> list[Check]:
    """One check for Python and one per runtime dependency: installed, and new enough."""
    python = platform.python_version()
    requires_python = metadata.metadata("lilllm")["Requires-Python"].removeprefix(">=")
    checks = [Check(_version_tuple(python) >= _version_tuple(requires_python), f"python {python} (>= {requires_python})")]
    for name, minimum in _requirements():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            checks.append(Check(False, f"{name} is missing (>= {minimum}): run `pip install -e \".[dev]\"`"))
            continue
        ok = _version_tuple(version) >= _version_tuple(minimum)
        checks.append(Check(ok, f"{name} {version} (>= {minimum})" + ("" if ok else ": upgrade it")))
    return checks


CPU_WHEELS = "https://download.pytorch.org/whl/cpu"


def check_torch_build() -> Check:
    """Which build of torch is installed. A CUDA build on a machine without a GPU carries
    gigabytes of CUDA libraries it never uses: say how much, and how to get the CPU build."""
    if torch.version.cuda is None:
        return Check(True, f"torch {torch.__version__}: the CPU build (no CUDA libraries)")
    message = f"torch {torch.__version__}: the CUDA {torch.version.cuda} build"
    if not torch.cuda.is_available():
        size = _installed_bytes(lambda name: name.startswith("nvidia-"))
        message += (f", with {size / 1e9:.1f} GB of CUDA libraries (nvidia-* packages) and no GPU to use them here: "
                    f"the CPU build is much smaller; in a fresh venv: pip install torch --index-url {CPU_WHEELS}")
    return Check(True, message)


def _installed_bytes(wanted) -> int:
    """The bytes of every installed distribution whose lower-case name `wanted` accepts."""
    total = 0
    for dist in metadata.distributions():
        if wanted((dist.metadata["Name"] or "").lower()):
            total += sum(file.size or 0 for file in dist.files or ())
    return total


def check_cpu_precision(sizes=(128, 512), seconds: float = 0.2) -> Check:
    """Whether bf16 autocast (`--cpu-bf16`) can pay on this CPU, and why: it needs bf16 matmul
    units (AMX, AVX512-BF16; without them bf16 matmuls are slower than fp32) and matrices wide
    enough to keep them busy. Measured here: bf16 against fp32 matmul speed at each size."""
    features = cpu_bf16_support()
    ratios = ", ".join(f"{matmul_flops('cpu', size, seconds, torch.bfloat16) / matmul_flops('cpu', size, seconds):.2f}×"
                       f" at {size}" for size in sizes)
    if features:
        why = (f"{' and '.join(features)} present; bf16/fp32 matmul speed {ratios}: try --cpu-bf16 and compare "
               "the steps per second (a narrow model can lose to autocast's own cost)")
    else:
        why = f"no AMX or AVX512-BF16 (bf16/fp32 matmul speed {ratios}): train in fp32, the default"
    return Check(True, f"CPU precision: {why}")


def environment_report(device: str | None = None) -> list[Check]:
    """Everything `lilllm env` prints: requirements, device, threads, the data file."""
    try:
        checks = check_requirements()
    except LilllmError as err:
        checks = [Check(False, str(err))]
    checks.append(check_torch_build())
    try:
        chosen = pick_device(device)
        how = "chosen" if device or os.environ.get(DEVICE_ENV_VAR) else f"auto: cuda → mps → cpu; override with --device or ${DEVICE_ENV_VAR}"
        checks.append(Check(True, f"device {chosen} ({how})"))
    except LilllmError as err:
        checks.append(Check(False, str(err)))
    checks.append(Check(True, f"torch threads {torch.get_num_threads()} (cpu cores {os.cpu_count()})"))
    checks.append(check_cpu_precision())
    try:
        verify_text_file(TINYSHAKESPEARE)
        checks.append(Check(True, f"data {TINYSHAKESPEARE.relative_to(REPO_ROOT)} (size and sha256 match)"))
    except LilllmError as err:
        checks.append(Check(False, str(err)))
    return checks


def main(device: str | None = None) -> int:
    """Print the report; 0 when every line is OK, 1 otherwise."""
    checks = environment_report(device)
    print(f"lilllm environment on {platform.system()} {platform.machine()}")
    for check in checks:
        print(check)
    return 0 if all(check.ok for check in checks) else 1
