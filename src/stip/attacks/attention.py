"""Attention leakage: the scores QKᵀ that P2 computes are the plaintext ones.

Head-structured permutations reorder heads and shuffle coordinates inside each head, which
leaves every dot product qᵢ·kⱼ unchanged, so P2 sees each head's attention map exactly (up to
the head order). ``repeats`` measures one thing that leaks from them: positions holding the
same token are attended to alike, so the similarity of two positions' attention columns
tells which tokens repeat.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def maps(model, attention_mask: torch.Tensor, *, inputs_embeds=None, input_ids=None) -> tuple[torch.Tensor, ...]:
    """Every layer's attention probabilities (batch, heads, n, n): as P2 computes them on the
    sealed model from the permuted embeddings it received (or, for comparison, those of a
    plaintext model from token ids)."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the fused kernels do not return the maps
    try:
        out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               output_attentions=True)
    finally:
        model.set_attn_implementation(impl)
    return out.attentions


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counting half."""
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def repeat_scores(attn: torch.Tensor, n: int) -> np.ndarray:
    """(n, n) cosine similarity of positions' attention columns, all heads of one layer
    (heads, n, n) concatenated: high when two positions are attended to alike."""
    cols = attn[:, :n, :n].permute(2, 0, 1).reshape(n, -1).double()
    cols = cols / cols.norm(dim=1, keepdim=True)
    return (cols @ cols.T).numpy()


def repeats(attentions: tuple[torch.Tensor, ...], ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """How well each layer's attention maps separate same-token pairs of positions from the
    others (AUC over all pairs of real positions; 0.5 is chance), and the best layer's
    precision among its top-m pairs, m the number of repeated pairs."""
    pairs = []  # per prompt: its length, the upper-triangle pair indices, which pairs repeat a token
    for b in range(len(ids)):
        n = int(mask[b].sum())
        iu = np.triu_indices(n, 1)
        pairs.append((n, iu, (ids[b, :n, None] == ids[b, None, :n]).numpy()[iu]))
    if not any(same.any() for _, _, same in pairs):
        raise ValueError("no token repeats within a text: attention leakage has nothing to score")
    by_layer, precision = [], []
    for attn in attentions:
        scores = [repeat_scores(attn[b], n)[iu] for b, (n, iu, _) in enumerate(pairs)]
        pos = np.concatenate([sc[same] for sc, (_, _, same) in zip(scores, pairs)])
        neg = np.concatenate([sc[~same] for sc, (_, _, same) in zip(scores, pairs)])
        by_layer.append(_auc(pos, neg))
        top = np.sort(np.concatenate([pos, neg]))[::-1][: len(pos)]
        precision.append(float(np.isin(top, pos).mean()))
    best = int(np.nanargmax(by_layer))
    return {"auc": by_layer[best], "layer": best, "auc_by_layer": by_layer, "precision_at_m": precision[best],
            "repeated_pairs": int(len(pos)), "other_pairs": int(len(neg))}
