"""A share server (S1 or S2): public weights, ring matmuls on shares, many users' in one GEMM.

It never sees an activation, only one additive share of it: uniform ring elements. It holds
no state between requests (P3 keeps the KV cache), and never talks to the other server, so a
restarted server or another replica of the same party answers exactly as this one would.

    server = ShareServer.load("minilm")                    # the public model's weight matmuls
    with server.listen("0.0.0.0", 7001, tls=ctx) as bound:  # a thread per connection; same-op requests share GEMMs
        ...                                                 # bound.address = "0.0.0.0:7001"
    bound.drain(30.0)                                       # SIGTERM: answer what is in flight, then stop

A stranger gets little: one small frame (the hello) within `Limits.hello_seconds`, TLS
handshake included, and a bounded number of connections. Every refusal is an error frame or
a closed socket; nothing a peer sends ends the server. Logs carry one summary per connection
(peer, frames, bytes, why it ended), never a share value.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import wire
from ..models.source import load_source
from . import protocol, ring
from .batch import WINDOW, Batcher
from .walk import folded_matmuls, plain_matmuls, zero_block

log = logging.getLogger("stip.shares.server")


@dataclass(frozen=True)
class Limits:
    connections: int = 256  # open at once; the next one is closed on accept
    hello_seconds: float = 10.0  # from accept to a good hello, TLS handshake included
    idle_seconds: float = 900.0  # between frames once authenticated (P3 keeps its sockets open)
    frame_seconds: float = 120.0  # for a frame to arrive once it has begun (a slow drip is cut)
    max_rows: int = 16384  # rows per matmul: a 16k-token prefill


@dataclass
class ShareServer:
    ops: dict[str, ring.Weight]
    model: str  # what P3 sees in hello: the model's type and the start of its fingerprint
    fingerprint: str  # ring.fingerprint of the weights
    token: str | None = None
    limits: Limits = Limits()
    observe: Callable[[str, np.ndarray], None] | None = None  # sees (op, share) of every matmul: the attacks' hook
    batch_window: float | None = WINDOW  # listening, stack same-op requests across connections (`batch`); None: each alone
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, src: str | Path, limbs: int = ring.LIMBS, **kwargs) -> "ShareServer":
        return cls.from_model(load_source(src), limbs, **kwargs)

    @classmethod
    def from_model(cls, model, limbs: int = ring.LIMBS, **kwargs) -> "ShareServer":
        """From a loaded `transformers` model (one `stip.models.blocks` reads)."""
        from ..models.blocks import from_hf

        cfg, params = from_hf(model)
        plain = plain_matmuls(cfg, params)
        digest = ring.fingerprint(plain)  # the folded ops are a function of these
        ops = {name: ring.Weight.encode(w, limbs) for name, w in plain.items()}
        for name, w in folded_matmuls(cfg, params, plain):  # both schedules: P3 picks
            ops[name] = ring.Weight.encode(w, limbs, zero_block(name, w, cfg.hidden))
        return cls(ops, f"{model.config.model_type}-{digest[:16]}", digest, **kwargs)

    @functools.cached_property
    def max_frame(self) -> int:
        """The largest request an authenticated peer may send: its largest matmul's rows."""
        widest = max((w.shape[0] for w in self.ops.values()), default=1)
        return self.limits.max_rows * widest * 8 + wire.MAX_HEADER + 8

    def hello(self) -> dict:
        limbs = next(iter(self.ops.values())).limbs if self.ops else ring.LIMBS
        return {"model": self.model, "ops": {k: list(w.shape) for k, w in self.ops.items()},
                "limbs": limbs, "fingerprint": self.fingerprint, "max_rows": self.limits.max_rows}  # fmt: skip

    def answer(self, blob: bytes, authed: bool = True, batcher: Batcher | None = None, who: object = None) -> tuple[bytes, bool]:
        """One request → (one reply, whether the connection is now authenticated). Bad input
        gets an error reply, never an exception; nothing but hello before a good hello. With a
        ``batcher``, the matmul joins other connections' (``who``: this one) in one GEMM."""
        try:
            tensors, meta = wire.decode(blob, protocol.REQUEST, numpy=True)
            op = meta.get("op")
            if op == protocol.HELLO:
                if self.token is not None and not hmac.compare_digest(str(meta.get("token", "")).encode(), self.token.encode()):
                    return _error("unauthorised: wrong or missing token"), False
                return wire.encode({}, {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.hello().items()}), True
            if not authed:
                return _error("unauthorised: send hello with the token first"), False
            weight = self.ops.get(op)
            if weight is None:
                return _error(f"unknown matmul {str(op)[:64]!r}"), authed
            if "x" not in tensors:
                return _error(f"{op}: missing tensor 'x'"), authed
            x = tensors["x"]
            if x.shape[1] != weight.shape[0] or not 0 < x.shape[0] <= self.limits.max_rows:
                return _error(f"{op} takes (1..{self.limits.max_rows}, {weight.shape[0]}); got {list(x.shape)}"), authed
            if self.observe is not None:
                with self._lock:
                    self.observe(op, x)
            if batcher is not None:
                y, seconds = batcher.matmul(op, x, who)
            else:
                t0 = time.perf_counter()
                y = ring.matmul(x, weight)
                seconds = time.perf_counter() - t0
            return wire.encode({"y": y}, {"seconds": f"{seconds:.6f}"}), authed
        except wire.WireError as e:
            return _error(str(e)), authed
        except Exception as e:  # a bug must not end the connection's thread silently, nor show a value
            log.error("internal error answering a request: %s", type(e).__name__)
            return _error(f"internal error ({type(e).__name__})"), authed

    def listen(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> "Bound":
        return Bound(self, host, port, tls)


class ByteCounts:
    """How often each byte value occurs at each of a ring element's 8 byte positions, over
    every share a server received: its whole view, in 16 KiB, for the uniformity test. An
    `observe` hook (`stip share-server --byte-counts`)."""

    def __init__(self):
        self.counts = np.zeros((8, 256), np.int64)
        self.elements = 0

    def __call__(self, op: str, x: np.ndarray) -> None:
        octets = np.ascontiguousarray(x, np.int64).view(np.uint8).reshape(-1, 8)
        self.counts += np.bincount((octets + _POSITIONS).reshape(-1), minlength=8 * 256).reshape(8, 256)
        self.elements += len(octets)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"elements": self.elements, "counts": self.counts.tolist()}))


_POSITIONS = np.arange(8, dtype=np.int64) * 256


def _error(message: str) -> bytes:
    return wire.encode({}, {"error": message})


class _Connection:
    """One peer: TLS handshake, one small hello, then matmuls until it leaves or idles out."""

    def __init__(self, bound: "Bound", sock: socket.socket, peer: str):
        self.bound, self.sock, self.peer = bound, sock, peer
        self.busy = False  # a whole request is in hand: drain waits for its answer
        self.frames = self.bytes_in = self.bytes_out = 0

    def run(self) -> None:
        share, limits, t0 = self.bound.share, self.bound.share.limits, time.monotonic()
        authed, why = False, "closed by the peer"
        try:
            self.sock.settimeout(limits.hello_seconds)
            if self.bound.tls is not None:
                self.sock = self.bound.tls.wrap_socket(self.sock, server_side=True)
            protocol.nodelay(self.sock)
            while not self.bound.draining:
                if authed:  # the socket's timeout is the idle limit: recv puts it back after each frame
                    blob = protocol.recv(self.sock, share.max_frame, limits.frame_seconds)
                else:  # one deadline for the hello, however slowly its bytes drip
                    blob = protocol.recv(self.sock, protocol.HELLO_FRAME, deadline=t0 + limits.hello_seconds)
                self.busy, was_authed = True, authed
                self.frames, self.bytes_in = self.frames + 1, self.bytes_in + len(blob) + 8
                reply, authed = share.answer(blob, authed, self.bound.batcher, self)
                if authed and not was_authed:
                    self.bound.authenticated += 1
                    self.sock.settimeout(limits.idle_seconds)
                self.bytes_out += protocol.send(self.sock, reply)
                self.busy = False
                if not was_authed and not authed:
                    why = "refused: the first frame was not a good hello"
                    return
            why = "drained"
        except protocol.FrameTooLarge as e:
            why = f"refused: a frame of {e.n} bytes over the limit of {e.limit}{'' if authed else ' before hello'}"
            self._try_send(_error(why.removeprefix("refused: ")))
        except (TimeoutError, socket.timeout):
            why = "idle too long" if authed else "no hello in time"
        except ssl.SSLEOFError:
            why = "closed by the peer"  # before or during the handshake: a health check, say
        except ssl.SSLError as e:
            why = f"TLS failed ({e.reason or type(e).__name__})"
        except (ConnectionError, OSError) as e:
            why = "closed by the peer" if isinstance(e, ConnectionResetError) else f"connection error ({type(e).__name__})"
        except Exception as e:  # never let one peer's bytes end more than its own connection
            why = f"internal error ({type(e).__name__})"
            log.error("%s: %s", self.peer, why)
        finally:
            self.busy = False
            try:
                self.sock.close()
            except OSError:
                pass
            self.bound._gone(self)
            if self.bound.batcher is not None:
                self.bound.batcher.leave(self)
            quiet = self.frames == 0 and why == "closed by the peer"  # a load balancer's health check
            log.log(logging.DEBUG if quiet else logging.INFO, "%s: %d frames, %d B in, %d B out, %s, %.1f s: %s", self.peer, self.frames, self.bytes_in,
                     self.bytes_out, "authenticated" if authed else "never authenticated", time.monotonic() - t0, why)  # fmt: skip

    def _try_send(self, blob: bytes) -> None:
        try:
            self.sock.settimeout(1.0)
            protocol.send(self.sock, blob)
        except OSError:
            pass

    def hang_up(self) -> None:
        try:  # the plain socket's shutdown: SSLSocket's would pull its state from under a reader
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass


class Bound:
    """A listening share server, accepting on a background thread until drained or closed."""

    def __init__(self, share: ShareServer, host: str, port: int, tls: ssl.SSLContext | None = None):
        self.share, self.tls = share, tls
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=512)
        self.sock.settimeout(0.2)  # the accept loop looks at `closing` this often
        self.address = f"{'[' + host + ']' if ':' in host else host}:{self.sock.getsockname()[1]}"
        self.batcher = None if share.batch_window is None else Batcher(share.ops, share.batch_window, share.limits.max_rows)
        self.draining = self.closing = False
        self.authenticated = 0  # good hellos so far
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()
        self._mutex = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name="stip-share-accept", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                sock, peer = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self.closing:
                    return
                time.sleep(0.05)  # out of file descriptors, say: wait, never die
                continue
            where = f"{peer[0]}:{peer[1]}"
            with self._mutex:
                full = len(self._conns) >= self.share.limits.connections
                if not full:
                    conn = _Connection(self, sock, where)
                    t = threading.Thread(target=conn.run, name=f"stip-share {where}", daemon=True)
                    self._conns.add(conn)
                    self._threads.add(t)
            if full:
                sock.close()
                log.warning("%s: refused: %d connections open, the limit", where, self.share.limits.connections)
                continue
            t.start()

    def _gone(self, conn: _Connection) -> None:
        with self._mutex:
            self._conns.discard(conn)
            self._threads.discard(threading.current_thread())

    @property
    def connections(self) -> int:
        with self._mutex:
            return len(self._conns)

    def drain(self, seconds: float = 30.0) -> bool:
        """Stop accepting, answer every request already received, hang up the idle
        connections (P3 reconnects elsewhere and re-sends); True when all ended in time."""
        self.closing = self.draining = True
        self.thread.join()
        self.sock.close()
        with self._mutex:
            idle = [c for c in self._conns if not c.busy]
        for c in idle:
            c.hang_up()
        deadline = time.monotonic() + seconds
        while self.connections and time.monotonic() < deadline:
            with self._mutex:
                idle = [c for c in self._conns if not c.busy]
            for c in idle:  # a busy one that has answered is idle now
                c.hang_up()
            time.sleep(0.02)
        return not self.connections

    def close(self) -> None:
        self.drain(0.0)
        with self._mutex:
            rest, threads = list(self._conns), list(self._threads)
        for c in rest:
            c.hang_up()
        for t in threads:
            t.join(2.0)
        if self.batcher is not None:
            self.batcher.close()

    def __enter__(self) -> "Bound":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
