import pytest
import torch

from flexfed.data import encode_for_training, encode_prompt
from flexfed.evaluation import EvalItem, aggregate, evaluate, evaluation_loss, generate, rouge_l
from flexfed.models import tiny_llama


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("the cat sat", ["the cat sat"]) == 1.0
    assert rouge_l("paris", ["london", "Paris"]) == 1.0
    assert rouge_l("", ["something"]) == 0.0
    assert 0 < rouge_l("the big cat", ["the cat"]) < 1


def test_batched_left_padded_generation_equals_one_at_a_time(tokenizer):
    model = tiny_llama(seed=3)
    inputs = ["apple", "a much longer input with many more words in it", "river stone"]
    prompts = [encode_prompt(tokenizer, "Repeat the input.", x, 96) for x in inputs]
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone


def test_evaluate_reports_rouge_loss_and_categories(tokenizer):
    model = tiny_llama()
    items = [
        EvalItem(
            task=f"t{i}",
            category="even" if i % 2 == 0 else "odd",
            prompt_ids=tuple(encode_prompt(tokenizer, "Say yes.", str(i), 64)),
            references=("yes",),
            scored=encode_for_training(tokenizer, "Say yes.", str(i), "yes", 64, 8),
        )
        for i in range(4)
    ]
    out = evaluate(model, tokenizer, items, max_new_tokens=3, batch_size=2)
    assert set(out["rouge_l_by_category"]) == {"even", "odd"}
    assert 0 <= out["rouge_l"] <= 1 and len(out["predictions"]) == 4
    one_batch = evaluation_loss(model, items, tokenizer.pad_token_id, batch_size=4)
    two_batches = evaluation_loss(model, items, tokenizer.pad_token_id, batch_size=1)
    assert out["loss"] == pytest.approx(one_batch, rel=1e-5) == pytest.approx(two_batches, rel=1e-5)
    assert evaluate(model, tokenizer, [], 3, 2)["rouge_l"] is None


def test_aggregate_equal_per_task_and_weighted_by_task_size():
    """Hand-computed: task a (100 examples) scores 1.0 and 0.0, b (300) 0.2, c (100) 0.6 and 0.8.

    Task means a 0.5, b 0.2, c 0.7; equal-weight mean (0.5 + 0.2 + 0.7) / 3 = 0.4667; weighted
    by size (100·0.5 + 300·0.2 + 100·0.7) / 500 = 0.36; the item mean would be 2.6 / 5 = 0.52.
    """
    def item(task, category, size):
        return EvalItem(task, category, (1,), ("r",), None, task_size=size)

    items = [item("a", "x", 100), item("a", "x", 100), item("b", "y", 300), item("c", "y", 100), item("c", "y", 100)]
    out = aggregate([1.0, 0.0, 0.2, 0.6, 0.8], items)
    assert out["rouge_l_by_task"] == pytest.approx({"a": 0.5, "b": 0.2, "c": 0.7})
    assert out["rouge_l"] == pytest.approx(1.4 / 3)
    assert out["rouge_l_weighted"] == pytest.approx(0.36)
    assert out["rouge_l_by_category"] == pytest.approx({"x": 0.5, "y": 1.6 / 3})
