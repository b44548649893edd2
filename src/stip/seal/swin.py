"""Swin (SwinForImageClassification).

Each stage s has its own residual width d_s = embed_dim·2^s and its own permutation π_s
(π_0 = π). Inside a stage the blocks follow the ViT rules, and each block's relative-position
bias table moves its head columns with the head order. Patch merging concatenates four
neighbours, so its LayerNorm and reduction see four copies of π_s:

    downsample.norm        γ[π_s⁴], β[π_s⁴]      with π_s⁴ = [π_s | π_s+d | π_s+2d | π_s+3d]
    downsample.reduction   in π_s⁴, out π_{s+1}
    layernorm (final)      γ[π_last], β[π_last];  average pooling commutes
    classifier             in π_last, out π_c
"""

from __future__ import annotations

from . import rules
from .vit import seal_blocks
from ..keys import PI, PI_C, Attention, Free, Key
from ..models import source

MODEL_TYPES, ARCHITECTURES = source.FAMILIES["swin"]


def stage_perm_name(s: int) -> str:
    return PI if s == 0 else f"stage.{s}"


def layout(model) -> dict:
    c = model.config
    out = {PI: Free(c.embed_dim), PI_C: Free(c.num_labels)}
    for s, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
        d = c.embed_dim * 2**s
        if s:
            out[stage_perm_name(s)] = Free(d)
        for b in range(depth):
            out[f"stage.{s}.block.{b}.attn"] = Attention(heads, heads, d // heads, rope=False)
            out[f"stage.{s}.block.{b}.ffn"] = Free(int(c.mlp_ratio * d))
    return out


def seal_(model, key: Key, step=lambda _: None) -> None:
    body = model.swin
    stages = body.encoder.layers
    for s, stage in enumerate(stages):
        p = key[stage_perm_name(s)]
        seal_blocks(stage.blocks, key, p, f"stage.{s}.block.", step)
        if stage.downsample is not None:
            p4 = rules.repeat(p, 4)
            rules.norm(stage.downsample.norm, p4)
            rules.linear(stage.downsample.reduction, p4, key[stage_perm_name(s + 1)])
    last = key[stage_perm_name(len(stages) - 1)]
    rules.norm(body.layernorm, last)
    rules.linear(model.classifier, last, key.pi_c)
    step("head")


def client_side(model) -> dict[str, str]:
    return {name: "drop" for name in model.state_dict() if name.startswith("swin.embeddings.")}
