"""CKKS on Microsoft SEAL, through ``tenseal.sealapi`` (TenSEAL's binding of SEAL's own API;
TenSEAL's tensor API has no rotations): parameters, the user's keys, the server's operations
on packed ciphertexts with their levels, and the client-aided refresh.

Packing: a ciphertext's slots hold whole inputs, token-major (``stip.he.packing``). A product
with plaintext weights is a sum of rotations times plaintext diagonals, by baby and giant steps
(``Server.linear``); the slot layout is the caller's.

Depth: SEAL has no CKKS bootstrapping. When the next operation needs more levels than a
ciphertext has left, the server refreshes it: adds a fresh encrypted random mask, sends it to
the user, who decrypts and re-encrypts it at the top level, and subtracts the mask. The user
sees only masked values; every round trip and byte is counted.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

# Largest log2(q) for 128-bit classical security with ternary secrets (HomomorphicEncryption.org
# standard, table 1), by ring dimension. SEAL checks the same bound (sec_level_type.tc128).
MAX_LOG_Q_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
# Refresh masks are uniform in ±MASK_BOUND: as wide as the last prime leaves room for (a
# ciphertext decrypted at level 0 holds |x| < 2^(60-40-1)), with 8× to spare for x itself.
MASK_BOUND = 2.0**16


@dataclass(frozen=True)
class Params:
    n: int  # ring dimension; n/2 slots
    primes: tuple[int, ...]  # bit sizes of the coefficient modulus chain
    scale_bits: int = 40

    def __post_init__(self):
        if self.n not in MAX_LOG_Q_128:
            raise ValueError(f"N={self.n} is not one of the ring dimensions {sorted(MAX_LOG_Q_128)}")
        if sum(self.primes) > MAX_LOG_Q_128[self.n]:
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
    """Levels ``Server.poly`` consumes: ⌈log₂(degree + 1)⌉, as c·x^k = x^h · (c·x^(k−h)) with h
    the largest power of two below k puts the coefficient on the shallowest factor (degree 4
    and 6 both take 3)."""
    return max(1, math.ceil(math.log2(degree + 1)))


def params_for(depth: int) -> Params:
    """The smallest parameter set whose chain covers ``depth`` levels."""
    for p in PARAMS:
        if p.levels >= depth:
            return p
    raise ValueError(f"no parameter set has {depth} levels: lower the polynomial degree")


def signed_step(step: int, slots: int) -> int:
    """A rotation (or diagonal offset) as the one signed step in (-slots/2, slots/2] that
    ``Server.rotate``, ``SlotMap`` and the Galois keys all name it by."""
    step %= slots
    return step - slots if step > slots // 2 else step


def _sa():
    import tenseal.sealapi as sa

    return sa


def _context(params: Params):
    sa = _sa()
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.n)
    parms.set_coeff_modulus(sa.CoeffModulus.Create(params.n, list(params.primes)))
    ctx = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise ValueError(f"SEAL refuses {params.describe()}: {ctx.parameters_error_message()}")
    return ctx


# SEAL's Python binding saves and loads through file paths only: private (0600) temporary
# files, in memory where the system has room (a container's /dev/shm may hold 64 MiB; the keys
# are ~260 MB). Only ciphertexts and public keys pass through them.
def _scratch() -> str | None:
    try:
        st = os.statvfs("/dev/shm")
        return "/dev/shm" if st.f_bavail * st.f_frsize > 2**30 else None
    except OSError:
        return None


def _dump(obj) -> bytes:
    fd, path = tempfile.mkstemp(prefix="stip-he-", dir=_scratch())
    os.close(fd)
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def _undump(obj, ctx, data: bytes):
    fd, path = tempfile.mkstemp(prefix="stip-he-", dir=_scratch())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj.load(ctx, path)
        return obj
    finally:
        os.unlink(path)


def _pack(blobs: list[bytes]) -> bytes:
    return b"".join(len(b).to_bytes(8, "little") + b for b in blobs)


def _unpack(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "little")
        out.append(data[i + 8 : i + 8 + n])
        i += 8 + n
    return out


def _uniform_mask(n: int) -> np.ndarray:
    """Uniform in ±MASK_BOUND, from the OS's CSPRNG (53 random bits a slot)."""
    u = (np.frombuffer(os.urandom(8 * n), np.uint64) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return (2 * u - 1) * MASK_BOUND


@dataclass
class Link:
    """What crossed between user and server: ciphertext bytes each way and refresh rounds."""

    bytes_up: int = 0  # user → server
    bytes_down: int = 0  # server → user
    refresh_rounds: int = 0
    refreshed_ciphertexts: int = 0
    key_bytes: int = 0  # public, relinearisation and rotation keys, sent once
    client_seconds: float = 0.0


class User:
    """P3: holds the secret key; makes the server's public keys, encrypts, refreshes, decrypts.
    ``steps``: the rotations the server's program uses (public: they follow from the model's
    shape), one Galois key each."""

    def __init__(self, params: Params, steps: Iterable[int]):
        sa = _sa()
        self.params = params
        self._ctx = _context(params)
        keygen = sa.KeyGenerator(self._ctx)
        self._public = sa.PublicKey()
        keygen.create_public_key(self._public)
        # SEAL's seeded forms, half the bytes: the relinearisation key, and the Galois keys by
        # their elements 3^step mod 2N (the binding registers the elements overload first, so a
        # list of steps would be read as elements)
        self._relin = keygen.create_relin_keys()
        self._galois = keygen.create_galois_keys(sorted({pow(3, s % params.slots, 2 * params.n) for s in steps}))
        self._encoder = sa.CKKSEncoder(self._ctx)
        self._encryptor = sa.Encryptor(self._ctx, self._public)
        self._secret = keygen.secret_key()
        self._decryptor = sa.Decryptor(self._ctx, self._secret)

    def public_keys(self) -> bytes:
        """What the server gets: no secret key."""
        return _pack([_dump(self._public), _dump(self._relin), _dump(self._galois)])

    def encrypt(self, slots: np.ndarray) -> bytes:
        if slots.shape != (self.params.slots,):
            raise ValueError(f"a ciphertext holds {self.params.slots} slots at N={self.params.n}, not {slots.shape}")
        sa = _sa()
        pt, ct = sa.Plaintext(), sa.Ciphertext()
        self._encoder.encode(slots.astype(np.float64).tolist(), 2.0**self.params.scale_bits, pt)
        self._encryptor.encrypt(pt, ct)
        return _dump(ct)

    def decrypt(self, blob: bytes) -> np.ndarray:
        sa = _sa()
        ct, pt = _undump(sa.Ciphertext(), self._ctx, blob), sa.Plaintext()
        self._decryptor.decrypt(ct, pt)
        return np.asarray(self._encoder.decode_double(pt))

    def refresh(self, blobs: list[bytes]) -> list[bytes]:
        """Decrypt (masked values) and re-encrypt at the top level."""
        return [self.encrypt(self.decrypt(b)) for b in blobs]


@dataclass
class Enc:
    ct: object  # a SEAL ciphertext
    level: int  # multiplicative levels left: its chain index


class Server:
    """P2: the public keys and plaintext weights. ``round_trip(blobs) -> blobs`` carries a
    refresh to the user and back."""

    def __init__(self, public_keys: bytes, params: Params, round_trip: Callable[[list[bytes]], list[bytes]], link: Link):
        sa = _sa()
        self.params, self.link, self._round_trip = params, link, round_trip
        self._ctx = _context(params)
        pk, rk, gk = _unpack(public_keys)
        self._relin = _undump(sa.RelinKeys(), self._ctx, rk)
        self._galois = _undump(sa.GaloisKeys(), self._ctx, gk)
        self._encoder = sa.CKKSEncoder(self._ctx)
        self._encryptor = sa.Encryptor(self._ctx, _undump(sa.PublicKey(), self._ctx, pk))
        self._eval = sa.Evaluator(self._ctx)
        self._scale = 2.0**params.scale_bits
        self._levels = {}  # chain index → (parms_id, the prime a rescale there drops)
        data = self._ctx.first_context_data()
        while data is not None:
            self._levels[data.chain_index()] = (data.parms_id(), data.parms().coeff_modulus()[-1].value())
            data = data.next_context_data()
        self.rotations = 0

    # serialization

    def load(self, blob: bytes) -> Enc:
        ct = _undump(_sa().Ciphertext(), self._ctx, blob)
        return Enc(ct, self._ctx.get_context_data(ct.parms_id()).chain_index())

    def dump(self, e: Enc) -> bytes:
        return _dump(e.ct)

    # plaintexts

    def _plain(self, values: np.ndarray | float, level: int, exact: bool = False):
        """Encoded at ``level``. ``exact``: at the scale of the prime a rescale drops, so that a
        product with it keeps the ciphertext's scale exactly."""
        pid, prime = self._levels[level]
        pt = _sa().Plaintext()
        v = float(values) if np.isscalar(values) else np.asarray(values, np.float64).tolist()
        self._encoder.encode(v, pid, float(prime) if exact else self._scale, pt)
        return pt

    def encrypt(self, values: np.ndarray, level: int | None = None) -> Enc:
        ct = _sa().Ciphertext()
        self._encryptor.encrypt(self._plain(values, self.params.levels), ct)
        return self.lower(Enc(ct, self.params.levels), self.params.levels if level is None else level)

    def zeros(self, level: int) -> Enc:
        return self.encrypt(np.zeros(self.params.slots), level)

    # levels and the refresh

    def lower(self, e: Enc, level: int) -> Enc:
        """The same values on fewer primes: cheaper to compute on and to send."""
        if level >= e.level:
            return e
        ct = _sa().Ciphertext()
        self._eval.mod_switch_to(e.ct, self._levels[level][0], ct)
        return Enc(ct, level)

    def _match(self, a: Enc, b: Enc) -> tuple[Enc, Enc]:
        level = min(a.level, b.level)
        return self.lower(a, level), self.lower(b, level)

    def ensure(self, encs: list[Enc], need: int) -> list[Enc]:
        """Those with fewer than ``need`` levels left, refreshed together in one round trip."""
        stale = [i for i, e in enumerate(encs) if e.level < need]
        if not stale:
            return encs
        if need > self.params.levels:
            raise ValueError(f"an operation needs {need} levels; N={self.params.n} has {self.params.levels}")
        masks = [self.encrypt(_uniform_mask(self.params.slots)) for _ in stale]
        blobs = [self.dump(self.add(encs[i], m)) for i, m in zip(stale, masks)]
        self.link.bytes_down += sum(map(len, blobs))
        back = self._round_trip(blobs)
        self.link.bytes_up += sum(map(len, back))
        self.link.refresh_rounds += 1
        self.link.refreshed_ciphertexts += len(stale)
        out = list(encs)
        for i, m, blob in zip(stale, masks, back):
            out[i] = self.sub(self.load(blob), m)
        return out

    # arithmetic: every op takes and returns Enc

    def add(self, a: Enc, b: Enc) -> Enc:
        a, b = self._match(a, b)
        ct = _sa().Ciphertext()
        self._eval.add(a.ct, b.ct, ct)
        return Enc(ct, a.level)

    def sub(self, a: Enc, b: Enc) -> Enc:
        a, b = self._match(a, b)
        ct = _sa().Ciphertext()
        self._eval.sub(a.ct, b.ct, ct)
        return Enc(ct, a.level)

    def add_plain(self, e: Enc, values: np.ndarray | float) -> Enc:
        ct = _sa().Ciphertext()
        self._eval.add_plain(e.ct, self._plain(values, e.level), ct)
        return Enc(ct, e.level)

    def _rescaled(self, ct, level: int) -> Enc:
        self._eval.rescale_to_next_inplace(ct)
        # A ct × ct product's scale is 2^80/q after the rescale, within 7e-6 of 2^40 for these
        # primes; naming it 2^40 is CKKS's usual approximation (products with plaintexts are
        # exact: see _plain).
        ct.scale = self._scale
        return Enc(ct, level - 1)

    def multiply_plain(self, e: Enc, values: np.ndarray | float) -> Enc:
        if e.level < 1:
            raise ValueError("no level left: ensure() first")
        ct = _sa().Ciphertext()
        self._eval.multiply_plain(e.ct, self._plain(values, e.level, exact=True), ct)
        return self._rescaled(ct, e.level)

    def multiply(self, a: Enc, b: Enc) -> Enc:
        a, b = self._match(a, b)
        if a.level < 1:
            raise ValueError("no level left: ensure() first")
        ct = _sa().Ciphertext()
        if a.ct is b.ct:
            self._eval.square(a.ct, ct)
        else:
            self._eval.multiply(a.ct, b.ct, ct)
        self._eval.relinearize_inplace(ct, self._relin)
        return self._rescaled(ct, a.level)

    def rotate(self, e: Enc, step: int) -> Enc:
        """Slot s of the result holds slot s + step of ``e`` (cyclically)."""
        step = signed_step(step, self.params.slots)
        if step == 0:
            return e
        ct = _sa().Ciphertext()
        self._eval.rotate_vector(e.ct, step, self._galois, ct)
        self.rotations += 1
        return Enc(ct, e.level)

    def rotate_sum(self, e: Enc, step: int, count: int) -> Enc:
        """Σ_{m < count} rotate(e, m·step), ``count`` a power of two: log2(count) rotations."""
        if count & (count - 1):
            raise ValueError(f"rotate_sum needs a power of two, not {count}")
        while count > 1:
            e = self.add(e, self.rotate(e, step))
            step, count = step * 2, count // 2
        return e

    def poly(self, e: Enc, coeffs: np.ndarray) -> Enc:
        """Σ c_k x^k in ``poly_depth`` levels: the powers x^(2^j) by squaring, and each term as
        x^h · (c·x^(k−h)), h the largest power of two below k, down to c·x."""
        degree = len(coeffs) - 1
        powers = {1: e}
        h = 2
        while h < degree:
            powers[h] = self.multiply(powers[h // 2], powers[h // 2])
            h *= 2

        def term(k: int, c: float) -> Enc:
            if k == 1:
                return self.multiply_plain(e, c)
            h = 1 << ((k - 1).bit_length() - 1)
            return self.multiply(powers[h], term(k - h, c))

        out = None
        for k in range(1, degree + 1):
            if coeffs[k]:  # SEAL refuses a product with a zero plaintext
                t = term(k, float(coeffs[k]))
                out = t if out is None else self.add(out, t)
        if out is None:  # a constant
            out = self.zeros(e.level - 1)
        return self.add_plain(out, float(coeffs[0]))

    def linear(self, e: Enc, maps: list["SlotMap"]) -> list[Enc]:
        """y = M·x for each map, by baby and giant steps: the baby rotations rot(x, j), j below
        the maps' baby step, are made once and shared by every map; each giant step g adds
        rot(Σ_j diag_{g+j}(shifted by g) ⊙ rot(x, j), g)."""
        if e.level < 1:
            raise ValueError("no level left: ensure() first")
        babies: dict[int, Enc] = {}
        out = []
        for m in maps:
            acc = None
            for giant, terms in m.giants().items():
                inner = None
                for j, diag in terms:
                    if j not in babies:
                        babies[j] = self.rotate(e, j)
                    ct = _sa().Ciphertext()
                    self._eval.multiply_plain(babies[j].ct, self._plain(np.roll(diag, giant), e.level, exact=True), ct)
                    if inner is None:
                        inner = ct
                    else:
                        self._eval.add_inplace(inner, ct)
                part = self.rotate(self._rescaled(inner, e.level), giant)
                acc = part if acc is None else self.add(acc, part)
            out.append(acc if acc is not None else self.zeros(e.level - 1))
        return out


class SlotMap:
    """A linear map on a ciphertext's slot vector, y[s] = Σ_d diag_d[s]·x[s + d], kept as its
    nonzero diagonals (offset d → a vector of slots); never as a dense slots × slots matrix."""

    def __init__(self, slots: int, diagonals: dict[int, np.ndarray], baby: int):
        self.slots, self.baby = slots, baby
        self.diagonals = {}
        for d, v in diagonals.items():
            d = signed_step(d, slots)
            if np.any(v):
                self.diagonals[d] = self.diagonals.get(d, 0) + np.asarray(v, np.float64)

    def giants(self) -> dict[int, list[tuple[int, np.ndarray]]]:
        out = defaultdict(list)
        for d in sorted(self.diagonals):
            g = (d // self.baby) * self.baby
            out[g].append((d - g, self.diagonals[d]))
        return dict(out)

    def steps(self) -> set[int]:
        """The rotations it needs keys for."""
        return {s for g, terms in self.giants().items() for s in [g] + [j for j, _ in terms]} - {0}

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The same map on plaintext slots (what the tests check it against)."""
        return sum(v * np.roll(x, -d) for d, v in self.diagonals.items()) if self.diagonals else np.zeros_like(x)
