"""The Flower ClientApp: a SuperNode trains the clients it hosts with flexfed's ``LocalTrainer``.

Two message types:

- ``query``: the ServerApp lists the federation's client ids and asks which of them this node
  hosts. The node answers from its node config (``flower-supernode --node-config``):
  ``clients="id1,id2"`` names them, or ``partition-id=P num-partitions=N`` takes every client
  whose index is P modulo N (Flower's simulation engine sets these two itself).
- ``train``: train one hosted client from the method's payload in the message (``Link.start``:
  e.g. FFA-LoRA's B with the A every party derives from the seed; for FLoRA the cumulative update
  to merge into the node's base, then a fresh LoRA), with the seed the server derived for this
  round and client, and reply with the method's payload of the trained adapter.

Every train message carries the run's resolved config (YAML), so a node needs nothing but
flexfed and, for file-based data, ``data.path`` (or ``data-path`` in its node config). The
model, tokenizer and federation are built once per process and config.

Where the training happens: with ``trainer-socket=PATH`` in the node config (what ``flexfed
flower supernode`` sets) the ClientApp relays the arrays to that node's long-lived trainer
worker (``worker.py``) and never imports PyTorch; otherwise it trains in its own process, which
suits Flower's simulation engine (a Ray actor keeps its process, and so its model, between
messages) but costs a model load per message on a plain ``flower-supernode``.

Optional node config: ``data-path`` (overrides ``data.path``), ``device`` (overrides
``device``, e.g. ``cuda:1``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Mapping

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger(__name__)

CONFIG = "flexfed"  # ConfigRecord: run config, client, round, seed, payload meta
ADAPTER = "adapter"  # ArrayRecord: the method's payload (LoRA factors, B alone, Fed-SB's core, ...)
RESULT = "result"  # ConfigRecord of a reply: client, training statistics, payload dtype
SOCKET_KEY = "trainer-socket"
META_KEYS = ("modules", "ranks", "dtype")


class NodeConfigError(ValueError):
    pass


def hosted_clients(client_ids: list[str], node_config: Mapping) -> list[str]:
    """The clients this node hosts, from its node config."""
    if "clients" in node_config:
        wanted = [c.strip() for c in str(node_config["clients"]).split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(client_ids))
        if unknown:
            raise NodeConfigError(f"node config names clients that are not in this federation: {unknown[:5]}")
        return wanted
    if "partition-id" in node_config and "num-partitions" in node_config:
        pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
        if not 0 <= pid < num:
            raise NodeConfigError(f"partition-id={pid} is not in [0, num-partitions={num})")
        return [c for i, c in enumerate(client_ids) if i % num == pid]
    raise NodeConfigError('the node config must set clients="ID,..." or partition-id=P num-partitions=N')


# ----------------------------------------------------------------------------- node-side training


@dataclass
class NodeRuntime:
    """What a node builds once per config: tokenizer, federation and (on first training) the trainer."""

    config: object
    tokenizer: object
    federation: object
    _trainer: object = None
    _link: object = None

    @property
    def trainer(self):
        if self._trainer is None:
            import torch

            from flexfed.client import LocalTrainer
            from flexfed.client import pick_device
            from flexfed.lora import target_shapes
            from flexfed.models import load_model
            from flexfed.server import Link

            c = self.config
            model = load_model(c.model.name, dtype=getattr(torch, c.model.dtype), seed=c.seed)
            self._link = Link.from_config(c, target_shapes(model, c.lora.target_modules))
            self._trainer = LocalTrainer(model, c.lora, c.training, self.tokenizer.pad_token_id, pick_device(c.device))
        return self._trainer

    @property
    def link(self):
        """This node's end of the exchange (the method, the model's shapes, the run seed)."""
        self.trainer  # noqa: B018 - built with the trainer, from the model's shapes
        return self._link

    def shard(self, client_id: str):
        for shard in self.federation.clients:
            if shard.client_id == client_id:
                return shard
        raise NodeConfigError(f"client {client_id!r} is not in this federation")


_RUNTIMES: dict[str, NodeRuntime] = {}


def runtime(config_yaml: str, node_config: Mapping) -> NodeRuntime:
    """The node's runtime for this config: built on first use, then reused by this process."""
    import yaml

    from flexfed import config as config_lib

    config = config_lib.validate(yaml.safe_load(config_yaml), source="the server's message")
    update = {}
    if node_config.get("data-path"):
        update["data"] = config.data.model_copy(update={"path": str(node_config["data-path"])})
    if node_config.get("device"):
        update["device"] = str(node_config["device"])
    config = config.model_copy(update=update) if update else config
    # Only what changes the model, the data, the training or the payloads decides whether to rebuild.
    fields = {k: True for k in ("seed", "device", "model", "data", "lora", "training", "eval")}
    relevant = config.model_dump(mode="json", include={**fields, "federation": {"method", "method_options"}})
    key = hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()
    if key not in _RUNTIMES:
        from flexfed.federation import build_federation
        from flexfed.models import load_tokenizer

        tokenizer = load_tokenizer(config.model.name)
        _RUNTIMES.clear()  # one run at a time: do not keep an old model alive
        _RUNTIMES[key] = NodeRuntime(config, tokenizer, build_federation(config, tokenizer))
    return _RUNTIMES[key]


def train_client(config_yaml: str, node_config: Mapping, client_id: str, seed: int, arrays: Mapping, meta: Mapping) -> tuple[dict, dict]:
    """Train ``client_id`` from the payload in ``arrays`` (``meta``: its dtype and the client's
    modules and ranks); NumPy arrays in, (stats, arrays of the update's payload) out."""
    from flexfed.engines.flower.wire import decode_payload, encode_payload
    from flexfed.federation import client_examples

    rt = runtime(config_yaml, node_config)
    if client_id not in hosted_clients([c.client_id for c in rt.federation.clients], node_config):
        raise NodeConfigError(f"client {client_id} is not hosted by this node")
    payload = decode_payload(arrays, str(meta["dtype"]))
    ranks = {str(m): int(r) for m, r in zip(meta["modules"], meta["ranks"], strict=True)}
    link, trainer = rt.link, rt.trainer
    if link.aggregator.merges_into_base:
        # FLoRA on Flower: the payload is the whole cumulative update (see serverapp), merged here.
        trainer.set_base_update(link.receive(payload, ranks) if payload else None)
    else:
        trainer.set_base_update(None)  # a trainer that served FLoRA before gets its W0 back
    shard = rt.shard(client_id)
    began = time.perf_counter()
    examples = client_examples(rt.config, rt.tokenizer, rt.federation, shard)
    start = link.start(payload, ranks, seed)
    # The method's local rule (HetLoRA's self-pruning) may send back lower ranks; the server checks them.
    result = trainer.train(client_id, start, examples, seed, link.aggregator.trainable, link.common(ranks), link.aggregator.local_rule())
    out, out_meta = encode_payload(link.send(result.adapter, ranks))
    stats = {
        "client": client_id,
        "num_examples": int(result.num_examples),
        "loss": float(result.loss),
        "losses": [float(x) for x in result.losses],
        "tokens": int(result.tokens),
        "seconds": float(result.seconds),
        "node_seconds": time.perf_counter() - began,
        **out_meta,
    }
    return stats, out


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
    from flexfed.engines.flower import wire

    cfg = msg.content.config_records[CONFIG]
    node_config = {k: v for k, v in context.node_config.items() if k != SOCKET_KEY}
    meta = {k: cfg[k] for k in META_KEYS}
    socket_path = context.node_config.get(SOCKET_KEY)
    if socket_path:
        from flexfed.engines.flower import worker

        header = {
            "op": "train",
            "config": str(cfg["config"]),
            "client": str(cfg["client"]),
            "seed": int(cfg["seed"]),
            "meta": meta,
            "node_config": node_config,
        }
        answer, blobs = worker.request(str(socket_path), header, wire.record_to_blobs(msg.content.array_records[ADAPTER]))
        stats, record = answer["stats"], wire.blobs_to_record(blobs)
    else:
        adapter = wire.from_record(msg.content.array_records[ADAPTER])
        stats, arrays = train_client(str(cfg["config"]), node_config, str(cfg["client"]), int(cfg["seed"]), adapter, meta)
        record = wire.to_record(arrays)
    return Message(RecordDict({ADAPTER: record, RESULT: ConfigRecord(stats)}), reply_to=msg)
