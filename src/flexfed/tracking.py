"""Metrics where users already look: every round's numbers also go to TensorBoard.

metrics.jsonl stays the record; a tracker mirrors each round's line as scalars (step = round):
the run-level numbers (losses, Rouge-L of every split, bytes, times) and, per split, the Rouge-L
of each category. Optional: ``pip install flexfed[tracking]`` brings TensorBoard, and
``tracking.tensorboard: true`` writes event files to ``RUN_DIR/tensorboard``
(``tensorboard --logdir runs``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping


# Tag groups (TensorBoard's sections): ``rouge_l_unseen`` is ``rouge_l/unseen``.
GROUPS = ("rouge_l", "eval_loss", "wire_bytes", "array_bytes", "bytes", "time", "clients", "tokens")


def scalars(record: Mapping) -> dict[str, float]:
    """The numbers of one metrics line as TensorBoard tags: ``rouge_l/unseen``, ``bytes/up``, ...

    Numbers at the top level become ``group/name`` (``GROUPS``; others keep their key); per-category
    Rouge-L becomes ``rouge_l_by_category/SPLIT/CATEGORY``. Lists (client records), strings,
    missing and non-finite values are left out.
    """
    out = {}
    for key, value in record.items():
        if key == "round":
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            group = next((g for g in GROUPS if key.startswith(g + "_")), None)
            out[f"{group}/{key.removeprefix(group + '_')}" if group else key] = float(value)
        elif key.startswith("rouge_l_") and key.endswith("_by_category") and isinstance(value, Mapping):
            split = key.removeprefix("rouge_l_").removesuffix("_by_category")
            out.update({f"rouge_l_by_category/{split}/{c}": float(v) for c, v in value.items() if v is not None})
    return out


class TensorBoardTracker:
    """Writes each round's metrics line to ``run_dir/tensorboard``."""

    def __init__(self, run_dir: Path, purge_from: int | None = None):
        """``purge_from``: a resumed run drops the points of rounds from this one on, which the
        crashed run wrote after its last checkpoint and the resumed one redoes."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # the optional extra is missing
            raise ImportError(f"tracking.tensorboard needs TensorBoard: pip install 'flexfed[tracking]' ({err})") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_from)

    def log(self, record: Mapping) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(record["round"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
