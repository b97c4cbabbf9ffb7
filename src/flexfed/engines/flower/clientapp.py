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


# ----------------------------------------------------------------------------- the ClientApp


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer which of the federation's clients (listed in the message) this node hosts."""
    cfg = msg.content.config_records[CONFIG]
    hosted = hosted_clients([str(c) for c in cfg["clients"]], context.node_config)
    return Message(RecordDict({RESULT: ConfigRecord({"clients": hosted})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    began = time.perf_counter()
    from flexfed.engines.flower import wire

    cfg = msg.content.config_records[CONFIG]
    node_config = {k: v for k, v in context.node_config.items() if k != SOCKET_KEY}
    meta = {k: v for k, v in cfg.items() if k not in ("config", "client", "seed")}
    header = {"config": str(cfg["config"]), "client": str(cfg["client"]), "seed": int(cfg["seed"]), "meta": meta, "node_config": node_config}
    socket_path = context.node_config.get(SOCKET_KEY)
    if socket_path:
        from flexfed.engines.flower import worker

        answer, blobs = worker.request(str(socket_path), {"op": "train", **header}, wire.record_to_blobs(msg.content.array_records[ADAPTER]))
        stats, record = answer["stats"], wire.blobs_to_record(blobs)
    else:
        from flexfed.engines.flower.node import handle

        stats, arrays = handle(header["config"], node_config, header["client"], header["seed"], wire.from_record(msg.content.array_records[ADAPTER]), meta)
        record = wire.to_record(arrays)
    # The handler's own time on the node (training, decoding, encoding, any relay): the ServerApp
    # books the rest of the round trip to Flower (transport, polling, task dispatch).
    stats = {**stats, APP_SECONDS: time.perf_counter() - began}
    return Message(RecordDict({ADAPTER: record, RESULT: ConfigRecord(stats)}), reply_to=msg)
