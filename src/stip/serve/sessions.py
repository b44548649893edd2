"""Generation sessions: a KV cache per session, held by P2 between the user's steps.

Session ids come from ``secrets`` (unguessable: they are bearer capabilities for a cache).
A session is used by one request at a time; a second concurrent step gets 409. Idle
sessions expire; at most ``max_sessions`` are open.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from ..wire import WireError

EXPIRED_MEMORY = 1024  # how many expired ids are remembered, to answer 410 instead of 404


@dataclass
class Session:
    id: str
    cache: object
    length: int
    last_used: float
    busy: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    def __init__(self, max_sessions: int = 64, idle_seconds: float = 300.0, clock=time.monotonic):
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def reserve(self) -> None:
        """Refuse early when full, before spending a forward pass on the prompt."""
        with self._lock:
            self._sweep()
            if len(self._sessions) >= self.max_sessions:
                raise WireError(f"too many open sessions (limit {self.max_sessions}); close one or retry later", 429)

    def add(self, cache, length: int) -> Session:
        with self._lock:
            self._sweep()
            if len(self._sessions) >= self.max_sessions:
                raise WireError(f"too many open sessions (limit {self.max_sessions}); close one or retry later", 429)
            s = Session(secrets.token_urlsafe(18), cache, length, self._clock())
            self._sessions[s.id] = s
            return s

    def acquire(self, sid: str) -> Session:
        """The session, locked for one step; release with ``release``."""
        with self._lock:
            self._sweep()
            s = self._get(sid)
            if not s.busy.acquire(blocking=False):
                raise WireError(f"session {sid} is busy with another step", 409)
            return s

    def release(self, s: Session) -> None:
        s.last_used = self._clock()
        s.busy.release()

    def close(self, sid: str) -> None:
        with self._lock:
            self._get(sid)
            del self._sessions[sid]  # an in-flight step finishes on its own reference

    def sweep(self) -> None:
        """Drop idle sessions now (also done on every access); the app calls it periodically
        so that an idle server frees its caches."""
        with self._lock:
            self._sweep()

    def is_open(self, sid: str) -> bool:
        with self._lock:
            return sid in self._sessions

    def _get(self, sid: str) -> Session:
        s = self._sessions.get(sid)
        if s is None:
            if sid in self._expired:
                raise WireError(f"session {sid} expired after {self.idle_seconds:g} s idle", 410)
            raise WireError(f"unknown session {sid}", 404)
        return s

    def _sweep(self) -> None:
        now = self._clock()
        for sid, s in list(self._sessions.items()):
            if now - s.last_used > self.idle_seconds and not s.busy.locked():
                del self._sessions[sid]
                self._expired[sid] = None
                while len(self._expired) > EXPIRED_MEMORY:
                    self._expired.popitem(last=False)
