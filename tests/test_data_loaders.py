"""Loaders: real sample data in shared/data, synthetic files for the error paths."""

import json
import os
from pathlib import Path

import pytest

from flexfed.data import (
    SOURCES,
    builtin_suite,
    dataset_categories,
    load_instruction_jsonl,
    load_natural_instructions,
    load_prompt_completion_dir,
    load_tasks,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FLEXFED_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real sample data not found at {path} (set FLEXFED_SHARED_DATA to the shared/data folder)")
    return path


def write_lines(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


NI_TASK = {
    "Definition": ["Answer the question."],
    "Categories": ["Question Answering", "Other"],
    "Positive Examples": [{"input": "2+2?", "output": "4", "explanation": "sum"}],
    "Instances": [{"id": f"i{k}", "input": f"{k}+1?", "output": [str(k + 1), f"{k + 1}.0"]} for k in range(10)],
}


def write_ni(path: Path, **changes) -> Path:
    data = {**NI_TASK, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- Natural Instructions


def test_natural_instructions_real_sample():
    folder = shared("natural-instructions")
    (task,) = load_natural_instructions(folder)
    assert task.name == "task039_qasc_find_overlapping_words"
    assert task.category == "Verification"
    assert task.definition.startswith("Generate an overlapping word")
    assert len(task) == 12
    first = task.examples[0]
    assert first.input.startswith("Sentence1: Parasites")
    assert first.outputs == ("host", "live", "off")  # every acceptable answer is a reference
    assert load_natural_instructions(folder / f"{task.name}.json") == [task]


def test_natural_instructions_list_definition_subsampling_and_demonstrations(tmp_path):
    file = write_ni(tmp_path / "task001_add.json")
    (task,) = load_natural_instructions(file)
    assert (task.name, task.category, task.definition) == ("task001_add", "Question Answering", "Answer the question.")

    (small,) = load_natural_instructions(file, max_examples_per_task=4, seed=3)
    assert len(small) == 4
    assert load_natural_instructions(file, max_examples_per_task=4, seed=3) == [small]
    positions = [task.examples.index(e) for e in small.examples]
    assert positions == sorted(positions)  # a subset in the original order

    (with_demo,) = load_natural_instructions(file, positive_examples=1)
    assert with_demo.definition == "Answer the question.\n\nExample input: 2+2?\nExample output: 4"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"Definition": None}, "missing field 'Definition'"),
        ({"Categories": []}, "'Categories'"),
        ({"Instances": None}, "missing field 'Instances'"),
        ({"Instances": [{"input": "x", "output": ["y"]}, {"input": "x", "output": 5}]}, r"'Instances'\[1\].*'output'"),
        ({"Instances": [{"output": ["y"]}]}, r"'Instances'\[0\].*'input'"),
        ({"Instances": [{"input": "x", "output": ["  "]}]}, "no non-empty answer"),
    ],
)
def test_natural_instructions_bad_fields_name_file_and_field(tmp_path, changes, message):
    file = write_ni(tmp_path / "task002_bad.json", **changes)
    with pytest.raises(ValueError, match=message) as error:
        load_natural_instructions(file)
    assert "task002_bad.json" in str(error.value)


def test_natural_instructions_bad_json_and_missing_path(tmp_path):
    (tmp_path / "task003.json").write_text("{not json")
    with pytest.raises(ValueError, match="task003.json: not valid JSON"):
        load_natural_instructions(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_natural_instructions(tmp_path / "nowhere")


# ---------------------------------------------------------------- Dolly / Alpaca JSONL


def test_instruction_jsonl_one_task_per_category(tmp_path):
    file = write_lines(
        tmp_path / "dolly.jsonl",
        [
            {"instruction": "Name a color.", "context": "", "response": "Red", "category": "open_qa"},
            {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
            "",  # blank lines are allowed
            {"instruction": "Name a fruit.", "response": "Pear", "category": "open_qa"},
            {"instruction": "Translate.", "input": "Hola", "output": "Hello"},  # Alpaca style
        ],
    )
    tasks = load_instruction_jsonl(file)
    assert [t.name for t in tasks] == ["general", "open_qa", "summarization"]
    by_name = {t.name: t for t in tasks}
    assert all(t.definition == "" and t.category == t.name for t in tasks)
    assert [e.input for e in by_name["open_qa"].examples] == ["Name a color.", "Name a fruit."]
    assert by_name["summarization"].examples[0].input == "Summarise.\n\nA long text."
    assert by_name["general"].examples[0].input == "Translate.\n\nHola"
    assert by_name["general"].examples[0].outputs == ("Hello",)


def test_instruction_json_array(tmp_path):
    file = tmp_path / "alpaca.json"
    file.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi"}]))
    (task,) = load_instruction_jsonl(file)
    assert task.examples[0].input == "Say hi." and task.examples[0].outputs == ("Hi",)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{oops", r"data.jsonl:2: not valid JSON"),
        (json.dumps({"instruction": "x"}), r"data.jsonl:2: missing field 'response' or 'output'"),
        (json.dumps({"response": "x"}), r"data.jsonl:2: missing field 'instruction'"),
        (json.dumps({"instruction": "x", "response": 3}), r"data.jsonl:2: field 'response' must be a string"),
        (json.dumps(["a list"]), r"data.jsonl:2: expected a JSON object"),
    ],
)
def test_instruction_jsonl_errors_name_file_and_line(tmp_path, bad_line, message):
    file = write_lines(tmp_path / "data.jsonl", [{"instruction": "ok", "response": "ok"}, bad_line])
    with pytest.raises(ValueError, match=message):
        load_instruction_jsonl(file)


# ---------------------------------------------------------------- P3 prompt/completion


EXPECTED_P3_DATASETS = {
    "adversarial_qa_dbert", "adversarial_qa_dbidaf", "adversarial_qa_droberta", "ag_news", "amazon_polarity",
    "cnn_dailymail_3_0_0", "common_gen", "commonsense_qa", "cosmos_qa", "dbpedia_14", "duorc_ParaphraseRC",
    "duorc_SelfRC", "gigaword", "glue_mrpc", "glue_qqp", "imdb", "kilt_tasks_hotpotqa", "multi_news",
    "paws_labeled_final", "qasc", "quartz", "quoref", "ropes", "rotten_tomatoes", "social_i_qa", "wiki_bio",
    "wiki_hop_original", "wiki_qa", "wiqa", "xsum", "yelp_review_full",
}  # fmt: skip


def test_p3_real_directory():
    tasks = load_prompt_completion_dir(shared("p3-tasks"))
    assert len(tasks) == 250
    assert {t.category for t in tasks} == EXPECTED_P3_DATASETS  # 31 source datasets
    by_name = {t.name: t for t in tasks}
    assert by_name["glue_mrpc_equivalent"].category == "glue_mrpc"
    assert by_name["cnn_dailymail_3_0_0_tldr_summary"].category == "cnn_dailymail_3_0_0"
    assert by_name["wiki_qa_Is_This_True_"].examples[0].outputs == ("No",)
    for task in tasks:
        assert task.name.startswith(task.category + "_")
        assert task.definition == ""
        for example in task.examples:
            assert example.input and example.outputs[0]
            assert "<|endoftext|>" not in example.outputs[0] and example.outputs[0] == example.outputs[0].strip()


def test_p3_subsampling_is_seeded(tmp_path):
    folder = shared("p3-tasks")
    file = folder / "wiki_qa_Is_This_True_.jsonl"
    (a,) = load_prompt_completion_dir(file, max_examples_per_task=10, seed=0)
    (b,) = load_prompt_completion_dir(file, max_examples_per_task=10, seed=0)
    (c,) = load_prompt_completion_dir(file, max_examples_per_task=10, seed=1)
    assert len(a) == 10 and a == b and a != c


def test_dataset_category_rule_and_override(tmp_path):
    names = [f"glue_mrpc_t{k}" for k in range(3)] + [f"glue_qqp_t{k}" for k in range(3)]
    names += ["ag_news_classify", "ag_news_classify_question_first", "ag_news_recommend"]
    names += ["cnn_daily_3_0_0_sum", "cnn_daily_3_0_0_tldr"]
    names += ["qasc_is_correct_1", "qasc_is_correct_2", "qasc_qa_facts_1", "qasc_qa_facts_2", "qasc_qa_facts_3"]
    categories = dataset_categories(names)
    assert {n: categories[n] for n in ("glue_mrpc_t0", "glue_qqp_t2", "ag_news_recommend", "cnn_daily_3_0_0_sum")} == {
        "glue_mrpc_t0": "glue_mrpc",
        "glue_qqp_t2": "glue_qqp",  # sibling datasets, each with >= 3 templates, are split
        "ag_news_recommend": "ag_news",  # templates sharing a first word are not
        "cnn_daily_3_0_0_sum": "cnn_daily_3_0_0",  # shared words extend the name
    }
    assert {categories[n] for n in names if n.startswith("qasc")} == {"qasc"}  # a 2-template branch does not split

    for name in ("glue_mrpc_t0", "glue_qqp_t0", "gluex_other"):
        write_lines(tmp_path / f"{name}.jsonl", [{"prompt": "p", "completion": "c<|endoftext|>"}])
    tasks = load_prompt_completion_dir(tmp_path, dataset_prefixes=["glue", "glue_mrpc", "gluex"])
    assert [(t.name, t.category) for t in tasks] == [
        ("glue_mrpc_t0", "glue_mrpc"),
        ("glue_qqp_t0", "glue"),
        ("gluex_other", "gluex"),
    ]
    with pytest.raises(ValueError, match="gluex_other.jsonl: its name starts with none"):
        load_prompt_completion_dir(tmp_path, dataset_prefixes=["glue"])


def test_p3_errors_name_file_and_line(tmp_path):
    empty_answer = {"prompt": "p", "completion": " <|endoftext|>"}
    write_lines(tmp_path / "x_t.jsonl", [{"prompt": "p", "completion": "c"}, empty_answer])
    with pytest.raises(ValueError, match=r"x_t.jsonl:2: field 'completion' is empty"):
        load_prompt_completion_dir(tmp_path)
    write_lines(tmp_path / "x_t.jsonl", [{"prompt": "p"}])
    with pytest.raises(ValueError, match=r"x_t.jsonl:1: missing field 'completion'"):
        load_prompt_completion_dir(tmp_path)


# ---------------------------------------------------------------- load_tasks


def test_load_tasks_dispatches(tmp_path):
    assert load_tasks("builtin", seed=2, examples_per_task=8) == builtin_suite(seed=2, examples_per_task=8)
    file = write_ni(tmp_path / "task001_add.json")
    assert load_tasks("natural-instructions", file, seed=0, max_examples_per_task=3) == load_natural_instructions(
        file, max_examples_per_task=3
    )
    dolly = write_lines(tmp_path / "d.jsonl", [{"instruction": "i", "response": "r"}])
    assert load_tasks("instruction-jsonl", str(dolly))[0].name == "general"
    assert set(SOURCES) == {"builtin", "natural-instructions", "instruction-jsonl", "prompt-completion", "hf-datasets"}


def test_load_tasks_errors():
    with pytest.raises(ValueError, match="unknown task source 'dolly'.*builtin"):
        load_tasks("dolly", "x")
    with pytest.raises(ValueError, match="needs a path"):
        load_tasks("prompt-completion")
    with pytest.raises(ValueError, match="takes no path"):
        load_tasks("builtin", "some/path")
