import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def _threads(request):
    """One intra-op thread for the tiny model, all cores for the real one.

    The tiny model's matrices are too small to split; with several threads, and another process
    busy on the same two cores, OpenMP's spinning made each tiny matmul ~10x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads((os.cpu_count() or 1) if request.node.get_closest_marker("real_model") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from flexfed.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real task data beside the repository (../shared/data), or FLEXFED_SHARED_DATA."""
    path = Path(os.environ.get("FLEXFED_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"real task data not found at {path} (set FLEXFED_SHARED_DATA); a fresh clone has none")
    return path


@pytest.fixture
def tiny_config(tmp_path):
    """A validated seconds-long run config on the tiny model, writing under tmp_path."""
    from flexfed.config import load_config

    def make(*overrides: str):
        return load_config("tiny", [f"output_dir={tmp_path}", *overrides])

    return make


def random_examples(count: int, seed: int, lengths: tuple[int, int], labelled: tuple[int, int], vocab: tuple[int, int] = (3, 60)):
    """``count`` random encoded examples: ``lengths`` tokens, the last ``labelled`` of them labelled."""
    import random

    from flexfed.data.prompts import EncodedExample

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n, r = rng.randint(*lengths), rng.randint(*labelled)
        ids = [rng.randint(*vocab) for _ in range(n)]
        out.append(EncodedExample(ids, [-100] * (n - r) + ids[n - r :], False, False))
    return out
