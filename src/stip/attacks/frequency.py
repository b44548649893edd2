"""Frequency analysis of the token ids P2 logs: a substitution cipher on the vocabulary.

In token mode P2 receives every prompt as renamed ids and emits every generated id; in
embedding mode it still sees the argmax of the permuted logits it returns at each step. The
renaming π_c is fixed per sealing, so across many requests the ids keep their text's
statistics: how often each occurs, and which ids follow which. ``solve`` maps renamed ids to
real ones by matching those statistics against a public reference (the public model's own
answers to other prompts, which any attacker can produce):

1. a frequency prior: renamed id a and token p are alike when their log frequencies are close;
2. context: a's right and left neighbours, translated into tokens by the current assignment,
   should be distributed like p's neighbours in the reference (cosine of the two);
3. iterate 2 with a sharpening soft assignment; the request boundary is a shared anchor;
4. a one-to-one assignment from the final scores, most confident pairs first.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

def _index(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, dict[int, int]]:
    ids = sorted({t for s in seqs for t in s})
    # 0 is the start or end of a request: P2 sees it, so it is a known pair of symbols
    return np.asarray(ids), {t: i + 1 for i, t in enumerate(ids)}


def _bigrams(seqs, where: dict[int, int], n: int) -> torch.Tensor:
    rows, cols = [], []
    for s in seqs:
        x = [0] + [where[t] for t in s] + [0]
        rows += x[:-1]
        cols += x[1:]
    idx = torch.tensor([rows, cols])
    return torch.sparse_coo_tensor(idx, torch.ones(len(rows)), (n, n)).coalesce()


def _normalise_rows(m: torch.Tensor) -> torch.Tensor:
    """Row-normalised (L2) sparse matrix of sqrt counts: a distribution's shape, comparable by dot
    products between two corpora of different sizes."""
    m = m.coalesce()
    v = m.values().sqrt()
    norm = torch.zeros(m.shape[0]).index_add_(0, m.indices()[0], v * v).sqrt()
    return torch.sparse_coo_tensor(m.indices(), v / norm[m.indices()[0]].clamp(min=1e-12), m.shape).coalesce()


def solve(observed: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], *, iterations: int = 12,
          sigma: float = 0.5, weight: float = 4.0, temperature: tuple[float, float] = (1.0, 0.05)) -> dict[int, int]:
    """Renamed id → the token it most likely stands for, one-to-one, for every id in
    ``observed``; from unigram and bigram statistics against ``reference`` (real token ids)."""
    c_ids, c_at = _index(observed)
    p_ids, p_at = _index(reference)
    nc, np_ = len(c_ids) + 1, len(p_ids) + 1
    bc, br = _bigrams(observed, c_at, nc), _bigrams(reference, p_at, np_)
    fc = torch.sparse.sum(bc, 1).to_dense()
    fp = torch.sparse.sum(br, 1).to_dense()
    lc, lp = (fc / fc.sum()).clamp(min=1e-12).log(), (fp / fp.sum()).clamp(min=1e-12).log()
    # A rare id's frequency is a noisy estimate: widen its prior by the count's Poisson spread.
    spread = (sigma**2 + 1.0 / fc.clamp(min=1))[:, None].sqrt()
    prior = -((lc[:, None] - lp[None, :]) ** 2) / (2 * spread**2)
    prior[0, :], prior[:, 0], prior[0, 0] = -math.inf, -math.inf, 0.0
    # CSR, not COO: its products with the dense assignment took solve from 42.6 to 15.9 s (100 sampled sequences)
    right_c, left_c = _normalise_rows(bc).to_sparse_csr(), _normalise_rows(bc.t()).to_sparse_csr()
    right_p, left_p = _normalise_rows(br).to_sparse_csr(), _normalise_rows(br.t()).to_sparse_csr()
    score = prior
    for it in range(iterations):
        t = temperature[0] * (temperature[1] / temperature[0]) ** (it / max(iterations - 1, 1))
        assign = torch.softmax(score / t, 1)  # (nc, np): a's current belief over tokens
        ctx = 0
        for c, p in ((right_c, right_p), (left_c, left_p)):
            translated = c @ assign  # a's neighbours, as tokens
            translated = translated / translated.norm(dim=1, keepdim=True).clamp(min=1e-12)
            ctx = ctx + (p @ translated.t()).t()  # cosine with each token's neighbours
        score = prior + weight * ctx
    return {int(c_ids[a - 1]): int(p_ids[p - 1]) for a, p in _one_to_one(score) if a and p}


def _one_to_one(score: torch.Tensor, top: int = 16) -> list[tuple[int, int]]:
    """Greedy one-to-one assignment: the most confident (row, column) pairs first, each row's
    ``top`` best columns considered, then any row left over gets its best free column."""
    k = min(top, score.shape[1])
    best = score.topk(k, 1)
    rows = torch.arange(score.shape[0])[:, None].expand(-1, k).reshape(-1)
    cols, vals = best.indices.reshape(-1), best.values.reshape(-1)
    order = vals.argsort(descending=True)
    used_r, used_c, pairs = set(), set(), []
    for r, c in zip(rows[order].tolist(), cols[order].tolist()):
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    for r in range(score.shape[0]):
        if r not in used_r:
            free = score[r].clone()
            free[list(used_c)] = -math.inf
            c = int(free.argmax())
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    return pairs


def recovered(mapping: dict[int, int], observed: Sequence[Sequence[int]], truth: Sequence[Sequence[int]],
              keep: Sequence[Sequence[bool]] | None = None) -> float:
    """Share of the observed occurrences (where ``keep``) whose id maps to the true token."""
    hits = total = 0
    for i, (o, t) in enumerate(zip(observed, truth)):
        for j, (a, b) in enumerate(zip(o, t)):
            if keep is None or keep[i][j]:
                hits += mapping.get(a) == b
                total += 1
    return hits / total if total else float("nan")
