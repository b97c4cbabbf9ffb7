"""KD-FedLLM's public proxy set: prompts every party can read, and the positions that are scored.

The prompts come from a JSONL file (``kd.proxy.path``: one ``{"prompt": ..., "definition": ...}``
per line, ``definition`` optional) or from the examples of unseen tasks (``kd.proxy.tasks``, all
of them when empty) that no client owns and that are not evaluated; a seeded draw keeps
``kd.proxy.prompts`` of them. Every party builds the same prompts from the config. Each round
the server's global model answers them greedily (``generate_ids``), and those response tokens
are the positions every party scores: no party needs a public label.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import torch

from flexfed.data.prompts import IGNORE_INDEX, EncodedExample, encode_prompt
from flexfed.server import derived_seed

NO_TOKEN = -1  # pads a response row on the wire


class ProxyError(ValueError):
    """The proxy set cannot be built from the config; the message names the setting or file."""


def _file_prompts(path: Path) -> list[tuple[str, str]]:
    """(definition, prompt) of each line of a JSONL file."""
    if not path.is_file():
        raise ProxyError(f"kd.proxy.path {str(path)!r}: file not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ProxyError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ProxyError(f"{path}:{number}: expected an object with a non-empty string 'prompt'")
        definition = row.get("definition", "")
        if not isinstance(definition, str):
            raise ProxyError(f"{path}:{number}: 'definition' must be a string")
        out.append((definition, row["prompt"]))
    if not out:
        raise ProxyError(f"{path}: holds no prompts")
    return out


def _task_prompts(federation, names: Sequence[str], evaluated: set[tuple[int, ...]], tokenizer, budget: int) -> list[tuple[str, str]]:
    """(definition, input) of every example of the named unseen tasks that is not evaluated."""
    unseen = {t.name: t for t in federation.unseen_all}
    owned = {t for t in federation.seen_tasks}
    for name in names:
        if name in owned:
            raise ProxyError(f"kd.proxy.tasks: {name!r} is a training task (clients own it); name unseen tasks only")
        if name not in unseen:
            raise ProxyError(f"kd.proxy.tasks: {name!r} is not an unseen task of this run; unseen tasks: {sorted(unseen)[:8]}")
    chosen = [unseen[n] for n in (names or sorted(unseen))]
    return [
        (t.definition, ex.input)
        for t in chosen
        for ex in t.examples
        if tuple(encode_prompt(tokenizer, t.definition, ex.input, budget)) not in evaluated
    ]


def load_prompts(config, tokenizer, federation) -> list[list[int]]:
    """The proxy prompts' token ids, the same on every party for one config."""
    p = config.kd.proxy
    budget = config.data.max_tokens - p.max_new_tokens
    if budget < 1:
        raise ProxyError(f"kd.proxy.max_new_tokens={p.max_new_tokens} leaves no room for a prompt in data.max_tokens={config.data.max_tokens}")
    if p.path is not None:
        texts = _file_prompts(Path(p.path))
    else:
        evaluated = {tuple(item.prompt_ids) for split in (federation.eval_seen, federation.eval_unseen, federation.eval_validation) for item in split}
        texts = _task_prompts(federation, p.tasks, evaluated, tokenizer, budget)
        if not texts:
            raise ProxyError("kd.proxy: the unseen tasks have no examples left that are not evaluated; give a file (kd.proxy.path)")
    rng = random.Random(derived_seed(config.seed, "kd-proxy"))
    picked = sorted(rng.sample(range(len(texts)), min(p.prompts, len(texts))))
    return [encode_prompt(tokenizer, *texts[i], budget) for i in picked]


def scored_examples(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[EncodedExample]:
    """Prompt + response with the response labelled: the positions scored, in order."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(prompts)} proxy prompts")
    return [EncodedExample(list(p) + list(r), [IGNORE_INDEX] * len(p) + list(r), False, False) for p, r in zip(prompts, responses)]


def responses_tensor(responses: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Responses as one float32 matrix padded with ``NO_TOKEN`` (ids below 2^24 are exact)."""
    out = torch.full((len(responses), width), float(NO_TOKEN))
    for i, r in enumerate(responses):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def responses_from_tensor(t: torch.Tensor, rows: int, vocab: int) -> list[list[int]]:
    """The responses a ``responses_tensor`` carries; ``ValueError`` if it is not one for ``rows`` prompts."""
    if t.ndim != 2 or t.shape[0] != rows or not torch.isfinite(t).all() or not torch.equal(t, t.round()):
        raise ValueError(f"proxy responses: expected {rows} rows of integer token ids, got shape {tuple(t.shape)}")
    out = []
    for row in t.long().tolist():
        n = next((j for j, v in enumerate(row) if v == NO_TOKEN), len(row))
        ids = row[:n]
        if not ids or any(v != NO_TOKEN for v in row[n:]) or not all(0 <= v < vocab for v in ids):
            raise ValueError(f"proxy responses: a row is empty, has a gap, or holds ids outside [0, {vocab})")
        out.append(ids)
    return out
