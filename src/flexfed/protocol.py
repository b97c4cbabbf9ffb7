"""What a family of federated tuning exchanges, as hooks the runner calls (``Protocol``).

The runner (``flexfed.runner``) owns the round: sampling, the loop, evaluation, checkpoints,
metrics and resume. An executor (in-process, Flower) carries messages between the server and
the clients. A protocol says what travels and what each side does with it:

- ``conversation(state, round, client, shares_base)``: the server's side of one client's round,
  a generator that yields each ``Message`` to send, receives the client's reply to it, and
  returns the client's checked update. One exchange (send the global, get an update) is the
  weights protocol's; a split or zeroth-order protocol may hold many within one round.
- ``serve(setup, messages)``: the client's side, on the node that hosts it: what it computes
  from each message on its private data, and the reply it sends back (statistics in ``meta``).
- ``combine(state, round, updates, weights)``: the server's new state from the round's updates.
- ``evaluated(trainer, state)``: the model to evaluate, built on the trainer's (a context).

Bytes are those of the tensors in the messages actually sent (``Message.nbytes``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Generator, Mapping, Sequence

from flexfed.aggregation.base import Payload, payload_bytes


@dataclass
class Message:
    """One message of a conversation: named tensors and JSON-able metadata (numbers, strings, lists)."""

    arrays: Payload = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return payload_bytes(self.arrays)


Conversation = Generator[Message, Message, object]  # yields what it sends, receives replies, returns the update


# The methods that are protocols of their own (not a weights-protocol aggregator), by the
# ``module:Class`` that implements them; imported only when a run selects one.
FAMILIES: dict[str, str] = {
    "kd": "flexfed.kd.protocol:KDProtocol",  # KD-FedLLM: distributions on a public proxy set
    "fedkseed": "flexfed.zo:FedKSeed",
    "fedkseed-pro": "flexfed.zo:FedKSeedPro",
    "split": "flexfed.split.protocol:SplitProtocol",  # Split-FedLLM (docs/split.md)
}


def family_of(method: str) -> str | None:
    """The ``module:Class`` of ``method``'s protocol, or None when it exchanges weights."""
    return FAMILIES.get(method)


class Protocol(ABC):
    """A federated tuning protocol; see the module docstring for the hooks."""

    def check_executor(self, executor) -> None:
        """Refuse (``ValueError``) an executor this protocol cannot run on."""

    @abstractmethod
    def initial_state(self):
        """The round-0 server state (``server.ServerState``)."""

    def resume(self, state) -> None:
        """Take up ``state`` (a fresh or resumed run) before its next round."""

    def stage(self, round_: int) -> str | None:
        """A label of what ``round_`` does, recorded in its metrics line (None: none)."""
        return None

    def sync(self, trainer, state) -> None:
        """Bring a client trainer that shares the server's process to ``state``'s global model
        (the in-process executor calls it before each round)."""

    @abstractmethod
    def conversation(self, state, round_: int, client: int, shares_base: bool) -> Conversation:
        """The server's side of client ``client``'s round (``shares_base``: its trainer is the
        server's own, brought to the global model by ``sync``)."""

    @abstractmethod
    def serve(self, setup, messages: Sequence[Message], on_done: Callable[[], None] | None = None) -> list[Message | Exception]:
        """The clients' side: each message's reply, or the error that failed that client. The
        ``meta`` of a conversation's last reply holds the client's statistics, which go into its
        metrics record: ``num_examples``, ``loss``, ``tokens``, ``seconds`` and the cost fields
        (``flops``, ``flops_analytic``, ``peak_memory_bytes``, ... see ``flexfed.cost``)."""

    @abstractmethod
    def combine(self, state, round_: int, updates: Sequence, weights: Sequence[float]):
        """The state after ``round_`` from the updates of the clients that reported."""

    def round_fields(self, state, round_: int, reported: Sequence[str]) -> dict:
        """Fields of ``round_``'s metrics line about the server's side (``reported``: the ids of
        the clients whose updates were combined, in order)."""
        return {}

    @abstractmethod
    def evaluated(self, trainer, state) -> ContextManager:
        """A context that gives the model ``state`` stands for, built on ``trainer``'s (its base
        and adapter), to evaluate."""

    def client_fields(self, round_: int, client: int, update) -> dict:
        """Protocol-specific fields of a client's metrics record (``update`` None: it failed)."""
        return {}

    def save(self, run_dir, state) -> None:
        """Write what a finished round leaves besides the checkpoint (e.g. its adapter)."""


@dataclass
class Outcome:
    """One client's finished conversation: its update and the statistics of its last reply."""

    update: object
    stats: Mapping
    bytes_down: int
    bytes_up: int


@dataclass
class Failure:
    error: Exception
    bytes_down: int  # of the messages a reply confirmed the client received
    bytes_unconfirmed: int = 0  # of the last message, when no reply confirms it arrived


class Unconfirmed(Exception):
    """No reply confirms that the client received the message (it was never sent, or its node
    never answered): the message's bytes are not counted as sent."""


Deliver = Callable[[dict[int, Message]], Mapping[int, "Message | Exception"]]


def converse(conversations: Mapping[int, Conversation], deliver: Deliver) -> dict[int, Outcome | Failure]:
    """Drive every client's conversation to its end, one wave of messages at a time.

    ``deliver`` sends a wave (client -> message) and returns each reply or the error that stands
    for it (missing: no reply, ``Unconfirmed``). A client whose reply is an error, or whose conversation raises
    (its update is refused), fails alone; the others go on."""
    out: dict[int, Outcome | Failure] = {}
    down = dict.fromkeys(conversations, 0)
    up = dict.fromkeys(conversations, 0)
    stats: dict[int, Mapping] = {}
    pending: dict[int, Message] = {}

    def step(c: int, reply: Message | None) -> None:
        try:
            message = next(conversations[c]) if reply is None else conversations[c].send(reply)
        except StopIteration as done:
            out[c] = Outcome(done.value, stats.get(c, {}), down[c], up[c])
        except Exception as err:  # noqa: BLE001 - anything wrong with one client only drops that client
            out[c] = Failure(err, down[c])
        else:
            down[c] += message.nbytes
            pending[c] = message

    for c in conversations:
        step(c, None)
    while pending:
        wave, pending = pending, {}
        replies = deliver(wave)
        for c in wave:
            reply = replies.get(c, Unconfirmed("no reply"))
            if isinstance(reply, Exception):
                unconfirmed = wave[c].nbytes if isinstance(reply, Unconfirmed) else 0
                out[c] = Failure(reply, down[c] - unconfirmed, unconfirmed)
                conversations[c].close()
                continue
            up[c] += reply.nbytes
            stats[c] = reply.meta
            step(c, reply)
    return out

