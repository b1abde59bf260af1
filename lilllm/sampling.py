"""Sampling and generation: turn a model's next-token logits into text, one token at a time.

Picking the next token (`sample_next`) runs the logits of the last position through small
filters, each a function of its own, in a fixed order (Hugging Face's):

1. temperature: logits / T, in fp32. T < 1 sharpens, T > 1 flattens; T = 0 means greedy;
2. top-k (Fan et al., arXiv 1805.04833): keep the k highest logits; 0 switches it off;
3. top-p, nucleus sampling (Holtzman et al., arXiv 1904.09751): keep the smallest set of
   most likely tokens whose probabilities add up to at least p, the token that crosses p
   included; 1 switches it off.

Then one draw from the softmax of what is left, with a seeded `torch.Generator`. Greedy
decoding (T = 0 or k = 1) takes the argmax and draws nothing. Every function checks its own
settings: called directly with a negative temperature or a top-p of 2, it says so.

Generating (`generate_tokens`) runs the prompt through the model once ("prefill") into a
KV cache, then feeds one new token per step. Past the model's context (`block_size`) the
cache becomes a rolling window of the most recent positions: with rotary positions the
oldest position drops out and the new token keeps its true position (attention scores
depend only on distances); learned or sinusoidal positions end at block_size, so each step
past it recomputes the last block_size tokens from a fresh cache. `use_cache=False` always
recomputes, for comparison. `stream` yields the text as it comes, never half a character.
"""

import codecs
from collections.abc import Iterable, Iterator

import torch

from lilllm import LilllmError
from lilllm.model import GPT
from lilllm.runtime import autocast_context

# --- choosing the next token --------------------------------------------------------------


def check_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Raise a LilllmError naming the setting unless all three are in range."""
    if not temperature >= 0:  # also catches NaN
        raise LilllmError(f"temperature={temperature} is negative: use 0 for greedy, or a positive value (1 = unchanged)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise LilllmError(f"top_k={top_k!r} must be a whole number ≥ 0 (0 switches top-k off)")
    if not 0 < top_p <= 1:
        raise LilllmError(f"top_p={top_p} must lie in (0, 1] (1 switches top-p off)")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T, in fp32 (a tiny T would overflow fp16 or bf16). T must be > 0."""
    check_sampling(temperature=temperature)
    if temperature == 0:
        raise LilllmError("temperature=0 means greedy: take the argmax (sample_next does) instead of dividing by 0")
    return logits.float() / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits (and any tied with the k-th), set the others to -inf."""
    check_sampling(top_k=k)
    if k == 0:
        raise LilllmError("top_k=0 switches top-k off: skip the filter (process_logits does) instead of keeping 0 tokens")
    k = min(k, logits.size(-1))
    kth_highest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_highest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probabilities add up to at least p (the
    token that crosses p is kept, so at least one token always is); -inf elsewhere."""
    check_sampling(top_p=p)
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    keep = mass_before < p  # True for a prefix of the sorted tokens, never empty
    n_keep = keep.sum(dim=-1, keepdim=True)  # (..., 1)
    cutoff = sorted_logits.gather(-1, n_keep - 1)  # the least likely kept logit
    return logits.masked_fill(logits < cutoff, float("-inf"))  # ties with the cutoff stay


def is_greedy(temperature: float, top_k: int) -> bool:
    """T = 0 and k = 1 both mean: always the most likely token."""
    return temperature == 0 or top_k == 1


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (each skipped at its neutral value). The result's
    softmax is the distribution `sample_next` draws from. Needs temperature > 0."""
    check_sampling(temperature, top_k, top_p)
    if temperature != 1:
        logits = apply_temperature(logits, temperature)
    if top_k:
        logits = top_k_filter(logits, top_k)
    if top_p < 1:
        logits = top_p_filter(logits, top_p)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token id for each row of logits (..., V) → (...). Greedy takes the argmax
    and draws no random number; otherwise one draw from the processed distribution."""
    check_sampling(temperature, top_k, top_p)
    if is_greedy(temperature, top_k):
        return logits.argmax(dim=-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # (..., V)
    flat = probs.reshape(-1, probs.size(-1))  # (N, V): multinomial wants 1 or 2 dimensions
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


# --- generating ---------------------------------------------------------------------------


def check_prompt(prompt_ids, vocab_size: int) -> list[int]:
    """The prompt as a list of ids, refusing an empty prompt or ids outside the vocabulary."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise LilllmError("the prompt is empty: give at least one token to continue from")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise LilllmError(f"prompt token id {bad} is outside the model's vocabulary (0 to {vocab_size - 1}): "
                          "encode the prompt with the tokenizer the model was trained with")
    return ids


def generate_tokens(model: GPT, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, stop_ids: Iterable[int] = (), seed: int | None = None,
                    use_cache: bool = True) -> Iterator[int]:
    """New token ids after `prompt_ids`, one at a time, until a stop id (not yielded) or
    `max_new_tokens`. `seed` makes sampling reproducible (None: torch's global generator).
    Every setting is checked here, before anything runs; the model is put in eval mode."""
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise LilllmError(f"max_new_tokens={max_new_tokens!r} must be a whole number ≥ 0")
    ids = check_prompt(prompt_ids, model.config.vocab_size)
    model.eval()  # no dropout: the same tokens in, the same logits out
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    return _generate(model, ids, max_new_tokens, (temperature, top_k, top_p), set(stop_ids), generator,
                     use_cache, device)


@torch.no_grad()
def _generate(model, ids, max_new_tokens, sampling, stop_ids, generator, use_cache, device) -> Iterator[int]:
    block_size = model.config.block_size
    rolling = model.config.rotary  # rotary positions have no last position
    cache = None

    def logits_of(new_ids, cache=None):
        with autocast_context(device):  # bf16 on CUDA
            logits, _ = model(torch.tensor([new_ids], device=device), cache=cache)  # (1, T, V)
        return logits[0, -1].float()  # (V,): the next token's logits

    for _ in range(max_new_tokens):
        if not use_cache:  # recompute the whole (last block_size tokens of the) context
            logits = logits_of(ids[-block_size:])
        elif cache is None or (len(cache) == block_size and not rolling):
            cache = model.new_cache()  # prefill: the prompt, or a fresh window past the context
            logits = logits_of(ids[-block_size:], cache)
        else:
            if len(cache) == block_size:
                cache.crop(block_size - 1)  # the oldest position leaves; the next keeps its true position
            logits = logits_of(ids[-1:], cache)
        next_id = sample_next(logits, *sampling, generator=generator).item()
        if next_id in stop_ids:
            return
        ids.append(next_id)
        yield next_id


def generate(model: GPT, prompt_ids, max_new_tokens: int, **options) -> list[int]:
    """The new token ids as a list; `options` as for `generate_tokens`."""
    return list(generate_tokens(model, prompt_ids, max_new_tokens, **options))


def decode_stream(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces for a stream of ids. A token may end in the middle of a multi-byte UTF-8
    character; its bytes wait until the character is complete. Joined, the pieces equal
    `tokenizer.decode(ids)`."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        text = decoder.decode(tokenizer.decode_bytes([token]))
        if text:
            yield text
    tail = decoder.decode(b"", final=True)  # an unfinished character at the very end
    if tail:
        yield tail


def stream(model: GPT, tokenizer, prompt_ids, max_new_tokens: int, **options) -> Iterator[str]:
    """The continuation of `prompt_ids` as text, piece by piece as it is generated."""
    return decode_stream(tokenizer, generate_tokens(model, prompt_ids, max_new_tokens, **options))


def until_blank_line(pieces: Iterable[str]) -> Iterator[str]:
    """The text pieces up to the first blank line, which is left out: where a speech of a play
    ends, so a pretrained model's reply ends there too. A newline waits for the next piece,
    which shows whether it starts a blank line."""
    pending = ""
    for piece in pieces:
        text = pending + piece
        end = text.find("\n\n")
        if end >= 0:
            if end > 0:
                yield text[:end]
            return
        kept = text.rstrip("\n")  # at most one newline waits: two would have been a blank line
        pending = text[len(kept):]
        if kept:
            yield kept


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A text prompt as ids, refusing an empty one (a character tokenizer also refuses
    characters it has never seen)."""
    if not text:
        raise LilllmError("the prompt is empty: give some text to continue from")
    return tokenizer.encode(text)
