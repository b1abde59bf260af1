"""The course's pictures: where a chapter sits in the model, and the shapes that the text
describes (attention's heads, GQA's sharing, the KV cache, MoE dispatch, the SFT mask).

Each function draws from the numbers it is given and returns the matplotlib figure; the
notebooks pass real values (a real router's choices, a real rendered conversation), so a
picture shows what the code does, not what a slide once said.
"""

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

BLUE, PALE_BLUE, GREY, PALE_GREY = "#4a6f94", "#dbe9f6", "#888888", "#f2f2f2"
ORANGE, GREEN = "#e07b39", "#2e8b57"
HEAD_COLOURS = plt.get_cmap("tab10").colors

# --- where a chapter sits ------------------------------------------------------------------------
# The model from input to output: (label, the chapters that build the part, y, height), drawn
# bottom to top, the way data flows. The dashed box is the decoder block that repeats.
PARTS = (
    ("text → token ids\n(byte-level BPE, tiktoken)", "tokens", ("01",), 0.0, 0.8),
    ("token embedding", "embedding", ("05",), 1.3, 0.6),
    ("RMSNorm", "RMSNorm", ("02", "11"), 2.5, 0.5),
    ("attention: GQA + RoPE + KV cache\n(or PLGA; xPos, QK-norm)", "attention\n(RoPE, GQA, PLGA,\nxPos, QK-norm)",
     ("03", "04", "06", "11", "12"), 3.3, 0.8),
    ("RMSNorm (none in a parallel block)", "RMSNorm", ("02", "11"), 4.7, 0.5),
    ("feed-forward: SwiGLU\n(or mixture-of-experts, ReLU²)", "feed-forward\n(SwiGLU, MoE,\nReLU²)", ("05", "07", "11", "13"), 5.5, 0.8),
    ("final RMSNorm", "final norm", ("02",), 7.0, 0.5),
    ("output head → logits", "head → logits", ("05",), 7.8, 0.6),
    ("next-token loss: pretraining, SFT mask\n| sampling: greedy, top-k, top-p", "train · SFT\n· sample", ("08", "09", "10", "11", "12", "13"),
     8.8, 0.8),
)
BLOCK = (2.3, 6.45)  # the decoder block's extent in y: the parts between repeat


def architecture(chapter: str | None = None):
    """The model this course builds, each part labelled with the notebooks that teach it.
    `chapter` ("04" or "04_attention") paints that chapter's parts orange and greys the rest
    (chapters open with the same parts in one row: `where_we_are`)."""
    number = chapter[:2] if chapter else None
    fig, ax = plt.subplots(figsize=(7.5, 7.5) if number is None else (6.0, 6.0))
    for label, _, chapters, y, height in PARTS:
        if number is None:
            face, edge = (PALE_BLUE if BLOCK[0] <= y <= BLOCK[1] else PALE_GREY), BLUE
        else:
            face, edge = ("#fbd9c0", ORANGE) if number in chapters else ("white", "#bbbbbb")
        ax.add_patch(FancyBboxPatch((1.3, y), 3.8, height, boxstyle="round,pad=0.05", facecolor=face,
                                    edgecolor=edge, linewidth=2 if face == "#fbd9c0" else 1))
        ax.text(3.2, y + height / 2, label, ha="center", va="center", fontsize=9,
                color="black" if number in (None, *chapters) else GREY)
        ax.text(5.6, y + height / 2, "notebook " + ", ".join(chapters), va="center", fontsize=8,
                color="#a0522d" if number in (None, *chapters) else "#bbbbbb")
    for (*_, y0, h0), (*_, y1, _) in zip(PARTS, PARTS[1:]):
        ax.annotate("", xy=(3.2, y1 - 0.05), xytext=(3.2, y0 + h0 + 0.05), arrowprops=dict(arrowstyle="->", color="#555"))
    ax.add_patch(FancyBboxPatch((0.5, BLOCK[0]), 4.8, BLOCK[1] - BLOCK[0], boxstyle="round,pad=0.05", fill=False,
                                linestyle="--", edgecolor=GREY))
    ax.text(0.1, 4.4, "× n_layers\ndecoder block", rotation=90, ha="center", va="center", fontsize=9, color="#555")
    for start, end in [(2.4, 4.2), (4.6, 6.4)]:  # the residual stream skips each sub-layer
        ax.annotate("", xy=(0.85, end), xytext=(0.85, start), arrowprops=dict(arrowstyle="->", color=GREEN))
        ax.text(0.95, end - 0.1, "+", color=GREEN, fontsize=12, va="center")
    ax.set(xlim=(-0.2, 7.4), ylim=(-0.3, 9.8))
    ax.axis("off")
    ax.set_title("The model this course builds, and where each part is taught" if number is None
                 else f"Where notebook {number} sits: the orange parts")
    return fig


def where_we_are(notebook: str) -> None:
    """Every chapter opens with this: the architecture of `architecture()` as one row, left to
    right, this notebook's parts in orange (`where_we_are("04_attention")`)."""
    number = notebook[:2]
    step = 1.3  # box width + gap
    fig, ax = plt.subplots(figsize=(11, 1.3), dpi=80)
    for i, (_, short, chapters, y, _) in enumerate(PARTS):
        here = number in chapters
        ax.add_patch(FancyBboxPatch((i * step, 0), step - 0.2, 0.8, boxstyle="round,pad=0.02", linewidth=2 if here else 1,
                                    facecolor="#fbd9c0" if here else "white", edgecolor=ORANGE if here else "#bbbbbb"))
        ax.text(i * step + (step - 0.2) / 2, 0.4, short, ha="center", va="center", fontsize=7.5, color="black" if here else GREY)
        if i:
            ax.annotate("", xy=(i * step, 0.4), xytext=(i * step - 0.2, 0.4), arrowprops=dict(arrowstyle="->", color="#999"))
    in_block = [i for i, part in enumerate(PARTS) if BLOCK[0] <= part[3] <= BLOCK[1]]
    ax.add_patch(FancyBboxPatch((in_block[0] * step - 0.07, -0.1), len(in_block) * step - 0.06, 1.0,
                                boxstyle="round,pad=0.02", fill=False, linestyle="--", edgecolor=GREY))
    ax.text(in_block[0] * step + len(in_block) * step / 2, 1.0, "decoder block × n_layers", ha="center", fontsize=7.5, color=GREY)
    ax.set(xlim=(-0.1, len(PARTS) * step), ylim=(-0.15, 1.2))
    ax.axis("off")
    ax.set_title(f"Where notebook {number} sits (orange)", fontsize=9, loc="left")
    plt.show()


# --- shapes ---------------------------------------------------------------------------------


def _tensor(ax, x, y, width, height, label, colour=PALE_BLUE, stripes=1, above=None):
    """A tensor as a rectangle, split into `stripes` coloured columns (heads), labelled below."""
    for i in range(stripes):
        face = HEAD_COLOURS[i % 10] if stripes > 1 else colour
        ax.add_patch(Rectangle((x + i * width / stripes, y), width / stripes, height, facecolor=face,
                               edgecolor="white" if stripes > 1 else BLUE, alpha=0.75))
    ax.text(x + width / 2, y - 0.25, label, ha="center", va="top", fontsize=8)
    if above:
        ax.text(x + width / 2, y + height + 0.15, above, ha="center", va="bottom", fontsize=9, weight="bold")


def attention_shapes(n_head: int = 4, T: int = 6, head_dim: int = 2):
    """Multi-head attention as shapes: x (B,T,C) is projected to Q, K, V (B,T,C) whose
    channels are h heads of d_head; a view and a transpose give (B,h,T,d_head); each head
    scores (T,T) with the causal mask; the outputs are put back side by side and mixed."""
    C = n_head * head_dim
    fig, ax = plt.subplots(figsize=(11, 3.6))
    unit = 0.35  # one row or channel
    _tensor(ax, 0, 0, C * unit, T * unit, f"(B, T, C)\nT={T}, C={C}", above="x")
    x = C * unit + 1.2
    for name in "QKV":  # three projections, each C → C, drawn with their heads coloured
        _tensor(ax, x, 0, C * unit, T * unit, f"(B, T, h·d)\nh={n_head}, d={head_dim}", stripes=n_head,
                above=name + " = x W" + name.lower())
        x += C * unit + 1.0
    ax.annotate("", xy=(x + 0.5, T * unit / 2), xytext=(x - 0.3, T * unit / 2), arrowprops=dict(arrowstyle="->"))
    ax.text(x + 0.1, T * unit / 2 + 0.3, "view,\ntranspose", ha="center", fontsize=8)
    x += 0.9
    for head in range(n_head):  # per head: a (T, T) score table, lower triangle kept by the mask
        for i in range(T):
            for j in range(T):
                ax.add_patch(Rectangle((x + j * unit * 0.6, (T - 1 - i) * unit), unit * 0.6, unit,
                                       facecolor=HEAD_COLOURS[head] if j <= i else "white", edgecolor="#dddddd",
                                       alpha=0.75 if j <= i else 1))
        ax.text(x + T * unit * 0.3, -0.25, f"head {head}\n(T, T)", ha="center", va="top", fontsize=8)
        x += T * unit * 0.6 + 0.35
    ax.text(x - (T * unit * 0.6 + 0.35) * n_head / 2, T * unit + 0.15, "softmax(Q Kᵀ/√d), causal, per head",
            ha="center", va="bottom", fontsize=9, weight="bold")
    ax.annotate("", xy=(x + 0.5, T * unit / 2), xytext=(x - 0.2, T * unit / 2), arrowprops=dict(arrowstyle="->"))
    ax.text(x + 0.15, T * unit / 2 + 0.3, "× V,\nmerge", ha="center", fontsize=8)
    x += 0.9
    _tensor(ax, x, 0, C * unit, T * unit, "(B, T, C)\nheads side by side", stripes=n_head, above="y, then W_o")
    ax.set(xlim=(-0.3, x + C * unit + 0.3), ylim=(-1.2, T * unit + 0.8), aspect="equal")
    ax.axis("off")
    return fig


def gqa_sharing(settings=((8, 8), (8, 2), (8, 1))):
    """Which key/value head each query head reads, for each (n_head, n_kv) in `settings`:
    query head i uses K/V head i // (n_head // n_kv), the grouping `repeat_interleave` makes."""
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 2.6), squeeze=False)
    for ax, (n_head, n_kv) in zip(axes[0], settings):
        group = n_head // n_kv
        for i in range(n_head):
            ax.add_patch(Rectangle((i, 2), 0.8, 0.6, facecolor=HEAD_COLOURS[(i // group) % 10], alpha=0.75))
            kv_x = (i // group) * n_head / n_kv + (n_head / n_kv - 0.8) / 2
            ax.plot([i + 0.4, kv_x + 0.4], [2, 0.6], color=GREY, linewidth=0.8)
        for j in range(n_kv):
            kv_x = j * n_head / n_kv + (n_head / n_kv - 0.8) / 2
            ax.add_patch(Rectangle((kv_x, 0), 0.8, 0.6, facecolor=HEAD_COLOURS[j % 10], edgecolor="black"))
        name = "MHA" if n_kv == n_head else "MQA" if n_kv == 1 else f"GQA, {group} query heads per K/V head"
        ax.set_title(f"{name}\nn_head={n_head}, n_kv={n_kv}: cache holds {n_kv} K/V heads", fontsize=9)
        ax.text(-0.3, 2.3, "Q", ha="right", va="center")
        ax.text(-0.3, 0.3, "K,V", ha="right", va="center")
        ax.set(xlim=(-1.2, n_head + 0.2), ylim=(-0.2, 2.8))
        ax.axis("off")
    return fig


def kv_cache(prompt_length: int = 5, new_tokens: int = 3):
    """Generation with a KV cache, one row per forward pass: the prefill computes keys and
    values for the whole prompt; each decode step computes them for one new token and reads
    the rest from the cache."""
    total = prompt_length + new_tokens
    steps = ["prefill"] + [f"decode {s}" for s in range(1, new_tokens + 1)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * total, 0.6 + 0.5 * len(steps)))
    for row, step in enumerate(steps):
        known = prompt_length + row  # tokens whose K/V exist after this pass
        for pos in range(total):
            if row == 0:
                colour = ORANGE if pos < prompt_length else "white"
            else:
                colour = ORANGE if pos == known - 1 else PALE_BLUE if pos < known - 1 else "white"
            ax.add_patch(Rectangle((pos, -row), 0.9, 0.8, facecolor=colour, edgecolor="#bbbbbb"))
        ax.text(-0.2, -row + 0.4, step, ha="right", va="center", fontsize=9)
    for pos in range(total):
        ax.text(pos + 0.45, 1.0, "prompt" if pos == 0 else "", fontsize=8, ha="left")
        ax.text(pos + 0.45, -len(steps) + 0.6, str(pos), ha="center", fontsize=8, color=GREY)
    handles = [Rectangle((0, 0), 1, 1, facecolor=ORANGE), Rectangle((0, 0), 1, 1, facecolor=PALE_BLUE)]
    ax.legend(handles, ["K, V computed in this pass", "K, V read from the cache"], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set(xlim=(-2.2, total + 0.2), ylim=(-len(steps) + 0.3, 1.4), title="Prefill, then one token per step")
    ax.axis("off")
    return fig


def moe_dispatch(tokens: list[str], choices, n_experts: int):
    """Each token's route through a mixture-of-experts layer: `choices[t]` is the list of
    (expert, gate weight) the router picked for token t; a line's width is its gate weight.
    The experts' outputs are summed with those weights back into the token's stream."""
    fig, ax = plt.subplots(figsize=(7, 0.4 + 0.42 * max(len(tokens), n_experts)))
    token_y = [len(tokens) - 1 - t for t in range(len(tokens))]
    expert_y = [(len(tokens) - 1) * (1 - e / max(n_experts - 1, 1)) for e in range(n_experts)]
    load = [0] * n_experts
    for t, picked in enumerate(choices):
        for expert, weight in picked:
            load[expert] += 1
            ax.plot([1.0, 4.0], [token_y[t], expert_y[expert]], color=HEAD_COLOURS[expert % 10],
                    linewidth=0.5 + 4 * float(weight), alpha=0.8)
    for t, token in enumerate(tokens):
        ax.text(0.95, token_y[t], repr(token)[1:-1] or "·", ha="right", va="center", fontsize=9, family="monospace")
    for e in range(n_experts):
        ax.add_patch(FancyBboxPatch((4.05, expert_y[e] - 0.3), 1.3, 0.6, boxstyle="round,pad=0.03",
                                    facecolor=HEAD_COLOURS[e % 10], alpha=0.35))
        ax.text(4.7, expert_y[e], f"expert {e}: {load[e]}", ha="center", va="center", fontsize=8)
    ax.text(2.5, len(tokens) - 0.3, "router: top-k experts per token (width = gate weight)", ha="center", fontsize=9)
    ax.set(xlim=(-0.2, 5.6), ylim=(-0.8, len(tokens) + 0.1))
    ax.axis("off")
    return fig


def sft_mask(pieces: list[str], mask: list[int], per_row: int = 12):
    """A rendered conversation token by token, in reading order: green tokens are supervised
    (their next-token loss counts), grey ones are context only."""
    rows = (len(pieces) + per_row - 1) // per_row
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * rows))
    for i, (piece, supervised) in enumerate(zip(pieces, mask)):
        x, y = i % per_row, -(i // per_row)
        ax.add_patch(Rectangle((x, y), 0.95, 0.8, facecolor="#b7e4c7" if supervised else "#e6e6e6",
                               edgecolor=GREEN if supervised else "#bbbbbb"))
        ax.text(x + 0.475, y + 0.4, repr(piece)[1:-1][:13], ha="center", va="center", fontsize=6.5, family="monospace")
    handles = [Rectangle((0, 0), 1, 1, facecolor="#b7e4c7"), Rectangle((0, 0), 1, 1, facecolor="#e6e6e6")]
    ax.legend(handles, ["supervised (in the loss)", "context only (target -100)"], loc="lower left",
              bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8, frameon=False)
    ax.set(xlim=(-0.1, per_row), ylim=(-rows + 0.7, 1.0))
    ax.axis("off")
    return fig
