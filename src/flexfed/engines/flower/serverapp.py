"""The Flower ServerApp: flexfed's round, with clients trained on SuperNodes.

``FlowerEngine`` is the runner (``flexfed.runner``) with a ``FlowerExecutor``: each wave of the
round's conversations goes out as one Message per sampled client (the protocol's message, e.g.
the method's payload for that client, its own rank-r factors, as an ``ArrayRecord``) to the
SuperNode hosting it, and the replies are collected until the round's deadline. Sampling, the
protocol's messages, update checks, aggregation, evaluation, metrics, adapters and checkpoints
are the runner's and the protocol's, so both engines write the same run directory from the
same config.

A client whose node does not answer in time, crashed, disconnected or replied with something
that is not a well-formed adapter is left out of the round (logged with the client and node
ids). Every decoded update still goes through ``Server.check_update`` before aggregation. A
reply that arrives after its round's deadline is never read: a round pulls only the replies to
its own messages (by message id), so a late round-r reply cannot enter round r + 1. A client
hosted by several connected nodes goes to the one that answered the hosting query last, so a
SuperNode restarted after a crash (a new node id) takes its clients over from the next round on.

A SuperNode keeps no base weights between messages (``shares_base`` is False), so a method that
changes the base sends what a client needs instead (``Aggregator.sent_alone``). For FLoRA, which
assumes every client receives every round's stack and merges it into its base (and a client may
not have been sampled last round), that is the whole *cumulative* update (``base_update``: the
rounds' stacks concatenated, at most rank min(d, k) per matrix), merged into the original base. The result is bit for bit the simulator's; ``bytes_down`` counts what
is sent, which exceeds the method's (Σ r_j)(d + k) per matrix from round 2 on.

With ``flower.secure_aggregation: secaggplus`` a round's exchange is Flower's SecAgg+ instead
(``secagg.secure_round``): the ServerApp never receives an individual update, only the weighted
mean it unmasks, which the method's aggregate turns into the global (``aggregation.secure``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from flexfed import config as config_lib
from flexfed.config import RunConfig
from flexfed.engines.flower.clientapp import ADAPTER, APP_SECONDS, CONFIG, RESULT
from flexfed.engines.flower.wire import array_bytes, decode_payload, encode_payload, from_record, message_bytes, to_record
from flexfed.protocol import Message as ProtocolMessage
from flexfed.protocol import Unconfirmed, converse
from flexfed.runner import Executor, Runner
from flexfed.server import UpdateRejected

log = logging.getLogger(__name__)

POLL_S = 0.25  # seconds between pulls for replies
QUERY_TIMEOUT_S = 60.0
WAIT_LOG_S = 15.0  # seconds between log lines while waiting for SuperNodes  # at most this long for a node to say which clients it hosts


class NodeFailure(RuntimeError):
    """A client's node did not deliver its update (no node, error reply, deadline)."""


class NotSent(NodeFailure, Unconfirmed):
    """The message never left the SuperLink (no connected node hosts the client, or the push failed)."""


class DeadlineMissed(NodeFailure, Unconfirmed):
    """No reply before the deadline: whether the node received the message is unknown."""


class Exchange:
    """Messages in flight through the SuperLink, at most ``per_node`` per node (the rest queued).

    ``items`` are ``(key, node id, make)``; ``make()`` builds the message when it is sent, so
    queued messages hold no arrays. The deadline runs from construction, when the first
    messages are pushed; ``wait`` returns ``{key: reply Message | Exception}`` for every item, a
    ``NodeFailure`` for those not answered (or not even sent) in time.
    """

    def __init__(self, grid: Grid, items: list[tuple], timeout: float, per_node: int | None = None):
        self.grid = grid
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.limit = per_node or max(1, len(items))
        self.queues: dict[int, deque] = {}
        for key, node, make in items:
            self.queues.setdefault(node, deque()).append((key, make))
        self.inflight: dict[str, tuple] = {}  # message id -> (key, node)
        self.out: dict = {}
        self.sent_at: dict = {}  # key -> when its message was pushed
        self.roundtrip: dict = {}  # key -> seconds from push to the reply's pull (to within POLL_S)
        for node in self.queues:
            self._dispatch(node)

    def _dispatch(self, node: int) -> None:
        queue = self.queues[node]
        while queue and sum(1 for _, n in self.inflight.values() if n == node) < self.limit:
            key, make = queue.popleft()
            try:
                (mid,) = self.grid.push_messages([make()])
            except Exception as err:  # noqa: BLE001 - a failed push only fails that message
                mid, reason = None, f"{type(err).__name__}: {err}"
            else:
                reason = "the SuperLink refused the message"
            if not mid:
                self.out[key] = NotSent(f"node {node}: {reason}")
                continue
            self.inflight[mid] = (key, node)
            self.sent_at[key] = time.monotonic()

    def wait(self, on_reply=None) -> dict:
        first = True  # replies that arrived before ``wait`` was called always count
        while self.inflight and (first or time.monotonic() < self.deadline):
            first = False
            for reply in self.grid.pull_messages(list(self.inflight)):
                entry = self.inflight.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                key, node = entry
                self.roundtrip[key] = time.monotonic() - self.sent_at[key]
                if reply.has_error():
                    self.out[key] = NodeFailure(f"node {node}: error {reply.error.code}: {reply.error.reason}")
                else:
                    self.out[key] = reply
                if on_reply:
                    on_reply(key)
                self._dispatch(node)
            if self.inflight:
                time.sleep(POLL_S)
        for key, node in self.inflight.values():
            self.out[key] = DeadlineMissed(f"node {node}: no reply within the {self.timeout:.0f} s deadline")
        for node, queue in self.queues.items():
            for key, _ in queue:
                self.out[key] = DeadlineMissed(f"node {node}: not reached before the {self.timeout:.0f} s deadline (its earlier clients did not finish)")
        self.inflight.clear()
        return self.out


def check_supported(config: RunConfig) -> None:
    """What the Flower engine cannot run yet, refused before any node is contacted."""
    from flexfed.aggregation.weights import check_engine

    check_engine(config, FlowerExecutor.name)


class FlowerExecutor(Executor):
    """Carries each wave of the round's conversations as Flower Messages, one per client, to the
    SuperNode hosting it, and collects the replies until the round's deadline."""

    name = "flower"
    shares_base = False  # a node keeps no server state between messages
    # What it adds to a client's record in metrics.jsonl (``annotate``; docs/flower.md)
    record_fields = frozenset({"node", "array_bytes_down", "array_bytes_up", "wire_bytes_down", "wire_bytes_up", "wire_bytes_down_unconfirmed",
                               "time_roundtrip_s", "time_outside_client_s", "time_clientapp_s", "time_flower_s"})
    secure_fields = frozenset({"bytes_up_factored"})  # added under secure aggregation: the factors' bytes, beside the masked vector's
    poll_s = POLL_S  # seconds between pulls for replies (secagg.py polls at the same pace)

    def __init__(self, grid: Grid):
        self.grid = grid
        self.host: dict[int, int] = {}  # client index -> node id
        self.last_host: dict[int, int] = {}  # client index -> the node that last hosted it (connected or not)
        self.hosted_by: dict[int, list[int]] = {}  # node id -> client indices, in query order
        self._wire: dict[str, dict] = {}  # client id -> wire byte counts of this round
        self._pending = None
        self._sent: dict[int, int] = {}  # client index -> wire bytes of its message in this wave
        self._secure: dict | None = None  # the round's secure aggregation (secagg.py), for its metrics line

    def attach(self, runner) -> None:
        super().attach(runner)
        self.config = runner.config
        self.federation = runner.federation
        self.config_yaml = config_lib.dump(runner.config)

    # ------------------------------------------------------------------ nodes

    def wait_for_nodes(self) -> list[int]:
        """Wait for ``flower.min_nodes`` SuperNodes, saying every ``WAIT_LOG_S`` who is there and
        how long is left (the run directory is checked before: nothing fails after the wait)."""
        f = self.config.flower
        deadline = time.monotonic() + f.node_wait_timeout
        next_log = time.monotonic()
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= f.min_nodes:
                log.info("%d SuperNodes connected (flower.min_nodes=%d): %s", len(nodes), f.min_nodes, nodes)
                return nodes
            now = time.monotonic()
            if now > deadline:
                raise NodeFailure(f"{len(nodes)} SuperNodes connected within flower.node_wait_timeout={f.node_wait_timeout:.0f} s ({nodes}); flower.min_nodes={f.min_nodes}")
            if now >= next_log:
                log.info("waiting for SuperNodes: %d of flower.min_nodes=%d connected %s, %d missing; %.0f s left (flower.node_wait_timeout)",
                         len(nodes), f.min_nodes, nodes, f.min_nodes - len(nodes), deadline - now)
                next_log = now + WAIT_LOG_S
            time.sleep(POLL_S)

    def begin_query(self) -> tuple[list[int], Exchange | None]:
        """Send a query to every connected node not asked yet: which clients do you host?"""
        connected = set(self.grid.get_node_ids())
        new = sorted(connected - set(self.hosted_by))
        if not new:
            return new, None
        all_ids = [c.client_id for c in self.federation.clients]
        ttl = self.config.flower.round_timeout

        def make(node: int) -> Message:
            return Message(RecordDict({CONFIG: ConfigRecord({"clients": all_ids})}), dst_node_id=node, message_type="query", group_id="query", ttl=ttl)

        items = [(n, n, lambda n=n: make(n)) for n in new]
        return new, Exchange(self.grid, items, min(ttl, QUERY_TIMEOUT_S))

    def end_query(self, pending: tuple[list[int], Exchange | None]) -> dict[int, int]:
        """Record the answers and map each client to a connected node hosting it: the one that
        answered most recently. A SuperNode restarted after a crash comes back under a new id,
        while the SuperLink lists the dead one as connected until its heartbeats run out (up to
        twice Flower's 30 s heartbeat interval): the newer node is the live one."""
        new, exchange = pending
        replies = exchange.wait() if exchange else {}
        index = {c.client_id: i for i, c in enumerate(self.federation.clients)}
        for node in new:
            reply = replies[node]
            try:
                if isinstance(reply, Exception):
                    raise reply
                ids = [str(c) for c in reply.content.config_records[RESULT]["clients"]]
            except DeadlineMissed as err:
                log.warning("node %s did not answer the query in time (asked again before the next round): %s", node, err)
                continue
            except Exception as err:  # noqa: BLE001 - a node that cannot answer hosts nothing
                log.warning("node %s left out: its query failed: %s", node, err)
                self.hosted_by[node] = []
                continue
            unknown = [c for c in ids if c not in index]
            if unknown:
                log.warning("node %s names clients this federation does not have: %s", node, unknown[:5])
            self.hosted_by[node] = [index[c] for c in ids if c in index]
            log.debug("node %s hosts %d clients", node, len(self.hosted_by[node]))
        connected = set(self.grid.get_node_ids())
        host: dict[int, int] = {}
        for node, clients in self.hosted_by.items():  # in the order the nodes answered: the last one wins
            if node in connected:
                for c in clients:
                    host[c] = node
        if new:
            log.info("%d new SuperNodes queried; %d connected nodes host %d of %d clients", len(new), len(connected), len(host), len(self.federation.clients))
        if len(host) < len(self.federation.clients) and (new or not self.host):
            log.warning("%d of %d clients are hosted by no connected node; they fail when sampled", len(self.federation.clients) - len(host), len(self.federation.clients))
        self.host = host
        self.last_host.update(host)
        return host

    def refresh_hosts(self) -> dict[int, int]:
        """Query nodes that connected since the last query; called before every round, so late
        SuperNodes (or ones that came back under a new id) take part from the next round on."""
        return self.end_query(self.begin_query())

    def open(self) -> None:
        """Wait for the nodes and query them while the untouched model is evaluated (round 0)."""
        self.wait_for_nodes()
        self._pending = self.begin_query()

    def opened(self) -> None:
        if not self.end_query(self._pending) and all(n in self.hosted_by for n in self.grid.get_node_ids()):
            raise NodeFailure("the connected SuperNodes host none of this federation's clients (check their node config)")

    # ------------------------------------------------------------------ messages

    def _train_message(self, round_: int, c: int, down: ProtocolMessage) -> Message:
        arrays, meta = encode_payload(down.arrays)
        task = {"config": self.config_yaml, **down.meta, **meta}
        message = Message(
            RecordDict({ADAPTER: to_record(arrays), CONFIG: ConfigRecord(task)}),
            dst_node_id=self.host[c],
            message_type="train",
            group_id=str(round_),
            ttl=self.config.flower.round_timeout + 60,
        )
        self._sent[c] = message_bytes(message)
        self._wire[task["client"]]["wire_bytes_down"] += self._sent[c]
        return message

    def _decode(self, c: int, reply: Message) -> ProtocolMessage:
        client_id = self.federation.clients[c].client_id
        try:
            stats = dict(reply.content.config_records[RESULT])
            if str(stats["client"]) != client_id:
                raise UpdateRejected(f"reply is for client {stats['client']}, expected {client_id}")
            payload = decode_payload(from_record(reply.content.array_records[ADAPTER]), str(stats.pop("dtype")), stats.pop("dtypes", None))
            app_seconds = float(stats.pop(APP_SECONDS, 0.0))
        except UpdateRejected:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise UpdateRejected(f"client {client_id}: malformed reply from node {self.host[c]}: {type(err).__name__}: {err}") from None
        self._wire[client_id]["wire_bytes_up"] += message_bytes(reply)
        self._wire[client_id]["array_bytes_up"] += array_bytes(payload)
        self._wire[client_id]["time_clientapp_s"] = self._wire[client_id].get("time_clientapp_s", 0.0) + app_seconds
        return ProtocolMessage(payload, stats)

    def _deliver(self, round_: int, wave: dict[int, ProtocolMessage], on_reply) -> dict:
        out: dict = {}
        items = []
        for c, down in wave.items():
            client_id = self.federation.clients[c].client_id
            node = self.host.get(c, self.last_host.get(c))
            wire = self._wire.setdefault(client_id, {"node": None if node is None else str(node), "array_bytes_down": 0, "wire_bytes_down": 0, "array_bytes_up": 0, "wire_bytes_up": 0})
            if c not in self.host:  # sampled all the same: sampling stays the simulator's (docs/flower.md)
                where = f"its SuperNode {node} is not connected" if node is not None else "no connected SuperNode hosts it"
                out[c] = NotSent(f"client {client_id}: {where}")
                continue
            wire["array_bytes_down"] += array_bytes(down.arrays)
            items.append((c, self.host[c], lambda c=c, down=down: self._train_message(round_, c, down)))
        self._sent = {}
        exchange = Exchange(self.grid, items, self.config.flower.round_timeout, per_node=self.config.flower.node_concurrency)
        for c, reply in exchange.wait(on_reply=on_reply).items():
            if c in exchange.roundtrip:
                wire = self._wire[self.federation.clients[c].client_id]
                wire["time_roundtrip_s"] = wire.get("time_roundtrip_s", 0.0) + exchange.roundtrip[c]
            try:
                out[c] = reply if isinstance(reply, Exception) else self._decode(c, reply)
            except UpdateRejected as err:
                out[c] = err
            if isinstance(out[c], Unconfirmed):  # no reply confirms it arrived: not counted as sent
                wire = self._wire[self.federation.clients[c].client_id]
                wire["array_bytes_down"] -= array_bytes(wave[c].arrays)
                wire["wire_bytes_down"] -= self._sent.get(c, 0)
                wire["wire_bytes_down_unconfirmed"] = wire.get("wire_bytes_down_unconfirmed", 0) + self._sent.get(c, 0)
        return out

    # ------------------------------------------------------------------ the executor's hooks

    def run(self, round_, conversations, progress):
        self.refresh_hosts()
        self._wire = {}
        self._secure = None
        if self.config.flower.secure_aggregation != "off":  # the round's updates go through SecAgg+ (secagg.py)
            from flexfed.engines.flower.secagg import secure_round

            return secure_round(self, round_, conversations)
        task = progress.add_task(f"round {round_} clients", total=len(conversations)) if progress else None
        advance = (lambda _key: progress.advance(task)) if progress else None
        out = converse(conversations, lambda wave: self._deliver(round_, wave, advance))
        if progress:
            progress.remove_task(task)
        return out

    def annotate(self, record: dict) -> None:
        everyone = record["clients"] + record["clients_failed"]
        for r in record["clients"]:
            r.update(self._wire.get(r["id"], {}))
            if "time_roundtrip_s" in r:  # what the client's messages cost beyond its own compute
                r["time_outside_client_s"] = max(0.0, r["time_roundtrip_s"] - r["seconds"])
                # ... split: the ClientApp's handler on the node (compute + decoding/encoding/relay) and Flower's
                # part (transport, the SuperNode's and the ServerApp's polling, task dispatch, any process start)
                r["time_flower_s"] = max(0.0, r["time_roundtrip_s"] - r.get("time_clientapp_s", 0.0))
        for r in record["clients_failed"]:
            r.update({k: v for k, v in self._wire.get(r["id"], {}).items() if not k.endswith("_up") and k != "time_clientapp_s"})
        if self._secure is not None:  # secure aggregation: the protocol, the mean's tolerance, the nodes in the sum
            record["secure_aggregation"] = self._secure
        record["wire_bytes_up"] = sum(r.get("wire_bytes_up", 0) for r in record["clients"])
        record["wire_bytes_down"] = sum(r.get("wire_bytes_down", 0) for r in everyone)


class FlowerEngine(Runner):
    """The runner with its clients on SuperNodes (``FlowerExecutor``)."""

    resume_hint = "submit with --run-config 'resume=true' to continue it or 'overwrite=true' to start over"

    def __init__(self, config: RunConfig, grid: Grid):
        check_supported(config)
        super().__init__(config, FlowerExecutor(grid))

    grid = property(lambda self: self.executor.grid, lambda self, grid: setattr(self.executor, "grid", grid))


def config_from_run_config(run_config) -> RunConfig:
    """The flexfed config of a Flower run.

    ``flexfed-config`` holds the config as YAML text (``flexfed flower app`` writes it there);
    otherwise ``flexfed-config-file`` names a YAML file on the SuperLink's machine or a packaged
    config. ``flexfed-set`` holds ``key=value`` overrides separated by ``;``.
    """
    import yaml

    text = str(run_config.get("flexfed-config", "") or "")
    overrides = [s.strip() for s in str(run_config.get("flexfed-set", "") or "").split(";") if s.strip()]
    if text.strip():
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise config_lib.ConfigError(f"run config flexfed-config: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise config_lib.ConfigError("run config flexfed-config: expected a YAML mapping")
        return config_lib.validate(config_lib.apply_overrides(raw, overrides), source="run config flexfed-config")
    source = str(run_config.get("flexfed-config-file", "") or "")
    if not source:
        raise config_lib.ConfigError("the Flower run config sets neither flexfed-config nor flexfed-config-file")
    return config_lib.load_config(source, overrides)


def run_on_grid(grid: Grid, config: RunConfig, resume: bool = False, overwrite: bool = False, show_progress: bool = False) -> Path:
    engine = FlowerEngine(config, grid)
    return engine.run(resume=resume, overwrite=overwrite, show_progress=show_progress)


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("flexfed").setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


app = ServerApp()


def serve_run(grid: Grid, run_config) -> Path:
    """A submitted run, start to end: the config and the run directory are checked before any
    wait, and a bad one fails with one log line that says what to fix (``flwr log`` shows it;
    ``flwr ls`` lists the run as failed). The run directory ends with its report, as
    ``flexfed run``'s does."""
    from flexfed.report import write_report
    from flexfed.runner import RunExists

    try:
        config = config_from_run_config(run_config)
        engine = FlowerEngine(config, grid)
        engine.check_run_dir(bool(run_config.get("resume", False)), bool(run_config.get("overwrite", False)))
    except (config_lib.ConfigError, RunExists, ValueError) as err:
        log.error("run refused: %s", "; ".join(line.strip() for line in str(err).splitlines() if line.strip()))
        raise SystemExit(1) from None
    run_dir = engine.run(resume=bool(run_config.get("resume", False)), overwrite=bool(run_config.get("overwrite", False)), show_progress=False)
    log.info("run directory: %s (report: %s)", run_dir, write_report([run_dir]) / "summary.md")
    return run_dir


@app.main()
def main(grid: Grid, context: Context) -> None:
    _setup_logging()
    serve_run(grid, context.run_config)
