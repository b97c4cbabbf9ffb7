"""Seeded randomness that does not depend on call order or on Python's hash salt.

Every random choice in the data layer draws from a generator keyed by (seed, purpose, name),
so adding a task or a builtin family never changes the draws made for the others.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def rng(seed: int, *keys: str) -> random.Random:
    # random.Random seeds a str through SHA-512, which is stable across runs and platforms.
    return random.Random(":".join([str(seed), *keys]))


def np_rng(seed: int, *keys: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def subsample(items: Sequence[T], limit: int | None, generator: random.Random) -> list[T]:
    """At most ``limit`` items drawn without replacement, in their original order.

    Sampling rather than taking the first ``limit`` matters: P3 files list the templates of
    one source question back to back, so a prefix would be far less varied.
    """
    if limit is None or len(items) <= limit:
        return list(items)
    if limit < 1:
        raise ValueError(f"max_examples_per_task must be >= 1, got {limit}")
    keep = sorted(generator.sample(range(len(items)), limit))
    return [items[i] for i in keep]
