"""Attacks on STIP, each run from P2's point of view: what P2 holds, plus stated side knowledge.

    known_plaintext(x, x_perm)              -> recovered π (side knowledge: one pair x, xπ)
    vocab_match(x_perm, table, offsets)     -> recovered token ids (side knowledge: the
                                               public embedding tables)

A permutation hides only the order of each row's coordinates: the multiset of values is
unchanged, so sorting a row removes the secret. These functions measure that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Result:
    recovery_rate: float
    n: int
    details: dict

    def to_json(self) -> dict:
        return {"recovery_rate": self.recovery_rate, "n": self.n, **self.details}


def known_plaintext(x: np.ndarray, x_perm: np.ndarray) -> np.ndarray:
    """π with x_perm = x[..., π], from one pair of (tokens, d) activations: column j of x_perm
    is the column π[j] of x, found by nearest column (exact when x's columns are distinct)."""
    a = np.asarray(x, np.float64).reshape(-1, x.shape[-1]).T  # (d, rows)
    b = np.asarray(x_perm, np.float64).reshape(-1, x_perm.shape[-1]).T
    d2 = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None, :]
    return d2.argmin(1)


@torch.no_grad()
def vocab_match(x_perm: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Token ids from permuted input rows (batch, tokens, d): each row's sorted values against
    the sorted rows of ``table + offsets[t]`` (offsets: what the model adds at position t, e.g.
    BERT's position + token-type rows; None when table rows are sent as they are). Nearest in
    L2 between sorted vectors; one sort of the candidates per position."""
    b, n, _ = x_perm.shape
    x_sorted = x_perm.double().sort(-1).values
    out = torch.empty(b, n, dtype=torch.long)
    plain = table.double().sort(-1).values if offsets is None else None
    for t in range(n):
        cands = plain if offsets is None else (table.double() + offsets[t].double()).sort(-1).values
        rows = x_sorted[:, t]
        best_d = torch.full((b,), float("inf"), dtype=torch.float64)
        for i in range(0, len(cands), chunk):
            d = torch.cdist(rows, cands[i : i + chunk])
            v, j = d.min(-1)
            better = v < best_d
            best_d = torch.where(better, v, best_d)
            out[better, t] = (j + i)[better]
    return out
