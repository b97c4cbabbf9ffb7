"""Loaders for JSON-lines instruction data: Dolly/Alpaca-style files and P3-style task folders."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from flexfed.data.sampling import rng, subsample
from flexfed.data.types import Example, Task

DEFAULT_CATEGORY = "general"
MAX_LINE_BYTES = 16 << 20  # one JSONL record above this is refused (a sign of a broken file, not an example)
END_OF_TEXT = "<|endoftext|>"


def load_instruction_jsonl(path: str | Path, max_examples_per_task: int | None = None, seed: int = 0) -> list[Task]:
    """Dolly/Alpaca-style records, one Task per category (sorted by category name).

    Each record has ``instruction``, optionally ``context`` (Dolly) or ``input`` (Alpaca),
    ``response`` (Dolly) or ``output`` (Alpaca), and optionally ``category`` (default
    "general"). The instruction is the prompt, so task definitions are "" and an example's
    input is the instruction followed by a blank line and the context, if any. A ``.json`` file
    holding one array of records (Alpaca's release format) is read too.
    """
    path = Path(path)
    by_category: dict[str, list[Example]] = {}
    for where, record in _records(path):
        instruction = _text(record, where, "instruction")
        context = _text(record, where, "context", "input", required=False)
        response = _text(record, where, "response", "output")
        category = _text(record, where, "category", required=False) or DEFAULT_CATEGORY
        prompt = f"{instruction}\n\n{context}" if context else instruction
        by_category.setdefault(category, []).append(Example(input=prompt, outputs=(response,)))
    if not by_category:
        raise ValueError(f"{path}: no records")
    return [
        Task(
            name=category,
            category=category,
            definition="",
            examples=tuple(subsample(examples, max_examples_per_task, rng(seed, "instruction-jsonl", category))),
        )
        for category, examples in sorted(by_category.items())
    ]


def load_prompt_completion_dir(
    path: str | Path,
    max_examples_per_task: int | None = None,
    seed: int = 0,
    dataset_prefixes: Sequence[str] | None = None,
) -> list[Task]:
    """P3-style tasks: each ``*.jsonl`` file is one task of ``{"prompt", "completion"}`` lines.

    The completion's trailing ``<|endoftext|>`` marker is not part of the answer and is
    stripped. A task's category is its source dataset, read off the file name by
    `dataset_categories` unless ``dataset_prefixes`` lists the datasets explicitly (then the
    longest listed prefix of each file name wins).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.jsonl task files in this directory")
    if dataset_prefixes is None:
        categories = dataset_categories([f.stem for f in files])
    else:
        categories = {f.stem: _longest_prefix(f, dataset_prefixes) for f in files}

    tasks = []
    for file in files:
        examples = []
        for where, record in _records(file):
            prompt = _text(record, where, "prompt")
            completion = _text(record, where, "completion").removesuffix(END_OF_TEXT).strip()
            if not completion:
                raise ValueError(f"{where}: field 'completion' is empty once {END_OF_TEXT} is removed")
            examples.append(Example(input=prompt, outputs=(completion,)))
        if not examples:
            raise ValueError(f"{file}: no records")
        examples = subsample(examples, max_examples_per_task, rng(seed, "prompt-completion", file.stem))
        tasks.append(Task(name=file.stem, category=categories[file.stem], definition="", examples=tuple(examples)))
    return tasks


def dataset_categories(names: Sequence[str]) -> dict[str, str]:
    """Map P3 task names ("<dataset>_<template>") to their dataset, using the names alone.

    Dataset names have several words (``cnn_dailymail_3_0_0``, ``adversarial_qa_dbert``) and
    templates are free text, so no fixed split point exists. The rule reads the names as a
    prefix tree over ``_``-separated words:

    1. Names sharing their first word form a group.
    2. A group's name grows over the words all its members share
       (cnn → cnn_dailymail_3_0_0; kilt → kilt_tasks_hotpotqa).
    3. A group whose members branch into two or more sub-groups that *each* hold at least
       three names is split into those sub-groups, recursively: each is a dataset of its own
       with several templates (wiki → wiki_bio, wiki_hop_original, wiki_qa; glue → glue_mrpc,
       glue_qqp; adversarial_qa → its dbert, dbidaf and droberta sets). Templates within one
       dataset rarely share a first word three ways over in every branch, so ag_news
       (classify×4, recommend×1, which_section×2) stays one dataset.

    On the 250-task P3 sample this gives the 31 source datasets exactly. It is a heuristic:
    pass ``dataset_prefixes`` to `load_prompt_completion_dir` to override it.
    """
    categories: dict[str, str] = {}
    first_words: dict[str, list[tuple[str, ...]]] = {}
    for name in names:
        words = tuple(name.split("_"))
        first_words.setdefault(words[0], []).append(words)
    for word, group in first_words.items():
        _assign(group, (word,), categories)
    return categories


MIN_TEMPLATES_PER_DATASET = 3


def _assign(group: list[tuple[str, ...]], prefix: tuple[str, ...], out: dict[str, str]) -> None:
    depth = len(prefix)
    # Step 2: extend over words every member shares (and none of them ends at).
    while all(len(words) > depth + 1 for words in group) and len({words[depth] for words in group}) == 1:
        prefix, depth = prefix + (group[0][depth],), depth + 1
    branches: dict[str, list[tuple[str, ...]]] = {}
    for words in group:
        if len(words) > depth:
            branches.setdefault(words[depth], []).append(words)
    a_member_ends_here = any(len(words) == depth for words in group)
    # Step 3: split only when every branch looks like a dataset with several templates.
    if (
        len(branches) >= 2
        and not a_member_ends_here
        and all(len(b) >= MIN_TEMPLATES_PER_DATASET for b in branches.values())
    ):
        for word, branch in branches.items():
            _assign(branch, prefix + (word,), out)
        return
    for words in group:
        out["_".join(words)] = "_".join(prefix)


def _longest_prefix(file: Path, prefixes: Sequence[str]) -> str:
    matches = [p for p in prefixes if file.stem == p or file.stem.startswith(p + "_")]
    if not matches:
        raise ValueError(f"{file}: its name starts with none of the given dataset_prefixes")
    return max(matches, key=len)


def _records(file: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)``; the location ("file:line" or "file[item]") prefixes errors."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        yield from _decoded_records(file)
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text (byte {err.start} of a read block: {err.reason})") from None


def _decoded_records(file: Path) -> Iterator[tuple[str, dict]]:
    with open(file, encoding="utf-8") as f:
        if file.suffix == ".json":
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e})") from None
            if not isinstance(records, list):
                raise ValueError(f"{file}: expected a JSON array of records (or use .jsonl, one record per line)")
            located = ((f"{file}[{i}]", record) for i, record in enumerate(records))
        else:
            located = _json_lines(file, f)
        for where, record in located:
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _json_lines(file: Path, f) -> Iterator[tuple[str, Any]]:
    for line_no, line in enumerate(f, start=1):
        if len(line) > MAX_LINE_BYTES:
            raise ValueError(f"{file}:{line_no}: line of {len(line) / (1 << 20):.1f} MiB, above the {MAX_LINE_BYTES >> 20} MiB a record may take")
        if not line.strip():
            continue
        try:
            yield f"{file}:{line_no}", json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None


def _text(record: dict, where: str, *names: str, required: bool = True) -> str:
    """The first present field among ``names``, stripped; '' if optional and absent."""
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            value = value.strip()
            if required and not value:
                raise ValueError(f"{where}: field {name!r} is empty")
            return value
    if required:
        expected = " or ".join(repr(n) for n in names)
        raise ValueError(f"{where}: missing field {expected}")
    return ""
