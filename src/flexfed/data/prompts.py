"""Turn (definition, input, target) into token ids with the model's own chat template.

Training sequences are ``prompt + response + end-of-turn`` with the loss on the response and
the end-of-turn token only (labels are -100 on the prompt), so the model learns to answer and
to stop, which greedy decoding for Rouge-L relies on. Generation prompts are built by the same
code, so what the model sees at evaluation is exactly the prompt part it was trained on.

Long inputs are cut from the left of the input text: the template's header (system prompt,
user turn marker) and its generation prompt (the assistant turn marker) always survive, and the
response is never cut to make room for the prompt. A response longer than
``max_response_tokens`` is cut, and flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

IGNORE_INDEX = -100  # labels with this value carry no loss (PyTorch cross-entropy's default)


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated_prompt: bool
    truncated_response: bool


def user_content(definition: str, example_input: str) -> str:
    """The user turn: the task definition, a blank line, then the input (or just the input)."""
    definition, example_input = definition.strip(), example_input.strip()
    return f"{definition}\n\nInput: {example_input}" if definition else example_input


def messages(definition: str, example_input: str) -> list[dict]:
    return [{"role": "user", "content": user_content(definition, example_input)}]


def encode_prompt(tokenizer, definition: str, example_input: str, max_prompt_tokens: int) -> list[int]:
    """Token ids of the prompt for generation, ending with the assistant turn marker."""
    ids, _ = _encode_prompt(tokenizer, definition, example_input, max_prompt_tokens)
    return ids


def encode_for_training(
    tokenizer,
    definition: str,
    example_input: str,
    target: str,
    max_tokens: int,
    max_response_tokens: int,
) -> EncodedExample:
    """Prompt and response ids with labels masking the prompt; at most ``max_tokens`` in all.

    The response is ``target`` followed by the template's end-of-turn token. If it is longer
    than ``max_response_tokens`` it is cut to that length and loses the end-of-turn token (the
    real answer goes on, so the model must not learn to stop there); ``truncated_response``
    says so. The prompt gets the rest of the budget.
    """
    if not 1 <= max_response_tokens < max_tokens:
        raise ValueError(f"need 1 <= max_response_tokens < max_tokens, got {max_response_tokens} and {max_tokens}")
    response = tokenizer(target.strip(), add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    truncated_response = len(response) > max_response_tokens
    if truncated_response:
        response = response[:max_response_tokens]
    prompt, truncated_prompt = _encode_prompt(tokenizer, definition, example_input, max_tokens - len(response))
    return EncodedExample(
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
        truncated_prompt=truncated_prompt,
        truncated_response=truncated_response,
    )


@lru_cache(maxsize=16)
def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in this tokenizer's chat template.

    Read off the template rather than assumed: render a conversation whose assistant turn is a
    probe string and take the special token right after the probe (``<|im_end|>`` for
    SmolLM2, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma). Without a chat
    template, or if no special token follows, it is the EOS token.
    """
    fallback = tokenizer.eos_token_id
    if not getattr(tokenizer, "chat_template", None):
        return fallback
    probe = "flexfed end-of-turn probe"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    after = text[text.rindex(probe) + len(probe) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    if ids and ids[0] in special:
        return ids[0]
    if fallback is None:
        raise ValueError("cannot find the end-of-turn token: the chat template adds none and the tokenizer has no EOS")
    return fallback


_MAX_EXTRA_CUT = 16  # text without spaces (e.g. Chinese) has no word boundary to find


def _starts_word(text: str, position: int) -> bool:
    return text[position].isspace() or position == 0 or text[position - 1].isspace()


def _render(tokenizer, content: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    # A base model without a chat template: a plain layout that ends where the answer starts.
    return f"{tokenizer.bos_token or ''}{content}\n\nOutput:\n"


def _encode_prompt(tokenizer, definition: str, example_input: str, budget: int) -> tuple[list[int], bool]:
    """Prompt ids within ``budget`` tokens, cutting the input (then the definition) from the left."""
    definition, example_input = definition.strip(), example_input.strip()
    content = user_content(definition, example_input)
    text = _render(tokenizer, content)
    start = text.find(content)
    if start < 0:
        raise ValueError("the chat template altered the user message, so the input cannot be located for truncation")
    end = start + len(content)
    # Character spans that may be cut, in the order they give way.
    cuttable = [(end - len(example_input), end)]
    if definition:
        cuttable.append((start, start + len(definition)))

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    excess = len(ids) - budget
    if excess <= 0:
        return ids, False

    dropped: list[int] = []
    for lo, hi in cuttable:
        needed = excess - len(dropped)
        # A token overlapping the span belongs to it (" The" carries the space before the input).
        inside = [i for i, (a, b) in enumerate(offsets) if a < hi and b > lo]
        cut = min(needed, len(inside))
        # Cut a little more so the kept text starts on a word, not mid-word ("Input:83 ...").
        while 0 < cut < len(inside) and cut - needed < _MAX_EXTRA_CUT:
            if _starts_word(text, offsets[inside[cut]][0]):
                break
            cut += 1
        dropped += inside[:cut]
        if len(dropped) >= excess:
            gone = set(dropped)
            return [t for i, t in enumerate(ids) if i not in gone], True
    fixed = len(ids) - len(dropped)
    raise ValueError(
        f"the prompt needs {fixed} tokens for the chat template alone but only {budget} are left "
        f"(max tokens minus the response); raise max_tokens or lower max_response_tokens"
    )
