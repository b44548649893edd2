"""Attacks on STIP, each run from P2's point of view: what P2 holds, plus stated side knowledge.

    vocab.match(x_perm, table, offsets)        token ids from the permuted input rows
                                               (side knowledge: the public embedding tables)
    vocab.match_hidden(obs, public, k, ...)    the same from hidden states after k layers
                                               (side knowledge: the public model)
    weights.match(sealed, public)              π and every per-layer permutation from the sealed
                                               checkpoint (side knowledge: the public base weights)
    plaintext.known_plaintext(x, x_perm)       π from one pair (x, xπ)
    attention.repeats(scores, ids)             which tokens repeat, from the scores P2 computes

A permutation hides only the order of each row's coordinates: the multiset of values is
unchanged, so sorting a row removes the secret. These modules measure what that leaves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    recovery_rate: float
    n: int
    details: dict

    def to_json(self) -> dict:
        return {"recovery_rate": self.recovery_rate, "n": self.n, **self.details}
