"""stip.relay (bytes, capture, delay, rate, cut) and tests/haproxy.py (forwarding, failover)."""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import pytest
from haproxy import HAProxy

from stip import relay
from stip.relay import Relay


class Server:
    """A loopback TCP server: echoes (after sending `greeting`), or with `source` sends that many
    bytes once it reads the first byte, then closes."""

    def __init__(self, greeting: bytes = b"", source: int = 0):
        self.greeting, self.source = greeting, source
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def target(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    @property
    def address(self) -> str:
        return "%s:%d" % self.target

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.open.add(c)
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        try:
            c.sendall(self.greeting)
            if self.source:
                c.recv(1)
                c.sendall(b"x" * self.source)
            else:
                while data := c.recv(1 << 16):
                    c.sendall(data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open.discard(c)
            c.close()

    def close(self) -> None:
        if self.listener.fileno() == -1:
            return
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            for c in self.open:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already reset by the peer
        for t in self.threads:
            t.join(5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def exchange(address: str, payload: bytes) -> bytes:
    """Send payload while reading, half-close, read until EOF."""
    with connect(address) as s:

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        out = bytearray()
        while data := s.recv(1 << 16):
            out += data
        t.join()
    return bytes(out)


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("relay-")]


def test_bytes_pass_unchanged_both_ways_and_capture_records_them():
    payloads = [os.urandom(n) for n in (1, 70_000, 1 << 20, 3 << 20)]
    with Server() as echo, Relay(echo.target, capture=True) as r:
        results: list[bytes | None] = [None] * len(payloads)

        def run(i: int) -> None:
            results[i] = exchange(r.address, payloads[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == payloads  # the half-close crossed both ways, or exchange would hang
        assert r.connections == len(payloads)
        up, down = r.captured["up"], r.captured["down"]
        assert sorted(up) == sorted(b"".join(payloads)) and len(down) == len(up)
        for p in payloads:  # whole streams, not interleaved chunks
            assert p in up and p in down

        secret = os.urandom(32)
        before = len(r.captured["up"])
        assert exchange(r.address, secret) == secret
        assert r.captured["up"][before:] == secret and r.connections == len(payloads) + 1
    assert not relay_threads()


def test_captured_without_capture_refuses():
    with Server() as echo, Relay(echo.target) as r, pytest.raises(RuntimeError, match="capture=True"):
        r.captured


def round_trip(s: socket.socket) -> float:
    t = time.perf_counter()
    s.sendall(b"p" * 100)
    got = 0
    while got < 100:
        got += len(s.recv(100 - got))
    return time.perf_counter() - t


def test_rtt_adds_one_round_trip_to_a_ping_pong():
    with Server() as echo, Relay(echo.target) as direct, Relay(echo.target, rtt=0.04) as slow:
        with connect(direct.address) as a, connect(slow.address) as b:
            base = statistics.median(round_trip(a) for _ in range(9))
            delayed = statistics.median(round_trip(b) for _ in range(9))
    assert 0.040 <= delayed - base < 0.055, (base, delayed)


def test_bulk_transfer_runs_at_the_bandwidth_not_one_chunk_per_rtt():
    size = 4 << 20
    with Server(source=size) as source, Relay(source.target, rtt=0.04, bandwidth=100e6) as r:
        with connect(r.address) as s:
            t = time.perf_counter()
            s.sendall(b"g")
            got = 0
            while data := s.recv(1 << 16):
                got += len(data)
            elapsed = time.perf_counter() - t
    expected = 0.04 + size * 8 / 100e6  # the request's trip up and the data's down, plus serialisation
    assert got == size
    assert expected * 0.98 <= elapsed < expected * 1.3 + 0.05, (elapsed, expected)

    # No bandwidth limit: the 40 ms delay line must not cap throughput at a chunk per rtt (~10 s here).
    with Server(source=4 * size) as source, Relay(source.target, rtt=0.04) as r:
        t = time.perf_counter()
        assert len(exchange(r.address, b"g")) == 4 * size
        assert time.perf_counter() - t < 1.5


def test_a_reset_crosses_behind_the_data():
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = listener.accept()
        c.recv(1)
        c.sendall(b"y" * 200_000)
        time.sleep(0.05)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset, 50 ms after the data

    t = threading.Thread(target=serve)
    t.start()
    with listener, Relay(listener.getsockname()[:2], rtt=0.02) as r, connect(r.address) as s:
        s.sendall(b"g")
        got = 0
        with pytest.raises(ConnectionResetError):
            while data := s.recv(1 << 16):
                got += len(data)
        assert got == 200_000
    t.join()


def test_cut_resets_both_sides_and_keeps_listening():
    with Server() as echo, Relay(echo.target) as r:
        a, b = connect(r.address), connect(r.address)
        for s in (a, b):
            assert round_trip(s) < 1
        assert len(echo.open) == 2
        t = time.perf_counter()
        r.cut()
        assert time.perf_counter() - t < 0.5
        for s in (a, b):
            with pytest.raises(ConnectionError):  # a reset, not a clean EOF
                s.sendall(b"x")
                s.recv(1)
            s.close()
        deadline = time.monotonic() + 2
        while echo.open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not echo.open
        assert exchange(r.address, b"again") == b"again" and r.connections == 3

        idle = connect(r.address)  # still open when the relay closes
        assert round_trip(idle) < 1
    assert not relay_threads()
    with pytest.raises(ConnectionError):
        idle.recv(1)
    idle.close()


def test_relay_runs_as_its_own_process():
    with Server() as echo:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stip.relay", echo.address, "--rtt", "0.01"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            address = proc.stdout.readline().strip()
            assert exchange(address, b"over there") == b"over there"
        finally:
            proc.stdin.close()  # its signal to stop
            assert proc.wait(10) == 0
            proc.stdout.close()


def test_an_emulated_link_in_a_process_of_its_own_measures_rtt_plus_serialisation():
    """`relay.emulated` (what the bench and benchmarks put before each server) and
    `relay.round_trip` (STIP's one exchange): 30 ms of RTT, and 400 kB at 40 Mbit/s (80 ms)."""
    with Server() as echo, relay.emulated(f"tcp://{echo.address}", 0.03) as address:
        assert exchange(address, b"far away") == b"far away"
    small = relay.round_trip(0.03, None, 100, 100, repeats=3)
    bulk = relay.round_trip(0.03, 40e6, 400_000, 100, repeats=3)
    assert 0.03 <= small < 0.03 + 0.02
    assert 0.03 + 0.08 <= bulk < 0.03 + 0.08 + 0.04
    with pytest.raises(RuntimeError, match="did not start"):
        with relay.emulated("nowhere", 0.01):
            pass


def test_haproxy_forwards_and_fails_over_to_the_next_replica():
    payload = os.urandom(300_000)
    a, b = Server(greeting=b"A"), Server(greeting=b"B")
    try:
        with HAProxy({"s1": [a.address, b.address], "s2": [b.address]}) as lb:
            answers = [exchange(lb.address("s1"), payload) for _ in range(4)]
            assert sorted(x[:1] for x in answers) == [b"A", b"A", b"B", b"B"]  # round robin
            assert all(x[1:] == payload for x in answers)
            assert exchange(lb.address("s2"), b"two") == b"Btwo"

            down = a.address
            a.close()
            # Refused by A, redispatched to B at once, before any health check has run.
            assert [exchange(lb.address("s1"), b"x") for _ in range(4)] == [b"Bx"] * 4
            deadline = time.monotonic() + 3
            while lb.status("s1")[down] != "DOWN":
                assert time.monotonic() < deadline, lb.stderr
                time.sleep(0.05)
            assert lb.status("s1")[b.address] == "UP"
    finally:
        a.close()
        b.close()
