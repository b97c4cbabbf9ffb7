"""A node's long-lived trainer: one process per SuperNode machine that keeps the model loaded.

A Flower 1.41 SuperNode starts a fresh ClientApp process for every message, so a ClientApp
that trained by itself would import PyTorch and load the model for every client of every
round. ``flexfed flower supernode`` therefore runs this worker and starts ``flower-supernode``
as its child, with ``trainer-socket=PATH`` in the node config; the ClientApp then only relays
the message's arrays (npy bytes) and config to the worker over that Unix socket and relays the
answer back. The socket lives in a directory only this user can enter.

Protocol (one request per connection): frames of an 8-byte big-endian length and a payload.
The first frame is a JSON header, followed by one frame of npy bytes per array it lists; the
answer has the same form. Nothing is pickled; arrays load with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

MAX_FRAME = 16 << 30  # 16 GiB: a sanity limit, not a budget


class WorkerError(RuntimeError):
    """The worker could not be reached, or it failed to train."""


def _send_frame(conn: socket.socket, payload: bytes) -> None:
    conn.sendall(struct.pack(">Q", len(payload)))
    conn.sendall(payload)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(n - got, 1 << 22))
        if k == 0:
            raise WorkerError("connection closed mid-frame")
        got += k
    return bytes(buf)


def _recv_frame(conn: socket.socket) -> bytes:
    (n,) = struct.unpack(">Q", _recv_exact(conn, 8))
    if n > MAX_FRAME:
        raise WorkerError(f"frame of {n} bytes exceeds the limit")
    return _recv_exact(conn, n)


def send(conn: socket.socket, header: dict, blobs: Mapping[str, bytes]) -> None:
    names = list(blobs)
    _send_frame(conn, json.dumps({**header, "arrays": names}).encode())
    for name in names:
        _send_frame(conn, blobs[name])


def receive(conn: socket.socket) -> tuple[dict, dict[str, bytes]]:
    header = json.loads(_recv_frame(conn))
    names = header.pop("arrays", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise WorkerError("malformed header: 'arrays' must list names")
    return header, {n: _recv_frame(conn) for n in names}


def request(path: str, header: dict, blobs: Mapping[str, bytes], timeout: float | None = None) -> tuple[dict, dict[str, bytes]]:
    """Send one request to the worker at ``path`` and return its answer (raises ``WorkerError`` on failure)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            send(conn, header, blobs)
            answer, out = receive(conn)
    except OSError as err:
        raise WorkerError(f"trainer worker at {path}: {type(err).__name__}: {err}") from None
    if not answer.get("ok"):
        raise WorkerError(f"trainer worker: {answer.get('error', 'failed without a reason')}")
    return answer, out


class Worker:
    """Serves training requests on a Unix socket, one at a time, with one trainer per config."""

    def __init__(self, path: str | Path | None = None):
        if path is None:
            directory = Path(tempfile.mkdtemp(prefix="flexfed-node-"))  # mode 0700
            path = directory / "trainer.sock"
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        os.chmod(Path(self.path).parent, 0o700)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self._stop = threading.Event()

    def handle(self, header: dict, blobs: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
        from flexfed.engines.flower.node import handle
        from flexfed.engines.flower.wire import npy_bytes, npy_load

        if header.get("op") != "train":
            raise WorkerError(f"unknown operation {header.get('op')!r}")
        arrays = {k: npy_load(v) for k, v in blobs.items()}
        node_config = dict(header.get("node_config") or {})
        stats, out = handle(str(header["config"]), node_config, str(header["client"]), int(header["seed"]), arrays, header["meta"])
        return {"ok": True, "stats": stats}, {k: npy_bytes(v) for k, v in out.items()}

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            with conn:
                try:
                    header, blobs = receive(conn)
                    began = time.perf_counter()
                    try:
                        answer, out = self.handle(header, blobs)
                    except Exception as err:  # noqa: BLE001 - reported to the ClientApp, which fails that client
                        log.exception("training request failed")
                        answer, out = {"ok": False, "error": f"{type(err).__name__}: {err}"}, {}
                    send(conn, answer, out)
                    log.info("client %s: %s in %.1f s", header.get("client"), "trained" if answer.get("ok") else "failed", time.perf_counter() - began)
                except (OSError, WorkerError, ValueError) as err:
                    log.warning("dropped a request: %s", err)

    def warm_up(self) -> threading.Thread:
        """Import the heavy libraries in the background so the first request is quick."""

        def work():
            import peft  # noqa: F401
            import torch  # noqa: F401
            import transformers  # noqa: F401

            import flexfed.engines.flower.node  # noqa: F401
            import flexfed.runner  # noqa: F401

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        finally:
            try:
                os.unlink(self.path)
                os.rmdir(Path(self.path).parent)
            except OSError:
                pass
