"""P3 in shares mode: the public model here, its weight matmuls at two share servers.

    with Servers(["127.0.0.1:7001", "127.0.0.1:7002"]) as servers:
        model = SharesModel("smollm2", servers)
        model.generate(ids, 32).token_ids                # greedy, P3's KV cache
        model.encode(["a sentence"]).embedding           # encoders: mean-pooled, L2-normalised
        servers.stats                                    # rounds, bytes per server, time waiting

Every matmul input is shared afresh (`ring.share`); both servers are asked before either
answer is read, so they compute at the same time.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import wire
from . import protocol, ring
from .walk import Cache, Walk, weight_matmuls


class SharesError(RuntimeError):
    """A share server refused a request, or the two servers disagree."""


@dataclass
class Stats:
    rounds: int = 0  # dependent round trips (each to both servers at once)
    bytes_up: list[int] = field(default_factory=lambda: [0, 0])  # to S1, to S2 (frames included)
    bytes_down: list[int] = field(default_factory=lambda: [0, 0])
    wait_seconds: float = 0.0  # from the first byte sent to the last byte of both answers
    share_seconds: float = 0.0  # P3 encoding, sharing, framing and decoding
    server_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # each server's matmul time, as it reports

    def copy(self) -> "Stats":
        return Stats(self.rounds, list(self.bytes_up), list(self.bytes_down), self.wait_seconds, self.share_seconds,
                     list(self.server_seconds))  # fmt: skip

    def since(self, before: "Stats") -> "Stats":
        minus = lambda a, b: [x - y for x, y in zip(a, b)]  # noqa: E731
        return Stats(self.rounds - before.rounds, minus(self.bytes_up, before.bytes_up), minus(self.bytes_down, before.bytes_down),
                     self.wait_seconds - before.wait_seconds, self.share_seconds - before.share_seconds,
                     minus(self.server_seconds, before.server_seconds))  # fmt: skip


class Servers:
    """Persistent connections to S1 and S2. ``matmul(name, x)`` returns x·W in float."""

    def __init__(self, addresses: Sequence[str], *, token: str | None = None, timeout: float = 120.0):
        if len(addresses) != 2 or addresses[0] == addresses[1]:
            raise ValueError("shares mode takes exactly two different share servers: S1 and S2")
        self.addresses = list(addresses)
        self.stats = Stats()
        self.socks: list[socket.socket] = []
        try:
            for a in self.addresses:
                host, port = protocol.parse_address(a)
                try:
                    self.socks.append(protocol.nodelay(socket.create_connection((host, port), timeout=timeout)))
                except OSError as e:
                    raise ConnectionError(f"cannot reach the share server at {a}: {e.strerror or e}") from None
            hellos = self._ask([wire.encode({}, {"op": protocol.HELLO, **({"token": token} if token else {})})] * 2)
        except BaseException:
            self.close()
            raise
        self.hellos = [meta for _, meta in hellos]
        self.stats = Stats()  # inference traffic only, from here on
        if self.hellos[0].get("exponents") != self.hellos[1].get("exponents"):
            raise SharesError(f"the share servers hold different models: {self.hellos[0].get('model')} and {self.hellos[1].get('model')}")
        self.model = self.hellos[0].get("model", "?")
        self.limbs = int(self.hellos[0].get("limbs", ring.LIMBS))
        self.exponents: dict[str, np.ndarray] = {}

    def expect(self, matmuls: dict[str, np.ndarray]) -> None:
        """P3's own copy of the public weights: the servers must hold the same ones."""
        self.exponents = {k: ring.exponents(w, self.limbs) for k, w in matmuls.items()}
        mine = ring.fingerprint({k: (w.shape, self.exponents[k]) for k, w in matmuls.items()})
        if mine != self.hellos[0].get("exponents"):
            raise SharesError(f"the share servers hold {self.model}, not the model P3 loaded (fingerprint {mine[:16]})")

    def matmul(self, name: str, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        x, rows = ring.encode(x.detach().numpy(), self.limbs)
        a, b = ring.share(x)
        blobs = [wire.encode({"x": torch.from_numpy(s)}, {"op": name}) for s in (a, b)]
        self.stats.share_seconds += time.perf_counter() - t0
        (ya, _), (yb, _) = self._ask(blobs)
        t1 = time.perf_counter()
        y = ring.decode(ring.reconstruct(ya["y"].numpy(), yb["y"].numpy()), rows, self.exponents[name])
        self.stats.share_seconds += time.perf_counter() - t1
        return torch.from_numpy(y.astype(np.float32))

    def _ask(self, blobs: list[bytes]) -> list[tuple[dict, dict]]:
        """Send to both, then read both: the servers work at the same time."""
        t0 = time.perf_counter()
        for i, (sock, blob) in enumerate(zip(self.socks, blobs)):
            self.stats.bytes_up[i] += self._io(i, lambda: protocol.send(sock, blob))
        replies = [self._io(i, lambda: protocol.recv(sock)) for i, sock in enumerate(self.socks)]
        self.stats.wait_seconds += time.perf_counter() - t0
        self.stats.rounds += 1
        out = []
        for i, r in enumerate(replies):
            self.stats.bytes_down[i] += len(r) + 8
            tensors, meta = wire.decode(r)
            if "error" in meta:
                raise SharesError(f"S{i + 1} ({self.addresses[i]}) refused: {meta['error']}")
            self.stats.server_seconds[i] += float(meta.get("seconds", 0.0))
            out.append((tensors, meta))
        return out

    def _io(self, i: int, fn):
        try:
            return fn()
        except (OSError, ConnectionError) as e:
            raise ConnectionError(f"lost the share server S{i + 1} at {self.addresses[i]}: {e}") from None

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Generation:
    token_ids: list[int]
    prompt_ids: list[int]
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, when asked for
    text: str | None = None


@dataclass
class Encoding:
    last_hidden_state: torch.Tensor
    attention_mask: torch.Tensor
    embedding: torch.Tensor


class SharesModel:
    """The user's side. Loads the public model (a local HF folder), checks the servers hold
    the same weights, and walks it with ``servers`` doing the weight matmuls."""

    def __init__(self, src, servers: Servers):
        """``src``: a local HF folder, or an already loaded `transformers` model."""
        from ..models.blocks import from_hf
        from ..seal import load_source

        loaded = not isinstance(src, (str, Path))
        self.path = None if loaded else Path(src)
        self.hf = src.eval() if loaded else load_source(src)
        self.config = self.hf.config
        self.cfg, params = from_hf(self.hf)
        servers.expect(weight_matmuls(self.cfg, params))
        self.servers = servers
        self.walk = Walk(self.cfg, params, servers.matmul)
        self._tokenizer = None

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

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: set[int] | frozenset[int] = frozenset(),
        min_tokens: int = 0,
        keep_logits: bool = False,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Greedy at temperature 0, else temperature and top-p sampling, all here. The prompt
        goes in one prefill; then one token per step, through P3's KV cache."""
        from ..client.api import sample

        if not self.cfg.causal or self.cfg.head is None:
            raise ValueError(f"{self.config.model_type} is not a causal language model")
        if not prompt:
            raise ValueError("empty prompt")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cache, out = Cache(), Generation([], list(prompt))
        logits = self.walk.forward(self.embed(torch.tensor([prompt])), cache=cache)
        while True:
            row = logits[0, -1]
            if keep_logits:
                out.logits.append(row.clone())
            if len(out.token_ids) < min_tokens:
                row = row.clone()
                row[list(stop)] = float("-inf")
            token = int(row.argmax()) if temperature == 0 else sample(row, temperature, top_p, gen)
            out.token_ids.append(token)
            if on_token is not None:
                on_token(token)
            if token in stop or len(out.token_ids) == max_new_tokens:
                return out
            logits = self.walk.forward(self.embed(torch.tensor([[token]]), cache.seen), cache=cache)
