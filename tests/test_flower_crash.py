"""Failures on Flower, end to end on loopback (issue 15): each case must end with the run
finished and its result stated.

- A SuperNode killed (SIGKILL, with its resident ClientApp) while it trains a round-1 client, and
  a new SuperNode started for the same partition: the killed client is left out of round 1, the
  new node (a new node id) takes the client over in round 2, the run finishes.
- A node whose reply arrives after the round's deadline (``flower.round_timeout``; the delay is
  injected on that node alone, ``clientapp.FAULT_LATE_REPLY``): the client is left out of that
  round, its late reply is aggregated neither there nor in the next round, the run finishes.
- A SuperLink killed (SIGKILL, with its SuperExec and the run's ServerApp) during round 2 and
  started again on the same port and database: the SuperNodes reconnect under their old ids,
  the interrupted run stays ``running`` in the database with nothing running it until Flower
  fails it (no task heartbeat), and the run submitted again with ``resume=true`` continues from
  its round-1 checkpoint and finishes round 2 (a node that pulled the interrupted run's message
  after the restart can miss the resumed run: Flower's, see the test).

Harness and fixture: ``tests/test_flower.py``.
"""

import math
import re
import signal
import time

import pytest
import torch

from flexfed.config import load_config
from flexfed.engines.flower.clientapp import FAULT_LATE_REPLY
from flexfed.engines.flower.deploy import node_config_string
from flexfed.engines.flower.project import write_app
from flexfed.server import load_checkpoint

from test_flower import BASE, RUN_TIMEOUT, _metrics, _resident_tasks, _wait_for_run_dir, federations  # noqa: F401  (the harness and its fixture)

IDS = [f"client-{i}" for i in range(3)]  # partition k (of 3) hosts client index k
TIMEOUT = 25  # flower.round_timeout: the first round also loads the model on every node (2 shared cores)


def _node_id(node, timeout=RUN_TIMEOUT) -> str:
    deadline = time.monotonic() + timeout
    while "SuperNode ID: " not in (text := node.log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{node.name} logged no SuperNode ID; log:\n{text[-3000:]}"
        time.sleep(0.2)
    return text.split("SuperNode ID: ")[1].split()[0]


def _finite_global(run_dir, rounds):
    state = load_checkpoint(run_dir)
    assert state.round == rounds
    assert all(torch.isfinite(f.a).all() and torch.isfinite(f.b).all() for f in state.global_adapter.values())


def test_a_client_hosted_by_two_connected_nodes_goes_to_the_one_that_answered_last():
    """A restarted SuperNode (new id) and the dead one the SuperLink still lists as connected."""
    from types import SimpleNamespace

    from flexfed.engines.flower.clientapp import RESULT
    from flexfed.engines.flower.serverapp import FlowerExecutor

    class Replies:
        def __init__(self, hosted):
            self.hosted = hosted

        def wait(self):
            return {n: SimpleNamespace(content=SimpleNamespace(config_records={RESULT: {"clients": c}})) for n, c in self.hosted.items()}

    grid = SimpleNamespace(get_node_ids=lambda: [11, 12, 13])
    executor = FlowerExecutor(grid)
    executor.federation = SimpleNamespace(clients=[SimpleNamespace(client_id=i) for i in IDS])
    assert executor.end_query(([11, 12], Replies({11: IDS[:2], 12: IDS[2:]}))) == {0: 11, 1: 11, 2: 12}
    assert executor.end_query(([13], Replies({13: IDS[1:2]}))) == {0: 11, 1: 13, 2: 12}  # node 13 restarted node 11's client-1
    grid.get_node_ids = lambda: [12, 13]  # node 11's heartbeats ran out
    assert executor.end_query(([], None)) == {1: 13, 2: 12}


def test_the_late_reply_fault_is_read_from_the_process_environment_only(monkeypatch):
    from flexfed.engines.flower.clientapp import fault_delay

    monkeypatch.delenv(FAULT_LATE_REPLY, raising=False)
    assert fault_delay("1") == 0.0
    monkeypatch.setenv(FAULT_LATE_REPLY, "2:7.5")
    assert (fault_delay("1"), fault_delay("2")) == (0.0, 7.5)
    monkeypatch.setenv(FAULT_LATE_REPLY, "seven")
    with pytest.raises(ValueError, match="ROUND:SECONDS"):
        fault_delay("1")


def test_a_supernode_killed_mid_round_and_restarted_takes_its_client_back_in_the_next_round(tmp_path, federations):  # noqa: F811
    config = load_config("tiny", [*BASE, f"flower.round_timeout={TIMEOUT}", f"output_dir={tmp_path / 'flower'}"])  # 2 rounds, every client sampled
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3))) for k in range(3)]
    run_id = fed.submit(write_app(tmp_path / "app", config))

    victim = nodes[1]
    fed.wait_for_log(victim, "Receiving: train message", timeout=RUN_TIMEOUT)  # round 1: it is training client-1
    old_id = _node_id(victim)
    victim.kill()  # the SuperNode's group: flower-supernode and its resident ClientApp
    restarted = fed.start_supernode("node1-restarted", node_config_string(partition=(1, 3)))
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)
    new_id = _node_id(restarted)
    assert new_id != old_id  # Flower gives the restarted SuperNode a new id

    first, second = _metrics(config.run_dir)[1:]
    assert first["clients_sampled"] == 3 and first["clients_reported"] == 2
    (failed,) = first["clients_failed"]
    assert failed["id"] == IDS[1] and failed["node"] == old_id
    # The SuperLink still lists the killed node for up to 2 x 30 s of missed heartbeats: the round's deadline ends the wait.
    assert "DeadlineMissed" in failed["reason"] or "error" in failed["reason"], failed
    assert "bytes_down_unconfirmed" in failed or "error" in failed["reason"]
    # Round 2: the client goes to the restarted node (the newest that hosts it), not to the dead id.
    assert second["clients_reported"] == 3 and not second["clients_failed"], second["clients_failed"]
    nodes_of = {c["id"]: c["node"] for c in second["clients"]}
    assert nodes_of[IDS[1]] == new_id and {nodes_of[IDS[0]], nodes_of[IDS[2]]}.isdisjoint({old_id, new_id})
    logs = fed.logs(run_id)
    assert f"round 1: client {IDS[1]} left out" in logs and "1 new SuperNodes queried" in logs
    assert sum(_resident_tasks(restarted).values()) == 2  # the hosting query and client-1's round-2 training
    _finite_global(config.run_dir, 2)
    assert restarted.alive() and nodes[0].alive() and nodes[2].alive()
    victim.popen.wait(timeout=10)


def test_a_reply_after_the_rounds_deadline_is_left_out_of_that_round_and_of_the_next(tmp_path, federations):  # noqa: F811
    delay = TIMEOUT + 2  # held on the node after training: the reply reaches the SuperLink after the deadline, by construction
    config = load_config("tiny", [*BASE, f"flower.round_timeout={TIMEOUT}", f"output_dir={tmp_path / 'flower'}"])
    fed = federations()
    fed.start_superlink()
    late = 2
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3)), env={FAULT_LATE_REPLY: f"1:{delay}"} if k == late else None)
             for k in range(3)]
    run_id = fed.submit(write_app(tmp_path / "app", config))
    _wait_for_run_dir(config.run_dir, 2, fed, run_id)

    first, second = _metrics(config.run_dir)[1:]
    assert first["clients_sampled"] == 3 and first["clients_reported"] == 2
    (failed,) = first["clients_failed"]
    assert failed["id"] == IDS[late] and failed["node"] == _node_id(nodes[late])
    assert failed["reason"].startswith("DeadlineMissed") and f"no reply within the {TIMEOUT} s deadline" in failed["reason"], failed
    assert "wire_bytes_up" not in failed and failed["bytes_down"] == 0 and failed["bytes_down_unconfirmed"] > 0
    assert {c["id"] for c in first["clients"]} == {IDS[0], IDS[1]}
    # Round 2 aggregates one reply per client, each its round-2 reply: the late round-1 reply (whose
    # ClientApp time includes the held seconds) was never pulled, and round 2 did not take it for
    # the late client's round-2 update.
    assert second["clients_reported"] == 3 and not second["clients_failed"], second["clients_failed"]
    for c in first["clients"] + second["clients"]:
        assert c["time_clientapp_s"] < delay, c
    n_arrays = 2 * len(load_checkpoint(config.run_dir).global_adapter)  # a and b per module
    for c in second["clients"]:  # one reply's bytes each (two would double the arrays' count)
        assert c["array_bytes_up"] == c["bytes_up"] and 0 < c["wire_bytes_up"] - c["bytes_up"] <= 512 * n_arrays + 4096, c

    # The late reply was really sent: the node held it, then pushed it without error, after the deadline.
    log = nodes[late].log.read_text(errors="replace")
    assert f"fault injection ({FAULT_LATE_REPLY})" in log and "could not be pushed" not in log
    served = [float(s) for s in re.findall(r"task \d+ \(run \d+, train\): .* served in ([\d.]+) s", log)]
    assert len(served) == 2 and served[0] >= delay and served[1] < delay, served
    assert f"round 1: client {IDS[late]} left out: node" in fed.logs(run_id)
    _finite_global(config.run_dir, 2)
    assert all(p.alive() for p in nodes)


def test_a_superlink_killed_between_rounds_restarts_on_its_database_and_the_run_resumes_from_its_checkpoint(tmp_path, federations):  # noqa: F811
    config = load_config("tiny", [*BASE, f"flower.round_timeout={TIMEOUT}", f"output_dir={tmp_path / 'flower'}"])
    fed = federations()
    fed.start_superlink()
    nodes = [fed.start_supernode(f"node{k}", node_config_string(partition=(k, 3))) for k in range(3)]
    node_ids = [_node_id(n) for n in nodes]
    app = write_app(tmp_path / "app", config)
    run_id = fed.submit(app)

    checkpoints = config.run_dir / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (checkpoints / "round-0001").exists():
        assert time.monotonic() < deadline, fed.logs(run_id)[-4000:]
        time.sleep(0.1)
    round_1 = _metrics(config.run_dir)[1]
    fed.restart_superlink(signal.SIGKILL)  # with its SuperExec and the run's ServerApp, during round 2
    assert not (checkpoints / "round-0002").exists()
    # The restarted SuperLink holds the run as it was (its database), but nothing runs it: no
    # ServerApp is started again for it, and Flower fails it once its task's heartbeat is overdue.
    assert fed.run_status(run_id)["status"] == "running"

    resumed = fed.submit(app, "resume=true")
    assert resumed != run_id
    _wait_for_run_dir(config.run_dir, 2, fed, resumed)
    logs = fed.logs(resumed)
    assert f"resuming {config.run_dir} after round 1" in logs
    metrics = _metrics(config.run_dir)
    assert [m["round"] for m in metrics] == [0, 1, 2]  # round 1 not redone; round 2 done once, by the resumed run
    assert metrics[1] == round_1
    # The SuperNodes reconnected to the restarted SuperLink, under their old ids, and each trains
    # its client in the resumed round 2, but for one case, Flower's: a SuperNode that pulls the
    # interrupted run's round-2 message from the restarted SuperLink ignores it ("not in `RUNNING`
    # status") and then leaves the resumed run's hosting query unserved, so its client is hosted
    # by no node in round 2 and left out (NotSent). Seen in 2 of 6 runs, when the crash came
    # before that node had pulled its round-2 message.
    second = metrics[2]
    stuck = {k for k, n in enumerate(nodes) if "is not in `RUNNING` status. Ignoring message" in n.log.read_text(errors="replace")}
    assert second["clients_reported"] + len(second["clients_failed"]) == 3 and second["clients_reported"] >= 1
    assert {c["node"]: c["id"] for c in second["clients"]}.items() <= {node_ids[k]: IDS[k] for k in range(3)}.items(), (node_ids, second["clients"])
    for failed in second["clients_failed"]:
        assert failed["reason"] == f"NotSent: client {failed['id']}: no connected SuperNode hosts it", failed
        assert IDS.index(failed["id"]) in stuck, (failed, stuck)
    print(f"resumed round 2: {second['clients_reported']} of 3 reported; nodes that ignored the interrupted run's message: {sorted(stuck)}")
    assert all(p.alive() for p in nodes)
    _finite_global(config.run_dir, 2)
    assert not math.isnan(metrics[2]["train_loss"])
    interrupted = fed.wait_for_run(run_id, timeout=RUN_TIMEOUT)
    assert interrupted["status"] == "finished:failed" and interrupted["status-details"] == "No heartbeat received from the task", interrupted
