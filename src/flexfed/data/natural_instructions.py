"""Loader for Super-NaturalInstructions task files (allenai/natural-instructions, ``tasks/``).

Each file is one task::

    {"Definition": ["..."] or "...", "Categories": ["Verification", ...],
     "Positive Examples": [{"input", "output", "explanation"}, ...],
     "Instances": [{"id", "input", "output": ["answer", "other acceptable answer"]}, ...]}

A task's category is the first of its ``Categories``; FlexLoRA holds out whole categories to
measure generalisation to unseen tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flexfed.data.sampling import rng, subsample
from flexfed.data.types import Example, Task


def load_natural_instructions(
    path: str | Path,
    max_examples_per_task: int | None = None,
    positive_examples: int = 0,
    seed: int = 0,
) -> list[Task]:
    """Load one task file or every ``*.json`` file of a directory (sorted by name).

    ``max_examples_per_task`` keeps a seeded random subset of each task's instances (the
    FlexLoRA setup subsamples 10%). ``positive_examples`` appends that many of the task's
    worked examples to its definition (the "definition + k positive examples" NI prompt).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.json Natural Instructions task files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [_load_task(file, max_examples_per_task, positive_examples, seed) for file in files]


def _load_task(file: Path, max_examples: int | None, positive_examples: int, seed: int) -> Task:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object with Definition, Categories and Instances")

    definition = _definition(file, _field(file, data, "Definition"))
    categories = _field(file, data, "Categories")
    if not isinstance(categories, list) or not categories or not _nonblank(categories[0]):
        raise ValueError(f"{file}: field 'Categories' must be a non-empty list of strings, got {categories!r}")

    instances = _field(file, data, "Instances")
    if not isinstance(instances, list) or not instances:
        raise ValueError(f"{file}: field 'Instances' must be a non-empty list")
    examples = [_instance(file, i, instance) for i, instance in enumerate(instances)]
    examples = subsample(examples, max_examples, rng(seed, "natural-instructions", file.stem))

    if positive_examples > 0:
        demos = _field(file, data, "Positive Examples")
        if not isinstance(demos, list):
            raise ValueError(f"{file}: field 'Positive Examples' must be a list")
        for j, demo in enumerate(demos[:positive_examples]):
            where = f"'Positive Examples'[{j}]"
            if not isinstance(demo, dict) or not _nonblank(demo.get("input")) or not _nonblank(demo.get("output")):
                raise ValueError(f"{file}: {where} needs string fields 'input' and 'output'")
            definition += f"\n\nExample input: {demo['input'].strip()}\nExample output: {demo['output'].strip()}"

    return Task(name=file.stem, category=categories[0].strip(), definition=definition, examples=tuple(examples))


def _field(file: Path, data: dict, name: str) -> Any:
    if name not in data:
        raise ValueError(f"{file}: missing field {name!r}")
    return data[name]


def _definition(file: Path, value: Any) -> str:
    # The public files store a list holding one string; the sample in shared/data stores a string.
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = "\n".join(v.strip() for v in value)
    if not _nonblank(value):
        raise ValueError(f"{file}: field 'Definition' must be a string or a list of strings, got {value!r}")
    return value.strip()


def _instance(file: Path, index: int, instance: Any) -> Example:
    where = f"{file}: 'Instances'[{index}]"
    if not isinstance(instance, dict):
        raise ValueError(f"{where}: expected an object with 'input' and 'output'")
    if not isinstance(instance.get("input"), str):
        raise ValueError(f"{where}: field 'input' must be a string, got {instance.get('input')!r}")
    outputs = instance.get("output")
    if isinstance(outputs, str):
        outputs = [outputs]
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise ValueError(f"{where}: field 'output' must be a list of acceptable answers (strings), got {outputs!r}")
    outputs = [o.strip() for o in outputs if o.strip()]
    if not outputs:
        raise ValueError(f"{where}: field 'output' has no non-empty answer")
    return Example(input=instance["input"].strip(), outputs=tuple(outputs))


def _nonblank(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
