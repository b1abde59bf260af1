"""Supervised fine-tuning (SFT): teach a pretrained model to answer in a chat format.

    from lilllm.sft import chat_dataset, finetune
    from lilllm.train import pretrained_checkpoint
    files = chat_dataset()
    result = finetune(pretrained_checkpoint(), files["train"], files["val"])

1. The chat template: every message is its role's special token, its text, then <|end|>;
   the conversation starts with <|endoftext|>. The special tokens are never produced by the
   BPE merges, and message texts are encoded with specials off, so a message can never forge
   a role marker.
2. The loss mask is built while rendering, not searched for afterwards: the renderer knows
   which message each token came from. It is 1 on the assistant's text and its <|end|> (the
   model must learn what to say and when to stop), 0 on everything else.
3. Targets are the ids shifted left by one, with unsupervised positions set to -100, the
   ignore index of the model's cross-entropy: the loss is the mean over supervised tokens.
   A conversation longer than the context (block_size + 1 tokens) is rejected with an error,
   never truncated: a cut could drop the very answer the example is for.
4. The data: a chat dataset built from tiny-shakespeare, "who speaks next?" over a short
   excerpt of a scene. The answer is usually a name in the excerpt (75% of val answers), a
   skill that carries over to the val split's other plays, whose speakers are mostly new.
   Train conversations come from the train split only, with their speakers disguised as
   random others (other speakers, or invented names) so that memorising who speaks in which
   play does not pay; val conversations come from the val split only, as they are. JSONL
   files under data/sft/, read with `datasets`.
5. A copy drill before fine-tuning: random token sequences shown twice, the loss on the second
   copy. A model pretrained for minutes cannot copy a name it has never seen (it has no
   induction heads); after a few thousand drill steps it can, and the answers are names to copy.
6. Fine-tuning from a checkpoint with the trainer's optimizer, schedule, clipping and
   checkpoint format; the checkpoint names its chat template, so `lilllm chat` uses it.
7. Evaluation: exact-match accuracy of greedy answers, generated with `lilllm.sampling`; the
   choice among the excerpt's speakers by likelihood (spelling aside); and answers without a
   model, among them the order rule, the best that who-spoke-when alone can tell.
"""

import json
import math
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.data import DATA_DIR, _datasets, load_text, train_val_split
from lilllm.env import autocast_context, pick_device
from lilllm.model import GPT
from lilllm.tokenizer import Tokenizer
from lilllm.train import (LAST, METRICS, clip_gradients, config_from_dict, learning_rate, load_data,
                          load_model_and_tokenizer, make_optimizer, out_path, save_checkpoint)

# --- the chat template -----------------------------------------------------------------

TEMPLATE_NAME = "lilllm"  # the name under which `lilllm.sampling.chat_template` finds it
BEGIN, END = "<|endoftext|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
IGNORE_INDEX = -100  # the model's cross-entropy skips targets equal to this


def check_conversation(messages, need_assistant: bool = True) -> None:
    """Raise a LilllmError unless `messages` is a list of {"role", "content"} messages with
    known roles, a system message only first, and (for training) an assistant message."""
    if not isinstance(messages, list) or not messages:
        raise LilllmError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise LilllmError(f"message {i} is not a {{'role': ..., 'content': <text>}} dict: {message!r}")
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise LilllmError(f"message {i} has unknown role {role!r}: use one of {', '.join(ROLE_TOKENS)}")
        if role == "system" and i > 0:
            raise LilllmError(f"message {i} is a system message: a system message may only come first")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LilllmError("the conversation has no assistant message: there is nothing to learn from it")


def render_conversation(tokenizer: Tokenizer, messages, need_assistant: bool = True) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: <|endoftext|>, then <|role|> text <|end|> per message.
    mask[t] = 1 iff token t is assistant text or the assistant's <|end|>."""
    check_conversation(messages, need_assistant)
    special = tokenizer.special_ids
    ids, mask = [special[BEGIN]], [0]
    for message in messages:
        text = tokenizer.encode(message["content"])  # specials off: the text cannot forge a role marker
        supervised = int(message["role"] == "assistant")
        ids += [special[ROLE_TOKENS[message["role"]]], *text, special[END]]
        mask += [0] + [supervised] * (len(text) + 1)  # the role marker is given, never learned
    return ids, mask


def chat_prompt(tokenizer: Tokenizer, messages) -> list[int]:
    """The ids a model continues with the assistant's next reply: the conversation so far,
    then <|assistant|>. The reply ends at <|end|> (`lilllm.sampling.stop_ids_of`)."""
    ids, _ = render_conversation(tokenizer, messages, need_assistant=False)
    return ids + [tokenizer.special_ids[ROLE_TOKENS["assistant"]]]


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


# --- the chat dataset: "who speaks next?" ------------------------------------------------

SFT_DIR = DATA_DIR / "sft" / "next-speaker"
QUESTION = "Who speaks next?"
CONTEXT_TURNS = 4  # turns in an excerpt; the next speaker is among them 75% of the time (val)
DISGUISES = 4  # copies of each train conversation, its speakers renamed at random each time
DATASET_RECIPE = 3  # bumped when the files would come out different: chat_dataset() rebuilds them
_TURN = re.compile(r"([A-Z][A-Za-z' ]*):\n(.+)", re.DOTALL)


def parse_turns(text: str) -> list[tuple[str, str] | None]:
    """The speeches of a play text as (speaker, first line), in order; None where a block
    is not a speech (a break: no excerpt spans it)."""
    turns = []
    for block in text.split("\n\n"):
        match = _TURN.fullmatch(block.strip("\n"))
        turns.append((match[1], match[2].split("\n")[0]) if match else None)
    return turns


def next_speaker_conversations(text: str) -> list[dict]:
    """One conversation per speech that follows CONTEXT_TURNS speeches: the user shows them
    (speaker and first line each) and asks who speaks next; the assistant names the speaker."""
    turns = parse_turns(text)
    conversations = []
    for i in range(CONTEXT_TURNS, len(turns)):
        window = turns[i - CONTEXT_TURNS:i + 1]
        if None in window:
            continue
        excerpt = "\n\n".join(f"{name}:\n{line}" for name, line in window[:-1])
        conversations.append({"messages": [{"role": "user", "content": f"{excerpt}\n\n{QUESTION}"},
                                           {"role": "assistant", "content": window[-1][0]}]})
    return conversations


def excerpt_turns(conversation) -> list[tuple[str, str]]:
    """The (speaker, line) turns of a "who speaks next?" excerpt, in order."""
    excerpt = conversation[-2]["content"].removesuffix(QUESTION)
    return [tuple(turn.split(":\n", 1)) for turn in excerpt.strip().split("\n\n")]


def speakers_in(conversation) -> list[str]:
    """The speakers of a "who speaks next?" excerpt, in order."""
    return [speaker for speaker, _ in excerpt_turns(conversation)]


def answer_in_excerpt(conversation) -> bool:
    """Whether the answer of a "who speaks next?" conversation is a speaker of its excerpt."""
    return conversation[-1]["content"] in speakers_in(conversation)


def disguise_speakers(conversation: dict, names: list[str], rng: random.Random) -> dict:
    """The conversation with each speaker renamed to a different name drawn from `names`,
    consistently: in the excerpt's headings, where a line calls them by name, and in the answer."""
    turns, reply = excerpt_turns(conversation["messages"]), conversation["messages"][-1]["content"]
    old = list(dict.fromkeys([speaker for speaker, _ in turns] + [reply]))  # distinct, in order of appearance
    new = dict(zip(old, rng.sample(names, len(old))))
    called = {name.title(): name for name in old}  # a line says "Gremio" where the heading says "GREMIO"
    calls = re.compile("|".join(rf"\b{re.escape(title)}\b" for title in called))
    excerpt = "\n\n".join(f"{new[speaker]}:\n" + calls.sub(lambda m: new[called[m[0]]].title(), line)
                           for speaker, line in turns)
    return {"messages": [{"role": "user", "content": f"{excerpt}\n\n{QUESTION}"},
                         {"role": "assistant", "content": new[reply]}]}


def invented_names(tokenizer: Tokenizer, count: int = 20_000, seed: int = 0) -> list[str]:
    """Names no play has: 2 to 6 upper-case pieces of the BPE vocabulary, drawn at random and
    glued together (like BAPTISTA, which is 7 pieces). Nobody can have memorised how such a
    name goes on: a model that answers with one must copy it from the excerpt."""
    tokens = (tokenizer.decode([i]) for i in range(ordinary_vocab_size(tokenizer)))
    pieces = sorted({token for token in tokens if re.fullmatch("[A-Z]+", token)})
    rng, names = random.Random(seed), set()
    while len(names) < count:
        names.add("".join(rng.choice(pieces) for _ in range(rng.randint(2, 6))))
    return sorted(names)


def copying_conversations(text: str, invented: list[str], draws: int = DISGUISES, seed: int = 0) -> list[dict]:
    """The train conversations: those whose answer is a speaker of the excerpt, each `draws`
    times with the speakers disguised, half of the time as other speakers of the same text and
    half of the time as `invented` names. Who speaks in which play is useless on the val plays,
    so the names are shuffled away; what is left to learn is the skill that carries over: which
    speaker of the excerpt comes next, copied from the prompt."""
    speakers = sorted({turn[0] for turn in parse_turns(text) if turn})
    rng = random.Random(seed)
    conversations = [c for c in next_speaker_conversations(text) if answer_in_excerpt(c["messages"])]
    return [disguise_speakers(c, speakers if rng.random() < 0.5 else invented, rng)
            for c in conversations for _ in range(draws)]


def build_chat_dataset(tokenizer: Tokenizer, block_size: int, out_dir=SFT_DIR) -> dict[str, Path]:
    """Write train.jsonl (copying conversations from the train split) and val.jsonl (plain
    conversations from the val split only), keeping those that fit the context, and
    meta.json with what they were built for. Deterministic: same text, same files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_text, val_text = train_val_split(load_text())
    paths = {}
    train = copying_conversations(train_text, invented_names(tokenizer))
    for split, conversations in (("train", train), ("val", next_speaker_conversations(val_text))):
        fitting = [c for c in conversations if len(render_conversation(tokenizer, c["messages"])[0]) <= block_size + 1]
        paths[split] = out_dir / f"{split}.jsonl"
        temp = paths[split].with_name(f".{split}.jsonl.tmp")
        temp.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in fitting), encoding="utf-8")
        temp.replace(paths[split])
    (out_dir / "meta.json").write_text(json.dumps(_dataset_meta(tokenizer, block_size)))
    return paths


def _dataset_meta(tokenizer: Tokenizer, block_size: int) -> dict:
    return {"recipe": DATASET_RECIPE, "tokenizer": tokenizer.fingerprint, "block_size": block_size}


def chat_dataset(tokenizer: Tokenizer | None = None, block_size: int = 128) -> dict[str, Path]:
    """The course's chat dataset files {"train": path, "val": path}, built on first use and
    rebuilt when made for another tokenizer, context or version of the recipe."""
    if tokenizer is None:
        tokenizer = load_data(config_from_dict({})).tokenizer  # the course's BPE
    paths = {split: SFT_DIR / f"{split}.jsonl" for split in ("train", "val")}
    meta = SFT_DIR / "meta.json"
    if all(p.exists() for p in paths.values()) and meta.exists() and \
            json.loads(meta.read_text()) == _dataset_meta(tokenizer, block_size):
        return paths
    return build_chat_dataset(tokenizer, block_size)


def load_conversations(path) -> list[list[dict]]:
    """The conversations of a JSONL file, one {"messages": [...]} object per line, read with
    `datasets` (offline). Malformed lines are reported with their line numbers first."""
    path = Path(path)
    if not path.is_file():
        raise LilllmError(f"chat data file {path} is missing")
    problems = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check_conversation(record.get("messages") if isinstance(record, dict) else None)
        except (json.JSONDecodeError, LilllmError) as err:
            problems.append(f"line {number}: {str(err).splitlines()[0]}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise LilllmError(f"{path} has {len(problems)} malformed line(s): {'; '.join(problems[:5])}{more}; "
                          'each line must be {"messages": [{"role": ..., "content": ...}, ...]}')
    datasets = _datasets()
    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    if len(rows) == 0:
        raise LilllmError(f"chat data file {path} holds no conversations")
    return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in rows["messages"]]


# --- the training loop ---------------------------------------------------------------------

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
        nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += (y != IGNORE_INDEX).sum().item()
    model.train(was_training)
    return nats / max(count, 1)


@dataclass
class SFTResult:
    model: GPT
    tokenizer: Tokenizer
    records: list[dict]  # the metrics: train loss per step, then a record per evaluation
    checkpoint: Path


def _fit(model: GPT, tokenizer: Tokenizer, state: dict, settings: dict, draw_batch, evaluate, out_dir, log,
         extra: dict) -> SFTResult:
    """The loop fine-tuning and the copy drill share. AdamW with warmup and cosine decay and
    clipping, with the pretrained run's settings (from its checkpoint `state`) updated with
    `settings`; `draw_batch(generator)` gives each step's (x, y); `evaluate()` a dict of
    measurements (or None) at step 0 and every eval_interval steps. Writes out_dir/last.pt
    (with `extra` in it) and out_dir/metrics.jsonl."""
    # The checkpoint stays a valid lilllm checkpoint that `lilllm chat` and `lilllm eval` load like any other.
    config = config_from_dict({**json.loads(state["train_config"]), "out_dir": str(out_dir), "time_budget": None,
                               "grad_accum": 1, **settings})
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = make_optimizer(model, config)
    records, out = [], out_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def evaluate_at(step) -> str:
        scores = evaluate()
        if scores is not None:
            records.append({"step": step, "split": "val", **scores})
        return "".join(f", val {name} {value:.3f}" for name, value in (scores or {}).items())

    model.train()
    evaluate_at(0)
    start = time.perf_counter()
    for step in range(1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, config)
        x, y = (t.to(device) for t in draw_batch(generator))  # (B, T) each
        with autocast_context(device):
            _, loss = model(x, y)  # the mean over the batch's targets that are not -100
        if not math.isfinite(loss.item()):
            raise LilllmError(f"the loss is {loss.item()} at step {step}: lower the learning rate (now {config.lr})")
        loss.backward()
        clip_gradients(model, config)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append({"step": step, "split": "train", "loss": loss.item()})
        if step % config.eval_interval == 0 or step == config.steps:
            shown = evaluate_at(step)
            log(f"step {step:>5} of {config.steps} | loss {loss.item():.3f}{shown} | {time.perf_counter() - start:.0f} s")
    checkpoint = save_checkpoint(out / LAST, model=model, optimizer=optimizer, config=config,
                                 fingerprint=tokenizer.fingerprint, step=config.steps, best_val_bpb=None,
                                 generator=generator, clock={"train_time": time.perf_counter() - start, "warm_time": None},
                                 extra=extra)
    (out / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return SFTResult(model.eval(), tokenizer, records, checkpoint)


def _check_schedule(steps: int, batch_size: int, eval_interval: int) -> None:
    if steps <= 0 or batch_size <= 0 or eval_interval <= 0:
        raise LilllmError("steps, batch_size and eval_interval must be positive")


# --- a copy drill: teaching the model to copy before it fine-tunes -------------------------

COPY_STEPS = 4000  # the drill loss sits near chance for ~2,500 steps, then copying appears within a few hundred


def ordinary_vocab_size(tokenizer: Tokenizer) -> int:
    """How many ids are ordinary BPE tokens: the special tokens are registered after them."""
    return min(tokenizer.special_ids.values())


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


def teach_copying(init, *, steps: int = COPY_STEPS, batch_size: int = 16, lr: float = 1e-3, eval_interval: int = 250,
                  out_dir="runs/copy-drill", seed: int = 0, device: str | None = None, log=print) -> SFTResult:
    """Train the model of checkpoint `init` on the copy drill, at a constant learning rate
    after a short warmup and without weight decay (the circuit forms late: nothing should pull
    it back). Every `eval_interval` steps: the repeat accuracy on the second copy of fixed
    random sequences. Writes out_dir/last.pt, a checkpoint `finetune` can start from."""
    _check_schedule(steps, batch_size, eval_interval)
    model, tokenizer, state = load_model_and_tokenizer(init, pick_device(device))
    vocab_size, block_size = ordinary_vocab_size(tokenizer), model.config.block_size
    probe = torch.randint(vocab_size, (4096,), generator=torch.Generator().manual_seed(seed + 1))  # never trained on
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "min_lr": lr, "warmup": 50, "weight_decay": 0.0,
                "eval_interval": eval_interval, "seed": seed}
    return _fit(model, tokenizer, state, settings,
                draw_batch=lambda generator: copy_drill_batch(batch_size, block_size, vocab_size, generator),
                evaluate=lambda: {"repeat_accuracy": repeat_accuracy(model, probe)[1]},
                out_dir=out_dir, log=log, extra={"copy_drill_steps": steps})


# --- fine-tuning --------------------------------------------------------------------------

def finetune(init, train_file, val_file=None, *, steps: int = 2000, batch_size: int = 16, lr: float = 3e-3,
             warmup: int = 20, loss_on: str = "assistant", eval_interval: int = 50, eval_conversations: int = 128,
             out_dir="runs/sft", seed: int = 0, device: str | None = None, log=print) -> SFTResult:
    """Fine-tune the model of checkpoint `init` on the conversations of `train_file`: random
    batches of conversations, the loss on the assistant's tokens (or on all, loss_on="all"),
    AdamW with warmup and cosine decay, clipping. Every `eval_interval` steps the loss on the
    assistant tokens of `eval_conversations` spread over `val_file`. Writes out_dir/last.pt
    (naming the chat template) and out_dir/metrics.jsonl."""
    _check_schedule(steps, batch_size, eval_interval)
    device = pick_device(device)
    model, tokenizer, state = load_model_and_tokenizer(init, device)
    block_size, pad_id = model.config.block_size, tokenizer.special_ids[BEGIN]

    def pairs(conversations, loss_on):
        return [training_pair(*render_conversation(tokenizer, c), block_size, loss_on) for c in conversations]

    train_pairs = pairs(load_conversations(train_file), loss_on)
    val = load_conversations(val_file) if val_file else []
    val_pairs = pairs(val[::max(1, len(val) // eval_conversations)][:eval_conversations], "assistant")  # spread over the split
    val_batches = [tuple(t.to(device) for t in collate(val_pairs[i:i + 32], pad_id)) for i in range(0, len(val_pairs), 32)]

    def draw_batch(generator):
        rows = torch.randint(len(train_pairs), (batch_size,), generator=generator).tolist()
        return collate([train_pairs[r] for r in rows], pad_id)

    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "min_lr": lr / 10, "warmup": warmup,
                "eval_interval": eval_interval, "seed": seed}
    return _fit(model, tokenizer, state, settings, draw_batch,
                evaluate=lambda: {"loss": supervised_loss(model, val_batches)} if val_batches else None,
                out_dir=out_dir, log=log, extra={"chat_template": TEMPLATE_NAME, "sft_loss_on": loss_on})


# --- evaluation -----------------------------------------------------------------------------

def answer(model: GPT, tokenizer: Tokenizer, messages, template=chat_prompt, max_new_tokens: int = 12) -> str:
    """The model's greedy reply to `messages` (ending with a user message), through
    `lilllm.sampling`, stopped at <|end|> or <|endoftext|>."""
    from lilllm.sampling import generate, stop_ids_of  # sibling module: imported when used

    ids = generate(model, template(tokenizer, messages), max_new_tokens, temperature=0, stop_ids=stop_ids_of(tokenizer))
    return tokenizer.decode(ids).strip()


def exact_match(model: GPT, tokenizer: Tokenizer, conversations, template=chat_prompt) -> dict:
    """Accuracy of the model's answer to each conversation's last assistant message, given
    the messages before it: {"accuracy", "predictions"}."""
    predictions = [answer(model, tokenizer, c[:-1], template) for c in conversations]
    hits = [p == c[-1]["content"] for p, c in zip(predictions, conversations)]
    return {"accuracy": sum(hits) / len(hits), "predictions": predictions}


@torch.no_grad()
def choice_accuracy(model: GPT, tokenizer: Tokenizer, conversations) -> dict:
    """Accuracy when the model only has to choose, not to spell: for each conversation, the
    speaker of its excerpt whose name (with <|end|>) the model finds most probable as the reply,
    scored as the masked loss of that reply summed over its tokens. {"accuracy", "choices"}"""
    model.eval()
    device, pad_id = next(model.parameters()).device, tokenizer.special_ids[BEGIN]
    choices = []
    for conversation in conversations:
        names = list(dict.fromkeys(speakers_in(conversation)))
        replies = [render_conversation(tokenizer, conversation[:-1] + [{"role": "assistant", "content": name}])
                   for name in names]
        x, y = (t.to(device) for t in collate([training_pair(*reply, model.config.block_size) for reply in replies],
                                               pad_id))  # (candidates, T) each
        with autocast_context(device):
            logits, _ = model(x)  # (candidates, T, vocab)
        nats = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX, reduction="none")  # (candidates, T)
        choices.append(names[nats.sum(1).argmin().item()])
    hits = [choice == c[-1]["content"] for choice, c in zip(choices, conversations)]
    return {"accuracy": sum(hits) / len(hits), "choices": choices}


def speaker_order(conversation) -> tuple[str, str]:
    """Who spoke when, without the names: the excerpt's speakers as letters in order of first
    appearance ("ABAB": two people taking turns), and the answer's letter ("new": nobody of the excerpt)."""
    speakers, letters = speakers_in(conversation), {}
    for speaker in speakers:
        letters.setdefault(speaker, string.ascii_uppercase[len(letters)])
    return "".join(map(letters.get, speakers)), letters.get(conversation[-1]["content"], "new")


def baselines(train_conversations, val_conversations) -> dict:
    """Three answers without a model: always the most frequent train answer (trivial), the
    speaker from two turns back (dialogue often alternates between two people), and the order
    rule: the best that who-spoke-when alone can tell, the letter that the train answers of
    each speaker order take most often (two turns back for an order train never shows)."""
    most_frequent = Counter(c[-1]["content"] for c in train_conversations).most_common(1)[0][0]
    votes = {}
    for c in train_conversations:
        order, letter = speaker_order(c)
        votes.setdefault(order, Counter())[letter] += 1
    order_rule = {order: counts.most_common(1)[0][0] for order, counts in votes.items()}
    answers = [c[-1]["content"] for c in val_conversations]
    orders = [speaker_order(c) for c in val_conversations]
    by_order = [order_rule.get(order, order[-2]) == letter for order, letter in orders]
    return {
        "most_frequent": most_frequent,
        "most_frequent_accuracy": sum(a == most_frequent for a in answers) / len(answers),
        "two_back_accuracy": sum(speakers_in(c)[-2] == a for c, a in zip(val_conversations, answers)) / len(answers),
        "order_rule": order_rule,
        "order_rule_accuracy": sum(by_order) / len(by_order),
    }
