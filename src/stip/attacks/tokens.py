"""What token mode gives P2 that embedding mode did not, measured rather than argued.

    renamed_ids(rows, head)          embedding mode, tied head: the ids token mode would send,
                                     read off the rows P2 receives (side knowledge: none)
    pi_from_table(public, sealed)    token mode, additive position table (GPT-2): π from P2's
                                     sealed copy of a public table (side knowledge: that table)
"""

from __future__ import annotations

import numpy as np

from .plaintext import known_plaintext


def renamed_ids(rows: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Each embedding-mode input row E[t]π of a tied-head model is a row of P2's own sealed
    head E[π_c][:, π] — the row at t's token-mode id. Nearest row, exact up to float rounding."""
    rows = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
    head = np.asarray(head, np.float64)
    d2 = (head * head).sum(1)[None, :] - 2 * rows @ head.T
    return d2.argmin(1)


def pi_from_table(public: np.ndarray, sealed: np.ndarray) -> np.ndarray:
    """A table P2 holds with its columns permuted by π (token mode's wpe[:, π]) is a known
    plaintext pair when the table is public."""
    return known_plaintext(public, sealed)
