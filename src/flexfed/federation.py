"""From a config to a federation: tasks, client shards, rank profiles and evaluation sets.

Both engines (the in-process simulator and Flower) build the same federation from the same
config and seed, so a client id means the same data everywhere.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flexfed.client import ClientFailure
from flexfed.config import RunConfig
from flexfed.data import (
    ClientShard,
    EncodedExample,
    Task,
    encode_for_training,
    encode_prompt,
    holdout_examples,
    instances_of,
    load_tasks,
    materialize,
    partition,
    source_instances,
    split_tasks,
    task_table,
    template_words,
    without_instances,
    word_overlap_leaks,
)
from flexfed.evaluation import EvalItem

log = logging.getLogger(__name__)


@dataclass
class Federation:
    tasks: dict[str, Task]  # what clients train on (seen tasks minus every held-out instance)
    clients: list[ClientShard]
    eval_seen: list[EvalItem]  # held-out instances of seen tasks: the seen test set
    eval_unseen: list[EvalItem]  # a fixed seeded subset of the unseen tasks
    eval_validation: list[EvalItem]  # other held-out instances of seen tasks: the best round is chosen on these
    seen_tasks: list[str]
    unseen_tasks: list[str]
    # The unseen tasks with all their examples, evaluated or not: no client owns them (KD's
    # proxy set may draw prompts from the examples that are not evaluated).
    unseen_all: list[Task] = field(default_factory=list)


def _subset(tasks: list[Task], limit: int, seed: int) -> list[tuple[Task, int]]:
    """Up to ``limit`` (task, example index) pairs, spread round-robin over tasks."""
    rng = random.Random(f"{seed}/eval-subset")
    queues = []
    for task in tasks:
        order = list(range(len(task)))
        rng.shuffle(order)
        queues.append((task, order))
    picked = []
    while len(picked) < limit and any(order for _, order in queues):
        for task, order in queues:
            if order and len(picked) < limit:
                picked.append((task, order.pop()))
    return picked


def encode_example(config: RunConfig, tokenizer, task: Task, example) -> EncodedExample:
    return encode_for_training(
        tokenizer, task.definition, example.input, example.target, config.data.max_tokens, config.data.max_response_tokens
    )


def evaluated(tasks: list[Task], limit: int, seed: int) -> list[Task]:
    """The ``limit`` examples of ``tasks`` that are evaluated (`_subset`), as tasks of those examples."""
    picked: dict[str, set[int]] = {}
    for task, i in _subset(tasks, limit, seed):
        picked.setdefault(task.name, set()).add(i)
    return [replace(t, examples=tuple(e for i, e in enumerate(t.examples) if i in picked[t.name])) for t in tasks if t.name in picked]


def eval_items(config: RunConfig, tokenizer, tasks: list[Task], sizes: Mapping[str, int]) -> list[EvalItem]:
    """Every example of ``tasks``, encoded for evaluation; ``sizes`` are the tasks' full sizes
    (examples in the data set), which weight the FlexLoRA-style aggregate."""
    prompt_budget = config.data.max_tokens - config.data.max_response_tokens
    return [
        EvalItem(
            task=task.name,
            category=task.category,
            prompt_ids=tuple(encode_prompt(tokenizer, task.definition, ex.input, prompt_budget)),
            references=ex.outputs,
            scored=encode_example(config, tokenizer, task, ex),
            task_size=sizes[task.name],
        )
        for task in tasks
        for ex in task.examples
    ]


def held_out_splits(config: RunConfig, tasks: list[Task]) -> dict[str, list[Task]]:
    """Seen/unseen split and hold-outs: training tasks and the evaluated seen, validation and unseen examples.

    Sibling templates of one source dataset reuse its instances (P3: one passage under five
    templates), so the hold-outs work on source instances (`source_instances`), not examples:

    - no instance of an unseen task is trained on (with ``holdout_by=task`` its sibling
      templates are seen tasks; with categories, instances shared across datasets);
    - a seen-test or validation example's instance leaves every task's training data;
    - validation instances are disjoint from seen-test ones: they are drawn after them.

    Last, a training input whose content words (template words left out) overlap an evaluated
    input of its category by Jaccard > 0.6 leaves training too: the grouping misses instances
    whose templates reorder their fields, and near-copies of one item are leaks as well.
    """
    d, e = config.data, config.eval
    instances = source_instances(tasks)
    seen, unseen = split_tasks(tasks, d.unseen_fraction, config.seed, by=d.holdout_by)
    total = sum(len(t) for t in seen)
    seen, shared_with_unseen = without_instances(seen, instances_of(unseen, instances), instances)
    train, seen_test = holdout_examples(seen, e.seen_examples_per_task, config.seed, instances)
    validation = []
    if e.validation_examples:
        train, validation = holdout_examples(train, 1, config.seed, instances, limit=e.validation_examples, purpose="validation")
    held_instances = sum(len(t) for t in seen) - sum(len(t) for t in train)
    splits = {
        "seen": evaluated(seen_test, e.seen_examples, config.seed),
        "validation": evaluated(validation, e.validation_examples, config.seed) if validation else [],
        "unseen": evaluated(unseen, e.unseen_examples, config.seed),
    }
    unseen_all = unseen
    # Symmetric measure, so the "leaks" of training inputs against the evaluated ones are the
    # training inputs to drop.
    evaluated_tasks = [t for split in splits.values() for t in split]
    near = {(name, i) for name, i, _, _ in word_overlap_leaks(train, evaluated_tasks, ignore=template_words(tasks))}
    train = [replace(t, examples=tuple(x for i, x in enumerate(t.examples) if (t.name, i) not in near)) for t in train]
    log.info(
        "held out by source instance: of %d seen examples, %d left training for sharing an instance with unseen tasks, "
        "%d as instances of seen-test or validation examples (those examples included), %d as near-copies of evaluated inputs; %d train",
        total,
        shared_with_unseen,
        held_instances,
        len(near),
        sum(len(t) for t in train),
    )
    return {"train": train, **splits, "unseen_all": unseen_all}


def build_federation(config: RunConfig, tokenizer) -> Federation:
    d = config.data
    options = {"examples_per_task": d.examples_per_task} if d.source == "builtin" else {}
    if d.source == "hf-datasets":
        options.update(columns=d.columns.model_dump(), split=d.split)
    if d.max_examples_per_task is not None:
        options["max_examples_per_task"] = d.max_examples_per_task
    try:
        tasks = load_tasks(d.source, d.path, seed=config.seed, **options)
    except FileNotFoundError as err:  # name the setting to change, not only the path that is missing
        raise FileNotFoundError(f"data.path {d.path!r} (data.source={d.source}): {err}; set data.path to the data's directory, "
                                f"e.g. --set data.path=/path/to/data (relative paths are from {Path.cwd()})") from None
    splits = held_out_splits(config, tasks)
    train_tasks = splits["train"]
    if d.partition == "by_task":
        clients = partition(train_tasks, "by_task", config.seed, max_examples_per_client=d.max_examples_per_client)
    elif d.partition == "dirichlet":
        clients = partition(train_tasks, "dirichlet", config.seed, num_clients=d.num_clients, alpha=d.dirichlet_alpha)
    else:
        clients = partition(train_tasks, "iid", config.seed, num_clients=d.num_clients)
    sizes = {t.name: len(t) for t in tasks}
    federation = Federation(
        tasks=task_table(train_tasks),
        clients=clients,
        eval_seen=eval_items(config, tokenizer, splits["seen"], sizes),
        eval_unseen=eval_items(config, tokenizer, splits["unseen"], sizes),
        eval_validation=eval_items(config, tokenizer, splits["validation"], sizes),
        seen_tasks=[t.name for t in train_tasks],
        unseen_tasks=[t.name for t in splits["unseen"]],
        unseen_all=splits["unseen_all"],
    )
    log.info(
        "%d tasks (%d seen, %d unseen, %d categories unseen); %d clients; eval %d seen + %d unseen + %d validation examples",
        len(tasks),
        len(train_tasks),
        len(splits["unseen"]),
        len({t.category for t in splits["unseen"]}),
        len(clients),
        len(federation.eval_seen),
        len(federation.eval_unseen),
        len(federation.eval_validation),
    )
    return federation


def client_examples(config: RunConfig, tokenizer, federation: Federation, shard: ClientShard) -> list[EncodedExample]:
    """Materialise and encode one sampled client's training data; ``ClientFailure`` if that fails.

    Whatever goes wrong here (a task missing from the table, an index past its end, a file that
    cannot be read, a tokenizer error) is that client's failure only: every engine leaves the
    client out of the round instead of stopping the run.
    """
    try:
        return [encode_example(config, tokenizer, task, ex) for task, examples in materialize(shard, federation.tasks) for ex in examples]
    except Exception as err:  # noqa: BLE001 - reported as the client's failure, with the cause
        raise ClientFailure(f"client {shard.client_id}: its examples could not be loaded ({type(err).__name__}: {err})") from err
