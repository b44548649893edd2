"""ViT (ViTForImageClassification, ViTModel).

    patch embedding, class token, position embedding   P3's (the client embeds the image)
    layernorm_before / layernorm_after / layernorm     γ[π], β[π]
    q_proj, k_proj / v_proj / o_proj                   as BERT: π_{i,1} / π_{i,2} head-structured
    mlp.fc1 / mlp.fc2                                  in π, out π_{i,3} / in π_{i,3}, out π
    classifier (on the class token)                    in π, out π_c
    pooler dense (bare ViTModel)                       in π, out π_c
"""

from __future__ import annotations

from . import rules
from ..keys import PI, PI_C, Attention, Free, Key
from ..models import source

MODEL_TYPES, ARCHITECTURES = source.FAMILIES["vit"]


def _body(model):
    return model.vit if hasattr(model, "vit") else model


def layout(model) -> dict:
    c = model.config
    heads = c.num_attention_heads
    n_out = c.num_labels if hasattr(model, "classifier") else c.hidden_size
    out = {PI: Free(c.hidden_size), PI_C: Free(n_out)}
    for i in range(c.num_hidden_layers):
        out[f"layer.{i}.attn"] = Attention(heads, heads, c.hidden_size // heads, rope=False)
        out[f"layer.{i}.ffn"] = Free(c.intermediate_size)
    return out


def seal_blocks(blocks, key: Key, pi, prefix: str, step=lambda _: None) -> None:
    """Pre-LN blocks with q/k/v/o_proj and mlp.fc1/fc2 (shared by ViT and Swin)."""
    for i, block in enumerate(blocks):
        q, k, v, o = key.attention(f"{prefix}{i}.attn")
        att = block.attention
        rules.norm(block.layernorm_before, pi)
        rules.linear(att.q_proj, pi, q)
        rules.linear(att.k_proj, pi, k)
        rules.linear(att.v_proj, pi, v)
        rules.linear(att.o_proj, o, pi)
        rules.norm(block.layernorm_after, pi)
        ffn = key[f"{prefix}{i}.ffn"]
        rules.linear(block.mlp.fc1, pi, ffn)
        rules.linear(block.mlp.fc2, ffn, pi)
        bias = getattr(att, "relative_position_bias", None)
        if bias is not None:  # Swin: one bias column per head moves with the head order
            table = bias.relative_position_bias_table
            rules.columns(table, rules.head_order(k, len(k) // table.shape[1]), dim=1)
        step(f"{prefix}{i}")


def seal_(model, key: Key, step=lambda _: None) -> None:
    body, pi = _body(model), key.pi
    seal_blocks(body.layers, key, pi, "layer.", step)
    rules.norm(body.layernorm, pi)
    if hasattr(model, "classifier"):
        rules.linear(model.classifier, pi, key.pi_c)
    elif body.pooler is not None:
        rules.linear(body.pooler.dense, pi, key.pi_c)
    step("head")


def client_side(model) -> dict[str, str]:
    p = "vit.embeddings." if hasattr(model, "vit") else "embeddings."
    return {name: "drop" for name in model.state_dict() if name.startswith(p)}
