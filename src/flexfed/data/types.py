"""The three records the data layer passes around: examples, tasks and client shards.

A task is the unit of heterogeneity (FlexLoRA gives every client one Natural Instructions
task). A client shard is only a *description* of a client's data: task names and indices into
those tasks' examples. Registering 10,000 clients therefore costs a few tuples of ints each;
the examples are looked up (`materialize`) only when a client is sampled for a round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instance. ``outputs[0]`` is the training target; all outputs are Rouge-L references."""

    input: str
    outputs: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.input, str):
            raise TypeError(f"Example.input must be a str, got {type(self.input).__name__}")
        if isinstance(self.outputs, str) or not isinstance(self.outputs, tuple):
            raise TypeError(f"Example.outputs must be a tuple of str, got {type(self.outputs).__name__}")
        if not self.outputs:
            raise ValueError("Example.outputs is empty; an example needs at least one reference output")
        if not all(isinstance(o, str) for o in self.outputs):
            raise TypeError("Example.outputs must contain only str")

    @property
    def target(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True)
class Task:
    """A named set of examples sharing one instruction.

    ``definition`` is the task's instruction in plain English; it is "" for datasets whose
    instruction lives inside every input (Dolly, Alpaca, P3 prompts).
    """

    name: str
    category: str
    definition: str
    examples: tuple[Example, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Task.name is empty")
        if not self.category:
            raise ValueError(f"Task {self.name!r}: category is empty")
        if not isinstance(self.examples, tuple):
            raise TypeError(f"Task {self.name!r}: examples must be a tuple, got {type(self.examples).__name__}")

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class ClientShard:
    """One client's data, by reference.

    Most clients hold part of a single task (the FlexLoRA protocol): ``task`` and
    ``example_indices`` say which part. Dirichlet and IID clients mix tasks; for them ``task``,
    ``category`` and ``example_indices`` describe the largest part and ``other_parts`` holds
    the rest as ``(task name, indices)`` pairs.
    """

    client_id: str
    task: str
    category: str
    example_indices: tuple[int, ...]
    other_parts: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Every ``(task name, example indices)`` pair this client holds, largest first."""
        return ((self.task, self.example_indices), *self.other_parts)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)

    @property
    def num_examples(self) -> int:
        """The client's data size n_i, which weights it in aggregation."""
        return sum(len(indices) for _, indices in self.parts)


TaskTable = Mapping[str, Task]


def task_table(tasks: Iterable[Task]) -> dict[str, Task]:
    """Index tasks by name, refusing duplicate names (a shard refers to its task by name)."""
    table: dict[str, Task] = {}
    for task in tasks:
        if task.name in table:
            raise ValueError(f"duplicate task name {task.name!r}; task names must be unique")
        table[task.name] = task
    return table


def materialize(shard: ClientShard, tasks: TaskTable) -> list[tuple[Task, list[Example]]]:
    """The client's examples, grouped by task: ``[(task, examples), ...]``, largest part first.

    A single-task client (every ``by_task`` client) gets a list of one pair. Each group keeps
    its task so that the caller can prompt with that task's definition.
    """
    groups = []
    for name, indices in shard.parts:
        if name not in tasks:
            raise KeyError(f"client {shard.client_id!r} refers to unknown task {name!r}")
        task = tasks[name]
        try:
            examples = [task.examples[i] for i in indices]
        except IndexError:
            raise IndexError(
                f"client {shard.client_id!r}: an index in {name!r} is out of range (task has {len(task)} examples)"
            ) from None
        groups.append((task, examples))
    return groups
