"""P3, the user: embed locally, permute, send, un-permute.

    from stip.client import Client, Sampling
    with Client("OUT/client", "http://127.0.0.1:8000") as c:
        c.generate("Once upon a time", 32, Sampling(temperature=0.8, seed=1)).text
"""

import importlib

from .bundle import ClientBundle, InvalidBundle, permute, unpermute

# Resolved on first use: reading a bundle needs neither httpx nor the generation loop.
_HOME = {"Client": "api", "KeyMismatch": "api", "ServerError": "api",
         "Sampling": "generation", "Generation": "generation", "TokenLogprob": "generation"}  # fmt: skip
__all__ = ["ClientBundle", "InvalidBundle", "permute", "unpermute", *_HOME]


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
