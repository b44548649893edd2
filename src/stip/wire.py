"""The one binary tensor codec P2 and P3 share: a safetensors blob, strictly validated.

A message is a safetensors file in memory: named tensors plus string metadata. Never JSON
lists of numbers. ``decode`` refuses anything it was not told to expect, so the server can
answer bad input with a 4xx before it reaches the model.

    blob = wire.encode({"embeddings": x}, meta={"session": sid})
    tensors, meta = wire.decode(blob, {"embeddings": Spec(dtypes=FLOATS, ndim=3)})
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .errors import StipError

MEDIA_TYPE = "application/octet-stream"
FLOATS = (torch.float32, torch.float16)
INTS = (torch.int64, torch.int32, torch.bool)
MAX_HEADER = 1 << 16


class WireError(StipError, ValueError):
    """A message that must be refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Spec:
    dtypes: tuple[torch.dtype, ...]
    ndim: int
    required: bool = True


_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
           torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


_NUMPY = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
          np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
          np.dtype(np.bool_): "BOOL"}  # fmt: skip
_TORCH_OF = {code: dtype for dtype, code in _DTYPES.items()}


def encode(tensors: dict[str, torch.Tensor | np.ndarray], meta: dict[str, object] | None = None) -> bytes:
    """Written here rather than by safetensors' ``save``, which costs ~90 µs for a small
    message: shares mode sends ~120 of them per generated token. ``decode`` reads it back
    with safetensors, which checks it. NumPy arrays go in without torch: a share server's
    answers, where each torch call would hand the GIL to another connection's thread."""
    meta_str = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()}
    if all(isinstance(v, np.ndarray) and v.dtype in _NUMPY for v in tensors.values()):
        return _pack({k: (_NUMPY[v.dtype], v.shape, np.ascontiguousarray(v).tobytes()) for k, v in tensors.items()}, meta_str)
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    if any(v.dtype not in _DTYPES for v in tensors.values()):
        from safetensors.torch import save

        return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=meta_str or None)
    return _pack({k: (_DTYPES[t.dtype], t.shape, t.detach().cpu().contiguous().numpy().tobytes()) for k, t in tensors.items()}, meta_str)


def _pack(items: dict[str, tuple[str, tuple, bytes]], meta_str: dict[str, str]) -> bytes:
    header, chunks, offset = {}, [], 0
    for name, (dtype, shape, data) in sorted(items.items()):  # safetensors' own order: by name
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if meta_str:
        header["__metadata__"] = meta_str
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-aligned
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def decode(blob: bytes, expected: dict[str, Spec] | None = None, numpy: bool = False) -> tuple[dict, dict[str, str]]:
    """Parse and check one message. With ``expected``, every tensor must be listed there,
    every required one present, with an allowed dtype and rank, and floats finite.
    ``numpy``: NumPy arrays instead of torch tensors, read without torch (a share server's
    requests: ~10× faster on a small message)."""
    from safetensors import SafetensorError

    if numpy:
        from safetensors.numpy import load
    else:
        from safetensors.torch import load

    if len(blob) < 8:
        raise WireError("malformed body: not a safetensors message (too short)", 400)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER or 8 + n > len(blob):
        raise WireError("malformed body: bad safetensors header length", 400)
    try:
        header = json.loads(blob[8 : 8 + n])
        if numpy:  # NumPy has no bf16: refuse it here, as the torch path's dtype check would
            for name, entry in header.items() if isinstance(header, dict) else ():
                if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") not in _TORCH_OF:
                    raise WireError(f"{name[:64]!r} has dtype {str(entry.get('dtype'))[:16]}, which this endpoint does not take")
        tensors = load(blob)
    except WireError:
        raise
    except (SafetensorError, ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deeply nested JSON
        raise WireError(f"malformed body: {e}", 400) from None
    meta = header.get("__metadata__") or {}
    if expected is not None:
        unknown = sorted(set(tensors) - set(expected))
        if unknown:
            raise WireError(f"unexpected tensor(s) {unknown}; this endpoint takes {sorted(expected)}")
        for name, spec in expected.items():
            t = tensors.get(name)
            if t is None:
                if spec.required:
                    raise WireError(f"missing tensor {name!r}")
                continue
            dtype = _TORCH_OF.get(_NUMPY.get(t.dtype)) if numpy else t.dtype
            if dtype not in spec.dtypes:
                allowed = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes)
                raise WireError(f"{name!r} has dtype {str(dtype or t.dtype).removeprefix('torch.')}; expected one of {allowed}")
            if t.ndim != spec.ndim:
                raise WireError(f"{name!r} has shape {list(t.shape)}; expected {spec.ndim} dimensions")
            if dtype.is_floating_point and not (np.isfinite(t).all() if numpy else torch.isfinite(t).all()):
                raise WireError(f"{name!r} contains NaN or Inf")
    return tensors, meta
