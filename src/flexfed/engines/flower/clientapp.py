"""The Flower ClientApp: a SuperNode trains the clients it hosts with flexfed's ``LocalTrainer``.

Two message types:

- ``query``: the ServerApp lists the federation's client ids and asks which of them this node
  hosts. The node answers from its node config (``flower-supernode --node-config``):
  ``clients="id1,id2"`` names them, or ``partition-id=P num-partitions=N`` takes every client
  whose index is P modulo N (Flower's simulation engine sets these two itself).
- ``train``: one message of a hosted client's conversation with the server (``node.handle``: the
  protocol's ``serve``; for the weights protocol, train from the method's payload, e.g. FFA-LoRA's
  B with the A every party derives from the seed, or FLoRA's cumulative update merged into the
  node's base and a fresh LoRA), with the seed the server derived for this round and client,
  and reply with the protocol's reply (the method's payload of the trained adapter).

Every train message carries the run's resolved config (YAML), so a node needs nothing but
flexfed and, for file-based data, ``data.path`` (or ``data-path`` in its node config). The
model, tokenizer and federation are built once per process and config.

Where the training happens: in the process that calls the ClientApp (``node.handle``), which
suits every process that lives longer than one message: the resident ClientApp that ``flexfed
flower supernode`` runs next to ``flower-supernode --isolation process`` (``resident.py``), and
Flower's simulation engine (a Ray actor keeps its process, and so its model, between messages).
With ``trainer-socket=PATH`` in the node config (``flexfed flower supernode --isolation
subprocess``) the ClientApp, then a fresh ``flwr-clientapp`` process per message, relays the
arrays to that node's long-lived trainer worker (``worker.py``) and never imports PyTorch. On a
plain ``flower-supernode`` it trains in its own short-lived process: a model load per message.

Optional node config: ``data-path`` (overrides ``data.path``), ``device`` (overrides
``device``, e.g. ``cuda:1``).

Fault injection, for tests: ``FLEXFED_FAULT_LATE_REPLY="ROUND:SECONDS"`` in the environment of
the process that runs the ClientApp (e.g. one ``flexfed flower supernode`` started with it: its
resident inherits it) makes it hold its reply to every train message of round ROUND for SECONDS
before sending it, as a slow node would. It is read from that process's environment only,
never from a message, the run config or the node config, so no remote party can set it; unset
(the default) it does nothing.

Secure aggregation (``flower.secure_aggregation: secaggplus``; ``secagg.py`` has the ServerApp's
side): the messages of a SecAgg+ round carry its stage, and ``secure_mod`` hands those to Flower's
``secaggplus_mod``, which answers the key stages itself and, in the stage that collects the
masked vectors, calls ``train`` with a legacy ``FitIns``. ``train`` then trains as above and
replies with a ``FitRes``: its vector is the client's payload (FlexLoRA with
``flower.secaggplus.dense``: its dense ΔW = s B A per matrix, ``aggregation.secure.dense_arrays``;
HetLoRA: its factors zero-padded to the global rank, ``padded_arrays``),
its ``num_examples`` the weight the server assigned, and its metrics the training statistics
(JSON, in the clear); the mod quantises and masks the vector and drops the arrays before anything
leaves the node. Every other message passes the mod untouched.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flexfed.engines.flower.node import SOCKET_KEY, NodeConfigError, hosted_clients  # noqa: F401  (part of this module's interface)

log = logging.getLogger(__name__)

CONFIG = "flexfed"  # ConfigRecord: run config, client, seed, and the protocol's message metadata
ADAPTER = "adapter"  # ArrayRecord: the message's tensors (LoRA factors, B alone, Fed-SB's core, ...)
RESULT = "result"  # ConfigRecord of a reply: the reply's metadata (client, training statistics), its dtype
APP_SECONDS = "clientapp_seconds"  # in RESULT: seconds the train handler took on the node


SECURE_TASK = "flexfed"  # key of a secure round's FitIns config (and FitRes metrics): the task (stats) as JSON
FAULT_LATE_REPLY = "FLEXFED_FAULT_LATE_REPLY"  # fault injection (tests): "ROUND:SECONDS", from this process's environment only


def fault_delay(round_: str) -> float:
    """Seconds to hold the reply to a train message of round ``round_`` (its group id): the fault
    that ``FLEXFED_FAULT_LATE_REPLY`` injects, 0 without it."""
    import os

    spec = os.environ.get(FAULT_LATE_REPLY, "")
    if not spec:
        return 0.0
    try:
        target, seconds = spec.split(":")
        return float(seconds) if target.strip() == str(round_) else 0.0
    except ValueError:
        raise ValueError(f'{FAULT_LATE_REPLY}={spec!r}: expected "ROUND:SECONDS"') from None


# ----------------------------------------------------------------------------- the ClientApp


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its stage);
    every other message goes straight to the handlers."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_mod])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which of the federation's clients (listed in the message) this node hosts."""
    cfg = msg.content.config_records[CONFIG]
    hosted = hosted_clients([str(c) for c in cfg["clients"]], context.node_config)
    return Message(RecordDict({RESULT: ConfigRecord({"clients": hosted})}), reply_to=msg)


def _serve(task: dict, record, context: Context) -> tuple[dict, object]:
    """Train one hosted client from a task (run config, client, seed, the message's metadata) and
    the arrays it was sent: (its statistics, its reply's ArrayRecord)."""
    from flexfed.engines.flower import wire

    node_config = {k: v for k, v in context.node_config.items() if k != SOCKET_KEY}
    meta = {k: v for k, v in task.items() if k not in ("config", "client", "seed")}
    header = {"config": str(task["config"]), "client": str(task["client"]), "seed": int(task["seed"]), "meta": meta, "node_config": node_config}
    socket_path = context.node_config.get(SOCKET_KEY)
    if socket_path:
        from flexfed.engines.flower import worker

        answer, blobs = worker.request(str(socket_path), {"op": "train", **header}, wire.record_to_blobs(record))
        return answer["stats"], wire.blobs_to_record(blobs)
    from flexfed.engines.flower.node import handle

    stats, arrays = handle(header["config"], node_config, header["client"], header["seed"], wire.from_record(record), meta)
    return stats, wire.to_record(arrays)


@app.train()
def train(msg: Message, context: Context) -> Message:
    began = time.perf_counter()
    if "fitins.config" in msg.content.config_records:  # a SecAgg+ round (through ``secure_mod``)
        return _secure_train(msg, context, began)
    stats, record = _serve(dict(msg.content.config_records[CONFIG]), msg.content.array_records[ADAPTER], context)
    delay = fault_delay(msg.metadata.group_id)
    if delay:
        log.warning("fault injection (%s): holding the reply to client %s's round %s message for %.1f s", FAULT_LATE_REPLY, stats.get("client"), msg.metadata.group_id, delay)
        time.sleep(delay)
    # The handler's own time on the node (training, decoding, encoding, any relay): the ServerApp
    # books the rest of the round trip to Flower (transport, polling, task dispatch).
    stats = {**stats, APP_SECONDS: time.perf_counter() - began}
    return Message(RecordDict({ADAPTER: record, RESULT: ConfigRecord(stats)}), reply_to=msg)


def _secure_train(msg: Message, context: Context, began: float) -> Message:
    """Train for a SecAgg+ round: the vector to mask (the payload, or FlexLoRA's dense ΔW) as a
    FitRes whose ``num_examples`` is the server's weight for the client."""
    import json

    import numpy as np
    from flwr.common import Code, FitRes, Parameters, Status
    from flwr.compat.common import recorddict_compat as compat

    from flexfed.aggregation.secure import dense_arrays, padded_arrays
    from flexfed.engines.flower import wire

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    task = json.loads(str(fitins.config[SECURE_TASK]))
    secure = task.pop("secure")
    sent = wire.blobs_to_record(dict(zip(secure["keys"], fitins.parameters.tensors, strict=True)))
    stats, record = _serve(task, sent, context)
    arrays = wire.from_record(record)
    stats["bytes_up_factored"] = int(sum(a.nbytes for a in arrays.values()))  # what the plain round sends up
    if secure.get("dense_scales") is not None:  # FlexLoRA: s B A per module
        arrays = dense_arrays(arrays, task["modules"], secure["dense_scales"])
    if secure.get("pad_ranks") is not None:  # HetLoRA: both factors at the global rank, B at s(g)
        arrays = padded_arrays(arrays, task["modules"], secure["pad_ranks"], secure["pad_ratios"])
    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
    # SecAgg+ clips (weight / max_weight) * value to ±clipping_range: refuse rather than send a clipped update
    ratio = float(secure["weight"]) / float(secure["max_weight"])
    largest = max((float(np.abs(a).max()) for a in arrays.values() if a.size), default=0.0)
    if not ratio * largest <= secure["clipping_range"]:
        raise ValueError(f"client {task['client']}: a value of {largest:.4g} (x weight ratio {ratio:.3g}) is beyond "
                         f"flower.secaggplus.clipping_range={secure['clipping_range']:g}; SecAgg+ would clip it: raise clipping_range")
    keys = sorted(arrays)
    stats = {**stats, "keys": keys, APP_SECONDS: time.perf_counter() - began}
    fitres = FitRes(Status(Code.OK, ""), Parameters([wire.npy_bytes(arrays[k]) for k in keys], wire.NPY), int(secure["weight"]), {SECURE_TASK: json.dumps(stats)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
