"""HAProxy in front of share-server replicas, for tests: a real TCP load balancer.

    with HAProxy({"s1": ["127.0.0.1:7001", "127.0.0.1:7002"], "s2": [...]}) as lb:
        lb.address("s1")            # "127.0.0.1:PORT", one frontend per party

TCP mode with TLS passthrough: HAProxy sees only ciphertext, the TLS session runs end to end
between the client and the replica it was given. A replica that refuses a connection is
retried on another at once (`option redispatch 1`), and the health check takes it out within
half a second. Debian's package is installed with apt-get when haproxy is missing; a test that
needs it fails rather than skips.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_.-]+")
START_TIMEOUT = 10.0

CONFIG = """\
global
    stats socket {socket} mode 600 level admin
    maxconn 4096

defaults
    mode tcp
    balance {balance}
    option redispatch 1
    retries 3
    timeout connect 1s
    # share-server connections are persistent and sit idle between requests
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout check 500ms
    default-server check inter 500 fall 1 rise 1
"""

LISTEN = """
listen {party}
    bind 127.0.0.1:{port}
{servers}
"""


def haproxy_binary() -> str:
    """The haproxy executable, installed from Debian's package the first time it is missing."""
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    # One install at a time across pytest processes: dpkg's own lock would fail the second.
    with open(os.path.join(tempfile.gettempdir(), "stip-haproxy-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
        if found:
            return found
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "haproxy"]):
            try:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise RuntimeError(f"haproxy is not installed and `{' '.join(cmd)}` could not run: {e}") from e
            if done.returncode != 0:
                raise RuntimeError(
                    f"haproxy is not installed and `{' '.join(cmd)}` failed (exit {done.returncode}; "
                    f"it needs root and Debian's repositories):\n{done.stderr[-4000:]}"
                )
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise RuntimeError("apt-get installed haproxy but no haproxy executable is on PATH or in /usr/sbin")
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    try:
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class HAProxy:
    """One `listen` section per party, each balancing over that party's replicas ("host:port")."""

    def __init__(self, backends: Mapping[str, Sequence[str]], *, balance: str = "roundrobin"):
        if not backends or any(not NAME.fullmatch(p) or not rs for p, rs in backends.items()):
            raise ValueError(f"parties must be named [A-Za-z0-9_.-]+ and have a replica each: {dict(backends)}")
        if balance not in ("roundrobin", "leastconn"):
            raise ValueError(f"balance {balance!r}: roundrobin or leastconn")
        self.backends = {p: list(rs) for p, rs in backends.items()}
        self.balance = balance
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def address(self, party: str) -> str:
        return f"127.0.0.1:{self._ports[party]}"

    @property
    def stderr(self) -> str:
        """What haproxy has written so far: warnings, and each replica going DOWN or UP."""
        assert self._dir is not None, "not started"
        return Path(self._dir.name, "haproxy.log").read_text(errors="replace")

    def status(self, party: str) -> dict[str, str]:
        """Each replica's health as HAProxy sees it: "UP", "DOWN", …, keyed by "host:port"."""
        names = {f"r{i}": r for i, r in enumerate(self.backends[party])}
        out = {}
        for line in self._command("show stat").splitlines():
            row = line.split(",")
            if len(row) > 17 and row[0] == party and row[1] in names:
                out[names[row[1]]] = row[17].split(" ")[0]  # "UP", "DOWN", "UP 1/2" while rising
        return out

    def __enter__(self) -> HAProxy:
        binary = haproxy_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="stip-haproxy-")
        try:
            for attempt in range(3):  # another process may take a free port before haproxy binds it
                if self._start(binary):
                    return self
                if "cannot bind socket" not in self.stderr or attempt == 2:
                    raise RuntimeError(f"haproxy did not start (exit {self._proc.returncode}):\n{self.stderr}")
        except BaseException:
            self._stop()
            self._dir.cleanup()
            raise
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None and self._dir is not None
        died = self._proc.poll()
        log = self.stderr
        self._stop()
        self._dir.cleanup()
        if died is not None:
            if isinstance(exc[1], BaseException):  # keep the test's own error, with the reason beside it
                exc[1].add_note(f"haproxy had died (exit {died}):\n{log}")
            else:
                raise RuntimeError(f"haproxy died during the test (exit {died}):\n{log}")

    def _start(self, binary: str) -> bool:
        assert self._dir is not None
        d = Path(self._dir.name)
        self._ports = dict(zip(self.backends, _free_ports(len(self.backends))))
        cfg = CONFIG.format(socket=d / "admin.sock", balance=self.balance)
        for party, replicas in self.backends.items():
            servers = "\n".join(f"    server r{i} {r}" for i, r in enumerate(replicas))
            cfg += LISTEN.format(party=party, port=self._ports[party], servers=servers)
        (d / "haproxy.cfg").write_text(cfg)
        with open(d / "haproxy.log", "w") as log:
            # -db: foreground, no fork, no system service; SIGTERM stops it at once
            self._proc = subprocess.Popen(
                [binary, "-db", "-f", str(d / "haproxy.cfg")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        # The stats socket is a listener like the frontends, enabled in the same step: once it
        # answers, the frontends accept. Probing a frontend instead would open a replica connection.
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                stat = self._command("show stat")
            except OSError:
                time.sleep(0.02)
                continue
            opened = {row.split(",")[0] for row in stat.splitlines() if ",FRONTEND," in row and ",OPEN," in row}
            if opened >= set(self.backends):
                return True
            time.sleep(0.02)
        self._stop()
        raise RuntimeError(f"haproxy did not open its frontends within {START_TIMEOUT:.0f} s:\n{self.stderr}")

    def _command(self, line: str) -> str:
        assert self._dir is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(Path(self._dir.name, "admin.sock")))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
