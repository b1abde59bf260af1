"""The notebook helpers: show_source's listing and its parts, the timing helpers."""

import pytest
import torch

from lilllm import LilllmError
from lilllm.course import _block_end, machine, median_seconds, palette_png, show_source
from lilllm.train import Run


def test_median_seconds_warms_up_then_measures_each_repeat():
    calls = []
    seconds = median_seconds(lambda: calls.append(1), repeats=5, warmup=3)
    assert len(calls) == 8 and seconds >= 0


def test_machine_names_threads_and_torch():
    line, threads = machine(), torch.get_num_threads()
    assert f"{threads} thread{'s' if threads != 1 else ''}," in line and torch.__version__ in line


def test_show_source_prints_a_part_under_its_path_and_lines(capsys):
    show_source(Run, part="def log_train")  # outside IPython: plain text
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# lilllm/train.py, lines ") and "Run (def log_train" in lines[0]
    assert lines[1].strip().startswith("def log_train") and "def evaluate" not in "\n".join(lines)


def test_show_source_names_a_decorated_functions_own_file(capsys):
    from lilllm.sampling import _generate  # wrapped by @torch.no_grad(): torch's wrapper lives in torch's files

    show_source(_generate)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("# lilllm/sampling.py, lines ") and first.endswith(": _generate")


def test_show_source_refuses_a_part_that_is_not_there():
    with pytest.raises(LilllmError, match="not in the source of Run"):
        show_source(Run, part="def no_such_method")


def test_block_end_keeps_closing_brackets_and_stops_at_the_next_statement():
    lines = ["def f(\n", "    a,\n", "):\n", "    return a\n", "\n", "def g():\n"]
    assert _block_end(lines, 0) == 5
    assert _block_end(["    x = [\n", "        1,\n", "    ]\n", "    y = 2\n"], 0) == 3


def test_show_source_shows_a_module_from_its_first_line(capsys):
    import lilllm.layers.norm as norm
    show_source(norm)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("# lilllm/layers/norm.py, lines 1–") and first.endswith(": lilllm.layers.norm")


def test_palette_png_stores_a_figure_in_at_most_256_colours_and_fewer_bytes():
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(dpi=85)
    ax.imshow(torch.rand(32, 32).numpy())  # a heatmap: thousands of colours before quantizing
    ax.plot(range(10))
    full = io.BytesIO()
    fig.savefig(full, format="png", bbox_inches="tight", facecolor="white")
    light = palette_png(fig)
    image = Image.open(io.BytesIO(light))
    assert image.mode == "P" and image.size == Image.open(full).size
    assert len(light) < len(full.getvalue())
    assert palette_png(plt.figure()) is None  # an empty figure shows nothing, as in Jupyter
    plt.close("all")
