"""Vocabulary matching (Thomas, Pal et al., ICML 2025): prompts from permuted activations.

P2 receives the rows xπ of the input activations. Sorting a row undoes π, so each sorted row
is compared with the sorted rows of the public embedding table (plus what the model adds at
that position): ``match``. Deeper in the model, after k layers, a row depends on the whole
context; ``match_hidden`` runs the public model's first k layers on candidate prompts and
keeps the candidates whose sorted hidden rows are nearest to what P2 observed.

A causal model is weaker still (``match_causal``): its row at position i depends on tokens
≤ i only, so the prompt is recovered left to right, one position at a time, by trying
candidate tokens after the part already recovered — the paper's attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

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


@dataclass
class Causal:
    ids: list[int]
    full_searches: int = 0  # positions where no proposal matched and the whole vocabulary was tried
    distances: list[float] = field(default_factory=list)  # each chosen token's relative sorted-L1 distance
    seconds: float = 0.0


def _sorted_l1(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sorted-L1 distance of each row to ``target`` (already sorted), relative to its L1 norm:
    sorting removes any permutation of the coordinates, so 0 means "the same row, permuted"."""
    return (rows.double().sort(-1).values - target).abs().sum(-1) / target.abs().sum()


def _expanded(cache, layers: int, b: int):
    """The first ``layers`` layers of a batch-1 KV cache, as views repeated for b candidates."""
    from transformers import DynamicCache

    if cache is None:
        return None
    return DynamicCache([(l.keys.expand(b, -1, -1, -1), l.values.expand(b, -1, -1, -1)) for l in cache.layers[:layers]])


@torch.no_grad()
def match_causal(observed: torch.Tensor, public, k: int, *, proposals: int = 1024, start: Sequence[int] = (),
                 chunk: int = 512, tol: float = 1e-3, full: bool = True, scale_free: bool = False,
                 log: Callable[[int, int], None] = lambda _i, _n: None) -> Causal:
    """One prompt's tokens from P2's rows after k layers of a causal model, observed (n, d)
    with the width permuted in any way (Thomas, Pal et al., ICML 2025).

    Position by position, with the prefix already recovered in a KV cache: each candidate token
    runs through the public model's first k layers as the next position, and the candidate
    whose sorted row is nearest (L1) to the observed one wins. Candidates are tried in batches,
    the public model's own ``proposals`` likeliest next tokens first (``start`` at position 0,
    where there is no context); when none is within ``tol`` — exact, up to float rounding —
    the whole vocabulary is searched, stopping at the first batch that holds a match
    (``full=False``: never; the nearest proposal is taken). ``scale_free``: rows are compared
    after dividing each by its L1 norm (for a view that is known only up to a scale)."""
    from transformers import DynamicCache

    t0 = time.perf_counter()
    unit = (lambda r: r / r.abs().sum(-1, keepdim=True).clamp(min=1e-30)) if scale_free else (lambda r: r)  # noqa: E731
    target = unit(observed.double()).sort(-1).values
    vocab = public.get_input_embeddings().num_embeddings
    cache, logits, out = DynamicCache(), None, Causal([])
    for i in range(len(target)):
        tried = torch.zeros(vocab, dtype=torch.bool)
        first = torch.as_tensor(list(start), dtype=torch.long) if logits is None else logits.topk(min(proposals, vocab)).indices
        order = [first[:proposals]] if proposals else []
        best, best_d = None, float("inf")
        for cands in order + ([None] if full or not order else []):
            if cands is None:  # no proposal matched: every remaining token, in chunks
                out.full_searches += 1
                rest = (~tried).nonzero()[:, 0]
                batches = rest.split(chunk)
            else:
                batches = cands[~tried[cands]].split(chunk)
            for ids in batches:
                if not len(ids):
                    continue
                tried[ids] = True
                rows = hidden(public, k, input_ids=ids[:, None], past_key_values=_expanded(cache if i else None, k, len(ids)),
                              use_cache=True)[:, -1]
                d = _sorted_l1(unit(rows.double()), target[i])
                j = int(d.argmin())
                if float(d[j]) < best_d:
                    best, best_d = int(ids[j]), float(d[j])
                if best_d < tol:
                    break
            if best_d < tol:
                break
        out.ids.append(best)
        out.distances.append(best_d)
        step = public(input_ids=torch.tensor([[best]]), past_key_values=cache, use_cache=True)
        logits = step.logits[0, -1]
        log(i + 1, len(target))
    out.seconds = time.perf_counter() - t0
    return out
