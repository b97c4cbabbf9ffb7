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
