"""A round under secure aggregation on Flower: Flower's SecAgg+ carries the updates, the server
recovers only their weighted mean (``flower.secure_aggregation: secaggplus``; docs/flower.md).

Transport only: what the mean is made of and how it becomes the global adapter is
``flexfed.aggregation.secure`` and the method's own aggregate (``Server.aggregate_mean``).

``secure_round`` replaces the executor's message exchange for one round. The protocol's
conversations give each sampled client's message (its start, as in the plain round); Flower's
``SecAggPlusWorkflow`` then runs its four stages over the Grid (keys, key shares, the masked
vectors, unmasking), driven through a ``LegacyContext`` whose strategy (``_Round``) hands the
workflow one ``FitIns`` per node and receives, from ``aggregate_fit``, the unmasked weighted mean
(every ``FitRes``'s parameters are that one mean; their metrics carry each client's training
statistics as JSON). Every reply the ServerApp receives passes through ``_Recorder``, which counts
its bytes and, with ``flower.secaggplus.audit``, keeps its arrays.

Weights: each node sends n_i x_i with n_i the weight the server assigned (the client's shard
size), quantised against ``max_weight`` = the round's largest n_i, and the workflow divides the
sum by Σ n_i over the nodes that finished. The mean is within ``aggregation.secure.tolerance`` of
the exact weighted mean.

Departures from the plain round:

- SecAgg+ masks one vector per SuperNode: a node hosting several of the round's clients carries
  the first; the others fail that round with an error that says so.
- No update is decoded or checked one by one (``Server.check_update``): only the recovered
  aggregate is bounded. A client's statistics (loss, tokens, seconds) still travel in the clear.
- A client whose node fails (error, deadline) drops out as SecAgg+ allows (its masks are rebuilt
  from the other nodes' shares); fewer than the reconstruction threshold, or fewer than two nodes,
  fail the whole round (every sampled client is left out, the global is unchanged).
- ``bytes_up`` of a client is the masked vector it sent (SecAgg+'s integers, not the float
  payload); ``bytes_up_factored`` beside it is the payload of its factors, which the plain round
  sends. Wire bytes count every message of the four stages.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow

from flexfed.aggregation.secure import DENSE, SecureMean, tolerance
from flexfed.engines.flower import wire
from flexfed.engines.flower.clientapp import APP_SECONDS, SECURE_TASK
from flexfed.protocol import Failure, Outcome

log = logging.getLogger(__name__)


class SecureRoundFailed(RuntimeError):
    """The round's secure aggregation did not produce a mean (too few nodes, too many dropouts)."""


class _Round(Strategy):
    """The strategy SecAgg+'s workflow drives: one FitIns per node in, the unmasked mean out."""

    def __init__(self, grid, fitins: dict[int, FitIns]):
        self.grid, self.fitins = grid, fitins
        self.mean: list[np.ndarray] | None = None
        self.results: dict[int, object] = {}  # node id -> its FitRes (parameters: the mean, never its own)
        self.failures: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, self.grid.run.run_id), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = {proxy.node_id: res for proxy, res in results}
        self.failures = list(failures)
        if results:  # the workflow sets every FitRes's parameters to the one unmasked mean
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _Recorder:
    """The Grid as the workflow sees it: counts the bytes of every message per node and, with an
    audit directory, keeps every array the ServerApp receives (array records and the npy bytes
    inside config records: SecAgg+'s masked vectors)."""

    def __init__(self, grid, audit: Path | None, poll_s: float):
        self.grid, self.audit, self.poll_s = grid, audit, poll_s
        self.sent: dict[int, int] = {}
        self.received: dict[int, int] = {}
        self.masked: dict[int, int] = {}  # node -> bytes of the masked vector it sent
        self.stage = 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            self.sent[m.metadata.dst_node_id] = self.sent.get(m.metadata.dst_node_id, 0) + wire.message_bytes(m)
        replies = self._exchange(messages, timeout)
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                continue
            self.received[node] = self.received.get(node, 0) + wire.message_bytes(r)
            configs = r.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is not None and Key.MASKED_PARAMETERS in configs:
                self.masked[node] = sum(len(b) for b in configs[Key.MASKED_PARAMETERS])
            if self.audit is not None:
                self._keep(node, r.content)
        self.stage += 1
        return replies

    def _exchange(self, messages, timeout):
        """Push, then pull every ``poll_s`` (the executor's) until every reply is in or ``timeout`` has passed (the
        Grid's own ``send_and_receive`` sleeps 3 s between pulls: 4 stages, up to 12 s a round)."""
        pending = {mid for mid in self.grid.push_messages(messages) if mid}
        deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
        replies = []
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pending and time.monotonic() < deadline:
                time.sleep(self.poll_s)
            elif pending:
                break
        return replies

    def _keep(self, node: int, content: RecordDict) -> None:
        self.audit.mkdir(parents=True, exist_ok=True)
        prefix = f"received-stage{self.stage}-node{node}"
        for record_name, record in content.array_records.items():
            for key, value in wire.from_record(record).items():
                np.save(self.audit / f"{prefix}-{record_name}-{key}.npy", value, allow_pickle=False)
        for record_name, record in content.config_records.items():
            for key, value in record.items():
                for i, item in enumerate(value if isinstance(value, list) else [value]):
                    if isinstance(item, bytes):
                        try:
                            array = wire.npy_load(item)
                        except wire.WireError:
                            continue  # key material, ciphertexts: not arrays
                        np.save(self.audit / f"{prefix}-{record_name}-{key}-{i}.npy", array, allow_pickle=False)


def _stats(res, client_id: str, weight: int, round_: int) -> dict:
    """A client's training statistics from its FitRes (JSON). Its vector is in the mean already, so
    statistics that do not parse only cost it its numbers in the metrics line, with a warning."""
    try:
        stats = json.loads(str(res.metrics[SECURE_TASK]))
        for key in ("num_examples", "tokens", "seconds", "loss"):
            float(stats[key])
        return stats
    except (KeyError, TypeError, ValueError) as err:
        log.warning("round %d: client %s sent statistics that do not parse (%s: %s); its vector is in the mean", round_, client_id, type(err).__name__, err)
        return {"client": client_id, "num_examples": weight, "tokens": 0, "seconds": 0.0, "loss": float("nan")}


def secure_round(executor, round_: int, conversations: dict) -> dict:
    """Run ``round_``'s sampled clients through SecAgg+; every client that finished gets the same
    ``SecureMean`` as its update, every other one a ``Failure``."""
    config, federation = executor.config, executor.federation
    server = executor.runner.protocol.server
    sa = config.flower.secaggplus
    out: dict = {}
    downs, chosen = {}, {}  # client -> its message; node -> the client it carries
    for c, conversation in conversations.items():
        client_id = federation.clients[c].client_id
        try:
            downs[c] = next(conversation)
        except Exception as err:  # noqa: BLE001 - as in ``converse``: only this client fails
            out[c] = Failure(err, 0)
            continue
        finally:
            conversation.close()
        node = executor.host.get(c)
        executor._wire[client_id] = {"node": None if node is None else str(node), "array_bytes_down": 0, "wire_bytes_down": 0, "array_bytes_up": 0, "wire_bytes_up": 0}
        if node is None:
            out[c] = Failure(SecureRoundFailed(f"client {client_id}: no connected SuperNode hosts it"), 0)
        elif node in chosen:
            other = federation.clients[chosen[node]].client_id
            out[c] = Failure(SecureRoundFailed(f"client {client_id}: its SuperNode {node} carries client {other} this round; SecAgg+ masks one update per SuperNode"), 0)
        else:
            chosen[node] = c
    weights = {c: federation.clients[c].num_examples for c in chosen.values()}
    max_weight = float(max(weights.values(), default=1))
    mode = server.aggregator.secure_mean
    dense, padded = mode == "dense", mode == "padded"
    fitins, keys = {}, None
    for node, c in chosen.items():
        down = downs[c]
        arrays, meta = wire.encode_payload(down.arrays)
        ranks, modules = server.ranks_of(c), down.meta["modules"]
        secure = {"keys": sorted(arrays), "weight": weights[c], "max_weight": max_weight, "clipping_range": sa.clipping_range}
        if dense:  # FlexLoRA: s(r_i) of each module, for the client's s B A
            secure["dense_scales"] = [server.scale(ranks[m]) for m in modules]
        if padded:  # HetLoRA: the global rank g of each module (its largest served rank, which the global keeps) and s(r_i)/s(g)
            secure["pad_ranks"] = [server.max_ranks[m] for m in modules]
            secure["pad_ratios"] = [server.scale(ranks[m]) / server.scale(server.max_ranks[m]) for m in modules]
        task = {"config": executor.config_yaml, **down.meta, **meta, "secure": secure}
        fitins[node] = FitIns(Parameters([wire.npy_bytes(arrays[k]) for k in secure["keys"]], wire.NPY), {SECURE_TASK: json.dumps(task)})
        executor._wire[federation.clients[c].client_id]["array_bytes_down"] = wire.array_bytes(down.arrays)
        if keys is None:  # the mean's parts: the payload's (one common rank), each module's dense ΔW, or its factors at rank g
            if dense:
                keys = {f"{m}.{DENSE}": tuple(server.shapes[m]) for m in modules}
            elif padded:
                keys = {**{f"{m}.a": (server.max_ranks[m], server.shapes[m][1]) for m in modules},
                        **{f"{m}.b": (server.shapes[m][0], server.max_ranks[m]) for m in modules}}
            else:
                keys = {k: tuple(t.shape) for k, t in down.arrays.items()}
    audit = config.run_dir / "secagg-audit" / f"round-{round_:04d}" if sa.audit else None
    grid = _Recorder(executor.grid, audit, executor.poll_s)
    strategy = _Round(executor.grid, fitins)
    began = time.perf_counter()
    error = None
    if len(chosen) < 2:
        error = SecureRoundFailed(f"SecAgg+ needs at least 2 SuperNodes in a round, {len(chosen)} carried a client")
    else:
        context = Context(run_id=executor.grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round_})
        context.state.array_records[MAIN_PARAMS_RECORD] = wire.to_record({})
        workflow = SecAggPlusWorkflow(sa.num_shares, sa.reconstruction_threshold, max_weight=max_weight, clipping_range=sa.clipping_range,
                                      quantization_range=sa.quantization_range, timeout=config.flower.round_timeout)
        try:
            workflow(grid, LegacyContext(context, strategy=strategy))
        except Exception as err:  # noqa: BLE001 - a round the protocol could not finish leaves every client out
            error = SecureRoundFailed(f"SecAgg+ failed: {type(err).__name__}: {err}")
        if error is None and strategy.mean is None:
            error = SecureRoundFailed(f"SecAgg+ halted (too few nodes answered: fewer than the reconstruction threshold, or below 2); see the ServerApp log")
    seconds = time.perf_counter() - began
    mean = None
    if error is None:
        arrays = strategy.mean
        if len(arrays) != len(keys) or any(a.shape != keys[k] for a, k in zip(arrays, sorted(keys))):
            error = SecureRoundFailed(f"the recovered mean has shapes {[a.shape for a in arrays]}, expected {[keys[k] for k in sorted(keys)]}")
        else:
            reported = [chosen[n] for n in chosen if n in strategy.results]
            payload = {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(sorted(keys), arrays)}
            mean = SecureMean(payload, tuple(federation.clients[c].client_id for c in sorted(reported)), dense=dense, padded=padded)
            if audit is not None:
                audit.mkdir(parents=True, exist_ok=True)
                for k, t in payload.items():
                    np.save(audit / f"mean-{k}.npy", t.numpy(), allow_pickle=False)
    for node, c in chosen.items():
        client_id = federation.clients[c].client_id
        w = executor._wire[client_id]
        w["wire_bytes_down"] = grid.sent.get(node, 0)
        res = strategy.results.get(node) if mean is not None else None
        if res is None:
            why = error or SecureRoundFailed(f"client {client_id}: its SuperNode {node} dropped out of SecAgg+ (no masked vector); its masks were removed")
            out[c] = Failure(why, 0)
            continue
        stats = _stats(res, client_id, weights[c], round_)
        if str(stats.get("client")) != client_id or int(res.num_examples) != weights[c]:
            log.warning("round %d: node %s answered for client %s with weight %s; expected client %s, weight %d (the mean used its weight)",
                        round_, node, stats.get("client"), res.num_examples, client_id, weights[c])
        w["wire_bytes_up"] = grid.received.get(node, 0)
        w["array_bytes_up"] = grid.masked.get(node, 0)
        w["time_clientapp_s"] = float(stats.get(APP_SECONDS, 0.0))
        w["time_roundtrip_s"] = seconds  # the four stages, for every node together
        w["bytes_up_factored"] = int(stats.get("bytes_up_factored", 0))
        out[c] = Outcome(mean, stats, downs[c].nbytes, grid.masked.get(node, 0))
    executor._secure = {"protocol": "secaggplus", "vector": mode, "nodes": len(strategy.results) if mean is not None else 0,
                        "tolerance": tolerance(max(len(strategy.results), 1), sa.clipping_range, sa.quantization_range), "seconds": seconds}
    if error is not None:
        log.warning("round %d: secure aggregation failed: %s", round_, error)
    return out
