"""LLaMA and Qwen2 (…ForCausalLM): RMSNorm, RoPE, grouped-query attention, SwiGLU.

    input/post_attention_layernorm, norm   γ[π]  (RMSNorm has no β)
    q_proj, k_proj   in π, out π_{i,1}: whole heads only (RoPE pairs carry fixed frequencies);
                     KV heads permuted by σ_kv, each query group moves with its KV head
    v_proj           in π, out π_{i,2} (same head order; may shuffle inside a head)
    o_proj           in π_{i,2}, out π;  Qwen2's q/k/v biases follow their outputs
    gate, up         in π, out the same π_{i,3};  down in π_{i,3}, out π   (SwiGLU)
    lm_head          in π, out π_c (untied when tied to embed_tokens)
    embed_tokens     P3's in embedding mode; in token mode P2's: E[π_c][:, π], which is the
                     sealed lm_head itself when the two were tied
"""

from __future__ import annotations

from . import rules
from .gpt2 import untie_lm_head
from ..keys import PI, PI_C, Attention, Free, Key
from ..models import source

MODEL_TYPES, ARCHITECTURES = source.FAMILIES["llama"]


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def layout(model) -> dict:
    c = model.config
    kv = c.num_key_value_heads or c.num_attention_heads
    out = {PI: Free(c.hidden_size), PI_C: Free(c.vocab_size)}
    for i in range(c.num_hidden_layers):
        out[f"layer.{i}.attn"] = Attention(c.num_attention_heads, kv, _head_dim(c), rope=True)
        out[f"layer.{i}.ffn"] = Free(c.intermediate_size)
    return out


def seal_(model, key: Key, step=lambda _: None) -> None:
    body, pi = model.model, key.pi
    for i, layer in enumerate(body.layers):
        q, k, v, o = key.attention(f"layer.{i}.attn")
        att, mlp = layer.self_attn, layer.mlp
        rules.norm(layer.input_layernorm, pi)
        rules.linear(att.q_proj, pi, q)
        rules.linear(att.k_proj, pi, k)
        rules.linear(att.v_proj, pi, v)
        rules.linear(att.o_proj, o, pi)
        rules.norm(layer.post_attention_layernorm, pi)
        ffn = key[f"layer.{i}.ffn"]
        rules.linear(mlp.gate_proj, pi, ffn)
        rules.linear(mlp.up_proj, pi, ffn)
        rules.linear(mlp.down_proj, ffn, pi)
        step(f"layer {i}")
    rules.norm(body.norm, pi)
    untie_lm_head(model)
    rules.linear(model.lm_head, pi, key.pi_c)
    step("head")


def seal_tokens_(model, key: Key) -> None:
    rules.embedding(model.model.embed_tokens, key.pi_c, key.pi)


def client_side(model) -> dict[str, str]:
    return {"model.embed_tokens.weight": "drop"}
