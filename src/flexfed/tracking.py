"""Metrics where users already look: every round's numbers also go to TensorBoard and MLflow.

metrics.jsonl stays the record; a tracker mirrors each round's line as scalars (step = round):
the run-level numbers (losses, Rouge-L of every split, bytes, times) and, per split, the Rouge-L
of each category. Optional: ``pip install flexfed[tracking]`` brings TensorBoard and MLflow.
``tracking.tensorboard: true`` writes event files to ``RUN_DIR/tensorboard``
(``tensorboard --logdir runs``); ``tracking.mlflow: true`` logs to an MLflow run named after the
run directory, with the resolved config as its parameters, in ``tracking.mlflow_uri`` (default
``sqlite:///RUN_DIR/mlflow.db``: ``mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow.db``).

A resumed run redoes the rounds after its last checkpoint, which a crash may already have
logged: `Trackers` gets the first redone round (``purge_from``) and every tracker drops
its points from there on, so each round keeps one point.
"""

from __future__ import annotations

import json
import math
import re
import time
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


class Trackers:
    """The trackers ``config.tracking`` turns on, for a new run or a resumed one (``purge_from``:
    the first round it redoes), logging and closing together."""

    def __init__(self, config, run_dir: Path, purge_from: int | None = None):
        t = config.tracking
        self.trackers = [TensorBoardTracker(run_dir, purge_from)] if t.tensorboard else []
        if t.mlflow:
            self.trackers.append(MlflowTracker(config, run_dir, purge_from))

    def log(self, record: Mapping) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


class MlflowTracker:
    """Logs the resolved config as parameters and each round's metrics line to one MLflow run.

    The run's id is kept in ``RUN_DIR/mlflow.json``. MLflow cannot delete a metric's points, so a
    resumed run whose MLflow run holds points of rounds it redoes (or that was not tracked
    before) starts a fresh MLflow run of the same name from the kept rounds of metrics.jsonl,
    and deletes the old one.
    """

    ID_FILE = "mlflow.json"

    def __init__(self, config, run_dir: Path, purge_from: int | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:  # the optional extra is missing
            raise ImportError(f"tracking.mlflow needs MLflow: pip install 'flexfed[tracking]' ({err})") from None
        self.run_dir = Path(run_dir)
        t = config.tracking
        self.uri = t.mlflow_uri or f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        previous = self._previous() if purge_from is not None else None
        if previous is not None and not self._has_points_from(previous, purge_from):
            self.run_id = previous
            return
        experiment = self.client.get_experiment_by_name(t.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(t.mlflow_experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id
        self._log_batch(params=flat_params(config.model_dump(mode="json")))
        (self.run_dir / self.ID_FILE).write_text(json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")
        if purge_from is not None:  # replay the rounds kept, then drop the old run
            for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
                if line.strip() and json.loads(line)["round"] < purge_from:
                    self.log(json.loads(line))
            if previous is not None:
                self.client.delete_run(previous)

    def _previous(self) -> str | None:
        """The MLflow run this run directory logged to before, if it is in this store and alive."""
        try:
            stored = json.loads((self.run_dir / self.ID_FILE).read_text())
            if stored["tracking_uri"] != self.uri:
                return None
            run = self.client.get_run(stored["run_id"])
        except Exception:  # noqa: BLE001 - no file, another store, a deleted run: start a new MLflow run
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _has_points_from(self, run_id: str, first_round: int) -> bool:
        keys = self.client.get_run(run_id).data.metrics
        return any(m.step >= first_round for key in keys for m in self.client.get_metric_history(run_id, key))

    def _log_batch(self, metrics=(), params=()) -> None:
        from mlflow.entities import Metric, Param

        metrics = [Metric(key, value, timestamp, step) for key, value, timestamp, step in metrics]
        params = [Param(key, value) for key, value in params]
        for start in range(0, max(len(metrics), len(params)), 100):  # MLflow's per-batch limit on params
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 100], params=params[start : start + 100])

    def log(self, record: Mapping) -> None:
        now, step = int(time.time() * 1000), int(record["round"])
        self._log_batch(metrics=[(metric_key(tag), value, now, step) for tag, value in scalars(record).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def metric_key(tag: str) -> str:
    """A tag as an MLflow metric name, which allows letters, digits and ``_-. /`` only."""
    return re.sub(r"[^\w\-. /]", "_", tag)


def flat_params(config: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    """A nested config as MLflow parameters: ``("training.lr", "0.0003")``; lists as JSON."""
    out = []
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.extend(flat_params(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)))
    return out
