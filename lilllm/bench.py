"""Benchmarks: each measures one claim of the course on this machine and prints a table,
then its figures as one line of JSON (`lilllm bench tokenizer | pretrain | generate | speedrun`).

- `bench_tokenizer`: training a BPE, and encoding with `tokenizers` against tiktoken (same ids);
- `bench_pretrain`: nanoGPT's CPU recipe, then the course default for the same training time;
- `bench_generate`: tokens per second with and without the KV cache, for the model learners
  train (the `tiny` recipe) and the default config (a longer context);
- `bench_generate_hf`: the same greedy generation in lilllm and in Hugging Face transformers,
  of one model exported with lilllm.hf (`lilllm bench generate --hf`);
- `bench_speedrun`: the tiny recipe and each change to it (Muon, QK-norm, ReLU², the schedule,
  shapes) trained for the same seconds over several seeds, its runs kept and reused.

Speed is only ever reported as measured here, never asserted in a test. Each benchmark also
writes its table as Markdown (`--markdown`), with the date and the machine, into the README
between its marker comments (`--readme`): the README's measured figures are regenerated, not typed.
"""

import json
import re
import shutil
import tempfile
import time
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.data import load_text, train_val_split
from lilllm.hf import export, transformers_model
from lilllm.layers.attention import cache_bytes
from lilllm.model import GPT
from lilllm.runtime import REPO_ROOT, machine, matmul_flops, pick_device, repo_path, shown, write_atomically
from lilllm.sampling import generate
from lilllm.tokenizer import BPETokenizer, train_hf_bpe
from lilllm.train import TrainConfig, make_config, train


def _best_time(fn, repeats: int):
    """(the fastest of `repeats` calls of fn in seconds, fn's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


# --- tokenizers ------------------------------------------------------------------------------

def bench_tokenizer(vocab_size: int, repeats: int = 3) -> dict:
    """Time training a BPE on the train split, then encoding the whole corpus in one call with
    `tokenizers` and with tiktoken (best of `repeats`); also check that both give the same ids."""
    text = load_text()
    train_text, _ = train_val_split(text)
    train_s, hf = _best_time(lambda: train_hf_bpe(train_text, vocab_size), repeats)
    tokenizer = BPETokenizer.from_hf(hf)
    hf_s, hf_ids = _best_time(lambda: hf.encode(text).ids, repeats)
    tiktoken_s, tiktoken_ids = _best_time(lambda: tokenizer.encode(text), repeats)
    megabytes = len(text.encode()) / 1e6
    return {
        "vocab_size": vocab_size, "repeats": repeats, "megabytes": round(megabytes, 3), "tokens": len(tiktoken_ids),
        "ids_identical": hf_ids == tiktoken_ids, "train_s": round(train_s, 3),
        "hf_mb_s": round(megabytes / hf_s, 2), "tiktoken_mb_s": round(megabytes / tiktoken_s, 2),
        "speedup": round(hf_s / tiktoken_s, 1),
    }


def print_tokenizer(result: dict) -> None:
    print(f"training a {result['vocab_size']:,}-token BPE on the train split: {result['train_s']:.2f} s")
    print(f"encoding the corpus ({result['megabytes']:.2f} MB, {result['tokens']:,} tokens) in one call, "
          f"best of {result['repeats']}:")
    print(f"  tokenizers {result['hf_mb_s']:6.2f} MB/s")
    print(f"  tiktoken   {result['tiktoken_mb_s']:6.2f} MB/s  ({result['speedup']}x faster)")
    print(f"  identical ids: {'yes' if result['ids_identical'] else 'NO'}")
    print(json.dumps(result))


# --- pretraining: nanoGPT's CPU recipe vs the course default at equal time ------------------------

def bench_pretrain(long: bool = False, steps: int | None = None, device: str | None = None) -> dict:
    """Train `nanogpt-cpu`, then the `tiny` recipe for the same training time (then `long`
    for its ten minutes, if asked), in throwaway folders; evaluate each on the whole val split.
    `steps` shortens the nanoGPT run (for a quick check of the harness)."""
    peak = matmul_flops(pick_device(device))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name, *overrides):
            config = make_config(name, [f"--out-dir={tmp}/{name}", "--eval-interval=0", *overrides]
                                 + ([f"--device={device}"] if device else []))
            summary = train(config, progress=False).summary
            steps_per_s = summary["tokens_per_s"] / summary["tokens_per_step"]
            summary["mfu"] = summary["flops_per_token"] * summary["tokens_per_s"] / peak  # the model's FLOPs
            summary["newton_schulz_mfu"] = summary["newton_schulz_flops_per_step"] * steps_per_s / peak  # Muon's, apart
            results[name] = summary
            return summary

        start = time.perf_counter()
        reference = run("nanogpt-cpu", *([f"--steps={steps}"] if steps else []))
        run("tiny", f"--time-budget={reference['train_time_s']}", "--steps=1000000000")
        if long:
            run("long")
        wall = time.perf_counter() - start
    line = {
        "nanogpt_cpu_bpb": round(results["nanogpt-cpu"]["val_bpb"], 4), "default_bpb": round(results["tiny"]["val_bpb"], 4),
        "nanogpt_cpu_bytes_s": round(results["nanogpt-cpu"]["bytes_per_s"]),
        "default_bytes_s": round(results["tiny"]["bytes_per_s"]), "default_mfu": round(results["tiny"]["mfu"], 3),
        "default_optimizer": results["tiny"]["optimizer"],
        "default_newton_schulz_mfu": round(results["tiny"]["newton_schulz_mfu"], 3),
        "wall_s": round(wall, 1),
    }
    if long:
        line["long_bpb"] = round(results["long"]["best_val_bpb"], 4)
    return {"runs": results, "matmul_flops": peak, "line": line}


def print_pretrain(result: dict) -> None:
    print(f"matmul throughput: {result['matmul_flops'] / 1e9:.0f} GFLOP/s")
    print(f"{'recipe':<12} {'optimizer':>9} {'val bpb':>8} {'best bpb':>8} {'steps':>7} {'train s':>8} {'bytes/s':>9} "
          f"{'MFU':>6} {'+ NS':>6}")  # + NS: Muon's Newton-Schulz FLOPs, counted apart from the model's
    for name, run in result["runs"].items():
        print(f"{name:<12} {run['optimizer']:>9} {run['val_bpb']:8.4f} {run['best_val_bpb']:8.4f} {run['step']:7,} "
              f"{run['train_time_s']:8.1f} {run['bytes_per_s']:9,.0f} {run['mfu']:6.1%} {run['newton_schulz_mfu']:6.1%}")
    print(json.dumps(result["line"]))


# --- generation: tokens per second with and without the KV cache ----------------------------------

def generation_models(vocab_size: int = 2048) -> dict[str, ModelConfig]:
    """The models `bench_generate` times: the one the `tiny` recipe trains (what learners
    sample from) and the ModelConfig default (twice the depth and context)."""
    return {"tiny": TrainConfig().model_config(vocab_size), "default": ModelConfig.preset("default", vocab_size=vocab_size)}


def bench_generate(lengths=(64, 256, 512, 1024), prompt_len: int = 16, configs: dict | None = None,
                   device: str = "cpu", repeats: int = 2, seed: int = 0, log=lambda message: None) -> dict:
    """Greedy generation of each number of new tokens with and without the KV cache, for each
    model of `configs` (default: `generation_models()`; random weights: speed does not depend
    on them), the best of `repeats` runs each; `log` hears of each length as it is timed.
    Returns, per model, tokens per second per length, the speed-ups and the cache's memory."""
    if not lengths or min(lengths) < 1 or repeats < 1 or prompt_len < 1:
        raise LilllmError("the benchmark needs lengths ≥ 1 new tokens, a prompt of ≥ 1 token and repeats ≥ 1")
    results = {}
    for name, config in (configs or generation_models()).items():
        log(f"timing the {name} model, the best of {repeats} run(s) with and without the cache:")
        results[name] = _bench_one_model(config, lengths, prompt_len, device, repeats, seed, log)
    line = {name: result["line"] for name, result in results.items()}
    return {"models": results, "line": line}


def _bench_one_model(config: ModelConfig, lengths, prompt_len: int, device, repeats: int, seed: int, log) -> dict:
    torch.manual_seed(seed)
    model = GPT(config).to(device).eval()
    prompt = torch.randint(config.vocab_size, (prompt_len,)).tolist()
    generate(model, prompt, 8, temperature=0)  # warm-up: first calls allocate
    rows = []
    for n in lengths:
        seconds, ids = {True: [], False: []}, {}
        for _ in range(repeats):  # alternate the two, keep the best of each: the runs least disturbed by other work
            for use_cache in (True, False):
                start = time.perf_counter()
                ids[use_cache] = generate(model, prompt, n, temperature=0, use_cache=use_cache)
                seconds[use_cache].append(time.perf_counter() - start)
        row = {"new_tokens": n, "cached_tokens_s": n / min(seconds[True]), "uncached_tokens_s": n / min(seconds[False])}
        # past the context the two attend differently (lilllm.sampling's docstring): no claim there
        row["same_tokens"] = ids[True] == ids[False] if n + prompt_len <= config.block_size else None
        row["speedup"] = row["cached_tokens_s"] / row["uncached_tokens_s"]
        rows.append(row)
        log(f"  {n:,} new tokens: {row['cached_tokens_s']:,.0f} tokens/s with the cache, "
            f"{row['uncached_tokens_s']:,.0f} without")
    by_length = {row["new_tokens"]: row for row in rows}
    line = {  # the figures as one JSON-ready line; keys of the dicts are the numbers of new tokens
        "n_layers": config.n_layers, "block_size": config.block_size, "prompt_len": prompt_len,
        "tokens_s_cached": {str(n): round(row["cached_tokens_s"]) for n, row in by_length.items()},
        "tokens_s_uncached": {str(n): round(row["uncached_tokens_s"]) for n, row in by_length.items()},
        "speedup": {str(n): round(row["speedup"], 2) for n, row in by_length.items()},
        "cache_bytes_full": cache_bytes(config, config.block_size),
        "speedup_512": round(by_length[512]["speedup"], 2) if 512 in by_length else None,
    }
    return {"rows": rows, "cache_bytes_per_token": cache_bytes(config, 1), "line": line}


def print_generate(result: dict) -> None:
    for name, model in result["models"].items():
        line = model["line"]
        print(f"the {name} model ({line['n_layers']} layers, context {line['block_size']} tokens), greedy, "
              f"after a {line['prompt_len']}-token prompt:")
        print(f"{'new tokens':>10} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9}")
        for row in model["rows"]:
            print(f"{row['new_tokens']:>10,} {row['cached_tokens_s']:>13,.0f} {row['uncached_tokens_s']:>15,.0f} "
                  f"{row['speedup']:>8.1f}x")
        print(f"KV cache (fp32): {model['cache_bytes_per_token']:,} bytes per token, "
              f"{line['cache_bytes_full'] / 2**10:,.0f} KiB for a full context\n")
    print(json.dumps(result["line"]))


# --- generation in lilllm and in transformers: one model, exported -----------------------------------

def bench_generate_hf(lengths=(64, 256, 512), prompt_len: int = 16, config: ModelConfig | None = None,
                      repeats: int = 2, seed: int = 0, log=lambda message: None) -> dict:
    """Greedy generation of each number of new tokens by lilllm (`generate`, its KV cache) and by
    transformers (`generate`, its cache) of the same model, on the CPU in fp32, the best of
    `repeats` runs each. The model is `config` (default: the ModelConfig default with a context
    long enough for the longest run; random weights: speed does not depend on them), exported
    with lilllm.hf to a temporary folder that transformers loads. Returns, per length, tokens
    per second in each, lilllm's speed as a multiple of transformers', and whether both chose
    the same tokens."""
    if not lengths or min(lengths) < 1 or repeats < 1 or prompt_len < 1:
        raise LilllmError("the benchmark needs lengths ≥ 1 new tokens, a prompt of ≥ 1 token and repeats ≥ 1")
    config = config or ModelConfig.preset("default", vocab_size=2048, block_size=prompt_len + max(lengths))
    torch.manual_seed(seed)
    model = GPT(config).eval()
    train_text, _ = train_val_split(load_text())
    tokenizer = BPETokenizer.train(train_text, config.vocab_size)  # the export needs one; the timing never uses it
    prompt = torch.randint(config.vocab_size, (prompt_len,)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        hf_model = transformers_model(export((model, tokenizer), folder))
    hf_model.generation_config.eos_token_id = None  # every run makes all its tokens, as lilllm's generate does

    def hf_generate(n: int) -> list[int]:
        ids = torch.tensor([prompt])
        output = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                   pad_token_id=0)  # (1, prompt_len + n)
        return output[0, prompt_len:].tolist()

    runs = {"lilllm": lambda n: generate(model, prompt, n, temperature=0), "transformers": hf_generate}
    for run in runs.values():
        run(8)  # warm-up: first calls allocate
    rows = []
    for n in lengths:
        seconds, ids = {name: [] for name in runs}, {}
        for _ in range(repeats):  # alternate the two, keep the best of each (as bench_generate)
            for name, run in runs.items():
                start = time.perf_counter()
                ids[name] = run(n)
                seconds[name].append(time.perf_counter() - start)
        row = {"new_tokens": n, "lilllm_tokens_s": n / min(seconds["lilllm"]),
               "transformers_tokens_s": n / min(seconds["transformers"]), "same_tokens": ids["lilllm"] == ids["transformers"]}
        row["ratio"] = row["lilllm_tokens_s"] / row["transformers_tokens_s"]
        rows.append(row)
        log(f"  {n:,} new tokens: lilllm {row['lilllm_tokens_s']:,.0f} tokens/s, "
            f"transformers {row['transformers_tokens_s']:,.0f}")
    line = {"n_layers": config.n_layers, "block_size": config.block_size, "prompt_len": prompt_len,
            "transformers": metadata.version("transformers"),
            "lilllm_tokens_s": {str(row["new_tokens"]): round(row["lilllm_tokens_s"]) for row in rows},
            "transformers_tokens_s": {str(row["new_tokens"]): round(row["transformers_tokens_s"]) for row in rows},
            "ratio": {str(row["new_tokens"]): round(row["ratio"], 2) for row in rows},
            "same_tokens": all(row["same_tokens"] for row in rows)}
    return {"rows": rows, "line": line}


def print_generate_hf(result: dict) -> None:
    line = result["line"]
    print(f"one model ({line['n_layers']} layers, context {line['block_size']} tokens, random weights), greedy after a "
          f"{line['prompt_len']}-token prompt, on the CPU in fp32; transformers {line['transformers']}:")
    print(f"{'new tokens':>10} {'lilllm tok/s':>13} {'transformers tok/s':>19} {'lilllm / transformers':>22} "
          f"{'same tokens':>12}")
    for row in result["rows"]:
        print(f"{row['new_tokens']:>10,} {row['lilllm_tokens_s']:>13,.0f} {row['transformers_tokens_s']:>19,.0f} "
              f"{row['ratio']:>21.2f}x {'yes' if row['same_tokens'] else 'NO':>12}")
    print(json.dumps(line))


# --- the speedrun: each change to the tiny recipe at equal training time -------------------------------

# The speedrun starts from the tiny recipe as it stood before it: AdamW and a cosine schedule. An
# arm's name → the settings it changes there; the first arm is the baseline. The winner, the
# warmup-stable-decay schedule, is the tiny recipe's now.
SPEEDRUN_START = ["--schedule=cosine"]
SPEEDRUN_ARMS = {
    "AdamW, cosine (the start)": [],
    "the start, run again": [],  # another hour of the same machine: how far its speed moves the score
    "AdamW, lr 1e-3": ["--lr=1e-3", "--min-lr=1e-4"],
    "AdamW, lr 4e-3": ["--lr=4e-3", "--min-lr=4e-4"],
    "AdamW, WSD (the tiny recipe now)": ["--schedule=wsd"],
    "AdamW, WSD, no weight decay": ["--schedule=wsd", "--weight-decay=0"],
    "Muon": ["--optimizer=muon"],
    "Muon, muon_lr 0.01": ["--optimizer=muon", "--muon-lr=0.01"],
    "Muon, muon_lr 0.04": ["--optimizer=muon", "--muon-lr=0.04"],
    "Muon, QK-norm": ["--optimizer=muon", "--model.qk_norm=rms"],
    "Muon, ReLU² MLP": ["--optimizer=muon", "--model.ffn=relu2"],
    "Muon, untied head": ["--optimizer=muon", "--model.tie_embeddings=false"],
    "Muon, warmup-stable-decay": ["--optimizer=muon", "--schedule=wsd"],
    "Muon, no weight decay": ["--optimizer=muon", "--weight-decay=0"],
    "Muon, batch 32": ["--optimizer=muon", "--batch-size=32"],
    "Muon, 3 layers": ["--optimizer=muon", "--model.n_layers=3"],
    "Muon 0.01, WSD, ReLU², no weight decay": ["--optimizer=muon", "--muon-lr=0.01", "--schedule=wsd",
                                               "--model.ffn=relu2", "--weight-decay=0"],
}
SPEEDRUN_DIR = "runs/speedrun"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("²", "2")).strip("-")


def bench_speedrun(arms: dict | None = None, seeds=(0, 1, 2), budget: float = 100.0, out_dir=None,
                   log=lambda message: None) -> dict:
    """Train each arm (SPEEDRUN_ARMS: SPEEDRUN_START with some settings changed) for `budget`
    seconds of training per seed, evaluating on the whole val split at the end. Each run lives
    in out_dir/<arm>-<seed>/ (default: SPEEDRUN_DIR) and is reused when it finished with the same settings, so the
    table comes back at once the second time. Returns per arm the val bits per byte of each
    seed, their mean and spread (half the range), steps and tokens per second."""
    if not seeds or budget <= 0:
        raise LilllmError("the speedrun needs at least one seed and a budget of seconds > 0")
    arms = arms or SPEEDRUN_ARMS
    runs = {name: [] for name in arms}
    for seed in seeds:  # seed by seed through every arm: a drift in the machine's speed touches all arms alike
        for name, changes in arms.items():
            folder = repo_path(out_dir or SPEEDRUN_DIR) / f"{_slug(name)}-{seed}"
            config = make_config("tiny", [*SPEEDRUN_START, *changes, f"--time-budget={budget}", "--steps=1000000000",
                                          "--eval-interval=0", f"--seed={seed}", f"--out-dir={folder}"])
            try:  # a finished run with these settings says so and is reused
                summary = train(config, resume=True, progress=False).summary if (folder / "last.pt").exists() else None
            except LilllmError:  # another run's folder (other settings): train it again
                summary = None
            if summary is None:
                shutil.rmtree(folder, ignore_errors=True)
                summary = train(config, progress=False).summary
            runs[name].append(summary)
            log(f"  {name}, seed {seed}: {summary['val_bpb']:.4f} bits per byte after {summary['step']:,} steps")
    rows = []
    for name, changes in arms.items():
        scores, steps = [run["val_bpb"] for run in runs[name]], [run["step"] for run in runs[name]]
        rows.append({"arm": name, "changes": changes, "val_bpb": scores, "mean": sum(scores) / len(scores),
                     "spread": (max(scores) - min(scores)) / 2, "steps_each": steps, "steps": sum(steps) / len(steps),
                     "tokens_s": sum(r["step"] * r["tokens_per_step"] / r["train_time_s"] for r in runs[name]) / len(seeds)})
    baseline = rows[0]["mean"]
    for row in rows:
        row["gain"] = baseline - row["mean"]
    line = {"budget_s": budget, "seeds": list(seeds), **{row["arm"]: round(row["mean"], 4) for row in rows}}
    return {"rows": rows, "line": line}


def print_speedrun(result: dict) -> None:
    line = result["line"]
    print(f"the start (the tiny recipe before the speedrun) and changes to it, {line['budget_s']:.0f} s of training "
          f"each, seeds {line['seeds']}; val bits per byte (mean ± half the range over seeds):")
    width = max(len(row["arm"]) for row in result["rows"])
    print(f"{'':{width}} {'val bpb':>16} {'gain':>8} {'steps':>7} {'tokens/s':>9}")
    for row in result["rows"]:
        print(f"{row['arm']:{width}} {row['mean']:>8.4f} ± {row['spread']:.4f} {row['gain']:>+8.4f} {row['steps']:>7,.0f} "
              f"{row['tokens_s']:>9,.0f}")
    print(json.dumps(line))


# --- the README's tables ------------------------------------------------------------------------------

README = REPO_ROOT / "README.md"


def measured_on(command: str) -> str:
    return f"Measured with `{command}` on {date.today().isoformat()} ({machine()})"


def markdown_tokenizer(result: dict, command: str) -> str:
    return "\n".join([
        f"{measured_on(command)}, the best of {result['repeats']} runs each:", "",
        "| step | time or speed |", "|---|---|",
        f"| training the {result['vocab_size']:,}-token BPE on the train split | {result['train_s']:.2f} s |",
        f"| encoding the corpus ({result['megabytes']:.2f} MB) with `tokenizers`, in one call | "
        f"{result['hf_mb_s']:.2f} MB/s |",
        f"| the same with `tiktoken` | {result['tiktoken_mb_s']:.1f} MB/s ({result['speedup']}× faster) |",
        f"| identical ids | {'yes' if result['ids_identical'] else '**no**'}, over all {result['tokens']:,} tokens |",
    ])


PRETRAIN_ROWS = {"nanogpt-cpu": "`nanogpt-cpu`", "tiny": "`tiny` (the default), same time", "long": "`long`, ten minutes"}


def markdown_pretrain(result: dict, command: str) -> str:
    lines = [f"{measured_on(command)}; matmul throughput "
             f"{result['matmul_flops'] / 1e9:,.0f} GFLOP/s measured in the same run; the whole command took "
             f"{result['line']['wall_s'] / 60:.1f} minutes:", "",
             "| recipe | optimizer | val bits per byte | steps | training s | bytes/s | MFU |",
             "|---|---|---|---|---|---|---|"]
    for name, run in result["runs"].items():
        bpb = run["best_val_bpb"] if name == "long" else run["val_bpb"]  # `long` keeps its best-val checkpoint
        mfu = f"{run['mfu']:.1%}" + (f" + {run['newton_schulz_mfu']:.1%} Newton–Schulz" if run["newton_schulz_mfu"] else "")
        lines.append(f"| {PRETRAIN_ROWS[name]} | {run['optimizer']} | **{bpb:.3f}** | {run['step']:,} | "
                     f"{run['train_time_s']:.1f} | {run['bytes_per_s']:,.0f} | {mfu} |")
    return "\n".join(lines + ["", f"The last line it printed: `{json.dumps(result['line'])}`"])


def markdown_generate(result: dict, command: str) -> str:
    prompt_len = next(iter(result["models"].values()))["line"]["prompt_len"]
    lines = [f"{measured_on(command)}; greedy, after a {prompt_len}-token prompt, random weights (speed does not "
             "depend on them):", "",
             "| model | new tokens | with the cache, tokens/s | without, tokens/s | speed-up |", "|---|---|---|---|---|"]
    notes = []
    for name, model in result["models"].items():
        line = model["line"]
        label = f"`{name}` ({line['n_layers']} layers, context {line['block_size']})"
        for row in model["rows"]:
            lines.append(f"| {label} | {row['new_tokens']:,} | {row['cached_tokens_s']:,.0f} | "
                         f"{row['uncached_tokens_s']:,.0f} | {row['speedup']:.1f}× |")
        notes.append(f"`{name}` {model['cache_bytes_per_token']:,} bytes per token "
                     f"({line['cache_bytes_full'] / 2**10:,.0f} KiB for a full context)")
    return "\n".join(lines + ["", f"The KV cache (fp32): {'; '.join(notes)}."])


def markdown_generate_hf(result: dict, command: str) -> str:
    line = result["line"]
    lines = [f"{measured_on(command)}; one model ({line['n_layers']} layers, context {line['block_size']}, random "
             f"weights), greedy after a {line['prompt_len']}-token prompt, CPU, fp32, transformers {line['transformers']}:",
             "", "| new tokens | lilllm, tokens/s | transformers, tokens/s | lilllm / transformers | same tokens |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['new_tokens']:,} | {row['lilllm_tokens_s']:,.0f} | {row['transformers_tokens_s']:,.0f} | "
                     f"{row['ratio']:.2f}× | {'yes' if row['same_tokens'] else '**no**'} |")
    return "\n".join(lines)


def markdown_speedrun(result: dict, command: str) -> str:
    line = result["line"]
    lines = [f"{measured_on(command)}; {line['budget_s']:.0f} s of training per run, seeds {line['seeds']}, val bits "
             "per byte on the whole val split (mean ± half the range over seeds):", "",
             "| the start (AdamW, cosine), changed | val bits per byte | gain | steps | tokens/s |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['arm']} | {row['mean']:.4f} ± {row['spread']:.4f} | {row['gain']:+.4f} | "
                     f"{row['steps']:,.0f} | {row['tokens_s']:,.0f} |")
    return "\n".join(lines)


def write_readme_section(name: str, text: str, path=README) -> Path:
    """Put `text` between the marker comments <!-- bench NAME --> and <!-- /bench NAME --> of
    the README at `path`, replacing what was there."""
    path = Path(path)
    begin, end = f"<!-- bench {name} -->", f"<!-- /bench {name} -->"
    content = path.read_text(encoding="utf-8")
    if content.count(begin) != 1 or content.count(end) != 1 or content.index(begin) > content.index(end):
        raise LilllmError(f"{shown(path)} needs one {begin} line, then one {end} line, around the table to replace")
    before, rest = content.split(begin)
    after = rest.split(end)[1]
    return write_atomically(path, f"{before}{begin}\n{text}\n{end}{after}")
