"""Support for the notebooks: quick mode, seeding, showing finished code, saving figures,
and re-executing notebooks in place (`python -m lilllm.notebook [NAMES...]`)."""

import inspect
import os
import random
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from lilllm import LilllmError
from lilllm.env import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
FIGURES_DIR = REPO_ROOT / "figures"
QUICK_ENV_VAR = "LILLLM_QUICK"
# One look for every figure of the course.
STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "font.size": 10,
}


def quick_mode() -> bool:
    """True when $LILLLM_QUICK is set (tests): notebooks shrink their training."""
    return os.environ.get(QUICK_ENV_VAR, "") not in ("", "0")


def choose(full, quick):
    """`full` normally, `quick` in quick mode: `steps = choose(2000, 50)`."""
    return quick if quick_mode() else full


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so a notebook gives the same numbers every run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_notebook(seed: int = 0) -> None:
    """The first call of every notebook: seeds and the course's figure style."""
    seed_everything(seed)
    plt.rcParams.update(STYLE)


def show_source(obj) -> None:
    """Display the source code of a lilllm function or class (highlighted in Jupyter)."""
    source = inspect.getsource(obj)
    try:
        from IPython.display import Code, display
    except ImportError:
        print(source)
    else:
        display(Code(source, language="python"))


def save_figure(fig, name: str) -> Path:
    """Save `fig` as figures/<name>.png (the README shows these). In quick mode the
    figure goes to figures/quick/ instead, so tests never overwrite the real ones."""
    folder = FIGURES_DIR / "quick" if quick_mode() else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def execute_notebooks(names: list[str] | None = None, timeout: int = 1800) -> None:
    """Re-execute notebooks in place, in course order, in a fresh kernel of this Python,
    with full (not quick) settings, so committed outputs always come from a real run.
    `names` selects notebooks by file name or prefix ("03", "03_rope"); default all."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        raise LilllmError('executing notebooks needs the dev extra: run `pip install -e ".[dev]"`') from None
    paths = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
    if names:
        chosen = [p for p in paths if any(p.name.startswith(name) for name in names)]
        unknown = [n for n in names if not any(p.name.startswith(n) for p in paths)]
        if unknown:
            raise LilllmError(f"no notebook matches {', '.join(unknown)}: choose from {', '.join(p.stem for p in paths)}")
        paths = chosen
    os.environ.pop(QUICK_ENV_VAR, None)  # the kernel inherits this environment
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", record_timing=False,
            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
        )
        client.execute()
        nbformat.write(notebook, path)


if __name__ == "__main__":
    try:
        execute_notebooks(sys.argv[1:])
    except LilllmError as err:
        sys.exit(f"error: {err}")
