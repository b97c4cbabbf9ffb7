"""Secure aggregation on Flower (SecAgg+): the server learns only the weighted mean of the round's
updates. Unit checks of the math and the refusals, then a real SuperLink with three SuperNodes on
loopback: FedIT and FlexLoRA (dense ΔW) under SecAgg+ against the plain in-process run."""

import json
import time

import numpy as np
import pytest
import torch

from flexfed.aggregation import get_aggregator
from flexfed.aggregation.secure import SecureMean, dense_arrays, tolerance
from flexfed.config import ConfigError, load_config
from flexfed.engines import simulation
from flexfed.engines.flower.deploy import node_config_string
from flexfed.engines.flower.project import write_app
from flexfed.lora import Factors, load_adapter
from flexfed.server import Link, Server, load_checkpoint

from test_flower import RUN_TIMEOUT, _metrics, _wait_for_run_dir, federations  # noqa: F401  (the harness and its fixture)
from test_flower_units import task_identity  # noqa: F401  (a fixture)

SECURE = ["flower.secure_aggregation=secaggplus"]


# ----------------------------------------------------------------------------- config and refusals


@pytest.mark.parametrize("sets,message", [
    (["federation.method=flexlora"], "flower.secaggplus.dense: true"),
    (["federation.method=flora"], "FLoRA stacks"),
    (["federation.method=lora-fair"], "LoRA-FAIR refits B"),
    (["federation.method=hetlora"], "HetLoRA's sparsity weights"),
    (["federation.method=hetlora", "federation.method_options={sparsity_weighted: false}"], "rank self-pruning \\(prune\\)"),
    (["federation.method=kd"], "'kd' exchanges distributions"),
    (["federation.method=split"], "'split' exchanges activations"),
    (["federation.method=fedkseed"], "'fedkseed' exchanges seeds"),
    (["federation.method=fedit", "flower.secaggplus.dense=true"], "dense is FlexLoRA's option"),
    (["federation.method=fedit", "privacy.clip_norm=0.1"], "privacy.clip_norm"),
    (["federation.method=fedit", "robust.norm_bound=2"], "robust"),
    (["flower.secaggplus.num_shares=2"], "at least 3"),
    (["flower.secaggplus.num_shares=5", "flower.secaggplus.reconstruction_threshold=5"], "below num_shares"),
    (["flower.secaggplus.reconstruction_threshold=1.5"], "in \\(0, 1\\]"),
])
def test_what_cannot_run_under_secaggplus_is_refused_with_what_to_change(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*SECURE, *sets])


def test_secaggplus_settings_need_secaggplus_and_off_reads_as_off():
    with pytest.raises(ConfigError, match="flower.secaggplus applies with flower.secure_aggregation: secaggplus"):
        load_config("tiny", ["flower.secaggplus.dense=true"])
    assert load_config("tiny", ["flower.secure_aggregation=off"]).flower.secure_aggregation == "off"  # YAML's bare off is false
    assert load_config("tiny", [*SECURE, "federation.method=flexlora", "flower.secaggplus.dense=true"]).flower.secaggplus.dense
    assert load_config("tiny", [*SECURE, "federation.method=hetlora", "federation.method_options={sparsity_weighted: false, prune: false}"])


def test_the_in_process_engine_refuses_secure_aggregation(tmp_path):
    config = load_config("tiny", [*SECURE, "federation.method=fedit", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="runs on Flower"):
        simulation.run(config, show_progress=False)


# ----------------------------------------------------------------------------- the math of the mean


SHAPES = {"l0.q_proj": (12, 10), "l0.v_proj": (6, 10)}


def _server(method: str, ranks: dict, *more: dict, options: str = "{}") -> Server:
    """A server of three clients: client i has ``(ranks, *more)[i]`` (all ``ranks`` without ``more``)."""
    from flexfed.resources import RankProfile

    config = load_config("tiny", [f"federation.method={method}", f"federation.method_options={options}"])
    profiles = [RankProfile(f"R{i}", r) for i, r in enumerate((ranks, *more))]
    return Server(config, SHAPES, profiles, [0, 1, 2] if more else [0, 0, 0], ["c0", "c1", "c2"])


def _updates(server: Server, seed: int = 1):
    """Three clients' trained adapters of the method (what they would send, decoded)."""
    g = torch.Generator().manual_seed(seed)
    state = server.initial_state()
    out = []
    for c in range(3):
        start = server.start_adapter(state, c)
        trained = {n: Factors(b=f.b + 0.01 * torch.randn(f.b.shape, generator=g), a=f.a + 0.01 * torch.randn(f.a.shape, generator=g), scale=f.scale)
                   for n, f in start.items()}
        out.append(server.link.receive(server.link.send(trained, server.ranks_of(c)), server.ranks_of(c)))  # the method's payload, decoded
    return state, out


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fed-sb"])
def test_the_method_aggregate_of_the_payloads_weighted_mean_is_the_plain_aggregate(method):
    server = _server(method, {n: 3 for n in SHAPES})
    state, updates = _updates(server)
    weights = [5, 2, 9]
    plain = server.aggregate(state, updates, weights)
    payloads = [server.link.send(u, server.ranks_of(0)) for u in updates]
    mean = {k: sum(w * p[k].double() for w, p in zip(weights, payloads)) / sum(weights) for k in payloads[0]}
    secure = server.aggregate_mean(state, SecureMean({k: v.float() for k, v in mean.items()}, ("c0", "c1", "c2")))
    for n in SHAPES:
        torch.testing.assert_close(secure[n].delta(), plain[n].delta(), rtol=1e-5, atol=1e-7)


def test_flexlora_from_the_mean_of_dense_updates_is_its_plain_aggregate():
    server = _server("flexlora", {n: 3 for n in SHAPES})
    state, updates = _updates(server)
    weights = [5, 2, 9]
    plain = server.aggregate(state, updates, weights)
    dense = [dense_arrays({k: v.numpy() for k, v in server.link.send(u, server.ranks_of(0)).items()}, sorted(SHAPES), [u[n].scale for n in sorted(SHAPES)])
             for u in updates]
    for d, u in zip(dense, updates):  # what a client sends: s B A per module
        for n in SHAPES:
            np.testing.assert_allclose(d[f"{n}.dw"], u[n].delta().numpy(), rtol=1e-5, atol=1e-7)
    mean = {k: torch.from_numpy(sum(w * d[k].astype(np.float64) for w, d in zip(weights, dense)) / sum(weights)).float() for k in dense[0]}
    secure = server.aggregate_mean(state, SecureMean(mean, ("c0", "c1", "c2"), dense=True))
    for n in SHAPES:
        torch.testing.assert_close(secure[n].delta(), plain[n].delta(), rtol=1e-4, atol=1e-6)
        assert secure[n].rank == plain[n].rank


def test_hetlora_from_the_mean_of_padded_factors_is_its_plain_aggregate():
    from flexfed.aggregation.secure import padded_arrays

    options = "{sparsity_weighted: false, prune: false}"
    server = _server("hetlora", {n: 2 for n in SHAPES}, {n: 5 for n in SHAPES}, {n: 3 for n in SHAPES}, options=options)
    state, updates = _updates(server)
    weights = [5, 2, 9]
    for reporting in ([0, 1, 2], [0, 2]):  # with the rank-5 client, and without it: components 3, 4 keep the previous global
        ups, ws = [updates[i] for i in reporting], [weights[i] for i in reporting]
        plain = server.aggregate(state, ups, ws)
        modules = sorted(SHAPES)
        padded = []
        for u in ups:
            arrays = {k: v.numpy() for k, v in server.link.send(u, {n: f.rank for n, f in u.items()}).items()}
            padded.append(padded_arrays(arrays, modules, [server.max_ranks[n] for n in modules],
                                        [u[n].scale / server.scale(server.max_ranks[n]) for n in modules]))
        mean = {k: torch.from_numpy(sum(w * p[k].astype(np.float64) for w, p in zip(ws, padded)) / sum(ws)).float() for k in padded[0]}
        secure = server.aggregate_mean(state, SecureMean(mean, tuple(f"c{i}" for i in reporting), padded=True))
        for n in SHAPES:
            assert secure[n].rank == plain[n].rank == 5
            torch.testing.assert_close(secure[n].delta(), plain[n].delta(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(secure[n].a, plain[n].a, rtol=1e-5, atol=1e-7)


def test_the_clientapp_hands_only_secaggplus_messages_to_its_mod(task_identity):  # noqa: F811
    from flwr.app import ConfigRecord, Message, RecordDict

    from flexfed.engines.flower.clientapp import secure_mod

    calls = []
    plain = Message(RecordDict({"flexfed": ConfigRecord({"x": 1})}), dst_node_id=1, message_type="train")
    assert secure_mod(plain, None, lambda m, c: calls.append(m) or "inner") == "inner" and calls == [plain]


def test_a_round_with_two_clients_on_one_node_fails_them_with_why_before_any_message(tmp_path):
    from types import SimpleNamespace

    from flexfed.engines.flower.secagg import secure_round
    from flexfed.protocol import Failure, Message

    config = load_config("tiny", [*SECURE, "federation.method=fedit", f"output_dir={tmp_path}"])
    server = _server("fedit", {n: 3 for n in SHAPES})
    state = server.initial_state()

    def conversation(c):
        yield Message(server.downlink(state, c, False), {"client": f"c{c}", "modules": sorted(SHAPES), "ranks": [3, 3]})
        raise AssertionError("a secure round never sends a conversation a reply")

    clients = [SimpleNamespace(client_id=f"c{c}", num_examples=4) for c in range(3)]
    grid = SimpleNamespace(push_messages=lambda m: pytest.fail("nothing may be sent"))
    executor = SimpleNamespace(config=config, federation=SimpleNamespace(clients=clients), runner=SimpleNamespace(protocol=SimpleNamespace(server=server)),
                               host={0: 11, 1: 11}, _wire={}, grid=grid, config_yaml="", poll_s=0.01)
    out = secure_round(executor, 1, {c: conversation(c) for c in range(3)})
    assert all(isinstance(o, Failure) for o in out.values())
    assert "SuperNode 11 carries client c0 this round" in str(out[1].error)
    assert "no connected SuperNode hosts it" in str(out[2].error)
    assert "needs at least 2 SuperNodes" in str(out[0].error)
    assert executor._secure["nodes"] == 0


# ----------------------------------------------------------------------------- SecAgg+ on a real SuperLink

# Three clients, one per SuperNode, one round.
BASE = [
    "seed=7",
    "federation.rounds=1",
    "federation.sample_fraction=1.0",
    "data.partition=iid",
    "data.num_clients=3",
    "eval.every=1",
    "eval.seen_examples=2",
    "eval.unseen_examples=2",
    "eval.validation_examples=0",
    "flower.min_nodes=3",
]
FLEX = ["federation.method=flexlora", "resources.distribution=custom",  # three ranks: 2, 4 and 8
        "resources.types={R2: {attention: 2, mlp: 2}, R4: {attention: 4, mlp: 4}, R8: {attention: 8, mlp: 8}}", "resources.mix={R2: 1, R4: 1, R8: 1}"]
CASES = {"fedit": ["federation.method=fedit"], "flexlora-dense": [*FLEX, "flower.secaggplus.dense=true"]}


def _plain_run(tmp_path, name, sets, monkeypatch):
    """The in-process run of the same config without secure aggregation, and every client's update of its round 1."""
    updates = {}
    original = Server.aggregate

    def spy(self, state, ups, weights, round_=None):
        updates[round_] = (list(ups), list(weights))
        return original(self, state, ups, weights, round_)

    sets = [s for s in sets if not s.startswith("flower.secaggplus.dense")]
    config = load_config("tiny", [*BASE, *sets, f"output_dir={tmp_path / ('plain-' + name)}"])
    with monkeypatch.context() as m:
        m.setattr(Server, "aggregate", spy)
        simulation.run(config, show_progress=False)
    return config, updates[1]


def _global_deltas(run_dir, round_=1):
    adapter = load_adapter(run_dir / "adapters" / f"round-{round_:04d}").adapter
    return {n: f.delta() for n, f in adapter.items()}


def _vector(update, dense: bool, link: Link, ranks) -> dict[str, np.ndarray]:
    """What the client sends under SecAgg+ (before quantising and masking)."""
    if dense:
        return {f"{n}.dw": f.delta().numpy() for n, f in update.items()}
    return {k: v.numpy() for k, v in link.send(update, ranks).items()}


def test_secaggplus_on_a_real_superlink_gives_the_plain_global_and_the_server_never_sees_an_update(tmp_path, federations, monkeypatch):  # noqa: F811
    began = time.monotonic()
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3))) for k in range(3)]
    report = {}
    for name, sets in CASES.items():
        config = load_config("tiny", [*BASE, *sets, *SECURE, "flower.secaggplus.audit=true", f"output_dir={tmp_path / name}"])
        run_id = fed.submit(write_app(tmp_path / f"app-{name}", config))
        plain, (updates, weights) = _plain_run(tmp_path, name, sets, monkeypatch)  # meanwhile, the plain run in this process
        _wait_for_run_dir(config.run_dir, 1, fed, run_id)
        dense = config.flower.secaggplus.dense
        sa = config.flower.secaggplus

        # The round went through SecAgg+ with the three nodes, and every client's record says what it sent.
        (round1,) = _metrics(config.run_dir)[1:]
        secure = round1["secure_aggregation"]
        assert secure["protocol"] == "secaggplus" and secure["nodes"] == 3 and round1["clients_reported"] == 3, round1
        tol = tolerance(3, sa.clipping_range, sa.quantization_range)
        assert secure["tolerance"] == pytest.approx(tol)

        # What the ServerApp received: only integers (the masked vectors) and no array record with anything in it.
        audit = config.run_dir / "secagg-audit" / "round-0001"
        received = {p.name: np.load(p, allow_pickle=False) for p in sorted(audit.glob("received-*.npy"))}
        assert received and all(np.issubdtype(a.dtype, np.integer) for a in received.values()), {k: a.dtype for k, a in received.items()}
        masked = [a for a in received.values() if a.size > 1]
        assert len(masked) >= 3  # every node's vector, one array per part
        # None of them is (or, dequantised, is near) any client's true vector: each is uniform noise mod 2^32.
        ranks_of = [{n: f.rank for n, f in u.items()} for u in updates]
        truths = []
        for u, ranks in zip(updates, ranks_of):
            link = Link.from_config(plain, {n: f.shape for n, f in u.items()})
            truths.append(_vector(u, dense, link, ranks))
        q = sa.quantization_range
        for truth, weight in zip(truths, weights):
            for value in truth.values():
                quantised = np.round((value.ravel() * (weight / max(weights)) + sa.clipping_range) * q / (2 * sa.clipping_range))
                for a in masked:
                    if a.size == quantised.size:
                        close = np.abs(a.ravel().astype(np.int64) - quantised.astype(np.int64)) <= q // 1000
                        assert close.mean() < 0.05, "a received vector is close to a client's quantised update"

        # The mean the server recovered equals the plain weighted mean of the vectors within SecAgg+'s tolerance.
        p = np.array(weights, dtype=np.float64) / sum(weights)
        exact = {k: sum(pi * t[k].astype(np.float64) for pi, t in zip(p, truths)) for k in truths[0]}
        recovered = {p_.name.removeprefix("mean-").removesuffix(".npy"): np.load(p_, allow_pickle=False) for p_ in audit.glob("mean-*.npy")}
        assert set(recovered) == set(exact)
        error = max(float(np.abs(recovered[k] - exact[k]).max()) for k in exact)
        assert error <= tol, (error, tol)

        # The global adapter is the method's aggregate of that mean and of nothing else ...
        state = load_checkpoint(config.run_dir)
        if dense:
            from flexfed.lora import lora_scale

            scale = lambda r: lora_scale(r, config.lora.alpha, config.lora.rslora)  # noqa: E731
            shapes = {k.removesuffix(".dw"): v.shape for k, v in recovered.items()}
            expected = get_aggregator("flexlora").aggregate_dense({n: torch.from_numpy(recovered[f"{n}.dw"]) for n in shapes},
                                                                 {n: f.rank for n, f in state.global_adapter.items()}, scale)
            for n, f in state.global_adapter.items():  # (another process's LAPACK threads: equal up to rounding)
                torch.testing.assert_close(f.delta(), expected[n].delta(), rtol=1e-5, atol=1e-8)
        else:  # FedIT's aggregate of one update of weight 1 is that update
            for n, f in state.global_adapter.items():
                assert torch.equal(f.a, torch.from_numpy(recovered[f"{n}.a"])) and torch.equal(f.b, torch.from_numpy(recovered[f"{n}.b"])), n
        # ... so the plain global, within what the tolerance turns into.
        flower_global, plain_global = _global_deltas(config.run_dir), _global_deltas(plain.run_dir)
        assert set(flower_global) == set(plain_global)
        gap = max(float((flower_global[n] - plain_global[n]).abs().max()) for n in plain_global)
        size = max(float(plain_global[n].abs().max()) for n in plain_global)
        if dense:  # the SVD of a mean perturbed by <= tol per value: the rank-r truncation moves by a few tol (||E||_2 <= sqrt(dk) tol)
            assert gap <= 1e-3 * size + 50 * tol, (gap, size, tol)
        else:  # FedIT's global is the mean itself: s B A moves by products of the factors' errors
            assert gap <= 1e-3 * size + 10 * tol, (gap, size, tol)

        # Bytes: the masked vector, and the factored payload beside it.
        for c in round1["clients"]:
            assert c["bytes_up"] == c["array_bytes_up"] > 0 and c["bytes_up_factored"] > 0, c
        report[name] = {"error": error, "tolerance": tol, "global_gap": gap, "bytes_up": [c["bytes_up"] for c in round1["clients"]],
                        "bytes_up_factored": [c["bytes_up_factored"] for c in round1["clients"]],
                        "wire_bytes_up": [c["wire_bytes_up"] for c in round1["clients"]]}
    dense_up, factored_up = sum(report["flexlora-dense"]["bytes_up"]), sum(report["flexlora-dense"]["bytes_up_factored"])
    assert dense_up > factored_up  # d·k values per matrix cost more than r·(d + k)
    assert all(n.alive() for n in nodes)
    print(json.dumps({**report, "seconds": time.monotonic() - began}, indent=1))
