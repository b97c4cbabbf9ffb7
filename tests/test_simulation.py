import json

import pytest
import torch

from flexfed.engines.simulation import RunExists, Simulation, run
from flexfed.lora import load_adapter
from flexfed.server import load_checkpoint

TIMING = {"time_train_s", "time_aggregate_s", "time_eval_s", "time_round_s", "time_overhead_s", "seconds"}


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_config_metrics_adapters_and_report_inputs(tiny_config):
    config = tiny_config("federation.rounds=2")
    run_dir = run(config, show_progress=False)
    metrics = _metrics(run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[0]["train_loss"] is None and metrics[0]["rouge_l_unseen"] is not None
    for m in metrics[1:]:
        assert m["clients_reported"] == m["clients_sampled"] == 5  # ceil(0.1 * 50)
        assert m["bytes_up"] == sum(c["bytes_up"] for c in m["clients"]) > 0
        assert m["tokens_trained"] == sum(c["tokens"] for c in m["clients"]) > 0
        assert {"id", "ranks", "examples", "tokens", "seconds", "loss"} <= set(m["clients"][0])
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "predictions" / "round-0002.jsonl").exists()
    saved = load_adapter(run_dir / "adapters" / "round-0002")
    assert {f.rank for f in saved.adapter.values()} == {4}
    with pytest.raises(RunExists, match="--resume"):
        run(config, show_progress=False)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    whole = tiny_config("name=whole", "federation.rounds=3", "eval.every=2")
    parted = tiny_config("name=parted", "federation.rounds=3", "eval.every=2")
    run(whole, show_progress=False)
    run(parted, show_progress=False, stop_after=1)
    assert load_checkpoint(parted.run_dir).round == 1
    # A crash after the metrics line but before the checkpoint leaves a stray line behind.
    with open(parted.run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": 2, "stray": True}) + "\n")
    run(parted, resume=True, show_progress=False)

    a, b = load_checkpoint(whole.run_dir), load_checkpoint(parted.run_dir)
    assert a.round == b.round == 3
    for name in a.global_adapter:
        assert torch.equal(a.global_adapter[name].a, b.global_adapter[name].a)
        assert torch.equal(a.global_adapter[name].b, b.global_adapter[name].b)
    assert _strip_timing(_metrics(whole.run_dir)) == _strip_timing(_metrics(parted.run_dir))


def test_resume_without_checkpoint_is_an_error(tiny_config):
    with pytest.raises(RunExists, match="nothing to resume"):
        run(tiny_config(), resume=True, show_progress=False)


def test_a_failing_client_is_left_out_and_never_reaches_the_global_model(tiny_config):
    config = tiny_config("federation.rounds=1", "federation.sample_fraction=0.2")
    sim = Simulation(config)
    real_train = sim.trainer.train
    sampled = sim.server.sample(1)
    poisoned, crashing = (sim.federation.clients[i].client_id for i in sampled[:2])

    def train(client_id, *args):
        if client_id == crashing:
            raise RuntimeError("out of memory")
        result = real_train(client_id, *args)
        if client_id == poisoned:
            first = next(iter(result.adapter))
            result.adapter[first].b[0, 0] = float("nan")
        return result

    sim.trainer.train = train
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    failed = {f["id"]: f["reason"] for f in record["clients_failed"]}
    assert set(failed) == {poisoned, crashing}
    assert "non-finite" in failed[poisoned] and "out of memory" in failed[crashing]
    assert record["clients_reported"] == len(sampled) - 2
    state = load_checkpoint(config.run_dir)
    assert all(torch.isfinite(f.b).all() for f in state.global_adapter.values())


@pytest.mark.parametrize(
    "method, distribution",
    [
        ("fedit", "homogeneous"),
        ("lora-fair", "homogeneous"),
        ("ffa-lora", "homogeneous"),
        ("hetlora", "heavy-tail-light"),
        ("flexlora", "uniform"),
        ("flexlora", "heavy-tail-strong"),
        ("flexlora", "normal"),
        ("hetlora", "homogeneous"),
    ],
)
def test_every_method_runs_in_the_simulator(tiny_config, method, distribution):
    config = tiny_config(
        f"name={method}-{distribution}",
        f"federation.method={method}",
        f"resources.distribution={distribution}",
        "federation.rounds=1",
        "lora.target_modules=[q_proj,v_proj,up_proj]",
        "eval.unseen_examples=2",
        "eval.seen_examples=2",
    )
    sim = Simulation(config)
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    assert record["clients_reported"] == record["clients_sampled"] > 0
    ranks = {c["ranks"]["q_proj"] for c in record["clients"]}
    state = load_checkpoint(config.run_dir)
    for name, f in state.global_adapter.items():
        assert f.rank == sim.server.max_ranks[name]  # the global keeps what the largest client needs
    if distribution == "homogeneous":
        assert ranks == {4}
    if method == "ffa-lora":  # A never leaves its shared initial value
        first = sim.server.initial_state().global_adapter
        assert all(torch.equal(state.global_adapter[n].a, first[n].a) for n in first)


def test_methods_that_need_one_rank_refuse_mixed_resources(tiny_config):
    with pytest.raises(ValueError, match="needs one common rank"):
        Simulation(tiny_config("federation.method=fedit", "resources.distribution=uniform"))
