"""Helpers over Hugging Face models that several parts share."""

from __future__ import annotations

import torch


def _layers(model) -> torch.nn.ModuleList:
    base = model.base_model
    holder = base.encoder if hasattr(base, "encoder") else base
    name = next(n for n in ("layer", "h", "layers") if isinstance(getattr(holder, n, None), torch.nn.ModuleList))
    return getattr(holder, name)


class _Reached(Exception):
    def __init__(self, value: torch.Tensor):
        self.value = value


@torch.no_grad()
def hidden(model, k: int, **inputs) -> torch.Tensor:
    """The hidden states after k layers (the residual stream that enters layer k): of the public
    model from ids, or — run by P2 on the sealed model from what it received — exactly what P2
    observes there. ``inputs`` go to the base model as they are (input_ids or inputs_embeds,
    attention_mask, past_key_values, …). Layers from k on never run: the walk stops at layer
    k's input; after the last layer, its output is taken before the final norm."""
    layers = _layers(model)
    if not 0 <= k <= len(layers):
        raise ValueError(f"k must be in 0..{len(layers)} for this model, not {k}")

    def stop(_module, args, kwargs, output=None):
        raise _Reached(output if output is not None else (args[0] if args else kwargs["hidden_states"]))

    if k < len(layers):
        tap = layers[k].register_forward_pre_hook(stop, with_kwargs=True)
    else:
        tap = layers[k - 1].register_forward_hook(
            lambda m, a, kw, out: stop(m, a, kw, out[0] if isinstance(out, tuple) else out), with_kwargs=True)
    try:
        model.base_model(**inputs)
    except _Reached as r:
        return r.value
    finally:
        tap.remove()
    raise RuntimeError(f"layer {k} was never reached")


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``probs`` (rows, vocab), drawn from it: (rows, 1). By the inverse CDF,
    which costs ~5 ms on 64 × 49,152 against ~130 ms for `torch.multinomial` here. A
    zero-probability id is never drawn (``right``: the first cumulative mass above u)."""
    mass = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=mass.dtype) * mass[:, -1:]
    return torch.searchsorted(mass, u, right=True).clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], new_tokens: int, *, embed=None, restore=None, stop: set[int] = frozenset(),
           batch: int = 32, log=lambda _done, _total: None, temperature: float = 0.0,
           generator: torch.Generator | None = None) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of many prompts, batched (left-padded, one KV cache per batch).
    Each continuation is the list of argmax ids of the model's logits, cut after the first id in
    ``stop``. The model is fed ids, its own argmax fed back; or, with ``embed`` (ids → rows),
    rows: the prompts' ids embedded, then each argmax mapped by ``restore`` and embedded (STIP's
    embedding mode: P3 restores the id P2 returns and sends that token's permuted row). At
    ``temperature`` > 0 each id is sampled from the softmax instead (``generator`` seeds it)."""
    from transformers import DynamicCache

    out: list[list[int]] = []
    for b0 in range(0, len(prompts), batch):
        group = prompts[b0 : b0 + batch]
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, p in enumerate(group):
            ids[r, width - len(p):], mask[r, width - len(p):] = torch.as_tensor(p), 1
        cache, done = DynamicCache(), torch.zeros(len(group), dtype=torch.bool)
        nxt, gen = ids, []
        for step in range(new_tokens):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -nxt.shape[1]:]
            if embed is None:
                fed = {"input_ids": nxt}
            else:  # the prompt is real ids; later steps feed back the model's own argmax
                fed = {"inputs_embeds": embed(restore(nxt) if step and restore is not None else nxt)}
            logits = model(**fed, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
            if temperature > 0:
                probs = torch.softmax(logits[:, -1].double() / temperature, -1)
                nxt = draw(probs, generator)
            else:
                nxt = logits[:, -1].argmax(-1, keepdim=True)
            gen.append(nxt[:, 0])
            done |= torch.isin(nxt[:, 0], torch.as_tensor(sorted(stop), dtype=torch.long))
            mask = torch.cat([mask, torch.ones(len(group), 1, dtype=torch.long)], 1)
            if done.all():
                break
        for row in torch.stack(gen, 1).tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
        log(len(out), len(prompts))
    return out
