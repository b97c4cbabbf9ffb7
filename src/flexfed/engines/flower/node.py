"""A Flower node's side of the protocol: the clients it hosts, and what they compute from a message.

The ClientApp (``clientapp``) calls ``handle`` in its own process, or relays the message to the
node's long-lived trainer worker (``worker``), which calls it there; neither imports the other's
module for it. The node builds its ``Setup`` (tokenizer, federation; the model and trainer on
first training) and the protocol's node end once per process and config.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Mapping

SOCKET_KEY = "trainer-socket"


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


@dataclass
class NodeRuntime:
    setup: object  # flexfed.build.Setup
    _protocol: object = field(default=None)

    @property
    def protocol(self):
        """The protocol's node end, built on first training (it needs the model's shapes)."""
        if self._protocol is None:
            from flexfed.runner import build_protocol

            self._protocol = build_protocol(self.setup, serve=False)
        return self._protocol


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
    # Everything but where a run is written and how it is tracked or transported decides whether to
    # rebuild: a section a new family (or privacy.local) adds counts without being listed here.
    relevant = config.model_dump(mode="json", exclude={"name", "output_dir", "tracking", "flower"})
    key = hashlib.sha256(repr(sorted(relevant.items())).encode()).hexdigest()
    if key not in _RUNTIMES:
        from flexfed.build import Setup

        _RUNTIMES.clear()  # one run at a time: do not keep an old model alive
        _RUNTIMES[key] = NodeRuntime(Setup(config))
    return _RUNTIMES[key]


def handle(config_yaml: str, node_config: Mapping, client_id: str, seed: int, arrays: Mapping, meta: Mapping) -> tuple[dict, dict]:
    """Serve one message to hosted client ``client_id``: NumPy arrays and the message's metadata
    (``dtype`` of the arrays among it) in; (the reply's metadata, its NumPy arrays) out."""
    from flexfed.engines.flower.wire import decode_payload, encode_payload
    from flexfed.protocol import Message

    rt = runtime(config_yaml, node_config)
    if client_id not in hosted_clients([c.client_id for c in rt.setup.federation.clients], node_config):
        raise NodeConfigError(f"client {client_id} is not hosted by this node")
    began = time.perf_counter()
    meta = dict(meta)
    message = Message(decode_payload(arrays, str(meta.pop("dtype")), meta.pop("dtypes", None)), {**meta, "client": client_id, "seed": seed, "shares_base": False})
    (reply,) = rt.protocol.serve(rt.setup, [message])
    if isinstance(reply, Exception):
        raise reply
    out, out_meta = encode_payload(reply.arrays)
    return {**reply.meta, "node_seconds": time.perf_counter() - began, **out_meta}, out
