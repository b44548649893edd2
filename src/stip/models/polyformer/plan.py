"""The folded plan: numpy weights with every BatchNorm and scale folded in, what the HE server
holds (`he_plan`); the plaintext polynomial model on it in float64, op for op as stip.he runs it
on ciphertexts (`plan_forward`); the user's embedding (`embed_plan`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .model import PolyConfig, _Polynomial, attention_mask, length_scale


@torch.no_grad()
def he_plan(model: _Polynomial) -> dict:
    """Numpy weights with every BatchNorm, 1/√d_h, the ViT's 1/S(L) and mean pool folded into
    the linear maps, and each activation's polynomial: what the HE server holds.

    ViT: patch (patch_dim, dim), pos (tokens, dim). LM: tokens (vocab, dim), pos (context,
    dim): the user's embedding. Per layer and head: wq/wk/wv (dim, d_h) with biases, wo (d_h,
    dim), the attention polynomial; bo; w1 (dim, hidden), b1, the MLP polynomial, w2, b2;
    head (dim, classes or vocab) and its bias. The LM's causal mask and 1/S(i + 1) are not
    linear in anything: ``attention_mask`` gives them per length."""
    if not model.is_polynomial():
        raise ValueError("swap the activations for polynomials first (to_polynomial)")
    model.eval()
    c = model.cfg
    np64 = lambda t: t.detach().numpy().astype(np.float64)  # noqa: E731
    lin = lambda m: (np64(m.weight).T, np64(m.bias))  # noqa: E731
    hd, n = c.dim // c.heads, c.tokens
    plan = {"config": c.to_json(), "layers": []}
    if c.causal:
        plan["tokens"], plan["pos"] = np64(model.tokens.weight), np64(model.pos[0])
    else:
        w_p, b_p = lin(model.patch)
        plan["patch"], plan["pos"] = w_p, b_p + np64(model.pos[0])
    for blk in model.blocks:
        s1, t1 = blk.norm1.folded()
        fold = lambda m, scale=1.0: ((s1[:, None] * lin(m)[0]) * scale, (t1 @ lin(m)[0] + lin(m)[1]) * scale)  # noqa: E731
        (wq, bq), (wk, bk), (wv, bv) = fold(blk.attn.q, 1 / math.sqrt(hd)), fold(blk.attn.k), fold(blk.attn.v)
        wo, bo = lin(blk.attn.o)
        if not c.causal:
            wo = wo / length_scale(c, n)
        heads = [{"wq": wq[:, i * hd:(i + 1) * hd], "bq": bq[i * hd:(i + 1) * hd],
                  "wk": wk[:, i * hd:(i + 1) * hd], "bk": bk[i * hd:(i + 1) * hd],
                  "wv": wv[:, i * hd:(i + 1) * hd], "bv": bv[i * hd:(i + 1) * hd],
                  "wo": wo[i * hd:(i + 1) * hd]} for i in range(c.heads)]
        s2, t2 = blk.norm2.folded()
        sm, tm = blk.norm_mlp.folded()
        w1, b1 = lin(blk.fc1)
        w1, b1 = (s2[:, None] * w1) * sm, (t2 @ w1 + b1) * sm + tm
        w2, b2 = lin(blk.fc2)
        plan["layers"].append({"heads": heads, "attn_poly": np64(blk.attn.act.coeffs), "bo": bo,
                               "w1": w1, "b1": b1, "mlp_poly": np64(blk.act.coeffs), "w2": w2, "b2": b2})
    sf, tf = model.norm.folded()
    w_h, b_h = lin(model.head)
    plan["head"], plan["head_bias"] = (sf[:, None] * w_h) / (1 if c.causal else n), tf @ w_h + b_h
    return plan


def plan_config(plan: dict) -> PolyConfig:
    return PolyConfig(**plan["config"])


def plan_forward(plan: dict, inputs: np.ndarray) -> np.ndarray:
    """The folded plan in float64 numpy: the plaintext polynomial model, op for op as stip.he
    runs it on ciphertexts. ViT: patches → class logits. LM: token ids (batch, n) →
    the last position's next-token logits (batch, vocab)."""
    cfg = plan_config(plan)
    x = embed_plan(plan, inputs, np.float64) if cfg.causal else inputs @ plan["patch"] + plan["pos"]
    mask = attention_mask(cfg, x.shape[-2]) if cfg.causal else None
    for layer in plan["layers"]:
        attn = layer["bo"]
        for h in layer["heads"]:
            q, k, v = (x @ h["w" + n] + h["b" + n] for n in "qkv")
            s = np.polynomial.polynomial.polyval(q @ np.swapaxes(k, -1, -2), layer["attn_poly"])
            if mask is not None:
                s = s * mask
            attn = attn + (s @ v) @ h["wo"]
        x = x + attn
        u = np.polynomial.polynomial.polyval(x @ layer["w1"] + layer["b1"], layer["mlp_poly"])
        x = x + u @ layer["w2"] + layer["b2"]
    pooled = x[:, -1] if cfg.causal else x.sum(1)
    return pooled @ plan["head"] + plan["head_bias"]


def embed_plan(plan: dict, inputs: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The user's side of every mode: patch (ViT) or token (LM) and position embedding."""
    if plan_config(plan).causal:
        ids = np.asarray(inputs)
        return (plan["tokens"][ids] + plan["pos"][: ids.shape[-1]]).astype(dtype)
    return (inputs @ plan["patch"] + plan["pos"]).astype(dtype)
