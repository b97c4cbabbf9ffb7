"""Deployment helpers: development certificates and keys, SuperLink/SuperNode commands, a local federation.

The commands are plain ``flower-superlink`` / ``flower-supernode`` invocations (see
docs/flower.md); these helpers only fill in the flags flexfed relies on: runtime dependency
installation off, TLS on, SuperNode authentication on, telemetry off. ``LocalFederation`` runs
them on loopback (tests, trying it out); for the failure tests (``tests/test_flower_crash.py``)
it can crash and restart its SuperLink on the same database (``restart_superlink``) and give
one SuperNode extra environment variables (a fault to inject).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PORT = 9092


# ----------------------------------------------------------------------------- certificates and keys


def make_certs(directory: str | Path, hosts: list[str] | None = None, nodes: int = 3, days: int = 365) -> dict[str, Path]:
    """Write a development CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs.

    Files: ``ca.crt`` (give to SuperNodes and to ``flwr``), ``ca.key`` (keep private),
    ``superlink.crt``/``superlink.key`` (the SuperLink's), ``supernode-K.key`` (SuperNode K's
    private authentication key, OpenSSH EC P-384) and ``supernode-K.pub`` (its public key,
    registered with ``flwr supernode register``). Not for production: the CA key sits beside
    the certificates and nothing is password-protected.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hosts = list(dict.fromkeys([*(hosts or []), "localhost", "127.0.0.1", "::1"]))
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flexfed development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": pem_key(ca_key),
        "superlink.crt": cert.public_bytes(serialization.Encoding.PEM),
        "superlink.key": pem_key(key),
    }
    for k in range(1, nodes + 1):
        node_key = ec.generate_private_key(ec.SECP384R1())
        out[f"supernode-{k}.key"] = node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        out[f"supernode-{k}.pub"] = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    paths = {}
    for name, data in out.items():
        path = directory / name
        path.write_bytes(data)
        if name.endswith(".key"):
            path.chmod(0o600)
        paths[name] = path
    return paths


# ----------------------------------------------------------------------------- commands


def flower_env(flwr_home: str | Path | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for Flower processes: this Python's scripts first on PATH, no telemetry."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # start app processes sooner (Flower's default: 1 s)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def superlink_command(
    port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    certs: str | Path | None = None,
    auth: bool = True,
    database: str | Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certs`` (or ``--insecure`` when None) and node authentication."""
    cmd = [_bin("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if certs is None:
        if auth:
            raise ValueError("SuperNode authentication needs TLS: give the certificates directory")
        cmd.append("--insecure")
    else:
        certs = Path(certs)
        cmd += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"), "--ssl-keyfile", str(certs / "superlink.key")]
    if auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def node_config_string(clients: list[str] | None = None, partition: tuple[int, int] | None = None, extra: dict | None = None) -> str:
    items: dict[str, object] = dict(extra or {})
    if clients:
        items["clients"] = ",".join(clients)
    if partition is not None:
        items["partition-id"], items["num-partitions"] = partition
    parts = []
    for k, v in items.items():
        parts.append(f"{k}={v}" if isinstance(v, (int, float)) and not isinstance(v, bool) else f'{k}="{v}"')
    return " ".join(parts)


def supernode_command(
    superlink: str,
    node_config: str,
    port: int = 9094,
    root_certificates: str | Path | None = None,
    auth_key: str | Path | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (TLS when ``root_certificates`` is given)."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config", node_config]
    if root_certificates is None:
        if auth_key is not None:
            raise ValueError("SuperNode authentication needs TLS: give the CA certificate")
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def write_connection(name: str, address: str, root_certificates: str | Path | None = None, flwr_home: str | Path | None = None, default: bool = False) -> Path:
    """Add (or replace) ``[superlink.NAME]`` in Flower's ``config.toml`` so ``flwr run . NAME`` reaches it."""
    import tomli
    import tomli_w

    home = Path(flwr_home) if flwr_home else Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    path = home / "config.toml"
    data = tomli.loads(path.read_text()) if path.exists() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if default or "default" not in links:
        links["default"] = name
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


# ----------------------------------------------------------------------------- a local federation (tests, trying it out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reap_children() -> None:
    """Run in a Flower process before it starts (``preexec_fn``, or before ``exec``): it ignores
    SIGCHLD, a disposition its children inherit across ``exec``, so the kernel reaps the
    ``flwr-clientapp``/``flwr-serverapp`` processes that Flower's SuperExec starts and never waits
    for, instead of leaving one zombie per message until shutdown. A process that ignores SIGCHLD
    cannot read its children's exit codes (Python's ``wait`` then reports 0); Flower never does."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid``, whatever their session (Linux: from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children.get(child, [])
    return found


@dataclass
class LocalProcess:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process's whole group (it leads its own session): Flower's children go too."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # stragglers of the group (superexec, app processes)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class LocalFederation:
    """A SuperLink and SuperNodes as separate processes on loopback, under one ``FLWR_HOME``.

    Every process leads its own process group; ``stop()`` ends the groups it started, by id.
    """

    home: Path
    certs: Path | None = None
    auth: bool = False
    port: int = 0
    threads: int | None = 1  # intra-op threads per process: several nodes share this machine's cores
    processes: list[LocalProcess] = field(default_factory=list)
    connection: str = "local-test"

    def __post_init__(self):
        self.home = Path(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.env = flower_env(self.home / "flwr")
        if self.threads:
            self.env["OMP_NUM_THREADS"] = self.env["MKL_NUM_THREADS"] = str(self.threads)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None) -> LocalProcess:
        log = self.home / f"{name}.log"
        with open(log, "ab") as fh:
            flower = cmd[0] != sys.executable  # a Flower binary; flexfed's own wrapper makes its child reap
            popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}, cwd=self.home, start_new_session=True,
                                     preexec_fn=reap_children if flower else None)
        proc = LocalProcess(name, popen, log)
        self.processes.append(proc)
        return proc

    def start_superlink(self, timeout: float = 60.0, name: str = "superlink") -> LocalProcess:
        cmd = superlink_command(self.port, "127.0.0.1", self.certs, auth=self.auth, database=self.home / "superlink.db")
        proc = self._spawn(name, cmd)
        wait_for_port(self.port, timeout, proc.popen)
        write_connection(self.connection, self.address, self.certs / "ca.crt" if self.certs else None, flwr_home=self.home / "flwr", default=True)
        return proc

    def restart_superlink(self, sig: int = signal.SIGKILL, timeout: float = 60.0) -> LocalProcess:
        """End the SuperLink with ``sig``, and with it every process it started (Flower starts its
        SuperExec in a session of its own, and the SuperExec the ServerApp processes: they are
        signalled by pid), as on a SuperLink machine that crashes; then start a new SuperLink on
        the same port and database (``superlink.db``). The new one takes ``processes[0]``."""
        old = self.processes[0]
        descendants = _descendants(old.pid)
        old.kill(sig)
        for pid in descendants:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            old.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        old.kill(signal.SIGKILL)  # stragglers of the group
        old.popen.wait(10)
        proc = self.start_superlink(timeout, name=f"superlink-{sum(p.name.startswith('superlink') for p in self.processes)}")
        self.processes.remove(proc)
        self.processes.insert(0, proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout)

    def register(self, *public_keys: str | Path, timeout: float = 120.0) -> None:
        """``flwr supernode register KEY CONNECTION`` for each key (concurrently)."""
        procs = [
            subprocess.Popen(
                [_bin("flwr"), "supernode", "register", str(k), self.connection, "--format", "json"],
                env=self.env, cwd=self.home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for k in public_keys
        ]
        failures = []
        for key, proc in zip(public_keys, procs):
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                failures.append(f"{key}: {out}")
        if failures:
            raise RuntimeError("flwr supernode register failed:\n" + "\n".join(failures))

    def start_supernode(self, name: str, node_config: str, auth_key: str | Path | None = None, worker: bool = True, isolation: str = "process",
                        env: dict | None = None) -> LocalProcess:
        """A SuperNode; with ``worker`` (the default) through ``flexfed flower supernode``, which keeps a
        trainer loaded (its ``--isolation``: ``run_supernode``); without, a plain ``flower-supernode``.
        ``env``: variables added to this node's environment only (e.g. a fault to inject,
        ``clientapp.FAULT_LATE_REPLY``)."""
        ca = self.certs / "ca.crt" if self.certs else None
        port = free_port()
        if worker:
            cmd = [sys.executable, "-m", "flexfed.cli", "flower", "supernode", "--superlink", self.address, "--node-config", node_config, "--port", str(port),
                   "--isolation", isolation]
            cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
            if auth_key is not None:
                cmd += ["--auth-key", str(auth_key)]
        else:
            cmd = supernode_command(self.address, node_config, port=port, root_certificates=ca, auth_key=auth_key)
        return self._spawn(name, cmd, env)

    def wait_for_log(self, proc: LocalProcess, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in proc.log.read_text(errors="replace"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{proc.name} did not log {text!r} within {timeout:.0f} s")

    def submit(self, app_dir: str | Path, *run_config: str) -> int:
        """``flwr run APP CONNECTION``; returns the run id."""
        import json

        args = ["run", str(app_dir), self.connection, "--format", "json"]
        for rc in run_config:
            args += ["--run-config", rc]
        res = self.flwr(*args)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed ({res.returncode}): {res.stdout}\n{res.stderr}")
        return int(json.loads(res.stdout[res.stdout.index("{") :])["run-id"])

    def run_status(self, run_id: int) -> dict:
        import json

        res = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        if res.returncode != 0:
            raise RuntimeError(f"flwr ls failed: {res.stdout}\n{res.stderr}")
        runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        return runs[0]

    def wait_for_run(self, run_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if str(status["status"]).startswith("finished"):
                return status
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")

    def run_to_end(self, app_dir: str | Path, run_dir: Path, timeout: float) -> dict:
        """Submit the app and wait until its run directory holds the report (or the SuperLink dies,
        or ``timeout``), then take the run's final status. It watches the directory rather than
        call `flwr ls` every second: each `flwr` call is a Python start with Flower's imports, CPU
        that the run being measured would lose on a small machine."""
        run_id = self.submit(app_dir)
        summary, deadline = Path(run_dir) / "report" / "summary.md", time.monotonic() + timeout
        while not summary.exists() and time.monotonic() < deadline and self.processes[0].alive():
            time.sleep(0.5)
        return self.wait_for_run(run_id, timeout=60)

    def logs(self, run_id: int) -> str:
        res = self.flwr("log", str(run_id), self.connection, "--show")
        return res.stdout + res.stderr

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every process group started here, wait up to ``timeout``, then SIGKILL the groups."""
        for proc in self.processes:
            if proc.alive():
                proc.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes:
            proc.stop(timeout=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ----------------------------------------------------------------------------- flexfed flower supernode


ISOLATIONS = ("process", "subprocess")


def run_supernode(superlink: str, node_config: str, port: int = 9094, root_certificates: str | Path | None = None, auth_key: str | Path | None = None,
                  isolation: str = "process") -> int:
    """Run ``flower-supernode`` (as a child) with a long-lived process that trains, until the SuperNode ends.

    ``isolation="process"`` (the default): ``flower-supernode --isolation process`` starts no
    ClientApp processes; a resident ClientApp (``resident.py``, a second child) claims its
    messages from its Runtime API and serves them one after another with the model kept loaded.
    It is restarted if it dies. ``isolation="subprocess"``: Flower's own executor starts a
    ``flwr-clientapp`` process per message, which relays the arrays to a trainer worker in this
    process (``worker.py``); needed only on a node that must also run other Flower apps than
    flexfed's (the resident serves only flexfed's ClientApp). SIGTERM/SIGINT stop everything.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
    if isolation == "subprocess":
        return _run_supernode_with_worker(superlink, node_config, port, root_certificates, auth_key)
    return _run_supernode_with_resident(superlink, node_config, port, root_certificates, auth_key)


RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits before restarting a resident that keeps dying
STABLE_S = 60.0  # a resident that lived this long died by accident, not at start-up: restart at once


def resident_command(port: int, secret: str | Path, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "flexfed.engines.flower.resident", "--runtime-api-address", f"127.0.0.1:{port}",
            "--auth-secret-file", str(secret), "--parent-pid", str(parent_pid)]


def _stop_child(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_supernode_with_resident(superlink: str, node_config: str, port: int, root_certificates, auth_key) -> int:
    import logging
    import secrets
    import shutil
    import tempfile

    log = logging.getLogger(__name__)
    # The secret signs the resident's claims on the Runtime API (flower-supernode
    # --superexec-auth-secret-file): no other local process can take this node's messages.
    directory = Path(tempfile.mkdtemp(prefix="flexfed-node-"))  # mode 0700
    secret = directory / "superexec.secret"
    secret.write_bytes(secrets.token_bytes(32))
    secret.chmod(0o600)
    cmd = supernode_command(superlink, node_config, port=port, root_certificates=root_certificates, auth_key=auth_key)
    cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    child = subprocess.Popen(cmd, env=flower_env(), preexec_fn=reap_children)
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}

    def start_resident() -> subprocess.Popen:
        # The same process group as this one: stopping the group (the tests, a service manager) stops it too.
        proc = subprocess.Popen(resident_command(port, secret, os.getpid()), env=flower_env())
        log.info("resident ClientApp %d serves SuperNode %d (Runtime API 127.0.0.1:%d)", proc.pid, child.pid, port)
        return proc

    resident = None
    try:
        resident, started, deaths = start_resident(), time.monotonic(), 0
        while child.poll() is None:
            if resident.poll() is not None and not stopping:
                lived = time.monotonic() - started
                deaths = 0 if lived > STABLE_S else deaths + 1
                wait = 0.0 if deaths == 0 else RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
                log.warning("resident ClientApp %d exited with %s after %.0f s; restarting it in %.0f s (a message it was serving fails)",
                            resident.pid, resident.returncode, lived, wait)
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and child.poll() is None and not stopping:
                    time.sleep(0.2)
                if child.poll() is None and not stopping:
                    resident, started = start_resident(), time.monotonic()
            time.sleep(0.2)
        code = child.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_child(child)
        if resident is not None:
            _stop_child(resident)
        shutil.rmtree(directory, ignore_errors=True)
    return code


def _run_supernode_with_worker(superlink: str, node_config: str, port: int, root_certificates, auth_key) -> int:
    """A trainer worker in this process and ``flower-supernode`` (Flower's own executor) as a child;
    the ClientApp processes reach the worker through ``trainer-socket`` in the node config."""
    import logging
    import threading

    from flexfed.engines.flower.worker import Worker

    log = logging.getLogger(__name__)
    worker = Worker()
    worker.warm_up()
    server = threading.Thread(target=worker.serve_forever, daemon=True)
    server.start()
    full_config = f'{node_config} trainer-socket="{worker.path}"'.strip()
    cmd = supernode_command(superlink, full_config, port=port, root_certificates=root_certificates, auth_key=auth_key)
    child = subprocess.Popen(cmd, env=flower_env(), preexec_fn=reap_children)
    log.info("SuperNode %d started; trainer worker on %s", child.pid, worker.path)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:
            child.kill()
        worker.close()
    return code
