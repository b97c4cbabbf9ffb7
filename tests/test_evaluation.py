import pytest

from flexfed.data import encode_for_training, encode_prompt
from flexfed import evaluation
from flexfed.evaluation import EvalItem, aggregate, evaluate, evaluation_loss, generate, rouge_l
from flexfed.models import tiny_llama


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("the cat sat", ["the cat sat"]) == 1.0
    assert rouge_l("paris", ["london", "Paris"]) == 1.0  # lower-cased before matching
    assert rouge_l("", ["something"]) == 0.0
    # LCS("the big cat", "the cat") = 2 words: P = 2/3, R = 2/2, F = 2PR / (P + R) = 4/5
    assert rouge_l("the big cat", ["the cat"]) == pytest.approx(4 / 5, abs=1e-12)
    assert rouge_l("the big cat", ["dog", "the cat"]) == pytest.approx(4 / 5, abs=1e-12)
    # LCS("a b c d e", "a x c y e") = a c e: P = R = 3/5, F = 3/5
    assert rouge_l("a b c d e", ["a x c y e"]) == pytest.approx(3 / 5, abs=1e-12)


def test_rouge_l_stems_words_longer_than_three_letters():
    """Porter stemming (rouge-score stems tokens of 4+ letters): "cats" -> "cat", "running" and
    "runs" -> "run". Stemmed, LCS("the cat are run", "the cat run") = 3: P = 3/4, R = 1, F = 6/7.
    Without stemming only "the" matches: P = 1/4, R = 1/3, F = 2/7."""
    from rouge_score import rouge_scorer

    prediction, reference = "the cats are running", "the cat runs"
    assert rouge_l(prediction, [reference]) == pytest.approx(6 / 7, abs=1e-12)
    unstemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].fmeasure
    assert unstemmed == pytest.approx(2 / 7, abs=1e-12)


def test_batched_left_padded_generation_equals_one_at_a_time(tokenizer):
    model = tiny_llama(seed=3)
    inputs = ["apple", "a much longer input with many more words in it", "river stone"]
    prompts = [encode_prompt(tokenizer, "Repeat the input.", x, 96) for x in inputs]
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert together == alone


def test_evaluate_reports_rouge_loss_and_categories(tokenizer, monkeypatch):
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
    assert set(out["rouge_l_by_category"]) == {"even", "odd"} and len(out["predictions"]) == 4
    # With known predictions the scores are known: "yes" 1, "no" 0, "yes please" 2/3
    # (P = 1/2, R = 1), "" 0; mean 5/12, even items (0, 2) 5/6, odd items (1, 3) 0.
    monkeypatch.setattr(evaluation, "generate", lambda *args, **kw: ["yes", "no", "Yes please", ""])
    known = evaluate(model, tokenizer, items, max_new_tokens=3, batch_size=2)
    assert known["rouge_l"] == pytest.approx(5 / 12, abs=1e-12)
    assert known["rouge_l_by_category"] == pytest.approx({"even": 5 / 6, "odd": 0.0}, abs=1e-12)
    assert [p["rouge_l"] for p in known["predictions"]] == pytest.approx([1.0, 0.0, 2 / 3, 0.0], abs=1e-12)
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
