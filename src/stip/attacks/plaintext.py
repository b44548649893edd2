"""Known plaintext: one pair (x, xπ) gives π."""

from __future__ import annotations

import numpy as np


def known_plaintext(x: np.ndarray, x_perm: np.ndarray) -> np.ndarray:
    """π with x_perm = x[..., π], from one pair of (tokens, d) activations: column j of x_perm
    is the column π[j] of x, found by nearest column (exact when x's columns are distinct)."""
    a = np.asarray(x, np.float64).reshape(-1, x.shape[-1]).T  # (d, rows)
    b = np.asarray(x_perm, np.float64).reshape(-1, x_perm.shape[-1]).T
    d2 = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None, :]
    return d2.argmin(1)
