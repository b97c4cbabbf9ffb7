"""Who gets which data: seen/unseen task splits, held-out examples, and client partitions.

The FlexLoRA protocol: hold out whole categories (their tasks are never trained on), give each
remaining task to one client, and report Rouge-L on the unseen tasks. `holdout_examples`
additionally carves evaluation examples out of the seen tasks, whole source instances at a
time, so seen-task scores use items no client trained on under any template. FedIT/OpenFedLLM-style setups instead spread a dataset over
clients with a Dirichlet(α) skew over categories (`dirichlet`) or uniformly (`iid`).

Partitioners return `ClientShard`s: task names and example indices, never copies, so ten
thousand clients cost a few megabytes.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np

from flexfed.data.instances import Instances, check_covered
from flexfed.data.sampling import np_rng, rng
from flexfed.data.types import ClientShard, Task, task_table


def split_tasks(
    tasks: Sequence[Task],
    unseen_fraction: float,
    seed: int,
    by: Literal["category", "task"] = "category",
    unseen: Sequence[str] | None = None,
) -> tuple[list[Task], list[Task]]:
    """Split into (seen, unseen) by holding out whole categories (default) or single tasks.

    ``round(unseen_fraction × groups)`` groups are held out, at least one and at most all but
    one, chosen at random with ``seed``; ``unseen`` names the held-out groups explicitly
    instead (e.g. one Dolly category). Both sides keep the input order of tasks.
    """
    if by not in ("category", "task"):
        raise ValueError(f"by must be 'category' or 'task', got {by!r}")
    group_of = (lambda t: t.category) if by == "category" else (lambda t: t.name)
    groups = sorted({group_of(t) for t in tasks})
    if len(groups) < 2:
        raise ValueError(f"cannot split {len(groups)} {by}(s) into seen and unseen; need at least 2")

    if unseen is not None:
        missing = sorted(set(unseen) - set(groups))
        if missing:
            raise ValueError(f"unseen {by} names {missing} are not among the tasks' {by}s {groups}")
        held_out = set(unseen)
    else:
        if not 0.0 < unseen_fraction < 1.0:
            raise ValueError(f"unseen_fraction must be strictly between 0 and 1, got {unseen_fraction}")
        count = min(max(round(unseen_fraction * len(groups)), 1), len(groups) - 1)
        held_out = set(rng(seed, "split_tasks", by).sample(groups, count))

    seen = [t for t in tasks if group_of(t) not in held_out]
    unseen_tasks = [t for t in tasks if group_of(t) in held_out]
    if not seen or not unseen_tasks:
        raise ValueError(f"holding out {sorted(held_out)} leaves one side empty")
    return seen, unseen_tasks


def holdout_examples(
    tasks: Sequence[Task],
    per_task: int,
    seed: int,
    instances: Instances | None = None,
    limit: int | None = None,
    purpose: str = "holdout_examples",
) -> tuple[list[Task], list[Task]]:
    """Carve up to ``per_task`` evaluation examples out of every task: (train_tasks, eval_tasks).

    Whole source *instances* are held out: an evaluation example's instance leaves every
    task's training data, so no client trains on the same passage under a sibling template
    (``instances`` from `source_instances`; without it every example is its own instance).
    Each task picks, in seeded random order, the examples whose instance costs the least
    training data: one already held out costs nothing (the same instance is then evaluated
    under several templates), otherwise the instance's size. No pick may leave a task with
    less than half its examples for training; a task that cannot spare any is absent from
    ``eval_tasks``. ``limit`` caps the evaluation examples in all: tasks are then visited in
    seeded random order until it is reached. Both sides keep the task's name, category and
    definition, and the examples' original order; ``purpose`` keys the random draws, so two
    hold-outs from one seed (test, validation) draw independently.
    """
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1, got {per_task}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if instances is None:
        instances = {e: i for i, e in enumerate(e for t in tasks for e in t.examples)}
    check_covered(tasks, instances)
    # How many examples of each task every instance holds.
    spread: dict[int, Counter] = defaultdict(Counter)
    for position, task in enumerate(tasks):
        for example in task.examples:
            spread[instances[example]][position] += 1
    left = [len(t) for t in tasks]  # training examples each task still has
    floor = [len(t) - len(t) // 2 for t in tasks]
    held: set[int] = set()
    picks: dict[int, set[int]] = defaultdict(set)
    order = list(range(len(tasks)))
    if limit is not None:
        rng(seed, purpose, "task order").shuffle(order)
    budget = limit if limit is not None else float("inf")
    for position in order:
        task = tasks[position]
        candidates = list(range(len(task)))
        rng(seed, purpose, task.name).shuffle(candidates)

        def cost(i: int) -> int:
            instance = instances[task.examples[i]]
            return 0 if instance in held else sum(spread[instance].values())

        for i in sorted(candidates, key=cost):  # sorted() is stable: random among equal costs
            if len(picks[position]) == per_task or budget == 0:
                break
            instance = instances[task.examples[i]]
            if instance not in held:
                if any(left[p] - n < floor[p] for p, n in spread[instance].items()):
                    continue
                held.add(instance)
                for p, n in spread[instance].items():
                    left[p] -= n
            picks[position].add(i)
            budget -= 1
    train, evaluation = [], []
    for position, task in enumerate(tasks):
        train.append(replace(task, examples=tuple(e for e in task.examples if instances[e] not in held)))
        if picks[position]:
            evaluation.append(replace(task, examples=tuple(e for i, e in enumerate(task.examples) if i in picks[position])))
    return train, evaluation


# ---------------------------------------------------------------- partitioners


def by_task(tasks: Sequence[Task], seed: int, max_examples_per_client: int | None = None) -> list[ClientShard]:
    """One task per client, FlexLoRA's protocol.

    A task with more than ``max_examples_per_client`` examples is cut at random into the
    fewest near-equal clients that respect the cap (ids ``<task>#<k>``), which lets a
    few large tasks stand for thousands of clients. Other clients are named after their task.
    """
    if max_examples_per_client is not None and max_examples_per_client < 1:
        raise ValueError(f"max_examples_per_client must be >= 1, got {max_examples_per_client}")
    task_table(tasks)  # refuse duplicate names: shards refer to tasks by name
    shards = []
    for task in tasks:
        n = len(task)
        if n == 0:
            continue
        if max_examples_per_client is None or n <= max_examples_per_client:
            shards.append(ClientShard(task.name, task.name, task.category, tuple(range(n))))
            continue
        pieces = -(-n // max_examples_per_client)  # ceil
        order = np_rng(seed, "by_task", task.name).permutation(n)
        for k, piece in enumerate(np.array_split(order, pieces)):
            indices = tuple(sorted(piece.tolist()))
            shards.append(ClientShard(f"{task.name}#{k}", task.name, task.category, indices))
    return shards


def dirichlet(tasks: Sequence[Task], num_clients: int, alpha: float, seed: int) -> list[ClientShard]:
    """Category-skewed clients: each category's examples are split over clients by Dirichlet(α).

    This is the label-Dirichlet partition used by FedIT/OpenFedLLM/FedKSeed (as in NIID-Bench):
    for every category, client shares p ~ Dir(α·1); clients already holding their fair
    share of the data get no more, which keeps sizes from running away. Small α gives each
    client few categories, large α approaches IID. A client left empty takes one example from
    the largest client, so every client has data.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    task_ids, example_ids, categories = _flatten(tasks, num_clients)
    generator = np_rng(seed, "dirichlet")
    client = np.empty(len(task_ids), dtype=np.int64)
    sizes = np.zeros(num_clients, dtype=np.int64)
    fair_share = len(task_ids) / num_clients

    for category in sorted(set(categories)):
        members = generator.permutation(np.flatnonzero(categories == category))
        shares = generator.dirichlet(np.full(num_clients, alpha))
        open_shares = shares * (sizes < fair_share)
        if open_shares.sum() > 0:
            shares = open_shares / open_shares.sum()
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for c, part in enumerate(np.split(members, cuts)):
            client[part] = c
            sizes[c] += len(part)
    _fill_empty_clients(client, num_clients)
    return _shards(tasks, task_ids, example_ids, client, num_clients)


def iid(tasks: Sequence[Task], num_clients: int, seed: int) -> list[ClientShard]:
    """Examples of all tasks shuffled together and dealt into ``num_clients`` near-equal clients."""
    task_ids, example_ids, _ = _flatten(tasks, num_clients)
    order = np_rng(seed, "iid").permutation(len(task_ids))
    client = np.empty(len(task_ids), dtype=np.int64)
    for c, part in enumerate(np.array_split(order, num_clients)):
        client[part] = c
    return _shards(tasks, task_ids, example_ids, client, num_clients)


PARTITIONERS = {"by_task": by_task, "dirichlet": dirichlet, "iid": iid}


def partition(tasks: Sequence[Task], scheme: str, seed: int, **options) -> list[ClientShard]:
    """Dispatch to `by_task`, `dirichlet` or `iid` by name, passing ``options`` through."""
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[scheme](tasks, seed=seed, **options)


# ---------------------------------------------------------------- helpers


def _flatten(tasks: Sequence[Task], num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every example as (task position, example index, category), for mixing tasks."""
    task_table(tasks)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    lengths = np.array([len(t) for t in tasks], dtype=np.int64)
    total = int(lengths.sum())
    if total < num_clients:
        raise ValueError(f"{total} examples cannot give each of {num_clients} clients at least one")
    task_ids = np.repeat(np.arange(len(tasks)), lengths)
    example_ids = np.concatenate([np.arange(n) for n in lengths]) if len(tasks) else np.empty(0, np.int64)
    categories = np.array([t.category for t in tasks], dtype=object)[task_ids]
    return task_ids, example_ids, categories


def _fill_empty_clients(client: np.ndarray, num_clients: int) -> None:
    """Give every empty client one example taken from the currently largest client (in place)."""
    sizes = np.bincount(client, minlength=num_clients)
    empty = np.flatnonzero(sizes == 0)
    if len(empty) == 0:
        return
    by_client = np.split(np.argsort(client, kind="stable"), np.cumsum(sizes)[:-1])
    pool = {c: list(by_client[c]) for c in np.flatnonzero(sizes > 1)}
    donors = [(-int(sizes[c]), int(c)) for c in pool]
    heapq.heapify(donors)
    for receiver in empty:
        negative_size, donor = heapq.heappop(donors)
        client[pool[donor].pop()] = receiver
        if -negative_size - 1 > 1:
            heapq.heappush(donors, (negative_size + 1, donor))


def _shards(
    tasks: Sequence[Task], task_ids: np.ndarray, example_ids: np.ndarray, client: np.ndarray, num_clients: int
) -> list[ClientShard]:
    """Group an example-to-client assignment into shards, each client's largest task first."""
    order = np.lexsort((example_ids, task_ids, client))
    client, task_ids, example_ids = client[order], task_ids[order], example_ids[order]
    # Runs of equal (client, task) are one part each.
    starts = np.flatnonzero(np.r_[True, (np.diff(client) != 0) | (np.diff(task_ids) != 0)])
    ends = np.r_[starts[1:], len(order)]
    parts: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(num_clients)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        name = tasks[task_ids[start]].name
        parts[client[start]].append((name, tuple(example_ids[start:end].tolist())))

    category = {t.name: t.category for t in tasks}
    width = len(str(num_clients - 1))
    shards = []
    for c, client_parts in enumerate(parts):
        # sorted() is stable, so equal-sized parts keep task order.
        (name, indices), *others = sorted(client_parts, key=lambda part: -len(part[1]))
        shards.append(ClientShard(f"client-{c:0{width}d}", name, category[name], indices, tuple(others)))
    return shards
