"""The layer rules of stip-algebra.md, as in-place rewrites of torch modules.

Activations are rows; an input arriving permuted by ``p_in`` and an output that must leave
permuted by ``p_out`` give, for ``y = x Wᵀ + b`` (torch ``nn.Linear``, weight (out, in)):

    W′ = W[p_out][:, p_in]        b′ = b[p_out]

Everything is an index gather; no dense permutation matrix is ever built.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _idx(p: np.ndarray | None, device) -> torch.Tensor | None:
    return None if p is None else torch.tensor(p, dtype=torch.long, device=device)


def _gather(t: torch.Tensor, dim: int, p: np.ndarray | None) -> torch.Tensor:
    if p is None:
        return t
    if t.shape[dim] != len(p):
        raise ValueError(f"permutation of length {len(p)} applied to a dimension of size {t.shape[dim]}")
    return t.index_select(dim, _idx(p, t.device))


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.contiguous()


@torch.no_grad()
def linear(lin: nn.Module, p_in: np.ndarray | None, p_out: np.ndarray | None) -> None:
    """nn.Linear (weight (out, in)): input permuted by p_in, output by p_out."""
    _assign(lin.weight, _gather(_gather(lin.weight, 0, p_out), 1, p_in))
    if getattr(lin, "bias", None) is not None:
        _assign(lin.bias, _gather(lin.bias, 0, p_out))


@torch.no_grad()
def embedding(emb: nn.Module, p_rows: np.ndarray, p_cols: np.ndarray) -> None:
    """nn.Embedding (weight (vocab, d)): row j of the sealed table embeds the id that p_rows
    puts at j, so ids are renamed by p_rows; each row leaves permuted by p_cols."""
    _assign(emb.weight, _gather(_gather(emb.weight, 0, p_rows), 1, p_cols))


@torch.no_grad()
def conv1d(conv: nn.Module, p_in: np.ndarray | None, p_out: np.ndarray | None) -> None:
    """GPT-2's Conv1D, whose weight is stored transposed: (in, out)."""
    _assign(conv.weight, _gather(_gather(conv.weight, 0, p_in), 1, p_out))
    if getattr(conv, "bias", None) is not None:
        _assign(conv.bias, _gather(conv.bias, 0, p_out))


@torch.no_grad()
def norm(mod: nn.Module, p: np.ndarray) -> None:
    """LayerNorm / RMSNorm over the permuted dimension: γ′ = γ[p], β′ = β[p].

    Mean, variance and RMS of a row do not depend on column order, so only the affine
    parameters move.
    """
    _assign(mod.weight, _gather(mod.weight, 0, p))
    if getattr(mod, "bias", None) is not None:
        _assign(mod.bias, _gather(mod.bias, 0, p))


@torch.no_grad()
def batch_norm(mod: nn.Module, p: np.ndarray) -> None:
    """BatchNorm over the permuted features: per-feature statistics move with their feature."""
    norm(mod, p)
    for name in ("running_mean", "running_var"):
        setattr(mod, name, _gather(getattr(mod, name), 0, p).contiguous())


@torch.no_grad()
def columns(t: torch.Tensor, p: np.ndarray, dim: int = -1) -> None:
    """Permute one dimension of a raw parameter (e.g. a per-head bias table's head axis)."""
    _assign(t, _gather(t, dim % t.dim(), p))


def head_order(perm: np.ndarray, head_dim: int) -> np.ndarray:
    """The head permutation σ inside a head-structured permutation (old head of each new slot)."""
    return perm.reshape(-1, head_dim)[:, 0] // head_dim


def repeat(p: np.ndarray, times: int) -> np.ndarray:
    """``times`` copies of p over consecutive blocks: the permutation of a concatenation
    of ``times`` vectors that are each permuted by p (Swin's patch merging, GPT-2's fused QKV
    when all three share one permutation)."""
    n = len(p)
    return np.concatenate([p + i * n for i in range(times)])


def concat(*parts: np.ndarray) -> np.ndarray:
    """The permutation of a concatenation [a | b | …] whose parts are permuted independently."""
    out, offset = [], 0
    for p in parts:
        out.append(p + offset)
        offset += len(p)
    return np.concatenate(out)


@torch.no_grad()
def zero_(t: torch.Tensor) -> None:
    t.data.zero_()
