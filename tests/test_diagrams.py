"""The pictures draw what they are given: the highlighted parts, the head sharing, the cache's
work per pass, the experts' load, the supervised tokens."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from lilllm import diagrams  # noqa: E402


def faces(fig, colour):
    return [p for ax in fig.axes for p in ax.patches if to_hex(p.get_facecolor(), keep_alpha=False) == colour]


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("chapter, parts", [("04_attention", ["attention"]), ("02", ["RMSNorm"] * 3), ("09_sft", ["next-token"])])
def test_architecture_highlights_the_chapters_parts(chapter, parts):
    fig = diagrams.architecture(chapter)
    highlighted = faces(fig, "#fbd9c0")
    assert len(highlighted) == len(parts)
    assert f"Where notebook {chapter[:2]} sits" in fig.axes[0].get_title()


def test_the_whole_architecture_highlights_nothing():
    assert faces(diagrams.architecture(), "#fbd9c0") == []


def test_gqa_sharing_connects_each_query_head_to_its_group():
    fig = diagrams.gqa_sharing([(8, 2)])
    lines = fig.axes[0].lines
    assert len(lines) == 8
    ends = [line.get_xdata()[1] for line in lines]
    assert len(set(ends[:4])) == 1 and len(set(ends[4:])) == 1 and ends[0] != ends[4]
    assert "4 query heads per K/V head" in fig.axes[0].get_title()


def test_kv_cache_computes_the_prompt_once_then_one_token_per_step():
    fig = diagrams.kv_cache(prompt_length=5, new_tokens=3)
    assert len(faces(fig, diagrams.ORANGE)) == 5 + 3
    assert len(faces(fig, diagrams.PALE_BLUE)) == 5 + 6 + 7


def test_moe_dispatch_counts_each_experts_load():
    fig = diagrams.moe_dispatch(["a", "b", "c"], [[(0, 0.7), (1, 0.3)], [(0, 1.0)], [(2, 0.5), (0, 0.5)]], n_experts=3)
    assert {"expert 0: 3", "expert 1: 1", "expert 2: 1"} <= set(texts(fig))


def test_sft_mask_colours_the_supervised_tokens():
    fig = diagrams.sft_mask(["<|user|>", "hi", "<|assistant|>", "yo", "<|end|>"], [0, 0, 0, 1, 1])
    assert len(faces(fig, "#b7e4c7")) == 2


@pytest.mark.parametrize("chapter, n_parts", [("04_attention", 1), ("02_rmsnorm", 3), ("08_pretraining", 1), ("11_palm", 5), ("12_compress_and_share", 2), ("13_speedrun", 2)])
def test_where_we_are_shows_one_row_with_the_chapters_parts_in_orange(monkeypatch, chapter, n_parts):
    shown = []
    monkeypatch.setattr(plt, "show", lambda: shown.append(plt.gcf()))
    assert diagrams.where_we_are(chapter) is None
    (fig,) = shown
    assert len(faces(fig, "#fbd9c0")) == n_parts and len(faces(fig, "#ffffff")) == len(diagrams.PARTS) - n_parts
