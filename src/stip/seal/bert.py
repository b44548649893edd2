"""BERT family: BertModel (with pooler), sequence and token classification.

    embeddings LayerNorm      γ[π], β[π]   (word + position + token-type sums come from P3)
    query, key                in π, out π_{i,1} (head-structured)
    value                     in π, out π_{i,2} (head-structured, same head order)
    attention output dense    in π_{i,2}, out π;   its LayerNorm γ[π], β[π]
    intermediate dense        in π, out π_{i,3};   output dense in π_{i,3}, out π;  LayerNorm
    pooler dense              in π, out a private permutation (π_c on a bare BertModel)
    classifier                in that permutation (or π per token), out π_c
"""

from __future__ import annotations

from . import rules
from ..keys import PI, PI_C, Attention, Free, Key
from ..models import source

MODEL_TYPES, ARCHITECTURES = source.FAMILIES["bert"]


def _body(model):
    return model.bert if hasattr(model, "bert") else model


def layout(model) -> dict:
    c = model.config
    heads = c.num_attention_heads
    arch = type(model).__name__
    out = {PI: Free(c.hidden_size)}
    out[PI_C] = Free(c.hidden_size if arch == "BertModel" else c.num_labels)
    for i in range(c.num_hidden_layers):
        out[f"layer.{i}.attn"] = Attention(heads, heads, c.hidden_size // heads, rope=False)
        out[f"layer.{i}.ffn"] = Free(c.intermediate_size)
    if arch == "BertForSequenceClassification":
        out["pooler"] = Free(c.hidden_size)
    return out


def seal_(model, key: Key, step=lambda _: None) -> None:
    body, pi = _body(model), key.pi
    rules.norm(body.embeddings.LayerNorm, pi)
    for i, layer in enumerate(body.encoder.layer):
        q, k, v, o = key.attention(f"layer.{i}.attn")
        att = layer.attention
        rules.linear(att.self.query, pi, q)
        rules.linear(att.self.key, pi, k)
        rules.linear(att.self.value, pi, v)
        rules.linear(att.output.dense, o, pi)
        rules.norm(att.output.LayerNorm, pi)
        ffn = key[f"layer.{i}.ffn"]
        rules.linear(layer.intermediate.dense, pi, ffn)
        rules.linear(layer.output.dense, ffn, pi)
        rules.norm(layer.output.LayerNorm, pi)
        step(f"layer {i}")
    arch = type(model).__name__
    if arch == "BertForSequenceClassification":
        rules.linear(body.pooler.dense, pi, key["pooler"])
        rules.linear(model.classifier, key["pooler"], key.pi_c)
    elif arch == "BertForTokenClassification":
        rules.linear(model.classifier, pi, key.pi_c)
    elif body.pooler is not None:
        rules.linear(body.pooler.dense, pi, key.pi_c)
    step("head")


def client_side(model) -> dict[str, str]:
    """P3's tensors: the word table never reaches P2; position and token-type tables are kept
    there as zeros because BertEmbeddings adds them to ``inputs_embeds``."""
    p = "bert.embeddings." if hasattr(model, "bert") else "embeddings."
    return {
        p + "word_embeddings.weight": "drop",
        p + "position_embeddings.weight": "zero",
        p + "token_type_embeddings.weight": "zero",
    }
