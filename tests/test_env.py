"""The environment check, the device choice, the CLI, and environment.yml vs pyproject."""

import re
import subprocess
import sys
from importlib import metadata

import pytest
import torch
import yaml

from lilllm import LilllmError
from lilllm.cli import main as cli_main
from lilllm.env import check_cpu_precision, check_torch_build, environment_report
from lilllm.runtime import REPO_ROOT, cpu_bf16_support, pick_device


def test_environment_report_has_no_failures_here():
    checks = environment_report()
    assert [str(c) for c in checks if not c.ok] == []
    names = " ".join(c.message for c in checks)
    for dependency in ("python", "torch", "numpy", "tiktoken", "tokenizers", "datasets", "device", "data"):
        assert dependency in names


def test_lilllm_env_prints_only_ok_lines(capsys):
    assert cli_main(["env"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines and all(line.startswith("[OK]") for line in lines)


def test_lilllm_env_fails_with_exit_1_when_the_data_is_corrupt(monkeypatch, capsys):
    import lilllm.data

    monkeypatch.setitem(lilllm.data.EXPECTED, lilllm.data.TINYSHAKESPEARE, (1_115_394, "0" * 64))
    assert cli_main(["env"]) == 1
    assert "[FAIL] " in capsys.readouterr().out


def test_env_names_the_torch_build_and_points_to_the_cpu_one_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "the CPU build" in str(check_torch_build())
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = str(check_torch_build())
    assert "the CUDA 12.8 build, with" in message and "GB of CUDA libraries" in message
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU uses them: nothing to say
    assert str(check_torch_build()).endswith("the CUDA 12.8 build")


def test_pick_device_auto_and_override(monkeypatch):
    monkeypatch.delenv("LILLLM_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert pick_device().type == expected
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("LILLLM_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")


@pytest.mark.parametrize("name, message", [("tpu", "unknown device 'tpu'"), ("gpu:0", "unknown device")])
def test_pick_device_rejects_unknown_names(name, message):
    with pytest.raises(LilllmError, match=message):
        pick_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_pick_device_rejects_an_unavailable_device():
    with pytest.raises(LilllmError, match="not available on this machine"):
        pick_device("cuda")


def test_cli_reports_bad_input_in_one_line_without_traceback():
    result = subprocess.run([sys.executable, "-m", "lilllm.cli", "env", "--device", "tpu"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "[FAIL] unknown device 'tpu'" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_help_lists_the_subcommands():
    result = subprocess.run([sys.executable, "-m", "lilllm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "env" in result.stdout


def _names(requirements):
    """{'torch', 'numpy', ...} from lines like 'torch>=2.5' (conda's 'pytorch' is pip's 'torch')."""
    names = {re.split(r"[<>=\s]", r.strip(), maxsplit=1)[0].lower() for r in requirements}
    return {"torch" if name == "pytorch" else name for name in names}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())  # yaml comes with datasets
    conda = [d for d in environment["dependencies"] if isinstance(d, str) and d != "pip"]
    pip_requirements = [r for r in metadata.requires("lilllm") if "extra ==" not in r]
    pip_requirements.append("python" + metadata.metadata("lilllm")["Requires-Python"])
    assert _names(conda) == _names(pip_requirements)
    bounds = lambda reqs: {n: re.search(r">=\s*([\d.]+)", r).group(1) for r in reqs for n in _names([r])}
    assert bounds(conda) == bounds(pip_requirements)  # the same lower bounds
    assert ["-e .[dev]"] in [d["pip"] for d in environment["dependencies"] if isinstance(d, dict)]


def test_cpu_bf16_support_reads_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bf16_support(cpuinfo) == ["amx_bf16", "avx512_bf16"]
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    assert cpu_bf16_support(cpuinfo) == []
    assert cpu_bf16_support(tmp_path / "absent") == []  # macOS, Windows: no /proc/cpuinfo


@pytest.mark.parametrize("features", [[], ["amx_bf16"]])
def test_the_cpu_precision_line_says_which_precision_and_why(monkeypatch, features):
    import lilllm.env

    monkeypatch.setattr(lilllm.env, "cpu_bf16_support", lambda: features)
    message = check_cpu_precision(sizes=(64,), seconds=0.01).message
    assert re.search(r"bf16/fp32 matmul speed \d+\.\d\d× at 64", message)
    assert ("--cpu-bf16" in message) == bool(features) and ("fp32, the default" in message) == (not features)
