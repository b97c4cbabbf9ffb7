"""TensorBoard mirrors metrics.jsonl: read the event files back and compare."""

import json

import pytest

from flexfed.engines.simulation import run
from flexfed.tracking import scalars

pytest.importorskip("tensorboard", reason="TensorBoard is the optional extra flexfed[tracking]")


def _events(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    assert all(len({e.step for e in points}) == len(points) for points in events.values())  # one point per round
    return {tag: {e.step: e.value for e in points} for tag, points in events.items()}


def test_scalars_name_numbers_by_group_and_skip_the_rest():
    record = {"round": 2, "rouge_l_unseen": 0.25, "bytes_up": 1024, "train_loss": None, "method": "fedit", "eval_loss_seen": float("nan"),
              "clients": [{"id": "a"}], "rouge_l_seen_by_category": {"dates": 0.5}, "aggregate_rejected": None}
    assert scalars(record) == {"rouge_l/unseen": 0.25, "bytes/up": 1024.0, "rouge_l_by_category/seen/dates": 0.5}


def test_event_files_hold_every_rounds_metrics_and_a_resume_replaces_redone_rounds(tiny_config):
    settings = ["federation.rounds=3", "eval.every=1", "tracking.tensorboard=true", "eval.seen_examples=2", "eval.unseen_examples=2"]
    config = tiny_config("name=tracked", *settings)
    run(config, show_progress=False, stop_after=2)
    # A crash after round 3 was logged but before its checkpoint leaves a stray point behind.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(config.run_dir / "tensorboard")) as stray:
        stray.add_scalar("rouge_l/unseen", 99.0, global_step=3)
    run(config, resume=True, show_progress=False)  # redoes round 3
    lines = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = _events(config.run_dir)
    for line in lines:
        for tag, value in scalars(line).items():
            assert events[tag][line["round"]] == pytest.approx(value, rel=1e-6), (tag, line["round"])
    assert sorted(events["rouge_l/unseen"]) == [0, 1, 2, 3] and events["rouge_l/unseen"][3] != 99.0
    assert sorted(events["train_loss"]) == [1, 2, 3]


def test_mlflow_holds_the_config_and_every_rounds_metrics_and_a_resume_replaces_redone_rounds(tiny_config):
    pytest.importorskip("mlflow", reason="MLflow is the optional extra flexfed[tracking]")
    from mlflow.tracking import MlflowClient

    from flexfed.tracking import metric_key

    settings = ["federation.rounds=2", "tracking.mlflow=true", "eval.seen_examples=2", "eval.unseen_examples=2", "eval.validation_examples=0"]
    config = tiny_config("name=mlflowed", *settings)
    run(config, show_progress=False, stop_after=1)
    stored = json.loads((config.run_dir / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    assert stored["tracking_uri"] == f"sqlite:///{(config.run_dir / 'mlflow.db').resolve()}"
    # A crash after round 2 was logged but before its checkpoint leaves a stray point behind.
    client.log_metric(stored["run_id"], "rouge_l/unseen", 99.0, step=2)
    run(config, resume=True, show_progress=False)  # redoes round 2

    (tracked,) = client.search_runs([e.experiment_id for e in client.search_experiments()])  # the old run is deleted
    assert tracked.info.run_name == "mlflowed" and tracked.info.status == "FINISHED"
    assert tracked.data.params["federation.rounds"] == "2" and tracked.data.params["training.lr"] == str(config.training.lr)
    assert tracked.data.params["lora.target_modules"] == json.dumps(config.lora.target_modules)
    lines = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    history = {}
    for key in tracked.data.metrics:
        points = client.get_metric_history(tracked.info.run_id, key)
        assert len({p.step for p in points}) == len(points), key  # one point per round
        history[key] = {p.step: p.value for p in points}
    for line in lines:
        for tag, value in scalars(line).items():
            assert history[metric_key(tag)][line["round"]] == pytest.approx(value, rel=1e-6), (tag, line["round"])
    assert sorted(history["rouge_l/unseen"]) == [0, 1, 2] and history["rouge_l/unseen"][2] != 99.0

    # A clean resume (nothing logged past the checkpoint) keeps logging to the same MLflow run.
    config.federation.rounds = 3
    run(config, resume=True, show_progress=False)
    assert json.loads((config.run_dir / "mlflow.json").read_text())["run_id"] == tracked.info.run_id
    assert sorted(p.step for p in client.get_metric_history(tracked.info.run_id, "rouge_l/unseen")) == [0, 1, 2, 3]


def test_mlflow_names_and_settings():
    from flexfed.config import ConfigError, load_config
    from flexfed.tracking import flat_params, metric_key

    assert metric_key("rouge_l_by_category/seen/Q&A (multi)") == "rouge_l_by_category/seen/Q_A _multi_"
    assert flat_params({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == [("a.b", "1"), ("a.c", "[1, 2]"), ("a.d", "{}"), ("e", "None")]
    with pytest.raises(ConfigError, match="tracking.mlflow_uri and tracking.mlflow_experiment need tracking.mlflow: true"):
        load_config("tiny", ["tracking.mlflow_uri=sqlite:///x.db"])
