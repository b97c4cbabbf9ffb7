"""From a config to a federation: tasks, client shards, rank profiles and evaluation sets.

Both engines (the in-process simulator and Flower) build the same federation from the same
config and seed, so a client id means the same data everywhere.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
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
    load_tasks,
    materialize,
    partition,
    split_tasks,
    task_table,
)
from flexfed.evaluation import EvalItem

log = logging.getLogger(__name__)


@dataclass
class Federation:
    tasks: dict[str, Task]  # what clients train on (seen tasks minus their held-out examples)
    clients: list[ClientShard]
    eval_seen: list[EvalItem]  # held-out examples of seen tasks
    eval_unseen: list[EvalItem]  # a fixed seeded subset of the unseen tasks
    seen_tasks: list[str]
    unseen_tasks: list[str]


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


def eval_items(config: RunConfig, tokenizer, tasks: list[Task], limit: int) -> list[EvalItem]:
    prompt_budget = config.data.max_tokens - config.data.max_response_tokens
    items = []
    for task, i in _subset(tasks, limit, config.seed):
        ex = task.examples[i]
        items.append(
            EvalItem(
                task=task.name,
                category=task.category,
                prompt_ids=tuple(encode_prompt(tokenizer, task.definition, ex.input, prompt_budget)),
                references=ex.outputs,
                scored=encode_example(config, tokenizer, task, ex),
            )
        )
    return items


def build_federation(config: RunConfig, tokenizer) -> Federation:
    d = config.data
    options = {"examples_per_task": d.examples_per_task} if d.source == "builtin" else {}
    if d.max_examples_per_task is not None:
        options["max_examples_per_task"] = d.max_examples_per_task
    try:
        tasks = load_tasks(d.source, d.path, seed=config.seed, **options)
    except FileNotFoundError as err:  # name the setting to change, not only the path that is missing
        raise FileNotFoundError(f"data.path {d.path!r} (data.source={d.source}): {err}; set data.path to the data's directory, "
                                f"e.g. --set data.path=/path/to/data (relative paths are from {Path.cwd()})") from None
    seen, unseen = split_tasks(tasks, d.unseen_fraction, config.seed, by=d.holdout_by)
    train_tasks, seen_eval_tasks = holdout_examples(seen, config.eval.seen_examples_per_task, config.seed)
    if d.partition == "by_task":
        clients = partition(train_tasks, "by_task", config.seed, max_examples_per_client=d.max_examples_per_client)
    elif d.partition == "dirichlet":
        clients = partition(train_tasks, "dirichlet", config.seed, num_clients=d.num_clients, alpha=d.dirichlet_alpha)
    else:
        clients = partition(train_tasks, "iid", config.seed, num_clients=d.num_clients)
    federation = Federation(
        tasks=task_table(train_tasks),
        clients=clients,
        eval_seen=eval_items(config, tokenizer, seen_eval_tasks, config.eval.seen_examples),
        eval_unseen=eval_items(config, tokenizer, unseen, config.eval.unseen_examples),
        seen_tasks=[t.name for t in seen],
        unseen_tasks=[t.name for t in unseen],
    )
    log.info(
        "%d tasks (%d seen, %d unseen, %d categories unseen); %d clients; eval %d seen + %d unseen examples",
        len(tasks),
        len(seen),
        len(unseen),
        len({t.category for t in unseen}),
        len(clients),
        len(federation.eval_seen),
        len(federation.eval_unseen),
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
