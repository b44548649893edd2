"""One transformer forward in JAX, parameterised by config, for running under SPU.

The same function covers post-LN encoders (BERT), pre-LN decoders and encoders (GPT-2,
LLaMA/Qwen2, ViT), per-head attention kinds (softmax, ReLU-softmax, scaling, polynomial: the
MPC-friendly and polynomial variants) and activations (GELU, tanh-GELU, ReLU, SiLU, SwiGLU,
polynomial). Weights come from the same `transformers` models that `stip.seal` seals.

Where the cut between user and model owner lies is the same as in STIP: the user embeds
locally (word + position (+ token type), or ViT's patch embedding), so ``forward`` starts
from embeddings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..models.blocks import Config

NEG = -1e4  # additive mask: large enough to zero a softmax weight, small enough for fixed point


# --- the forward --------------------------------------------------------------------------------


def _norm(cfg: Config, x, p):
    if cfg.norm == "none":  # p is None: there are no norm parameters
        return x
    if cfg.norm == "rms":
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.eps) * p["g"]
    mu = jnp.mean(x, -1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + cfg.eps) * p["g"] + p["b"]


def _poly(coeffs, x):
    out = jnp.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):  # Horner
        out = out * x + c
    return out


def _coeffs(polys: tuple, layer: int) -> tuple:
    return polys[layer] if polys and isinstance(polys[0], (tuple, list)) else polys


def _act(cfg: Config, x, layer: int = 0):
    a = cfg.activation
    if a == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if a == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if a == "relu":
        return jax.nn.relu(x)
    if a == "silu":
        return jax.nn.silu(x)
    return _poly(_coeffs(cfg.poly_act, layer), x)


def _rope(x, theta: float):
    """HF's rotate-half RoPE on (batch, heads, tokens, head_dim), positions 0..n-1."""
    n, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = np.outer(np.arange(n), inv)
    emb = np.concatenate([ang, ang], -1)
    cos, sin = jnp.asarray(np.cos(emb), x.dtype), jnp.asarray(np.sin(emb), x.dtype)
    half = hd // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _mix(kind, s, v, bias, cfg: Config, layer: int):
    """One head: scores s (batch, n, n) → weights → output (batch, n, head_dim). ``kind`` is
    one kind, or one per query row (MPCViT's row-wise search): each group of rows is computed
    with its own kind only, by static slicing, so no row pays for a kind it does not use."""
    n = s.shape[-1]
    if not isinstance(kind, str):
        out = jnp.zeros(s.shape[:2] + v.shape[-1:], s.dtype)
        for k in dict.fromkeys(kind):
            rows = np.array([i for i, r in enumerate(kind) if r == k])
            out = out.at[:, rows].set(_weights(k, s[:, rows], bias[:, rows], cfg, n, layer) @ v)
        return out
    return _weights(kind, s, bias, cfg, n, layer) @ v


def _weights(kind: str, s, bias, cfg: Config, n: int, layer: int):
    if kind == "softmax":
        w = jax.nn.softmax(s + bias, axis=-1)
    elif kind == "relu_softmax":
        r = jax.nn.relu(s) * (bias == 0)
        w = r / (jnp.sum(r, -1, keepdims=True) + 1e-5)
    elif kind == "scaling":
        w = s * (bias == 0) / n
    else:  # polynomial attention (Zimerman et al.): pointwise, scaled by the length (causal: row i's, i + 1)
        length = np.arange(1, n + 1, dtype=np.float64)[:, None] if cfg.causal else float(n)
        scale = {"none": 1.0, "sqrt_n": 1.0 / np.sqrt(length), "n": 1.0 / length}[cfg.attn_scale]
        w = _poly(_coeffs(cfg.poly_attn, layer), s) * (bias == 0) * scale
    return w


def _attention(cfg: Config, layer: int, x, p, bias):
    b, n, _ = x.shape
    hd, h, kv = cfg.head_dim, cfg.heads, cfg.n_kv
    q = (x @ p["wq"] + p["bq"]).reshape(b, n, h, hd).transpose(0, 2, 1, 3)
    k = (x @ p["wk"] + p["bk"]).reshape(b, n, kv, hd).transpose(0, 2, 1, 3)
    v = (x @ p["wv"] + p["bv"]).reshape(b, n, kv, hd).transpose(0, 2, 1, 3)
    if cfg.rope_theta is not None:
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    group = h // kv
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    s = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / np.sqrt(hd))
    kinds = cfg.head_kinds(layer)
    heads = [_mix(kinds[i], s[:, i], v[:, i], bias, cfg, layer) for i in range(h)]
    o = jnp.stack(heads, 1).transpose(0, 2, 1, 3).reshape(b, n, h * hd)
    return o @ p["wo"] + p["bo"]


def _ffn(cfg: Config, layer: int, x, p):
    if cfg.glu:
        return (_act(cfg, x @ p["w_gate"], layer) * (x @ p["w1"] + p["b1"])) @ p["w2"] + p["b2"]
    u = x @ p["w1"] + p["b1"]
    if cfg.act_rows is None:
        return _act(cfg, u, layer) @ p["w2"] + p["b2"]
    rows = np.asarray(cfg.act_rows[layer], dtype=np.int64)
    if rows.size:  # the activation only on the kept rows; the rest pass through (free under MPC)
        u = u.at[:, rows].set(_act(cfg, u[:, rows], layer))
    return u @ p["w2"] + p["b2"]


def forward(cfg: Config, params: dict, x, mask=None):
    """x: (batch, tokens, hidden) embeddings; mask: optional (batch, tokens) of 0/1.
    Returns the last hidden state, or logits when the config has a head."""
    n = x.shape[1]
    bias = jnp.zeros((x.shape[0], n, n), x.dtype)
    if mask is not None:
        bias = bias + (1.0 - mask[:, None, :]) * NEG
    if cfg.causal:
        bias = bias + jnp.asarray(np.triu(np.full((n, n), NEG, np.float32), 1))
    h = _norm(cfg, x, params["embed_norm"]) if cfg.embed_norm else x
    for i, p in enumerate(params["layers"][: cfg.layers]):
        if cfg.prenorm:
            h = h + _attention(cfg, i, _norm(cfg, h, p.get("ln1")), p, bias)
            h = h + _ffn(cfg, i, _norm(cfg, h, p.get("ln2")), p)
        else:
            h = _norm(cfg, h + _attention(cfg, i, h, p, bias), p["ln1"])
            h = _norm(cfg, h + _ffn(cfg, i, h, p), p["ln2"])
    if cfg.final_norm:
        h = _norm(cfg, h, params["final_norm"])
    if cfg.head == "first_token":
        return h[:, 0] @ params["head"]["w"] + params["head"]["b"]
    if cfg.head == "last_token":
        return h[:, -1] @ params["head"]["w"] + params["head"]["b"]
    if cfg.head == "token_sum":
        return h.sum(1) @ params["head"]["w"] + params["head"]["b"]
    if cfg.head == "every_token":
        return h @ params["head"]["w"] + params["head"]["b"]
    return h


def truncate(cfg: Config, params: dict, k: int) -> tuple[Config, dict]:
    """The model's first k layers, config and weights (for a cheaper MPC run: ``--layers K``)."""
    return cfg.with_layers(k), {**params, "layers": params["layers"][:k]}
