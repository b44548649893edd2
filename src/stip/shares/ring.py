"""Fixed point on the ring Z_2^64, additive shares, and the servers' ring matmul.

P3 encodes each row of an activation X at its own scale, round(X_r · 2^e_r) in int64 (two's
complement is Z_2^64), and splits it: X1 uniform and fresh (AES-CTR under a key from
os.urandom), X2 = X − X1 (mod 2^64).
Each server multiplies its share by the encoded weight; the two answers add up to X·W in the
ring, and P3 divides row r and column j by 2^(e_r + s_j). The scales never leave P3 in the
clear: the servers see uniform ring elements only.

The server's matmul. int64 GEMMs run ~100× slower than float32 on CPU, so a share is cut into
balanced limbs, multiplied on float64 BLAS and recombined mod 2^64. Each column of W is scaled
so that Σ_i |W_ij·2^s_j| ≤ 2^MASS (this fixes s_j), and each row of X so that |X_r·2^e_r| ≤
2^(62−MASS): the product cannot wrap.

    limbs  limb bits (low → high)  float64 GEMMs  the answer
      2        42, 22                  2          ← default. The 22-bit limb is exact (its sums
                                                  stay below 2^53). The 42-bit limb's sums
                                                  round: off by at most in·2^20 per entry, while
                                                  rounding X to integers already costs 2^31.
      3        22, 22, 20              3          X·W̃ mod 2^64 bit for bit.

Both use the same scales, so P3's side does not depend on the choice.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import StipError

LIMBS = 2
MASS = 32  # log2 of the largest Σ|w| of an encoded column
_SPLIT = {2: (42, 22), 3: (22, 22, 20)}  # bits per limb, low to high


def _exact(bits: int) -> bool:
    """Whether a limb's float64 sums stay exact: |limb| ≤ 2^(bits−1), Σ|w| ≤ 2^MASS."""
    return bits - 1 + MASS <= 53


assert all(_exact(split[-1]) and sum(split) == 64 for split in _SPLIT.values())  # the high limb is exact


class RangeError(StipError, ValueError):
    """An activation that cannot be encoded (NaN or infinite)."""


def encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float activations (rows, in) → (ring elements int64, each row's exponent e_r)."""
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
        raise RangeError("an activation is NaN or infinite")
    peak = np.abs(x).max(-1)
    top = 62 - MASS  # |X_r · 2^e_r| ≤ 2^top
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
    y = y.astype(np.float64)
    y *= np.exp2(-rows.astype(np.float64))[:, None]
    y *= np.exp2(-columns.astype(np.float64))[None, :]
    return y


def exponents(w: np.ndarray) -> np.ndarray:
    """Each column's scale exponent s_j: the largest with Σ_i |round(W_ij·2^s_j)| ≤ 2^MASS."""
    w = np.asarray(w, np.float64)
    mass = np.abs(w).sum(0) + w.shape[0]  # + in: room for each entry's rounding
    e = np.floor(MASS - np.log2(np.maximum(mass, 1e-300))).astype(np.int64)
    return np.minimum(e, 62)  # an all-zero column: any scale is exact


@dataclass(frozen=True)
class Weight:
    """One weight matrix as a server holds it: W·2^s_j rounded, float64 (in, out), and how many
    limbs its matmul cuts a share into. ``zero``: (rows, cols) when the first ``cols`` columns
    read only the first ``rows`` rows (a block weight), so their GEMM skips the zeros."""

    w: np.ndarray
    exponents: np.ndarray  # s_j, (out,)
    limbs: int = LIMBS
    zero: tuple[int, int] | None = None

    @classmethod
    def encode(cls, w: np.ndarray, limbs: int = LIMBS, zero: tuple[int, int] | None = None) -> "Weight":
        if limbs not in _SPLIT:
            raise ValueError(f"limbs must be one of {sorted(_SPLIT)}")
        w = np.asarray(w, np.float64)
        if zero is not None and w[zero[0] :, : zero[1]].any():
            raise ValueError("the block said to be zero is not")
        e = exponents(w)
        enc = np.rint(w * np.exp2(e.astype(np.float64)))
        assert (np.abs(enc).sum(0) <= 2.0**MASS).all()
        return cls(enc, e, limbs, zero)

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape


def matmul(x: np.ndarray, weight: Weight) -> np.ndarray:
    """x · W mod 2^64 for int64 x (rows, in): one float64 GEMM over the stacked limbs."""
    split, n = _SPLIT[weight.limbs], x.shape[0]
    u = np.asarray(x, np.int64)
    limbs = np.empty((len(split) * n, u.shape[1]))
    for j, bits in enumerate(split[:-1]):
        low = (u << np.int64(64 - bits)) >> np.int64(64 - bits)  # sign-extended: in [−2^(bits−1), 2^(bits−1))
        limbs[j * n : (j + 1) * n] = low
        u = (u - low) >> np.int64(bits)  # an exact shift
    limbs[-n:] = u  # the high limb, signed
    if weight.zero is None:
        y = limbs @ weight.w
    else:  # the zero block adds exact zeros: skipping it changes no bit
        (k, c), y = weight.zero, np.empty((limbs.shape[0], weight.shape[1]))
        np.matmul(limbs[:, :k], weight.w[:k, :c], out=y[:, :c])
        np.matmul(limbs, weight.w[:, c:], out=y[:, c:])
    out, shift = np.zeros((n, y.shape[1]), np.int64), 0
    for j, bits in enumerate(split):
        part = y[j * n : (j + 1) * n]
        if not _exact(bits):  # sums up to 2^73: reduce mod 2^64 first, exactly (both terms are multiples of part's ulp)
            part = part - np.floor(part * 2.0**-64 + 0.5) * 2.0**64  # in [−2^63, 2^63)
        out += part.astype(np.int64) << np.int64(shift)  # wraps mod 2^64
        shift += bits
    return out


def error_bound(weight: Weight) -> float:
    """The most ``matmul`` can be off by, per entry, mod 2^64: the float64 rounding of the limbs
    whose sums pass 2^53, by the standard bound in·2^−53·Σ|limb·w| (0 at 3 limbs)."""
    bound, shift = 0.0, 0
    for bits in _SPLIT[weight.limbs]:
        if not _exact(bits):
            bound += weight.shape[0] * 2.0 ** (bits - 1 + MASS - 53 + shift)
        shift += bits
    return bound


def fingerprint(matmuls: dict[str, np.ndarray]) -> str:
    """A digest of the weights themselves (names, shapes, float32 values) and the encoding:
    P3 and both servers agree on it exactly when they compute the same thing."""
    h = hashlib.blake2b(f"mass={MASS}".encode(), digest_size=32)
    for name in sorted(matmuls):
        w = np.ascontiguousarray(matmuls[name], np.float32)
        h.update(f"{name}:{w.shape}:".encode())
        h.update(memoryview(w).cast("B"))
    return h.hexdigest()
