"""Shares mode: input privacy against the cloud when the weights are public.

P3 embeds locally and splits every weight-matmul input into two additive shares over Z_2^64
(`ring`); two non-colluding share servers (`server`) each multiply their share by the public
weight and answer; P3 adds the answers and computes everything else itself, KV cache included
(`walk`, one walk for every family `stip.models.blocks` reads). Each server sees uniform ring
elements only. Frames on persistent TCP sockets (`protocol`); P3's side in `client`.

For private weights use STIP: here P3 sees every activation, so it could learn the weights.
"""

import importlib

# Resolved on first use, so that a share server's process (P2) never imports P3's `client`.
_HOME = {"Servers": "client", "SharesError": "client", "SharesModel": "client", "Stats": "client", "one_thread": "client",
         "ShareServer": "server"}  # fmt: skip
__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
