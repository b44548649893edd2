"""The polynomial swap: fit each activation over the range its inputs take on the training set,
then swap the polynomial in, without further training."""

from __future__ import annotations

import numpy as np
import torch

from .model import PolyViT

FITS = ("lsq", "minimax")


def fit_polynomial(f, lo: float, hi: float, degree: int, method: str = "lsq", points: int = 2001) -> np.ndarray:
    """Power-basis coefficients (c0 first) of a degree-``degree`` fit of f on [lo, hi]:
    least squares on a dense grid, or minimax by Lawson's iteratively reweighted least squares."""
    if method not in FITS:
        raise ValueError(f"fit must be one of {FITS}")
    if degree < 1 or not hi > lo:
        raise ValueError("need degree ≥ 1 and a non-empty range")
    x = np.linspace(lo, hi, points)
    y = f(x)
    w = np.ones_like(x)
    for _ in range(1 if method == "lsq" else 200):
        fit = np.polynomial.Chebyshev.fit(x, y, degree, domain=[lo, hi], w=np.sqrt(w))
        err = np.abs(fit(x) - y)
        w = w * (err + 1e-12)
        w /= w.sum()
    return fit.convert(kind=np.polynomial.Polynomial).coef.astype(np.float64)


@torch.no_grad()
def to_polynomial(model: PolyViT, images: torch.Tensor, degree: int = 2, method: str = "lsq", margin: float = 0.05,
                  batch_size: int = 256) -> dict:
    """Fit each activation over the range its inputs take on ``images`` (widened by ``margin``
    of its width) and swap the polynomial in. Returns per-site ranges and max fit errors."""
    model.eval()
    acts = model.acts()
    for a in acts:
        a.coeffs = torch.zeros(0)
        a.lo.fill_(float("inf"))
        a.hi.fill_(float("-inf"))
        a.calibrating = True
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for a in acts:
            a.calibrating = False
    sites = []
    for a in acts:
        lo, hi = float(a.lo), float(a.hi)
        pad = margin * (hi - lo)
        lo, hi = lo - pad, hi + pad
        c = fit_polynomial(a.reference, lo, hi, degree, method)
        grid = np.linspace(lo, hi, 2001)
        sites.append({"range": [lo, hi], "max_fit_error": float(np.abs(np.polynomial.polynomial.polyval(grid, c) - a.reference(grid)).max())})
        a.coeffs = torch.as_tensor(c, dtype=torch.float32)
    return {"degree": degree, "method": method, "sites": sites}
