"""Supervised fine-tuning (SFT): teach a pretrained model to answer in a chat format.

    from lilllm.course import pretrained_checkpoint
    from lilllm.next_speaker import chat_dataset
    from lilllm.sft import finetune
    files = chat_dataset()
    result = finetune(pretrained_checkpoint(), files["train"], files["val"])

1. A conversation is rendered with its loss mask (`lilllm.chat.render_conversation`).
2. Targets are the ids shifted left by one, with unsupervised positions set to -100, the
   ignore index of the model's cross-entropy: the loss is the mean over supervised tokens.
   A conversation longer than the context (block_size + 1 tokens) is rejected with an error,
   never truncated: a cut could drop the very answer the example is for.
3. A copy drill before fine-tuning (optional): random token sequences shown twice, the loss on
   the second copy, with rows of ordinary text mixed in if asked (`text_rows`). A model
   pretrained for minutes cannot copy a name it has never seen (it has no induction heads);
   after a few thousand drill steps it can. `copy_drill_checkpoint` caches the drilled model,
   keyed by the starting checkpoint and the drill's settings.
4. Fine-tuning and the drill run the trainer's own step (`lilllm.train.train_step`): the
   same optimizer, clipping, NaN check and after-step updates as pretraining, with the
   pretrained run's settings. The checkpoint names its chat template, so `lilllm chat` uses it.
5. Evaluation: exact-match accuracy of greedy answers, generated with `lilllm.sampling`, or
   per item in one forward pass (`greedy_hits`); two models compared on the same items with a
   paired bootstrap and a sign-flip test (`paired_difference`).
6. LoRA (`lora_rank` > 0): only low-rank adapters on the chosen projections are trained
   (`lilllm.layers.lora`), and the modules of `lora_full` in full. out_dir/adapter.pt keeps them
   alone, a small file; last.pt holds the model with them folded into its weights, an ordinary
   checkpoint.
7. A run is reused when asked (`reuse=True`): out_dir keeps the key it was trained for (the
   starting checkpoint's and the data's sha256, the settings), and an equal key loads it.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lilllm import LilllmError
from lilllm.chat import (
    BEGIN,
    TEMPLATE_NAME,
    chat_prompt,
    load_conversations,
    render_conversation,
    stop_ids,
)
from lilllm.checkpoint import load_model, save_checkpoint
from lilllm.config import check_keys
from lilllm.data import get_batch
from lilllm.layers.lora import add_lora, lora_state_dict, merge_lora
from lilllm.model import GPT, IGNORE_INDEX, summed_cross_entropy
from lilllm.progress import read_metrics
from lilllm.runtime import (
    REPO_ROOT,
    autocast_context,
    repo_path,
    shown,
    write_atomically,
)
from lilllm.sampling import generate
from lilllm.tokenizer import Tokenizer
from lilllm.train import (
    LAST,
    METRICS,
    learning_rate,
    load_data,
    make_optimizer,
    saved_config,
    train_step,
)

RECIPE = 1  # bumped when a drill or fine-tuning with the same settings would come out different
KEY_FILE = "run_key.json"  # what a finished run in out_dir was trained for
ADAPTER = "adapter.pt"  # a LoRA run's adapters alone
DRILL_ROOT = REPO_ROOT / "runs"  # where copy_drill_checkpoint caches drilled models

# --- training pairs ---------------------------------------------------------------------------


def training_pair(ids: list[int], mask: list[int], block_size: int, loss_on: str = "assistant"):
    """(inputs, targets) of one rendered conversation: inputs = ids[:-1], targets = ids[1:]
    with the targets the mask leaves out set to -100 (loss_on="all" keeps every target: the
    ablation). A conversation that does not fit the context is an error, not a truncation."""
    if len(ids) > block_size + 1:
        raise LilllmError(f"a conversation of {len(ids)} tokens does not fit the model's context of {block_size} "
                          f"(+1 for the last target): shorten it, or drop it from the data")
    if loss_on not in ("assistant", "all"):
        raise LilllmError(f"loss_on={loss_on!r}: use assistant (the SFT loss) or all (every token, the ablation)")
    targets = [t if (m or loss_on == "all") else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]  # mask shifts with ids
    return ids[:-1], targets


def collate(pairs, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch (B, T) from (inputs, targets) pairs of different lengths, padded on the right
    to the longest: inputs with `pad_id`, targets with -100, so padding is never scored."""
    T = max(len(x) for x, _ in pairs)
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (inputs, targets) in enumerate(pairs):
        x[row, :len(inputs)] = torch.tensor(inputs)
        y[row, :len(targets)] = torch.tensor(targets)
    return x, y


@torch.no_grad()
def supervised_loss(model: GPT, batches) -> float:
    """Mean cross-entropy over the supervised targets of `batches` of (x, y): every
    supervised token weighs the same, however the tokens fall into rows and batches."""
    was_training = model.training
    model.eval()
    nats, count = 0.0, 0
    for x, y in batches:
        with autocast_context(x.device):
            logits, _ = model(x)  # (B, T, vocab)
        nats += summed_cross_entropy(logits, y).item()
        count += (y != IGNORE_INDEX).sum().item()
    model.train(was_training)
    return nats / max(count, 1)


# --- the loop fine-tuning and the copy drill share ------------------------------------------------

@dataclass
class SFTResult:
    model: GPT
    tokenizer: Tokenizer
    records: list[dict]  # the metrics: train loss per step, then a record per evaluation
    checkpoint: Path


def _fit(model: GPT, tokenizer: Tokenizer, state: dict, settings: dict, draw_batch, evaluate, out_dir, log,
         extra: dict, finish=None) -> SFTResult:
    """Train `model` (loaded from the checkpoint `state`) with the pretrained run's settings
    updated with `settings`: one `train_step` per batch that `draw_batch(generator)` gives.
    `evaluate()`: a dict of measurements (or None) at step 0 and every eval_interval steps.
    `finish(model)`, if given, runs before the model is saved. Writes out_dir/last.pt (with
    `extra` in it) and out_dir/metrics.jsonl."""
    # The checkpoint stays a lilllm checkpoint that `lilllm chat` and `lilllm eval` load like any other.
    config = saved_config({**json.loads(state["train_config"]), "out_dir": str(out_dir), "time_budget": None,
                           "grad_accum": 1, **settings})
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    records, out = [], repo_path(out_dir)

    def evaluate_at(step) -> str:
        scores = evaluate()
        if scores is not None:
            records.append({"step": step, "split": "val", **scores})
        return "".join(f", val {name} {value:.3f}" for name, value in (scores or {}).items())

    model.train()
    evaluate_at(0)
    start, train_time = time.perf_counter(), 0.0  # train_time: seconds in training steps, evaluations left out
    for step in range(1, config.steps + 1):
        step_start = time.perf_counter()
        x, y = (t.to(device) for t in draw_batch(generator))  # (B, T) each
        metrics = train_step(model, optimizer, [(x, y)], learning_rate(step - 1, config), config, step - 1)
        train_time += time.perf_counter() - step_start
        records.append({"step": step, "split": "train", "loss": metrics["loss"], "time_s": train_time})
        if step % config.eval_interval == 0 or step == config.steps:
            shown = evaluate_at(step)
            log(f"step {step:>5} of {config.steps} | loss {metrics['loss']:.3f}{shown} | "
                f"{time.perf_counter() - start:.0f} s")
    if finish is not None:
        finish(model)
    checkpoint = save_checkpoint(out / LAST, model, tokenizer, step=config.steps,
                                 train_config=json.dumps(config.to_dict()), **extra)
    write_atomically(out / METRICS, "".join(json.dumps(r) + "\n" for r in records))
    return SFTResult(model.eval(), tokenizer, records, checkpoint)


def _settings(cls, changes: dict):
    """The settings dataclass `cls` with `changes`, unknown names refused."""
    check_keys(cls, changes, f"the {cls.__name__}")
    settings = cls(**changes)
    if settings.steps <= 0 or settings.batch_size <= 0 or settings.eval_interval <= 0:
        raise LilllmError("steps, batch_size and eval_interval must be positive")
    return settings


def _sha256(path) -> str:
    return hashlib.sha256(repo_path(path).read_bytes()).hexdigest()


def _run_key(kind: str, init, settings: dict, files=()) -> dict:
    """What a run's result depends on: its kind, the code's recipe, the starting checkpoint's
    and the data files' contents, and the settings."""
    return {"kind": kind, "recipe": RECIPE, "init": _sha256(init), "data": [_sha256(f) for f in files],
            "settings": settings}


def _cached(out_dir, key: dict, device) -> SFTResult | None:
    """The finished run in out_dir if it was trained for `key`, else None."""
    out = repo_path(out_dir)
    try:
        if json.loads((out / KEY_FILE).read_text()) != key or not (out / LAST).exists():
            return None
    except (OSError, ValueError):
        return None
    model, tokenizer, _ = load_model(out / LAST, device)
    return SFTResult(model.eval(), tokenizer, read_metrics(out), out / LAST)


def _keyed(out_dir, key: dict, reuse: bool, device, train) -> SFTResult:
    """`train()`'s result, or with `reuse` the run already in out_dir if trained for `key`;
    the key is written once the run has finished."""
    if reuse and (result := _cached(out_dir, key, device)) is not None:
        return result
    (repo_path(out_dir) / KEY_FILE).unlink(missing_ok=True)  # out_dir is being overwritten
    result = train()
    write_atomically(repo_path(out_dir) / KEY_FILE, json.dumps(key))
    return result


# --- a copy drill: teaching the model to copy before it fine-tunes ------------------------------

@dataclass
class CopyDrill:
    """The copy drill's settings. The drill loss sits near chance for ~2,500 steps, then
    copying appears within a few hundred."""

    steps: int = 4000
    batch_size: int = 16  # copy rows per step
    text_rows: int = 0  # rows of ordinary train text per step, every token scored: the language model is kept
    text_twice: bool = False  # each text row a passage shown twice: copying real text is rewarded too
    lr: float = 1e-3  # constant after a short warmup, without weight decay: nothing pulls the circuit back
    eval_interval: int = 250
    seed: int = 0


COPY_STEPS = CopyDrill.steps


def copy_drill_batch(batch_size: int, block_size: int, vocab_size: int, generator: torch.Generator):
    """(x, y) of the copy drill, (B, T) each. A row is a random token sequence s of 8 to
    block_size/2 tokens, s again, then random filler. The targets are the second copy from its
    second token on (its first token has nothing before it to match); all others are -100.
    Nothing but copying predicts them: the drill rewards an induction head and nothing else."""
    x = torch.randint(vocab_size, (batch_size, block_size + 1), generator=generator)  # (B, T + 1), filler
    y = torch.full((batch_size, block_size), IGNORE_INDEX)  # (B, T)
    for row in range(batch_size):
        n = int(torch.randint(8, block_size // 2, (1,), generator=generator))
        x[row, n:2 * n] = x[row, :n]  # the second copy
        y[row, n:2 * n - 1] = x[row, n + 1:2 * n]  # position t predicts token t + 1
    return x[:, :-1], y


def text_batch(tokens, rows: int, block_size: int, generator: torch.Generator, twice: bool = False):
    """(x, y) of `rows` rows of ordinary text, (rows, T) each, every target scored: random
    windows of `tokens`, or (`twice`) a passage of block_size/2 tokens shown twice in a row, so
    that the first copy trains the language model and the second rewards copying real text."""
    if not twice:
        return get_batch(tokens, rows, block_size, generator)
    half = block_size // 2
    x, y = get_batch(tokens, rows, half, generator)  # (rows, half) each
    passage = torch.cat([x, y[:, -1:]], dim=1)  # (rows, half + 1)
    rows_ = torch.cat([passage[:, :half], passage, passage[:, :block_size - 2 * half]], dim=1)  # (rows, T + 1)
    return rows_[:, :-1], rows_[:, 1:]


@torch.no_grad()
def repeat_accuracy(model: GPT, tokens: torch.Tensor, n: int = 32, length: int = 30, seed: int = 0) -> tuple[float, float]:
    """Greedy next-token accuracy on the first and on the second copy of n passages of `tokens`
    (random starts) shown twice in a row. A model that can copy gets the second almost free."""
    was_training = model.training
    model.eval()
    starts = torch.randint(len(tokens) - length, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    passages = torch.stack([tokens[s:s + length] for s in starts])  # (n, length)
    x = torch.cat([passages, passages], dim=1).to(next(model.parameters()).device)  # (n, 2 * length)
    with autocast_context(x.device):
        logits, _ = model(x[:, :-1])  # (n, 2 * length - 1, vocab)
    hits = (logits.argmax(-1) == x[:, 1:]).float()  # (n, 2 * length - 1): position t predicts token t + 1
    model.train(was_training)
    # the first copy's own tokens, and the second copy's after its first (which no copying can predict)
    return hits[:, :length - 1].mean().item(), hits[:, length:].mean().item()


def teach_copying(init, *, out_dir="runs/copy-drill", device: str | None = None, log=print, reuse: bool = False,
                  **changes) -> SFTResult:
    """Train the model of checkpoint `init` on the copy drill (settings: `CopyDrill`, changed
    by keyword): copy rows, and `text_rows` rows of the pretraining text if asked. Every
    `eval_interval` steps: the repeat accuracy on the second copy of fixed random sequences.
    Writes out_dir/last.pt, a checkpoint `finetune` can start from (`reuse`: see the module)."""
    drill = _settings(CopyDrill, changes)
    key = _run_key("copy-drill", init, asdict(drill))
    return _keyed(out_dir, key, reuse, device, lambda: _drill(init, drill, out_dir, device, log))


def _drill(init, drill: CopyDrill, out_dir, device, log) -> SFTResult:
    model, tokenizer, state = load_model(init, device)
    vocab_size, block_size = tokenizer.ordinary_vocab_size, model.config.block_size
    probe = torch.randint(vocab_size, (4096,), generator=torch.Generator().manual_seed(drill.seed + 1))  # never trained on
    settings = {k: v for k, v in asdict(drill).items() if k not in ("text_rows", "text_twice")}
    settings = {**settings, "min_lr": drill.lr, "warmup": 50, "weight_decay": 0.0}
    text = load_data(saved_config(json.loads(state["train_config"]))).train if drill.text_rows else None

    def draw_batch(generator):
        x, y = copy_drill_batch(drill.batch_size, block_size, vocab_size, generator)  # (B, T) each
        if text is None:
            return x, y
        x_text, y_text = text_batch(text, drill.text_rows, block_size, generator, drill.text_twice)  # (text_rows, T)
        return torch.cat([x, x_text]), torch.cat([y, y_text])

    return _fit(model, tokenizer, state, settings, draw_batch,
                evaluate=lambda: {"repeat_accuracy": repeat_accuracy(model, probe)[1]},
                out_dir=out_dir, log=log, extra={"copy_drill_steps": drill.steps})


def copy_drill_checkpoint(init, *, device: str | None = None, log=print, **changes) -> Path:
    """The checkpoint of the copy drill (settings: `CopyDrill`, changed by keyword) run on the
    model of checkpoint `init`: drilled on first use, then cached in runs/copy-drill-<key>/,
    named by a hash of the starting checkpoint's contents and the settings (like the pretrained
    model of `lilllm.course`), so `lilllm sft` does not drill again."""
    key = _run_key("copy-drill", init, asdict(_settings(CopyDrill, changes)))
    out_dir = DRILL_ROOT / f"copy-drill-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
    if (cached := _cached(out_dir, key, device)) is not None:
        log(f"the copy drill is cached in {shown(out_dir)}: reusing it")
        return cached.checkpoint
    log(f"the copy drill, {key['settings']['steps']} steps, into {shown(out_dir)} (later calls reuse it)")
    return teach_copying(init, out_dir=out_dir, device=device, log=log, **changes).checkpoint


# --- fine-tuning ----------------------------------------------------------------------------------

@dataclass
class Finetune:
    """Fine-tuning's settings (`lilllm sft` shows these defaults)."""

    steps: int = 2000
    batch_size: int = 16  # conversations per step
    lr: float = 3e-3  # the peak; a cosine down to lr / 10
    warmup: int = 20
    loss_on: str = "assistant"  # assistant: the SFT loss; all: every token (the ablation)
    eval_interval: int = 50
    eval_conversations: int = 128  # val conversations for the val loss, spread over the split
    seed: int = 0
    lora_rank: int = 0  # 0: full fine-tuning; r > 0: train rank-r LoRA adapters only, the rest frozen
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank; None: alpha = rank, scale 1 (paper, peft)
    lora_targets: str = "q_proj,v_proj"  # the projections to adapt, comma-separated: q and v, the paper's §7.1 finding
    # Modules that train in full beside the adapters, comma-separated (peft's modules_to_save). tok_emb: the token
    # embedding (and the head tied to it); a pretrained model never saw the chat template's tokens, and frozen
    # embeddings cannot learn what they mean.
    lora_full: str = ""

    def __post_init__(self):
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise LilllmError(f"lora_rank={self.lora_rank!r}: use 0 for full fine-tuning, or a rank such as 8 for LoRA")
        if not self.lora_rank and (self.lora_alpha is not None or self.lora_full):
            raise LilllmError("lora_alpha or lora_full is set but lora_rank is 0 (full fine-tuning): give a rank too")


def finetune(init, train_file, val_file=None, *, out_dir="runs/sft", device: str | None = None, log=print,
             reuse: bool = False, **changes) -> SFTResult:
    """Fine-tune the model of checkpoint `init` on the conversations of `train_file` (settings:
    `Finetune`, changed by keyword): random batches of conversations, the loss on the
    assistant's tokens (or on all, loss_on="all"). Every `eval_interval` steps the loss on the
    assistant tokens of `eval_conversations` spread over `val_file`. Writes out_dir/last.pt
    (naming the chat template) and out_dir/metrics.jsonl (`reuse`: see the module)."""
    sft = _settings(Finetune, changes)  # LoRA targets are checked when _finetune adds them, before training
    # full fine-tuning keeps the key it had before LoRA came, so its finished runs are still reused
    settings = asdict(sft) if sft.lora_rank else {k: v for k, v in asdict(sft).items() if not k.startswith("lora_")}
    key = _run_key("finetune", init, settings, [f for f in (train_file, val_file) if f is not None])
    return _keyed(out_dir, key, reuse, device, lambda: _finetune(init, train_file, val_file, sft, out_dir, device, log))


def check_finetune(init, **changes) -> Finetune:
    """Fine-tuning's settings (`Finetune`, changed by keyword), checked; LoRA's on the model of
    `init`, whose layers the targets must name. Bad input fails here, before any training."""
    sft = _settings(Finetune, changes)
    if sft.lora_rank:
        _add_adapters(load_model(init, "cpu")[0], sft)
    return sft


def _add_adapters(model: GPT, sft: Finetune) -> dict:
    """Wrap the target projections of `model` in LoRA adapters and freeze the rest, except the
    modules of lora_full; the LoRA settings."""
    alpha = float(sft.lora_rank if sft.lora_alpha is None else sft.lora_alpha)
    targets = [name.strip() for name in sft.lora_targets.split(",")]
    full = [name.strip() for name in sft.lora_full.split(",") if name.strip()]
    for name in full:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise LilllmError(f"lora_full: the model has no module {name!r} (tok_emb is the token embedding)") from None
    add_lora(model, targets, sft.lora_rank, alpha)
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    return {"rank": sft.lora_rank, "alpha": alpha, "targets": targets, "full": full,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _save_adapters_and_merge(model: GPT, lora: dict, init, out_dir, log) -> None:
    """Write the adapters alone to out_dir/adapter.pt (with their settings and the starting
    checkpoint they adapt), then fold them into the weights: the model is the plain one again."""
    trained_in_full = {f"{name}.{key}": value for name in lora["full"]
                       for key, value in model.get_submodule(name).state_dict().items()}
    adapters = {"lora": lora_state_dict(model), "full": trained_in_full, "settings": lora, "init": str(init)}
    path = write_atomically(repo_path(out_dir) / ADAPTER, lambda file: torch.save(adapters, file))
    log(f"wrote the adapters to {shown(path)} ({path.stat().st_size / 1024:.0f} KiB); last.pt has them merged")
    merge_lora(model)
    model.requires_grad_(True)  # as load_model gives it


def _finetune(init, train_file, val_file, sft: Finetune, out_dir, device, log) -> SFTResult:
    model, tokenizer, state = load_model(init, device)
    extra, finish = {"chat_template": TEMPLATE_NAME, "sft_loss_on": sft.loss_on}, None
    if sft.lora_rank:
        extra["sft_lora"] = lora = _add_adapters(model, sft)
        log(f"LoRA rank {lora['rank']}, alpha {lora['alpha']:g} on {', '.join(lora['targets'])}"
            f"{''.join(f', {name} in full' for name in lora['full'])}: "
            f"{lora['trainable_parameters']:,} trainable parameters of {sum(p.numel() for p in model.parameters()):,}")

        def finish(trained):
            _save_adapters_and_merge(trained, lora, init, out_dir, log)
    device, block_size, pad_id = next(model.parameters()).device, model.config.block_size, tokenizer.special_ids[BEGIN]

    def pairs(conversations, loss_on):
        return [training_pair(*render_conversation(tokenizer, c), block_size, loss_on) for c in conversations]

    train_pairs = pairs(load_conversations(train_file), sft.loss_on)
    val = load_conversations(val_file) if val_file else []
    val_pairs = pairs(val[::max(1, len(val) // sft.eval_conversations)][:sft.eval_conversations], "assistant")  # spread
    val_batches = [tuple(t.to(device) for t in collate(val_pairs[i:i + 32], pad_id)) for i in range(0, len(val_pairs), 32)]

    def draw_batch(generator):
        rows = torch.randint(len(train_pairs), (sft.batch_size,), generator=generator).tolist()
        return collate([train_pairs[r] for r in rows], pad_id)

    settings = {"steps": sft.steps, "batch_size": sft.batch_size, "lr": sft.lr, "min_lr": sft.lr / 10, "schedule": "cosine",
                "warmup": sft.warmup, "eval_interval": sft.eval_interval, "seed": sft.seed}
    return _fit(model, tokenizer, state, settings, draw_batch,
                evaluate=lambda: {"loss": supervised_loss(model, val_batches)} if val_batches else None,
                out_dir=out_dir, log=log, extra=extra, finish=finish)


# --- evaluation -------------------------------------------------------------------------------------

def answer(model: GPT, tokenizer: Tokenizer, messages, template=chat_prompt, max_new_tokens: int = 12) -> str:
    """The model's greedy reply to `messages` (ending with a user message), stopped at <|end|>
    or <|endoftext|>."""
    ids = generate(model, template(tokenizer, messages), max_new_tokens, temperature=0, stop_ids=stop_ids(tokenizer))
    return tokenizer.decode(ids).strip()


def exact_match(model: GPT, tokenizer: Tokenizer, conversations, template=chat_prompt) -> dict:
    """Accuracy of the model's answer to each conversation's last assistant message, given
    the messages before it: {"accuracy", "predictions"}."""
    predictions = [answer(model, tokenizer, c[:-1], template) for c in conversations]
    hits = [p == c[-1]["content"] for p, c in zip(predictions, conversations)]
    return {"accuracy": sum(hits) / len(hits), "predictions": predictions}


@torch.no_grad()
def greedy_hits(model: GPT, tokenizer: Tokenizer, conversations, max_new_tokens: int = 12,
                batch_size: int = 64) -> list[bool]:
    """Per conversation, whether greedy decoding (`answer`) replies with exactly its last
    assistant message, found in one forward pass: greedy decoding writes the reply iff each of
    its tokens, and then <|end|>, is the most probable next token given the reply so far, which
    is what teacher forcing shows at once. (A reply spelt in other tokens than the tokenizer's
    own is counted wrong here; `exact_match` would count it right. It is rare.)"""
    model.eval()
    device, pad_id = next(model.parameters()).device, tokenizer.special_ids[BEGIN]
    rows = []
    for conversation in conversations:
        prompt = chat_prompt(tokenizer, conversation[:-1])
        ids, _ = render_conversation(tokenizer, conversation)
        reply = len(ids) - len(prompt)  # the reply's tokens and its <|end|>
        assert ids[:len(prompt)] == prompt, "the template renders the prompt as generation sees it"
        rows.append((ids, len(prompt), reply))
    hits = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        x, _ = collate([(ids[:-1], ids[1:]) for ids, _, _ in chunk], pad_id)  # (B, T)
        with autocast_context(device):
            logits, _ = model(x.to(device))  # (B, T, vocab)
        guesses = logits.argmax(-1).cpu()  # (B, T): the greedy next token at every position
        for row, (ids, start, reply) in enumerate(chunk):
            wanted = torch.tensor(ids[start:])  # position t predicts token t + 1
            hits.append(reply <= max_new_tokens and torch.equal(guesses[row, start - 1:len(ids) - 1], wanted))
    return hits


def paired_difference(a, b, resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare two models scored on the same items: `a` and `b` hold one score per item (a hit,
    0 or 1, or a mean over seeds). Returns the mean difference a - b, its 95% bootstrap
    interval (items resampled with replacement, the pairs kept together), and the two-sided
    p-value of a sign-flip test: how often flipping the sign of each item's difference at
    random gives a mean at least as far from zero (no difference: either sign is as likely)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # (items,)
    generator = torch.Generator().manual_seed(seed)
    means = d[torch.randint(len(d), (resamples, len(d)), generator=generator)].mean(1)  # (resamples,)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    signs = torch.randint(2, (resamples, len(d)), generator=generator) * 2 - 1  # (resamples, items)
    flipped = (signs * d).mean(1).abs()  # (resamples,)
    p = ((flipped >= d.mean().abs() - 1e-12).sum().item() + 1) / (resamples + 1)
    return {"difference": d.mean().item(), "low": low, "high": high, "p": p}
