import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)


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
