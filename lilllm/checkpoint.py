"""Checkpoints: a trained model in one file, with everything needed to use it again.

A checkpoint holds the weights, the model's config and the tokenizer the model was trained
with, so that loading a model (`load_model`) needs nothing else: not the token files, not
data/, not the settings of the run. A training run adds what it needs to resume (optimizer
state, step, random generators), a fine-tuned one the name of its chat template.

Only tensors and plain values go in (configs and the tokenizer as JSON strings), so a
checkpoint loads with torch.load(weights_only=True): loading one can never run code. It is
written atomically: a crash while writing leaves the previous checkpoint whole.
"""

import json
from pathlib import Path

import torch

from lilllm import LilllmError
from lilllm.config import ModelConfig
from lilllm.model import GPT
from lilllm.runtime import pick_device, write_atomically
from lilllm.tokenizer import Tokenizer, tokenizer_from_dict

FORMAT = "lilllm-checkpoint-2"  # 2: the tokenizer travels inside (1 named the token files instead)
REQUIRED = ("model", "model_config", "tokenizer")


def save_checkpoint(path, model: GPT, tokenizer: Tokenizer, **entries) -> Path:
    """Write the model, its config and its tokenizer to `path`, with `entries` (tensors and
    plain values: a step, an optimizer's state dict, a chat template's name...)."""
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "model_config": model.config.to_json(),
        "tokenizer": json.dumps(tokenizer.to_dict()),
        **entries,
    }
    return write_atomically(path, lambda file: torch.save(state, file))


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint's contents, with a one-line error if it is missing, truncated, not ours,
    of an older format or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise LilllmError(f"checkpoint {path} is missing: train one with `lilllm train`")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated zip, a pickle error, an unsafe object ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LilllmError(f"checkpoint {path} is corrupt or truncated ({reason}): use another checkpoint "
                          "or train again") from None
    if isinstance(state, dict) and state.get("format") == "lilllm-checkpoint-1":
        raise LilllmError(f"checkpoint {path} was written by an older lilllm (format 1, without its tokenizer): "
                          "train it again with `lilllm train`")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise LilllmError(f"{path} is not a lilllm checkpoint (format {FORMAT})")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise LilllmError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete; use another checkpoint "
                          "or train again")
    return state


def load_model(path, device=None) -> tuple[GPT, Tokenizer, dict]:
    """The model of a checkpoint (in eval mode, on `device`: default the best available), the
    tokenizer it was trained with, and the checkpoint's contents. Everything is checked: a
    config that cannot describe a model, a tokenizer that does not match its fingerprint, or
    weights that do not fit the config are each reported in one line."""
    device = pick_device(device)
    state = load_checkpoint(path, device)
    try:
        config = ModelConfig.from_json(state["model_config"])
    except LilllmError as err:
        raise LilllmError(f"checkpoint {path} holds a bad model config: {err}") from None
    try:
        content = json.loads(state["tokenizer"])
    except (TypeError, json.JSONDecodeError):
        content = None
    tokenizer = tokenizer_from_dict(content, where=f"the tokenizer in checkpoint {path}")
    if tokenizer.vocab_size != config.vocab_size:
        raise LilllmError(f"checkpoint {path} is inconsistent: its tokenizer has {tokenizer.vocab_size} tokens, "
                          f"its model config {config.vocab_size}")
    model = GPT(config)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as err:  # missing, unexpected or mis-shaped weights
        reason = " ".join(str(err).split())[:300]
        raise LilllmError(f"checkpoint {path}: the weights do not match the stored model config ({reason}); "
                          "use another checkpoint or train again") from None
    return model.to(device).eval(), tokenizer, state


def check_resumable(state: dict, path, tokenizer: Tokenizer, model_config: ModelConfig, train_config: dict,
                    resumable: tuple[str, ...], defaults: dict | None = None) -> None:
    """Refuse to continue checkpoint `state` with another tokenizer, model or training settings
    (those named in `resumable` may change: more steps, another device...). A setting added to
    the code since the checkpoint was saved counts as its value in `defaults`."""
    fix = "resume with the settings it was trained with, or start a new run with another --out-dir"
    saved_fingerprint = json.loads(state["tokenizer"])["fingerprint"]
    if saved_fingerprint != tokenizer.fingerprint:
        raise LilllmError(f"checkpoint {path} was trained with another tokenizer (fingerprint {saved_fingerprint}, "
                          f"the data's is {tokenizer.fingerprint}): {fix}")
    saved, current = json.loads(state["model_config"]), model_config.to_dict()
    changed = sorted(k for k in saved if saved[k] != current.get(k))
    if changed:
        raise LilllmError(f"checkpoint {path} has another model config ({', '.join(changed)} differ): {fix}")
    saved = {**(defaults or {}), **json.loads(state["train_config"])}
    changed = sorted(k for k, v in train_config.items() if k not in resumable and saved.get(k) != v)
    if changed:
        raise LilllmError(f"checkpoint {path} was trained with other settings ({', '.join(changed)} differ): {fix}")
