"""CKKS (TenSEAL) for the polynomial ViT: parameters, the user's keys, the server's encrypted
operations with level tracking, and the client-aided refresh.

Packing: images go in the SIMD slots. A batch of B ≤ N/2 images is one CKKSTensor of shape
(tokens, features) whose every element is one ciphertext holding that element for all B
images, so every matrix product with the server's plaintext weights is a sum of
plaintext-scalar products — no rotations — and its cost is shared by the whole batch.

Depth: TenSEAL has no bootstrapping. The server tracks each tensor's remaining levels; when
the next operation needs more, it refreshes: adds a fresh encrypted random mask, sends the
ciphertexts to the user, who decrypts and re-encrypts them at the top level, and subtracts
the mask. The user sees only masked values; every round trip and byte is counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Largest log2(q) for 128-bit classical security with ternary secrets (HomomorphicEncryption.org
# standard, table 1), by ring dimension.
MAX_LOG_Q_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MASK_BOUND = 2.0**10  # refresh masks are uniform in ±MASK_BOUND (values stay ≪ 2^(60-40))


@dataclass(frozen=True)
class Params:
    n: int  # ring dimension; n/2 slots
    primes: tuple[int, ...]  # bit sizes of the coefficient modulus chain
    scale_bits: int = 40

    def __post_init__(self):
        if sum(self.primes) > MAX_LOG_Q_128.get(self.n, 0):
            raise ValueError(f"log q = {sum(self.primes)} is above the 128-bit bound for N={self.n}")

    @property
    def levels(self) -> int:
        return len(self.primes) - 2

    @property
    def slots(self) -> int:
        return self.n // 2

    def describe(self) -> dict:
        return {"poly_modulus_degree": self.n, "coeff_mod_bit_sizes": list(self.primes), "log_q": sum(self.primes),
                "scale_bits": self.scale_bits, "levels": self.levels, "slots": self.slots, "security_bits": 128}


PARAMS = (Params(8192, (60, 40, 40, 60)), Params(16384, (60,) + (40,) * 7 + (60,)))


def poly_depth(degree: int) -> int:
    """Levels TenSEAL's polyval consumes: powers by squaring, then the coefficients."""
    return 1 if degree <= 1 else math.ceil(math.log2(degree)) + 1


def params_for(depth: int) -> Params:
    """The smallest parameter set whose chain covers ``depth`` levels."""
    for p in PARAMS:
        if p.levels >= depth:
            return p
    raise ValueError(f"no parameter set has {depth} levels: lower the polynomial degree")


def _ts():
    import tenseal as ts

    return ts


@dataclass
class Link:
    """What crossed between user and server: ciphertext bytes each way and refresh rounds."""

    bytes_up: int = 0  # user → server
    bytes_down: int = 0  # server → user
    refresh_rounds: int = 0
    refreshed_ciphertexts: int = 0
    key_bytes: int = 0  # the public context (public and relinearisation keys), sent once
    client_seconds: float = 0.0


class User:
    """P3: holds the secret key; encrypts, refreshes, decrypts."""

    def __init__(self, params: Params, threads: int | None = None):
        ts = _ts()
        self.params = params
        self._ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.n, coeff_mod_bit_sizes=list(params.primes),
                               n_threads=threads or os.cpu_count() or 1)
        self._ctx.global_scale = 2.0**params.scale_bits
        self._ctx.generate_relin_keys()

    def public_context(self) -> bytes:
        pub = self._ctx.copy()
        pub.make_context_public()
        return pub.serialize()

    def encrypt(self, x: np.ndarray) -> bytes:
        """x: (batch, *shape); the batch goes in the slots."""
        if len(x) > self.params.slots:
            raise ValueError(f"a batch holds at most {self.params.slots} images at N={self.params.n}")
        return _ts().ckks_tensor(self._ctx, x.astype(np.float64), batch=True).serialize()

    def decrypt(self, blob: bytes) -> np.ndarray:
        t = _ts().ckks_tensor_from(self._ctx, blob)
        return np.asarray(t.decrypt().tolist())  # (batch, *shape)

    def refresh(self, blobs: list[bytes]) -> list[bytes]:
        """Decrypt (masked values) and re-encrypt at the top level."""
        ts = _ts()
        out = []
        for blob in blobs:
            t = ts.ckks_tensor_from(self._ctx, blob)
            out.append(ts.ckks_tensor(self._ctx, np.asarray(t.decrypt().tolist()), batch=True).serialize())
        return out


@dataclass
class Enc:
    t: object  # tenseal CKKSTensor
    level: int  # multiplicative levels left


class Server:
    """P2: the public context and plaintext weights. ``round_trip(blobs) -> blobs`` carries a
    refresh to the user and back."""

    def __init__(self, public_context: bytes, params: Params, batch: int, round_trip: Callable[[list[bytes]], list[bytes]], link: Link):
        ts = _ts()
        self._ctx = ts.context_from(public_context)
        if self._ctx.is_private():
            raise ValueError("the server must not hold the secret key")
        self.params, self.batch, self.link, self._round_trip = params, batch, link, round_trip
        self._rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))

    def load(self, blob: bytes) -> Enc:
        return Enc(_ts().ckks_tensor_from(self._ctx, blob), self.params.levels)

    def ensure(self, encs: list[Enc], need: int) -> list[Enc]:
        """Those with fewer than ``need`` levels left, refreshed together in one round trip."""
        stale = [i for i, e in enumerate(encs) if e.level < need]
        if not stale:
            return encs
        ts = _ts()
        masks, blobs = [], []
        for i in stale:
            m = self._rng.uniform(-MASK_BOUND, MASK_BOUND, (self.batch, *encs[i].t.shape))
            masks.append(ts.ckks_tensor(self._ctx, m, batch=True))  # encrypted once: added now, subtracted on return
            blobs.append((encs[i].t + masks[-1]).serialize())
        self.link.bytes_down += sum(map(len, blobs))
        back = self._round_trip(blobs)
        self.link.bytes_up += sum(map(len, back))
        self.link.refresh_rounds += 1
        self.link.refreshed_ciphertexts += sum(int(np.prod(encs[i].t.shape)) for i in stale)
        out = list(encs)
        for i, m, blob in zip(stale, masks, back):
            out[i] = Enc(ts.ckks_tensor_from(self._ctx, blob) - m, self.params.levels)
        return out

    # every op takes and returns Enc; weights are plaintext numpy

    def linear(self, e: Enc, w: np.ndarray, b: np.ndarray | None = None) -> Enc:
        t = e.t.mm(w.tolist())
        if b is not None:
            t = t + _ts().plain_tensor(np.broadcast_to(b, t.shape).tolist())
        return Enc(t, e.level - 1)

    def encrypt(self, m: np.ndarray) -> Enc:
        """A public constant, encrypted under the public key, for an elementwise product.
        (TenSEAL's product of a ciphertext below the top level with a plaintext tensor breaks
        the next matrix product: "parameter mismatch".)"""
        return Enc(_ts().ckks_tensor(self._ctx, np.broadcast_to(m, (self.batch, *m.shape)).copy(), batch=True), self.params.levels)

    def multiply(self, a: Enc, b: Enc) -> Enc:
        """Elementwise product of two ciphertexts."""
        return Enc(a.t * b.t, min(a.level, b.level) - 1)

    def add_plain(self, e: Enc, b: np.ndarray) -> Enc:
        return Enc(e.t + _ts().plain_tensor(np.broadcast_to(b, e.t.shape).tolist()), e.level)

    def product(self, a: Enc, b: Enc) -> Enc:
        """Ciphertext matrix product a · b."""
        return Enc(a.t.dot(b.t), min(a.level, b.level) - 1)

    def transpose(self, e: Enc) -> Enc:
        return Enc(e.t.transpose(), e.level)

    def poly(self, e: Enc, coeffs: np.ndarray) -> Enc:
        return Enc(e.t.polyval([float(c) for c in coeffs]), e.level - poly_depth(len(coeffs) - 1))

    def add(self, a: Enc, b: Enc) -> Enc:
        return Enc(a.t + b.t, min(a.level, b.level))

    def lower(self, e: Enc, level: int) -> Enc:
        """The same values at ``level`` levels left: each ×1.0 rescales onto one prime fewer.
        A wide product costs ~3.4× less time and ~5.5× less memory there (measured: a 1×32 by
        32×256 product at N=16384, 25.6 s and 371 MB at the top, 7.6 s and 67 MB at level 1)."""
        t = e.t
        for _ in range(e.level - level):
            t = t * 1.0
        return Enc(t, min(e.level, level))

    def rows(self, e: Enc, start: int, stop: int) -> Enc:
        """Rows start..stop of a matrix: a selection of its ciphertexts, no arithmetic."""
        return Enc(e.t._wrap(e.t.data.subscript([(start, stop), (0, e.t.shape[1])])), e.level)

    def reshape(self, e: Enc, shape: list[int]) -> Enc:
        return Enc(e.t.reshape(shape), e.level)
