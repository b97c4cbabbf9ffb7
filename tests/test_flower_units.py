"""Flower engine pieces without Flower processes: wire format, node config, app, certificates, faults."""

import io
import json
import math
import threading

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from flexfed.config import ConfigError, dump, load_config
from flexfed.engines.flower import clientapp, wire
from flexfed.engines.flower.clientapp import NodeConfigError, hosted_clients
from flexfed.engines.flower.project import app_pyproject
from flexfed.engines.flower.serverapp import FlowerEngine, config_from_run_config
from flexfed.engines.simulation import Simulation
from flexfed.aggregation import get_aggregator
from flexfed.aggregation.base import payload_bytes
from flexfed.lora import Factors
from flexfed.server import load_checkpoint


def _adapter(dtype=torch.float32, ranks=(2, 4)):
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn.q_proj": Factors(torch.randn(16, r, generator=g).to(dtype), torch.randn(r, 8, generator=g).to(dtype), 8.0 / r)
        for i, r in enumerate(ranks)
    }


# ----------------------------------------------------------------------------- wire format


def _payload(adapter):
    return get_aggregator("flexlora").encode(adapter, {})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_payloads_survive_the_wire_bit_for_bit(dtype):
    payload = _payload(_adapter(dtype))
    arrays, meta = wire.encode_payload(payload)
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    back = wire.decode_payload(wire.from_record(wire.to_record(arrays)), meta["dtype"])
    assert back.keys() == payload.keys()
    assert all(back[k].dtype == dtype and torch.equal(back[k], t) for k, t in payload.items())
    # Arrays travel as float32 for bfloat16 (NumPy has none); otherwise exactly the payload's bytes.
    assert wire.array_bytes(payload) == payload_bytes(payload) * (2 if dtype == torch.bfloat16 else 1)


def test_serialised_size_is_the_arrays_plus_a_bounded_overhead():
    payload = _payload(_adapter(ranks=(8, 8, 8, 8)))
    arrays, meta = wire.encode_payload(payload)
    size = wire.object_bytes(RecordDict({"adapter": wire.to_record(arrays), "meta": ConfigRecord(meta)}))
    overhead = size - wire.array_bytes(payload)
    assert 0 < overhead <= 512 * len(payload) + 1024


def test_malformed_arrays_are_refused():
    adapter = _adapter()
    arrays, meta = wire.encode_payload(_payload(adapter))
    first = sorted(adapter)[0]
    for reason, bad in {
        "expected a 2-D float32": {**arrays, f"{first}.a": arrays[f"{first}.a"].astype(np.int32)},
        "2-D": {**arrays, f"{first}.b": arrays[f"{first}.b"][None]},
    }.items():
        with pytest.raises(wire.WireError, match=reason):
            wire.decode_payload(bad, meta["dtype"])
    with pytest.raises(wire.WireError, match="not accepted"):
        wire.decode_payload(arrays, "int8")
    # Names and shapes are the method's to check.
    agg, scale = get_aggregator("flexlora"), lambda r: 8.0 / r
    payload = wire.decode_payload(arrays, meta["dtype"])
    for reason, bad in {
        "unexpected or missing": {**payload, "extra.a": payload[f"{first}.a"]},
        "do not chain": {**payload, f"{first}.b": payload[f"{first}.b"][:, :1]},
    }.items():
        with pytest.raises(ValueError, match=reason):
            agg.decode(bad, sorted(adapter), {}, scale)


def test_pickled_arrays_are_never_loaded():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(wire.WireError, match="not a NumPy array"):
        wire.npy_load(buffer.getvalue())


# ----------------------------------------------------------------------------- node config, run config, app


def test_a_node_hosts_what_its_node_config_says():
    ids = [f"c{i}" for i in range(7)]
    assert hosted_clients(ids, {"partition-id": 1, "num-partitions": 3}) == ["c1", "c4"]
    assert hosted_clients(ids, {"clients": "c6, c2"}) == ["c6", "c2"]
    with pytest.raises(NodeConfigError, match="not in this federation"):
        hosted_clients(ids, {"clients": "c9"})
    with pytest.raises(NodeConfigError, match="must set"):
        hosted_clients(ids, {})
    with pytest.raises(NodeConfigError, match="partition-id"):
        hosted_clients(ids, {"partition-id": 3, "num-partitions": 3})


def test_the_flower_app_carries_the_resolved_config(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    config = load_config("tiny", ["federation.method=flexlora", f"output_dir={tmp_path}"])
    text = app_pyproject(config, overwrite=True)
    parsed = tomli.loads(text)
    ok, errors, _ = validate_config(parsed, check_module=True, project_dir=tmp_path)
    assert ok, errors
    run_config = parsed["tool"]["flwr"]["app"]["config"]
    assert run_config["flexfed-config"] == dump(config) and run_config["overwrite"] is True
    again = config_from_run_config({**run_config, "flexfed-set": "federation.rounds=7; training.lr=0.01"})
    assert again.federation.method == "flexlora" and again.federation.rounds == 7 and again.training.lr == 0.01
    assert config_from_run_config({"flexfed-config-file": "tiny"}).name == "tiny"
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_run_config({"flexfed-config": "nonsense: 1\n"})
    with pytest.raises(ConfigError, match="neither"):
        config_from_run_config({})


def test_the_resident_clientapp_recognises_flexfeds_app_in_a_fab(tmp_path):
    """The resident serves a task only if the run's FAB names flexfed's ClientApp (read from the FAB
    Flower builds from the app ``flexfed flower app`` writes); any other app is refused."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.supercore.fab import Fab

    from flexfed.engines.flower import deploy, resident
    from flexfed.engines.flower.project import CLIENTAPP, write_app

    config = load_config("tiny", [f"output_dir={tmp_path}"])
    app_dir = write_app(tmp_path / "app", config)
    assert resident.clientapp_of(Fab("", build_fab_from_disk(app_dir), {})) == CLIENTAPP
    other = app_dir / "pyproject.toml"
    other.write_text(other.read_text().replace(f'clientapp = "{CLIENTAPP}"', 'clientapp = "someone.else:app"'))
    assert resident.clientapp_of(Fab("", build_fab_from_disk(app_dir), {})) == "someone.else:app"
    with pytest.raises(ValueError, match="isolation"):
        deploy.run_supernode("127.0.0.1:1", 'clients="a"', isolation="thread")
    cmd = deploy.resident_command(9094, tmp_path / "s", 1234)
    assert cmd[1:3] == ["-m", "flexfed.engines.flower.resident"] and "127.0.0.1:9094" in cmd


def test_development_certificates_chain_and_keys_load(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from flexfed.engines.flower.deploy import make_certs

    paths = make_certs(tmp_path, hosts=["link.example.org", "10.0.0.5"], nodes=2)
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["superlink.crt"].read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {"10.0.0.5", "127.0.0.1"}
    for k in (1, 2):
        private = load_ssh_private_key(paths[f"supernode-{k}.key"].read_bytes(), password=None)
        public = load_ssh_public_key(paths[f"supernode-{k}.pub"].read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
    assert paths["supernode-1.key"].stat().st_mode & 0o077 == 0


# ----------------------------------------------------------------------------- the ServerApp's round, on a scripted grid


@pytest.fixture
def task_identity():
    """Flower builds messages only inside a task; give this process one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class ScriptedGrid:
    """Two nodes (even / odd client indices) answering through the real ClientApp functions, at
    pull time; ``sabotage[client]`` alters a reply, replaces it by an error, or withholds it."""

    def __init__(self, sabotage):
        self.sabotage = sabotage
        self.pending = {}

    def get_node_ids(self):
        return [101, 102]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pending[m.object_id] = m
            ids.append(m.object_id)
        return ids

    def _answer(self, m):
        node = m.metadata.dst_node_id
        context = Context(run_id=7, node_id=node, node_config={"partition-id": node - 101, "num-partitions": 2}, state=RecordDict(), run_config={})
        if m.metadata.message_type == "query":
            return clientapp.query(m, context)
        how = self.sabotage.get(str(m.content.config_records[clientapp.CONFIG]["client"]))
        if how == "silent":
            return None
        if how == "error":
            return Message(Error(code=0, reason="ClientApp raised: out of memory"), reply_to=m)
        reply = clientapp.train(m, context)
        if how is not None:
            how(reply.content)
        return reply

    def pull_messages(self, ids):
        replies = [self._answer(self.pending.pop(i)) for i in list(ids) if i in self.pending]
        return [r for r in replies if r is not None]


def _set_array(content, name, value):
    content.array_records[clientapp.ADAPTER][name] = wire.to_record({name: value})[name]


def test_bad_or_missing_updates_are_left_out_with_a_reason(tiny_config, task_identity):
    config = tiny_config("federation.rounds=1", "federation.sample_fraction=0.14", "flower.round_timeout=3", "flower.node_concurrency=8", "eval.seen_examples=2", "eval.unseen_examples=2")
    engine = FlowerEngine(config, grid=None)
    sampled = engine.server.sample(1)
    ids = [engine.federation.clients[c].client_id for c in sampled]
    module = sorted(engine.server.shapes)[0]

    def nan(content):
        b = wire.npy_load(bytes(content.array_records[clientapp.ADAPTER][f"{module}.b"].data))
        b[0, 0] = np.nan
        _set_array(content, f"{module}.b", b)

    def extra(content):
        _set_array(content, "model.embed_tokens.a", np.zeros((4, 4), np.float32))

    def rank(content):
        for f in ("a", "b"):
            value = wire.npy_load(bytes(content.array_records[clientapp.ADAPTER][f"{module}.{f}"].data))
            _set_array(content, f"{module}.{f}", value[:2] if f == "a" else value[:, :2])

    def ints(content):
        value = wire.npy_load(bytes(content.array_records[clientapp.ADAPTER][f"{module}.a"].data))
        _set_array(content, f"{module}.a", value.astype(np.int32))

    plan = dict(zip(ids[1:], [nan, extra, rank, ints, "error", "silent"]))
    engine.grid = ScriptedGrid(plan)
    engine.run(show_progress=False)

    record = json.loads((config.run_dir / "metrics.jsonl").read_text().splitlines()[1])
    reasons = {f["id"]: f["reason"] for f in record["clients_failed"]}
    assert [c["id"] for c in record["clients"]] == [ids[0]] and record["clients_reported"] == 1
    assert "non-finite" in reasons[ids[1]]
    assert "unexpected or missing" in reasons[ids[2]]
    assert "expected rank" in reasons[ids[3]]
    assert "float32" in reasons[ids[4]]
    assert "out of memory" in reasons[ids[5]] and "node" in reasons[ids[5]]
    assert "deadline" in reasons[ids[6]]
    assert {f["node"] for f in record["clients_failed"]} <= {"101", "102"}
    state = load_checkpoint(config.run_dir)
    assert all(torch.isfinite(f.a).all() and torch.isfinite(f.b).all() for f in state.global_adapter.values())
    client = record["clients"][0]
    assert client["array_bytes_up"] == client["bytes_up"] < client["wire_bytes_up"]
    assert record["wire_bytes_up"] == client["wire_bytes_up"]


class FlakyGrid(ScriptedGrid):
    """``ScriptedGrid`` whose node 102 disconnects once it has answered in round 1."""

    def __init__(self, sabotage):
        super().__init__(sabotage)
        self.nodes = [101, 102]

    def get_node_ids(self):
        return list(self.nodes)

    def _answer(self, m):
        reply = super()._answer(m)
        if m.metadata.dst_node_id == 102 and m.metadata.group_id == "1":
            self.nodes = [101]
        return reply


def test_a_deployment_counts_only_bytes_a_reply_confirms_names_dead_nodes_and_writes_its_report(tiny_config, task_identity):
    from flexfed.engines.flower.serverapp import serve_run

    config = tiny_config("federation.rounds=2", "federation.sample_fraction=0.14", "flower.round_timeout=3", "flower.node_concurrency=8", "eval.every=2", "eval.seen_examples=2", "eval.unseen_examples=2")
    engine = FlowerEngine(config, grid=None)
    ids = [c.client_id for c in engine.federation.clients]
    first, second = engine.server.sample(1), engine.server.sample(2)
    silent, failing = ids[first[0]], ids[first[1]]
    grid = FlakyGrid({silent: "silent", failing: "error"})
    serve_run(grid, {"flexfed-config": dump(config)})

    rounds = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    for record in rounds:  # the round's totals are the bytes confirmed sent, failed clients' included
        assert record["bytes_down"] == sum(c["bytes_down"] for c in record["clients"] + record["clients_failed"])
        assert record["wire_bytes_down"] == sum(c.get("wire_bytes_down", 0) for c in record["clients"] + record["clients_failed"])
    failed = {f["id"]: f for f in rounds[0]["clients_failed"]}
    assert "deadline" in failed[silent]["reason"]
    assert failed[silent]["bytes_down"] == failed[silent]["wire_bytes_down"] == 0
    assert failed[silent]["bytes_down_unconfirmed"] > 0 and failed[silent]["wire_bytes_down_unconfirmed"] > failed[silent]["bytes_down_unconfirmed"]
    assert failed[failing]["bytes_down"] > 0 and "bytes_down_unconfirmed" not in failed[failing]  # its node answered: it arrived

    # Round 2: node 102 (odd client indices) is gone; its clients are still sampled and fail naming it.
    gone = [ids[c] for c in second if c % 2 == 1]
    assert gone, "the seed must sample a client of node 102 in round 2"
    failed = {f["id"]: f for f in rounds[1]["clients_failed"]}
    for client in gone:
        assert f"client {client}: its SuperNode 102 is not connected" in failed[client]["reason"]
        assert failed[client]["node"] == "102" and failed[client]["bytes_down"] == 0
    assert {c["id"] for c in rounds[1]["clients"]} == {ids[c] for c in second if c % 2 == 0}
    assert (config.run_dir / "report" / "summary.md").exists()
    for c in rounds[0]["clients"] + rounds[1]["clients"]:  # the scripted nodes train when pulled: inside the round trip
        assert c["time_roundtrip_s"] >= c["seconds"] and c["time_outside_client_s"] == pytest.approx(c["time_roundtrip_s"] - c["seconds"])
        # the ClientApp's handler (its training inside) and the rest, Flower's part
        assert c["seconds"] <= c["time_clientapp_s"] <= c["time_roundtrip_s"] and c["time_flower_s"] == pytest.approx(c["time_roundtrip_s"] - c["time_clientapp_s"])
    summary = (config.run_dir / "report" / "summary.md").read_text()
    assert "outside compute" in summary and "ClientApp handler" in summary


class Absent:
    """A grid where no SuperNode ever connects."""

    def get_node_ids(self):
        return []


def test_a_bad_submission_is_refused_in_one_log_line_before_any_wait(tiny_config, caplog):
    import time

    from flexfed.engines.flower.serverapp import serve_run

    config = tiny_config("flower.node_wait_timeout=600", "eval.seen_examples=2", "eval.unseen_examples=2")
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "metrics.jsonl").write_text("{}\n")
    cases = [
        ({"flexfed-config": dump(config)}, ["already holds a run", "'resume=true'", "'overwrite=true'"]),
        ({"flexfed-config-file": "tiny", "flexfed-set": "training.lr=-1"}, ["training.lr", "greater than 0"]),
        ({"flexfed-config-file": "tiny", "flexfed-set": "federation.method=nope"}, ["federation.method", "'nope'"]),
    ]
    for run_config, words in cases:
        caplog.clear()
        began = time.monotonic()
        with pytest.raises(SystemExit):
            serve_run(Absent(), run_config)
        assert time.monotonic() - began < 30  # not the 600 s wait for SuperNodes
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "\n" not in errors[0].getMessage(), errors
        assert all(w in errors[0].getMessage() for w in words), errors[0].getMessage()


def test_the_wait_for_supernodes_says_who_is_there_and_how_long_is_left(tiny_config, caplog):
    from flexfed.engines.flower.serverapp import NodeFailure

    config = tiny_config("flower.min_nodes=2", "flower.node_wait_timeout=1")
    engine = FlowerEngine(config, grid=Absent())
    with caplog.at_level("INFO"), pytest.raises(NodeFailure, match="0 SuperNodes connected within flower.node_wait_timeout=1 s"):
        engine.executor.wait_for_nodes()
    (line,) = [r.getMessage() for r in caplog.records if "waiting for SuperNodes" in r.getMessage()]
    assert "0 of flower.min_nodes=2 connected [], 2 missing" in line and "s left" in line


# ----------------------------------------------------------------------------- the node's trainer worker


def test_the_trainer_worker_trains_like_the_in_process_trainer(tiny_config, tmp_path):
    from flexfed.engines.flower import worker
    from flexfed.engines.simulation import Simulation

    config = tiny_config("federation.method=ffa-lora")  # B alone travels
    sim = Simulation(config)
    c = sim.server.sample(1)[0]
    shard = sim.federation.clients[c]
    down = sim.server.downlink(sim.server.initial_state(), c)
    seed = sim.server.client_seed(1, c)
    ranks = sim.server.ranks_of(c)
    start = sim.server.link.start(down, ranks, seed)
    expected = sim.trainer.train(shard.client_id, start, sim_examples(sim, shard), seed, ("b",))

    w = worker.Worker(tmp_path / "w" / "trainer.sock")
    thread = threading.Thread(target=w.serve_forever, daemon=True)
    thread.start()
    try:
        arrays, meta = wire.encode_payload(down)
        meta = {**meta, "modules": sorted(ranks), "ranks": [ranks[m] for m in sorted(ranks)]}
        header = {"op": "train", "config": dump(config), "client": shard.client_id, "seed": seed, "meta": meta, "node_config": {"partition-id": 0, "num-partitions": 1}}
        answer, blobs = worker.request(w.path, header, {k: wire.npy_bytes(v) for k, v in arrays.items()})
        stats = answer["stats"]
        assert {k.rsplit(".", 1)[1] for k in blobs} == {"b"}
        got = sim.server.receive(c, wire.decode_payload({k: wire.npy_load(v) for k, v in blobs.items()}, stats["dtype"]))
        for name, f in expected.adapter.items():
            assert torch.equal(got[name].a, f.a) and torch.equal(got[name].b, f.b)
        assert math.isclose(stats["loss"], expected.loss) and stats["tokens"] == expected.tokens
        with pytest.raises(worker.WorkerError, match="not hosted"):
            worker.request(w.path, {**header, "node_config": {"clients": sim.federation.clients[(c + 1) % 50].client_id}}, {})
    finally:
        w.close()
    with pytest.raises(worker.WorkerError, match="trainer worker at"):
        worker.request(w.path, {"op": "train"}, {})


def sim_examples(sim, shard):
    from flexfed.federation import client_examples

    return client_examples(sim.config, sim.tokenizer, sim.federation, shard)


# ----------------------------------------------------------------------------- every method, both engines


def _methods():
    from flexfed.aggregation import Aggregator

    return sorted(Aggregator.registry)


def _on_both_engines(tiny_config, settings: list[str]) -> tuple[dict, dict]:
    """The same run in the simulator and through the ServerApp (a scripted grid, ClientApp
    functions answering): engine -> final checkpoint, engine -> metrics lines after round 0."""
    states, metrics = {}, {}
    for engine in ("simulator", "flower"):
        config = tiny_config(f"name={engine}", *settings)
        sim = Simulation(config) if engine == "simulator" else FlowerEngine(config, grid=ScriptedGrid({}))
        sim.run(show_progress=False)
        states[engine] = load_checkpoint(config.run_dir)
        metrics[engine] = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return states, metrics


@pytest.mark.parametrize("method", _methods())
def test_every_method_gives_the_same_result_through_flower_messages(method, tiny_config, task_identity, monkeypatch):
    """The ServerApp (on a scripted grid, ClientApp functions answering) against the in-process
    simulator: the same global model bit for bit, from the same payloads."""
    from flexfed.aggregation import Aggregator

    monkeypatch.setattr(Simulation, "evaluate", lambda self, state: {"time_eval_s": 0.0})  # not what is compared here

    rounds = 3 if method == "flora" else 2  # FLoRA's cumulative update outgrows the last stack in round 3
    settings = [f"federation.method={method}", f"federation.rounds={rounds}", "federation.sample_fraction=0.06", "eval.seen_examples=2", "eval.unseen_examples=2"]
    if Aggregator.registry[method].mixed_ranks:  # two rank types: R2 and R4
        settings += ["resources.distribution=custom", "resources.types={R2: {attention: 2, mlp: 2}, R4: {attention: 4, mlp: 4}}", "resources.mix={R2: 1, R4: 1}"]
    states, metrics = _on_both_engines(tiny_config, settings)
    for part in ("global_adapter", "base_update"):
        a, b = getattr(states["simulator"], part), getattr(states["flower"], part)
        assert set(a) == set(b)
        assert all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) and a[n].scale == b[n].scale for n in a)
    assert bool(states["simulator"].base_update) == (method == "flora")
    for sim_round, flower_round in zip(metrics["simulator"], metrics["flower"]):
        assert flower_round["clients_reported"] == sim_round["clients_reported"] > 0
        for x, y in zip(sim_round["clients"], flower_round["clients"]):
            assert x["bytes_up"] == y["bytes_up"] == y["array_bytes_up"]
            assert y["bytes_down"] == y["array_bytes_down"]
            # FLoRA: a node is sent the cumulative update, not the last stack (serverapp docstring);
            # in round 2 the two are the same (round 1's stack), from round 3 on it is more.
            if method == "flora" and sim_round["round"] == 3:
                assert y["bytes_down"] > x["bytes_down"]
            else:
                assert x["bytes_down"] == y["bytes_down"]


def test_hetlora_self_pruning_through_flower_messages_equals_the_simulator(tiny_config, task_identity, monkeypatch):
    """Nodes train with the method's local rule too: clients prune on the node, the server accepts
    their lower ranks, and serves them those ranks afterwards, exactly as in the simulator."""
    monkeypatch.setattr(Simulation, "evaluate", lambda self, state: {"time_eval_s": 0.0})
    settings = [
        "federation.method=hetlora",
        "federation.method_options={prune: true, gamma: 0.5, lambda: 10.0}",  # strong, so that clients do prune
        "resources.distribution=heavy-tail-light",
        "federation.rounds=4",
        "eval.seen_examples=2",
        "eval.unseen_examples=2",
    ]
    states, metrics = _on_both_engines(tiny_config, settings)
    a, b = states["simulator"], states["flower"]
    assert a.client_ranks == b.client_ranks and a.client_ranks  # some clients pruned, the same ones
    assert all(torch.equal(a.global_adapter[n].a, b.global_adapter[n].a) and torch.equal(a.global_adapter[n].b, b.global_adapter[n].b) for n in a.global_adapter)
    for x, y in zip(metrics["simulator"], metrics["flower"]):
        assert [c["bytes_up"] for c in x["clients"]] == [c["bytes_up"] for c in y["clients"]]
        assert y["clients_reported"] == y["clients_sampled"]  # no pruned update was refused


def test_a_node_reuses_its_runtime_only_while_what_it_computes_is_unchanged():
    """Name, output directory, tracking and transport settings keep a node's model; any other
    section (here privacy.local, which no list of sections named) makes it rebuild."""
    from flexfed.engines.flower import node

    node_config = {"partition-id": 0, "num-partitions": 2}
    first = node.runtime(dump(load_config("tiny")), node_config)
    assert node.runtime(dump(load_config("tiny", ["name=other", "output_dir=/elsewhere", "flower.round_timeout=99"])), node_config) is first
    assert node.runtime(dump(load_config("tiny", ["privacy.local.clip_norm=1"])), node_config) is not first
