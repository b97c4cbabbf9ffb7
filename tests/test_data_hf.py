"""Hugging Face ``datasets`` as a task source: formats, column mapping, partitions, laziness, a run."""

import json
import random
from collections import Counter
from unittest import mock

import pytest

from flexfed.config import load_config
from flexfed.data import load_hf_dataset, load_tasks, materialize, partition, task_table

datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is the optional extra flexfed[datasets]")

CATEGORIES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """load_dataset's Arrow cache in the test's directory, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def make_rows(tasks_per_category: int = 2, per_task: int = 12, seed: int = 0) -> list[dict]:
    """Rows of distinct random prompts; columns named unlike flexfed's fields, to be mapped."""
    generator = random.Random(seed)

    def text(n: int) -> str:
        return " ".join("".join(generator.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(n))

    return [
        {"question": text(8), "answers": [text(2), text(2)], "name": f"{c}_task{t}", "topic": c, "extra": i}
        for c in CATEGORIES
        for t in range(tasks_per_category)
        for i in range(per_task)
    ]


COLUMNS = {"prompt": "question", "completion": "answers", "task": "name", "category": "topic"}


def write(rows: list[dict], fmt: str, root):
    """The rows as ``fmt``, returning the path to give data.path."""
    dataset = datasets.Dataset.from_list(rows)
    if fmt == "save_to_disk":
        dataset.save_to_disk(str(root / "ds"))
        return root / "ds"
    if fmt == "save_to_disk-dict":
        datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(root / "dd"))
        return root / "dd"
    if fmt == "jsonl":
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root / "data.jsonl"
    if fmt == "json-dir":  # two files of one format in a directory
        (root / "dir").mkdir()
        half = len(rows) // 2
        for i, part in enumerate((rows[:half], rows[half:])):
            (root / "dir" / f"part{i}.json").write_text(json.dumps(part))
        return root / "dir"
    assert fmt == "parquet"
    dataset.to_parquet(str(root / "data.parquet"))
    return root / "data.parquet"


def pairs(rows) -> Counter:
    return Counter((r["question"], tuple(r["answers"])) for r in rows)


@pytest.mark.parametrize("fmt", ["save_to_disk", "save_to_disk-dict", "jsonl", "json-dir", "parquet"])
@pytest.mark.parametrize("scheme", ["by_task", "dirichlet", "iid"])
def test_every_format_round_trips_through_every_partition(tmp_path, fmt, scheme):
    rows = make_rows()
    tasks = load_tasks("hf-datasets", write(rows, fmt, tmp_path), columns=COLUMNS)
    assert [t.name for t in tasks] == sorted({r["name"] for r in rows})
    assert {t.name: t.category for t in tasks} == {r["name"]: r["topic"] for r in rows}
    options = {"by_task": {}, "dirichlet": {"num_clients": 10, "alpha": 0.5}, "iid": {"num_clients": 10}}[scheme]
    shards = partition(tasks, scheme, seed=0, **options)
    assert len(shards) == (len(tasks) if scheme == "by_task" else 10)
    table = task_table(tasks)
    got = Counter()
    for shard in shards:
        for task, examples in materialize(shard, table):
            got.update((e.input, e.outputs) for e in examples)
    assert got == pairs(rows)  # every row reaches exactly one client, prompt and references intact
    assert partition(tasks, scheme, seed=0, **options) == shards  # seeded: reproducible
    if scheme != "by_task":
        assert partition(tasks, scheme, seed=1, **options) != shards


def test_without_a_task_column_each_category_is_a_task_and_without_either_one_task(tmp_path):
    rows = make_rows()
    path = write(rows, "parquet", tmp_path)
    by_category = load_hf_dataset(path, {"prompt": "question", "completion": "answers", "category": "topic"})
    assert [(t.name, t.category, len(t)) for t in by_category] == [(c, c, 24) for c in sorted(CATEGORIES)]
    (single,) = load_hf_dataset(path, {"prompt": "question", "completion": "answers"})
    assert (single.name, single.category, len(single), single.definition) == ("all", "general", len(rows), "")
    capped = load_hf_dataset(path, COLUMNS, max_examples_per_task=5, seed=3)
    assert {len(t) for t in capped} == {5} and capped == load_hf_dataset(path, COLUMNS, max_examples_per_task=5, seed=3)


def test_a_class_label_column_gives_its_names(tmp_path):
    rows = make_rows(tasks_per_category=1, per_task=3)
    features = datasets.Features({"question": datasets.Value("string"), "answers": datasets.List(datasets.Value("string")),
                                  "name": datasets.Value("string"), "topic": datasets.ClassLabel(names=list(CATEGORIES)),
                                  "extra": datasets.Value("int64")})  # fmt: skip
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "labelled"))
    tasks = load_hf_dataset(tmp_path / "labelled", {"prompt": "question", "completion": "answers", "category": "topic"})
    assert [t.name for t in tasks] == sorted(CATEGORIES)


def dominant_share(shards, tasks) -> float:
    """Mean over clients of the share of their examples in their largest category (1: one category each)."""
    table = task_table(tasks)
    counts = [Counter(task.category for task, examples in materialize(shard, table) for _ in examples) for shard in shards]
    return sum(max(c.values()) / c.total() for c in counts) / len(counts)


def test_dirichlet_over_the_category_column_skews_more_at_lower_alpha(tmp_path):
    rows = make_rows(tasks_per_category=1, per_task=60)
    columns = {"prompt": "question", "completion": "answers", "category": "topic"}  # no task column: Dirichlet over categories
    tasks = load_tasks("hf-datasets", write(rows, "jsonl", tmp_path), columns=columns)
    skew = {
        alpha: sum(dominant_share(partition(tasks, "dirichlet", seed=s, num_clients=12, alpha=alpha), tasks) for s in range(3)) / 3
        for alpha in (0.1, 1.0, 100.0)
    }
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.8 and skew[100.0] < 0.4  # near one category each; near uniform over four


@pytest.mark.parametrize(
    ("columns", "split", "message"),
    [
        ({**COLUMNS, "prompt": "input"}, None, "data.columns.prompt: column 'input' is not in the data set"),
        ({**COLUMNS, "category": "label"}, None, "data.columns.category: column 'label'"),
        ({**COLUMNS, "task": "topic", "category": "name"}, None, "data.columns.category: task 'alpha' has rows in categories"),
        (COLUMNS, "validation", "data.split: the data set at .* has splits \\['train', 'test'\\]"),
    ],
)
def test_errors_name_the_setting_and_the_columns_there_are(tmp_path, columns, split, message):
    path = write(make_rows(), "save_to_disk-dict", tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        load_hf_dataset(path, columns, split=split)
    if "is not in" in message:
        assert "['question', 'answers', 'name', 'topic', 'extra']" in str(err.value)


def test_config_checks_the_data_section(tmp_path):
    with pytest.raises(ValueError, match="data.columns and data.split apply to data.source='hf-datasets' only"):
        load_config("tiny", ["data.columns.prompt=question"])
    with pytest.raises(ValueError, match="data.path is required"):
        load_config("tiny", ["data.source=hf-datasets"])
    with pytest.raises(ValueError, match="data.columns.prompt: unknown key|data.columns.prompts: unknown key"):
        load_config("tiny", ["data.source=hf-datasets", "data.path=x", "data.columns.prompts=q"])


def run_args(tmp_path, path, *extra):
    settings = [f"output_dir={tmp_path / 'runs'}", "data.source=hf-datasets", f"data.path={path}",
                "data.columns.prompt=question", "data.columns.completion=answers", "data.columns.task=name",
                "data.columns.category=topic", "federation.rounds=1", *extra]
    return ["run", "--config", "tiny", "--quiet", *[a for s in settings for a in ("--set", s)]]


def test_flexfed_run_on_a_datasets_source(tmp_path):
    from flexfed.cli import main

    path = write(make_rows(), "save_to_disk", tmp_path)
    assert main(run_args(tmp_path, path, "eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0")) == 0
    lines = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [0, 1]
    assert all(line["rouge_l_seen"] is not None and line["rouge_l_unseen"] is not None for line in lines)
    assert lines[0]["clients_registered"] == 6  # 8 tasks, 2 categories (one quarter, rounded up) unseen


def test_a_missing_path_names_data_path(tmp_path, caplog):
    from flexfed.cli import main

    assert main(run_args(tmp_path, tmp_path / "absent")) != 0
    assert f"data.path '{tmp_path / 'absent'}' (data.source=hf-datasets)" in caplog.text


def test_ten_thousand_clients_do_not_materialise_any_clients_examples(tmp_path, tokenizer):
    """Building the federation describes clients by row indices; examples are looked up only for a sampled client."""
    from flexfed import federation

    rows = make_rows(tasks_per_category=1, per_task=3500, seed=1)
    path = write(rows, "parquet", tmp_path)
    config = load_config("tiny", [
        "data.source=hf-datasets", f"data.path={path}", "data.columns.prompt=question", "data.columns.completion=answers",
        "data.columns.category=topic", "data.partition=iid", "data.num_clients=10000",
        "eval.seen_examples=4", "eval.unseen_examples=4", "eval.validation_examples=0"])  # fmt: skip
    with mock.patch.object(federation, "materialize", wraps=materialize) as looked_up:
        built = federation.build_federation(config, tokenizer)
        assert len(built.clients) == 10_000 and looked_up.call_count == 0
        for shard in built.clients[:: 1000]:
            assert all(type(i) is int for _, indices in shard.parts for i in indices)
        examples = federation.client_examples(config, tokenizer, built, built.clients[7])
    assert looked_up.call_count == 1 and len(examples) == built.clients[7].num_examples
