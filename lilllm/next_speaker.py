"""The chapter 09 task, "who speaks next?": a chat dataset built from tiny-shakespeare, and
the answers it can be measured against.

A conversation shows a short excerpt of a scene (CONTEXT_TURNS speeches, each its speaker and
first line) and asks who speaks next; the assistant names the speaker. The answer is usually
a name in the excerpt (75% of val answers), a skill that carries over to the val split's
other plays, whose speakers are mostly new. Train conversations come from the train split
only, with their speakers disguised as random others (other speakers, or invented names) so
that memorising who speaks in which play does not pay; val conversations come from the val
split only, as they are. JSONL files under data/sft/.

Measured: the model's choice among the excerpt's speakers by likelihood (spelling aside),
and answers without a model, among them the order rule, the best that who-spoke-when alone
can tell. A noisier variant replaces the speeches' lines with random word pieces
(`with_noisy_lines`): users whose text a model should not learn to write.
"""

import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import torch

from lilllm.chat import BEGIN, render_conversation
from lilllm.data import DATA_DIR, load_text, train_val_split
from lilllm.model import GPT, summed_cross_entropy
from lilllm.runtime import autocast_context, write_atomically
from lilllm.sft import collate, training_pair
from lilllm.tokenizer import Tokenizer
from lilllm.train import TrainConfig, load_data

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
    tokens = (tokenizer.decode([i]) for i in range(tokenizer.ordinary_vocab_size))
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
    train_text, val_text = train_val_split(load_text())
    paths = {}
    train = copying_conversations(train_text, invented_names(tokenizer))
    for split, conversations in (("train", train), ("val", next_speaker_conversations(val_text))):
        fitting = [c for c in conversations if len(render_conversation(tokenizer, c["messages"])[0]) <= block_size + 1]
        paths[split] = write_atomically(out_dir / f"{split}.jsonl",
                                        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in fitting))
    write_atomically(out_dir / "meta.json", json.dumps(_dataset_meta(tokenizer, block_size)))
    return paths


def _dataset_meta(tokenizer: Tokenizer, block_size: int) -> dict:
    return {"recipe": DATASET_RECIPE, "tokenizer": tokenizer.fingerprint, "block_size": block_size}


def chat_dataset(tokenizer: Tokenizer | None = None, block_size: int = 128) -> dict[str, Path]:
    """The course's chat dataset files {"train": path, "val": path}, built on first use and
    rebuilt when made for another tokenizer, context or version of the recipe."""
    if tokenizer is None:
        tokenizer = load_data(TrainConfig()).tokenizer  # the course's BPE
    paths = {split: SFT_DIR / f"{split}.jsonl" for split in ("train", "val")}
    meta = SFT_DIR / "meta.json"
    if all(p.exists() for p in paths.values()) and meta.exists() and \
            json.loads(meta.read_text()) == _dataset_meta(tokenizer, block_size):
        return paths
    return build_chat_dataset(tokenizer, block_size)


# --- measuring answers -----------------------------------------------------------------------

@torch.no_grad()
def choice_accuracy(model: GPT, tokenizer: Tokenizer, conversations, batch_size: int = 64) -> dict:
    """Accuracy when the model only has to choose, not to spell: for each conversation, the
    speaker of its excerpt whose name (with <|end|>) the model finds most probable as the reply,
    scored as the masked loss of that reply summed over its tokens. The candidates of all
    conversations go through the model in batches of `batch_size` rows (right padding, never
    scored, changes nothing before it). {"accuracy", "choices", "hits"}"""
    model.eval()
    device, pad_id = next(model.parameters()).device, tokenizer.special_ids[BEGIN]
    candidates = [(i, name) for i, c in enumerate(conversations) for name in dict.fromkeys(speakers_in(c))]
    pairs = [training_pair(*render_conversation(tokenizer, conversations[i][:-1] + [{"role": "assistant", "content": name}]),
                           model.config.block_size) for i, name in candidates]
    nats = []
    for start in range(0, len(pairs), batch_size):
        x, y = (t.to(device) for t in collate(pairs[start:start + batch_size], pad_id))  # (rows, T) each
        with autocast_context(device):
            logits, _ = model(x)  # (rows, T, vocab)
        nats += [summed_cross_entropy(row_logits, row_y).item() for row_logits, row_y in zip(logits, y)]
    best = {}
    for (i, name), value in zip(candidates, nats):  # the first of equal candidates wins, as argmin would
        if i not in best or value < best[i][1]:
            best[i] = (name, value)
    choices = [best[i][0] for i in range(len(conversations))]
    hits = [choice == c[-1]["content"] for choice, c in zip(choices, conversations)]
    return {"accuracy": sum(hits) / len(hits), "choices": choices, "hits": hits}


# --- a noisier task: the same question, the speeches' lines replaced by noise ----------------

def noise_pieces(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary's pieces that are a word or a space and a word (letters only): noise
    that cannot break the excerpt's layout (no newline, no colon)."""
    pieces = (tokenizer.decode([i]) for i in range(tokenizer.ordinary_vocab_size))
    return sorted({piece for piece in pieces if re.fullmatch(r" ?[A-Za-z]+", piece)})


def with_noisy_lines(conversation, tokenizer: Tokenizer, pieces: list[str], rng: random.Random) -> dict:
    """The conversation with each speech's line replaced by as many random `pieces` as the
    line has tokens: the speakers and their order stay, the words become noise that no model
    can predict (a user who pastes garbage around the question)."""
    turns = excerpt_turns(conversation)
    noisy = ["".join(rng.choice(pieces) for _ in tokenizer.encode(line)).strip() for _, line in turns]
    excerpt = "\n\n".join(f"{speaker}:\n{line}" for (speaker, _), line in zip(turns, noisy))
    return {"messages": [{"role": "user", "content": f"{excerpt}\n\n{QUESTION}"}, dict(conversation[-1])]}


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
