"""P3's walk through a transformer in shares mode, written once from a `blocks.Config`.

Every weight matmul goes to the servers through ``matmul(name, x)``; everything else runs
here: norms, biases, RoPE, attention with P3's own KV cache, activations, residuals. The same
walk covers post-LN encoders (BERT/MiniLM) and pre-LN decoders (LLaMA/SmolLM2, GPT-2).

The servers' matmuls, per layer i (``weight_matmuls``), about four dependent round trips:

    i.qkv   [W_q | W_k | W_v]            i.up    [W_gate | W_up] (SwiGLU) or W_1
    i.o     W_o                          i.down  W_2                      head   the LM head
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..models.blocks import Config

Matmul = Callable[[str, torch.Tensor], torch.Tensor]  # (name, x (rows, in)) → x·W (rows, out)


def weight_matmuls(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    """What the servers hold: each matmul's weight (in, out), named as the walk asks for it."""
    _check(cfg)
    ops = {}
    for i, p in enumerate(params["layers"]):
        ops[f"{i}.qkv"] = np.concatenate([p["wq"], p["wk"], p["wv"]], 1)
        ops[f"{i}.o"] = p["wo"]
        ops[f"{i}.up"] = np.concatenate([p["w_gate"], p["w1"]], 1) if cfg.glu else p["w1"]
        ops[f"{i}.down"] = p["w2"]
    if cfg.head == "every_token":
        ops["head"] = params["head"]["w"]
    return ops


def _check(cfg: Config) -> None:
    if cfg.norm == "none" or cfg.act_rows is not None or cfg.attention != "softmax" or cfg.activation == "poly":
        raise ValueError("shares mode walks standard transformers (softmax attention, LayerNorm/RMSNorm)")
    if cfg.head not in (None, "every_token"):
        raise ValueError(f"shares mode has no {cfg.head!r} head")


@dataclass
class Cache:
    """P3's KV cache: per layer (k, v) as (batch, kv_heads, seen, head_dim), and the 0/1 mask
    of the positions seen so far (left padding is 0)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mask: torch.Tensor | None = None

    @property
    def seen(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]


class Walk:
    def __init__(self, cfg: Config, params: dict, matmul: Matmul):
        _check(cfg)
        self.cfg, self.matmul = cfg, matmul
        t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.layers = [{k: ({kk: t(vv) for kk, vv in v.items()} if isinstance(v, dict) else t(v))
                        for k, v in p.items() if not k.startswith("w")} for p in params["layers"]]  # fmt: skip
        self.embed_norm = {k: t(v) for k, v in params["embed_norm"].items()} if cfg.embed_norm else None
        self.final_norm = {k: t(v) for k, v in params["final_norm"].items()} if cfg.final_norm else None
        self.head_bias = t(params["head"]["b"]) if cfg.head == "every_token" else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Cache | None = None,
                head_rows: str = "last") -> torch.Tensor:  # fmt: skip
        """x: (batch, new tokens, hidden) embeddings; mask: (batch, new tokens) of 0/1 for
        the new positions (default all 1). With a cache, appends to it. Returns the final
        hidden states, or with an LM head the logits of the last position (``head_rows="all"``:
        of every position)."""
        cfg = self.cfg
        b, n, _ = x.shape
        mask = torch.ones(b, n, dtype=torch.long) if mask is None else mask.long()
        if cache is not None:
            mask = mask if cache.mask is None else torch.cat([cache.mask, mask], 1)
            cache.mask = mask
        seen = mask.shape[1] - n
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, seen:]
        blocked = mask[:, None, None, :] == 0  # padding
        if cfg.causal:
            blocked = blocked | torch.ones(n, mask.shape[1], dtype=torch.bool).triu(seen + 1)  # the future
        bias = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
        h = self._norm(x, self.embed_norm) if cfg.embed_norm else x
        for i, p in enumerate(self.layers):
            if cfg.prenorm:
                h = h + self._attention(i, self._norm(h, p.get("ln1")), p, bias, positions, cache)
                h = h + self._ffn(i, self._norm(h, p.get("ln2")), p)
            else:
                h = self._norm(h + self._attention(i, h, p, bias, positions, cache), p["ln1"])
                h = self._norm(h + self._ffn(i, h, p), p["ln2"])
        if self.final_norm is not None:
            h = self._norm(h, self.final_norm)
        if self.head_bias is None:
            return h
        rows = h if head_rows == "all" else h[:, -1:]
        return self._linear("head", rows) + self.head_bias

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.matmul(name, x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

    def _norm(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        if self.cfg.norm == "rms":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * p["g"]
        return torch.nn.functional.layer_norm(x, x.shape[-1:], p["g"], p["b"], self.cfg.eps)

    def _attention(self, i: int, x, p, bias, positions, cache: Cache | None) -> torch.Tensor:
        cfg = self.cfg
        b, n, _ = x.shape
        hd, h, kv = cfg.head_dim, cfg.heads, cfg.n_kv
        qkv = self._linear(f"{i}.qkv", x) + torch.cat([p["bq"], p["bk"], p["bv"]])
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], -1)
        q = q.view(b, n, h, hd).transpose(1, 2)
        k = k.view(b, n, kv, hd).transpose(1, 2)
        v = v.view(b, n, kv, hd).transpose(1, 2)
        if cfg.rope_theta is not None:
            q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
        if cache is not None:
            if len(cache.kv) > i:
                k, v = torch.cat([cache.kv[i][0], k], 2), torch.cat([cache.kv[i][1], v], 2)
                cache.kv[i] = (k, v)
            else:
                cache.kv.append((k, v))
        group = h // kv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
        o = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, h * hd)
        return self._linear(f"{i}.o", o) + p["bo"]

    def _ffn(self, i: int, x, p) -> torch.Tensor:
        u = self._linear(f"{i}.up", x)
        if self.cfg.glu:
            gate, up = u.split(u.shape[-1] // 2, -1)
            u = _act(self.cfg.activation, gate) * (up + p["b1"])
        else:
            u = _act(self.cfg.activation, u + p["b1"])
        return self._linear(f"{i}.down", u) + p["b2"]


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return torch.nn.functional.gelu(x)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind == "relu":
        return torch.relu(x)
    return torch.nn.functional.silu(x)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF's rotate-half RoPE on (batch, heads, tokens, head_dim) at the given positions."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = positions[:, None, :, None].float() * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    half = hd // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
