"""Shares mode: input privacy against the cloud when the weights are public.

P3 embeds locally and splits every weight-matmul input into two additive shares over Z_2^64
(`ring`); two non-colluding share servers (`server`) each multiply their share by the public
weight and answer; P3 adds the answers and computes everything else itself, KV cache included
(`walk`, one walk for every family `stip.models.blocks` reads). Each server sees uniform ring
elements only. Frames on persistent TCP sockets (`protocol`); P3's side in `client`.

For private weights use STIP: here P3 sees every activation, so it could learn the weights.
"""

from .client import Servers, SharesError, SharesModel, Stats, one_thread
from .server import ShareServer

__all__ = ["Servers", "SharesError", "SharesModel", "ShareServer", "Stats", "one_thread"]
