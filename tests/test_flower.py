"""Flower engines end to end, on loopback: real SuperLink and SuperNode processes, and Flower's simulation engine.

Every test runs Flower under its own temporary FLWR_HOME on free ports, and stops every process
it started (by process group id) in the fixture's teardown, whatever happened.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from flexfed.config import load_config
from flexfed.engines import simulation
from flexfed.engines.flower.deploy import LocalFederation, make_certs, node_config_string
from flexfed.engines.flower.project import write_app
from flexfed.engines.flower.serverapp import FlowerExecutor
from flexfed.lora import load_adapter
from flexfed.server import Server, load_checkpoint

# Three clients (one per SuperNode), three different ranks (seed 7 draws R8, R2, R4), FlexLoRA.
BASE = [
    "seed=7",
    "federation.method=flexlora",
    "federation.rounds=2",
    "federation.sample_fraction=1.0",
    "data.partition=iid",
    "data.num_clients=3",
    "resources.distribution=custom",
    "resources.types={R2: {attention: 2, mlp: 2}, R4: {attention: 4, mlp: 4}, R8: {attention: 8, mlp: 8}}",
    "resources.mix={R2: 1, R4: 1, R8: 1}",
    "eval.every=2",
    "eval.seen_examples=2",
    "eval.unseen_examples=2",
    "flower.min_nodes=3",
]
RUN_TIMEOUT = 240
NOT_COMPARED = {"time_train_s", "time_aggregate_s", "time_eval_s", "time_round_s", "time_overhead_s", "seconds"}
FLOWER_ONLY = set(FlowerExecutor.record_fields) - {"wire_bytes_down_unconfirmed"}  # what the Flower engine adds to a client record


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _comparable(obj):
    if isinstance(obj, dict):
        return {k: _comparable(v) for k, v in obj.items() if k not in NOT_COMPARED | FLOWER_ONLY}
    if isinstance(obj, list):
        return [_comparable(v) for v in obj]
    return obj


def _assert_same_global_adapter(run_a, run_b):
    a, b = load_checkpoint(run_a).global_adapter, load_checkpoint(run_b).global_adapter
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name].a, b[name].a) and torch.equal(a[name].b, b[name].b), name
        assert a[name].scale == b[name].scale


def _zombies(fed) -> list[str]:
    """Processes of the federation's sessions that exited and were never reaped."""
    sessions = {p.pid for p in fed.processes}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[3]) in sessions:
            found.append(f"{pid} ({name})")
    return found


def _resident_tasks(node) -> dict[str, int]:
    """Tasks served per resident ClientApp process (pid -> count), from the node's log."""
    counts: dict[str, int] = {}
    for pid in re.findall(r"resident\[(\d+)\]: task \d+ \(run", node.log.read_text(errors="replace")):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def _wait_for_resident(node, timeout=RUN_TIMEOUT, other_than=None) -> int:
    """The pid of the node's resident ClientApp once it serves (one other than ``other_than``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for p in re.findall(r"resident\[(\d+)\]: serving", node.log.read_text(errors="replace"))]
        if pids and pids[-1] != other_than:
            return pids[-1]
        time.sleep(0.2)
    raise AssertionError(f"{node.name}: no resident ClientApp serves after {timeout} s; log:\n{node.log.read_text()[-3000:]}")


@pytest.fixture
def federations(tmp_path):
    """Start LocalFederations; every process they started is stopped at teardown."""
    started = []

    def make(name="fed", **kwargs):
        fed = LocalFederation(tmp_path / name, **kwargs)
        started.append(fed)
        return fed

    yield make
    for fed in started:
        fed.stop()
        assert not any(p.alive() for p in fed.processes)


def _wait_for_run_dir(run_dir, last_round, fed, run_id, timeout=RUN_TIMEOUT):
    """Wait for the final checkpoint, then for Flower to report the run finished."""
    deadline = time.monotonic() + timeout
    final = run_dir / "checkpoints" / f"round-{last_round:04d}"
    while not final.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {final} after {timeout} s; ServerApp log:\n{fed.logs(run_id)[-4000:]}")
        if not fed.processes[0].alive():
            raise AssertionError(f"the SuperLink died; log:\n{fed.processes[0].log.read_text()[-4000:]}")
        time.sleep(0.5)
    status = fed.wait_for_run(run_id, timeout=60)
    assert status["status"] == "finished:completed", (status, fed.logs(run_id)[-4000:])
    return status


def test_tls_authenticated_deployment_with_three_ranks_equals_the_in_process_simulator(tmp_path, federations):
    certs = tmp_path / "certs"
    make_certs(certs, nodes=4)
    fed = federations(certs=certs, auth=True)
    fed.start_superlink()
    fed.register(*(certs / f"supernode-{k + 1}.pub" for k in range(3)))
    # Node 0 runs Flower's own executor (a flwr-clientapp process per message, relaying to a trainer
    # worker); nodes 1 and 2 a resident ClientApp process: both must give the simulator's result.
    isolation = ["subprocess", "process", "process"]
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3)), auth_key=certs / f"supernode-{k + 1}.key", isolation=isolation[k])
             for k in range(3)]
    # A SuperNode whose key was never registered must not get in.
    intruder = fed.start_supernode("intruder", node_config_string(partition=(0, 3)), auth_key=certs / "supernode-4.key", worker=False)

    config = load_config("tiny", [*BASE, f"output_dir={tmp_path / 'flower'}"])
    run_id = fed.submit(write_app(tmp_path / "app", config))
    # Meanwhile, the in-process simulator on the same config, seeds and data.
    reference = load_config("tiny", [*BASE, f"output_dir={tmp_path / 'inproc'}"])
    simulation.run(reference, show_progress=False)
    status = _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    # The same global adapter, bit for bit, and the same metrics up to timings and wire counts.
    _assert_same_global_adapter(config.run_dir, reference.run_dir)
    flower, inproc = _metrics(config.run_dir), _metrics(reference.run_dir)
    assert _comparable(flower) == _comparable(inproc)
    assert {json.dumps(c["ranks"], sort_keys=True) for c in flower[1]["clients"]} == {
        json.dumps({k: r for k in ("k_proj", "o_proj", "q_proj", "v_proj")}) for r in (2, 4, 8)
    }
    assert [m["clients_reported"] for m in flower[1:]] == [3, 3]
    assert (config.run_dir / "adapters" / "round-0002" / "adapter_model.safetensors").exists()

    # Bytes on the wire: the arrays are exactly flexfed's adapter bytes (float32 here); Flower's
    # serialisation adds a bounded overhead per array (npy header, object headers) and per message.
    n_arrays = 2 * len(load_adapter(config.run_dir / "adapters" / "round-0000").adapter)  # a and b per module
    up = down = 0
    for m in flower[1:]:
        for c in m["clients"]:
            assert c["array_bytes_up"] == c["bytes_up"] and c["array_bytes_down"] == c["bytes_down"]
            assert 0 < c["wire_bytes_up"] - c["bytes_up"] <= 512 * n_arrays + 4096, c
            # + the config YAML; in round 1 every B starts at zero, and Flower sends identical chunks once
            assert c["wire_bytes_down"] - c["bytes_down"] <= 512 * n_arrays + 8192, c
            assert m["round"] == 1 or c["wire_bytes_down"] > c["bytes_down"], c
            up, down = up + c["wire_bytes_up"], down + c["wire_bytes_down"]
        assert m["wire_bytes_up"] == sum(c["wire_bytes_up"] for c in m["clients"])
    # The SuperLink's own traffic counters saw at least those bytes, plus protocol overhead.
    traffic = status["network-traffic"]
    assert up <= traffic["inbound-bytes"] <= 1.25 * up + 65536, (up, traffic)
    assert down <= traffic["outbound-bytes"] <= 1.25 * down + 65536, (down, traffic)

    # The SuperNode with an unregistered key was refused and gave up; the three others served.
    assert intruder.popen.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in intruder.log.read_text()
    assert fed.processes[0].log.read_text().count("Activated node_id") == 3
    assert all(p.alive() for p in nodes)
    assert _zombies(fed) == []  # Flower's app processes were reaped (deploy.reap_children)

    # One resident process served every message of its node (the query and both rounds' training):
    # nothing was started per message. Node 0 started a flwr-clientapp process for each.
    for node in nodes[1:]:
        served = _resident_tasks(node)
        assert len(served) == 1 and sum(served.values()) == 3, served
        assert "Start `flwr-clientapp` process" not in node.log.read_text()
    assert _resident_tasks(nodes[0]) == {}
    assert nodes[0].log.read_text().count("Start `flwr-clientapp` process") == 3
    # Both kinds of node report their ClientApp's time; the rest of the round trip is Flower's.
    for c in flower[1]["clients"] + flower[2]["clients"]:
        assert c["seconds"] <= c["time_clientapp_s"] <= c["time_roundtrip_s"], c
        assert c["time_flower_s"] == pytest.approx(c["time_roundtrip_s"] - c["time_clientapp_s"]), c


def test_a_supernode_killed_mid_round_is_left_out_and_the_run_finishes(tmp_path, federations):
    overrides = [*BASE, f"output_dir={tmp_path / 'flower'}", "federation.sample_fraction=0.6", "flower.round_timeout=30"]
    config = load_config("tiny", overrides)
    ids = [f"client-{i}" for i in range(3)]
    sampler = Server(config, {}, [], [], ids)
    # The victim trains in round 1 but is not sampled in round 2, so round 2 needs no deadline.
    (victim_client,) = sorted(set(sampler.sample(1)) - set(sampler.sample(2)))
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3))) for k in range(3)]
    victim = nodes[victim_client]  # partition k hosts client index k
    # A resident ClientApp that dies is started again by its node's `flexfed flower supernode`.
    spare = nodes[(victim_client + 1) % 3]
    killed = _wait_for_resident(spare)
    os.kill(killed, signal.SIGKILL)
    restarted = _wait_for_resident(spare, other_than=killed)
    run_id = fed.submit(write_app(tmp_path / "app", config))

    fed.wait_for_log(victim, "Receiving: train message", timeout=RUN_TIMEOUT)
    victim_node_id = victim.log.read_text().split("SuperNode ID: ")[1].split()[0]
    victim.kill()
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    metrics = _metrics(config.run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    first, second = metrics[1], metrics[2]
    assert first["clients_sampled"] == 2 and first["clients_reported"] == 1
    (failed,) = first["clients_failed"]
    assert failed["id"] == ids[victim_client] and failed["node"] == victim_node_id
    assert "deadline" in failed["reason"] or "error" in failed["reason"], failed
    assert {c["id"] for c in first["clients"]} == {ids[i] for i in sampler.sample(1)} - {ids[victim_client]}
    assert second["clients_reported"] == 2 and not second["clients_failed"]
    assert f"client {ids[victim_client]} left out" in fed.logs(run_id)
    state = load_checkpoint(config.run_dir)
    assert state.round == 2 and all(torch.isfinite(f.b).all() for f in state.global_adapter.values())
    assert set(_resident_tasks(spare)) == {str(restarted)}  # the restarted resident served the spare node's messages
    victim.popen.wait(timeout=10)  # this test's own child: reaped here, not a zombie
    assert _zombies(fed) == []  # the killed resident was reaped by its supervisor


def test_flower_sim_engine_runs_the_quickstart_config_with_the_simulator_metrics_format(tmp_path):
    small = [
        "model.name=tiny-llama",
        "data.examples_per_task=8",
        "data.partition=iid",
        "data.num_clients=3",
        "federation.rounds=1",
        "federation.sample_fraction=1.0",
        "training.local_steps=2",
        "eval.seen_examples=2",
        "eval.unseen_examples=2",
        "eval.max_new_tokens=4",
        "flower.client_cpus=2",
    ]
    sets = [arg for s in [*small, f"output_dir={tmp_path / 'flower'}"] for arg in ("--set", s)]
    cmd = [sys.executable, "-m", "flexfed.cli", "run", "--config", "quickstart", "--engine", "flower-sim", "--quiet", *sets]
    # Its own session, so that Ray's processes go too if it has to be stopped.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-5000:]
    run_dir = tmp_path / "flower" / "quickstart"
    reference = load_config("quickstart", [*small, f"output_dir={tmp_path / 'inproc'}"])
    torch.set_num_threads(2)  # as Ray's actor (OMP_NUM_THREADS = client_cpus): GEMM results can depend on it
    simulation.run(reference, show_progress=False)

    flower, inproc = _metrics(run_dir), _metrics(reference.run_dir)
    assert _comparable(flower) == _comparable(inproc)
    for f, i in zip(flower, inproc):  # the same fields, plus the wire counts
        assert set(f) - set(i) <= FLOWER_ONLY and set(i) <= set(f)
        for fc, ic in zip(f.get("clients", []), i.get("clients", [])):
            assert set(fc) - set(ic) == FLOWER_ONLY and set(ic) <= set(fc)
    _assert_same_global_adapter(run_dir, reference.run_dir)
    assert (run_dir / "report" / "summary.md").exists()
    assert not math.isnan(flower[-1]["train_loss"])
