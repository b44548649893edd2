"""The share servers' wire: length-prefixed `stip.wire` messages on one persistent connection.

A generated token costs ~120 dependent round trips, so each is one frame each way on a socket
that stays open, with Nagle off: no HTTP, no per-request headers, no JSON bodies. Across
machines the socket is TLS 1.3 (`stip.tls`), the server verified by a pin or a CA before
P3 sends its hello.

    frame    = u64 little-endian length ‖ a stip.wire message (safetensors: tensors + metadata)
    hello    meta {"op": "hello", "token"?}   → meta {"model", "ops": {name: [in, out]}, "limbs",
                                                      "fingerprint", "max_rows"}
    matmul   meta {"op": NAME}, tensor x int64 (rows, in)
                                              → tensor y int64 (rows, out) = x·W̃ mod 2^64, meta {"seconds"}
    error    meta {"error": message}           (a bad message keeps the connection; a refused
                                                frame, a timeout or a broken frame closes it)

Before a good hello a server reads one frame of at most `HELLO_FRAME` bytes; after it, at most
what its largest matmul takes. Memory follows the bytes that really arrive, never the length a
frame claims.
"""

from __future__ import annotations

import socket
import struct
import time

import torch

from ..errors import StipError
from .. import wire

MAX_FRAME = 1 << 32  # P3's bound on a reply; a server's own bound is set by its matmuls
HELLO_FRAME = 4096  # a hello is ~100 bytes: nothing larger is read from a stranger
HELLO = "hello"
REQUEST = {"x": wire.Spec(dtypes=(torch.int64,), ndim=2, required=False)}  # hello carries none
ANSWER = {"y": wire.Spec(dtypes=(torch.int64,), ndim=2)}
_GROW = 1 << 20


class ProtocolError(StipError, ConnectionError):
    """The peer broke the framing or answered with an error."""


class FrameTooLarge(ProtocolError):
    def __init__(self, n: int, limit: int):
        super().__init__(f"a frame of {n} bytes exceeds the limit of {limit}")
        self.n, self.limit = n, limit


def send(sock: socket.socket, blob: bytes) -> int:
    head = struct.pack("<Q", len(blob))
    if len(blob) < 1 << 16:
        sock.sendall(head + blob)  # one segment: a decode step's frames are small
    else:
        sock.sendall(head)
        sock.sendall(blob)
    return len(blob) + 8


def recv(sock: socket.socket, limit: int = MAX_FRAME, seconds: float | None = None, deadline: float | None = None) -> bytes:
    """One frame. ``seconds``: once its first byte has arrived, the rest, length included, must
    arrive within that (a slow drip is cut off); the wait for that byte is the socket's own timeout.
    ``deadline`` (a `time.monotonic()` value): the whole frame by then, that wait included."""
    if seconds is None and deadline is None:
        (n,) = struct.unpack("<Q", _exactly(sock, 8))
        if n > limit:
            raise FrameTooLarge(n, limit)
        return _exactly(sock, n)
    timeout = sock.gettimeout()
    try:
        first = _exactly(sock, 1, deadline)
        if seconds is not None:
            deadline = min(time.monotonic() + seconds, deadline if deadline is not None else float("inf"))
        (n,) = struct.unpack("<Q", first + _exactly(sock, 7, deadline))
        if n > limit:
            raise FrameTooLarge(n, limit)
        return _exactly(sock, n, deadline)
    finally:
        sock.settimeout(timeout)


def _exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``deadline``: each wait is cut to what is left of it (a socket's timeout is per call)."""
    buf = bytearray(min(n, _GROW))  # grown as bytes arrive: a claimed length costs nothing
    view, got = memoryview(buf), 0
    try:
        while got < n:
            if got == len(buf):
                view.release()
                buf.extend(bytes(min(n - got, len(buf))))  # doubles, up to n
                view = memoryview(buf)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the frame did not arrive in time")
                sock.settimeout(left)
            k = sock.recv_into(view[got:], len(buf) - got)
            if k == 0:
                raise ConnectionResetError("the peer closed the connection")
            got += k
    finally:
        view.release()
    return bytes(buf)


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``), optionally prefixed ``tcp://`` or ``tls://``."""
    a = address.removeprefix("tcp://").removeprefix("tls://")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
