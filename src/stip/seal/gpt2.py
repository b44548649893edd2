"""GPT-2 (GPT2LMHeadModel).

    ln_1, ln_2, ln_f          γ[π], β[π]
    attn.c_attn (fused QKV)   in π, out [π_{i,1} | π_{i,1} | π_{i,2}]   (Conv1D: weight (in, out))
    attn.c_proj               in π_{i,2}, out π
    mlp.c_fc / mlp.c_proj     in π, out π_{i,3} / in π_{i,3}, out π
    lm_head                   untied from wte: wte[π_c][:, π]
    wte, wpe                  P3's; wpe stays on P2 as zeros since GPT2Model adds it to inputs_embeds
    token mode                wte′ = wte[π_c][:, π] (= lm_head′) and wpe′ = wpe[:, π] stay on P2
"""

from __future__ import annotations

import torch

from . import rules
from ..keys import PI, PI_C, Attention, Free, Key
from ..models import source

MODEL_TYPES, ARCHITECTURES = source.FAMILIES["gpt2"]


def layout(model) -> dict:
    c = model.config
    d, heads = c.n_embd, c.n_head
    out = {PI: Free(d), PI_C: Free(c.vocab_size)}
    for i in range(c.n_layer):
        out[f"layer.{i}.attn"] = Attention(heads, heads, d // heads, rope=False)
        out[f"layer.{i}.ffn"] = Free(c.n_inner or 4 * d)
    return out


def seal_(model, key: Key, step=lambda _: None) -> None:
    body, pi = model.transformer, key.pi
    for i, block in enumerate(body.h):
        q, k, v, o = key.attention(f"layer.{i}.attn")
        rules.norm(block.ln_1, pi)
        rules.conv1d(block.attn.c_attn, pi, rules.concat(q, k, v))
        rules.conv1d(block.attn.c_proj, o, pi)
        rules.norm(block.ln_2, pi)
        ffn = key[f"layer.{i}.ffn"]
        rules.conv1d(block.mlp.c_fc, pi, ffn)
        rules.conv1d(block.mlp.c_proj, ffn, pi)
        step(f"layer {i}")
    rules.norm(body.ln_f, pi)
    untie_lm_head(model)
    rules.linear(model.lm_head, pi, key.pi_c)
    step("head")


def seal_tokens_(model, key: Key) -> None:
    rules.embedding(model.transformer.wte, key.pi_c, key.pi)
    rules.columns(model.transformer.wpe.weight, key.pi)


def untie_lm_head(model) -> None:
    """Give lm_head its own copy of the tied table: P3 keeps the input table, P2 the sealed head."""
    if model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


def client_side(model) -> dict[str, str]:
    return {"transformer.wte.weight": "drop", "transformer.wpe.weight": "zero"}
