"""A resident ClientApp: one long-lived process that serves a SuperNode's messages one after another.

Why: in its default mode (``--isolation subprocess``) a Flower 1.41 SuperNode starts
``flower-superexec``, which claims each message's task from the SuperNode's Runtime API and
starts a fresh ``flwr-clientapp`` process for it: a Python start and the imports of flwr (and,
without a trainer worker, of PyTorch and the model) for every message. Under load that start
costs seconds per message, far more than training a client of a small model.

With ``flower-supernode --isolation process`` the SuperNode starts no executor: "a separate
independent process gets created outside of SuperNode" claims the tasks. This module is that
process. It speaks the same Runtime API over HTTP, through the same client and calls that
Flower's ``flower-superexec`` and ``flwr-clientapp`` use (``AcquireTask``; then, with the
task's token, ``PullTaskInput``, ``PullMessages``/``PullObject``/``ConfirmMessageReceived``,
``PushMessages``/``PushObject``, ``PushTaskOutput``, and ``SendTaskHeartbeat`` while the task
runs), but it calls flexfed's ClientApp in its own process, task after task. The ClientApp then
trains in-process (``node.handle``), so the model stays loaded and nothing is relayed.

Only flexfed's ClientApp is served: a task of a run whose FAB names another ClientApp gets an
error reply that says so (such a SuperNode needs Flower's own executor: ``flexfed flower
supernode --isolation subprocess`` or a plain ``flower-supernode``). ``flexfed flower
supernode`` starts this process next to ``flower-supernode --isolation process`` and restarts
it if it dies; a task it was serving then fails by Flower's own heartbeat expiry.

The Runtime API listens on the loopback. ``--auth-secret-file`` names the secret that
``flower-supernode --superexec-auth-secret-file`` was given: claims (``AcquireTask``) are then
signed, so no other local process can take this node's messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

POLL_S = 0.05  # seconds between claims while idle: a loopback HTTP call, cheap next to a message
PULL_BACKOFF_S = (0.02, 0.5)  # first and longest wait for a message object the SuperNode has not pulled yet
COMPONENT = "flwr-clientapp"  # what the Runtime API's version check is told this process is


class Stopped(BaseException):
    """SIGTERM/SIGINT, or the supervising process is gone: leave the loop. A ``BaseException``, so
    that serving a task, which turns any ``Exception`` into an error reply, lets it through (the
    task in flight is reported as failed on the way out)."""


def _retry_invoker():
    """Retry transport errors a few times, and nothing else. Flower's own HTTP retry policy
    (``make_simple_http_retry_invoker``) is made for a process that lives one task: on a 401 it
    sends itself SIGINT, and on a 403 (the run stopped) it raises a ``BaseException``; either
    would end this process instead of the one task."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    return RetryInvoker(lambda: exponential(base_delay=0.2, max_delay=2.0), httpx.TransportError, max_tries=5, max_time=30.0)


def _runtime_client(address: str, interceptors: list, root_certificates: str | None):
    from flwr.supercore.runtime import RuntimeHttpClient

    insecure = root_certificates is None
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=_retry_invoker(),
    )


def _heartbeat_fn(client, lost: threading.Event):
    """A task heartbeat that reports failure instead of raising SIGINT, as Flower's own
    (``make_task_heartbeat_fn_http``) does: that would end this long-lived process, not the task."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        if not res.success:
            lost.set()  # the SuperNode dropped the task (its token expired); the push will say so
        return True

    return beat


def pull_input(client, counts: dict | None = None):
    """The claimed task's message, context, run and FAB, as Flower's ``flwr-clientapp`` pulls them
    (``run_clientapp.pull_task_input``), with one difference: a short retry for the message's
    objects. The SuperNode makes a task claimable before it has pulled the message's objects
    from the SuperLink, and Flower waits 1 s, then 2 s, 4 s... for an object not there yet; a
    ``flwr-clientapp`` that takes seconds to start rarely asks early, a resident process always does."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_confirm_message_received_fn_protobuf, make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    counts = {} if counts is None else counts  # filled in: PullObject calls, and those that found the object not there yet
    counts.update(calls=0, waits=0)

    res = client.PullTaskInput(PullTaskInputRequest())  # activates the task
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, run.run_id, context.node_id
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    tree = pulled.message_object_trees[0]
    node = Node(node_id=context.node_id)
    fetch = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)

    def counted(object_id: str) -> bytes:
        counts["calls"] += 1
        try:
            return fetch(object_id)
        except ObjectUnavailableError:
            counts["waits"] += 1
            raise

    message = pull_and_inflate_object_from_tree(
        tree,
        counted,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=PULL_BACKOFF_S[0], backoff_cap=PULL_BACKOFF_S[1],
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message does not carry its own id
    return message, context, run, fab


def clientapp_of(fab) -> str:
    """The ClientApp a FAB names (``[tool.flwr.app.components] clientapp``)."""
    from flwr.common.config import get_fab_config

    return str(get_fab_config(fab.content).get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp", ""))


class Resident:
    """Claims ClientApp tasks from a SuperNode's Runtime API and serves each in this process."""

    def __init__(self, address: str, root_certificates: str | None = None, auth_secret: bytes | None = None, poll_s: float = POLL_S):
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor

        self.address = address
        self.root_certificates = root_certificates
        self.poll_s = poll_s
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        self.claims = _runtime_client(address, interceptors, root_certificates)
        self.served = 0
        self.stop = threading.Event()

    def acquire(self):
        """One claim: ``(token, task)``, or None when no ClientApp task is pending."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        res = self.claims.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if res.HasField("task") and res.token:
            return res.token, res.task
        return None

    def serve_task(self, token: str, task) -> str:
        """Serve one claimed task as ``flwr-clientapp`` would, in this process; returns its sub-status."""
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        from flexfed.engines.flower import clientapp
        from flexfed.engines.flower.project import CLIENTAPP

        began, claimed_at = time.perf_counter(), time.time()
        client = _runtime_client(self.address, [RuntimeVersionHttpInterceptor(component_name=COMPONENT), RuntimeTokenHttpInterceptor(token)], self.root_certificates)
        lost = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, lost))
        heartbeat.start()
        message = context = reply = None
        pulled, counts = began, {}
        status, details = SubStatus.FAILED, "the resident ClientApp stopped before the task finished"
        try:
            message, context, run, fab = pull_input(client, counts)
            pulled = time.perf_counter()
            wanted = clientapp_of(fab)
            if wanted != CLIENTAPP:
                # The FAB's own ClientApp would have to be installed and imported: not in this process.
                raise LookupError(f"this SuperNode serves only flexfed's ClientApp ({CLIENTAPP}); run {run.run_id} names {wanted or 'none'}: "
                                  "start this node with `flexfed flower supernode --isolation subprocess` or as a plain flower-supernode")
            reply = clientapp.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - one failed task is an error reply, not the end of this process
            log.exception("task %d failed", task.task_id)
            details = f"{type(err).__name__}: {err}"
            if message is not None:
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(err, LookupError) else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            served = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as err:  # noqa: BLE001
                log.error("task %d: the reply could not be pushed%s: %s", task.task_id, " (the SuperNode dropped the task)" if lost.is_set() else "", err)
                status, details = SubStatus.FAILED, f"reply not pushed: {err}"
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as err:  # noqa: BLE001 - the SuperNode expires a task it hears no more of
                log.error("task %d: its status could not be pushed: %s", task.task_id, err)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        if message is not None:
            # The message's creation time is the ServerApp's clock: the first figure is exact only on one machine.
            log.info("task %d (run %d, %s): claimed %.2f s after the message was created; pulled in %.2f s (%d object requests, %d not there yet), "
                     "served in %.2f s, pushed in %.2f s", task.task_id, task.run_id, message.metadata.message_type, claimed_at - message.metadata.created_at,
                     pulled - began, counts.get("calls", 0), counts.get("waits", 0), served - pulled, time.perf_counter() - served)
        self.served += 1
        return status

    def serve_forever(self) -> None:
        """Claim and serve tasks until ``stop`` is set; Runtime API outages are waited out."""
        import httpx

        waited = False
        while not self.stop.is_set():
            try:
                claimed = self.acquire()
            except (httpx.TransportError, httpx.HTTPStatusError) as err:
                if not waited:
                    log.warning("the SuperNode's Runtime API at %s is not answering (%s); retrying", self.address, err)
                waited = True
                self.stop.wait(1.0)
                continue
            if waited:
                log.info("the SuperNode's Runtime API at %s answers", self.address)
                waited = False
            if claimed is None:
                self.stop.wait(self.poll_s)
                continue
            self.serve_task(*claimed)

    def close(self) -> None:
        self.stop.set()
        self.claims.close()


def warm_up() -> threading.Thread:
    """Import the heavy libraries in the background so that the first message is quick."""

    def work():
        import flexfed.engines.flower.node  # noqa: F401
        import flexfed.runner  # noqa: F401

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def _watch_parent(parent_pid: int) -> None:
    """End this process (SIGTERM to itself) once the supervisor is gone, even mid-task: a
    resident left behind would hold the model's memory and claim nothing."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexfed.engines.flower.resident", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (flower-supernode --port)")
    parser.add_argument("--root-certificates", help="CA of the Runtime API's TLS certificate (flower-supernode --ssl-certfile); plain HTTP without")
    parser.add_argument("--auth-secret-file", help="the secret flower-supernode --superexec-auth-secret-file reads")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--poll", type=float, default=POLL_S, help="seconds between claims while idle")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s resident[%(process)d]: %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def stop(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    secret = Path(args.auth_secret_file).read_bytes() if args.auth_secret_file else None
    resident = Resident(args.runtime_api_address, args.root_certificates, secret, args.poll)
    warm_up()
    log.info("serving the SuperNode's ClientApp tasks from %s in process %d", args.runtime_api_address, os.getpid())
    try:
        resident.serve_forever()
    except Stopped as why:
        log.info("stopped (%s) after %d tasks", why, resident.served)
    finally:
        resident.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
