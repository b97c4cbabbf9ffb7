"""A run survives what clients send and what aggregation can produce: bad updates, crashing data
loaders, huge-but-finite factors and lying example counts never reach the global model."""

import json
import logging
from dataclasses import replace

import pytest
import torch

from flexfed.engines.simulation import Simulation
from flexfed.protocol import Outcome
from flexfed.lora import Factors, lora_scale
from flexfed.server import UpdateRejected, load_checkpoint


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _huge(update: dict) -> dict:
    """The same update with B = 3e37 everywhere: finite factors whose product overflows float32."""
    return {n: Factors(b=torch.full_like(f.b, 3e37), a=f.a, scale=f.scale) for n, f in update.items()}


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) for n in a)


def test_factors_norm_is_the_frobenius_norm_of_the_update():
    g = torch.Generator().manual_seed(0)
    f = Factors(b=torch.randn(7, 3, generator=g), a=torch.randn(3, 5, generator=g), scale=lora_scale(3, 8.0))
    assert f.norm() == pytest.approx(float(f.delta(torch.float64).norm()), rel=1e-12)
    assert _huge({"m": f})["m"].norm() > 1e37  # float64 Grams: finite where the float32 product is not


@pytest.mark.parametrize("svd", ["exact", "dense"])
def test_a_huge_finite_client_update_is_refused_and_the_run_goes_on(tiny_config, svd):
    config = tiny_config("federation.rounds=1", "federation.method=flexlora", "resources.distribution=uniform",
                         f"federation.method_options={{svd: {svd}}}", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    honest = sim.trainer.train
    attacker = sim.federation.clients[sim.server.sample(1)[0]].client_id

    def train(client_id, *args):
        result = honest(client_id, *args)
        if client_id == attacker:
            result.adapter = _huge(result.adapter)
        return result

    sim.trainer.train = train
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    assert [f["id"] for f in record["clients_failed"]] == [attacker]
    assert "max_update_ratio" in record["clients_failed"][0]["reason"]
    assert record["clients_reported"] == record["clients_sampled"] - 1 and record["aggregate_rejected"] is None
    state = load_checkpoint(config.run_dir)
    assert all(torch.isfinite(f.delta()).all() for f in state.global_adapter.values())


@pytest.mark.parametrize("svd", ["exact", "dense"])
def test_an_aggregate_out_of_bounds_keeps_the_previous_global(tiny_config, svd):
    """A huge update that reaches aggregation never becomes the global model: the exact path used
    to store a non-finite global silently, the dense path to raise out of the round."""
    config = tiny_config("federation.method=flexlora", "resources.distribution=uniform", f"federation.method_options={{svd: {svd}}}")
    server = Simulation(config).server
    state = server.initial_state()
    clients = server.sample(1)
    updates = [server.receive(c, server.downlink(state, c)) for c in clients]  # untrained starts
    updates[0] = _huge(updates[0])  # as if it had slipped past the client checks
    after = server.advance(state, 1, updates, [1.0] * len(updates))
    assert after.rejected is not None and "aggregate" in after.rejected
    assert _equal(after.global_adapter, state.global_adapter)


def test_an_update_beyond_float32_is_refused_even_without_a_norm_bound(tiny_config):
    server = Simulation(tiny_config("federation.max_update_ratio=null")).server
    client = server.sample(1)[0]
    update = server.receive(client, server.downlink(server.initial_state(), client))
    name, f = next(iter(update.items()))
    over = Factors(b=torch.full_like(f.b, 1e38), a=torch.ones_like(f.a), scale=f.scale)
    assert over.norm() > torch.finfo(torch.float32).max
    with pytest.raises(UpdateRejected, match=f"{name} update .* not representable in torch.float32"):
        server.check_update(client, {**update, name: over})


def test_a_bound_on_the_update_norm_names_the_module(tiny_config):
    sim = Simulation(tiny_config("federation.max_update_ratio=2"))
    server = sim.server
    state = server.initial_state()
    client = server.sample(1)[0]
    update = server.receive(client, server.downlink(state, client))
    name = next(iter(update))
    f = update[name]
    # B chosen so that s·B·A has exactly 3 x ‖W0‖_F of that module
    b = torch.randn(f.b.shape, generator=torch.Generator().manual_seed(1))
    bold = Factors(b=b, a=f.a, scale=f.scale)
    bold = Factors(b=b * (3 * server.base_norms[name] / bold.norm()), a=f.a, scale=f.scale)
    with pytest.raises(UpdateRejected, match=rf"{name} update .* above federation.max_update_ratio=2"):
        server.check_update(client, {**update, name: bold})


def test_a_client_whose_examples_fail_to_load_is_left_out(tiny_config):
    config = tiny_config("federation.rounds=2", "federation.sample_fraction=0.2", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    sampled = sim.server.sample(1)
    broken_task, broken_index = (sim.federation.clients[i] for i in sampled[:2])
    del sim.federation.tasks[broken_task.task]  # KeyError inside the loader
    at = sim.federation.clients.index(broken_index)
    sim.federation.clients[at] = replace(broken_index, example_indices=(*broken_index.example_indices, 10**6))  # IndexError inside the loader
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    failed = {f["id"]: f["reason"] for f in record["clients_failed"]}
    assert set(failed) == {broken_task.client_id, broken_index.client_id}
    assert all(reason.startswith(f"ClientFailure: client {cid}: its examples could not be loaded") for cid, reason in failed.items())
    assert "KeyError" in failed[broken_task.client_id] and "IndexError" in failed[broken_index.client_id]
    assert record["clients_reported"] == len(sampled) - 2
    assert load_checkpoint(config.run_dir).round == 2


def test_when_every_client_fails_the_old_global_stays(tiny_config):
    config = tiny_config("federation.rounds=1", "eval.seen_examples=2", "eval.unseen_examples=2")
    sim = Simulation(config)
    sim.federation.tasks.clear()
    before = sim.server.initial_state().global_adapter
    sim.run(show_progress=False)
    record = _metrics(config.run_dir)[1]
    assert record["clients_reported"] == 0 and len(record["clients_failed"]) == record["clients_sampled"]
    assert _equal(load_checkpoint(config.run_dir).global_adapter, before)


def test_the_server_weights_clients_by_their_shard_not_by_what_they_report(tiny_config, caplog):
    settings = ["federation.rounds=1", "federation.sample_fraction=0.2", "eval.seen_examples=2", "eval.unseen_examples=2"]
    honest = Simulation(tiny_config("name=honest", *settings))
    honest.run(show_progress=False)
    lying = Simulation(tiny_config("name=lying", *settings))
    liar = lying.federation.clients[lying.server.sample(1)[0]].client_id
    execute = lying.executor.run

    def execute_with_a_liar(round_, conversations, progress):
        outcomes = execute(round_, conversations, progress)
        for outcome in outcomes.values():
            if isinstance(outcome, Outcome) and outcome.stats["client"] == liar:
                outcome.stats = {**outcome.stats, "num_examples": 10**6}  # a node claiming a huge shard to dominate the average
        return outcomes

    lying.executor.run = execute_with_a_liar
    with caplog.at_level(logging.WARNING, logger="flexfed.runner"):
        lying.run(show_progress=False)
    assert _equal(load_checkpoint(lying.config.run_dir).global_adapter, load_checkpoint(honest.config.run_dir).global_adapter)
    assert any(f"client {liar} reported 1000000 training examples" in r.getMessage() for r in caplog.records)
    shard = next(c for c in lying.federation.clients if c.client_id == liar)
    assert next(c for c in _metrics(lying.config.run_dir)[1]["clients"] if c["id"] == liar)["examples"] == shard.num_examples
