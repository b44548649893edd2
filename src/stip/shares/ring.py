"""Fixed point on the ring Z_2^64, additive shares, and the servers' exact ring matmul.

P3 encodes each row of an activation X at its own scale, round(X_r · 2^e_r) in int64 (two's
complement is Z_2^64), and splits it: X1 uniform and fresh (AES-CTR under a key from
os.urandom), X2 = X − X1 (mod 2^64).
Each server multiplies its share by the encoded weight; the two answers add up to X·W exactly
in the ring, and P3 divides row r and column j by 2^(e_r + s_j). The scales never leave P3 in
the clear: the servers see uniform ring elements only.

Exactness. int64 GEMMs run ~100× slower than float32 on CPU, so a share is cut into balanced
limbs and multiplied on float64 BLAS, which is exact while every partial sum stays below 2^53:
with limbs below 2^(b−1), that holds when Σ_i |W_ij·2^s_j| ≤ 2^(54−b) (the column's "mass"),
which fixes s_j. The product cannot wrap when |X_r·2^e_r| ≤ 2^(62−mass), which fixes e_r.

    limbs  bits  mass   weight step (relative to the column's L1 norm)   cost (float64 GEMMs)
      2     32    22    2^-22: SmolLM2 logits off by 0.15                 2
      3     22    32    2^-32: SmolLM2 logits as exact as float32         3   ← default
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import numpy as np

LIMBS = 3
_BITS = {2: 32, 3: 22}  # bits per limb


def _mass(limbs: int) -> int:
    """log2 of the largest Σ|w| an encoded column may have: 2^(bits−1) · 2^mass ≤ 2^53."""
    return 54 - _BITS[limbs]


class RangeError(ValueError):
    """An activation that cannot be encoded (NaN or infinite)."""


def encode(x: np.ndarray, limbs: int = LIMBS) -> tuple[np.ndarray, np.ndarray]:
    """Float activations (rows, in) → (ring elements int64, each row's exponent e_r)."""
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
        raise RangeError("an activation is NaN or infinite")
    peak = np.abs(x).max(-1)
    top = 62 - _mass(limbs)  # |X_r · 2^e_r| ≤ 2^top
    e = np.where(peak > 0, top - np.ceil(np.log2(np.maximum(peak, 1e-300))) - 1, top).astype(np.int64)
    return np.rint(x * np.exp2(e.astype(np.float64))[:, None]).astype(np.int64), e


class _Keystream:
    """AES-256-CTR under a key from os.urandom: a CSPRNG with ~3.5× the throughput of
    os.urandom. One per process, never shared with a forked child (it would repeat masks)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stream = None
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.stream = None

    def take(self, n: int) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        with self.lock:
            if self.stream is None:
                self.stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(bytes(16))).encryptor()
            return self.stream.update(bytes(n))


_KEYSTREAM = _Keystream()


def uniform(count: int) -> np.ndarray:
    """``count`` uniform ring elements, never used before."""
    return np.frombuffer(_KEYSTREAM.take(count * 8), np.int64).copy()


def share(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two additive shares of ring elements; the first is uniform and fresh for every call."""
    x = np.ascontiguousarray(x, np.int64)
    r = uniform(x.size).reshape(x.shape)
    return r, x - r  # int64 arithmetic wraps: this is subtraction mod 2^64


def reconstruct(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def decode(y: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The sum of both servers' answers → float X·W."""
    return y.astype(np.float64) * np.exp2(-(rows[:, None] + columns[None, :]).astype(np.float64))


def exponents(w: np.ndarray, limbs: int = LIMBS) -> np.ndarray:
    """Each column's scale exponent s_j: the largest with Σ_i |round(W_ij·2^s_j)| ≤ 2^mass."""
    w = np.asarray(w, np.float64)
    mass = np.abs(w).sum(0) + w.shape[0]  # + in: room for each entry's rounding
    e = np.floor(_mass(limbs) - np.log2(np.maximum(mass, 1e-300))).astype(np.int64)
    return np.minimum(e, 62)  # an all-zero column: any scale is exact


@dataclass(frozen=True)
class Weight:
    """One weight matrix as a server holds it: W·2^s_j rounded, float64 (in, out)."""

    w: np.ndarray
    exponents: np.ndarray  # s_j, (out,)
    limbs: int = LIMBS

    @classmethod
    def encode(cls, w: np.ndarray, limbs: int = LIMBS) -> "Weight":
        if limbs not in _BITS:
            raise ValueError(f"limbs must be one of {sorted(_BITS)}")
        w = np.asarray(w, np.float64)
        e = exponents(w, limbs)
        enc = np.rint(w * np.exp2(e.astype(np.float64)))
        assert (np.abs(enc).sum(0) <= 2.0 ** _mass(limbs)).all()
        return cls(enc, e, limbs)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape


def matmul(x: np.ndarray, weight: Weight) -> np.ndarray:
    """x · W mod 2^64 for int64 x (rows, in), exactly: one float64 GEMM over the stacked limbs."""
    bits = _BITS[weight.limbs]
    half, mask = np.int64(1 << (bits - 1)), np.int64((1 << bits) - 1)
    parts, u = [], np.asarray(x, np.int64)
    for _ in range(weight.limbs - 1):
        low = ((u + half) & mask) - half  # balanced: in [−2^(bits−1), 2^(bits−1))
        parts.append(low)
        u = (u - low) >> bits  # an exact shift
    parts.append(u)  # what is left: 64 − (limbs−1)·bits bits, signed
    y = (np.concatenate(parts).astype(np.float64) @ weight.w).astype(np.int64)
    n, out = x.shape[0], y[: x.shape[0]].copy()
    for j in range(1, weight.limbs):
        out += y[j * n : (j + 1) * n] << np.int64(j * bits)  # wraps mod 2^64
    return out


def fingerprint(matmuls: dict[str, np.ndarray], limbs: int) -> str:
    """A digest of the weights themselves (names, shapes, float32 values) and the precision:
    P3 and both servers agree on it exactly when they compute the same thing."""
    h = hashlib.blake2b(f"limbs={limbs}".encode(), digest_size=32)
    for name in sorted(matmuls):
        w = np.ascontiguousarray(matmuls[name], np.float32)
        h.update(f"{name}:{w.shape}:".encode())
        h.update(memoryview(w).cast("B"))
    return h.hexdigest()
