"""One entry point for every task source, for configs and the command line."""

from __future__ import annotations

from pathlib import Path

from flexfed.data.builtin import builtin_suite
from flexfed.data.hf import load_hf_dataset
from flexfed.data.jsonl import load_instruction_jsonl, load_prompt_completion_dir
from flexfed.data.natural_instructions import load_natural_instructions
from flexfed.data.types import Task

LOADERS = {
    "natural-instructions": load_natural_instructions,
    "instruction-jsonl": load_instruction_jsonl,
    "prompt-completion": load_prompt_completion_dir,
    "hf-datasets": load_hf_dataset,
}
SOURCES = ("builtin", *LOADERS)


def load_tasks(source: str, path: str | Path | None = None, seed: int = 0, **options) -> list[Task]:
    """Load tasks from ``source``, one of SOURCES; ``options`` go to that source's loader.

    ``builtin`` generates its suite from ``seed`` and takes no path; the file-based sources
    need ``path`` and use ``seed`` only to subsample (``max_examples_per_task``).
    """
    if source == "builtin":
        if path is not None:
            raise ValueError(f"source 'builtin' is generated from the seed and takes no path (got {path!r})")
        return builtin_suite(seed=seed, **options)
    if source not in LOADERS:
        raise ValueError(f"unknown task source {source!r}; choose one of {list(SOURCES)}")
    if path is None:
        raise ValueError(f"source {source!r} needs a path to the data")
    return LOADERS[source](path, seed=seed, **options)
