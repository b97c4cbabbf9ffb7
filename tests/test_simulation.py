import json
import shutil

import pytest
import torch
from peft import PeftModel

from flexfed.engines.simulation import RunExists, Simulation, run
from flexfed.lora import load_adapter
from flexfed.models import tiny_llama
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
    for m in metrics:  # every round of this run is evaluated, validation too
        assert m["rouge_l_validation"] is not None and m["eval_loss_validation"] is not None
        assert m["rouge_l_unseen"] == pytest.approx(sum(m["rouge_l_unseen_by_task"].values()) / len(m["rouge_l_unseen_by_task"]))
        assert m["rouge_l_unseen_weighted"] is not None
    predictions = [json.loads(x) for x in (run_dir / "predictions" / "round-0002.jsonl").read_text().splitlines()]
    assert sum(p["split"] == "validation" for p in predictions) == config.eval.validation_examples
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


# HetLoRA with a strong tail penalty, so that clients do prune themselves within the run.
PRUNING = "federation.method_options={prune: true, gamma: 0.5, lambda: 10.0}"


@pytest.mark.parametrize(
    "method, distribution, rounds, stop, extra",
    [
        ("fedit", "homogeneous", 3, 1, []),
        ("flora", "uniform", 3, 1, []),
        # HetLoRA: its first prunes come in round 3 (round 1 starts every tail at B = 0, and
        # round 2's tails are too small to shrink), so the run stops after them, and more follow
        ("hetlora", "heavy-tail-light", 4, 3, [PRUNING, "federation.sample_fraction=0.4"]),
    ],
)
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_config, tmp_path, method, distribution, rounds, stop, extra):
    settings = [f"federation.rounds={rounds}", "eval.every=2", f"federation.method={method}", f"resources.distribution={distribution}", *extra]
    whole = tiny_config("name=whole", *settings)
    parted = tiny_config("name=parted", *settings)
    run(whole, show_progress=False)
    run(parted, show_progress=False, stop_after=stop)
    assert load_checkpoint(parted.run_dir).round == stop
    pruned_before = load_checkpoint(parted.run_dir).client_ranks
    # A crash after the metrics line but before the checkpoint leaves a stray line behind.
    with open(parted.run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"round": stop + 1, "stray": True}) + "\n")
    run(parted, resume=True, show_progress=False)

    a, b = load_checkpoint(whole.run_dir), load_checkpoint(parted.run_dir)
    assert a.round == b.round == rounds
    if method == "flora":  # the merged base is part of the state
        assert set(a.base_update) == set(b.base_update) and a.base_update
        assert all(torch.equal(a.base_update[n].a, b.base_update[n].a) and torch.equal(a.base_update[n].b, b.base_update[n].b) for n in a.base_update)
    if method == "hetlora":  # the ranks clients pruned themselves to are part of the state
        assert a.client_ranks == b.client_ranks and pruned_before
        # the round a client pruned in records what it sent beside what it was served
        pruned = [c for m in _metrics(whole.run_dir) for c in m.get("clients", []) if "ranks_sent" in c]
        assert set(pruned_before) <= {c["id"] for c in pruned}
        assert all(c["ranks_sent"][k] < c["ranks"][k] for c in pruned for k in c["ranks"])
        # and clients pruned before the interruption were served their pruned ranks after it
        after = [c for m in _metrics(parted.run_dir) if m["round"] > stop for c in m["clients"] if c["id"] in pruned_before]
        assert after and all(set(c["ranks"].values()) == set(pruned_before[c["id"]].values()) for c in after)
    for name in a.global_adapter:
        assert torch.equal(a.global_adapter[name].a, b.global_adapter[name].a)
        assert torch.equal(a.global_adapter[name].b, b.global_adapter[name].b)
    assert _strip_timing(_metrics(whole.run_dir)) == _strip_timing(_metrics(parted.run_dir))


def test_hetlora_leaves_no_dead_components_in_the_global(tiny_config):
    """Regression: with mostly rank-8 clients (heavy-tail-light), every round without a high-rank
    client zeroed A and B of the global's components 8 and up, for good (320 of 384 after 3 rounds)."""
    config = tiny_config("federation.method=hetlora", "resources.distribution=heavy-tail-light", "federation.rounds=3", "eval.every=5", "eval.seen_examples=2", "eval.unseen_examples=2")
    run(config, show_progress=False)
    state = load_checkpoint(config.run_dir)
    dead = [(n, j) for n, f in state.global_adapter.items() for j in range(f.rank) if not f.a[j].any() and not f.b[:, j].any()]
    assert dead == []
    assert max(f.rank for f in state.global_adapter.values()) > 8  # there were components beyond the rank-8 clients


def test_hetlora_self_pruning_cuts_a_clients_rank_and_the_server_serves_it_that_rank(tiny_config):
    from flexfed.federation import client_examples
    from flexfed.lora import Factors
    from flexfed.server import UpdateRejected

    config = tiny_config("federation.method=hetlora", PRUNING, "resources.distribution=homogeneous", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    server, link = sim.server, sim.server.link
    state = server.initial_state()
    g = torch.Generator().manual_seed(0)  # a trained-looking global: B != 0, so every tail has a norm to lose
    state.global_adapter = {n: Factors(b=0.05 * torch.randn(f.b.shape, generator=g), a=f.a, scale=f.scale) for n, f in state.global_adapter.items()}
    c, other = server.sample(1)[:2]
    served = dict(server.ranks_of(c))
    assert set(served.values()) == {4}
    seed = server.client_seed(1, c)
    start = link.start(server.downlink(state, c), served, seed)
    examples = client_examples(config, sim.tokenizer, sim.federation, sim.federation.clients[c])
    result = sim.trainer.train(sim.federation.clients[c].client_id, start, examples, seed, rule=server.local_rule)
    tail = server.local_rule.tail_norm
    plain = sim.trainer.train(sim.federation.clients[c].client_id, start, examples, seed)  # the same steps without the rule
    assert float(tail({n: (f.b, f.a) for n, f in plain.adapter.items()})) > 0
    assert {f.rank for f in result.adapter.values()} == {2}  # ⌊0.5 · 4⌋
    update = server.receive(c, link.send(result.adapter, served))
    # a rank that is neither what it was served nor its pruned rank is refused
    odd = {n: Factors(b=f.b[:, :3], a=f.a[:3], scale=server.scale(3)) for n, f in start.items()}
    with pytest.raises(UpdateRejected, match="expected rank"):
        server.receive(other, link.send(odd, served))
    new = server.advance(state, 1, [update], [result.num_examples])
    client_id = sim.federation.clients[c].client_id
    assert new.client_ranks == {client_id: {n: 2 for n in served}}
    assert dict(server.ranks_of(c)) == {n: 2 for n in served} and set(server.ranks_of(other).values()) == {4}
    down = server.downlink(new, c)  # next round: the first two components of the new global
    assert {t.shape for k, t in down.items() if k.endswith(".a")} == {(2, server.shapes[n][1]) for n in served}


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
        ("fed-sb", "homogeneous"),
        ("flora", "uniform"),
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
        if method == "flora":  # the exact stack of every reporter's factors
            assert f.rank == sum(sim.server.ranks_of(i)[name] for i in sim.server.sample(1))
        else:
            assert f.rank == sim.server.max_ranks[name]  # the global keeps what the largest client needs
    if distribution == "homogeneous":
        assert ranks == {4}
    first = sim.server.initial_state().global_adapter
    if method == "ffa-lora":  # A never leaves its shared initial value
        assert all(torch.equal(state.global_adapter[n].a, first[n].a) for n in first)
    if method == "fed-sb":  # B stays the shared frame; only the core moved
        assert all(torch.equal(state.global_adapter[n].b, first[n].b) for n in first)
        assert any(not torch.equal(state.global_adapter[n].a, first[n].a) for n in first)
    # The saved global adapter loads in PEFT and carries the global update over the original base.
    update = sim.server.global_update(state)
    model = PeftModel.from_pretrained(tiny_llama(seed=config.seed), str(config.run_dir / "adapters" / "round-0001"))
    for name, f in update.items():
        layer = model.base_model.model.get_submodule(name)
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        torch.testing.assert_close(delta, f.delta(), rtol=1e-5, atol=1e-6)


def _client_bytes(method, shape, rank, last_ranks):
    """SPEC §3's numbers per matrix (float32 = 4 bytes): (up, down) for one client."""
    d, k = shape
    if method == "ffa-lora":
        return 4 * rank * d, 4 * rank * d
    if method == "fed-sb":
        return 4 * rank * rank, 4 * rank * rank
    if method == "flora":  # down: the stack of the previous round's reporters (none before round 1)
        return 4 * rank * (d + k), 4 * sum(last_ranks) * (d + k)
    return 4 * rank * (d + k), 4 * rank * (d + k)


@pytest.mark.parametrize(
    "method, distribution",
    [("fedit", "homogeneous"), ("hetlora", "uniform"), ("flexlora", "uniform"), ("ffa-lora", "homogeneous"), ("fed-sb", "homogeneous"), ("flora", "uniform")],
)
def test_bytes_are_the_methods_payloads(tiny_config, method, distribution):
    # HetLoRA without self-pruning: every client sends the rank it was served (pruned sends are tested apart)
    options = ["federation.method_options={prune: false}"] if method == "hetlora" else []
    config = tiny_config(
        f"name={method}", f"federation.method={method}", f"resources.distribution={distribution}", "federation.rounds=2", "eval.every=5", "eval.seen_examples=2", "eval.unseen_examples=2", *options
    )
    assert config.model.dtype == "float32"
    sim = Simulation(config)
    sim.run(show_progress=False)
    index = {c.client_id: i for i, c in enumerate(sim.federation.clients)}
    last: dict[str, list[int]] = {n: [] for n in sim.server.shapes}  # ranks of the previous round's reporters
    for m in _metrics(config.run_dir)[1:]:
        assert m["clients_reported"] == m["clients_sampled"] > 0
        for c in m["clients"]:
            ranks = sim.server.ranks_of(index[c["id"]])
            expected = [_client_bytes(method, sim.server.shapes[n], r, last[n]) for n, r in ranks.items()]
            assert c["bytes_up"] == sum(up for up, _ in expected), (m["round"], c)
            assert c["bytes_down"] == sum(down for _, down in expected), (m["round"], c)
        assert m["bytes_up"] == sum(c["bytes_up"] for c in m["clients"])
        assert m["bytes_down"] == sum(c["bytes_down"] for c in m["clients"])
        last = {n: [sim.server.ranks_of(index[c["id"]])[n] for c in m["clients"]] for n in sim.server.shapes}
    if method == "flora":
        assert _metrics(config.run_dir)[2]["bytes_down"] > 0


def test_flora_merges_every_rounds_stack_into_the_base(tiny_config):
    config = tiny_config("federation.method=flora", "resources.distribution=uniform", "federation.rounds=2", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    sim.run(show_progress=False)
    final = load_checkpoint(config.run_dir)
    stacks = [final.global_adapter]  # round 2's stack
    shutil.rmtree(config.run_dir / "checkpoints" / "round-0002")
    stacks.append(load_checkpoint(config.run_dir).global_adapter)  # round 1's stack
    w0 = dict(tiny_llama(seed=config.seed).named_modules())
    for name in sim.server.shapes:
        expected = w0[name].weight.double() + sum(s[name].delta(torch.float64) for s in stacks)
        merged = sim.trainer.base_linear(name).weight  # the shared base after the last evaluation
        torch.testing.assert_close(merged.double(), expected, rtol=0, atol=1e-6)
    # concatenated stacks, re-factored at full rank where they would exceed it
    assert all(f.rank == min(sum(s[n].rank for s in stacks), *f.shape) for n, f in final.base_update.items())


def test_flora_cumulative_update_is_refactored_exactly_at_full_rank():
    from flexfed.aggregation.flora import flora_accumulate
    from flexfed.lora import Factors, lora_scale

    scale = lambda r: lora_scale(r, 8.0)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    stacks = [{"m": Factors(b=torch.randn(6, 4, generator=g), a=torch.randn(4, 5, generator=g), scale=scale(4))} for _ in range(3)]
    merged: dict = {}
    for stack in stacks:
        merged = flora_accumulate(merged, stack, scale)
    assert merged["m"].rank == 5 and merged["m"].scale == scale(5)  # capped at min(6, 5)
    expected = sum(s["m"].delta(torch.float64) for s in stacks)
    torch.testing.assert_close(merged["m"].delta(torch.float64), expected, rtol=1e-5, atol=1e-5)


def test_methods_that_need_one_rank_refuse_mixed_resources(tiny_config):
    with pytest.raises(ValueError, match="needs one common rank"):
        Simulation(tiny_config("federation.method=fedit", "resources.distribution=uniform"))
