"""Flower engine pieces without Flower processes: wire format, node config, app, certificates, faults."""

import io
import json
import math
import threading

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from flexfed.config import ConfigError, dump, load_config
from flexfed.engines.flower import clientapp, wire
from flexfed.engines.flower.clientapp import NodeConfigError, hosted_clients
from flexfed.engines.flower.project import app_pyproject
from flexfed.engines.flower.serverapp import FlowerEngine, config_from_run_config
from flexfed.engines.simulation import Simulation
from flexfed.lora import Factors, adapter_bytes
from flexfed.server import load_checkpoint


def _adapter(dtype=torch.float32, ranks=(2, 4)):
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.self_attn.q_proj": Factors(torch.randn(16, r, generator=g).to(dtype), torch.randn(r, 8, generator=g).to(dtype), 8.0 / r)
        for i, r in enumerate(ranks)
    }


# ----------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adapters_survive_the_wire_bit_for_bit(dtype):
    adapter = _adapter(dtype)
    record, meta = wire.encode_adapter(adapter)
    assert isinstance(record, ArrayRecord) and meta["dtype"] == str(dtype).removeprefix("torch.")
    back = wire.decode_adapter(record, meta["modules"], meta["scales"], meta["dtype"])
    for name, f in adapter.items():
        assert back[name].a.dtype == dtype and torch.equal(back[name].a, f.a) and torch.equal(back[name].b, f.b)
        assert back[name].scale == f.scale
    # Arrays travel as float32 for bfloat16 (NumPy has none); otherwise exactly adapter_bytes.
    assert wire.array_bytes(adapter) == adapter_bytes(adapter) * (2 if dtype == torch.bfloat16 else 1)


def test_serialised_size_is_the_arrays_plus_a_bounded_overhead():
    adapter = _adapter(ranks=(8, 8, 8, 8))
    record, meta = wire.encode_adapter(adapter)
    size = wire.object_bytes(RecordDict({"adapter": record, "meta": ConfigRecord(meta)}))
    overhead = size - wire.array_bytes(adapter)
    assert 0 < overhead <= 512 * 2 * len(adapter) + 1024


def _decode(arrays, meta):
    return wire.decode_arrays(arrays, meta["modules"], meta["scales"], meta["dtype"])


def test_malformed_arrays_are_refused():
    arrays, meta = wire.encode_arrays(_adapter())
    first = meta["modules"][0]
    cases = {
        "unexpected or missing": {**arrays, "extra.a": arrays[f"{first}.a"]},
        "expected a 2-D float32": {**arrays, f"{first}.a": arrays[f"{first}.a"].astype(np.int32)},
        "2-D": {**arrays, f"{first}.b": arrays[f"{first}.b"][None]},
        "do not chain": {**arrays, f"{first}.b": arrays[f"{first}.b"][:, :1]},
    }
    for reason, bad in cases.items():
        with pytest.raises(wire.WireError, match=reason):
            _decode(bad, meta)
    with pytest.raises(wire.WireError, match="positive number"):
        _decode(arrays, {**meta, "scales": [float("nan"), 1.0]})
    with pytest.raises(wire.WireError, match="not accepted"):
        _decode(arrays, {**meta, "dtype": "int8"})


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
        stats = content.config_records[clientapp.RESULT]
        stats["scales"] = [engine.server.scale(2) if m == module else s for m, s in zip(stats["modules"], stats["scales"])]

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


# ----------------------------------------------------------------------------- the node's trainer worker


def test_the_trainer_worker_trains_like_the_in_process_trainer(tiny_config, tmp_path):
    from flexfed.engines.flower import worker
    from flexfed.engines.simulation import Simulation

    config = tiny_config()
    sim = Simulation(config)
    c = sim.server.sample(1)[0]
    shard = sim.federation.clients[c]
    start = sim.server.start_adapter(sim.server.initial_state(), c)
    seed = sim.server.client_seed(1, c)
    expected = sim.trainer.train(shard.client_id, start, sim_examples(sim, shard), seed)

    w = worker.Worker(tmp_path / "w" / "trainer.sock")
    thread = threading.Thread(target=w.serve_forever, daemon=True)
    thread.start()
    try:
        arrays, meta = wire.encode_arrays(start)
        header = {"op": "train", "config": dump(config), "client": shard.client_id, "seed": seed, "meta": meta, "trainable": ["a", "b"], "node_config": {"partition-id": 0, "num-partitions": 1}}
        answer, blobs = worker.request(w.path, header, {k: wire.npy_bytes(v) for k, v in arrays.items()})
        stats = answer["stats"]
        got = wire.decode_arrays({k: wire.npy_load(v) for k, v in blobs.items()}, stats["modules"], stats["scales"], stats["dtype"])
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


@pytest.mark.parametrize("method", _methods())
def test_every_method_gives_the_same_result_through_flower_messages(method, tiny_config, task_identity, monkeypatch):
    """The ServerApp (on a scripted grid, ClientApp functions answering) against the in-process simulator."""
    from flexfed.aggregation import Aggregator

    monkeypatch.setattr(Simulation, "evaluate", lambda self, state: {"time_eval_s": 0.0})  # not what is compared here

    settings = [f"federation.method={method}", "federation.rounds=1", "federation.sample_fraction=0.06", "eval.seen_examples=2", "eval.unseen_examples=2"]
    if Aggregator.registry[method].mixed_ranks:  # two rank types: R2 and R4
        settings += ["resources.distribution=custom", "resources.types={R2: {attention: 2, mlp: 2}, R4: {attention: 4, mlp: 4}}", "resources.mix={R2: 1, R4: 1}"]
    outcomes = {}
    for engine in ("simulator", "flower"):
        config = tiny_config(f"name={engine}", *settings)
        try:
            sim = Simulation(config) if engine == "simulator" else FlowerEngine(config, grid=ScriptedGrid({}))
            sim.run(show_progress=False)
            outcomes[engine] = load_checkpoint(config.run_dir).global_adapter
        except ValueError as err:  # a method the simulator cannot run yet must fail the same way
            outcomes[engine] = f"{type(err).__name__}: {err}"
    a, b = outcomes["simulator"], outcomes["flower"]
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        assert set(a) == set(b)
        assert all(torch.equal(a[n].a, b[n].a) and torch.equal(a[n].b, b[n].b) and a[n].scale == b[n].scale for n in a)
