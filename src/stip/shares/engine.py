"""Shares mode behind `stip proxy`: the engine is P3's own loop with two share servers.

The proxy hands it an `Ask` (prompt ids, max_tokens, sampling, n, stop ids) and reads
`Piece`s back as tokens come: P3's own loop (`generation.walk`), on real ids. Up to ``streams``
generations run at once, each a walker of its own (`SharesModel.fork`: the weights shared, a
connection pair of its own, opened when first needed); more requests wait their turn. The share
servers batch the walkers' matmuls with every other user's. Masks can be prepared with S1 in the
background (``prepare_tokens``), on a connection of their own per walker.

    engine = SharesEngine(SharesModel("smollm2", Servers([s1, s2])), streams=16)
    app = create_app(engine.local(), engine)
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import torch

from ..client.generation import Ask, Piece, walk
from ..client.proxy import Local, ProxyError, threaded, upstream_failure
from .client import SharesError, SharesModel


log = logging.getLogger("stip.shares")


class SharesEngine:
    """``streams``: generations at once. ``prepare_tokens``: keep masks for that many positions
    of every matmul prepared with S1 in the background (`Servers.prepare`), so that requests
    mostly ask S2 alone; 0: never."""

    def __init__(self, model: SharesModel, prepare_tokens: int = 0, streams: int = 1):
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self.model, self.streams = model, streams
        self.walkers = [model]  # every walker made so far; the idle ones wait in _idle
        self._idle: asyncio.Queue | None = None
        self._made = threading.Lock()
        self._pool = ThreadPoolExecutor(streams, thread_name_prefix="stip-shares-walk")
        self.prepare_tokens = prepare_tokens
        self._stop = threading.Event()
        self._filler = None
        if prepare_tokens:
            self._filler = threading.Thread(target=self._top_up, name="stip-shares-masks", daemon=True)
            self._filler.start()

    def _top_up(self) -> None:
        names = self.model.walk.ops()  # every matmul of its schedule
        while not self._stop.wait(0.05):
            with self._made:
                walkers = [w for w in self.walkers if w is not None]  # None: one still connecting
            for servers in (w.servers for w in walkers):
                if all(servers.prepared(n) >= self.prepare_tokens // 2 for n in names):
                    continue
                try:
                    servers.prepare([(n, self.prepare_tokens - servers.prepared(n)) for n in names])
                except (SharesError, ConnectionError, OSError) as e:
                    if self._stop.is_set():
                        return
                    log.warning("preparing masks with S1 failed (%s); requests ask both servers meanwhile", e)
                    self._stop.wait(5.0)

    async def _walker(self) -> SharesModel:
        """An idle walker, a new one while fewer than ``streams`` exist, else the next one freed."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            self._idle.put_nowait(self.model)
        if self._idle.empty() and len(self.walkers) < self.streams:
            with self._made:
                self.walkers.append(None)  # the place is taken while it connects
            try:
                walker = await asyncio.get_running_loop().run_in_executor(self._pool, self.model.fork)
            except BaseException:
                with self._made:
                    self.walkers.remove(None)
                raise
            with self._made:
                self.walkers[self.walkers.index(None)] = walker
            return walker
        return await self._idle.get()

    def local(self) -> Local:
        cfg = self.model.config
        fingerprint = self.model.servers.hellos[0].get("fingerprint", "")
        return Local(self.model.path, cfg, fingerprint, cfg.vocab_size)

    async def check(self, local: Local) -> None:
        pass  # P3 checked the servers' weights against its own when it connected

    async def generate(self, ask: Ask) -> AsyncIterator[Piece]:
        """Stream ``ask``'s pieces from a walker (`generation.walk`); leaving the loop early
        stops the walk."""
        try:
            model = await self._walker()
        except (SharesError, ConnectionError, OSError) as e:
            raise ProxyError(503, f"shares mode: {e}", "upstream_unavailable") from None
        try:
            async for piece in threaded(self._pool, lambda emit: walk(model.engine, ask, model.vocab, emit)):
                yield piece
        except Exception as e:
            raise upstream_failure(e, "shares mode", down=503) from None  # P3 retried for --timeout
        finally:
            self._idle.put_nowait(model)

    async def embed(self, inputs: dict) -> torch.Tensor:
        model = await self._walker()
        try:
            enc = await asyncio.get_running_loop().run_in_executor(self._pool, model.encode_ids, inputs["input_ids"], inputs["attention_mask"])
        except Exception as e:
            raise upstream_failure(e, "shares mode", down=503) from None
        finally:
            self._idle.put_nowait(model)
        return enc.embedding

    async def close(self) -> None:
        self._stop.set()
        if self._filler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._filler.join, 10.0)
        self._pool.shutdown(wait=False)
        with self._made:
            walkers = [w for w in self.walkers if w is not None]
        for w in walkers:
            w.servers.close()
