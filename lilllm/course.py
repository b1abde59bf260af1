"""The course around the package: the map of the chapters, what every notebook calls first
(quick mode, seeds, the figure style, showing finished code, saving figures), the pretrained
model later chapters start from, and re-executing notebooks in place:

    python -m lilllm.course              # every notebook, in order
    python -m lilllm.course 03_rope 04   # by name or number prefix
"""

import inspect
import io
import json
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from lilllm import LilllmError
from lilllm.checkpoint import FORMAT, load_checkpoint
from lilllm.runtime import REPO_ROOT, machine, repo_path, shown  # machine: for the notebooks' timing cells
from lilllm.train import BEST, CONFIG_FILE, LAST, is_finished, load_data, make_config, saved_config, train

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
SOLUTIONS_DIR = NOTEBOOKS_DIR / "solutions"  # NN_topic_solutions.ipynb: a worked answer to every exercise
FIGURES_DIR = REPO_ROOT / "figures"
QUICK_ENV_VAR = "LILLLM_QUICK"
# One look for every figure of the course.
STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 85,  # inline figures: readable, and light in the committed notebooks (save_figure uses 120)
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
    """The first call of every notebook: seeds, the course's figure style, and (in Jupyter)
    figures stored as 256-colour PNGs."""
    seed_everything(seed)
    plt.rcParams.update(STYLE)
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        plt.switch_backend(plt.get_backend())  # load the inline backend now, so its PNG formatter is not re-registered later
        shell.display_formatter.formatters["image/png"].for_type(plt.Figure, palette_png)


def palette_png(fig) -> bytes | None:
    """`fig` as a PNG of at most 256 colours: about a third of the bytes of matplotlib's RGBA
    PNG and the same picture to the eye (a plot has few colours), which keeps the committed
    notebooks light. None for an empty figure, as Jupyter's own formatter does."""
    from PIL import Image  # matplotlib depends on Pillow

    if not fig.axes and not fig.lines:
        return None
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png", bbox_inches="tight", facecolor="white")
    image = Image.open(rgba).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    out = io.BytesIO()
    image.save(out, format="png", optimize=True)
    return out.getvalue()


def show_source(obj, part: str | None = None, fold_after: int = 40) -> None:
    """Show the finished code of a lilllm function or class, under its file's name, as one
    Markdown listing (in a terminal: plain text). `part` shows only the block that starts at
    the first line containing it (`show_source(Run, part="def step")`); a listing longer than
    `fold_after` lines is folded, one click away."""
    lines, first = inspect.getsourcelines(obj)
    first = max(first, 1)  # a module's source starts at line 0 for inspect
    name = getattr(obj, "__qualname__", obj.__name__)
    if part is not None:
        starts = [i for i, line in enumerate(lines) if part in line]
        if not starts:
            raise LilllmError(f"{part!r} is not in the source of {name}")
        start = starts[0]
        end = _block_end(lines, start)
        lines, first = lines[start:end], first + start
    # unwrap: a decorated function (@torch.no_grad()) is torch's wrapper, whose file is torch's
    path = Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve().relative_to(REPO_ROOT).as_posix()
    title = f"{path}, lines {first}–{first + len(lines) - 1}: {name}" + (f" ({part.strip()} …)" if part else "")
    listing = "```python\n" + "".join(lines).rstrip() + "\n```"
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None
    if get_ipython is None or get_ipython() is None:
        print(f"# {title}\n" + "".join(lines).rstrip())
    elif len(lines) > fold_after:
        display(Markdown(f"<details><summary><code>{title}</code> ({len(lines)} lines: click to open)</summary>\n\n"
                         f"{listing}\n\n</details>"))
    else:
        display(Markdown(f"`{title}`\n\n{listing}"))


def _block_end(lines: list[str], start: int) -> int:
    """The index after the indented block that begins at lines[start]: the first later line
    indented no deeper than it (closing brackets excepted)."""
    depth = len(lines[start]) - len(lines[start].lstrip())
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped and len(lines[i]) - len(lines[i].lstrip()) <= depth and stripped[0] not in ")]}":
            return i
    return len(lines)


def median_seconds(fn, repeats: int = 7, warmup: int = 2) -> float:
    """The median wall time of fn() in seconds over `repeats` calls, after `warmup` calls that
    are not measured (first calls allocate and warm caches): one busy moment does not move it.
    Timing cells report ratios of these, never a single run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def save_figure(fig, name: str) -> Path:
    """Save `fig` as figures/<name>.png (the README shows these). In quick mode the
    figure goes to figures/quick/ instead, so tests never overwrite the real ones."""
    folder = FIGURES_DIR / "quick" if quick_mode() else FIGURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


# --- the map of the course ----------------------------------------------------------------
# Which notebook teaches what, and which lilllm modules hold its finished code. The setup
# notebook, the README table and the notebook tests read it.

@dataclass(frozen=True)
class Chapter:
    notebook: str  # file stem in notebooks/
    adds: str  # what the chapter adds to the model or the pipeline
    modules: tuple[str, ...]  # the lilllm modules it teaches (imports and checks against)

    @property
    def path(self):
        return NOTEBOOKS_DIR / f"{self.notebook}.ipynb"

    @property
    def written(self) -> bool:
        return self.path.exists()


CURRICULUM = (
    Chapter("00_setup", "the map, the environment check, the data and its split",
            ("lilllm.runtime", "lilllm.env", "lilllm.data", "lilllm.course", "lilllm.diagrams", "lilllm.cli")),
    Chapter("01_tokenizer", "characters → bytes → byte-level BPE, served by tiktoken; token files",
            ("lilllm.tokenizer", "lilllm.data")),
    Chapter("02_rmsnorm", "LayerNorm → RMSNorm", ("lilllm.layers.norm",)),
    Chapter("03_rope", "absolute positions → rotary position embeddings", ("lilllm.layers.rope",)),
    Chapter("04_attention", "causal attention → MHA → MQA → GQA, SDPA, the KV cache",
            ("lilllm.layers.attention",)),
    Chapter("05_swiglu", "GELU MLP → SwiGLU; the decoder block and the whole model",
            ("lilllm.layers.ffn", "lilllm.layers.sublayer", "lilllm.config", "lilllm.model")),
    Chapter("06_plga", "Power Law Graph Attention (PLDR-LLM)", ("lilllm.layers.plga",)),
    Chapter("07_moe", "mixture-of-experts with three ways to balance the load", ("lilllm.layers.moe",)),
    Chapter("08_pretraining", "the training loop, checkpoints, bits per byte", ("lilllm.settings", "lilllm.progress", "lilllm.train", "lilllm.checkpoint")),
    Chapter("09_sft", "chat template, assistant-only loss, fine-tuning", ("lilllm.chat", "lilllm.sft", "lilllm.next_speaker")),
    Chapter("10_sampling", "greedy, temperature, top-k, top-p, KV-cache generation", ("lilllm.sampling", "lilllm.bench")),
    Chapter("11_palm", "PaLM's parallel block, xPos, QK-norm, Stable AdamW; three equal-time experiments",
            ("lilllm.optim",)),
    Chapter("12_compress_and_share", "seed 004: a conv-attention hourglass (its leak, a causal fix), shared blocks "
            "that diverge, LoRA", ("lilllm.hourglass", "lilllm.layers.lora")),
    Chapter("13_speedrun", "a CPU speedrun: Muon from scratch (Newton–Schulz), its cost on a CPU, and the training "
            "tricks raced one at a time at equal time over seeds", ("lilllm.optim",)),
    Chapter("14_capstone", "the whole pipeline end to end; export to and import from Hugging Face transformers "
            "(equal logits, greedy text, chat template); a generation race", ("lilllm.hf",)),
)


# --- the pretrained model later chapters start from ------------------------------------------

RUNS_DIR = REPO_ROOT / "runs"
QUICK_SETTINGS = ["--steps=30", "--warmup=5", "--eval-interval=0"]  # quick mode's pretrained model


def pretrained_checkpoint(recipe: str = "tiny") -> Path:
    """The best.pt of a finished run of `recipe`, so that later chapters start from a pretrained
    model on a fresh clone: the run cached in runs/pretrained-<recipe>/, else the recipe's own
    run (runs/tiny, from `lilllm train tiny`) if it is the same run, else one trained now and
    cached. The same run: the recipe's settings (out_dir aside), the checkpoint format, the
    tokenizer, one process, and finished. In quick mode ($LILLLM_QUICK, the tests) a 30-step run
    is cached apart, in runs/pretrained-<recipe>-quick/."""
    name = f"pretrained-{recipe}" + ("-quick" if quick_mode() else "")
    final = RUNS_DIR / name
    settings = QUICK_SETTINGS if quick_mode() else []
    config = make_config(recipe, settings)
    wanted = _identity(config.to_dict(), load_data(config).tokenizer.fingerprint, FORMAT, processes=1)
    for run_dir in (final, repo_path(config.out_dir)):
        if _finished_run_of(run_dir, wanted, config):
            return run_dir / BEST
    shutil.rmtree(final, ignore_errors=True)  # an unfinished run, or one of an older recipe, format or tokenizer
    print(f"training the {recipe} recipe once, into {shown(final)} (later calls reuse it)", flush=True)
    # Trained beside and renamed when done: a parallel caller never sees half a run.
    temp = RUNS_DIR / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    train(make_config(recipe, [f"--out-dir={temp}", *settings]), progress=False)
    try:
        os.replace(temp, final)
    except OSError:  # another process finished first: keep its run
        shutil.rmtree(temp, ignore_errors=True)
    print(f"cached: {shown(final / BEST)}", flush=True)  # the lines above named the temporary folder
    return final / BEST


def _identity(settings: dict, tokenizer_fingerprint, checkpoint_format, processes) -> dict:
    """What makes two runs the same run: their settings apart from out_dir, the tokenizer, the
    checkpoint format and the number of processes (several make a larger global batch)."""
    return {**settings, "out_dir": None, "tokenizer": tokenizer_fingerprint, "format": checkpoint_format,
            "processes": processes}


def _finished_run_of(run_dir: Path, wanted: dict, config) -> bool:
    """Whether run_dir holds a finished run whose identity is `wanted`."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())
        # A setting added since the run was trained takes the value it trained with (train.SETTINGS_ADDED).
        settings = saved_config(saved["train"]).to_dict()
        identity = _identity(settings, saved.get("tokenizer_fingerprint"), saved.get("checkpoint_format"),
                             saved.get("processes", 1))  # older runs did not write processes: one
        if identity != wanted or not (run_dir / BEST).exists():
            return False
        state = load_checkpoint(run_dir / LAST)
        return is_finished(state["step"], state["clock"]["train_time"], config)
    except (OSError, ValueError, KeyError, LilllmError):  # no run there, or an unreadable one
        return False


# --- re-executing notebooks --------------------------------------------------------------------

def execute_notebooks(names: list[str] | None = None, timeout: int = 1800) -> None:
    """Re-execute notebooks in place, in course order (the chapters, then their solutions),
    each in a fresh kernel of this Python, with full (not quick) settings, so committed outputs
    always come from a real run. `names` selects notebooks by name ("03_rope", "03_rope_solutions")
    or prefix ("03": chapter 03 and its solutions); default all."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError:
        raise LilllmError('executing notebooks needs the dev extra: run `pip install -e ".[dev]"`') from None
    paths = sorted(NOTEBOOKS_DIR.glob("*.ipynb")) + sorted(SOLUTIONS_DIR.glob("*.ipynb"))
    if names:
        stems = {p.stem for p in paths}  # a full name selects that notebook alone
        chosen = [p for p in paths if any(p.stem == name or (p.name.startswith(name) and name not in stems)
                                          for name in names)]
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
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
        # the name JupyterLab gives this kernel: otherwise a notebook opens as modified
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
        nbformat.write(notebook, path)


if __name__ == "__main__":
    try:
        execute_notebooks(sys.argv[1:])
    except LilllmError as err:
        sys.exit(f"error: {err}")
