"""A userspace TCP relay on loopback: capture a link's bytes, cut it, or give it a delay and a rate.

Tests put it between a client and a server to check what crosses the wire and what happens
when a link drops; the bench uses it to emulate a network (this kernel has no netem).

    with Relay(("127.0.0.1", 7001), rtt=0.08, bandwidth=100e6) as r:
        connect(r.address)          # "127.0.0.1:PORT" instead of the target

Each direction is a link of its own: a chunk read at time t is serialised at `bandwidth`
(FIFO behind the chunks before it) and delivered rtt/2 after that, so chunks keep their order
and spacing and a bulk transfer runs at the rate, not at one chunk per rtt. A direction holds
at most `buffer` bytes in flight before the relay stops reading, which pushes back on the
sender as a TCP window would. Threads, not an event loop: epoll sleeps in whole milliseconds,
a condition variable to the microsecond, and a LAN's rtt is a fraction of a millisecond.

Its threads share the GIL with whatever else runs in the process: a busy pure-Python thread
beside it turned a 40 ms round trip into ~105 ms. To emulate a network for a measurement,
run it as its own process: `python -m stip.relay HOST:PORT --rtt 0.08 --bandwidth 100e6`
prints its address on stdout and relays until stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

CHUNK = 1 << 16
BUFFER = 4 << 20  # ~ Linux's largest autotuned TCP window
POLL = 0.1  # a writer blocked on a full socket rechecks for a cut this often
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset, not a FIN


@dataclass
class _Link:
    """One direction: the delay line between a reader and a writer thread."""

    name: str  # "up" (client → target) or "down"
    # (due, data): b"" a FIN, None a reset
    queue: collections.deque[tuple[float, bytes | None]] = field(default_factory=collections.deque)
    queued: int = 0
    free_at: float = 0.0  # when the emulated wire finishes serialising what it holds
    cond: threading.Condition = field(default_factory=threading.Condition)


class _Connection:
    def __init__(self, relay: Relay, client: socket.socket, server: socket.socket):
        self.relay, self.client, self.server = relay, client, server
        self.capture = {"up": bytearray(), "down": bytearray()} if relay._captures is not None else None
        self.dead = False
        self.lock = threading.Lock()
        self.up, self.down = _Link("up"), _Link("down")
        self.threads = [
            threading.Thread(target=self._read, args=(client, self.up), name="relay-read-up", daemon=True),
            threading.Thread(target=self._write, args=(self.up, server), name="relay-write-up", daemon=True),
            threading.Thread(target=self._read, args=(server, self.down), name="relay-read-down", daemon=True),
            threading.Thread(target=self._write, args=(self.down, client), name="relay-write-down", daemon=True),
        ]
        self.running = len(self.threads)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self, src: socket.socket, link: _Link) -> None:
        relay = self.relay
        try:
            while not self.dead:
                data: bytes | None
                try:
                    data = src.recv(CHUNK)  # b"": a FIN
                except TimeoutError:
                    continue
                except OSError:
                    data = None  # a reset: it travels the delay line behind the data, as on a wire
                if self.dead:
                    break
                if data and self.capture is not None:
                    with relay._lock:
                        self.capture[link.name] += data
                n = len(data or b"")
                with link.cond:
                    while link.queued >= relay.buffer and not self.dead:
                        link.cond.wait()
                    if self.dead:
                        break
                    start = max(time.monotonic(), link.free_at)
                    link.free_at = start + (n * 8 / relay.bandwidth if relay.bandwidth else 0.0)
                    link.queue.append((link.free_at + relay.rtt / 2, data))
                    link.queued += n
                    link.cond.notify_all()
                if not data:
                    break
        finally:
            self._exited()

    def _write(self, link: _Link, dst: socket.socket) -> None:
        try:
            while True:
                with link.cond:
                    while not self.dead:
                        if link.queue:
                            wait = link.queue[0][0] - time.monotonic()
                            if wait <= 0:
                                break
                            link.cond.wait(wait)
                        else:
                            link.cond.wait()
                    if self.dead:
                        return
                    _, data = link.queue.popleft()
                if data is None:
                    self.abort()
                    return
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)  # half-close: the other direction carries on
                    except OSError:
                        self.abort()
                    return
                if not self._send(dst, data):
                    self.abort()
                    return
                with link.cond:
                    link.queued -= len(data)
                    link.cond.notify_all()
        finally:
            self._exited()

    def _send(self, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self.dead:
            try:
                view = view[dst.send(view) :]
            except TimeoutError:
                continue  # the receiver is not reading: look for a cut, then try again
            except OSError:
                return False
        return not view

    def abort(self) -> None:
        """Drop both sides with a reset; the last thread out closes the sockets."""
        with self.lock:
            if self.dead:
                return
            self.dead = True
        for s in (self.client, self.server):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                s.shutdown(socket.SHUT_RD)  # wakes a blocked recv; sends nothing
            except OSError:
                pass
        for link in (self.up, self.down):
            with link.cond:
                link.cond.notify_all()

    def _exited(self) -> None:
        # Sockets close only once no thread can touch them: a closed fd's number is reused.
        with self.lock:
            self.running -= 1
            last = self.running == 0
        if last:
            self.client.close()
            self.server.close()
            self.relay._forget(self)

    def join(self) -> None:
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join()


class Relay:
    """Forward every connection accepted on a free loopback port to `target`.

    `rtt` (seconds) and `bandwidth` (bits/s, None for unlimited) may be changed while it runs;
    they apply to the chunks that arrive afterwards.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        rtt: float = 0.0,
        bandwidth: float | None = None,
        capture: bool = False,
        buffer: int = BUFFER,
    ):
        if rtt < 0 or (bandwidth is not None and bandwidth <= 0) or buffer < 1:
            raise ValueError("rtt must be ≥ 0, bandwidth > 0 or None, buffer ≥ 1")
        self.target, self.rtt, self.bandwidth, self.buffer = target, rtt, bandwidth, buffer
        self._captures: list[dict[str, bytearray]] | None = [] if capture else None  # one per connection
        self._lock = threading.Lock()
        self._open: set[_Connection] = set()
        self._accepted = 0
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._accept_thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)
        self._accept_thread.start()

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def connections(self) -> int:
        """Client connections accepted so far, open or not."""
        return self._accepted

    @property
    def captured(self) -> dict[str, bytes]:
        """Every byte read so far: "up" client → target, "down" back; connection after connection.

        Whole streams in accept order, never interleaved chunks of concurrent connections, so
        a secret cannot hide by straddling two of them."""
        if self._captures is None:  # an empty capture would let a "no secret in the clear" check pass
            raise RuntimeError("this relay was made without capture=True")
        with self._lock:
            return {k: b"".join(c[k] for c in self._captures) for k in ("up", "down")}

    def cut(self) -> None:
        """Reset every open connection, both sides, and wait until they are gone; keep listening."""
        with self._lock:
            conns = list(self._open)
        for c in conns:
            c.abort()
        for c in conns:
            c.join()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux
        except OSError:
            pass
        self._accept_thread.join()
        self._listener.close()
        self.cut()

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._closed:
                client.close()
                return
            with self._lock:
                self._accepted += 1
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
                client.close()  # a refused target looks like a refused connection: a reset
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the relay adds no Nagle delay
                s.settimeout(POLL)
            conn = _Connection(self, client, server)
            with self._lock:  # started under the lock: cut() must not join threads not yet started
                self._open.add(conn)
                if self._captures is not None and conn.capture is not None:
                    self._captures.append(conn.capture)
                conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._open.discard(conn)


@contextlib.contextmanager
def emulated(target: str, rtt: float, bandwidth: float | None = None, timeout: float = 30.0) -> Iterator[str]:
    """A relay to ``target`` ("HOST:PORT", tcp:// or tls:// allowed) as its own process, for
    measurements: its threads then never wait on this process's GIL. Yields the address to
    connect to instead."""
    cmd = [sys.executable, "-m", "stip.relay", target, "--rtt", repr(rtt)] + (["--bandwidth", repr(bandwidth)] if bandwidth else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        address = proc.stdout.readline().strip() if ready else ""
        if not address:
            proc.kill()
            raise RuntimeError(f"the relay to {target} did not start: {proc.stderr.read().strip()[-500:] or 'no address printed'}")
        yield address
    finally:
        if proc.poll() is None:
            proc.stdin.close()  # it exits when stdin closes
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def round_trip(rtt: float, bandwidth: float | None, up: int, down: int, repeats: int = 5) -> float:
    """The median seconds for ``up`` bytes to cross an emulated link and ``down`` bytes to come
    back, on one kept-open connection (as a client's HTTP connection is): a sink on loopback
    answers each request, through a relay process."""
    sink = socket.create_server(("127.0.0.1", 0))
    reply = bytes(down)

    def serve() -> None:
        conn, _ = sink.accept()
        with conn:
            for _ in range(repeats + 1):
                got = 0
                while got < up:
                    chunk = conn.recv(min(CHUNK, up - got))
                    if not chunk:
                        return
                    got += len(chunk)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    times, request = [], bytes(up)
    try:
        with emulated(f"127.0.0.1:{sink.getsockname()[1]}", rtt, bandwidth) as address:
            host, _, port = address.rpartition(":")
            with socket.create_connection((host, int(port))) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(repeats + 1):  # the first warms the connection up
                    t0 = time.perf_counter()
                    c.sendall(request)
                    got = 0
                    while got < down:
                        chunk = c.recv(CHUNK)
                        if not chunk:
                            raise ConnectionError("the relay closed the connection")
                        got += len(chunk)
                    if i:
                        times.append(time.perf_counter() - t0)
    finally:
        sink.close()
        thread.join(5)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stip.relay", description="Relay loopback TCP to HOST:PORT.")
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("--rtt", type=float, default=0.0, help="seconds added to each round trip")
    ap.add_argument("--bandwidth", type=float, default=None, help="bits/s each way (default: unlimited)")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition("://")[2].rpartition(":")
    with Relay((host.strip("[]"), int(port)), rtt=args.rtt, bandwidth=args.bandwidth) as r:
        print(r.address, flush=True)
        sys.stdin.read()  # until the parent closes the pipe or exits: no orphaned relay


if __name__ == "__main__":
    main()
