"""P3 in shares mode: the public model here, its weight matmuls at two share servers.

    with Servers(["127.0.0.1:7001", "127.0.0.1:7002"]) as servers:
        model = SharesModel("smollm2", servers)          # adapter="my-lora": a private fine-tune, on P3
        model.generate(ids, 32).token_ids                # greedy, P3's KV cache
        model.encode(["a sentence"]).embedding           # encoders: mean-pooled, L2-normalised
        servers.stats                                    # rounds, bytes per server, time waiting

Every matmul input is shared afresh (`ring.share`); both servers are asked before either
answer is read, so they compute at the same time.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import StipError
from .. import tls, wire
from ..client.api import Encoding
from ..client.generation import Generation, Sampling, eos_ids, generate
from ..models.source import load_source
from . import protocol, ring
from .walk import Cache, Walk, folded_matmuls, plain_matmuls

log = logging.getLogger("stip.shares")


@contextmanager
def one_thread():
    """P3 on one thread. A decode step's own work is tiny, and where P3 shares a machine's
    cores with the share servers (tests, benchmarks, a laptop), spinning BLAS and OpenMP threads
    steal the servers' cores (measured on 2 cores: 0.75 → 0.46 s per SmolLM2 token)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


class SharesError(StipError, RuntimeError):
    """A share server refused a request, or the two servers disagree."""


@dataclass
class Stats:
    rounds: int = 0  # dependent round trips (each to both servers at once)
    bytes_up: list[int] = field(default_factory=lambda: [0, 0])  # to S1, to S2 (frames included)
    bytes_down: list[int] = field(default_factory=lambda: [0, 0])
    wait_seconds: float = 0.0  # from the first byte sent to the last byte of both answers
    share_seconds: float = 0.0  # P3 encoding, sharing, framing and decoding
    server_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # each server's matmul time, as it reports
    reconnects: int = 0  # requests re-sent after a lost connection

    def copy(self) -> "Stats":
        return Stats(**{k: list(v) if isinstance(v, list) else v for k, v in vars(self).items()})

    def since(self, before: "Stats") -> "Stats":
        def minus(a, b):
            return [x - y for x, y in zip(a, b)] if isinstance(a, list) else a - b

        return Stats(**{k: minus(v, getattr(before, k)) for k, v in vars(self).items()})


class _Link:
    """P3's connection to one party, S1 or S2, over any of its replicas. It reconnects on
    demand, verifies the peer (TLS pin or CA) before the hello, and checks that each new
    replica holds the weights the first one did."""

    def __init__(self, party: int, replicas: list[str], trust: tls.Trust | None, insecure: bool, timeout: float):
        self.party, self.replicas, self.trust, self.timeout = party, replicas, trust, timeout
        self.name = f"S{party + 1}"
        self.sock: socket.socket | None = None
        self.at = 0  # the replica in use, or the next one to try
        self.fingerprint: str | None = None
        if trust is None:
            for r in replicas:
                tls.plain_allowed(protocol.parse_address(r)[0], insecure, f"share server {self.name}")

    @property
    def address(self) -> str:
        return self.replicas[self.at]

    def connect(self, hello: bytes) -> dict:
        """Connect to the current replica and say hello; its hello's meta."""
        host, port = protocol.parse_address(self.address)
        try:
            sock = protocol.nodelay(tls.connect(host, port, self.trust, self.timeout))
        except tls.TrustError:
            raise
        except (OSError, ssl.SSLError) as e:
            raise ConnectionError(f"cannot reach the share server {self.name} at {self.address}: {_why(e)}") from None
        try:
            protocol.send(sock, hello)
            tensors, meta = wire.decode(protocol.recv(sock))
        except (OSError, ConnectionError, wire.WireError) as e:
            sock.close()
            hint = "" if self.trust else " (a TLS server? give its pin or CA)"
            raise ConnectionError(f"the share server {self.name} at {self.address} closed the connection during hello{hint}: {_why(e)}") from None
        if "error" in meta:
            sock.close()
            raise SharesError(f"{self.name} ({self.address}) refused: {meta['error']}")
        if self.fingerprint is not None and meta.get("fingerprint") != self.fingerprint:
            sock.close()
            raise SharesError(f"{self.name} replica {self.address} holds {meta.get('model')}, not the model its party served before")
        self.sock = sock
        return meta

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.drop()


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class Servers:
    """Persistent connections to S1 and S2. ``matmul(name, x)`` returns x·W in float.

    ``parties``: two entries, S1's and S2's, each one address or several replicas of the same
    party (a list, or ``"HOST:PORT|HOST:PORT"``). ``trust``: per party, a `stip.tls.Trust`
    (pin or CA), or None for plain TCP, allowed only on loopback or when ``insecure``.
    A lost connection is re-made, on the same replica or the next, with backoff for up to
    ``retry_seconds``, and the request in flight re-sent: the servers keep no state."""

    def __init__(
        self,
        parties: Sequence[str | Sequence[str]],
        *,
        token: str | None = None,
        timeout: float = 120.0,
        trust: Sequence[tls.Trust | None] | None = None,
        insecure: bool = False,
        retry_seconds: float | None = None,
    ):
        replicas = [_replicas(p) for p in parties]
        if len(replicas) != 2 or set(replicas[0]) & set(replicas[1]):
            raise ValueError("shares mode takes exactly two different share servers: S1 and S2")
        trust = list(trust) if trust is not None else [None, None]
        if len(trust) != 2:
            raise ValueError("give one trust (pin or CA) per party: S1's and S2's")
        self._token, self._timeout = token, timeout
        self._args = (parties, dict(token=token, timeout=timeout, trust=trust, insecure=insecure, retry_seconds=retry_seconds))
        self.retry_seconds = timeout if retry_seconds is None else retry_seconds
        self.links = [_Link(i, r, t, insecure, timeout) for i, (r, t) in enumerate(zip(replicas, trust))]
        self._offline: _Link | None = None  # prepare()'s own connection to S1
        self._lock = threading.Lock()  # the mask pool: prepare() may run on another thread
        self.stats = Stats()
        try:
            self.hellos = [link.connect(self._hello()) for link in self.links]
        except BaseException:
            self.close()
            raise
        if self.hellos[0].get("fingerprint") != self.hellos[1].get("fingerprint"):
            self.close()
            raise SharesError(f"the share servers hold different models: {self.hellos[0].get('model')} and {self.hellos[1].get('model')}")
        for link in self.links:
            link.fingerprint = self.hellos[0].get("fingerprint")
        self.model = self.hellos[0].get("model", "?")
        self.ops = {k: tuple(v) for k, v in json.loads(self.hellos[0].get("ops", "{}")).items()}  # name → (in, out)
        self.exponents: dict[str, np.ndarray] = {}
        self.offline = Stats()  # prepare()'s traffic
        self.masks: dict[str, deque] = {}  # name → prepared blocks of rows (R, R·W̃), each row used once

    def another(self) -> "Servers":
        """New connections to the same parties, on the same terms: one pair per concurrent walk."""
        other = Servers(self._args[0], **self._args[1])
        if other.hellos[0].get("fingerprint") != self.hellos[0].get("fingerprint"):
            other.close()
            raise SharesError(f"the share servers now hold {other.model}, not {self.model}")
        other.exponents = self.exponents  # read-only once P3 checked the weights
        return other

    @property
    def addresses(self) -> list[str]:
        """The replica each party is served by now."""
        return [link.address for link in self.links]

    def _hello(self) -> bytes:
        return wire.encode({}, {"op": protocol.HELLO, **({"token": self._token} if self._token else {})})

    def expect(self, matmuls: dict[str, np.ndarray], derived: Iterable[tuple[str, np.ndarray]] = ()) -> None:
        """P3's own copy of the public weights: the servers must hold the same ones. ``derived``:
        ops computed from them (the folded schedule's), whose column scales P3 needs too."""
        mine = ring.fingerprint(matmuls)
        if mine != self.hellos[0].get("fingerprint"):
            raise SharesError(f"the share servers hold {self.model}, not the model P3 loaded (fingerprint {mine[:16]})")
        self.exponents.update((k, ring.exponents(w)) for k, w in matmuls.items())  # kept: both schedules may share a connection
        self.exponents.update((k, ring.exponents(w)) for k, w in derived)

    def prepare(self, needs: Sequence[tuple[str, int]]) -> None:
        """The offline phase, before the input exists: for future matmuls (name, rows), fresh
        masks R go to S1 alone, which returns R·W̃. When the input comes, P3 sends only X − R
        to S2 and adds R·W̃ back: the online phase asks one server and moves half the bytes.
        S1 sees uniform masks, S2 uniform X − R: the same guarantee, the same non-collusion.
        Masks are rows (a matmul acts on each row alone), pooled per name, each used once."""
        rows: dict[str, int] = {}
        for name, n in needs:
            rows[name] = rows.get(name, 0) + n
        if self._offline is None:  # its own socket: online matmuls may run meanwhile
            s1 = self.links[0]
            self._offline = _Link(0, s1.replicas, s1.trust, True, self._timeout)
            self._offline.fingerprint, self._offline.at = s1.fingerprint, s1.at
        for name, n in rows.items():
            t0 = time.perf_counter()
            r = ring.uniform(n * self.ops[name][0]).reshape(n, -1)
            blob = wire.encode({"x": r}, {"op": name})
            self.offline.share_seconds += time.perf_counter() - t0
            ((y, _),) = self._ask([blob], to=(0,), stats=self.offline, links={0: self._offline})
            with self._lock:
                self.masks.setdefault(name, deque()).append((r, y["y"]))

    def prepared(self, name: str) -> int:
        """Rows of masks ready for ``name``."""
        with self._lock:
            return self._ready(name)

    def _ready(self, name: str) -> int:  # the caller holds the lock
        return sum(len(r) for r, _ in self.masks.get(name, ()))

    def _take(self, name: str, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``n`` rows of masks for ``name``, or None when fewer are ready."""
        with self._lock:
            return self._pop(self.masks[name], n) if self._ready(name) >= n else None

    @staticmethod
    def _pop(pool: deque, n: int) -> tuple[np.ndarray, np.ndarray]:
        rs, ys = [], []
        while n:
            r, y = pool.popleft()
            if len(r) > n:
                pool.appendleft((r[n:], y[n:]))
                r, y = r[:n], y[:n]
            rs.append(r)
            ys.append(y)
            n -= len(r)
        return (rs[0], ys[0]) if len(rs) == 1 else (np.concatenate(rs), np.concatenate(ys))

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x, rows = ring.encode(x.detach().numpy())
        mask = self._take(name, x.shape[0])
        if mask is not None:  # prepared: S2 alone
            r, y1 = mask
            blob = wire.encode({"x": x - r}, {"op": name})  # wraps mod 2^64
            self.stats.share_seconds += time.perf_counter() - t0
            ((answer, _),) = self._ask([blob], to=(1,))
            y2 = answer["y"]
        else:
            blobs = [wire.encode({"x": s}, {"op": name}) for s in ring.share(x)]  # NumPy in and out: no torch per frame
            self.stats.share_seconds += time.perf_counter() - t0
            (y1, _), (y2, _) = self._ask(blobs)
            y1, y2 = y1["y"], y2["y"]
        t1 = time.perf_counter()
        y = ring.decode(ring.reconstruct(y1, y2), rows, self.exponents[name])
        self.stats.share_seconds += time.perf_counter() - t1
        return torch.from_numpy(y.astype(np.float32))

    def _ask(self, blobs: list[bytes], to=(0, 1), stats: Stats | None = None, links=None) -> list[tuple[dict, dict]]:
        """Send to every server in ``to``, then read them all: they work at the same time. A
        party whose connection fails gets the same bytes again, once it is reconnected."""
        stats, links = stats or self.stats, links or dict(enumerate(self.links))
        t0 = time.perf_counter()
        replies: dict[int, bytes] = {}
        failed: set[int] = set()
        for i, blob in zip(to, blobs):
            try:
                if links[i].sock is None:
                    links[i].connect(self._hello())
                stats.bytes_up[i] += protocol.send(links[i].sock, blob)
            except (OSError, ConnectionError):
                failed.add(i)
        for i in to:
            if i not in failed:
                try:
                    replies[i] = protocol.recv(links[i].sock)
                except (OSError, ConnectionError):
                    failed.add(i)
        for i, blob in zip(to, blobs):
            if i in failed:
                replies[i] = self._resend(links[i], blob, stats)
        stats.wait_seconds += time.perf_counter() - t0
        stats.rounds += 1
        out = []
        for i in to:
            stats.bytes_down[i] += len(replies[i]) + 8
            tensors, meta = wire.decode(replies[i], numpy=True)
            if "error" in meta:
                raise SharesError(f"{links[i].name} ({links[i].address}) refused: {meta['error']}")
            stats.server_seconds[i] += float(meta.get("seconds", 0.0))
            out.append((tensors, meta))
        return out

    def _resend(self, link: _Link, blob: bytes, stats: Stats) -> bytes:
        """Reconnect with backoff (each replica in turn) and ask again. The party gets the
        very bytes it was sent before: a replay of its own view, nothing new."""
        link.drop()
        t0, pause, why = time.monotonic(), 0.05, "the connection broke"
        log.warning("%s at %s: connection lost; reconnecting", link.name, link.address)
        while True:
            for _ in link.replicas:
                try:
                    link.connect(self._hello())
                    stats.bytes_up[link.party] += protocol.send(link.sock, blob)
                    reply = protocol.recv(link.sock)
                    stats.reconnects += 1
                    log.warning("%s: reconnected to %s after %.1f s; the request was re-sent", link.name, link.address, time.monotonic() - t0)
                    return reply
                except tls.TrustError:
                    raise
                except (OSError, ConnectionError, SharesError) as e:
                    why = _why(e)
                    link.drop()
                    link.at = (link.at + 1) % len(link.replicas)
            if time.monotonic() - t0 + pause > self.retry_seconds:
                raise ConnectionError(f"lost the share server {link.name} ({'|'.join(link.replicas)}) for {time.monotonic() - t0:.0f} s: {why}")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def close(self) -> None:
        for link in [*self.links, *([self._offline] if self._offline else [])]:
            link.close()
        self._offline = None

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _replicas(party: str | Sequence[str]) -> list[str]:
    items = party.split("|") if isinstance(party, str) else list(party)
    items = [a.strip() for a in items if a.strip()]
    if not items:
        raise ValueError("each share server party needs at least one HOST:PORT")
    for a in items:
        protocol.parse_address(a)  # ValueError, naming it, when malformed
    return items


class SharesModel:
    """The user's side. Loads the public model (a local HF folder), checks the servers hold
    the same weights, and walks it with ``servers`` doing the weight matmuls, on the 2-round
    schedule (norms folded into block weights) or the 4-round one (``rounds=4``)."""

    def __init__(self, src, servers: Servers, rounds: int = 2, adapter=None):
        """``src``: a local HF folder, or an already loaded `transformers` model. ``adapter``:
        a PEFT LoRA folder (or a loaded `lora.Adapter`) that P3 applies itself; the servers
        multiply the public base only, and receive the same ops and shapes as without it."""
        from ..models import lora
        from ..models.blocks import from_hf

        loaded = not isinstance(src, (str, Path))
        self.path = None if loaded else Path(src)
        self.hf = src.eval() if loaded else load_source(src)
        self.config = self.hf.config
        self.cfg, params = from_hf(self.hf)
        self.adapter = lora.load(self.hf, adapter) if isinstance(adapter, (str, Path)) else adapter
        self.walk = Walk(self.cfg, params, servers.matmul, rounds, self.adapter)
        self.rounds = rounds
        missing = [op for op in self.walk.ops() if op not in servers.ops]
        if missing:
            raise SharesError(f"the share servers do not hold the {rounds}-round schedule's matmuls ({missing[0]}, …): "
                              "an older stip share-server? Use rounds=4 (--rounds 4)")  # fmt: skip
        plain = plain_matmuls(self.cfg, params)
        servers.expect(plain, folded_matmuls(self.cfg, params, plain) if rounds == 2 else ())
        self.servers = servers
        self._tokenizer = None

    def fork(self) -> "SharesModel":
        """Another walker on the same loaded model (weights shared, not copied) with connections
        of its own: one per generation running at the same time."""
        import copy

        other = copy.copy(self)
        other.servers = self.servers.another()
        other.walk = copy.copy(self.walk)
        other.walk.matmul, other.walk.adapter_seconds = other.servers.matmul, 0.0
        return other

    def plan(self, tokens: int, new_tokens: int = 0) -> list[tuple[str, int]]:
        """The matmuls (name, rows) one request will make, for ``Servers.prepare``: a pass over
        ``tokens`` positions and, for a chat model, the ``new_tokens`` − 1 decode steps after
        it. A dry walk on zeros: nothing is sent."""
        calls, real = [], self.walk.matmul

        def note(name, x):
            calls.append((name, x.shape[0]))
            return torch.zeros(x.shape[0], self.servers.ops[name][1])

        self.walk.matmul = note
        try:
            cache = Cache() if self.cfg.causal else None
            self.walk.forward(torch.zeros(1, tokens, self.cfg.hidden), cache=cache)
            for _ in range(max(new_tokens - 1, 0) if cache is not None else 0):
                self.walk.forward(torch.zeros(1, 1, self.cfg.hidden), cache=cache)
        finally:
            self.walk.matmul = real
        return calls

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if self.path is None:
                raise ValueError("a model passed in loaded has no tokenizer here: pass token ids")
            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tokenizer

    def embed(self, ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        from ..models.blocks import embed

        return torch.from_numpy(embed(self.hf, position_offset=offset, input_ids=ids))

    @torch.no_grad()
    def encode(self, texts: list[str], max_length: int | None = None) -> Encoding:
        """Hidden states and the sentence embedding (mean pooling, L2-normalised) of an encoder."""
        if self.cfg.causal:
            raise ValueError(f"{self.config.model_type} is a causal language model: use generate")
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return self.encode_ids(batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoding:
        from ..models.default import mean_pool

        h = self.walk.forward(self.embed(ids), mask)
        return Encoding(h, mask, torch.nn.functional.normalize(mean_pool(h, mask), dim=-1))

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One pass without a cache: ``logits`` of every position (LMs) or ``last_hidden_state``."""
        out = self.walk.forward(self.embed(ids), mask, head_rows="all")
        return {"logits" if self.cfg.head else "last_hidden_state": out}

    @contextmanager
    def engine(self):
        """One generation's `generation.Engine`: the walk with a KV cache of its own, here."""
        cache = Cache()

        @torch.no_grad()
        def step(ids: list[int], offset: int, every: bool) -> torch.Tensor:
            return self.walk.forward(self.embed(torch.tensor([ids]), offset), cache=cache, head_rows="all" if every else "last")[0]

        yield step

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        *,
        stop_at_eos: bool = True,
        min_tokens: int = 0,
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """`generation.generate` on this walk: greedy unless ``sampling`` says otherwise, all
        here. The prompt goes in one prefill; then one token per step, through P3's KV cache."""
        if not self.cfg.causal or self.cfg.head is None:
            raise ValueError(f"{self.config.model_type} is not a causal language model")
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]
        with self.engine() as step:
            g = generate(step, ids, max_new_tokens, sampling, vocab=self.vocab, stop=eos_ids(self.config) if stop_at_eos else frozenset(),
                         min_tokens=min_tokens, keep_logits=keep_logits, on_token=on_token)  # fmt: skip
        if self.path is not None and isinstance(prompt, str):
            g.text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True)
        return g

    @property
    def vocab(self) -> int:
        return self.config.vocab_size
