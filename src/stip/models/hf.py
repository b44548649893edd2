"""Helpers over Hugging Face models that several parts share."""

from __future__ import annotations

import torch


def _layers(model) -> tuple[torch.nn.Module, str]:
    base = model.base_model
    holder = base.encoder if hasattr(base, "encoder") else base
    return holder, next(n for n in ("layer", "h", "layers") if isinstance(getattr(holder, n, None), torch.nn.ModuleList))


@torch.no_grad()
def hidden(model, k: int, *, input_ids=None, inputs_embeds=None, attention_mask=None) -> torch.Tensor:
    """The hidden states after k layers: of the public model from ids, or — run by P2 on the
    sealed model from the permuted embeddings it received — exactly what P2 observes there.
    Only the first k layers run (a hook catches layer k's output)."""
    holder, name = _layers(model)
    full = getattr(holder, name)
    seen = []
    tap = (full[k - 1] if k else model.base_model.embeddings).register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out))
    setattr(holder, name, full[:k])
    try:
        model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    finally:
        setattr(holder, name, full)
        tap.remove()
    return seen[0]
