"""The polynomial transformers (`stip.models.polyformer`) for the MPC baseline: the folded plan
as `stip.mpc.model`'s config and weights."""

from __future__ import annotations

import math

import numpy as np

from ..models.blocks import Config
from ..models.polyformer import PolyLM, PolyViT, he_plan


def to_mpc(model: PolyViT | PolyLM):
    """The folded plan as ``stip.mpc.model`` (Config, params): BatchNorms folded (norm "none"),
    polynomial attention and activations with each layer's own coefficients; a summed pool
    (ViT) or the last position's logits (LM, causal, 1/S(i + 1) per row). Its input is the
    user's embedding ``embed_plan(plan, inputs)``."""
    plan, c = he_plan(model), model.cfg
    hd = c.dim // c.heads
    root = math.sqrt(hd)  # the MPC forward applies 1/√d_h itself; the plan has it folded in
    layers = []
    for layer in plan["layers"]:
        hs = layer["heads"]
        cat = {n: np.concatenate([h[n] for h in hs], -1) for n in ("wq", "bq", "wk", "bk", "wv", "bv")}
        p = {**cat, "wq": cat["wq"] * root, "bq": cat["bq"] * root, "wo": np.concatenate([h["wo"] for h in hs], 0),
             **{n: layer[n] for n in ("bo", "w1", "b1", "w2", "b2")}}
        layers.append({n: v.astype(np.float32) for n, v in p.items()})
    cfg = Config(hidden=c.dim, layers=c.layers, heads=c.heads, head_dim=hd, ffn=layers[0]["w1"].shape[1], norm="none",
                 final_norm=False, activation="poly", attention="poly", attn_scale=c.attn_scale if c.causal else "none",
                 causal=c.causal, head="last_token" if c.causal else "token_sum",
                 poly_act=tuple(tuple(float(v) for v in layer["mlp_poly"]) for layer in plan["layers"]),
                 poly_attn=tuple(tuple(float(v) for v in layer["attn_poly"]) for layer in plan["layers"]))
    params = {"layers": layers, "head": {"w": plan["head"].astype(np.float32), "b": plan["head_bias"].astype(np.float32)}}
    return cfg, params
