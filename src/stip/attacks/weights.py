"""Weight matching (ArrowMatch, USENIX Security 2025): the key from the sealed checkpoint.

When the sealed model derives from public weights, every sealed tensor is a public tensor
with its axes permuted. Sorting a tensor along one axis removes that axis's permutation, so
the columns (or rows) of the sealed tensor can be matched to the public ones by their sorted
values: each tensor with an axis of the model width votes for π; the majority wins because
most tensors read or write the residual stream. With π known, the other axis of each tensor
is matched row by row, which yields the per-layer permutations; un-permuting then gives back
the public tensor exactly when the recovery is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Match:
    pi: np.ndarray  # recovered π (x_perm = x[..., pi])
    votes: int  # how many tensors voted
    agreement: float  # mean fraction of voters agreeing with the winner per coordinate
    other: dict[str, np.ndarray] = field(default_factory=dict)  # tensor name -> its other axis's permutation
    unsealed: dict[str, bool] = field(default_factory=dict)  # tensor name -> equal to the public one once un-permuted


def _sorted_along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """(size of ``axis``, everything else): each slice along ``axis``, its values sorted, which
    removes whatever permutation the other axis carries."""
    t = t.double().movedim(axis, 0).reshape(t.shape[axis], -1)
    return t.sort(-1).values


def _assign(sealed: torch.Tensor, public: torch.Tensor, chunk: int = 2048) -> np.ndarray:
    """For each sealed row, the nearest public row (L2), in chunks of sealed rows (a vocabulary
    table would otherwise need a vocabulary² distance matrix)."""
    return torch.cat([torch.cdist(s, public).argmin(1) for s in sealed.split(chunk)]).numpy()


@torch.no_grad()
def match(sealed: dict[str, torch.Tensor], public: dict[str, torch.Tensor], width: int) -> Match:
    """Recover π (length ``width``) from state dicts of the sealed and the public model, then
    each 2-D tensor's other permutation. Tensors are paired by name; shapes must agree."""
    names = [n for n in sealed if n in public and sealed[n].shape == public[n].shape and sealed[n].dim() in (1, 2)
             and sealed[n].is_floating_point() and width in sealed[n].shape and sealed[n].abs().sum() > 0]
    votes = []
    for n in names:
        s, p = sealed[n], public[n]
        for axis, size in enumerate(s.shape):
            if size == width:
                votes.append(_assign(_sorted_along(s, axis), _sorted_along(p, axis)))
    if not votes:
        raise ValueError(f"no tensor of the two checkpoints has an axis of width {width}")
    votes = np.stack(votes)  # (voters, width)
    pi = np.empty(width, dtype=np.int64)
    agree = np.empty(width)
    for j in range(width):
        values, counts = np.unique(votes[:, j], return_counts=True)
        pi[j] = values[counts.argmax()]
        agree[j] = counts.max() / len(votes)
    out = Match(pi=pi, votes=len(votes), agreement=float(agree.mean()))
    row_perms = {}  # matrix name -> the permutation of its output rows
    for n in sorted(names, key=lambda n: -sealed[n].dim()):  # matrices first: their biases follow them
        s, p = sealed[n].double(), public[n].double()
        if s.dim() == 1:  # a bias moves with its matrix's output rows, a norm's parameters with π
            rows = row_perms.get(n.removesuffix("bias") + "weight") if n.endswith("bias") else None
            perm = rows if rows is not None and len(rows) == len(s) else pi
            out.unsealed[n] = bool(torch.allclose(s, p[torch.as_tensor(perm)], atol=1e-6))
            continue
        for axis in (0, 1):
            if s.shape[axis] != width:
                continue
            # Undo π on this axis, then match the other axis's slices exactly.
            s_fixed = s.index_select(axis, torch.as_tensor(np.argsort(pi)))
            other = 1 - axis
            rows_s, rows_p = s_fixed.movedim(other, 0), p.movedim(other, 0)
            perm = _assign(rows_s, rows_p)
            ok = bool(torch.allclose(rows_s, rows_p[torch.as_tensor(perm)], atol=1e-6))
            if ok or n not in out.other:
                out.other[n], out.unsealed[n] = perm, ok
                row_perms[n] = perm if other == 0 else pi
    return out


def decrypt(x_perm: torch.Tensor, pi: np.ndarray) -> torch.Tensor:
    """Captured traffic (…, width) permuted by π, back in the clear."""
    return x_perm.index_select(-1, torch.as_tensor(np.argsort(pi)))
