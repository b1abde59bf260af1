"""What a training run shows and keeps as it goes: a progress line at every tenth of the run
(or a tqdm bar on a terminal), the records of metrics.jsonl, the loss curve they draw, and
several runs compared from their records (`lilllm compare`)."""

import json
import math
import sys
from pathlib import Path

from lilllm import LilllmError
from lilllm.runtime import autocast_dtype, repo_path

METRICS = "metrics.jsonl"


class Progress:
    """Reports a run of `steps` steps (or of `time_budget` seconds, whichever ends it first)."""

    def __init__(self, steps: int, time_budget: float | None, first_step: int, bar: bool | None, show: bool = True):
        self.steps, self.time_budget, self.next_line, self.bar = steps, time_budget, 0.1, None
        self.show = show
        if show and (sys.stderr.isatty() if bar is None else bar):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps, initial=first_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, seconds: float, loss: float, val_bpb: float | None, tokens_per_s: float) -> None:
        # every number with its unit; no val until the first evaluation has given one
        figures = [f"loss {loss:.4f} nats/token", *([f"val {val_bpb:.4f} bits/byte"] if val_bpb is not None else []),
                   f"{tokens_per_s:,.0f} tokens/s"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(", ".join(figures))
            return
        done = fraction_done(step, seconds, self.steps, self.time_budget)
        if self.show and (done >= self.next_line or step == self.steps):
            self.next_line = math.floor(done * 10 + 1) / 10
            left = max(0.0, seconds * (1 - done) / max(done, 1e-9))
            of = f"{format_seconds(self.time_budget)} budget" if self.time_budget else f"{self.steps:,}"
            print(f"step {step:>6,} of {of} | {' | '.join(figures)} | "
                  f"{format_seconds(seconds)} elapsed, ~{format_seconds(left)} left", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fraction_done(step: int, seconds: float, steps: int, time_budget: float | None) -> float:
    """How far a run has come, 0 → 1: its steps or its time budget, whichever ends it first."""
    return max(step / steps, seconds / time_budget if time_budget else 0.0)


def start_banner(recipe: str | None, parameters: int, tokens_per_step: int, config, device, out_dir: str) -> str:
    """What a run is about to train, in one line: the recipe, the model's size, the tokens of
    one optimizer step, how long it runs, the device and precision, and where it writes."""
    length = f"{config.steps:,} steps" + (f" or {format_seconds(config.time_budget)}" if config.time_budget else "")
    precision = "fp32" if autocast_dtype(device, config.cpu_bf16) is None else "bf16 autocast"
    return (f"training {f'the {recipe} recipe' if recipe else 'a model'}: {parameters:,} parameters, "
            f"{tokens_per_step:,} tokens per step, {length}, on {device} in {precision}, into {out_dir}")


def format_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a") as file:
        file.write(json.dumps(record) + "\n")


def read_metrics(out_dir) -> list[dict]:
    """The records of out_dir/metrics.jsonl (one JSON object per line)."""
    path = repo_path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_metrics(records: list[dict], ax=None, label: str = ""):
    """Train and val bits per byte against the step (train: the loss of each logged batch,
    converted with the train split's bytes per token). Returns the figure."""
    if ax is None:
        from matplotlib.figure import Figure  # no pyplot: works without a display

        ax = Figure(figsize=(7, 4)).subplots()
    for split, style in (("train", {"alpha": 0.6}), ("val", {"marker": "o"})):
        points = [(r["step"], r["bpb"]) for r in records if r["split"] == split]
        if points:
            ax.plot(*zip(*points), label=f"{label} {split}".strip(), **style)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.legend()
    return ax.figure


def compare_runs(run_dirs, names=None) -> tuple[str, object]:
    """Several runs side by side, from their metrics.jsonl alone: a table (steps, seconds of
    training, tokens/s, best and last val bits per byte) and a figure of val bits per byte
    against seconds of training and against steps, one curve per run. Runs of different
    speeds compare fairly on the left panel, at equal time; the right one shows what each step bought.
    `names` label the runs (default: their folders)."""
    from matplotlib.figure import Figure  # no pyplot: works without a display

    runs = {}
    for run_dir, name in zip(run_dirs, names or [str(d) for d in run_dirs]):
        records = read_metrics(run_dir)
        val = [r for r in records if r["split"] == "val"]
        if not val:
            raise LilllmError(f"{run_dir} holds no val records in {METRICS}: give the folder of a `lilllm train` run "
                              "that evaluated at least once")
        runs[name] = (val, [r for r in records if r["split"] == "train"])
    figure = Figure(figsize=(11, 3.8))
    by_time, by_step = figure.subplots(1, 2, sharey=True)
    width = max(len(name) for name in runs)
    lines = [f"{'run':<{width}} {'steps':>7} {'seconds':>8} {'tokens/s':>9} {'best val':>9} {'last val':>9}"]
    for name, (val, train) in runs.items():
        by_time.plot([r["time_s"] for r in val], [r["bpb"] for r in val], marker=".", label=name)
        by_step.plot([r["step"] for r in val], [r["bpb"] for r in val], marker=".", label=name)
        speed = f"{train[-1]['tokens_per_s']:,.0f}" if train and "tokens_per_s" in train[-1] else "-"
        lines.append(f"{name:<{width}} {val[-1]['step']:7,} {val[-1]['time_s']:8.1f} {speed:>9} "
                     f"{min(r['bpb'] for r in val):9.4f} {val[-1]['bpb']:9.4f}")
    by_time.set(xlabel="seconds of training", ylabel="val bits per byte", title="at equal time")
    by_step.set(xlabel="step", title="at equal steps")
    by_time.legend(fontsize=8)
    figure.tight_layout()
    return "\n".join(lines), figure
