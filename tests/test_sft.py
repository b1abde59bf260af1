"""Supervised fine-tuning: the template and its mask, targets and the masked loss, the
refusals, the JSONL loader, the dataset builder, the copy drill and its cache, the metrics and
the paired comparison, a short fine-tuning run, reusing runs, and the CLI."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from lilllm import LilllmError
from lilllm.chat import chat_prompt, load_conversations, render_conversation
from lilllm.config import ModelConfig
from lilllm.data import load_text, train_val_split
from lilllm.model import GPT, IGNORE_INDEX
from lilllm.next_speaker import (
    QUESTION,
    answer_in_excerpt,
    baselines,
    build_chat_dataset,
    choice_accuracy,
    copying_conversations,
    disguise_speakers,
    excerpt_turns,
    invented_names,
    next_speaker_conversations,
    noise_pieces,
    parse_turns,
    speaker_order,
    speakers_in,
    with_noisy_lines,
)
from lilllm.sft import (
    collate,
    copy_drill_batch,
    greedy_hits,
    paired_difference,
    repeat_accuracy,
    training_pair,
)
from lilllm.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?!.,:'<|>\n")
SPECIAL = TOKENIZER.special_ids
TWO_TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "who?"},
    {"role": "assistant", "content": "me"},
]


def test_render_builds_the_template_and_supervises_exactly_the_assistant_tokens():
    ids, mask = render_conversation(TOKENIZER, TWO_TURNS)
    enc = TOKENIZER.encode
    expected = ([SPECIAL["<|endoftext|>"]]
                + [SPECIAL["<|system|>"], *enc("be brief"), SPECIAL["<|end|>"]]
                + [SPECIAL["<|user|>"], *enc("hi"), SPECIAL["<|end|>"]]
                + [SPECIAL["<|assistant|>"], *enc("hello"), SPECIAL["<|end|>"]]
                + [SPECIAL["<|user|>"], *enc("who?"), SPECIAL["<|end|>"]]
                + [SPECIAL["<|assistant|>"], *enc("me"), SPECIAL["<|end|>"]])
    assert ids == expected
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == [*enc("hello"), SPECIAL["<|end|>"], *enc("me"), SPECIAL["<|end|>"]]
    # nothing outside the assistant turns: not the start, the system or user text, nor any role marker
    assert mask == [0] * 15 + [0] + [1] * 6 + [0] * 6 + [0] + [1] * 3
    assert not any(m for i, m in zip(ids, mask) if i in (SPECIAL["<|assistant|>"], SPECIAL["<|user|>"]))


def test_message_text_cannot_forge_special_tokens():
    ids, _ = render_conversation(TOKENIZER, [{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "a"}])
    assert ids.count(SPECIAL["<|end|>"]) == 2  # the two real ends; the text is encoded character by character


def test_chat_prompt_ends_with_the_assistant_marker_and_prefixes_the_rendered_reply():
    prompt = chat_prompt(TOKENIZER, TWO_TURNS[:4])
    ids, _ = render_conversation(TOKENIZER, TWO_TURNS)
    assert prompt[-1] == SPECIAL["<|assistant|>"]
    assert ids[:len(prompt)] == prompt  # training and generation see the same tokens


def test_the_template_is_registered_for_chat_by_name():
    from lilllm.chat import TEMPLATE_NAME, chat_template

    assert chat_template(TEMPLATE_NAME)(TOKENIZER, TWO_TURNS[:4]) == chat_prompt(TOKENIZER, TWO_TURNS[:4])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "no assistant message"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "assistant", "content": "z"}],
     "may only come first"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "z"}], "is not a"),
])
def test_bad_conversations_are_rejected(messages, match):
    with pytest.raises(LilllmError, match=match):
        render_conversation(TOKENIZER, messages)


def test_targets_shift_with_the_mask_and_padding_is_ignored():
    ids, mask = render_conversation(TOKENIZER, TWO_TURNS)
    x, y = training_pair(ids, mask, block_size=64)
    assert x == ids[:-1] and len(y) == len(x)
    for t in range(len(x)):  # the target at t is token t + 1, scored iff token t + 1 is supervised
        assert y[t] == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)
    _, y_all = training_pair(ids, mask, block_size=64, loss_on="all")
    assert y_all == ids[1:]
    short = training_pair(*render_conversation(TOKENIZER, TWO_TURNS[1:3]), block_size=64)
    xb, yb = collate([(x, y), short], pad_id=0)
    assert xb.shape == yb.shape == (2, len(x))
    assert (yb[1, len(short[1]):] == IGNORE_INDEX).all()


def test_a_conversation_longer_than_the_context_is_an_error_not_a_truncation():
    ids, mask = render_conversation(TOKENIZER, TWO_TURNS)
    training_pair(ids, mask, block_size=len(ids) - 1)  # exactly fits: len(ids) - 1 inputs
    with pytest.raises(LilllmError, match=f"conversation of {len(ids)} tokens does not fit"):
        training_pair(ids, mask, block_size=len(ids) - 2)
    with pytest.raises(LilllmError, match="loss_on='some'"):
        training_pair(ids, mask, block_size=64, loss_on="some")


def test_masked_positions_add_zero_loss_and_zero_gradient():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=64, d_model=32, n_layers=1, n_heads=2,
                            n_kv_heads=1))
    ids, mask = render_conversation(TOKENIZER, TWO_TURNS)
    x, y = collate([training_pair(ids, mask, 64)], pad_id=0)  # (1, T) each
    logits, loss = model(x, y)
    per_token = F.cross_entropy(logits[0], torch.tensor(ids[1:]), reduction="none")  # (T,)
    supervised = torch.tensor(mask[1:], dtype=torch.bool)
    torch.testing.assert_close(loss, per_token[supervised].mean())  # the mean over supervised tokens only
    # The loss's gradient with respect to the logits is zero at every masked position.
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX).backward()
    assert (logits.grad[0, ~supervised] == 0).all() and (logits.grad[0, supervised] != 0).any(dim=-1).all()


def test_loader_reports_malformed_lines_by_number(tmp_path):
    good = json.dumps({"messages": TWO_TURNS[1:3]})
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join([good, "{not json", good, json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                               json.dumps({"text": "x"})]) + "\n")
    with pytest.raises(LilllmError, match=r"3 malformed line\(s\): line 2: .*; line 4: .*no assistant.*; line 5: "):
        load_conversations(path)
    path.write_text(good + "\n\n" + good + "\n")
    assert load_conversations(path) == [TWO_TURNS[1:3]] * 2
    with pytest.raises(LilllmError, match="is missing"):
        load_conversations(tmp_path / "absent.jsonl")


def test_next_speaker_conversations_ask_for_the_speaker_after_the_excerpt():
    text = "A:\nline a\n\nB:\nline b\nmore\n\nA:\nagain\n\nC:\nsee\n\nB:\nlast\n\nnot a speech\n\nA:\nx"
    conversations = next_speaker_conversations(text)
    assert len(conversations) == 1  # the only speech after four speeches with no break between
    (user, reply), = [c["messages"] for c in conversations]
    assert user["content"] == f"A:\nline a\n\nB:\nline b\n\nA:\nagain\n\nC:\nsee\n\n{QUESTION}"
    assert reply == {"role": "assistant", "content": "B"}
    conversation = [user, reply]
    assert speakers_in(conversation) == ["A", "B", "A", "C"]
    base = baselines([conversation], [conversation])
    assert (base["most_frequent"], base["most_frequent_accuracy"], base["two_back_accuracy"]) == ("B", 1.0, 0.0)


def excerpt(speakers, answer):
    """A "who speaks next?" conversation: these speakers in turn, then the answer."""
    shown = "\n\n".join(f"{name}:\nline {'abcd'[i]}" for i, name in enumerate(speakers))
    return [{"role": "user", "content": f"{shown}\n\n{QUESTION}"}, {"role": "assistant", "content": answer}]


def test_speaker_order_keeps_who_spoke_when_and_drops_the_names():
    assert speaker_order(excerpt(["X", "Y", "X", "Z"], "Y")) == ("ABAC", "B")
    assert speaker_order(excerpt(["P", "Q", "R", "Q"], "S")) == ("ABCB", "new")


def test_the_order_rule_learns_each_order_from_train_and_falls_back_to_two_back():
    train = [excerpt(["X", "Y", "X", "Z"], "Y")] * 2 + [excerpt(["U", "V", "U", "W"], "U")]  # ABAC → B, 2 to 1
    val = [excerpt(["K", "L", "K", "M"], "L"),  # ABAC: the rule says B (right), two back says A (wrong)
           excerpt(["K", "L", "M", "L"], "M"),  # ABCB, never in train: two back, M (right)
           excerpt(["K", "L", "M", "N"], "O")]  # nobody of the excerpt: both wrong
    base = baselines(train, val)
    assert base["order_rule"] == {"ABAC": "B"}
    assert (base["order_rule_accuracy"], base["two_back_accuracy"]) == (2 / 3, 1 / 3)


def test_dataset_is_deterministic_and_its_val_part_comes_from_the_val_split_only(tmp_path):
    tokenizer = CharTokenizer.train(load_text())
    first = build_chat_dataset(tokenizer, 400, tmp_path / "a")  # characters: a longer context
    second = build_chat_dataset(tokenizer, 400, tmp_path / "b")
    for split in ("train", "val"):
        assert first[split].read_bytes() == second[split].read_bytes()
    train_text, val_text = train_val_split(load_text())
    val = load_conversations(first["val"])
    assert len(val) > 100
    for conversation in val:
        for turn in conversation[0]["content"].removesuffix(QUESTION).strip().split("\n\n"):
            assert turn in val_text
    # and exactly the conversations of the val text that fit the context, nothing from train
    fits = [c["messages"] for c in next_speaker_conversations(val_text)
            if len(render_conversation(tokenizer, c["messages"])[0]) <= 401]
    assert val == fits
    train_speakers, invented = {turn[0] for turn in parse_turns(train_text) if turn}, set(invented_names(tokenizer))
    disguises = {"speakers": 0, "invented": 0}
    for conversation in load_conversations(first["train"]):  # copying: the answer is in the excerpt
        assert answer_in_excerpt(conversation)
        names = set(speakers_in(conversation))
        assert names <= train_speakers or names <= invented
        disguises["speakers" if names <= train_speakers else "invented"] += 1
    assert 0.45 < disguises["speakers"] / sum(disguises.values()) < 0.55


def test_disguised_speakers_are_renamed_the_same_everywhere():
    conversation = {"messages": [{"role": "user", "content": f"GREMIO:\nGood morrow, Baptista.\n\nBAPTISTA:\n"
                                                             f"Good morrow, neighbour Gremio.\n\n{QUESTION}"},
                                 {"role": "assistant", "content": "GREMIO"}]}
    disguised = disguise_speakers(conversation, ["First Citizen", "ROMEO"], random.Random(0))
    user, reply = (m["content"] for m in disguised["messages"])
    first, second = (speaker for speaker, _ in excerpt_turns(disguised["messages"]))
    assert {first, second} == {"First Citizen", "ROMEO"} and reply == first
    assert user == (f"{first}:\nGood morrow, {second.title()}.\n\n{second}:\n"
                    f"Good morrow, neighbour {first.title()}.\n\n{QUESTION}")
    invented = ["XO", "ZAB", "QUIL"]
    assert copying_conversations("A:\nx\n\nB:\ny\n\nC:\nz\n\nD:\nw\n\nE:\nv", invented, draws=2) == []  # E: not in the excerpt
    alternating = copying_conversations("A:\nx\n\nB:\ny\n\nA:\nz\n\nB:\nw\n\nA:\nv", invented, draws=8)
    assert len(alternating) == 8
    for disguised in alternating:
        assert disguised["messages"][-1]["content"] == speakers_in(disguised["messages"])[-2]
    assert {name for d in alternating for name in speakers_in(d["messages"])} == {"A", "B", *invented}


# --- the copy drill ----------------------------------------------------------------------

def test_copy_drill_scores_exactly_the_second_copy_after_its_first_token():
    x, y = copy_drill_batch(64, 32, 50, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 32)
    lengths = set()
    for row_x, row_y in zip(x, y):
        scored = (row_y != IGNORE_INDEX).nonzero().flatten().tolist()
        n = scored[0]  # the second copy starts here; its first token is not scored
        assert scored == list(range(n, 2 * n - 1)) and 8 <= n < 16
        assert torch.equal(row_x[n:2 * n], row_x[:n])  # the sequence, then the same again
        assert torch.equal(row_y[n:2 * n - 2], row_x[n + 1:2 * n - 1])  # position t is scored on token t + 1
        assert row_y[2 * n - 2] == row_x[n - 1]  # the last target: the first copy's last token
        lengths.add(n)
    assert len(lengths) > 3 and int(x.max()) < 50


def test_text_rows_are_windows_of_the_text_or_a_passage_shown_twice():
    import numpy as np

    from lilllm.sft import text_batch

    tokens = np.arange(5000, dtype=np.uint16)  # every window is a run of consecutive ids
    x, y = text_batch(tokens, 3, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (3, 32) and torch.equal(y[:, :-1], x[:, 1:]) and (x[:, 1:] - x[:, :-1] == 1).all()
    for block_size in (32, 33):
        x, y = text_batch(tokens, 3, block_size, torch.Generator().manual_seed(0), twice=True)
        half = block_size // 2
        assert x.shape == y.shape == (3, block_size) and torch.equal(y[:, :-1], x[:, 1:])  # every target scored
        assert torch.equal(x[:, half:2 * half], x[:, :half])  # the passage, then the same passage again
        assert (x[:, 1:half] - x[:, :half - 1] == 1).all()  # a real window of the text


class Copier(torch.nn.Module):
    """A perfect copier on the repeat test: at position t it predicts the token that followed
    position t - length, which is what a passage of `length` tokens shown twice repeats."""

    def __init__(self, length, vocab):
        super().__init__()
        self.length, self.vocab, self.dummy = length, vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        following = torch.cat([x[:, 1:], x[:, -1:]], dim=1)  # (B, T): the token after each position
        guess = torch.roll(following, self.length, dims=1)  # (B, T): the token after position t - length
        return F.one_hot(guess, self.vocab).float(), None


def test_repeat_accuracy_measures_the_first_and_the_second_copy():
    tokens = torch.randint(100, (1000,), generator=torch.Generator().manual_seed(0))
    first, second = repeat_accuracy(Copier(30, 100), tokens)
    assert second == 1.0 and first < 0.2  # copying helps the second copy only


# --- fine-tuning, end to end (the quick-mode pretrained model: 30 steps, cached) ----------

@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """A few train and val conversations, in JSONL files."""
    from lilllm.train import config_from_dict, load_data

    tokenizer = load_data(config_from_dict({})).tokenizer
    train_text, val_text = train_val_split(load_text())
    folder = tmp_path_factory.mktemp("chat")
    files = {}
    for split, text in (("train", train_text[:20_000]), ("val", val_text[:5_000])):
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(c) + "\n" for c in next_speaker_conversations(text)
                                        if len(render_conversation(tokenizer, c["messages"])[0]) <= 129))
    return files


def test_choice_accuracy_picks_the_excerpt_speaker_whose_reply_the_model_finds_most_probable():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=96, d_model=32, n_layers=1, n_heads=2,
                            n_kv_heads=2))
    conversations = [excerpt(["ANN", "BO", "ANN", "CYD"], "BO"), excerpt(["DEE", "ED", "FLO", "ED"], "FLO")]
    scores = choice_accuracy(model, TOKENIZER, conversations)
    for conversation, choice in zip(conversations, scores["choices"]):
        nats = {}
        for name in dict.fromkeys(speakers_in(conversation)):  # one candidate at a time: no padding
            reply = render_conversation(TOKENIZER, conversation[:-1] + [{"role": "assistant", "content": name}])
            x, y = (torch.tensor([t]) for t in training_pair(*reply, 96))
            _, loss = model(x, y)  # the mean over the reply's tokens
            nats[name] = loss.item() * (y != IGNORE_INDEX).sum().item()
        assert choice == min(nats, key=nats.get)
    assert scores["accuracy"] == sum(c == conv[-1]["content"] for c, conv in zip(scores["choices"], conversations)) / 2
    assert choice_accuracy(model, TOKENIZER, conversations, batch_size=1)["choices"] == scores["choices"]  # batching aside


def test_finetune_writes_a_checkpoint_that_names_its_template(chat_files, tmp_path):
    from lilllm.chat import TEMPLATE_NAME
    from lilllm.checkpoint import load_checkpoint
    from lilllm.course import pretrained_checkpoint
    from lilllm.progress import read_metrics
    from lilllm.sft import exact_match, finetune

    result = finetune(pretrained_checkpoint(), chat_files["train"], chat_files["val"], steps=3, eval_interval=2,
                      eval_conversations=8, out_dir=tmp_path / "sft", log=lambda line: None)
    state = load_checkpoint(result.checkpoint)
    assert (state["chat_template"], state["sft_loss_on"], state["step"]) == (TEMPLATE_NAME, "assistant", 3)
    assert [(r["step"], r["split"]) for r in read_metrics(tmp_path / "sft") if r["split"] == "val"] == \
        [(0, "val"), (2, "val"), (3, "val")]
    scores = exact_match(result.model, result.tokenizer, load_conversations(chat_files["val"])[:3])
    assert 0 <= scores["accuracy"] <= 1 and len(scores["predictions"]) == 3


def test_cli_sft_then_chat_with_the_template(chat_files, tmp_path, monkeypatch, capsys):
    import io

    from lilllm.checkpoint import load_checkpoint
    from lilllm.cli import main
    from lilllm.course import pretrained_checkpoint

    out = tmp_path / "sft"
    monkeypatch.setattr("lilllm.sft.DRILL_ROOT", tmp_path / "drills")
    assert main(["sft", "--init", str(pretrained_checkpoint()), "--data", str(chat_files["train"]), "--steps", "2",
                 "--copy-steps", "3", "--out", str(out)]) == 0
    drilled, = (tmp_path / "drills").glob("copy-drill-*/last.pt")
    assert load_checkpoint(drilled)["step"] == 3  # the drill ran first, then fine-tuning
    assert "the copy drill, 3 steps" in capsys.readouterr().out
    monkeypatch.setattr("lilllm.sft._drill", lambda *args: pytest.fail("the cached drill was run again"))
    assert main(["sft", "--init", str(pretrained_checkpoint()), "--data", str(chat_files["train"]), "--steps", "2",
                 "--copy-steps", "3", "--out", str(out)]) == 0
    assert "reusing it" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("GREMIO:\nGood morrow.\n\nWho speaks next?\n"))
    assert main(["chat", str(out / "last.pt"), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    assert "assistant: " in capsys.readouterr().out
    assert main(["sft", "--data", str(tmp_path / "absent.jsonl"), "--steps", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "absent.jsonl is missing" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the copy drill started


def test_lora_finetuning_trains_only_the_adapters_and_saves_them_apart(chat_files, tmp_path):
    from lilllm.checkpoint import load_checkpoint, load_model
    from lilllm.course import pretrained_checkpoint
    from lilllm.layers.lora import add_lora
    from lilllm.sft import finetune

    lines = []
    result = finetune(pretrained_checkpoint(), chat_files["train"], steps=3, eval_interval=3, lora_rank=4,
                      lora_alpha=8.0, out_dir=tmp_path / "lora", log=lines.append)
    base, _, _ = load_model(pretrained_checkpoint(), "cpu")
    d, kv = base.config.d_model, base.config.n_kv_heads * base.config.head_dim
    trainable = base.config.n_layers * 4 * ((d + d) + (d + kv))  # r·(d_in + d_out) for q and v
    assert any(f"{trainable:,} trainable parameters" in line for line in lines)
    # last.pt is an ordinary checkpoint of the plain architecture; only q and v moved
    before, after = base.state_dict(), load_checkpoint(result.checkpoint)["model"]
    assert before.keys() == after.keys()
    for name in before:
        targeted = name.endswith(("q_proj.weight", "v_proj.weight"))
        assert torch.equal(before[name], after[name]) != targeted, name
    merged, _, _ = load_model(result.checkpoint, "cpu")
    # adapter.pt holds the adapters alone; on the starting model they give the merged model's logits
    adapters = torch.load(tmp_path / "lora" / "adapter.pt", weights_only=True)
    assert adapters["settings"] == load_checkpoint(result.checkpoint)["sft_lora"] == \
        {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "full": [], "trainable_parameters": trainable}
    assert adapters["lora"] and all(name.endswith((".lora_A", ".lora_B")) for name in adapters["lora"])
    assert adapters["full"] == {}
    add_lora(base, adapters["settings"]["targets"], rank=4, alpha=8.0)
    base.load_state_dict(adapters["lora"], strict=False)
    x = torch.randint(base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(base.eval()(x)[0], merged(x)[0], atol=1e-4, rtol=0)


def test_lora_full_trains_the_embedding_beside_the_adapters(chat_files, tmp_path):
    from lilllm.checkpoint import load_checkpoint, load_model
    from lilllm.course import pretrained_checkpoint
    from lilllm.sft import finetune

    result = finetune(pretrained_checkpoint(), chat_files["train"], steps=2, eval_interval=2, lora_rank=2,
                      lora_full="tok_emb", out_dir=tmp_path / "lora", log=lambda line: None)
    base, _, _ = load_model(pretrained_checkpoint(), "cpu")
    lora = load_checkpoint(result.checkpoint)["sft_lora"]
    d, kv = base.config.d_model, base.config.n_kv_heads * base.config.head_dim
    assert lora["full"] == ["tok_emb"]
    assert lora["trainable_parameters"] == base.tok_emb.weight.numel() + base.config.n_layers * 2 * (2 * d + d + kv)
    after = load_checkpoint(result.checkpoint)["model"]
    assert not torch.equal(after["tok_emb.weight"], base.state_dict()["tok_emb.weight"])
    assert torch.equal(after["blocks.0.ffn.up.weight"], base.state_dict()["blocks.0.ffn.up.weight"])
    adapters = torch.load(tmp_path / "lora" / "adapter.pt", weights_only=True)
    assert torch.equal(adapters["full"]["tok_emb.weight"], after["tok_emb.weight"])
    with pytest.raises(LilllmError, match="lora_full: the model has no module 'embedding'"):
        finetune(pretrained_checkpoint(), chat_files["train"], lora_rank=2, lora_full="embedding", out_dir=tmp_path / "x")


def test_cli_sft_with_lora_and_its_refusals(chat_files, tmp_path, monkeypatch, capsys):
    from lilllm.checkpoint import load_checkpoint
    from lilllm.cli import build_parser, main
    from lilllm.course import pretrained_checkpoint

    args = build_parser().parse_args(["sft", "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", "q_proj,k_proj"])
    assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (8, 16.0, "q_proj,k_proj")
    args = build_parser().parse_args(["sft"])
    assert (args.lora_rank, args.lora_alpha, args.lora_targets) == (None, None, None)  # Finetune's defaults: no LoRA
    start = ["sft", "--init", str(pretrained_checkpoint()), "--data", str(chat_files["train"]), "--steps", "2"]
    out = tmp_path / "lora"
    assert main([*start, "--copy-steps", "0", "--lora-rank", "2", "--lora-targets", "k_proj,out_proj",
                 "--out", str(out)]) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert load_checkpoint(out / "last.pt")["sft_lora"]["targets"] == ["k_proj", "out_proj"]
    assert (out / "adapter.pt").stat().st_size < (out / "last.pt").stat().st_size / 10
    monkeypatch.setattr("lilllm.sft.DRILL_ROOT", tmp_path / "drills")
    for flags, message in [(["--lora-rank", "-1"], "lora_rank=-1: use 0 for full fine-tuning"),
                           (["--lora-rank", "4", "--lora-targets", "q_proj,query"],
                            "LoRA target(s) query: the model has no such linear layer; choose among "),
                           (["--lora-alpha", "8"], "lora_alpha or lora_full is set but lora_rank is 0")]:
        assert main([*start, *flags, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "drills").exists() and not (tmp_path / "bad").exists()  # refused before the copy drill


def test_finetuning_an_aux_free_moe_checkpoint_moves_its_balancing_bias(small_data, tmp_path):
    """Fine-tuning runs the trainer's own step, so an MoE layer's after-step update happens
    here too: the bias moves, and the logged loss is the cross-entropy without balance terms."""
    from lilllm.checkpoint import load_checkpoint, load_model
    from lilllm.sft import finetune
    from lilllm.train import make_config, train

    moe = '{"n_experts": 4, "top_k": 1, "balance": "aux_free", "bias_update_rate": 0.05}'
    config = make_config("tiny", [f"--data-dir={small_data}", f"--out-dir={tmp_path / 'moe'}", "--steps=2",
                                  "--model.d-model=32", "--model.n-layers=1", "--model.n-heads=2", "--model.n-kv-heads=1",
                                  "--model.block-size=256", "--model.ffn=moe", f"--model.moe={moe}", "--batch-size=2",
                                  "--warmup=1", "--eval-interval=0"])
    train(config, progress=False)
    checkpoint = tmp_path / "moe" / "last.pt"
    _, tokenizer, state = load_model(checkpoint, "cpu")
    bias_before = state["model"]["blocks.0.ffn.expert_bias"]
    conversations = [c for c in next_speaker_conversations(load_text()[:30_000])
                     if len(render_conversation(tokenizer, c["messages"])[0]) <= 257][:20]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    result = finetune(checkpoint, tmp_path / "chats.jsonl", steps=3, batch_size=2, eval_interval=3,
                      out_dir=tmp_path / "sft", log=lambda line: None)
    bias_after = result.model.blocks[0].ffn.expert_bias
    assert not torch.equal(bias_before, bias_after)
    assert torch.equal(load_checkpoint(result.checkpoint)["model"]["blocks.0.ffn.expert_bias"], bias_after)


# --- the drill's cache, reused runs, the metrics and the paired comparison -------------------

def test_the_copy_drill_is_cached_by_checkpoint_and_settings(tmp_path, monkeypatch):
    from lilllm.course import pretrained_checkpoint
    from lilllm.sft import copy_drill_checkpoint

    monkeypatch.setattr("lilllm.sft.DRILL_ROOT", tmp_path)
    quiet = {"log": lambda line: None, "eval_interval": 2}
    first = copy_drill_checkpoint(pretrained_checkpoint(), steps=2, **quiet)
    stamp = first.stat().st_mtime_ns
    assert copy_drill_checkpoint(pretrained_checkpoint(), steps=2, **quiet) == first  # reused, not drilled again
    assert first.stat().st_mtime_ns == stamp
    mixed = copy_drill_checkpoint(pretrained_checkpoint(), steps=2, text_rows=2, **quiet)  # other settings: drilled apart
    assert mixed != first and len(list(tmp_path.glob("copy-drill-*/last.pt"))) == 2
    changed = tmp_path / "changed.pt"  # another starting checkpoint (other bytes): drilled apart too
    changed.write_bytes(first.read_bytes())
    assert copy_drill_checkpoint(changed, steps=2, **quiet).parent not in (first.parent, mixed.parent)


def test_a_finished_run_is_reused_only_for_the_same_key(chat_files, tmp_path, monkeypatch):
    from lilllm.course import pretrained_checkpoint
    from lilllm.sft import finetune

    settings = dict(steps=2, eval_interval=2, eval_conversations=4, out_dir=tmp_path / "run", log=lambda line: None,
                    reuse=True)
    first = finetune(pretrained_checkpoint(), chat_files["train"], chat_files["val"], **settings)
    monkeypatch.setattr("lilllm.sft._finetune", lambda *args: pytest.fail("a finished run was trained again"))
    again = finetune(pretrained_checkpoint(), chat_files["train"], chat_files["val"], **settings)
    assert again.records == first.records and again.checkpoint == first.checkpoint
    with pytest.raises(pytest.fail.Exception):  # another seed is another run
        finetune(pretrained_checkpoint(), chat_files["train"], chat_files["val"], seed=1, **settings)


class Oracle(torch.nn.Module):
    """A model that, at every position, predicts the token that follows it in its own input,
    and <|end|> where the input ends (or `wrong` everywhere, if given)."""

    def __init__(self, vocab, end, pad, wrong=None):
        super().__init__()
        self.vocab, self.end, self.pad, self.wrong = vocab, end, pad, wrong
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        guess = torch.cat([x[:, 1:], torch.full_like(x[:, :1], self.end)], dim=1)  # (B, T)
        guess[guess == self.pad] = self.end
        if self.wrong is not None:
            guess[:] = self.wrong
        return F.one_hot(guess, self.vocab).float(), None


def test_greedy_hits_reads_greedy_decoding_off_one_forward_pass():
    conversations = [excerpt(["ANN", "BO", "ANN", "CYD"], "BO"), excerpt(["DEE", "ED"], "FLORIZEL")]
    end, pad = SPECIAL["<|end|>"], SPECIAL["<|endoftext|>"]
    assert greedy_hits(Oracle(TOKENIZER.vocab_size, end, pad), TOKENIZER, conversations) == [True, True]
    assert greedy_hits(Oracle(TOKENIZER.vocab_size, end, pad), TOKENIZER, conversations, max_new_tokens=5) == \
        [True, False]  # FLORIZEL is 8 characters and <|end|>: more than greedy decoding may write
    assert greedy_hits(Oracle(TOKENIZER.vocab_size, end, pad, wrong=end), TOKENIZER, conversations) == [False, False]


def test_greedy_hits_agree_with_generated_answers(chat_files):
    from lilllm.checkpoint import load_model
    from lilllm.course import pretrained_checkpoint
    from lilllm.sft import exact_match

    model, tokenizer, _ = load_model(pretrained_checkpoint(), "cpu")
    conversations = load_conversations(chat_files["val"])[:6]
    answers = exact_match(model, tokenizer, conversations)["predictions"]
    fast = greedy_hits(model, tokenizer, conversations)
    assert fast == [a == c[-1]["content"] for a, c in zip(answers, conversations)]
    # The model's own greedy replies, where they end with <|end|> and are spelt as the tokenizer spells them, are hits.
    from lilllm.chat import chat_prompt
    from lilllm.sampling import generate

    forced = []
    for conversation in load_conversations(chat_files["train"])[:40]:
        ids = generate(model, chat_prompt(tokenizer, conversation[:-1]), 11, temperature=0,
                       stop_ids=[tokenizer.special_ids["<|end|>"]])  # the stop id is not returned
        text = tokenizer.decode(ids)
        if 0 < len(ids) < 11 and tokenizer.encode(text) == ids and text == text.strip():
            forced.append(conversation[:-1] + [{"role": "assistant", "content": text}])
    assert all(greedy_hits(model, tokenizer, forced))


def test_paired_difference_finds_a_real_gap_and_none_where_there_is_none():
    same = paired_difference([1, 0, 1, 1, 0] * 20, [1, 0, 1, 1, 0] * 20)
    assert same["difference"] == same["low"] == same["high"] == 0 and same["p"] == 1
    gap = paired_difference([1] * 30 + [0] * 70, [0] * 100)
    assert gap["difference"] == pytest.approx(0.3) and 0.2 < gap["low"] < 0.3 < gap["high"] < 0.4 and gap["p"] < 0.001
    noise = paired_difference([1, 0] * 50, [0, 1] * 50)  # as many wins as losses
    assert noise["low"] < 0 < noise["high"] and noise["p"] > 0.5


def test_noisy_lines_keep_the_speakers_and_the_answer():
    tokenizer = CharTokenizer.train("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?!.,:'<|>\n")
    conversation = excerpt(["ANN", "BO", "ANN", "CYD"], "BO")
    pieces = noise_pieces(tokenizer)
    assert pieces and all(":" not in p and "\n" not in p for p in pieces)
    noisy = with_noisy_lines(conversation, tokenizer, pieces, random.Random(0))["messages"]
    assert speakers_in(noisy) == speakers_in(conversation) and noisy[-1] == conversation[-1]
    assert [line for _, line in excerpt_turns(noisy)] != [line for _, line in excerpt_turns(conversation)]
