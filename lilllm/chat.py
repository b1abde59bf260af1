"""The chat template: how a conversation becomes token ids, which of them a fine-tuned model
learns to say, and where its reply ends. One place for everything chat, so the renderer that
training uses and the prompt that sampling uses can never disagree.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": text}
messages. Rendered (`render_conversation`):

    <|endoftext|> <|user|> text <|end|> <|assistant|> text <|end|> ...

1. Every message is its role's special token, its text, then <|end|>. The special tokens are
   never produced by the BPE merges, and message texts are encoded with specials off, so a
   message can never forge a role marker.
2. The loss mask is built while rendering, not searched for afterwards: the renderer knows
   which message each token came from. It is 1 on the assistant's text and its <|end|> (the
   model must learn what to say and when to stop), 0 on everything else.
3. A prompt (`chat_prompt`) is the conversation so far, then <|assistant|>; the reply ends at
   <|end|> (`stop_ids`). Templates are looked up by name: a checkpoint fine-tuned for chat
   names its own; "plain" lets a pretrained model continue the text as a play, each message a
   speech ending in a blank line (its reply ends at the next blank line: `lilllm chat`).
"""

import json
from collections.abc import Callable
from pathlib import Path

from lilllm import LilllmError
from lilllm.runtime import import_datasets
from lilllm.tokenizer import Tokenizer

TEMPLATE_NAME = "lilllm"  # the template `render_conversation` implements, as checkpoints name it
BEGIN, END = "<|endoftext|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}


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
    then <|assistant|>. The reply ends at <|end|>."""
    ids, _ = render_conversation(tokenizer, messages, need_assistant=False)
    return ids + [tokenizer.special_ids[ROLE_TOKENS["assistant"]]]


def plain_prompt(tokenizer: Tokenizer, messages) -> list[int]:
    """No template: the messages' texts as the speeches of a play, each ending in a blank line,
    so a pretrained model continues the conversation with a speech of its own."""
    return tokenizer.encode("".join(message["content"].strip("\n") + "\n\n" for message in messages))


CHAT_TEMPLATES: dict[str, Callable] = {"plain": plain_prompt, TEMPLATE_NAME: chat_prompt}


def chat_template(name: str) -> Callable:
    """The prompt function of the chat template called `name`."""
    if name not in CHAT_TEMPLATES:
        raise LilllmError(f"unknown chat template {name!r}: choose one of {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def stop_ids(tokenizer: Tokenizer) -> list[int]:
    """End of text and end of turn: where a document or a chat reply ends."""
    return [tokenizer.special_ids[BEGIN], tokenizer.special_ids[END]]


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
    rows = import_datasets().load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    if len(rows) == 0:
        raise LilllmError(f"chat data file {path} holds no conversations")
    return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in rows["messages"]]
