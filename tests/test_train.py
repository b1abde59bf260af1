"""The training loop: settings, schedule, optimizer groups, clipping, bits per byte, and
runs on a small corpus that checkpoint, refuse what they should, resume exactly, and run
from the command line."""

import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.cli import main as cli_main
from lilllm.config import ModelConfig
from lilllm.checkpoint import load_checkpoint, load_model
from lilllm.layers.lora import LoRALinear
from lilllm.model import GPT, ParallelBlock
from lilllm.runtime import REPO_ROOT
from lilllm.tokenizer import CharTokenizer
from lilllm.progress import read_metrics
from lilllm.settings import dashed, field_notes, spelt
from lilllm.sft import Finetune
from lilllm.train import (BEST, CONFIG_FILE, LAST, RECIPES, SETTINGS_ADDED, TrainConfig, clip_gradients, evaluate,
                          learning_rate, load_data, make_config, make_optimizer, saved_config, train, train_step)
import lilllm.bench as bench
import lilllm.train as train_module

# A model small enough to take a few steps in well under a second.
SMALL = ["--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--model.n_kv_heads=1",
         "--model.block_size=16", "--batch_size=4", "--warmup=2", "--log_interval=1", "--eval_interval=3"]


def small_config(small_data, out_dir, *more):
    return make_config("tiny", [f"--data_dir={small_data}", f"--out_dir={out_dir}", "--steps=6", *SMALL, *more])


def interrupt_at_batch(monkeypatch, n: int) -> None:
    """Ctrl-C while the n-th batch is drawn: the run finishes that step, saves and returns."""
    get_batch, calls = train_module.get_batch, []

    def interrupting_get_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return get_batch(*args, **kwargs)

    monkeypatch.setattr(train_module, "get_batch", interrupting_get_batch)


def train_losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if r["split"] == "train"]


# --- settings ---------------------------------------------------------------------------

def test_presets_build_and_nanogpt_cpu_is_its_recipe():
    for name in RECIPES:
        make_config(name)
    c = make_config("nanogpt-cpu")
    assert (c.tokenizer, c.model_preset, c.batch_size, c.steps, c.lr, c.min_lr, c.warmup, c.beta2, c.weight_decay) == \
        ("char", "gpt2", 12, 2000, 1e-3, 1e-4, 100, 0.99, 0.1)
    model = c.model_config(vocab_size=73)
    assert (model.n_layers, model.n_heads, model.d_model, model.block_size, model.dropout, model.bias) == \
        (4, 4, 128, 64, 0.0, False)
    assert (model.norm, model.positions, model.ffn) == ("layernorm", "learned", "gelu")


def test_overrides_are_typed():
    c = make_config("tiny", ["--lr=3e-4", "--steps=7", "--tokenizer=char", "--vocab_size=none", "--compile=true", "--model.d_model=64",
                             "--time_budget=12", "--clip=value"])
    assert (c.lr, c.steps, c.vocab_size, c.compile, c.model["d_model"], c.time_budget, c.clip) == \
        (3e-4, 7, None, True, 64, 12.0, "value")
    assert c.model["block_size"] == TrainConfig().model["block_size"]  # the other model values stay


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"steps": 9, "lr": 1e-3, "model": {"d_model": 64}}))
    c = make_config("tiny", ["--lr=5e-4"], path)
    assert (c.steps, c.lr, c.model) == (9, 5e-4, {"d_model": 64})


@pytest.mark.parametrize("overrides, match", [
    (["--bogus=1"], "unknown setting --bogus"),
    (["--steps=ten"], r"--steps=ten: expected int"),
    (["--steps=1.5"], r"expected int"),
    (["--model.width=3"], "unknown setting --model.width"),
    (["--model.d_model=wide"], "model.d-model=wide: expected int"),
    (["--lr=-1"], "lr=-1.0"),
    (["--clip=sometimes"], "use norm, value or none"),
    (["--optimizer=sgd"], "optimizer='sgd': use adamw, stable_adamw, muon"),
    (["--schedule=linear"], "schedule='linear': use cosine or wsd"),
    (["--schedule=wsd", "--decay-fraction=0"], r"decay_fraction=0.0 must lie in \(0, 1\]"),
    (["--optimizer=muon", "--muon-lr=0"], "muon_lr=0.0 must be positive"),
    (["steps=3"], "write settings as --key=value"),
    (["--steps"], "write settings as --key=value"),
])
def test_bad_settings_are_named(overrides, match):
    with pytest.raises(LilllmError, match=match):
        make_config("tiny", overrides)


def test_bad_recipe_and_bad_file(tmp_path):
    with pytest.raises(LilllmError, match="unknown recipe 'huge'"):
        make_config("huge")
    with pytest.raises(LilllmError, match="is missing"):
        make_config("tiny", [], tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{steps: 3")
    with pytest.raises(LilllmError, match="not valid JSON"):
        make_config("tiny", [], tmp_path / "bad.json")
    (tmp_path / "typed.json").write_text('{"steps": "3"}')
    with pytest.raises(LilllmError, match="steps='3' has the wrong type: expected int"):
        make_config("tiny", [], tmp_path / "typed.json")


# --- the pieces of a step -----------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=110, schedule="cosine")
    lrs = [learning_rate(step, c) for step in range(c.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear: (step + 1) / warmup
    assert lrs[10] == pytest.approx(1e-3)  # the cosine starts at the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then only falls
    assert learning_rate(c.steps, c) == pytest.approx(1e-4) and learning_rate(10 * c.steps, c) == pytest.approx(1e-4)
    assert learning_rate(60, c) == pytest.approx(5.5e-4)  # halfway: the mean of peak and floor
    assert learning_rate(60, c, progress=1.0) == pytest.approx(1e-4)  # a timed run passes its own progress


def test_warmup_stable_decay_holds_the_peak_then_falls_in_a_straight_line():
    assert TrainConfig().schedule == "wsd"  # the tiny recipe's since chapter 13's race
    c = TrainConfig(lr=1e-3, min_lr=1e-4, warmup=10, steps=110, decay_fraction=0.2)
    lrs = [learning_rate(step, c) for step in range(c.steps + 1)]
    assert lrs[9] == pytest.approx(1e-3) and all(lr == pytest.approx(1e-3) for lr in lrs[10:91])  # 80 steps held
    falls = [a - b for a, b in zip(lrs[90:], lrs[91:])]
    assert all(fall == pytest.approx(9e-4 / 20) for fall in falls)  # the last 20 steps: a straight line
    assert lrs[110] == pytest.approx(1e-4) and learning_rate(60, c, progress=0.9) == pytest.approx(5.5e-4)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(ModelConfig.preset("gpt2", vocab_size=50, d_model=32, n_layers=1, n_heads=2, block_size=8))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head counted once


def test_clipping_by_norm_and_by_value():
    model = torch.nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    norm = clip_gradients(model, TrainConfig(clip="value", grad_clip=0.5))
    assert norm == pytest.approx(3.0 * math.sqrt(20)) and all((p.grad == 0.5).all() for p in model.parameters())
    clip_gradients(model, TrainConfig(clip="norm", grad_clip=1.0))
    assert torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(1.0)


def test_evaluate_scores_every_val_token_once_in_bits_per_byte():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, block_size=8)).eval()
    tokens = torch.randint(0, 20, (30,)).numpy()  # 29 targets: three windows of 8, then one of 5
    scores = evaluate(model, tokens, n_bytes=40, block_size=8, batch_size=2)
    nats = 0.0
    for start, length in [(0, 8), (8, 8), (16, 8), (24, 5)]:
        x = torch.as_tensor(tokens[start:start + length + 1], dtype=torch.long)
        logits, _ = model(x[None, :-1])
        nats += F.cross_entropy(logits[0], x[1:], reduction="sum").item()
    assert scores["val_loss"] == pytest.approx(nats / 29)
    assert scores["val_bpb"] == pytest.approx(nats / (math.log(2) * 40))


# --- runs -----------------------------------------------------------------------------------

def test_a_run_writes_metrics_checkpoints_and_a_plot(small_data, tmp_path):
    result = train(small_config(small_data, tmp_path / "run"), progress=False)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["best.pt", "config.json", "last.pt", "loss.png", "metrics.jsonl"]
    state = torch.load(tmp_path / "run" / LAST, weights_only=True)  # plain tensors and values only
    assert state["step"] == 6 and json.loads(state["train_config"])["steps"] == 6
    assert json.loads(state["tokenizer"])["fingerprint"] == load_data(small_config(small_data, tmp_path)).tokenizer.fingerprint
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["split"] == "val"] == [3, 6]
    assert result.summary["val_bpb"] == records[-1]["bpb"] and result.summary["step"] == 6


def test_resume_continues_the_same_curve_bit_for_bit(small_data, tmp_path, monkeypatch):
    straight = train(small_config(small_data, tmp_path / "straight", "--model.dropout=0.1"), progress=False)

    interrupt_at_batch(monkeypatch, 4)
    halted = train(small_config(small_data, tmp_path / "split", "--model.dropout=0.1"), progress=False)
    assert halted.summary["interrupted"] and load_checkpoint(tmp_path / "split" / LAST)["step"] == 4
    monkeypatch.undo()
    resumed = train(small_config(small_data, tmp_path / "split", "--model.dropout=0.1"), resume=True, progress=False)

    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")  # exactly, not approximately
    assert len(train_losses(tmp_path / "split")) == 6
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def straight_and_resumed(small_data, tmp_path, monkeypatch, *settings):
    """The same run twice: straight through (tmp_path/straight), and stopped after step 4 then
    resumed (tmp_path/split). Their train losses are equal, exactly; returns both results."""
    straight = train(small_config(small_data, tmp_path / "straight", *settings), progress=False)
    interrupt_at_batch(monkeypatch, 4)
    train(small_config(small_data, tmp_path / "split", *settings), progress=False)
    monkeypatch.undo()
    resumed = train(small_config(small_data, tmp_path / "split", *settings), resume=True, progress=False)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    return straight, resumed


def test_palm_options_and_stable_adamw_train_resume_and_sample(small_data, tmp_path, monkeypatch, capsys):
    palm = ["--model.block=parallel", "--model.positions=xpos", "--model.qk_norm=l2", "--model.norm=layernorm",
            "--model.norm_bias=false", "--optimizer=stable_adamw"]
    straight, resumed = straight_and_resumed(small_data, tmp_path, monkeypatch, *palm)
    assert isinstance(resumed.model.blocks[0], ParallelBlock) and resumed.model.config.positions == "xpos"
    assert type(make_optimizer(resumed.model, small_config(small_data, tmp_path, *palm))).__name__ == "StableAdamW"
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    capsys.readouterr()
    assert cli_main(["sample", str(tmp_path / "split" / LAST), "--prompt", "ROMEO:", "--max-new-tokens", "40"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:") and len(printed) > len("ROMEO:\n")


def test_a_muon_run_resumes_bit_for_bit_and_refuses_shared_blocks(small_data, tmp_path, monkeypatch):
    muon = ["--optimizer=muon", "--muon-lr=0.02"]
    straight, resumed = straight_and_resumed(small_data, tmp_path, monkeypatch, *muon)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(LilllmError, match="optimizer=muon does not rebuild itself when shared blocks diverge"):
        train(small_config(small_data, tmp_path / "shared", *muon, "--model.n_layers=4", '--model.sharing={"repeats": 4}'),
              progress=False)


def test_a_diverging_run_switches_resumes_bit_for_bit_and_its_checkpoint_loads(small_data, tmp_path, monkeypatch):
    shared = ["--model.n_layers=4", '--model.sharing={"repeats": 4}']  # 1 block, then 2, then 4
    straight, resumed = straight_and_resumed(small_data, tmp_path, monkeypatch, *shared)  # stopped between the switches
    assert straight.model.sharing_stage.item() == 2 and len(straight.model.blocks) == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    loaded, _, _ = load_model(tmp_path / "split" / LAST, "cpu")
    assert loaded.sharing_stage.item() == 2 and sum(isinstance(m, LoRALinear) for m in loaded.modules()) == 16


def test_cli_compare_tables_and_draws_several_runs(small_data, tmp_path, capsys):
    for name, extra in (("a", []), ("b", ["--model.n_layers=2"])):
        train(small_config(small_data, tmp_path / name, *extra), progress=False)
    capsys.readouterr()
    out = tmp_path / "both.png"
    assert cli_main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "steps", "seconds", "tokens/s", "best", "val", "last", "val"]
    for line, name in zip(lines[1:3], ("a", "b")):
        assert line.startswith(str(tmp_path / name)) and line.split()[1] == "6"
    assert out.stat().st_size > 0 and lines[-1] == f"wrote {out}"
    assert cli_main(["compare", str(tmp_path / "empty")]) == 2
    assert "holds no val records" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so_and_writes_nothing(small_data, tmp_path, capsys):
    train(small_config(small_data, tmp_path), progress=False)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    capsys.readouterr()
    result = train(small_config(small_data, tmp_path), resume=True, progress=False)
    assert f"the run in {tmp_path} is finished (step 6 of 6): nothing to do" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert result.summary["step"] == 6 and not result.summary["interrupted"]
    train(small_config(small_data, tmp_path, "--steps=8"), resume=True, progress=False)  # more steps: it goes on
    assert load_checkpoint(tmp_path / LAST)["step"] == 8


def test_a_run_saved_before_a_setting_existed_trained_with_its_old_value(small_data, tmp_path, capsys, monkeypatch):
    """A checkpoint without a setting means the value that setting had when it was added
    (SETTINGS_ADDED), not today's default: the schedule was a cosine before it became a setting."""
    train(small_config(small_data, tmp_path, "--schedule=cosine"), progress=False)
    state = torch.load(tmp_path / LAST, weights_only=True)
    settings = json.loads(state["train_config"])
    for name in ("cpu_bf16", "schedule"):
        del settings[name]  # as saved by the code before these settings were added
    state["train_config"] = json.dumps(settings)
    torch.save(state, tmp_path / LAST)
    assert TrainConfig().schedule == "wsd" and SETTINGS_ADDED["schedule"] == "cosine"
    with pytest.raises(LilllmError, match=r"other settings \(schedule differ\)"):
        train(small_config(small_data, tmp_path), resume=True, progress=False)  # today's default: another run
    train(small_config(small_data, tmp_path, "--schedule=cosine"), resume=True, progress=False)
    assert "is finished (step 6 of 6): nothing to do" in capsys.readouterr().out
    assert saved_config(settings).schedule == "cosine" and not saved_config(settings).cpu_bf16


def test_an_existing_run_is_not_overwritten(small_data, tmp_path):
    train(small_config(small_data, tmp_path), progress=False)
    before = (tmp_path / LAST).read_bytes()
    with pytest.raises(LilllmError, match="already holds a run: pass --resume"):
        train(small_config(small_data, tmp_path), progress=False)
    assert (tmp_path / LAST).read_bytes() == before


def test_resume_refuses_another_model_recipe_or_tokenizer(small_data, tmp_path):
    train(small_config(small_data, tmp_path), progress=False)
    with pytest.raises(LilllmError, match=r"another model config \(d_model, head_dim differ\)"):
        train(small_config(small_data, tmp_path, "--model.d_model=64"), resume=True, progress=False)
    with pytest.raises(LilllmError, match=r"other settings \(lr differ\)"):
        train(small_config(small_data, tmp_path, "--lr=1e-2"), resume=True, progress=False)
    state = torch.load(tmp_path / LAST, weights_only=True)
    state["tokenizer"] = json.dumps(CharTokenizer.train("another text").to_dict())
    torch.save(state, tmp_path / LAST)
    with pytest.raises(LilllmError, match="another tokenizer"):
        train(small_config(small_data, tmp_path, "--steps=8"), resume=True, progress=False)


def test_corrupt_or_missing_checkpoints_are_reported(small_data, tmp_path):
    with pytest.raises(LilllmError, match="last.pt is missing"):
        train(small_config(small_data, tmp_path), resume=True, progress=False)
    train(small_config(small_data, tmp_path), progress=False)
    whole = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(LilllmError, match="corrupt or truncated"):
        train(small_config(small_data, tmp_path, "--steps=8"), resume=True, progress=False)
    assert (tmp_path / LAST).read_bytes() == whole[: len(whole) // 2]  # left as it was, for inspection
    torch.save({"weights": torch.zeros(1)}, tmp_path / BEST)
    with pytest.raises(LilllmError, match="not a lilllm checkpoint"):
        load_checkpoint(tmp_path / BEST)


def test_a_nan_loss_stops_the_run_naming_the_step(small_data, tmp_path, monkeypatch):
    train(small_config(small_data, tmp_path), progress=False)
    saved = (tmp_path / LAST).read_bytes()
    forward, calls = GPT.forward, []

    def poisoned(self, ids, targets=None, cache=None):
        logits, loss = forward(self, ids, targets, cache)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 2 and self.training else loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(LilllmError, match="the loss is nan at step 8"):
        train(small_config(small_data, tmp_path, "--steps=10"), resume=True, progress=False)
    assert (tmp_path / LAST).read_bytes() == saved


def test_missing_token_files_say_how_to_make_them(tmp_path):
    with pytest.raises(LilllmError, match="lilllm prepare"):
        load_data(make_config("tiny", [f"--data_dir={tmp_path}"]))


# --- the command line ---------------------------------------------------------------------

def test_cli_train_then_eval(small_data, tmp_path, capsys):
    args = ["train", f"--data_dir={small_data}", f"--out_dir={tmp_path}", "--steps=4", *SMALL]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "step      4 of 4 |" in out and "done: step 4" in out
    assert cli_main(["eval", str(tmp_path / BEST)]) == 0
    best = min(r["bpb"] for r in read_metrics(tmp_path) if r["split"] == "val")
    assert f"val {best:.4f} bits per byte" in capsys.readouterr().out


def test_cli_interrupt_prints_the_command_that_resumes(small_data, tmp_path, capsys, monkeypatch):
    args = ["train", "tiny", f"--data-dir={small_data}", f"--out-dir={tmp_path / 'my run'}", "--steps=6", *SMALL]
    interrupt_at_batch(monkeypatch, 4)
    assert cli_main(args) == 130
    printed = capsys.readouterr().out
    command = printed.split("continue with:\n")[1].strip()
    assert command == shlex.join(["lilllm", *args, "--resume"])  # the out_dir and every setting, quoted
    monkeypatch.undo()
    assert cli_main(shlex.split(command)[1:]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "at step 4" in printed and "done: step 6" in printed


def test_training_output_labels_every_number_and_ends_on_the_final_score(small_data, tmp_path, capsys):
    result = train(small_config(small_data, tmp_path, "--eval_interval=4"), progress=False, recipe="tiny")
    lines = capsys.readouterr().out.splitlines()
    parameters = result.summary["parameters"]
    assert lines[0] == (f"training the tiny recipe: {parameters:,} parameters, 64 tokens per step, 6 steps, "
                        f"on cpu in fp32, into {tmp_path}")
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) == 6 and all("nats/token" in line and "tokens/s" in line for line in progress)
    assert not any("val" in line for line in progress[:3])  # nothing before the first evaluation, no nan
    last_val = re.search(r"val (\d\.\d{4}) bits/byte", progress[-1]).group(1)
    assert f"done: step 6, val {last_val} bits/byte" in lines[-1]


def test_the_bar_ends_on_the_score_of_the_done_line(small_data, tmp_path, capsys):
    train(small_config(small_data, tmp_path, "--eval_interval=4"), progress=True)
    captured = capsys.readouterr()
    bar_vals = re.findall(r"val (\d\.\d{4}) bits/byte", captured.err)
    assert bar_vals and f"done: step 6, val {bar_vals[-1]} bits/byte" in captured.out


def test_train_help_lists_every_setting_with_its_default_and_meaning(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    printed = capsys.readouterr().out
    notes = field_notes(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        assert f"--{dashed(field.name)}={spelt(getattr(TrainConfig(), field.name))}" in printed
        assert notes.get(field.name) and notes[field.name] in printed, f"{field.name} needs a comment on its line"
    assert "--model.d-model=128" in printed and "nanogpt-cpu: --tokenizer=char" in printed


def test_sft_help_shows_values_and_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["sft", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "lilllm.sft" not in printed
    assert f"--steps N fine-tuning steps, after the drill (default: {Finetune.steps})" in printed


def test_cli_errors_are_one_line(small_data, tmp_path, capsys):
    assert cli_main(["train", "--steps=many"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps=many: expected int"
    assert cli_main(["eval", str(tmp_path / "absent.pt")]) == 2
    assert "is missing" in capsys.readouterr().err


def test_cli_bench_pretrain_runs_both_recipes(capsys, monkeypatch, tmp_path):
    """The harness, shortened: two nanoGPT steps, then the default recipe (here with Muon) for
    that time; its table written into a README."""
    monkeypatch.setitem(RECIPES, "tiny", {**RECIPES["tiny"], "optimizer": "muon", "model": {
        "block_size": 16, "d_model": 32, "n_layers": 1, "n_heads": 2}})
    monkeypatch.setitem(RECIPES, "nanogpt-cpu", {**RECIPES["nanogpt-cpu"], "model": {
        **RECIPES["nanogpt-cpu"]["model"], "d_model": 32, "n_layers": 1, "block_size": 16}})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench pretrain -->\n<!-- /bench pretrain -->\n")
    assert cli_main(["bench", "pretrain", "--steps=2", "--readme", str(readme)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(line) == sorted(["nanogpt_cpu_bpb", "default_bpb", "nanogpt_cpu_bytes_s", "default_bytes_s",
                                   "default_mfu", "default_optimizer", "default_newton_schulz_mfu", "wall_s"])
    assert line["default_optimizer"] == "muon"
    assert all(value > 0 for name, value in line.items() if name != "default_optimizer")  # Newton–Schulz's share too
    assert round(line["default_bpb"], 4) == line["default_bpb"] and isinstance(line["default_bytes_s"], int)
    table = readme.read_text()
    assert f"Measured with `lilllm bench pretrain --steps=2 --readme {readme}` on " in table
    tiny_row = next(row for row in table.splitlines() if row.startswith("| `tiny` (the default), same time |"))
    assert tiny_row.startswith(f"| `tiny` (the default), same time | muon | **{line['default_bpb']:.3f}** |")
    assert tiny_row.endswith(f"+ {line['default_newton_schulz_mfu']:.1%} Newton–Schulz |")
    assert json.dumps(line) in table


def test_cli_bench_speedrun_races_the_arms_reuses_finished_runs_and_saves(capsys, monkeypatch, tmp_path):
    """Two arms, two seeds, half a second each on a shrunken tiny recipe: the table, the JSON line,
    the saved file; a second call trains nothing."""
    monkeypatch.setitem(RECIPES, "tiny", {**RECIPES["tiny"], "model": {"block_size": 16, "d_model": 32,
                                                                       "n_layers": 1, "n_heads": 2}})
    monkeypatch.setattr(bench, "SPEEDRUN_ARMS", {"AdamW": [], "Muon, ReLU²": ["--optimizer=muon", "--model.ffn=relu2"]})
    monkeypatch.setattr(bench, "SPEEDRUN_DIR", str(tmp_path / "runs"))
    saved = tmp_path / "speedrun.json"
    assert cli_main(["bench", "speedrun", "--seeds=2", "--budget=0.5", "--save", str(saved)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["budget_s"] == 0.5 and line["seeds"] == [0, 1] and set(line) == {"budget_s", "seeds", "AdamW", "Muon, ReLU²"}
    result = json.loads(saved.read_text())
    assert result["measured"].startswith("Measured with `lilllm bench speedrun --seeds=2 --budget=0.5 --save")
    assert json.loads((tmp_path / "runs" / "adamw-0" / CONFIG_FILE).read_text())["train"]["schedule"] == "cosine"
    muon = result["rows"][1]
    assert len(muon["val_bpb"]) == 2 and muon["mean"] == pytest.approx(sum(muon["val_bpb"]) / 2)
    assert muon["gain"] == pytest.approx(result["rows"][0]["mean"] - muon["mean"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["adamw-0", "adamw-1", "muon-relu2-0", "muon-relu2-1"]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("last.pt")}
    assert cli_main(["bench", "speedrun", "--seeds=2", "--budget=0.5"]) == 0  # the same runs: read back, not trained again
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == line
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("last.pt")} == before


# --- several processes ------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(small_data, tmp_path, optimizer):
    """torchrun with 2 CPU processes (gloo), each drawing half of every global batch, gives the
    losses of one process that draws the whole batch (Muon: each rank orthogonalises the same
    all-reduced gradient)."""
    common = [f"--data_dir={small_data}", *SMALL, "--steps=4", f"--optimizer={optimizer}"]
    one = train(make_config("tiny", [*common, "--batch_size=4", f"--out_dir={tmp_path / 'one'}"]), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "lilllm.cli", "train", *common, "--batch_size=2", f"--out_dir={tmp_path / 'two'}"]
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done: step 4") == 1  # only rank 0 prints
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    two = torch.load(tmp_path / "two" / LAST, weights_only=True)["model"]
    for name, param in one.model.state_dict().items():
        torch.testing.assert_close(two[name], param, rtol=1e-4, atol=1e-5)


def test_pretrained_checkpoint_trains_once_then_reuses_the_run(small_data, tmp_path, monkeypatch, capsys):
    import lilllm.course as course

    monkeypatch.setattr(course, "RUNS_DIR", tmp_path)
    monkeypatch.setitem(RECIPES, "tiny", {"data_dir": str(small_data), "model": {
        "block_size": 16, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}, "batch_size": 4})
    path = course.pretrained_checkpoint()
    assert path == tmp_path / "pretrained-tiny-quick" / BEST  # tests run in quick mode
    assert load_checkpoint(path)["step"] == 30
    stamp = path.stat().st_mtime_ns
    printed = capsys.readouterr().out
    assert "training the tiny recipe once" in printed
    assert printed.splitlines()[-1] == f"cached: {path}"  # where the run is now, not its temporary folder
    assert course.pretrained_checkpoint() == path and path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == ""
    assert [p.name for p in tmp_path.iterdir()] == ["pretrained-tiny-quick"]  # no temporary folder left
    config_file = path.parent / CONFIG_FILE
    saved = json.loads(config_file.read_text())

    def saved_without(name):  # the run's settings as the code wrote them before `name` was a setting
        config_file.write_text(json.dumps({**saved, "train": {k: v for k, v in saved["train"].items() if k != name}}))

    saved_without("cpu_bf16")  # it trained in fp32, as cpu_bf16=False does today: the same run
    assert course.pretrained_checkpoint() == path and path.stat().st_mtime_ns == stamp
    saved_without("schedule")  # it trained with the cosine of its day, not today's WSD: trained again
    assert course.pretrained_checkpoint() == path and path.stat().st_mtime_ns != stamp
    assert "training the tiny recipe once" in capsys.readouterr().out
    RECIPES["tiny"]["batch_size"] = 2  # the recipe changed: the cached run is stale and trained again
    assert course.pretrained_checkpoint() == path
    assert "training the tiny recipe once" in capsys.readouterr().out
    assert json.loads(load_checkpoint(path)["train_config"])["batch_size"] == 2


def test_pretrained_checkpoint_reuses_the_recipes_own_run_only_when_it_is_the_same_run(small_data, tmp_path,
                                                                                        monkeypatch, capsys):
    import lilllm.course as course

    runs, mine = tmp_path / "runs", tmp_path / "mine"  # mine: where `lilllm train tiny` writes
    monkeypatch.setattr(course, "RUNS_DIR", runs)
    monkeypatch.setitem(RECIPES, "tiny", {"data_dir": str(small_data), "out_dir": str(mine), "batch_size": 4, "model": {
        "block_size": 16, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}})

    def trains_its_own() -> bool:
        path = course.pretrained_checkpoint()
        trained = "training the tiny recipe once" in capsys.readouterr().out
        assert path == (runs / "pretrained-tiny-quick" / BEST if trained else mine / BEST)
        shutil.rmtree(runs, ignore_errors=True)
        return trained

    with monkeypatch.context() as interrupting:
        interrupt_at_batch(interrupting, 4)
        train(make_config("tiny", course.QUICK_SETTINGS), progress=False)
    assert trains_its_own()  # an interrupted run is not the recipe's model
    train(make_config("tiny", course.QUICK_SETTINGS), resume=True, progress=False)
    assert not trains_its_own()  # finished: the same run
    saved = json.loads((mine / CONFIG_FILE).read_text())
    (mine / CONFIG_FILE).write_text(json.dumps({**saved, "tokenizer_fingerprint": "another"}))
    assert trains_its_own()  # another tokenizer
    (mine / CONFIG_FILE).write_text(json.dumps({**saved, "processes": 2}))
    assert trains_its_own()  # a larger global batch
    (mine / CONFIG_FILE).write_text(json.dumps(saved))
    RECIPES["tiny"]["batch_size"] = 2
    assert trains_its_own()  # other settings


# --- the shared training step --------------------------------------------------------------------

def moe_model(balance, **moe):
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=50, block_size=8, d_model=16, n_layers=1, n_heads=2, ffn="moe",
                           moe={"n_experts": 4, "top_k": 1, "balance": balance, **moe}))


def test_train_step_reports_the_cross_entropy_alone_and_closes_the_step():
    model = moe_model("aux_loss", aux_loss_weight=0.5)
    x, y = torch.randint(50, (2, 2, 8)).unbind(0)
    with torch.no_grad():
        logits, loss = model(x, y)
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert loss.item() > cross_entropy + 0.4  # the balance term is in the loss the gradient follows
    config = TrainConfig(lr=1e-2, warmup=0)
    metrics = train_step(model, make_optimizer(model, config), [(x, y)], 1e-2, config, step=0)
    assert metrics["loss"] == pytest.approx(cross_entropy, rel=1e-5)  # ... but not in the loss that is logged
    assert metrics["moe_aux"] == pytest.approx(loss.item() - cross_entropy, rel=1e-4)
    assert set(model.layer_metrics()) == {"maxvio/0"}  # the MoE layer closed its step


def test_cpu_bf16_autocasts_the_training_step_and_says_so_in_the_banner(small_data, tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=8, d_model=64, n_layers=1, n_heads=2))
    x, y = torch.randint(50, (2, 4, 8)).unbind(0)
    losses = {}
    for cpu_bf16 in (False, True):
        config = TrainConfig(lr=1e-2, warmup=0, cpu_bf16=cpu_bf16)
        copy = GPT(model.config)
        copy.load_state_dict(model.state_dict())
        losses[cpu_bf16] = train_step(copy, make_optimizer(copy, config), [(x, y)], 1e-2, config, step=0)["loss"]
        assert all(p.dtype == torch.float32 for p in copy.parameters())  # the weights stay fp32
    assert losses[True] != losses[False] and losses[True] == pytest.approx(losses[False], abs=0.05)  # bf16 matmuls
    train(small_config(small_data, tmp_path, "--cpu-bf16=true", "--device=cpu"), progress=False)
    assert "on cpu in bf16 autocast" in capsys.readouterr().out.splitlines()[0]


def test_train_step_moves_the_aux_free_bias_after_the_optimizer_step():
    model = moe_model("aux_free", bias_update_rate=0.1)
    config = TrainConfig(lr=1e-2, warmup=0)
    batch = tuple(torch.randint(50, (2, 2, 8)).unbind(0))
    train_step(model, make_optimizer(model, config), [batch, batch], 1e-2, config, step=0)  # two micro-batches
    assert model.blocks[0].ffn.expert_bias.abs().sum() > 0


def test_train_step_stops_at_a_nan_loss_without_touching_the_weights():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=8, d_model=16, n_layers=1, n_heads=2))
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig()
    x, y = torch.randint(50, (2, 2, 8)).unbind(0)
    with pytest.raises(LilllmError, match="the loss is nan at step 5: training diverged"):
        train_step(model, make_optimizer(model, config), [(x, y)], 1e-3, config, step=4,
                   wrapped=lambda x, y: (None, model(x, y)[1] * float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_settings_are_spelt_with_dashes_and_underscores_alike():
    assert make_config("tiny", ["--out-dir=runs/x", "--model.d-model=64"]) == \
        make_config("tiny", ["--out_dir=runs/x", "--model.d_model=64"])
    with pytest.raises(LilllmError, match="unknown setting --out-dri: known settings are .*out-dir"):
        make_config("tiny", ["--out-dri=runs/x"])
    with pytest.raises(LilllmError, match="lr=nan is not a finite number"):
        make_config("tiny", ["--lr=nan"])
