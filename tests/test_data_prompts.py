"""Prompt encoding with SmolLM2's real tokenizer and chat template."""

import copy
import os
from pathlib import Path

import pytest

from flexfed.data import (
    IGNORE_INDEX,
    encode_for_training,
    encode_prompt,
    end_of_turn_id,
    load_prompt_completion_dir,
    messages,
    user_content,
)

SHARED_DATA = Path(os.environ.get("FLEXFED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

DEFINITION = "Write the larger of the two numbers."
ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"


def long_input(words: int = 600) -> str:
    return " ".join(f"word{i}" for i in range(words)) + " Question: which number is larger, 3 or 7?"


def split(encoded):
    """(prompt ids, response ids) of an encoded example, cut where the labels start."""
    start = next(i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    return encoded.input_ids[:start], encoded.input_ids[start:]


def test_messages_layout():
    assert messages(DEFINITION, "3, 7") == [{"role": "user", "content": f"{DEFINITION}\n\nInput: 3, 7"}]
    assert messages("", "  Is the sky blue?\n") == [{"role": "user", "content": "Is the sky blue?"}]
    assert user_content("  ", "x") == "x"


def test_end_of_turn_is_read_from_the_template(tokenizer):
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert end_of_turn_id(plain) == plain.eos_token_id
    ids = encode_prompt(plain, DEFINITION, "3, 7", 100)
    assert tokenizer.decode(ids).endswith("Input: 3, 7\n\nOutput:\n")


def test_labels_mask_exactly_the_prompt(tokenizer):
    encoded = encode_for_training(tokenizer, DEFINITION, "3, 7", "7", max_tokens=256, max_response_tokens=32)
    prompt, response = split(encoded)
    assert encoded.labels == [IGNORE_INDEX] * len(prompt) + response
    assert len(encoded.input_ids) == len(encoded.labels)
    assert not encoded.truncated_prompt and not encoded.truncated_response
    assert tokenizer.decode(response) == "7<|im_end|>"
    # The prompt is the chat template's own rendering with the generation prompt.
    rendered = tokenizer.apply_chat_template(messages(DEFINITION, "3, 7"), tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert prompt == encode_prompt(tokenizer, DEFINITION, "3, 7", max_prompt_tokens=256)


def test_long_prompt_is_cut_from_the_left_of_the_input(tokenizer):
    target = "7 is the larger number."
    full = encode_prompt(tokenizer, DEFINITION, long_input(), max_prompt_tokens=100_000)
    encoded = encode_for_training(tokenizer, DEFINITION, long_input(), target, max_tokens=128, max_response_tokens=32)
    prompt, response = split(encoded)
    assert 128 - 16 <= len(encoded.input_ids) <= 128
    assert encoded.truncated_prompt and not encoded.truncated_response
    assert tokenizer.decode(response) == target + "<|im_end|>"  # the response is never cut for the prompt

    text = tokenizer.decode(prompt)
    header = tokenizer.decode(full).split(DEFINITION)[0]
    assert header.endswith("<|im_start|>user\n")
    assert text.startswith(header + DEFINITION + "\n\nInput: word")  # header and definition intact, whole words
    assert text.endswith("Question: which number is larger, 3 or 7?" + ASSISTANT_HEADER)
    assert "word0 " not in text and "word599" in text  # the input's start went, its end stayed

    # Generation sees exactly the prompt that training saw.
    assert encode_prompt(tokenizer, DEFINITION, long_input(), max_prompt_tokens=128 - len(response)) == prompt


def test_definition_gives_way_only_after_the_input(tokenizer):
    definition = " ".join(["Read carefully."] * 40)
    full = encode_prompt(tokenizer, definition, "abc", max_prompt_tokens=10_000)
    ids = encode_prompt(tokenizer, definition, "abc", max_prompt_tokens=len(full) - 20)
    assert len(full) - 20 - 16 <= len(ids) <= len(full) - 20
    assert tokenizer.decode(ids).endswith("\n\nInput:" + ASSISTANT_HEADER)


def test_long_response_is_cut_and_flagged(tokenizer):
    target = " ".join(["answer"] * 50)
    encoded = encode_for_training(tokenizer, DEFINITION, "3, 7", target, max_tokens=256, max_response_tokens=8)
    prompt, response = split(encoded)
    assert encoded.truncated_response and not encoded.truncated_prompt
    assert len(response) == 8
    assert end_of_turn_id(tokenizer) not in response  # the true answer goes on: do not teach a stop here
    assert tokenizer.decode(response).strip() == " ".join(["answer"] * 8)


def test_budget_too_small_for_the_template_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="chat template alone"):
        encode_for_training(tokenizer, DEFINITION, "3, 7", "7", max_tokens=20, max_response_tokens=8)
    with pytest.raises(ValueError, match="chat template alone"):
        encode_prompt(tokenizer, "", long_input(), max_prompt_tokens=5)
    with pytest.raises(ValueError, match="max_response_tokens < max_tokens"):
        encode_for_training(tokenizer, DEFINITION, "3, 7", "7", max_tokens=8, max_response_tokens=8)


def test_real_p3_prompts_fit(tokenizer):
    """Summarisation prompts in the P3 sample are long; all must encode within a small budget."""
    file = SHARED_DATA / "p3-tasks" / "cnn_dailymail_3_0_0_tldr_summary.jsonl"
    if not file.exists():
        pytest.skip(f"real sample data not found at {file} (set FLEXFED_SHARED_DATA)")
    (task,) = load_prompt_completion_dir(file, max_examples_per_task=10)
    for example in task.examples:
        encoded = encode_for_training(tokenizer, "", example.input, example.target, 208, max_response_tokens=48)
        assert len(encoded.input_ids) <= 208
        assert tokenizer.decode(encoded.input_ids).endswith(ASSISTANT_HEADER + tokenizer.decode(split(encoded)[1]))
