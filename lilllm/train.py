"""Pretraining: the settings of a run (`TrainConfig`, named recipes), one training step that
every loop of the course shares, evaluation in bits per byte, and the run, which resumes exactly.

    from lilllm.train import make_config, train
    result = train(make_config("tiny", ["--steps=200"]))
    result.summary["val_bpb"]

`train_step` is one optimizer step: micro-batches with gradient accumulation, the loss checked
for NaN, clipping, AdamW, then the model's own after-step updates; fine-tuning and the copy
drill (lilllm.sft) call it too. `train` builds a `Run` (data, model, optimizer, or a resumed
checkpoint) and loops: a learning rate (warmup, hold, decay), a step, a metrics record, and
every eval_interval steps the val split in bits per byte with last.pt and best.pt written.
Under `torchrun --nproc_per_node=N` each rank trains on its slice of the same global batch
(DistributedDataParallel), and only rank 0 writes.
"""

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lilllm import LilllmError
from lilllm.checkpoint import FORMAT as CHECKPOINT_FORMAT
from lilllm.checkpoint import check_resumable, load_checkpoint, load_model, save_checkpoint
from lilllm.config import ModelConfig, check_finite
from lilllm.data import PreparedData, get_batch, load_prepared, prepared_dataset
from lilllm.model import GPT, summed_cross_entropy
from lilllm.optim import Muon, Optimizers, StableAdamW
from lilllm.progress import METRICS, Progress, append_metrics, fraction_done, plot_metrics, read_metrics, start_banner
from lilllm.runtime import (StopOnInterrupt, autocast_context, distributed, from_rank0, mean_over_processes, pick_device,
                            repo_path, shown, write_atomically)
from lilllm.settings import make_settings, settings_from_dict

LAST, BEST, PLOT, CONFIG_FILE = "last.pt", "best.pt", "loss.png", "config.json"  # in the run's out_dir
OPTIMIZERS = {"adamw": torch.optim.AdamW, "stable_adamw": StableAdamW}  # for every parameter, or (muon) beside Muon
OPTIMIZER_CHOICES = (*OPTIMIZERS, "muon")


@dataclass
class TrainConfig:
    """Everything that decides a training run. The defaults are the `tiny` recipe: the
    course's Llama-style model on byte-level BPE, a couple of minutes on a laptop CPU."""

    # Each field's comment is its one line in `lilllm train --help` (lilllm.settings.field_notes).
    # data
    tokenizer: str = "bpe"  # bpe or char
    vocab_size: int | None = 2048  # BPE vocabulary, special tokens included (char: set by the text)
    data_dir: str | None = None  # a folder made by `lilllm prepare`; none: tiny-shakespeare
    # model: a ModelConfig preset, and values changed in it (the block size lives here). Two of
    # the default's four layers: in a run of a minute or two the shallower model's faster steps
    # win (val 2.17 against 2.21 bits per byte after 91 s on 2 cores; README, Results).
    model_preset: str = "default"  # the ModelConfig preset: default, gpt2, moe, pldr-tiny, ...
    model: dict = field(default_factory=lambda: {"block_size": 128, "n_layers": 2})  # changes to the preset
    # batches
    batch_size: int = 16  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps whose gradients add up to one optimizer step
    # optimisation
    steps: int = 1000  # optimizer steps of the run
    time_budget: float | None = None  # seconds of training; set, it ends the run and paces the schedule
    lr: float = 2e-3  # the peak learning rate, reached after warmup
    min_lr: float = 2e-4  # the floor the schedule falls to
    warmup: int = 100  # steps of linear warmup
    schedule: str = "wsd"  # after warmup: wsd holds lr, then falls linearly to min_lr at the end; cosine
    decay_fraction: float = 0.2  # wsd: the part of the run (after warmup) spent falling
    optimizer: str = "adamw"  # adamw; stable_adamw (slows a tensor's step on a gradient spike); muon (hidden matrices)
    muon_lr: float = 0.02  # Muon's peak learning rate (optimizer=muon), on the same schedule as lr
    weight_decay: float = 0.1  # AdamW's, on matrices only
    beta1: float = 0.9  # AdamW's decay of the gradient's running mean
    beta2: float = 0.99  # AdamW's decay of the squared gradient's running mean
    clip: str = "norm"  # norm, value (clamp each gradient entry) or none
    grad_clip: float = 1.0  # the largest norm (or value)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evaluations and checkpoints; 0: only at the end
    log_interval: int = 10  # steps between records in metrics.jsonl
    eval_batch_size: int = 32  # windows per forward pass during evaluation
    # where and how
    seed: int = 0  # seeds the initial weights, the batches and dropout
    device: str | None = None  # cpu, cuda, cuda:N or mps; none: cuda, else mps, else cpu
    compile: bool = False  # run the model through torch.compile
    cpu_bf16: bool = False  # bf16 autocast on a CPU too: a win only with fast bf16 matmuls (lilllm env says)
    out_dir: str = "runs/tiny"  # checkpoints, metrics and the plot; relative paths start at the repository

    def __post_init__(self):
        check_finite("", dataclasses.asdict(self))
        checks = [
            (self.tokenizer in ("bpe", "char"), f"tokenizer={self.tokenizer!r}: use bpe or char"),
            (self.tokenizer == "char" or (self.vocab_size or 0) > 0, "a BPE tokenizer needs vocab_size > 0"),
            (self.batch_size > 0 and self.grad_accum > 0 and self.steps > 0,
             "batch_size, grad_accum and steps must be positive"),
            (self.time_budget is None or self.time_budget > 0, f"time_budget={self.time_budget}: give seconds > 0 or none"),
            (0 < self.lr and 0 <= self.min_lr <= self.lr,
             f"lr={self.lr}, min_lr={self.min_lr}: need 0 < lr and 0 <= min_lr <= lr"),
            (self.warmup >= 0 and self.weight_decay >= 0, "warmup and weight_decay must be >= 0"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas ({self.beta1}, {self.beta2}) must lie in [0, 1)"),
            (self.clip in ("norm", "value", "none"), f"clip={self.clip!r}: use norm, value or none"),
            (self.schedule in ("cosine", "wsd"), f"schedule={self.schedule!r}: use cosine or wsd"),
            (0 < self.decay_fraction <= 1, f"decay_fraction={self.decay_fraction} must lie in (0, 1]"),
            (self.optimizer in OPTIMIZER_CHOICES, f"optimizer={self.optimizer!r}: use {', '.join(OPTIMIZER_CHOICES)}"),
            (self.muon_lr > 0, f"muon_lr={self.muon_lr} must be positive"),
            (self.grad_clip > 0, f"grad_clip={self.grad_clip} must be positive"),
            (self.eval_interval >= 0 and self.log_interval > 0 and self.eval_batch_size > 0,
             "eval_interval must be >= 0, log_interval and eval_batch_size > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise LilllmError(f"bad setting: {message}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.preset(self.model_preset, vocab_size=vocab_size, **self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named recipes: values changed from the TrainConfig defaults.
RECIPES = {
    "tiny": {},
    # nanoGPT's CPU "baby GPT" on shakespeare_char, setting for setting (its README's command
    # line over config/train_shakespeare_char.py); GPT-2's architecture without linear biases.
    "nanogpt-cpu": {
        "tokenizer": "char", "vocab_size": None, "model_preset": "gpt2",
        "model": {"block_size": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "dropout": 0.0, "bias": False},
        "batch_size": 12, "steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "schedule": "cosine",
        "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0, "out_dir": "runs/nanogpt-cpu",
    },
    # Ten minutes of the default recipe, regularised with dropout: the best-val checkpoint keeps
    # the model from before it overfits.
    "long": {"model": {"block_size": 128, "dropout": 0.1}, "time_budget": 600.0, "steps": 100_000,
             "out_dir": "runs/long"},
}
# Settings a resumed run may change; any other difference would make it another run.
RESUMABLE_CHANGES = ("steps", "time_budget", "eval_interval", "log_interval", "eval_batch_size", "device",
                     "compile", "out_dir", "data_dir")


def make_config(recipe: str = "tiny", overrides: list[str] = (), config_file=None) -> TrainConfig:
    """A recipe by name, then the values of a JSON file (if given), then `--key=value`
    overrides; `--model.KEY=value` changes the model (lilllm.settings)."""
    if recipe not in RECIPES:
        raise LilllmError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return make_settings(TrainConfig, RECIPES[recipe], config_file, overrides, nested={"model": ModelConfig})


def config_from_dict(values: dict) -> TrainConfig:
    """A checked TrainConfig from plain values (a recipe, a JSON file, a checkpoint)."""
    return settings_from_dict(TrainConfig, values, nested={"model": ModelConfig})


# Settings added after runs had been saved, each with the value those runs trained with: a default
# may move later (the schedule was a cosine before it became a setting, and is WSD now).
SETTINGS_ADDED = {"optimizer": "adamw", "muon_lr": 0.02, "schedule": "cosine", "decay_fraction": 0.2,
                  "cpu_bf16": False}


def saved_config(values: dict) -> TrainConfig:
    """The TrainConfig a saved run trained with: a setting it predates takes its SETTINGS_ADDED value."""
    return config_from_dict({**SETTINGS_ADDED, **values})


# --- one training step ---------------------------------------------------------------------

def learning_rate(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over `warmup` steps, then from lr down to min_lr at the end of the run:
    a cosine, or (schedule=wsd) lr held, then a straight fall over the last decay_fraction
    (warmup-stable-decay, as MiniCPM trains: Hu et al., arXiv 2404.06395). `progress` (0 → 1
    after warmup) replaces step counting in a timed run."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if progress is None:
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    progress = min(progress, 1.0)
    if config.schedule == "wsd":
        left = 1 - max(0.0, progress - (1 - config.decay_fraction)) / config.decay_fraction  # 1 until the fall, → 0
    else:
        left = 0.5 * (1 + math.cos(math.pi * progress))  # 1 → 0
    return config.min_lr + left * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer | Optimizers:
    """AdamW (or Stable AdamW) with weight decay on the matrices (linear weights, embeddings)
    only: decaying norm gains and biases towards zero would only fight the normalisation.
    optimizer=muon: Muon on the blocks' 2-D weights (at muon_lr), AdamW on the rest."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # a tied matrix is listed once
    muon = config.optimizer == "muon"
    # Muon's: the blocks' matrices (attention and feed-forward projections); AdamW's: the rest
    to_muon = {name: muon and p.dim() == 2 and name.startswith("blocks.") for name, p in params.items()}
    hidden = [params[name] for name, chosen in to_muon.items() if chosen]
    rest = [params[name] for name, chosen in to_muon.items() if not chosen]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    adamw = OPTIMIZERS["adamw" if muon else config.optimizer]
    adamw = adamw(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)
    if not muon:
        return adamw
    if getattr(model, "config", None) is not None and model.config.sharing is not None:
        raise LilllmError("optimizer=muon does not rebuild itself when shared blocks diverge: use adamw with sharing")
    hidden_group = {"params": hidden, "lr_ratio": config.muon_lr / config.lr}  # train_step: lr × lr_ratio
    return Optimizers(Muon([hidden_group], lr=config.muon_lr, weight_decay=config.weight_decay), adamw)


def clip_gradients(model: torch.nn.Module, config: TrainConfig) -> float:
    """Clip by the global norm (rescale all gradients together) or by value (clamp each entry,
    as PLDR-LLM's reference does); return the norm before clipping, for the log."""
    params = [p for p in model.parameters() if p.grad is not None]
    if config.clip == "norm":
        return torch.nn.utils.clip_grad_norm_(params, config.grad_clip).item()
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]).item()
    if config.clip == "value":
        torch.nn.utils.clip_grad_value_(params, config.grad_clip)
    return norm


def train_step(model: GPT, optimizer: torch.optim.Optimizer, micro_batches, lr: float, config: TrainConfig,
               step: int, wrapped: torch.nn.Module | None = None, world_size: int = 1) -> dict:
    """One optimizer step at learning rate `lr` over `micro_batches`, a list of (x, y) on the
    model's device: the gradients of all of them, averaged (gradient accumulation); the loss
    checked for NaN or infinity before anything changes; clipping (`config.clip`); the
    optimizer step; then the model's own after-step updates (an MoE's balancing bias).
    `wrapped` is the model as DDP or torch.compile wraps it (default: the model itself).
    Returns {"loss": cross-entropy alone, "grad_norm": before clipping, each auxiliary term},
    averaged over micro-batches and processes."""
    wrapped = wrapped or model
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)  # Muon's group runs at muon_lr / lr times the schedule
    loss_sum, auxiliary_sums = 0.0, {}
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = nullcontext() if world_size == 1 or last else wrapped.no_sync()  # DDP: average once, at the end
        with sync, autocast_context(x.device, config.cpu_bf16):
            _, loss = wrapped(x, y)
        (loss / len(micro_batches)).backward()
        auxiliary = {name: value.item() for name, value in model.last_auxiliary.items()}
        loss_sum += loss.item() - sum(auxiliary.values())  # the cross-entropy alone, for bits per byte
        for name, value in auxiliary.items():
            auxiliary_sums[name] = auxiliary_sums.get(name, 0.0) + value
    device = micro_batches[0][0].device
    loss_value = mean_over_processes(loss_sum / len(micro_batches), world_size, device)
    auxiliary = {name: mean_over_processes(total / len(micro_batches), world_size, device)
                 for name, total in sorted(auxiliary_sums.items())}
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        raise LilllmError(f"the loss is {loss_value} at step {step + 1}: training diverged. Lower the learning rate "
                          f"(now {lr:.2e}) or check the data; the weights were not updated")
    grad_norm = clip_gradients(model, config)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.after_optimizer_step()
    return {"loss": loss_value, "grad_norm": grad_norm, **auxiliary}


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, n_bytes: int, block_size: int, batch_size: int = 32,
             device="cpu", rank: int = 0, world_size: int = 1) -> dict:
    """Bits per byte over the whole token stream `tokens` (the val split): consecutive,
    non-overlapping windows of `block_size` tokens, every token after the first scored once.
    bits per byte = total nats / (ln 2 · bytes of text), so tokenizers compare fairly.
    Under DDP each rank scores every world_size-th batch and the sums are added up."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    n_targets = len(tokens) - 1
    n_full = n_targets // block_size
    full = list(range(0, n_full * block_size, block_size))
    batches = [(full[i:i + batch_size], block_size) for i in range(0, len(full), batch_size)]
    if n_targets % block_size:  # the tail: one shorter window
        batches.append(([n_full * block_size], n_targets % block_size))
    nats = 0.0
    for b, (starts, length) in enumerate(batches):
        if b % world_size != rank:
            continue
        window = np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
        window = torch.from_numpy(window).to(device)
        with autocast_context(device):
            logits, _ = model(window[:, :-1])  # (B, T, vocab)
        nats += summed_cross_entropy(logits, window[:, 1:]).item()
    if world_size > 1:
        total = torch.tensor(nats, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        nats = total.item()
    model.train(was_training)
    return {"val_loss": nats / n_targets, "val_bpb": nats / (math.log(2) * n_bytes)}


def load_data(config: TrainConfig) -> PreparedData:
    """The run's token files: `data_dir` if given, else tiny-shakespeare (built on first use)."""
    if config.data_dir is not None:
        return load_prepared(repo_path(config.data_dir))
    return prepared_dataset(config.tokenizer, config.vocab_size if config.tokenizer == "bpe" else None)


def evaluate_checkpoint(path, device: str | None = None) -> dict:
    """Score a checkpoint on the val split of the data it was trained on (`lilllm eval`)."""
    model, tokenizer, state = load_model(path, device)
    if "train_config" not in state:
        raise LilllmError(f"checkpoint {path} does not say what data it was trained on (no training settings)")
    config = saved_config(json.loads(state["train_config"]))
    data = load_data(config)
    if data.tokenizer.fingerprint != tokenizer.fingerprint:
        raise LilllmError(f"the token files of checkpoint {path} were made by another tokenizer than its own "
                          f"(fingerprint {data.tokenizer.fingerprint}, not {tokenizer.fingerprint}): prepare them again")
    device = next(model.parameters()).device
    scores = evaluate(model, data.val, data.meta["val_bytes"], model.config.block_size, config.eval_batch_size, device)
    return {"step": state["step"], **scores}


# --- the run -------------------------------------------------------------------------------

def is_finished(step: int, train_time: float, config: TrainConfig) -> bool:
    """Whether a run at `step`, after `train_time` seconds of training, has done all the steps
    of `config` or spent its time budget."""
    return step >= config.steps or (config.time_budget is not None and train_time >= config.time_budget)


@dataclass
class TrainResult:
    model: GPT  # the model as the run ended (best.pt holds the best-val one)
    summary: dict  # the final numbers: val bits per byte, speed, steps, time
    out_dir: Path


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None, recipe: str | None = None,
          resume_command: str | None = None) -> TrainResult:
    """Run (or, with resume=True, continue from out_dir/last.pt) the training `config`
    describes. `progress`: a tqdm bar (default when stderr is a terminal) or plain lines.
    `recipe` names the recipe in the start banner; `resume_command` is the command an
    interrupted run tells you to type to continue it (`lilllm train` passes its own)."""
    run = Run(config, resume)
    if run.finished():  # resumed at its end: nothing to train, nothing to write
        run.say(f"the run in {shown(run.out_dir)} is finished (step {run.step:,} of {config.steps:,}"
                f"{', its time budget spent' if run.out_of_time() else ''}): nothing to do. To train it further, "
                "resume it with a larger --steps (or --time-budget)")
        run.leave_process_group()
        return TrainResult(model=run.model, summary=run.summary(interrupted=False), out_dir=run.out_dir)
    run.start(recipe)
    display = Progress(config.steps, config.time_budget, run.step, progress, show=run.writer)
    with StopOnInterrupt() as interrupt:
        while True:
            started = time.perf_counter()
            if run.model.advance(run.progress()):  # the model changed its parameters (sharing's switches)
                run.rebuild_optimizer()
            lr = learning_rate(run.step, config, run.schedule_progress())
            metrics = train_step(run.model, run.optimizer, run.micro_batches(), lr, config, run.step, run.wrapped,
                                 run.world_size)
            run.step += 1
            run.train_time += time.perf_counter() - started
            if run.step % config.log_interval == 0:
                run.log_train(metrics, lr)
            stop, timed_out = from_rank0([interrupt.requested, run.out_of_time()], run.world_size, run.device)
            finished = run.step >= config.steps or timed_out
            if finished or (config.eval_interval and run.step % config.eval_interval == 0 and not stop):
                run.evaluate()  # the last evaluation before the last update: the display ends on the final score
            display.update(run.step, run.train_time, metrics["loss"], run.val_bpb, run.tokens_per_s())
            if finished or stop:
                break
    display.close()
    return run.finish(interrupted=not finished, resume_command=resume_command)


class Run:
    """One training run: its settings, data, model and optimizer; where it stands (step,
    seconds of training, best score); and what it writes (metrics, checkpoints, the plot).
    `train` drives it; a checkpoint saves its state and `resume` restores it exactly."""

    def __init__(self, config: TrainConfig, resume: bool):
        self.config = config
        self.rank, self.world_size, local_rank = distributed()
        self.device = pick_device(config.device)
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self.writer = self.rank == 0
        self.out_dir = repo_path(config.out_dir)
        if self.writer:  # rank 0 builds the token files if needed; the others then read them
            self.data = load_data(config)
        if self.world_size > 1:
            torch.distributed.barrier()
        if not self.writer:
            self.data = load_data(config)
        self.tokenizer = self.data.tokenizer
        model_config = config.model_config(self.tokenizer.vocab_size)
        self.block_size = model_config.block_size
        self.bytes_per_token = self.data.meta["train_bytes"] / self.data.meta["train_tokens"]
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = GPT(model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.generator = torch.Generator().manual_seed(config.seed)  # batches: the same global draw on every rank
        torch.manual_seed(config.seed + self.rank)  # dropout: a different mask on each rank
        self.step, self.best_val_bpb, self.val_bpb = 0, None, None
        self.train_time, self.warm_time = 0.0, None  # seconds of training; when warmup ended (timed runs)
        if resume:
            self._resume()
        elif (self.out_dir / LAST).exists() or (self.out_dir / BEST).exists():
            raise LilllmError(f"{shown(self.out_dir)} already holds a run: pass --resume to continue it, "
                              "or choose another --out-dir")
        self.resumed = resume
        self.first_step, self.first_time = self.step, self.train_time  # where this process started: its speed

    def start(self, recipe: str | None = None) -> None:
        """Say what is about to train, write config.json (a new run also an empty metrics.jsonl;
        a resumed one keeps its records up to the checkpoint), and wrap the model for DDP and
        torch.compile."""
        model_config = self.model.config
        self.say(start_banner(recipe, self.model.parameter_counts()["total"], self.tokens_per_step(),
                              self.config, self.device, shown(self.out_dir)))
        if self.writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            run_config = {"train": self.config.to_dict(), "model": model_config.to_dict(), "processes": self.world_size,
                          "tokenizer_fingerprint": self.tokenizer.fingerprint, "checkpoint_format": CHECKPOINT_FORMAT}
            write_atomically(self.out_dir / CONFIG_FILE, json.dumps(run_config, indent=1) + "\n")
            if self.resumed:  # drop records a crashed run wrote after its last checkpoint
                records = [r for r in read_metrics(self.out_dir) if r["step"] <= self.step]
                write_atomically(self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in records))
                self.say(f"resuming {shown(self.out_dir / LAST)} at step {self.step:,}")
            else:
                (self.out_dir / METRICS).write_text("")
        self.wrap()
        self.model.train()

    def wrap(self) -> None:
        """The model as the step runs it: under DDP (several processes) and torch.compile, if asked."""
        self.wrapped = self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if self.config.compile:
            self.wrapped = torch.compile(self.wrapped)

    def rebuild_optimizer(self) -> None:
        """After the model changed its parameters: an optimizer over the trainable ones, as
        make_optimizer builds it. A parameter it held before keeps its moments and step count;
        a new one starts from zero. The learning-rate schedule goes on from the current step,
        and DDP and torch.compile wrap the model again, so they see the new parameters."""
        old = self.optimizer
        self.optimizer = make_optimizer(self.model, self.config)
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param in old.state:
                    self.optimizer.state[param] = old.state[param]
        self.wrap()

    def _resume(self) -> None:
        path = self.out_dir / LAST
        state = load_checkpoint(path)
        check_resumable(state, path, self.tokenizer, self.model.config, self.config.to_dict(), RESUMABLE_CHANGES,
                        defaults={**TrainConfig().to_dict(), **SETTINGS_ADDED})
        self.model.load_state_dict(state["model"])  # a model with sharing first diverges as often as it had
        self.optimizer = make_optimizer(self.model, self.config)  # so: over the parameters it has now
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["batches"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.best_val_bpb, self.val_bpb = state["step"], state["best_val_bpb"], state.get("val_bpb")
        self.train_time, self.warm_time = state["clock"]["train_time"], state["clock"]["warm_time"]

    def say(self, *args, **kwargs) -> None:
        if self.writer:
            print(*args, **kwargs)

    def micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This step's (x, y) micro-batches for this rank: rows rank, rank + N, ... of the
        same global draw on every rank."""
        batches = []
        for _ in range(self.config.grad_accum):
            x, y = get_batch(self.data.train, self.config.batch_size * self.world_size, self.block_size, self.generator)
            batches.append((x[self.rank::self.world_size].to(self.device), y[self.rank::self.world_size].to(self.device)))
        return batches

    def schedule_progress(self) -> float | None:
        """In a timed run, how far the schedule has come (0 → 1 from the end of warmup to the
        budget); None when the schedule counts steps."""
        if self.config.time_budget is None or self.step < self.config.warmup:
            return None
        if self.warm_time is None:
            self.warm_time = self.train_time
        return (self.train_time - self.warm_time) / max(1e-9, self.config.time_budget - self.warm_time)

    def progress(self) -> float:
        """How far the run has come, 0 → 1 (`fraction_done`: what the progress display shows)."""
        return fraction_done(self.step, self.train_time, self.config.steps, self.config.time_budget)

    def out_of_time(self) -> bool:
        return self.config.time_budget is not None and self.train_time >= self.config.time_budget

    def finished(self) -> bool:
        return is_finished(self.step, self.train_time, self.config)

    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.grad_accum * self.world_size * self.block_size

    def tokens_per_s(self) -> float:
        return self.tokens_per_step() * (self.step - self.first_step) / max(self.train_time - self.first_time, 1e-9)

    def log(self, record: dict) -> None:
        if self.writer:
            append_metrics(self.out_dir, record)

    def log_train(self, metrics: dict, lr: float) -> None:
        loss = metrics["loss"]
        self.log({"step": self.step, "split": "train", "loss": loss, "bpb": loss / math.log(2) / self.bytes_per_token,
                  "lr": lr, "tokens_per_s": self.tokens_per_s(), "time_s": self.train_time, **metrics,
                  **self.model.layer_metrics()})

    def evaluate(self) -> float:
        """Score the val split, log it, save best.pt (if it is the best yet) and last.pt."""
        data = self.data
        scores = evaluate(self.model, data.val, data.meta["val_bytes"], self.block_size, self.config.eval_batch_size,
                          self.device, self.rank, self.world_size)
        self.val_bpb = scores["val_bpb"]
        self.log({"step": self.step, "split": "val", "loss": scores["val_loss"], "bpb": self.val_bpb,
                  "time_s": self.train_time})
        if self.best_val_bpb is None or self.val_bpb < self.best_val_bpb:
            self.best_val_bpb = self.val_bpb
            self.save(self.out_dir / BEST)
        self.save(self.out_dir / LAST)
        return self.val_bpb

    def save(self, path) -> None:
        if not self.writer:
            return
        save_checkpoint(path, self.model, self.tokenizer, step=self.step, optimizer=self.optimizer.state_dict(),
                        train_config=json.dumps(self.config.to_dict()), val_bpb=self.val_bpb,
                        best_val_bpb=self.best_val_bpb,
                        clock={"train_time": self.train_time, "warm_time": self.warm_time},
                        rng={"torch": torch.get_rng_state(), "batches": self.generator.get_state(),  # dropout, batches
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})

    def finish(self, interrupted: bool, resume_command: str | None = None) -> TrainResult:
        """Save (interrupted; a finished run saved at its last evaluation); leave the process
        group; then rank 0 alone writes the plot and says what it did."""
        if interrupted:
            self.save(self.out_dir / LAST)
        self.leave_process_group()
        summary = self.summary(interrupted)
        if interrupted:
            self.say(f"interrupted at step {self.step:,}: saved {shown(self.out_dir / LAST)}; continue with:\n"
                     f"  {resume_command or 'train(config, resume=True)'}")
        elif self.writer:
            plot_metrics(read_metrics(self.out_dir)).savefig(self.out_dir / PLOT, dpi=120, bbox_inches="tight")
            self.say(f"done: step {self.step:,}, val {self.val_bpb:.4f} bits/byte (best {self.best_val_bpb:.4f}), "
                     f"{summary['bytes_per_s']:,.0f} bytes/s; checkpoints, metrics and {PLOT} in {shown(self.out_dir)}")
        return TrainResult(model=self.model, summary=summary, out_dir=self.out_dir)

    def leave_process_group(self) -> None:
        if self.world_size > 1:  # every collective is done and every rank waits for rank 0's checkpoints
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def summary(self, interrupted: bool) -> dict:
        return {
            "step": self.step, "interrupted": interrupted, "val_bpb": self.val_bpb, "best_val_bpb": self.best_val_bpb,
            "train_time_s": self.train_time, "tokens_per_step": self.tokens_per_step(),
            "tokens_per_s": self.tokens_per_s(),  # in this session: 0 for a run resumed at its end
            "bytes_per_s": self.tokens_per_s() * self.bytes_per_token,
            "flops_per_token": self.model.flops_per_token(), "parameters": self.model.parameter_counts()["total"],
            "optimizer": self.config.optimizer,  # and Muon's orthogonalisations, which flops_per_token leaves out:
            "newton_schulz_flops_per_step": getattr(self.optimizer, "newton_schulz_flops", lambda: 0)(),
        }
