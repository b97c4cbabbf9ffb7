"""FedKSeed / FedKSeed-Pro (flexfed.zo): the estimator, the replay, the protocol's bytes, a run, resume."""

import json
import math
import subprocess
import sys

import pytest
import torch

from flexfed import zo
from flexfed.config import load_config
from flexfed.engines import simulation
from flexfed.runner import Runner

CPU = torch.device("cpu")


def _quadratic(dim=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    curvature = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    target = torch.randn(dim, generator=g, dtype=torch.float64)
    # Two parameters (a vector and a matrix), so z spans several tensors and chunks.
    params = [torch.zeros(16, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64)]

    def flat():
        return torch.cat([p.flatten() for p in params])

    def loss():
        w = flat()
        return float(0.5 * (curvature * (w - target) ** 2).sum())

    def gradient():
        return curvature * (flat() - target)

    return params, loss, gradient


def _direction(params, plan, seed):
    zeros = [torch.zeros_like(p) for p in params]
    zo.add_direction(zeros, plan, seed, 1.0, CPU)
    return torch.cat([z.flatten() for z in zeros])


def test_projected_gradient_is_the_directional_derivative_and_averages_to_the_gradient():
    params, loss, gradient = _quadratic()
    plan = zo.chunk_plan(params, chunk=7)  # 16 + 24 elements in chunks of at most 7
    assert [(c.param, c.start, c.stop) for c in plan][:4] == [(0, 0, 7), (0, 7, 14), (0, 14, 16), (1, 0, 7)]
    with torch.no_grad():
        params[0].fill_(0.3)
    true = gradient()
    pool = zo.seed_pool(0, 2000)
    estimates = []
    for seed in pool:
        z = _direction(params, plan, seed)
        zo.add_direction(params, plan, seed, 1e-3, CPU)
        plus = loss()
        zo.add_direction(params, plan, seed, -2e-3, CPU)
        minus = loss()
        zo.add_direction(params, plan, seed, 1e-3, CPU)
        g = (plus - minus) / 2e-3
        # Central differences are exact on a quadratic: g is z's directional derivative.
        assert g == pytest.approx(float(z @ true), rel=1e-4, abs=1e-6)
        estimates.append(g * z)
    mean = torch.stack(estimates).mean(0)  # E[(zᵀ∇f) z] = ∇f
    cosine = float(mean @ true / (mean.norm() * true.norm()))
    assert cosine > 0.95 and float(mean.norm() / true.norm()) == pytest.approx(1.0, abs=0.15), (cosine, mean.norm(), true.norm())


def test_zeroth_order_steps_descend_on_the_quadratic():
    params, loss, _ = _quadratic(seed=1)
    plan = zo.chunk_plan(params, chunk=5)
    pool = zo.seed_pool(3, 64)
    start = loss()
    losses = [zo.zo_step(loss, params, plan, pool[j], 1e-3, 0.02, CPU)[1] for j in zo.sample_seeds(None, 64, 400, seed=0)]
    assert loss() < 0.2 * start
    assert sum(losses[-50:]) < sum(losses[:50])


def test_directions_are_regenerated_per_seed_and_chunk():
    params = [torch.zeros(10), torch.zeros(3, 3)]
    plan = zo.chunk_plan(params, chunk=4)
    a, b = _direction(params, plan, 11), _direction(params, plan, 11)
    assert torch.equal(a, b)  # the same seed: the same z, bit for bit
    assert not torch.equal(a, _direction(params, plan, 12))
    assert not torch.equal(a, _direction(params, zo.chunk_plan(params, chunk=5), 11))  # the chunking is part of the stream
    assert abs(float(a.mean())) < 1 and 0.5 < float(a.std()) < 1.5


def test_aggregation_weights_scalars_by_data_size_and_pro_favours_large_amplitudes():
    updates = [(torch.tensor([0, 2, 0]), torch.tensor([1.0, 2.0, 3.0])), (torch.tensor([1, 2]), torch.tensor([-4.0, 8.0]))]
    vector = zo.aggregate_scalars(updates, [30, 10], k=4)
    assert vector.tolist() == pytest.approx([0.75 * 4, 0.25 * -4, 0.75 * 2 + 0.25 * 8, 0.0])
    amplitude = torch.tensor([4.0, 1.0, 0.0, 9.0], dtype=torch.float64)
    count = torch.tensor([2.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # means 2, 1, unused, 9
    p = zo.seed_probabilities(amplitude, count)
    assert float(p.sum()) == pytest.approx(1.0) and p[3] > p[0] > p[1]
    assert float(p.max() / p.min()) == pytest.approx(math.e, rel=1e-5)  # min-max scaled then softmax
    assert p[2] == pytest.approx(float(torch.softmax(torch.tensor([1 / 8, 0, 3 / 8, 1], dtype=torch.float64), 0)[2]), rel=1e-5)  # unused: the used ones' mean, 4
    draws = zo.sample_seeds(p, 4, 4000, seed=0)
    assert draws == zo.sample_seeds(p, 4, 4000, seed=0) and draws.count(3) > draws.count(1)


_REPLAY = """
import sys, torch
from flexfed import zo
params = [torch.linspace(-1, 1, 1000).reshape(40, 25), torch.ones(37)]
plan = zo.chunk_plan(params, 64)
pool = zo.seed_pool(5, 32)
for r in range(3):
    g = torch.Generator().manual_seed(r)
    vector = torch.where(torch.rand(32, generator=g) < 0.5, torch.randn(32, generator=g), torch.zeros(32))
    zo.replay_round(params, plan, pool, vector, 1e-2, torch.device("cpu"))
print(zo.weights_hash(params))
"""


def test_replay_in_another_process_gives_the_same_weights_bit_for_bit():
    other = subprocess.run([sys.executable, "-c", _REPLAY], capture_output=True, text=True, check=True).stdout.strip()
    namespace = {}
    exec(compile(_REPLAY.replace("print(", "result = ("), "replay", "exec"), namespace)
    assert len(other) == 64 and other == namespace["result"]


def _run_overrides(tmp_path, name, *extra):
    return [f"output_dir={tmp_path}", f"name={name}", "federation.method=fedkseed", "data.partition=iid", "data.num_clients=2", *extra]


TIMINGS = {"time_train_s", "time_aggregate_s", "time_eval_s", "time_round_s", "time_overhead_s", "seconds", "replay_seconds"}


def _strip(metrics, drop=frozenset()):
    """Metrics without their timings (and ``drop``), at every depth."""
    if isinstance(metrics, dict):
        return {k: _strip(v, drop) for k, v in metrics.items() if k not in TIMINGS | drop}
    if isinstance(metrics, list):
        return [_strip(v, drop) for v in metrics]
    return metrics


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_model_run_lowers_the_loss_and_evaluates_the_replayed_weights(tmp_path):
    config = load_config("tiny", _run_overrides(tmp_path, "run", "federation.sample_fraction=0.5", "federation.rounds=2", "training.local_steps=30",
                                                "zo.seeds=64", "zo.lr=1e-3", "zo.eps=1e-3", "eval.every=1"))
    runner = Runner(config)
    runner.run(show_progress=False)
    m = _metrics(config.run_dir)
    assert m[2]["train_loss"] < m[1]["train_loss"]
    assert m[2]["eval_loss_seen"] < m[0]["eval_loss_seen"] and m[2]["eval_loss_unseen"] < m[0]["eval_loss_unseen"]  # the global model, replayed
    client = m[2]["clients"][0]
    assert client["zo_steps"] == 30 and client["catch_up_rounds"] == 1 and client["flops"] > 0 and client["peak_memory_source"] == "estimate"
    # The server's copy is the base replayed through the recorded history, bit for bit.
    protocol = runner.protocol
    fresh = [p.detach().clone() for _, p in zo.tuned_parameters(load_model_base(config), None)]
    for vector in protocol.history:
        zo.replay_round(fresh, zo.chunk_plan(fresh, config.zo.chunk), protocol.pool, vector, config.zo.lr, CPU)
    assert zo.weights_hash(fresh) == zo.weights_hash(protocol.global_weights)
    assert protocol.chain[-1] == m[2]["zo_history_sha256"]


def load_model_base(config):
    from flexfed.models import load_model

    return load_model(config.model.name, seed=config.seed)


def test_bytes_per_client_and_round_are_measured_from_the_messages(tmp_path):
    """K = 4096, τ = 200. Bytes do not depend on the model (K scalars down per round the client
    lacks, two numbers up per step), so the tiny model, tuning one small tensor, stands for SmolLM2."""
    config = load_config("tiny", _run_overrides(tmp_path, "bytes", "federation.sample_fraction=0.5", "federation.rounds=2",
                                                "training.local_steps=200", "training.batch_size=1", "zo.seeds=4096", "zo.modules=[model.norm.weight]",
                                                "eval.every=2", "eval.seen_examples=1", "eval.unseen_examples=1", "eval.validation_examples=1"))
    simulation.run(config, show_progress=False)
    m = _metrics(config.run_dir)
    first, second = m[1]["clients"][0], m[2]["clients"][0]
    assert first["bytes_up"] == second["bytes_up"] == 200 * (4 + 4)  # a float32 seed index and scalar per step
    assert first["bytes_down"] == 0  # no history yet
    # Round 2: the one round vector it lacks, K float32 (a client that missed rounds gets each of them).
    assert second["bytes_down"] == second["catch_up_rounds"] * 4096 * 4 and second["catch_up_rounds"] == 1
    assert second["bytes_up"] + second["bytes_down"] == 17984 < 18 * 1024


def test_resume_continues_bit_exactly(tmp_path):
    extra = ["federation.sample_fraction=1.0", "federation.rounds=3", "training.local_steps=3", "zo.seeds=16", "zo.lr=1e-3", "zo.eps=1e-3",
             "federation.method=fedkseed-pro", "eval.every=3", "eval.seen_examples=1", "eval.unseen_examples=1", "eval.validation_examples=1"]
    whole = load_config("tiny", _run_overrides(tmp_path, "whole", *extra))
    simulation.run(whole, show_progress=False)
    broken = load_config("tiny", _run_overrides(tmp_path, "broken", *extra))
    Runner(broken).run(show_progress=False, stop_after=1)
    resumed = Runner(broken)
    resumed.run(show_progress=False, resume=True)
    a, b = _metrics(whole.run_dir), _metrics(broken.run_dir)
    assert _strip(a) == _strip(b)
    for record in a[1:]:  # Pro's probabilities travel with the round vectors the client lacks
        for c in record["clients"]:
            assert c["bytes_down"] == c["catch_up_rounds"] * 16 * 4 + 16 * 4 and c["catch_up_rounds"] == 1 - (record["round"] == 1)
            assert c["bytes_up"] == 3 * 8
    for r in (1, 2, 3):
        assert (whole.run_dir / "zo" / f"round-{r:04d}.safetensors").read_bytes() == (broken.run_dir / "zo" / f"round-{r:04d}.safetensors").read_bytes()
    # A damaged round file is refused, not replayed.
    path = broken.run_dir / "zo" / "round-0002.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["scalars"][0] += 1
    save_file(tensors, str(path))
    with pytest.raises(RuntimeError, match="round-0002.*do not match the hash"):
        Runner(broken).run(show_progress=False, resume=True)


@pytest.mark.parametrize("override, field", [
    ("privacy.clip_norm=1.0", "privacy.clip_norm"),
    ("robust.aggregate=median", "robust"),
    ("attack.fraction=0.5", "attack.fraction"),
    ("federation.sparse_stage.rounds=1", "federation.sparse_stage"),
    ("resources.distribution=uniform", "resources.distribution"),
    ("zo.modules=[no.such.*]", "zo.modules"),
])
def test_settings_it_cannot_honour_are_refused(tmp_path, override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):  # by the config check or when the protocol is built
        Runner(load_config("tiny", _run_overrides(tmp_path, "refused", override)))


@pytest.fixture
def local_federation(tmp_path):
    """A LocalFederation (real SuperLink and SuperNodes on loopback); stopped at teardown."""
    from flexfed.engines.flower.deploy import LocalFederation

    started = []

    def make():
        started.append(LocalFederation(tmp_path / "fed"))
        return started[-1]

    yield make
    for fed in started:
        fed.stop()
        assert not any(p.alive() for p in fed.processes)


def test_flower_nodes_replay_the_history_to_the_servers_weights_bit_for_bit(tmp_path, local_federation):
    """Two SuperNodes, each rebuilding the global model from the base by replaying what it was sent:
    every reply carries the hash of the weights it trained from, which the server checks against
    its own (a mismatch is refused), and the run equals the in-process simulator's."""
    from flexfed.engines.flower.deploy import node_config_string
    from flexfed.engines.flower.project import write_app

    extra = ["federation.sample_fraction=1.0", "federation.rounds=2", "training.local_steps=3", "zo.seeds=16", "zo.lr=1e-3", "zo.eps=1e-3",
             "zo.chunk=100000", "eval.every=2", "eval.seen_examples=1", "eval.unseen_examples=1", "eval.validation_examples=1", "flower.min_nodes=2"]
    fed = local_federation()
    fed.start_superlink()
    for k in range(2):
        fed.start_supernode(f"node{k}", node_config_string(partition=(k, 2)))
    config = load_config("tiny", _run_overrides(tmp_path / "flower", "zo", *extra))
    run_id = fed.submit(write_app(tmp_path / "app", config))
    reference = load_config("tiny", _run_overrides(tmp_path / "inproc", "zo", *extra))
    simulation.run(reference, show_progress=False)
    status = fed.wait_for_run(run_id, timeout=240)
    assert status["status"] == "finished:completed", fed.logs(run_id)[-4000:]

    flower, inproc = _metrics(config.run_dir), _metrics(reference.run_dir)
    assert [m["clients_reported"] for m in flower[1:]] == [2, 2]  # no start was refused
    from flexfed.engines.flower.serverapp import FlowerExecutor

    node_only = FlowerExecutor.record_fields | {"replay_rounds", "replay_seeds"}
    assert _strip(flower, node_only) == _strip(inproc)  # same history hashes, losses, bytes
    for c in flower[2]["clients"]:  # each node reloaded the base and replayed round 1 (its own training had moved its weights)
        assert c["replay_rounds"] == 1 and c["replay_seeds"] == flower[1]["zo_seeds_updated"] and c["array_bytes_down"] == c["bytes_down"] == 16 * 4
    for r in (1, 2):
        assert (config.run_dir / "zo" / f"round-{r:04d}.safetensors").read_bytes() == (reference.run_dir / "zo" / f"round-{r:04d}.safetensors").read_bytes()


def test_late_joiners_and_nodes_that_lost_their_history_catch_up_by_replaying(tmp_path):
    """The server's end and two node ends (each with its own model, ``shares_base`` False) in one
    process: a client new in round 3 is sent rounds 1-2 and replays them; a node restarted empty
    says what it holds and gets the whole history in a second exchange of the same round. Every
    reply is accepted only if it trained from the server's weights, bit for bit."""
    from flexfed.build import Setup
    from flexfed.protocol import Failure, converse

    config = load_config("tiny", _run_overrides(tmp_path, "nodes", "data.num_clients=3", "training.local_steps=2", "zo.seeds=8", "zo.lr=1e-3", "zo.eps=1e-3"))
    server = zo.FedKSeedPro(Setup(config))
    node = zo.FedKSeedPro(Setup(config), serve=False)
    state = server.initial_state()

    def round_(r, clients, end):
        conversations = {c: server.conversation(state, r, c, shares_base=False) for c in clients}
        out = converse(conversations, lambda wave: dict(zip(wave, end.serve(end.setup, list(wave.values())))))
        assert not [o.error for o in out.values() if isinstance(o, Failure)]
        return server.combine(state, r, [out[c].update for c in clients], [1.0] * len(clients)), out

    state, _ = round_(1, [0], node)
    state, out = round_(2, [0], node)
    assert out[0].bytes_down == 8 * 4 + 8 * 4  # round 1's vector and the probabilities
    assert out[0].update.catch_up["catch_up_rounds"] == 1 and out[0].update.catch_up["replay_rounds"] == 1
    state, out = round_(3, [0, 2], node)  # client 2 joins late: rounds 1 and 2, and the node replays both from the base
    assert out[2].update.catch_up["catch_up_rounds"] == 2 and out[2].bytes_down == 2 * 8 * 4 + 8 * 4
    restarted = zo.FedKSeedPro(Setup(config), serve=False)
    state, out = round_(4, [0], restarted)  # sent round 3 only; holds nothing; gets rounds 1-3
    assert out[0].update.catch_up["catch_up_rounds"] == 3 and out[0].update.catch_up["replay_rounds"] == 3
    assert out[0].bytes_down == (1 * 8 * 4 + 8 * 4) + (3 * 8 * 4 + 8 * 4)  # both exchanges are counted
    assert len(server.history) == 4 and restarted.store_chain[-1] == server.chain[3]
