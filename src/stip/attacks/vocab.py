"""Vocabulary matching (Thomas, Pal et al., ICML 2025): prompts from permuted activations.

P2 receives the rows xπ of the input activations. Sorting a row undoes π, so each sorted row
is compared with the sorted rows of the public embedding table (plus what the model adds at
that position): ``match``. Deeper in the model, after k layers, a row depends on the whole
context; ``match_hidden`` runs the public model's first k layers on candidate prompts and
keeps the candidates whose sorted hidden rows are nearest to what P2 observed.
"""

from __future__ import annotations

import torch

from ..models.hf import hidden


@torch.no_grad()
def match(x_perm: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor | None = None, chunk: int = 4096) -> torch.Tensor:
    """Token ids from permuted input rows (batch, tokens, d): each row's sorted values against
    the sorted rows of ``table + offsets[t]`` (offsets: what the model adds at position t, e.g.
    BERT's position + token-type rows; None when table rows are sent as they are). Nearest in
    L2 between sorted vectors; one sort of the candidates per position."""
    b, n, _ = x_perm.shape
    x_sorted = x_perm.double().sort(-1).values
    out = torch.empty(b, n, dtype=torch.long)
    plain = table.double().sort(-1).values if offsets is None else None
    for t in range(n):
        cands = plain if offsets is None else (table.double() + offsets[t].double()).sort(-1).values
        out[:, t] = _nearest(x_sorted[:, t], cands, chunk)
    return out


def _nearest(rows: torch.Tensor, cands: torch.Tensor, chunk: int, k: int = 1) -> torch.Tensor:
    """Indices of the k nearest candidates (L2) of each row, chunked over the candidates."""
    best_d = torch.full((len(rows), 0), float("inf"), dtype=torch.float64)
    best_i = torch.zeros((len(rows), 0), dtype=torch.long)
    for i in range(0, len(cands), chunk):
        d = torch.cdist(rows, cands[i : i + chunk])
        best_d = torch.cat([best_d, d], 1)
        best_i = torch.cat([best_i, torch.arange(i, i + d.shape[1]).expand(len(rows), -1)], 1)
        keep = best_d.topk(min(k, best_d.shape[1]), largest=False)
        best_d, best_i = keep.values, best_i.gather(1, keep.indices)
    return best_i[:, 0] if k == 1 else best_i


def _standard_sorted(x: torch.Tensor) -> torch.Tensor:
    s = x.double().sort(-1).values
    return (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-12)


@torch.no_grad()
def match_hidden(observed: torch.Tensor, mask: torch.Tensor, public, k: int, shortlist: int = 64, sweeps: int = 2,
                 chunk: int = 4096) -> torch.Tensor:
    """Token ids from P2's hidden states after k ≥ 1 layers (batch, tokens, d, permuted by π).

    1. Shortlist: per position, the ``shortlist`` tokens whose public layer-0 row (embedding
       and its norm, at that position) is nearest in sorted, standardised values.
    2. Refine: coordinate descent over positions; at each, try every shortlisted token in the
       current guess's context, run the public model's first k layers, keep the candidate
       whose sorted hidden rows (all positions) are nearest to the observed ones.
    A token missing from its shortlist is never recovered, so this is a lower bound on what
    a patient attacker gets."""
    if not hasattr(public.base_model, "embeddings"):
        raise ValueError("hidden-state matching needs a model with BERT-style embeddings (word + position tables)")
    every = torch.arange(public.get_input_embeddings().num_embeddings)
    lengths = [int(m.sum()) for m in mask]
    obs = [_standard_sorted(observed[b, :n]) for b, n in enumerate(lengths)]
    cands: list[list[torch.Tensor]] = [[] for _ in lengths]
    for t in range(max(lengths)):  # one sort of the vocabulary's layer-0 rows per position, for every prompt
        rows = _standard_sorted(_layer0_at(public, every, t))
        for b, n in enumerate(lengths):
            if t < n:
                cands[b].append(_nearest(obs[b][t : t + 1], rows, chunk, shortlist)[0])
    out = torch.empty(observed.shape[:2], dtype=torch.long)
    for b, n in enumerate(lengths):
        guess = torch.stack([c[0] for c in cands[b]])
        for _ in range(sweeps):
            for t in range(n):
                trial = guess.expand(len(cands[b][t]), -1).clone()
                trial[:, t] = cands[b][t]
                h = hidden(public, k, input_ids=trial, attention_mask=torch.ones_like(trial))
                dist = ((_standard_sorted(h) - obs[b]) ** 2).sum((-1, -2))
                guess[t] = cands[b][t][dist.argmin()]
        out[b, :n] = guess
        out[b, n:] = -1
    return out


def _layer0_at(public, ids: torch.Tensor, t: int) -> torch.Tensor:
    """Layer-0 rows of every token alone at position t (embedding sums and their norm)."""
    emb = public.base_model.embeddings
    return emb(input_ids=ids[:, None], position_ids=torch.full((len(ids), 1), t))[:, 0]
