"""Cross-user batching: one GEMM for every connection's request for the same matmul.

Decoding sends one row per matmul, and a one-row product reads the whole weight matrix from
memory: sixteen users decoding at once cost sixteen reads. The batcher stacks the requests for
one op that are pending, from any connections, into a single `ring.matmul` and hands each
request its own rows back. Rows never mix: a matmul acts on each row alone, and the split is by
position in the stack.

    batcher = Batcher(server.ops, window=0.02)
    y, seconds = batcher.matmul(op, x, who=connection)   # from a connection's thread; blocks until answered
    batcher.leave(connection)                            # it hung up: never wait for it again

No thread of its own: the connection thread that finds no GEMM running leads. It runs batches
until its own request is answered, then hands the lead to the oldest waiting request. A lone
user's request therefore runs on its own thread at once, as it would unbatched.

The window is adaptive. After a batch, the leader waits for that batch's connections (its
riders) to come back with their next request, and for no one else; once all are back it runs,
and it never waits over ``window`` seconds. A lone user is its own only rider: it is back the
moment it asks. A rider that is slow once (its P3 computed the head, say) costs the others one
wait; one that hangs up or goes idle, one window, once. Waiting out the window is cheaper than
it looks: a batch run without a late rider splits the users into two groups, and each op then
reads its weights twice until they merge again. Users drift out of step (their P3s' work
differs), so the leader serves the op at the back of the pack, the pending op furthest behind
in a pass: the front then arrives at the op the laggards are at, and the groups merge instead
of taking turns.

Mask preparation (`Servers.prepare`) is ordinary matmul traffic with more rows: batched the
same way.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import ring

log = logging.getLogger("stip.shares.server")

WINDOW = 0.02  # seconds a leader waits at most for a batch's riders
_STAGE = {"qkv": 0, "o": 1, "o+up": 1, "up": 2, "down": 3, "down+qkv": 3}


def positions(ops) -> dict[str, int]:
    """Where each op sits in a forward pass: layer i's qkv, o, up and down at 4i … 4i+3 (a
    folded op where its first matmul is), the head after the last layer. Unknown names: 0."""
    at = {}
    for op in ops:
        m = re.fullmatch(r"(\d+)\.(.+)", op)
        at[op] = 4 * int(m.group(1)) + _STAGE.get(m.group(2), 0) if m else 0
    if "head" in at:
        at["head"] = max((v for k, v in at.items() if k != "head"), default=0) + 1
    return at


def furthest_behind(ops: list[str], at: dict[str, int]) -> str:
    """The op just after the widest gap between pending ops, going round a pass (``at``: the
    ops' positions): the tail of the pack. Ops at one position break ties by name."""
    period = max(at.values()) + 1
    spots = sorted(set(ops), key=lambda o: (at[o], o))
    if len(spots) == 1:
        return spots[0]
    gaps = [(at[spots[i]] - at[spots[i - 1]]) % period for i in range(len(spots))]  # the gap before each op
    return spots[max(range(len(spots)), key=lambda i: (gaps[i], -i))]


@dataclass
class _Request:
    op: str
    x: np.ndarray
    who: object
    woken: threading.Event = field(default_factory=threading.Event)  # answered, or asked to lead
    y: np.ndarray | None = None
    seconds: float = 0.0  # its share of the GEMM's time, by rows
    error: BaseException | None = None

    @property
    def answered(self) -> bool:
        return self.y is not None or self.error is not None


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    largest: int = 0  # requests in the largest batch
    waited_seconds: float = 0.0  # the leaders' waits for riders, in all
    gemm_seconds: float = 0.0  # the GEMMs themselves, stacking and splitting included

    @property
    def mean_requests(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class Batcher:
    """One server's GEMMs: requests from connection threads, one leading at a time (above)."""

    def __init__(self, ops: dict[str, ring.Weight], window: float = WINDOW, max_rows: int = 16384):
        if window < 0:
            raise ValueError("the batching window cannot be negative")
        self.ops, self.window, self.max_rows = ops, window, max_rows
        self.at = positions(ops)
        self.stats = BatchStats()
        self._pending: list[_Request] = []
        self._riders: set = set()  # the last batch's connections, still open
        self._missing: set = set()  # the riders with no request pending
        self._cond = threading.Condition()
        self._leading = False  # a thread is leading: waiting for riders or in a GEMM
        self._closed = False

    def matmul(self, op: str, x: np.ndarray, who: object) -> tuple[np.ndarray, float]:
        """x · W̃ of ``op`` for one request (checked by the caller) → (y, its seconds of GEMM)."""
        mine = _Request(op, x, who)
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._pending.append(mine)
            self._missing.discard(who)
            lead = not self._leading
            self._leading = True
            if not lead and not self._missing:  # the leader waits for no one else now
                self._cond.notify()
        if not lead:
            mine.woken.wait()
        if not mine.answered:  # handed the lead
            self._lead(mine)
        if mine.error is not None:
            raise mine.error
        return mine.y, mine.seconds

    def leave(self, who: object) -> None:
        with self._cond:
            self._riders.discard(who)
            self._missing.discard(who)
            if not self._missing:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._missing = set()
            self._cond.notify_all()
        if self.stats.batches:
            s = self.stats
            log.info("batching: %d requests in %d GEMMs (%.2f a GEMM, %d at most), %.1f s in GEMMs, %.1f s waiting for riders",
                     s.requests, s.batches, s.mean_requests, s.largest, s.gemm_seconds, s.waited_seconds)  # fmt: skip

    def _lead(self, mine: _Request) -> None:
        try:
            while not mine.answered:
                with self._cond:
                    t0 = time.perf_counter()
                    deadline = time.monotonic() + self.window
                    while not self._closed and self._missing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self.stats.waited_seconds += time.perf_counter() - t0
                    batch = self._take()
                    self._riders = {r.who for r in batch}
                    self._missing = self._riders - {r.who for r in self._pending}
                self._run(batch)
        finally:
            with self._cond:  # the lead goes to the oldest waiting request, or lapses
                if self._pending:
                    self._pending[0].woken.set()
                else:
                    self._leading = False

    def _take(self) -> list[_Request]:
        """The pending requests for the op furthest behind, up to ``max_rows`` rows (always one)."""
        op = furthest_behind([r.op for r in self._pending], self.at)
        batch, rest, rows = [], [], 0
        for r in self._pending:
            if r.op == op and (not batch or rows + len(r.x) <= self.max_rows):
                batch.append(r)
                rows += len(r.x)
            else:
                rest.append(r)
        self._pending = rest
        return batch

    def _run(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            y = ring.matmul(x, self.ops[batch[0].op])
            seconds = time.perf_counter() - t0
            at = 0
            for r in batch:
                r.y, r.seconds = y[at : at + len(r.x)], seconds * len(r.x) / len(x)
                at += len(r.x)
        except BaseException as e:  # MemoryError, say: every rider gets it, the server lives on
            for r in batch:
                r.error = e
        s = self.stats
        s.gemm_seconds += time.perf_counter() - t0
        s.batches, s.requests, s.rows = s.batches + 1, s.requests + len(batch), s.rows + sum(len(r.x) for r in batch)
        s.largest = max(s.largest, len(batch))
        for r in batch:
            r.woken.set()
