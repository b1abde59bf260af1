"""Pretraining: the training loop, its settings, evaluation in bits per byte, and
checkpoints that resume exactly.

    from lilllm.train import make_config, train
    result = train(make_config("tiny", ["--steps=200"]))
    result.summary["val_bpb"]

One run, top to bottom (`train`):
1. settings: a `TrainConfig` from a preset by name, with `--key=value` overrides;
2. data: the prepared token files of the chosen tokenizer (built on first use);
3. model and AdamW, weight decay on matrices only; a linear warmup, then cosine decay;
4. steps: random batches, gradient accumulation, clipping; the loss checked for NaN;
5. evaluation over the whole val split in bits per byte; metrics to metrics.jsonl;
6. checkpoints (last.pt periodically, best.pt at the best val score), written atomically,
   with everything a resumed run needs to continue the very same curve.

The same loop runs under `torchrun --nproc_per_node=N` with DistributedDataParallel: each
rank draws a different slice of the same global batch, and only rank 0 writes.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import types
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.data import PreparedData, get_batch, load_prepared, prepared_dataset
from lilllm.env import REPO_ROOT, autocast_context, pick_device
from lilllm.model import GPT

CHECKPOINT_FORMAT = "lilllm-checkpoint-1"
LAST, BEST = "last.pt", "best.pt"  # file names in the run's out_dir
METRICS, PLOT, CONFIG_FILE = "metrics.jsonl", "loss.png", "config.json"
RUNS_DIR = REPO_ROOT / "runs"


@dataclass
class TrainConfig:
    """Everything that decides a training run. The defaults are the `tiny` preset: the
    course's Llama-style model on byte-level BPE, a couple of minutes on a laptop CPU."""

    # data
    tokenizer: str = "bpe"  # "bpe" or "char"
    vocab_size: int | None = 2048  # BPE only; a character vocabulary is set by the text
    data_dir: str | None = None  # a folder made by `lilllm prepare`; None: tiny-shakespeare
    # model: a ModelConfig preset, and values changed in it (the block size lives here). Two of
    # the default's four layers: in a run of a minute or two the shallower model's faster steps
    # win (val 2.17 against 2.21 bits per byte after 91 s on 2 cores; README, Results).
    model_preset: str = "default"
    model: dict = field(default_factory=lambda: {"block_size": 128, "n_layers": 2})
    # batches: batch_size sequences per rank per micro-step, grad_accum micro-steps per step
    batch_size: int = 16
    grad_accum: int = 1
    # optimisation
    steps: int = 1000
    time_budget: float | None = None  # seconds of training; set, it ends the run and paces the schedule
    lr: float = 2e-3
    min_lr: float = 2e-4  # the floor the cosine decays to
    warmup: int = 100  # steps of linear warmup
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.99
    clip: str = "norm"  # "norm", "value" (clamp each gradient entry) or "none"
    grad_clip: float = 1.0  # the largest norm (or value)
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between evaluations and checkpoints; 0: only at the end
    log_interval: int = 10  # steps between metric records
    eval_batch_size: int = 32  # windows per forward pass during evaluation
    # where and how
    seed: int = 0
    device: str | None = None  # None: cuda → mps → cpu
    compile: bool = False
    out_dir: str = "runs/tiny"  # relative paths are taken from the repository root

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig.preset(self.model_preset, vocab_size=vocab_size, **self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Named recipes: values changed from the TrainConfig defaults.
PRESETS = {
    "tiny": {},
    # nanoGPT's CPU "baby GPT" on shakespeare_char, setting for setting (its README's command
    # line over config/train_shakespeare_char.py); GPT-2's architecture without linear biases.
    "nanogpt-cpu": {
        "tokenizer": "char", "vocab_size": None, "model_preset": "gpt2",
        "model": {"block_size": 64, "d_model": 128, "n_layers": 4, "n_heads": 4, "dropout": 0.0, "bias": False},
        "batch_size": 12, "steps": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "beta2": 0.99,
        "weight_decay": 0.1, "grad_clip": 1.0, "out_dir": "runs/nanogpt-cpu",
    },
    # Ten minutes of the default recipe, regularised with dropout: the best-val checkpoint keeps
    # the model from before it overfits.
    "long": {"model": {"block_size": 128, "dropout": 0.1}, "time_budget": 600.0, "steps": 100_000,
             "out_dir": "runs/long"},
}
# Settings a resumed run may change; any other difference would make it another run.
RESUMABLE_CHANGES = ("steps", "time_budget", "eval_interval", "log_interval", "eval_batch_size", "device",
                     "compile", "out_dir", "data_dir")


# --- settings: presets, overrides, checks ------------------------------------------------

def make_config(preset: str = "tiny", overrides: list[str] = (), config_file=None) -> TrainConfig:
    """A preset by name, then the values of a JSON file (if given), then `--key=value`
    overrides; `--model.KEY=value` changes the model. Every value is type-checked."""
    if preset not in PRESETS:
        raise LilllmError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values = json.loads(json.dumps(PRESETS[preset]))  # a deep copy
    if config_file is not None:
        values.update(_read_config_file(config_file))
    for item in overrides:
        key, text = _split_override(item)
        if key.startswith("model."):
            name, model_types = key.removeprefix("model."), _field_types(ModelConfig)
            if name not in model_types:
                raise LilllmError(f"unknown model setting --{key}: known ones are {', '.join(model_types)}")
            values.setdefault("model", dict(TrainConfig().model))
            values["model"][name] = _parse_value(key, text, model_types[name])
        else:
            values[key] = _parse_value(key, text, _field_types(TrainConfig).get(key))
    return config_from_dict(values)


def config_from_dict(values: dict) -> TrainConfig:
    """A checked TrainConfig from plain values (a preset, a JSON file, a checkpoint)."""
    types_ = _field_types(TrainConfig)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise LilllmError(f"unknown setting(s) {', '.join(unknown)}: known settings are {', '.join(types_)} "
                          "(and model.KEY for the model)")
    for key, value in values.items():
        if not _has_type(value, types_[key]):
            raise LilllmError(f"setting {key}={value!r} has the wrong type: expected {_type_name(types_[key])}")
    config = TrainConfig(**values)
    model_types = _field_types(ModelConfig)
    for name, value in config.model.items():
        if name not in model_types:
            raise LilllmError(f"unknown model setting model.{name}: known ones are {', '.join(model_types)}")
        if name != "layers" and not _has_type(value, model_types[name]):
            raise LilllmError(f"setting model.{name}={value!r} has the wrong type: expected "
                              f"{_type_name(model_types[name])}")
    _check_values(config)
    return config


def _check_values(c: TrainConfig) -> None:
    checks = [
        (c.tokenizer in ("bpe", "char"), f"tokenizer={c.tokenizer!r}: use bpe or char"),
        (c.tokenizer == "char" or (c.vocab_size or 0) > 0, "a BPE tokenizer needs vocab_size > 0"),
        (c.batch_size > 0 and c.grad_accum > 0 and c.steps > 0, "batch_size, grad_accum and steps must be positive"),
        (c.time_budget is None or c.time_budget > 0, f"time_budget={c.time_budget}: give seconds > 0 or none"),
        (0 < c.lr and 0 <= c.min_lr <= c.lr, f"lr={c.lr}, min_lr={c.min_lr}: need 0 < lr and 0 <= min_lr <= lr"),
        (c.warmup >= 0 and c.weight_decay >= 0, "warmup and weight_decay must be >= 0"),
        (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, f"betas ({c.beta1}, {c.beta2}) must lie in [0, 1)"),
        (c.clip in ("norm", "value", "none"), f"clip={c.clip!r}: use norm, value or none"),
        (c.grad_clip > 0, f"grad_clip={c.grad_clip} must be positive"),
        (c.eval_interval >= 0 and c.log_interval > 0 and c.eval_batch_size > 0,
         "eval_interval must be >= 0, log_interval and eval_batch_size > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise LilllmError(f"bad setting: {message}")


def _read_config_file(path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LilllmError(f"config file {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LilllmError(f"config file {path} is not valid JSON ({err})") from None
    if not isinstance(values, dict):
        raise LilllmError(f"config file {path} must hold a JSON object of setting: value pairs")
    return values


def _split_override(item: str) -> tuple[str, str]:
    key, equals, text = item.removeprefix("--").partition("=")
    if not item.startswith("--") or not equals or not key:
        raise LilllmError(f"cannot read {item!r}: write settings as --key=value, e.g. --lr=3e-4 or --model.d_model=192")
    return key.replace("-", "_"), text


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _parse_value(key: str, text: str, hint):
    """The value of `--key=text`, of the setting's type (int | None accepts "none")."""
    if hint is None:
        raise LilllmError(f"unknown setting --{key}: known settings are {', '.join(_field_types(TrainConfig))} "
                          "and model.KEY for the model")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if text.lower() in ("none", "null") and type(None) in options:
        return None
    for kind in options:
        if kind is bool and text.lower() in ("true", "1", "yes", "false", "0", "no"):
            return text.lower() in ("true", "1", "yes")
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
        if kind is str:
            return text
        if kind in (dict, list) or typing.get_origin(kind) in (dict, list) or dataclasses.is_dataclass(kind):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                continue
    raise LilllmError(f"--{key}={text}: expected {_type_name(hint)}")


def _has_type(value, hint) -> bool:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind in options:
        kind = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is not type(None) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return True
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):  # nested model settings (moe): ModelConfig checks them
            return True
    return False


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "none")


# --- the pieces of a step ---------------------------------------------------------------

def learning_rate(step: int, config: TrainConfig, progress: float | None = None) -> float:
    """Linear warmup over `warmup` steps, then a cosine from lr down to min_lr at the end of
    the run. `progress` (0 → 1 after warmup) replaces step counting in a timed run."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if progress is None:
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # 1 → 0
    return config.min_lr + cosine * (config.lr - config.min_lr)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices (linear weights, embeddings) only: decaying
    norm gains and biases towards zero would only fight the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied matrix is listed once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=1e-8)


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
        nats += F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum").item()
    if world_size > 1:
        total = torch.tensor(nats, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(total)
        nats = total.item()
    model.train(was_training)
    return {"val_loss": nats / n_targets, "val_bpb": nats / (math.log(2) * n_bytes)}


# --- checkpoints ------------------------------------------------------------------------
# A checkpoint holds only tensors and plain values (configs as JSON strings), so it loads
# with torch.load(weights_only=True): loading one can never run code.

def save_checkpoint(path, *, model, optimizer, config: TrainConfig, fingerprint: str, step: int,
                    best_val_bpb: float | None, generator: torch.Generator, clock: dict,
                    extra: dict | None = None) -> Path:
    """Write everything a resumed run needs to a temporary file, then rename it over `path`:
    a crash while writing leaves the previous checkpoint whole. `extra`: more plain entries
    (a fine-tuned model's chat template)."""
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_config": model.config.to_json(),
        "train_config": json.dumps(config.to_dict()),
        "tokenizer_fingerprint": fingerprint,
        "best_val_bpb": best_val_bpb,
        "clock": clock,  # seconds of training so far, and when warmup ended: a timed run's schedule
        "rng": {  # dropout (torch), the batch sampler (generator) and the GPU's own generators
            "torch": torch.get_rng_state(),
            "batches": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        **(extra or {}),
    }
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's contents, with a clear error if it is missing, truncated or not ours."""
    path = Path(path)
    if not path.is_file():
        raise LilllmError(f"checkpoint {path} is missing: train one with `lilllm train`")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, a pickle error, an unsafe object ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LilllmError(f"checkpoint {path} is corrupt or truncated ({reason}): use another checkpoint "
                          "or train again") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise LilllmError(f"{path} is not a lilllm checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def load_model(path, device="cpu") -> tuple[GPT, dict]:
    """The trained model of a checkpoint (in eval mode), and the checkpoint."""
    state = load_checkpoint(path, device)
    model = GPT(ModelConfig.from_json(state["model_config"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def load_model_and_data(path, device=None) -> tuple[GPT, PreparedData, dict]:
    """A checkpoint's model (in eval mode), the prepared data it was trained on (tokenizer and
    token files), and the checkpoint; refused if that tokenizer has changed since, as its ids
    would mean other text."""
    model, state = load_model(path, pick_device(device))
    data = load_data(config_from_dict(json.loads(state["train_config"])))
    if data.tokenizer.fingerprint != state["tokenizer_fingerprint"]:
        raise LilllmError(f"the tokenizer of checkpoint {path} has changed since training (fingerprint "
                          f"{data.tokenizer.fingerprint}, not {state['tokenizer_fingerprint']}): its ids would mean other text")
    return model, data, state


def load_model_and_tokenizer(path, device=None):
    """A checkpoint's model, the tokenizer it was trained with, and the checkpoint."""
    model, data, state = load_model_and_data(path, device)
    return model, data.tokenizer, state


def _check_resumable(state: dict, path, config: TrainConfig, model_config: ModelConfig, fingerprint: str) -> None:
    """Refuse to continue a checkpoint with another tokenizer, model or recipe."""
    fix = "resume with the settings it was trained with, or start a new run with another --out_dir"
    if state["tokenizer_fingerprint"] != fingerprint:
        raise LilllmError(f"checkpoint {path} was trained with another tokenizer (fingerprint "
                          f"{state['tokenizer_fingerprint']}, the data's is {fingerprint}): {fix}")
    saved = json.loads(state["model_config"])
    changed = sorted(k for k in saved if saved[k] != model_config.to_dict().get(k))
    if changed:
        raise LilllmError(f"checkpoint {path} has another model config ({', '.join(changed)} differ): {fix}")
    saved = json.loads(state["train_config"])
    changed = sorted(k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        raise LilllmError(f"checkpoint {path} was trained with other settings ({', '.join(changed)} differ): {fix}")


# --- the run ----------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: GPT  # the model as the run ended (best.pt holds the best-val one)
    summary: dict  # the final numbers: val bits per byte, speed, steps, time
    out_dir: Path


def out_path(out_dir) -> Path:
    """A run folder: relative paths are taken from the repository root."""
    path = Path(out_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def load_data(config: TrainConfig) -> PreparedData:
    """The run's token files: `data_dir` if given, else tiny-shakespeare (built on first use)."""
    if config.data_dir is not None:
        return load_prepared(out_path(config.data_dir))
    return prepared_dataset(config.tokenizer, config.vocab_size if config.tokenizer == "bpe" else None)


def model_flops_per_token(model: GPT) -> float:
    """Training FLOPs per token, forward + backward (PaLM's estimate, Chowdhery et al., arXiv
    2204.02311): 6 per weight (multiply-add, twice more backward) plus the attention scores
    and mixing, 12·layers·d_model·block_size. A learned position table is a lookup: not counted."""
    c = model.config
    n_weights = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("pos_emb."))
    return 6 * n_weights + 12 * c.n_layers * c.d_model * c.block_size


class _StopOnInterrupt:
    """Ctrl-C sets a flag that the loop reads between steps (so it saves a consistent state
    and exits); a second Ctrl-C interrupts at once. Outside the main thread: no handler."""

    def __init__(self):
        self.requested = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), starting the process group when run by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _from_rank0(values: list[float], world_size: int, device) -> list[float]:
    """Rank 0's values on every rank: decisions (stop now, schedule progress) must agree."""
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return tensor.tolist()


def layer_metrics(model: GPT) -> dict[str, float]:
    """What each layer measures about itself, keyed "name/layer": "maxvio/2" is the MaxVio
    of layer 2's mixture of experts (a layer reports through a method `metrics()`)."""
    return {f"{name}/{index}": value for index, block in enumerate(model.blocks) for module in block.modules()
            if hasattr(module, "metrics") for name, value in module.metrics().items()}


def _mean_over_ranks(value: float, world_size: int, device) -> float:
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.item() / world_size


def _shown(path: Path) -> str:
    """A path as messages show it: relative to the repository when inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def _format_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(config: TrainConfig, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Run (or, with resume=True, continue from out_dir/last.pt) the training `config`
    describes. `progress`: a tqdm bar (default when stderr is a terminal) or plain lines."""
    rank, world_size, local_rank = _distributed()
    device = pick_device(config.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    writer = rank == 0
    out_dir = out_path(config.out_dir)
    say = print if writer else (lambda *args, **kwargs: None)

    if writer:  # rank 0 builds the token files if needed; the others then read them
        data = load_data(config)
    if world_size > 1:
        torch.distributed.barrier()
    if not writer:
        data = load_data(config)
    fingerprint = data.tokenizer.fingerprint
    model_config = config.model_config(data.tokenizer.vocab_size)
    block_size = model_config.block_size
    bytes_per_token = data.meta["train_bytes"] / data.meta["train_tokens"]

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = GPT(model_config).to(device)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)  # batches: the same global draw on every rank
    torch.manual_seed(config.seed + rank)  # dropout: a different mask on each rank
    step, best_val_bpb, clock = 0, None, {"train_time": 0.0, "warm_time": None}
    last_path, best_path, metrics_path = out_dir / LAST, out_dir / BEST, out_dir / METRICS
    if resume:
        state = load_checkpoint(last_path)
        _check_resumable(state, last_path, config, model_config, fingerprint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["batches"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step, best_val_bpb, clock = state["step"], state["best_val_bpb"], state["clock"]
        if writer:  # drop records a crashed run wrote after its last checkpoint
            records = [r for r in read_metrics(out_dir) if r["step"] <= step]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        say(f"resuming {_shown(last_path)} at step {step}")
    elif last_path.exists() or best_path.exists():
        raise LilllmError(f"{_shown(out_dir)} already holds a run: pass --resume to continue it, or choose another --out_dir")
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_config = {"train": config.to_dict(), "model": model_config.to_dict(), "tokenizer_fingerprint": fingerprint}
        (out_dir / CONFIG_FILE).write_text(json.dumps(run_config, indent=1) + "\n")
        if not resume:
            metrics_path.write_text("")

    trained = model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        trained = torch.compile(trained)
    model.train()

    def save(path):
        if writer:
            save_checkpoint(path, model=model, optimizer=optimizer, config=config, fingerprint=fingerprint, step=step,
                            best_val_bpb=best_val_bpb, generator=generator,
                            clock={"train_time": train_time, "warm_time": warm_time})

    def run_eval():
        nonlocal best_val_bpb
        scores = evaluate(model, data.val, data.meta["val_bytes"], block_size, config.eval_batch_size, device,
                          rank, world_size)
        log({"step": step, "split": "val", "loss": scores["val_loss"], "bpb": scores["val_bpb"], "time_s": train_time})
        if best_val_bpb is None or scores["val_bpb"] < best_val_bpb:
            best_val_bpb = scores["val_bpb"]
            save(best_path)
        save(last_path)
        return scores

    def log(record):
        if writer:
            with open(metrics_path, "a") as file:
                file.write(json.dumps(record) + "\n")

    tokens_per_step = config.batch_size * config.grad_accum * world_size * block_size
    first_step, train_time, warm_time, val_bpb = step, clock["train_time"], clock["warm_time"], None
    first_time = train_time
    use_bar = writer and (sys.stderr.isatty() if progress is None else progress)
    bar = None
    if use_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, unit="step", dynamic_ncols=True)
    next_line = 0.1  # plain lines at every tenth of the run
    with _StopOnInterrupt() as interrupt:
        while step < config.steps:
            started = time.perf_counter()
            progress_now = None
            if config.time_budget is not None and step >= config.warmup:
                warm_time = train_time if warm_time is None else warm_time
                progress_now = (train_time - warm_time) / max(1e-9, config.time_budget - warm_time)
            lr = learning_rate(step, config, progress_now)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, auxiliary_sums = 0.0, {}
            for micro in range(config.grad_accum):
                x, y = get_batch(data.train, config.batch_size * world_size, block_size, generator)
                x, y = x[rank::world_size].to(device), y[rank::world_size].to(device)  # (B, T): this rank's rows
                last_micro = micro == config.grad_accum - 1
                sync = nullcontext() if world_size == 1 or last_micro else trained.no_sync()
                with sync, autocast_context(device):
                    _, loss = trained(x, y)
                (loss / config.grad_accum).backward()
                auxiliary = {name: value.item() for name, value in model.last_auxiliary.items()}
                loss_sum += loss.item() - sum(auxiliary.values())  # the cross-entropy alone, for bits per byte
                for name, value in auxiliary.items():
                    auxiliary_sums[name] = auxiliary_sums.get(name, 0.0) + value
            loss_value = _mean_over_ranks(loss_sum / config.grad_accum, world_size, device)
            auxiliary = {name: _mean_over_ranks(total / config.grad_accum, world_size, device)
                         for name, total in sorted(auxiliary_sums.items())}
            if not math.isfinite(loss_value):
                raise LilllmError(f"the loss is {loss_value} at step {step + 1}: training diverged. Lower lr (now "
                                  f"{lr:.2e}) or check the data; the checkpoints in {_shown(out_dir)} are untouched")
            grad_norm = clip_gradients(model, config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for module in model.modules():  # state outside the optimizer, e.g. an MoE layer's balancing bias
                if hasattr(module, "after_optimizer_step"):
                    module.after_optimizer_step()
            step += 1
            train_time += time.perf_counter() - started
            tokens_per_s = tokens_per_step * (step - first_step) / (train_time - first_time)
            if step % config.log_interval == 0:
                log({"step": step, "split": "train", "loss": loss_value, "bpb": loss_value / math.log(2) / bytes_per_token,
                     "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "time_s": train_time,
                     **auxiliary, **layer_metrics(model)})
            timed_out = config.time_budget is not None and train_time >= config.time_budget
            stop, timed_out = (bool(v) for v in _from_rank0([interrupt.requested, timed_out], world_size, device))
            if config.eval_interval and step % config.eval_interval == 0 and step < config.steps and not stop:
                val_bpb = run_eval()["val_bpb"]
            done = max(step / config.steps, train_time / config.time_budget if config.time_budget else 0.0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_value:.3f}, val {val_bpb or float('nan'):.3f} bpb, "
                                    f"{tokens_per_s:,.0f} tok/s")
            elif done >= next_line or step == config.steps:
                next_line = math.floor(done * 10 + 1) / 10
                left = max(0.0, train_time * (1 - done) / max(done, 1e-9))
                of = f"{_format_seconds(config.time_budget)} budget" if config.time_budget else f"{config.steps:,}"
                say(f"step {step:>6,} of {of} | loss {loss_value:.4f} | "
                    f"val {'—' if val_bpb is None else f'{val_bpb:.4f}'} bpb | {tokens_per_s:,.0f} tok/s | "
                    f"{_format_seconds(train_time)} elapsed, ~{_format_seconds(left)} left", flush=True)
            if stop or timed_out:
                break
    if bar is not None:
        bar.close()
    interrupted = interrupt.requested and step < config.steps
    if interrupted:
        save(last_path)
        say(f"interrupted at step {step}: saved {_shown(last_path)}; continue with --resume")
    else:
        val_bpb = run_eval()["val_bpb"]
        if writer:
            plot_metrics(read_metrics(out_dir)).savefig(out_dir / PLOT, dpi=120, bbox_inches="tight")
    tokens_per_s = tokens_per_step * (step - first_step) / max(train_time - first_time, 1e-9)
    summary = {
        "step": step, "interrupted": interrupted, "val_bpb": val_bpb, "best_val_bpb": best_val_bpb,
        "train_time_s": train_time, "tokens_per_s": tokens_per_s, "bytes_per_s": tokens_per_s * bytes_per_token,
        "flops_per_token": model_flops_per_token(model), "parameters": model.parameter_counts()["total"],
    }
    if writer and not interrupted:
        say(f"done: step {step:,}, val {val_bpb:.4f} bits per byte (best {best_val_bpb:.4f}), "
            f"{summary['bytes_per_s']:,.0f} bytes/s; checkpoints, metrics and {PLOT} in {_shown(out_dir)}")
    if world_size > 1:  # tear down together: a rank leaving while rank 0 still writes can abort
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return TrainResult(model=model, summary=summary, out_dir=out_dir)


# --- metrics and the loss curve -----------------------------------------------------------

def read_metrics(out_dir) -> list[dict]:
    """The records of out_dir/metrics.jsonl (one JSON object per line)."""
    path = out_path(out_dir) / METRICS
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


def evaluate_checkpoint(path, device: str | None = None) -> dict:
    """Score a checkpoint on the val split of the data it was trained on (`lilllm eval`)."""
    device = pick_device(device)
    model, data, state = load_model_and_data(path, device)
    config = config_from_dict(json.loads(state["train_config"]))
    scores = evaluate(model, data.val, data.meta["val_bytes"], model.config.block_size, config.eval_batch_size, device)
    return {"step": state["step"], **scores}


def pretrained_checkpoint(preset: str = "tiny") -> Path:
    """The best.pt of a finished run of the `preset` recipe, trained on first use and cached
    in runs/pretrained-<preset>/, so later chapters start from a pretrained model on a fresh
    clone. In quick mode ($LILLLM_QUICK, the tests) a 30-step run is cached apart, in
    runs/pretrained-<preset>-quick/."""
    from lilllm.notebook import quick_mode

    name = f"pretrained-{preset}" + ("-quick" if quick_mode() else "")
    final = RUNS_DIR / name
    quick_settings = ["--steps=30", "--warmup=5", "--eval_interval=0"] if quick_mode() else []
    wanted = {**make_config(preset, quick_settings).to_dict(), "out_dir": None}  # wherever it was trained
    if not (final / BEST).exists() or _settings_of(final) != wanted:
        shutil.rmtree(final, ignore_errors=True)  # an unfinished run, or one of an older recipe
        print(f"training the {preset} recipe once, into {_shown(final)} (later calls reuse it)", flush=True)
        # Trained beside and renamed when done: a parallel caller never sees half a run.
        temp = RUNS_DIR / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        train(make_config(preset, [f"--out_dir={temp}", *quick_settings]), progress=False)
        try:
            os.replace(temp, final)
        except OSError:  # another process finished first: keep its run
            shutil.rmtree(temp, ignore_errors=True)
        print(f"cached: {_shown(final / BEST)}", flush=True)  # the lines above named the temporary folder
    return final / BEST


def _settings_of(run_dir: Path) -> dict | None:
    """The settings a finished run was trained with, out_dir left out (a cached run is trained
    in a temporary folder), or None if it has no readable config.json."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text())["train"]
    except (OSError, ValueError, KeyError):
        return None
    return {**saved, "out_dir": None}

# --- the benchmark: nanoGPT's CPU recipe vs the course default at equal time ---------------

def matmul_flops(device="cpu", size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's matrix-multiply throughput in FLOP/s (fp32 on CPU, bf16 on CUDA): the
    ceiling that model FLOPs utilization (MFU) is measured against."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync()
    return 2 * size**3 * count / (time.perf_counter() - start)


def bench_pretrain(long: bool = False, steps: int | None = None, device: str | None = None) -> dict:
    """Train `nanogpt-cpu`, then the `tiny` recipe for the same training time (then `long`
    for its ten minutes, if asked), in throwaway folders; evaluate each on the whole val split.
    `steps` shortens the nanoGPT run (for a quick check of the harness)."""
    import tempfile

    peak = matmul_flops(pick_device(device))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name, *overrides):
            config = make_config(name, [f"--out_dir={tmp}/{name}", "--eval_interval=0", *overrides]
                                 + ([f"--device={device}"] if device else []))
            summary = train(config, progress=False).summary
            summary["mfu"] = summary["flops_per_token"] * summary["tokens_per_s"] / peak
            results[name] = summary
            return summary

        start = time.perf_counter()
        reference = run("nanogpt-cpu", *([f"--steps={steps}"] if steps else []))
        run("tiny", f"--time_budget={reference['train_time_s']}", "--steps=1000000000")
        if long:
            run("long")
        wall = time.perf_counter() - start
    line = {
        "nanogpt_cpu_bpb": results["nanogpt-cpu"]["val_bpb"], "default_bpb": results["tiny"]["val_bpb"],
        "nanogpt_cpu_bytes_s": results["nanogpt-cpu"]["bytes_per_s"], "default_bytes_s": results["tiny"]["bytes_per_s"],
        "default_mfu": results["tiny"]["mfu"], "wall_s": wall,
    }
    if long:
        line["long_bpb"] = results["long"]["best_val_bpb"]
    return {"runs": results, "matmul_flops": peak, "line": line}
