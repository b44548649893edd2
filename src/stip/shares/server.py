"""A share server (S1 or S2): public weights, one ring matmul per request.

It never sees an activation, only one additive share of it: uniform ring elements. It holds
no state between requests (P3 keeps the KV cache), and never talks to the other server.

    server = ShareServer.load("minilm")          # the public model's weight matmuls
    with server.listen("127.0.0.1", 0) as bound:  # a thread per connection
        ...                                       # bound.address = "127.0.0.1:PORT"
"""

from __future__ import annotations

import hmac
import json
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import wire
from . import protocol, ring
from .walk import weight_matmuls


@dataclass
class ShareServer:
    ops: dict[str, ring.Weight]
    model: str  # what P3 sees in hello: the model's type and the start of its fingerprint
    fingerprint: str  # ring.fingerprint of the weights
    token: str | None = None
    max_rows: int = 65536
    observe: Callable[[str, np.ndarray], None] | None = None  # sees (op, share) of every matmul: the attacks' hook
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, src: str | Path, limbs: int = ring.LIMBS, **kwargs) -> "ShareServer":
        from ..seal import load_source

        return cls.from_model(load_source(src), limbs, **kwargs)

    @classmethod
    def from_model(cls, model, limbs: int = ring.LIMBS, **kwargs) -> "ShareServer":
        """From a loaded `transformers` model (one `stip.models.blocks` reads)."""
        from ..models.blocks import from_hf

        cfg, params = from_hf(model)
        matmuls = weight_matmuls(cfg, params)
        digest = ring.fingerprint(matmuls)
        ops = {name: ring.Weight.encode(w, limbs) for name, w in matmuls.items()}
        return cls(ops, f"{model.config.model_type}-{digest[:16]}", digest, **kwargs)

    def hello(self) -> dict:
        limbs = next(iter(self.ops.values())).limbs if self.ops else ring.LIMBS
        return {"model": self.model, "ops": {k: list(w.shape) for k, w in self.ops.items()},
                "limbs": limbs, "fingerprint": self.fingerprint}  # fmt: skip

    def answer(self, blob: bytes, authed: bool = True) -> tuple[bytes, bool]:
        """One request → (one reply, whether the connection is now authenticated). Bad input
        gets an error reply, never an exception; nothing but hello before a good hello."""
        try:
            tensors, meta = wire.decode(blob, protocol.REQUEST)
            op = meta.get("op")
            if op == protocol.HELLO:
                if self.token is not None and not hmac.compare_digest(str(meta.get("token", "")).encode(), self.token.encode()):
                    return _error("unauthorised: wrong or missing token"), False
                return wire.encode({}, {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.hello().items()}), True
            if not authed:
                return _error("unauthorised: send hello with the token first"), False
            weight = self.ops.get(op)
            if weight is None:
                return _error(f"unknown matmul {op!r}"), authed
            if "x" not in tensors:
                return _error(f"{op}: missing tensor 'x'"), authed
            x = tensors["x"].numpy()
            if x.shape[1] != weight.shape[0] or not 0 < x.shape[0] <= self.max_rows:
                return _error(f"{op} takes (1..{self.max_rows}, {weight.shape[0]}); got {list(x.shape)}"), authed
            if self.observe is not None:
                with self._lock:
                    self.observe(op, x)
            t0 = time.perf_counter()
            y = ring.matmul(x, weight)
            return wire.encode({"y": torch.from_numpy(y)}, {"seconds": f"{time.perf_counter() - t0:.6f}"}), authed
        except wire.WireError as e:
            return _error(str(e)), authed

    def listen(self, host: str = "127.0.0.1", port: int = 0) -> "Bound":
        return Bound(self, host, port)


def _error(message: str) -> bytes:
    return wire.encode({}, {"error": message})


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = protocol.nodelay(self.request)
        authed = self.server.share.token is None
        try:
            while True:
                reply, authed = self.server.share.answer(protocol.recv(sock), authed)
                protocol.send(sock, reply)
        except (ConnectionError, OSError):
            return  # the client went away, or broke the framing: drop the connection


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Bound:
    """A listening share server, serving on a background thread until closed."""

    def __init__(self, share: ShareServer, host: str, port: int):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        _TCPServer.address_family = family
        self.tcp = _TCPServer((host, port), _Handler)
        self.tcp.share = share
        self.address = f"{'[' + host + ']' if ':' in host else host}:{self.tcp.server_address[1]}"
        self.thread = threading.Thread(target=self.tcp.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.tcp.shutdown()
        self.tcp.server_close()

    def __enter__(self) -> "Bound":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
