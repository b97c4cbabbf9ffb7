"""Seen/unseen splits, held-out examples and client partitions: coverage, determinism, skew, scale."""

import math
import time
from collections import Counter

import numpy as np
import pytest

from flexfed.data import (
    ClientShard,
    Example,
    Task,
    by_task,
    dirichlet,
    builtin_suite,
    holdout_examples,
    iid,
    load_prompt_completion_dir,
    materialize,
    partition,
    source_instances,
    split_tasks,
    task_table,
    template_words,
    word_overlap_leaks,
    words,
)


def make_tasks(num_tasks: int, examples: int | list[int], num_categories: int) -> list[Task]:
    sizes = examples if isinstance(examples, list) else [examples] * num_tasks
    return [
        Task(
            name=f"t{k}",
            category=f"c{k % num_categories}",
            definition=f"Do task {k}.",
            examples=tuple(Example(f"t{k} input {i}", (f"out {i}",)) for i in range(sizes[k])),
        )
        for k in range(num_tasks)
    ]


def assigned(shards: list[ClientShard]) -> Counter:
    return Counter((name, i) for s in shards for name, indices in s.parts for i in indices)


def assert_each_example_once(tasks: list[Task], shards: list[ClientShard]) -> None:
    counts = assigned(shards)
    assert set(counts.values()) == {1}
    assert set(counts) == {(t.name, i) for t in tasks for i in range(len(t))}


def mean_category_entropy(shards: list[ClientShard], tasks: list[Task]) -> float:
    category = {t.name: t.category for t in tasks}
    entropies = []
    for shard in shards:
        counts = Counter()
        for name, indices in shard.parts:
            counts[category[name]] += len(indices)
        p = np.array(list(counts.values())) / shard.num_examples
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


# ---------------------------------------------------------------- split_tasks


def test_split_by_category_holds_out_whole_categories():
    tasks = make_tasks(40, 3, 8)
    seen, unseen = split_tasks(tasks, unseen_fraction=0.25, seed=0)
    seen_categories, unseen_categories = {t.category for t in seen}, {t.category for t in unseen}
    assert len(unseen_categories) == 2 and not seen_categories & unseen_categories
    assert sorted(t.name for t in seen + unseen) == sorted(t.name for t in tasks)
    assert [t.name for t in seen] == [t.name for t in tasks if t in seen]  # input order kept
    assert split_tasks(tasks, 0.25, seed=0) == (seen, unseen)
    assert {
        frozenset(t.category for t in split_tasks(tasks, 0.25, seed=s)[1]) for s in range(10)
    } != {frozenset(unseen_categories)}


def test_split_by_task_and_explicit_names():
    tasks = make_tasks(10, 3, 2)
    seen, unseen = split_tasks(tasks, 0.3, seed=1, by="task")
    assert len(unseen) == 3 and len(seen) == 7
    seen, unseen = split_tasks(tasks, 0.5, seed=0, unseen=["c1"])
    assert {t.category for t in unseen} == {"c1"} and {t.category for t in seen} == {"c0"}


def test_split_rounds_to_at_least_one_and_keeps_one():
    tasks = make_tasks(8, 2, 8)
    assert len(split_tasks(tasks, 0.01, seed=0)[1]) == 1
    assert len(split_tasks(tasks, 0.99, seed=0)[0]) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"unseen_fraction": 0.0}, "strictly between 0 and 1"),
        ({"unseen_fraction": 1.0}, "strictly between 0 and 1"),
        ({"unseen_fraction": 0.5, "by": "source"}, "by must be"),
        ({"unseen_fraction": 0.5, "unseen": ["c9"]}, "not among"),
        ({"unseen_fraction": 0.5, "unseen": ["c0", "c1"]}, "leaves one side empty"),
    ],
)
def test_split_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_tasks(make_tasks(4, 2, 2), seed=0, **kwargs)


def test_split_needs_two_groups():
    with pytest.raises(ValueError, match="need at least 2"):
        split_tasks(make_tasks(3, 2, 1), 0.5, seed=0)


# ---------------------------------------------------------------- holdout_examples


def test_holdout_examples_are_disjoint_and_complete():
    tasks = make_tasks(5, [1, 3, 10, 40, 100], 2)
    train, evaluation = holdout_examples(tasks, per_task=8, seed=0)
    assert [t.name for t in train] == [t.name for t in tasks]
    assert [t.name for t in evaluation] == ["t1", "t2", "t3", "t4"]  # t0 has nothing to spare
    held = {t.name: t for t in evaluation}
    for original, kept in zip(tasks, train):
        out = held.get(original.name)
        out_examples = out.examples if out else ()
        assert len(out_examples) == min(8, len(original) // 2)
        assert not set(kept.examples) & set(out_examples)
        assert sorted(kept.examples + out_examples, key=original.examples.index) == list(original.examples)
        assert kept.definition == original.definition and kept.category == original.category
    assert holdout_examples(tasks, 8, seed=0) == (train, evaluation)
    assert holdout_examples(tasks, 8, seed=1) != (train, evaluation)
    with pytest.raises(ValueError, match="per_task"):
        holdout_examples(tasks, 0, seed=0)


# ---------------------------------------------------------------- source instances


def passage(i: int) -> str:
    """Twelve words no other passage uses: one source instance's text."""
    return " ".join(f"p{i}w{j}" for j in range(12))


def sibling_templates() -> list[Task]:
    """Two templates of one dataset over passages 0-9 and 5-14 (5-9 under both), as P3 has them,
    and another dataset that happens to quote passage 0."""
    def task(name, category, texts):
        return Task(name, category, "", tuple(Example(t, ("x",)) for t in texts))

    return [
        task("news_topic", "news", [f"Article: {passage(i)}\nWhat is the topic of this article?" for i in range(10)]),
        task("news_section", "news", [f"{passage(i)}\n\nWhich section of the newspaper would this go in?" for i in range(5, 15)]),
        task("quotes_who", "quotes", [f"Who wrote this: {passage(0)}"] + [f"Who wrote this: {passage(i)}" for i in range(20, 29)]),
    ]


def test_source_instances_group_one_passage_under_sibling_templates():
    topic, section, quotes = sibling_templates()
    instances = source_instances([topic, section, quotes])
    of = lambda task: [instances[e] for e in task.examples]
    assert of(topic)[5:] == of(section)[:5]  # passages 5-9 are one instance under both templates
    assert of(quotes)[0] == of(topic)[0]  # a quoted passage is the same instance in another dataset
    assert len(set(instances.values())) == 10 + 5 + 9  # nothing else is merged
    assert sorted(source_instances([quotes]).values()) == list(range(10))  # nothing shared: all apart


def test_holdout_examples_hold_out_whole_instances():
    tasks = sibling_templates()[:2]
    instances = source_instances(tasks)
    for seed in range(5):
        train, evaluation = holdout_examples(tasks, 2, seed, instances)
        trained = {instances[e] for t in train for e in t.examples}
        assert [len(t) for t in evaluation] == [2, 2]
        assert not trained & {instances[e] for t in evaluation for e in t.examples}
        # Nothing but the held-out instances leaves training.
        assert sum(len(t) for t in train) == 20 - sum(1 for t in tasks for e in t.examples if instances[e] not in trained)
    with pytest.raises(ValueError, match=r"do not cover every example of tasks \['news_section'\]"):
        holdout_examples(tasks, 2, 0, source_instances(tasks[:1]))
    # Example by example (every example its own instance), a sibling's copy stays in training.
    leaked = []
    for seed in range(5):
        train, evaluation = holdout_examples(tasks, 2, seed)
        trained = {instances[e] for t in train for e in t.examples}
        leaked += [e for t in evaluation for e in t.examples if instances[e] in trained]
    assert leaked


def test_builtin_suite_groups_only_near_copies():
    """The built-in families draw every example independently: the grouping may merge only inputs
    that differ in a word or two ("Amir/Lucas moved to Athens last year.")."""
    tasks = builtin_suite(examples_per_task=32, seed=0)
    instances = source_instances(tasks)
    members: dict[int, set[str]] = {}
    for task in tasks:
        for example in task.examples:
            members.setdefault(instances[example], set()).add(example.input)
    for inputs in members.values():
        first, *others = [set(words(x)) for x in inputs]
        assert all(len(first ^ other) <= 4 for other in others), inputs


@pytest.fixture(scope="module")
def p3(shared_data):
    """The P3 tasks, their source instances and template words (computed once: seconds each)."""
    path = shared_data / "p3-tasks"
    tasks = load_prompt_completion_dir(path)
    return path, tasks, source_instances(tasks), template_words(tasks)


@pytest.mark.parametrize("holdout_by", ["category", "task"])
def test_no_evaluated_input_is_a_near_copy_of_a_training_input_on_p3(p3, holdout_by):
    """Issue 9: held out example by example, 356 of 376 seen-task evaluation inputs overlapped a
    training input of their category by word Jaccard > 0.6. Now no evaluated input (seen test,
    validation, unseen) does, counting content words (each task's template words left out), and
    none shares a source instance with a training input."""
    from flexfed.config import validate
    from flexfed.federation import held_out_splits

    path, tasks, instances, ignore = p3
    config = validate({"data": {"source": "prompt-completion", "path": str(path), "holdout_by": holdout_by}})
    splits = held_out_splits(config, tasks)
    assert [sum(len(t) for t in splits[k]) for k in ("seen", "validation", "unseen")] == [64, 32, 64]
    for split in ("seen", "validation", "unseen"):
        assert word_overlap_leaks(splits[split], splits["train"], ignore=ignore) == [], split
    trained = {instances[e] for t in splits["train"] for e in t.examples}
    for split in ("seen", "validation", "unseen"):
        assert not trained & {instances[e] for t in splits[split] for e in t.examples}, split
    assert not {instances[e] for t in splits["seen"] for e in t.examples} & {instances[e] for t in splits["validation"] for e in t.examples}


# ---------------------------------------------------------------- partitioners


def test_by_task_one_client_per_task():
    tasks = make_tasks(6, [1, 5, 9, 2, 7, 3], 3)
    shards = by_task(tasks, seed=0)
    assert [s.client_id for s in shards] == [t.name for t in tasks]
    assert all(s.other_parts == () and s.category == t.category for s, t in zip(shards, tasks))
    assert_each_example_once(tasks, shards)


def test_by_task_cap_cuts_large_tasks():
    tasks = make_tasks(3, [10, 3, 25], 2)
    shards = by_task(tasks, seed=0, max_examples_per_client=4)
    assert_each_example_once(tasks, shards)
    assert all(s.num_examples <= 4 for s in shards)
    assert Counter(s.task for s in shards) == {"t0": 3, "t1": 1, "t2": 7}  # the fewest clients within the cap
    assert {s.num_examples for s in shards if s.task == "t2"} == {3, 4}  # near-equal pieces
    assert len({s.client_id for s in shards}) == len(shards)
    assert by_task(tasks, seed=0, max_examples_per_client=4) == shards
    assert by_task(tasks, seed=1, max_examples_per_client=4) != shards


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_covers_everything_and_leaves_no_client_empty(alpha):
    tasks = make_tasks(30, 20, 6)
    shards = dirichlet(tasks, num_clients=50, alpha=alpha, seed=0)
    assert len(shards) == 50 and len({s.client_id for s in shards}) == 50
    assert min(s.num_examples for s in shards) >= 1
    assert_each_example_once(tasks, shards)
    for shard in shards:  # the headline part is the largest
        assert len(shard.example_indices) == max(len(indices) for _, indices in shard.parts)
    assert dirichlet(tasks, 50, alpha, seed=0) == shards
    assert dirichlet(tasks, 50, alpha, seed=1) != shards


def test_small_alpha_skews_categories_more_than_large_alpha():
    tasks = make_tasks(40, 30, 8)
    entropy = {
        alpha: np.mean([mean_category_entropy(dirichlet(tasks, 40, alpha, seed=s), tasks) for s in range(3)])
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[0.1] < 0.5 * math.log(8)  # most clients see one or two categories
    assert entropy[100.0] > 0.85 * math.log(8)  # near uniform over all eight


def test_iid_equal_sizes_and_mixed_categories():
    tasks = make_tasks(12, 25, 4)
    shards = iid(tasks, num_clients=7, seed=0)
    assert_each_example_once(tasks, shards)
    sizes = [s.num_examples for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert iid(tasks, 7, seed=0) == shards
    assert mean_category_entropy(shards, tasks) > mean_category_entropy(dirichlet(tasks, 7, 0.1, seed=0), tasks)


@pytest.mark.parametrize("scheme", ["by_task", "dirichlet", "iid"])
def test_ten_thousand_clients_are_cheap(scheme):
    tasks = make_tasks(100, 110, 10)  # 11,000 examples
    options = {"by_task": {"max_examples_per_client": 1}, "dirichlet": {"num_clients": 10_000, "alpha": 0.5}}
    start = time.perf_counter()
    shards = partition(tasks, scheme, seed=0, **options.get(scheme, {"num_clients": 10_000}))
    assert time.perf_counter() - start < 5.0
    assert len(shards) >= 10_000
    assert_each_example_once(tasks, shards)
    # Shards are references: task names and ints, never Example objects.
    for shard in shards[:: len(shards) // 50]:
        for name, indices in shard.parts:
            assert isinstance(name, str) and isinstance(indices, tuple)
            assert all(type(i) is int for i in indices)


def test_partitioner_errors():
    tasks = make_tasks(2, 3, 1)
    with pytest.raises(ValueError, match="6 examples cannot give each of 7 clients"):
        iid(tasks, 7, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet(tasks, 2, 0.0, seed=0)
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
        partition(tasks, "shards", seed=0)
    with pytest.raises(ValueError, match="duplicate task name 't0'"):
        by_task(tasks + tasks[:1], seed=0)
    with pytest.raises(ValueError, match="max_examples_per_client"):
        by_task(tasks, seed=0, max_examples_per_client=0)


def test_partition_dispatches():
    tasks = make_tasks(6, 10, 3)
    assert partition(tasks, "dirichlet", seed=4, num_clients=5, alpha=0.5) == dirichlet(tasks, 5, 0.5, seed=4)
    assert partition(tasks, "by_task", seed=0) == by_task(tasks, seed=0)


# ---------------------------------------------------------------- materialize


def test_materialize_returns_the_shards_examples():
    tasks = make_tasks(4, 12, 2)
    table = task_table(tasks)
    (shard,) = by_task(tasks[1:2], seed=0, max_examples_per_client=None)
    ((task, examples),) = materialize(shard, table)
    assert task is tasks[1] and examples == list(tasks[1].examples)

    for shard in dirichlet(tasks, 3, 0.5, seed=0):
        groups = materialize(shard, table)
        assert [t.name for t, _ in groups] == list(shard.tasks)
        assert sum(len(examples) for _, examples in groups) == shard.num_examples
        for (task, examples), (_, indices) in zip(groups, shard.parts):
            assert examples == [task.examples[i] for i in indices]

    with pytest.raises(KeyError, match="unknown task 'nope'"):
        materialize(ClientShard("c", "nope", "x", (0,)), table)
    with pytest.raises(IndexError, match="out of range"):
        materialize(ClientShard("c", "t0", "c0", (99,)), table)


def test_records_validate():
    with pytest.raises(ValueError, match="at least one reference"):
        Example("in", ())
    with pytest.raises(TypeError, match="tuple of str"):
        Example("in", "out")
    with pytest.raises(ValueError, match="category is empty"):
        Task("t", "", "", ())


def test_inputs_too_short_for_a_shingle_are_each_their_own_instance():
    """Inputs of fewer than three words have no content to compare: each stays alone (this used
    to crash on the empty shingle arrays)."""
    from flexfed.data import source_instances
    from flexfed.data.types import Example, Task

    tasks = [Task(name=f"t{k}", category="c", definition="", examples=tuple(Example(f"t{k} {i}?", ("x",)) for i in range(4))) for k in range(2)]
    instances = source_instances(tasks)
    assert sorted(instances.values()) == list(range(8))
