"""Evaluation: batched greedy generation scored with Rouge-L (as Natural Instructions does), and loss.

Evaluation runs in the model's own dtype, never under autocast: on CPU, bf16 autocast made
token-by-token decoding about 5x slower (SmolLM2-135M: 19 s vs 4 s for 16 prompts x 24 tokens),
because each step's matrices are too small to repay the casts. A bfloat16 model (``training.
precision: bf16``) decodes in bfloat16; greedy completions then differ from float32 ones where
rounding flips a near-tie (``benchmarks/generation.py`` counts them).
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from flexfed.client import collate, response_loss
from flexfed.data.prompts import EncodedExample


@dataclass(frozen=True)
class EvalItem:
    task: str
    category: str
    prompt_ids: tuple[int, ...]
    references: tuple[str, ...]
    scored: EncodedExample  # prompt + first reference, for the evaluation loss
    task_size: int = 1  # examples of the task in the data set: its weight in the weighted aggregate


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure against the best-matching reference."""
    return max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions as text (see ``generate_ids``)."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size)]


@contextmanager
def _contiguous_head_input(model):
    """Generation slices the prompt's last position before the output head; on a bfloat16 head
    PyTorch then multiplies the strided slice by expanding the whole head once per row (a
    49152 x 576 copy per prompt, 1 s of a 3.6 s batch of 16 on a Xeon). A contiguous input
    takes the plain GEMM; the numbers are the same."""
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy completions' token ids, batched by similar length with left padding and the KV
    cache; each ends at its first stop token (kept) or after ``max_new_tokens``."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stops = set(_stop_ids(tokenizer))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(prompts[i])
            ids[row, width - n :] = torch.tensor(prompts[i])
            mask[row, width - n :] = 1
        with _contiguous_head_input(model):
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stops),
            )
        for row, i in enumerate(idx):
            ids = gen[row, width:].tolist()
            end = next((j + 1 for j, t in enumerate(ids) if t in stops), len(ids))
            out[i] = ids[:end]  # what follows the first stop token is padding
    return out


@torch.no_grad()
def evaluation_loss(model, items: Sequence[EvalItem], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean response loss over ``items``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate([it.scored for it in items[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += response_loss(model, batch).item() * n
        count += n
    return total / max(count, 1)


def aggregate(scores: Sequence[float], items: Sequence[EvalItem]) -> dict:
    """Item scores folded three ways: per task, the equal-weight mean of the task means, and
    the mean of the task means weighted by the tasks' sizes (FlexLoRA's aggregate: Rouge-L over
    unseen tasks weighted by their number of examples), plus the mean per category."""
    by_task, by_category, size = defaultdict(list), defaultdict(list), {}
    for score, item in zip(scores, items):
        by_task[item.task].append(score)
        by_category[item.category].append(score)
        size[item.task] = item.task_size
    task_mean = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    return {
        "rouge_l": sum(task_mean.values()) / len(task_mean),
        "rouge_l_weighted": sum(size[t] * m for t, m in task_mean.items()) / sum(size[t] for t in task_mean),
        "rouge_l_by_task": task_mean,
        "rouge_l_by_category": {c: sum(v) / len(v) for c, v in sorted(by_category.items())},
    }


def evaluate(model, tokenizer, items: Sequence[EvalItem], max_new_tokens: int, batch_size: int) -> dict:
    """Rouge-L of ``model`` on ``items`` (see `aggregate`: ``rouge_l`` is the equal-weight mean
    over tasks) and the token-weighted evaluation loss."""
    if not items:
        return {"rouge_l": None, "rouge_l_weighted": None, "loss": None, "rouge_l_by_task": {}, "rouge_l_by_category": {}, "predictions": []}
    was_training = model.training
    model.eval()
    predictions = generate(model, tokenizer, [it.prompt_ids for it in items], max_new_tokens, batch_size)
    loss = evaluation_loss(model, items, tokenizer.pad_token_id, batch_size)
    model.train(was_training)
    scores = [rouge_l(p, it.references) for p, it in zip(predictions, items)]
    return {
        **aggregate(scores, items),
        "loss": loss,
        "predictions": [
            {"task": it.task, "prediction": p, "reference": it.references[0], "rouge_l": s}
            for it, p, s in zip(items, predictions, scores)
        ],
    }
