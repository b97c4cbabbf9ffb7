"""Hugging Face ``datasets`` as a task source: a ``save_to_disk`` directory or JSON/JSONL/Parquet files.

The config maps the data set's columns onto flexfed's fields (``data.columns``): the prompt, the
completion (a string, or a list of reference strings whose first is the training target), and
optionally the task and the category. Rows are grouped into one `Task` per task value; without
a task column every category is one task (as in `load_instruction_jsonl`), and without either
the whole data set is one task of category ``general``. Everything downstream (seen/unseen splits,
held-out instances, the ``by_task``/``dirichlet``/``iid`` partitions and the lazy client shards)
is the same as for the other sources: a client is task names and row indices, and its examples
are looked up only when it is sampled.

Optional: ``pip install flexfed[datasets]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flexfed.data.jsonl import DEFAULT_CATEGORY
from flexfed.data.sampling import rng, subsample
from flexfed.data.types import Example, Task

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# The flexfed field each ``data.columns`` key fills; prompt and completion are required.
COLUMN_FIELDS = ("prompt", "completion", "task", "category")
DEFAULT_COLUMNS = {"prompt": "prompt", "completion": "completion", "task": None, "category": None}


def load_hf_dataset(
    path: str | Path,
    columns: Mapping[str, str | None] | None = None,
    split: str | None = None,
    max_examples_per_task: int | None = None,
    seed: int = 0,
) -> list[Task]:
    """Tasks from a data set at ``path``, sorted by task name.

    ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``,
    a ``.json``/``.jsonl``/``.parquet`` file, or a directory of such files (one format).
    ``columns`` maps ``prompt``, ``completion``, ``task`` and ``category`` to column names
    (`DEFAULT_COLUMNS` for the ones left out); ``split`` picks a split of a ``DatasetDict``
    (default ``train``, or its only split).
    """
    columns = {**DEFAULT_COLUMNS, **(columns or {})}
    unknown = sorted(set(columns) - set(COLUMN_FIELDS))
    if unknown:
        raise ValueError(f"data.columns: unknown field(s) {unknown}; the fields are {list(COLUMN_FIELDS)}")
    datasets = import_datasets()
    dataset = _open(Path(path), split)
    available = list(dataset.column_names)
    for field, name in columns.items():
        if name is not None and name not in available:
            raise ValueError(f"data.columns.{field}: column {name!r} is not in the data set at {path} (its columns: {available})")

    table = dataset.with_format("arrow")  # column reads respect any row selection and stay in Arrow until here
    values = {field: table[name].to_pylist() for field, name in columns.items() if name is not None}
    for field in ("task", "category"):  # a ClassLabel column (the usual label column) by its names
        feature = dataset.features.get(columns[field]) if columns[field] else None
        if isinstance(feature, datasets.ClassLabel):
            values[field] = [None if v is None else feature.int2str(v) for v in values[field]]
    group_by = "task" if columns["task"] else "category" if columns["category"] else None
    examples: dict[str, list[Example]] = {}
    category_of: dict[str, str] = {}
    for row, (prompt, completion) in enumerate(zip(values["prompt"], values["completion"])):
        where = f"{path}, row {row}"
        category = _label(values["category"][row], where, columns["category"]) if columns["category"] else DEFAULT_CATEGORY
        name = _label(values[group_by][row], where, columns[group_by]) if group_by else "all"
        if category_of.setdefault(name, category) != category:
            raise ValueError(
                f"data.columns.category: task {name!r} has rows in categories {category_of[name]!r} and {category!r} ({where}); "
                f"a task belongs to one category: map data.columns.task to a finer column, or leave it unset to make every category a task"
            )
        examples.setdefault(name, []).append(
            Example(input=_prompt(prompt, where, columns["prompt"]), outputs=_outputs(completion, where, columns["completion"]))
        )
    if not examples:
        raise ValueError(f"{path}: the data set has no rows")
    return [
        Task(
            name=name,
            category=category_of[name],
            definition="",  # the instruction lives in each prompt
            examples=tuple(subsample(rows, max_examples_per_task, rng(seed, "hf-datasets", name))),
        )
        for name, rows in sorted(examples.items())
    ]


def import_datasets():
    try:
        import datasets
    except ImportError as err:  # the optional extra is missing
        raise ImportError(f"data.source=hf-datasets needs Hugging Face datasets: pip install 'flexfed[datasets]' ({err})") from None
    return datasets


def _open(path: Path, split: str | None):
    """The ``datasets.Dataset`` at ``path`` (one split of it, for a ``DatasetDict``)."""
    datasets = import_datasets()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
    else:
        files = sorted(f for f in path.iterdir() if f.suffix in FILE_FORMATS) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(
                f"{path}: neither a save_to_disk directory nor one holding {sorted(FILE_FORMATS)} files"
            )
        formats = {FILE_FORMATS.get(f.suffix) for f in files}
        if None in formats or len(formats) > 1:
            raise ValueError(f"{path}: expected files of one format among {sorted(FILE_FORMATS)}, got {sorted({f.suffix for f in files})}")
        loaded = datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files])
    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise ValueError(f"data.split={split!r}: the data set at {path} has no splits")
        return loaded
    splits = list(loaded)
    chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if chosen not in splits:
        raise ValueError(f"data.split: the data set at {path} has splits {splits}; name one (got {split!r})")
    return loaded[chosen]


def _label(value, where: str, column: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: column {column!r} is empty")
    return str(value).strip()


def _prompt(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must hold strings, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: column {column!r} is empty")
    return value.strip()


def _outputs(value, where: str, column: str) -> tuple[str, ...]:
    """A completion: one string, or a list of reference strings (the first is the training target)."""
    references = [value] if isinstance(value, str) else value
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where}: column {column!r} must hold a string or a list of strings, got {type(value).__name__}")
    references = [r.strip() for r in references if r.strip()]
    if not references:
        raise ValueError(f"{where}: column {column!r} is empty")
    return tuple(references)
