"""The share servers' wire: length-prefixed `stip.wire` messages on one persistent TCP socket.

A generated token costs ~120 dependent round trips, so each is one frame each way on a socket
that stays open, with Nagle off: no HTTP, no per-request headers, no JSON bodies.

    frame    = u64 little-endian length ‖ a stip.wire message (safetensors: tensors + metadata)
    hello    meta {"op": "hello", "token"?}   → meta {"model", "ops": {name: [in, out]}, "limbs", "fingerprint"}
    matmul   meta {"op": NAME}, tensor x int64 (rows, in)
                                              → tensor y int64 (rows, out) = x·W̃ mod 2^64, meta {"seconds"}
    error    meta {"error": message}           (the connection stays usable; a broken frame closes it)
"""

from __future__ import annotations

import socket
import struct

import torch

from .. import wire

MAX_FRAME = 1 << 30  # a 128-token MiniLM prefill sends ~0.8 MB per matmul; a long LLM prompt more
HELLO = "hello"
REQUEST = {"x": wire.Spec(dtypes=(torch.int64,), ndim=2, required=False)}  # hello carries none
ANSWER = {"y": wire.Spec(dtypes=(torch.int64,), ndim=2)}


class ProtocolError(ConnectionError):
    """The peer broke the framing or answered with an error."""


def send(sock: socket.socket, blob: bytes) -> int:
    head = struct.pack("<Q", len(blob))
    if len(blob) < 1 << 16:
        sock.sendall(head + blob)  # one segment: a decode step's frames are small
    else:
        sock.sendall(head)
        sock.sendall(blob)
    return len(blob) + 8


def recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("<Q", _exactly(sock, 8))
    if n > MAX_FRAME:
        raise ProtocolError(f"a frame of {n} bytes exceeds the limit of {MAX_FRAME}")
    return _exactly(sock, n)


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionResetError("the peer closed the connection")
        got += k
    return bytes(buf)


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[::1]:port``), optionally prefixed ``tcp://``."""
    a = address.removeprefix("tcp://")
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
