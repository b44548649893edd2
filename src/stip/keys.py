"""The secret key Π of a sealed model.

Π = {π, π_c, and per layer the attention and FFN permutations}. The provider (P1) holds all
of it; the user (P3) gets the client key, π and π_c only. A permutation is an int64 index
array p: "x permuted by p" is ``x[..., p]``, and ``invert(p)`` undoes it.

Every secret permutation in the package is drawn here, from ``os.urandom``.

    key = keys.generate(layout, model=identity)
    key.save("provider/key.stip")            # mode 0600
    key.client_key().save("client/key.stip")
    keys.load("client/key.stip")             # validates before returning
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import StipError

FORMAT = "stip-key/1"
PI, PI_C = "pi", "pi_c"


class InvalidKey(StipError, ValueError):
    """A key file or key object that must not be used."""


# --- layout: which permutations a model needs -------------------------------------------------


@dataclass(frozen=True)
class Free:
    """An unconstrained permutation of n coordinates."""

    n: int


@dataclass(frozen=True)
class Attention:
    """The four head-structured permutations of one attention block.

    ``q``/``k`` permute the query/key projections' outputs, ``v`` the value projection's output
    and ``o`` the output projection's input. One head order is shared by all four (query heads
    move with their KV head under GQA); Q and K share one within-head shuffle, V and O another.
    With RoPE the Q/K within-head shuffle is the identity: rotary pairs carry fixed frequencies.
    """

    heads: int
    kv_heads: int
    head_dim: int
    rope: bool

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def lengths(self) -> dict[str, int]:
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {"q": q, "k": kv, "v": kv, "o": q}


Layout = Mapping[str, "Free | Attention"]


def _layout_to_json(layout: Layout) -> dict:
    out = {}
    for name, spec in layout.items():
        if isinstance(spec, Free):
            out[name] = {"free": spec.n}
        else:
            out[name] = {
                "attention": [spec.heads, spec.kv_heads, spec.head_dim, spec.rope],
            }
    return out


def _layout_from_json(data: dict) -> dict[str, Free | Attention]:
    out: dict[str, Free | Attention] = {}
    for name, spec in data.items():
        if "free" in spec:
            out[name] = Free(int(spec["free"]))
        else:
            h, kv, hd, rope = spec["attention"]
            out[name] = Attention(int(h), int(kv), int(hd), bool(rope))
    return out


def _array_names(layout: Layout) -> dict[str, int]:
    """Flat array name -> expected length."""
    names = {}
    for name, spec in layout.items():
        if isinstance(spec, Free):
            names[name] = spec.n
        else:
            for part, n in spec.lengths().items():
                names[f"{name}.{part}"] = n
    return names


# --- drawing -------------------------------------------------------------------------------------


def random_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of range(n) from the OS CSPRNG.

    Sorting n independent 64-bit random keys gives a uniform permutation when the keys are
    distinct; a collision (probability below n²/2⁶⁵) is redrawn rather than broken by order.
    """
    if n < 0:
        raise ValueError(f"permutation length must be >= 0, got {n}")
    while True:
        keys = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        if np.unique(keys).size == n:
            return np.argsort(keys, kind="stable").astype(np.int64)


def _draw_attention(spec: Attention) -> dict[str, np.ndarray]:
    hd, g = spec.head_dim, spec.group
    kv_order = random_permutation(spec.kv_heads)
    q, k, v, o = [], [], [], []
    for old_kv in kv_order:
        rho_qk = np.arange(hd) if spec.rope else random_permutation(hd)
        rho_vo = random_permutation(hd)
        k.append(old_kv * hd + rho_qk)
        v.append(old_kv * hd + rho_vo)
        for j in random_permutation(g):  # query heads may shuffle inside their group
            old_q = old_kv * g + j
            q.append(old_q * hd + rho_qk)
            o.append(old_q * hd + rho_vo)
    return {p: np.concatenate(a).astype(np.int64) for p, a in zip("qkvo", (q, k, v, o))}


def generate(layout: Layout, model: Mapping[str, object]) -> "Key":
    """Draw a fresh provider key for a model described by ``layout`` and ``model`` (identity)."""
    _check_layout(layout)
    perms: dict[str, np.ndarray] = {}
    for name, spec in layout.items():
        if isinstance(spec, Free):
            perms[name] = random_permutation(spec.n)
        else:
            for part, arr in _draw_attention(spec).items():
                perms[f"{name}.{part}"] = arr
    return Key(perms, layout, model)


def _check_layout(layout: Layout) -> None:
    for required in (PI, PI_C):
        if required not in layout or not isinstance(layout[required], Free):
            raise InvalidKey(f"a key layout needs a free permutation named {required!r}")
    for name, spec in layout.items():
        if isinstance(spec, Attention):
            if spec.heads <= 0 or spec.kv_heads <= 0 or spec.head_dim <= 0:
                raise InvalidKey(f"{name}: heads, kv_heads and head_dim must be positive")
            if spec.heads % spec.kv_heads:
                raise InvalidKey(f"{name}: {spec.heads} heads do not split into {spec.kv_heads} KV groups")


# --- checks --------------------------------------------------------------------------------------


def invert(p: np.ndarray) -> np.ndarray:
    """The permutation that undoes p: ``x[..., p][..., invert(p)] == x``."""
    inv = np.empty_like(p)
    inv[p] = np.arange(p.size, dtype=p.dtype)
    return inv


def check_permutation(name: str, p: np.ndarray, n: int) -> None:
    if p.ndim != 1 or p.size != n:
        raise InvalidKey(f"{name!r} has shape {tuple(p.shape)}, expected a permutation of length {n}")
    if not np.issubdtype(p.dtype, np.integer):
        raise InvalidKey(f"{name!r} has dtype {p.dtype}, expected integers")
    if n and (p.min() < 0 or p.max() >= n):
        raise InvalidKey(f"{name!r} has a value outside 0..{n - 1}: not a permutation")
    if np.unique(p).size != n:
        raise InvalidKey(f"{name!r} repeats a value: not a permutation")


def check_attention(name: str, spec: Attention, q, k, v, o) -> None:
    """Refuse attention permutations that would silently break the per-head split."""
    hd, g = spec.head_dim, spec.group
    for part, arr, heads in (("q", q, spec.heads), ("k", k, spec.kv_heads), ("v", v, spec.kv_heads), ("o", o, spec.heads)):
        blocks = arr.reshape(heads, hd)
        if not (blocks // hd == blocks[:, :1] // hd).all():
            raise InvalidKey(f"{name}.{part} mixes coordinates of different heads: not head-structured")
    old_kv = k.reshape(spec.kv_heads, hd)[:, 0] // hd
    if not (v.reshape(spec.kv_heads, hd)[:, 0] // hd == old_kv).all():
        raise InvalidKey(f"{name}: K and V put their heads in different orders")
    rho_qk = k.reshape(spec.kv_heads, hd) % hd
    rho_vo = v.reshape(spec.kv_heads, hd) % hd
    for arr, rho, pair in ((q, rho_qk, "q/k"), (o, rho_vo, "o/v")):
        blocks = arr.reshape(spec.kv_heads, g, hd)
        if not (blocks[:, :, 0] // hd // g == old_kv[:, None]).all():
            raise InvalidKey(f"{name}.{pair[0]} moves a query head away from its KV head")
        if not (blocks % hd == rho[:, None, :]).all():
            raise InvalidKey(f"{name}: {pair} do not share their within-head shuffle")
    if not (q.reshape(spec.heads, hd)[:, 0] // hd == o.reshape(spec.heads, hd)[:, 0] // hd).all():
        raise InvalidKey(f"{name}: Q and O put the query heads in different orders")
    if spec.rope and not (rho_qk == np.arange(hd)).all():
        raise InvalidKey(f"{name}: with RoPE, Q/K may move whole heads only (no shuffle inside a head)")


def fingerprint(perms: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the permutations, in name order, domain-separated."""
    h = hashlib.sha256(FORMAT.encode() + b"\0")
    for name in sorted(perms):
        arr = np.ascontiguousarray(perms[name], dtype="<i8")
        h.update(name.encode() + b"\0" + arr.size.to_bytes(8, "little") + arr.tobytes())
    return h.hexdigest()


# --- the two key types ---------------------------------------------------------------------------


class Key:
    """The provider's key: all of Π. Never leaves P1."""

    kind = "provider"

    def __init__(self, perms: Mapping[str, np.ndarray], layout: Layout, model: Mapping[str, object]):
        _check_layout(layout)
        expected = _array_names(layout)
        if set(perms) != set(expected):
            missing = sorted(set(expected) - set(perms))
            extra = sorted(set(perms) - set(expected))
            raise InvalidKey(f"key arrays do not match its layout (missing {missing}, unexpected {extra})")
        self._perms = {n: np.asarray(perms[n], dtype=np.int64) for n in expected}
        for name, n in expected.items():
            check_permutation(name, self._perms[name], n)
        for name, spec in layout.items():
            if isinstance(spec, Attention):
                check_attention(name, spec, *(self._perms[f"{name}.{p}"] for p in "qkvo"))
        for arr in self._perms.values():
            arr.setflags(write=False)
        self.layout: dict[str, Free | Attention] = dict(layout)
        self.model: dict = dict(model)
        self.fingerprint = fingerprint(self._perms)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._perms[name]

    @property
    def pi(self) -> np.ndarray:
        return self._perms[PI]

    @property
    def pi_c(self) -> np.ndarray:
        return self._perms[PI_C]

    def attention(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(q, k, v, o) of the attention block ``name``."""
        return tuple(self._perms[f"{name}.{p}"] for p in "qkvo")  # type: ignore[return-value]

    def names(self) -> list[str]:
        return list(self._perms)

    def client_key(self, *, tokens: bool = False) -> "ClientKey":
        """P3's share: π and π_c; in token mode π_c alone (P2 embeds, so P3 never needs π)."""
        return ClientKey(None if tokens else self.pi, self.pi_c, self.fingerprint, self.model)

    def matches(self, layout: Layout, model: Mapping[str, object]) -> None:
        """Raise unless this key was drawn for this layout and this model."""
        if dict(layout) != self.layout:
            raise InvalidKey("this key was drawn for a different architecture (its layout does not match the model)")
        if model.get("digest") != self.model.get("digest"):
            raise InvalidKey(
                f"this key belongs to model {self.model.get('digest', '?')[:16]}…, "
                f"not to {str(model.get('digest', '?'))[:16]}…"
            )

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"layout": _layout_to_json(self.layout)}
        return _write(path, self.kind, self._perms, self.fingerprint, self.model, meta)

    def __repr__(self) -> str:  # never print permutations
        return f"<stip Key provider {self.fingerprint[:16]}… {len(self._perms)} permutations>"


class ClientKey:
    """The user's key: π (input) and π_c (output), nothing per layer. A token-mode key holds
    π_c only."""

    kind = "client"

    def __init__(self, pi: np.ndarray | None, pi_c: np.ndarray, fingerprint_: str, model: Mapping[str, object]):
        self._perms = {PI_C: np.asarray(pi_c, dtype=np.int64)}
        if pi is not None:
            self._perms[PI] = np.asarray(pi, dtype=np.int64)
        for name, arr in self._perms.items():
            check_permutation(name, arr, arr.size)
            arr.setflags(write=False)
        self.fingerprint = fingerprint_
        self.model: dict = dict(model)
        self.digest = fingerprint(self._perms)

    @property
    def pi(self) -> np.ndarray:
        if PI not in self._perms:
            raise InvalidKey("this is a token-mode client key: it holds π_c only")
        return self._perms[PI]

    @property
    def pi_c(self) -> np.ndarray:
        return self._perms[PI_C]

    @property
    def tokens_only(self) -> bool:
        return PI not in self._perms

    def save(self, path: str | os.PathLike) -> Path:
        return _write(path, self.kind, self._perms, self.fingerprint, self.model, {"digest": self.digest})

    def __repr__(self) -> str:
        return f"<stip ClientKey {self.fingerprint[:16]}…>"


# --- files ---------------------------------------------------------------------------------------


def _write(path, kind, perms, fp, model, extra) -> Path:
    from safetensors.numpy import save

    meta = {"format": FORMAT, "kind": kind, "fingerprint": fp, "model": model, **extra}
    blob = save({n: np.ascontiguousarray(a, dtype="<i8") for n, a in perms.items()}, metadata={"stip": json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a 0600 temp file in the same folder, then renamed: never world-readable,
    # never half-written.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> Key | ClientKey:
    """Load and validate a provider or client key file; refuse anything malformed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise InvalidKey(f"cannot read key file {path}: {e.strerror or e}") from None
    try:
        arrays = st_load(blob)
        header_len = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["stip"])
    except (SafetensorError, ValueError, KeyError, TypeError, struct.error) as e:
        raise InvalidKey(f"key file {path} is corrupted or truncated ({e})") from None
    if meta.get("format") != FORMAT:
        raise InvalidKey(f"key file {path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    try:
        if meta["kind"] == "provider":
            key: Key | ClientKey = Key(arrays, _layout_from_json(meta["layout"]), meta["model"])
            ok = key.fingerprint == meta["fingerprint"]
        elif meta["kind"] == "client":
            if set(arrays) not in ({PI, PI_C}, {PI_C}):
                raise InvalidKey(f"a client key holds {PI!r} and {PI_C!r} (or {PI_C!r} alone), found {sorted(arrays)}")
            key = ClientKey(arrays.get(PI), arrays[PI_C], meta["fingerprint"], meta["model"])
            ok = key.digest == meta["digest"]
        else:
            raise InvalidKey(f"key file {path} has unknown kind {meta['kind']!r}")
    except InvalidKey as e:
        raise InvalidKey(f"key file {path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidKey(f"key file {path} is corrupted ({type(e).__name__}: {e})") from None
    if not ok:
        raise InvalidKey(f"key file {path} fails its integrity check: its permutations do not match its fingerprint")
    return key
