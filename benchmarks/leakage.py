"""Evaluation leakage on P3-style data, before and after holding out by source instance.

An evaluation input leaks when its word set overlaps a client's training input of the same
category by Jaccard > 0.6 (`word_overlap_leaks`). "Before" is the per-example hold-out up to
issue 9 (`example_holdout`): seen-test examples drawn per template, nothing removed for unseen
tasks; on the 250 P3 tasks with the default config it gives the issue's 356 of 376 (seen
examples, holdout_by=category). "After" is `held_out_splits`. The evaluated inputs are the
64 seen, 32 validation and 64 unseen examples of the default config; "unseen 200" is the
issue's larger unseen sample. Run: python benchmarks/leakage.py [P3 DIR]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from flexfed.config import validate
from flexfed.data import load_prompt_completion_dir, split_tasks, template_words, word_overlap_leaks
from flexfed.data.sampling import rng
from flexfed.federation import evaluated, held_out_splits

TEMPLATE_WORDS: dict[str, frozenset[str]] = {}


def example_holdout(tasks, per_task: int, seed: int):
    """The hold-out up to issue 9, draw for draw: ``per_task`` random examples of each task, by example."""
    train, evaluation = [], []
    for task in tasks:
        held = set(rng(seed, "holdout_examples", task.name).sample(range(len(task)), min(per_task, len(task) // 2)))
        train.append(replace(task, examples=tuple(x for i, x in enumerate(task.examples) if i not in held)))
        if held:
            evaluation.append(replace(task, examples=tuple(x for i, x in enumerate(task.examples) if i in held)))
    return train, evaluation


def count(evaluation, training) -> str:
    """Leaking inputs by the issue's measure (all words) and by content words (template words left out)."""
    raw = word_overlap_leaks(evaluation, training)
    content = word_overlap_leaks(evaluation, training, ignore=TEMPLATE_WORDS)
    return f"{len(raw)} ({len(content)} by content) of {sum(len(t) for t in evaluation)}"


def main(path: str) -> None:
    tasks = load_prompt_completion_dir(path)
    TEMPLATE_WORDS.update(template_words(tasks))
    for by in ("category", "task"):
        config = validate({"data": {"source": "prompt-completion", "path": path, "holdout_by": by}, "eval": {"seen_examples_per_task": 2}})
        e = config.eval
        seen, unseen = split_tasks(tasks, config.data.unseen_fraction, config.seed, by=by)
        train, seen_test = example_holdout(seen, e.seen_examples_per_task, config.seed)
        print(f"holdout_by={by}, before: all held-out seen {count(seen_test, train)}; evaluated: seen "
              f"{count(evaluated(seen_test, e.seen_examples, config.seed), train)}, unseen "
              f"{count(evaluated(unseen, e.unseen_examples, config.seed), train)}, unseen 200 "
              f"{count(evaluated(unseen, 200, config.seed), train)}; {sum(len(t) for t in train)} training examples")
        began = time.perf_counter()
        splits = held_out_splits(config, tasks)
        took = time.perf_counter() - began
        print(f"holdout_by={by}, after: evaluated: seen {count(splits['seen'], splits['train'])}, "
              f"validation {count(splits['validation'], splits['train'])}, unseen {count(splits['unseen'], splits['train'])}; "
              f"{sum(len(t) for t in splits['train'])} training examples; splits in {took:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/p3-tasks")
