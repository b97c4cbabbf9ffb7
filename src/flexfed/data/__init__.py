"""Tasks, client partitions and prompts for federated instruction tuning.

Load tasks (`load_tasks`), split off unseen categories (`split_tasks`) and held-out examples
(`holdout_examples`, by source instance: `source_instances`), describe clients cheaply (`partition` → `ClientShard`), look a sampled
client's examples up (`materialize`) and encode them with the model's chat template
(`encode_for_training`, `encode_prompt`).
"""

from flexfed.data.builtin import FAMILIES, builtin_suite
from flexfed.data.hf import load_hf_dataset
from flexfed.data.instances import Instances, instances_of, source_instances, template_words, without_instances, word_overlap_leaks, words
from flexfed.data.jsonl import dataset_categories, load_instruction_jsonl, load_prompt_completion_dir
from flexfed.data.natural_instructions import load_natural_instructions
from flexfed.data.partition import PARTITIONERS, by_task, dirichlet, holdout_examples, iid, partition, split_tasks
from flexfed.data.prompts import (
    IGNORE_INDEX,
    EncodedExample,
    encode_for_training,
    encode_prompt,
    end_of_turn_id,
    messages,
    user_content,
)
from flexfed.data.sources import SOURCES, load_tasks
from flexfed.data.types import ClientShard, Example, Task, TaskTable, materialize, task_table

__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "Instances",
    "PARTITIONERS",
    "SOURCES",
    "ClientShard",
    "EncodedExample",
    "Example",
    "Task",
    "TaskTable",
    "builtin_suite",
    "by_task",
    "dataset_categories",
    "dirichlet",
    "encode_for_training",
    "encode_prompt",
    "end_of_turn_id",
    "holdout_examples",
    "iid",
    "instances_of",
    "load_hf_dataset",
    "load_instruction_jsonl",
    "load_natural_instructions",
    "load_prompt_completion_dir",
    "load_tasks",
    "materialize",
    "messages",
    "partition",
    "source_instances",
    "split_tasks",
    "task_table",
    "template_words",
    "user_content",
    "without_instances",
    "word_overlap_leaks",
    "words",
]
