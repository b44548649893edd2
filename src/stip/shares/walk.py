"""P3's walk through a transformer in shares mode, written once from a `blocks.Config`.

Every weight matmul goes to the servers through ``matmul(name, x)``; everything else runs
here: norms, biases, RoPE, attention with P3's own KV cache, activations, residuals. The same
walk covers post-LN encoders (BERT/MiniLM) and pre-LN decoders (LLaMA/SmolLM2, GPT-2), on
either of two schedules (``rounds``):

4 rounds a layer, each matmul on its own (``plain_matmuls``):

    i.qkv   [W_q | W_k | W_v]            i.up    [W_gate | W_up] (SwiGLU) or W_1
    i.o     W_o                          i.down  W_2                      head   the LM head

2 rounds a layer (``folded_matmuls``; docs/shares.md, "The folded schedule"). A norm is a
per-row scale: norm(s)·W = r(s)·(s·W̃) + β·W with W̃ = C·diag(γ)·W (C the mean subtraction of
LayerNorm, I for RMSNorm), and P3, which holds s, computes r(s) itself. So one round carries a
residual update and the next norm's matmul, from a block weight:

    i.o+up      [o | h̃]  · [[W_o, W_o·W̃_up], [0, W_up]]           → [o·W_o | (h + o·W_o)·W̃_up]
    i.down+qkv  [m | h̃₂] · [[W_down, W_down·W̃_qkv'], [0, W_qkv']]  → the same, for layer i+1's QKV

where h̃ = (h·C)∘γ, the residual as the norm would see it but for the per-row r(h): it keeps
the plain schedule's precision (a raw residual's outlier dimensions, which γ damps, would set
the row's fixed-point scale). Layer 0's QKV, the last layer's down projection and the head
are the plain ops. A head merged into the last round would multiply a 49k-wide head by W_down
(measured for SmolLM2: 119 ms against 27 ms a row, 830 MB against 226 MB), more than the one
round it saves.

A private LoRA adapter (``adapter``, `models.lora`) stays here: P3 adds x·A·B itself beside
each adapted base product, on either schedule with no extra round (``_adapted``), and the
servers' ops and shapes stay the base's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..models.blocks import Config
from ..models.lora import Adapter

Matmul = Callable[[str, torch.Tensor], torch.Tensor]  # (name, x (rows, in)) → x·W (rows, out)
SCHEDULES = (4, 2)  # rounds per layer


def plain_matmuls(cfg: Config, params: dict) -> dict[str, np.ndarray]:
    """The 4-round schedule's matmuls: each weight (in, out), named as the walk asks for it.
    They are the model's weights as they are: the fingerprint covers these."""
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


def folded_matmuls(cfg: Config, params: dict, plain: dict[str, np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """The 2-round schedule's block weights, one at a time (each is float64, and a big model's
    all at once would double a server's peak memory). The weights are public: merged products
    are computed here, once, and encoded at their own column scales."""
    plain = plain_matmuls(cfg, params) if plain is None else plain
    layers = params["layers"]
    for i, p in enumerate(layers):
        yield f"{i}.o+up", _block(plain[f"{i}.o"], _fold(cfg, _norm_before_up(cfg, p), plain[f"{i}.up"]), plain[f"{i}.up"])
        if i + 1 < len(layers):
            nxt = plain[f"{i + 1}.qkv"]
            yield f"{i}.down+qkv", _block(plain[f"{i}.down"], _fold(cfg, _norm_before_qkv(cfg, layers, i), nxt), nxt)


def zero_block(name: str, w: np.ndarray, hidden: int) -> tuple[int, int] | None:
    """A block weight's structure, for the server to skip its zero block: its first ``cols``
    columns read only its first ``rows`` rows."""
    if name.endswith(("+up", "+qkv")):
        return w.shape[0] - hidden, hidden
    return None


def _norm_before_up(cfg: Config, p: dict) -> dict:
    return p["ln2"] if cfg.prenorm else p["ln1"]


def _norm_before_qkv(cfg: Config, layers: list[dict], i: int) -> dict:
    """The norm between layer i's down projection and layer i+1's QKV."""
    return layers[i + 1]["ln1"] if cfg.prenorm else layers[i]["ln2"]


def _fold(cfg: Config, norm: dict, w: np.ndarray) -> np.ndarray:
    """W̃ = C·diag(γ)·W: C subtracts each column's mean (LayerNorm)."""
    folded = np.asarray(norm["g"], np.float64)[:, None] * np.asarray(w, np.float64)
    return folded - folded.mean(0, keepdims=True) if cfg.norm == "layer" else folded


def _block(first: np.ndarray, folded: np.ndarray, then: np.ndarray) -> np.ndarray:
    """[[A, A·W̃], [0, W]]: [x | h̃] → [x·A | x·A·W̃ + h̃·W], one ring product per column."""
    first = np.asarray(first, np.float64)
    top = np.concatenate([first, first @ folded], 1)
    return np.concatenate([top, np.concatenate([np.zeros((then.shape[0], first.shape[1])), np.asarray(then, np.float64)], 1)], 0)


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
    def __init__(self, cfg: Config, params: dict, matmul: Matmul, rounds: int = 2, adapter: Adapter | None = None):
        _check(cfg)
        if rounds not in SCHEDULES:
            raise ValueError(f"rounds must be 4 or 2 per layer, not {rounds!r}")
        self.cfg, self.matmul, self.rounds = cfg, matmul, rounds
        self.lora = _lora_ops(cfg, adapter) if adapter is not None else [{} for _ in params["layers"]]
        self.adapter_seconds = 0.0  # P3's own time on the adapter's products
        t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.float32))  # noqa: E731
        self.layers = [{k: ({kk: t(vv) for kk, vv in v.items()} if isinstance(v, dict) else t(v))
                        for k, v in p.items() if not k.startswith("w")} for p in params["layers"]]  # fmt: skip
        self.embed_norm = {k: t(v) for k, v in params["embed_norm"].items()} if cfg.embed_norm else None
        self.final_norm = {k: t(v) for k, v in params["final_norm"].items()} if cfg.final_norm else None
        self.head_bias = t(params["head"]["b"]) if cfg.head == "every_token" else None
        self.consts = {k: (t(a), t(b)) for k, (a, b) in _constants(cfg, params).items()} if rounds == 2 else {}

    def ops(self) -> list[str]:
        """The matmuls this schedule asks for."""
        n = len(self.layers)
        if self.rounds == 4:
            names = [f"{i}.{op}" for i in range(n) for op in ("qkv", "o", "up", "down")]
        else:
            names = ["0.qkv"] + [op for i in range(n) for op in (f"{i}.o+up", f"{i}.down+qkv" if i + 1 < n else f"{i}.down")]
        return names + (["head"] if self.head_bias is not None else [])

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
        rotation = None if cfg.rope_theta is None else _rotation(positions, cfg.rope_theta, cfg.head_dim)
        h = self._norm(x, self.embed_norm) if cfg.embed_norm else x
        h = (self._layers_4 if self.rounds == 4 else self._layers_2)(h, bias, rotation, cache)
        if self.head_bias is None:
            return self._norm(h, self.final_norm) if self.final_norm is not None else h
        rows = h if head_rows == "all" else h[:, -1:]
        if self.final_norm is not None:
            rows = self._norm(rows, self.final_norm)
        return self._linear("head", rows) + self.head_bias

    def _layers_4(self, h, bias, rotation, cache):
        for i, p in enumerate(self.layers):
            if self.cfg.prenorm:
                h = h + self._attention(i, self._norm(h, p.get("ln1")), p, bias, rotation, cache)
                h = h + self._ffn(i, self._norm(h, p.get("ln2")), p)
            else:
                h = self._norm(h + self._attention(i, h, p, bias, rotation, cache), p["ln1"])
                h = self._norm(h + self._ffn(i, h, p), p["ln2"])
        return h

    def _layers_2(self, h, bias, rotation, cache):
        """Layer 0's QKV, then per layer B [o | h̃] and C [m | h̃₂]. An adapter's deltas on the
        output and down projections go into the residual P3 sends (h + Δ), so the block's
        folded half sees the adapted residual; those on QKV and up are added once the round
        has brought the base product, from the norm P3 computes itself."""
        cfg, hidden, n = self.cfg, self.cfg.hidden, len(self.layers)
        x = self._norm(h, self.layers[0]["ln1"]) if cfg.prenorm else h
        qkv = self._adapted(0, "qkv", x, self._linear("0.qkv", x))
        for i, p in enumerate(self.layers):
            o = self._attend(i, qkv + torch.cat([p["bq"], p["bk"], p["bv"]]), p, bias, rotation, cache)
            up = _norm_before_up(cfg, p)
            h = self._adapted(i, "o", o, h)
            a, z = _split(self._linear(f"{i}.o+up", torch.cat([o, self._tilde(h, up)], -1)), hidden)
            s = h + a + p["bo"]
            u = self._scaled(f"{i}.o+up", s, z)
            h = s if cfg.prenorm else self._norm(s, up)
            if "up" in self.lora[i]:
                u = self._adapted(i, "up", self._norm(s, up) if cfg.prenorm else h, u)
            m = self._activate(u, p)
            if i + 1 < n:
                nxt = _norm_before_qkv(cfg, self.layers, i)
                h = self._adapted(i, "down", m, h)
                d, z = _split(self._linear(f"{i}.down+qkv", torch.cat([m, self._tilde(h, nxt)], -1)), hidden)
                t = h + d + p["b2"]
                qkv = self._scaled(f"{i}.down+qkv", t, z)
                if "qkv" in self.lora[i + 1]:
                    qkv = self._adapted(i + 1, "qkv", self._norm(t, nxt), qkv)
            else:
                t = h + self._adapted(i, "down", m, self._linear(f"{i}.down", m)) + p["b2"]
            h = t if cfg.prenorm else self._norm(t, p["ln2"])
        return h

    def _adapted(self, i: int, op: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + x·A·B for layer i's ``op`` (B is zero on the columns the adapter leaves alone):
        P3's own low-rank products, in the clear, never sent."""
        factors = self.lora[i].get(op)
        if factors is None:
            return y
        start = time.perf_counter()
        y = y + (x @ factors[0]) @ factors[1]
        self.adapter_seconds += time.perf_counter() - start
        return y

    def _tilde(self, x: torch.Tensor, norm: dict) -> torch.Tensor:
        """(x·C)∘γ: what the norm makes of x, but for the per-row scale r(x) and the shift β."""
        centred = x - x.mean(-1, keepdim=True) if self.cfg.norm == "layer" else x
        return centred * norm["g"]

    def _scaled(self, name: str, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """norm(s)·W from z = (s − carry)·W̃, the servers' block product: r(s)·(z + carry·W̃) + β·W."""
        carry, beta = self.consts[name]
        return self._r(s) * (z + carry) + beta

    def _r(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's per-row scale r(x)."""
        spread = x.pow(2).mean(-1, keepdim=True) if self.cfg.norm == "rms" else x.var(-1, unbiased=False, keepdim=True)
        return torch.rsqrt(spread + self.cfg.eps)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.matmul(name, x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

    def _norm(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        if self.cfg.norm == "rms":
            return x * self._r(x) * p["g"]
        return torch.nn.functional.layer_norm(x, x.shape[-1:], p["g"], p["b"], self.cfg.eps)

    def _attention(self, i: int, x, p, bias, rotation, cache: Cache | None) -> torch.Tensor:
        qkv = self._adapted(i, "qkv", x, self._linear(f"{i}.qkv", x)) + torch.cat([p["bq"], p["bk"], p["bv"]])
        o = self._attend(i, qkv, p, bias, rotation, cache)
        return self._adapted(i, "o", o, self._linear(f"{i}.o", o)) + p["bo"]

    def _attend(self, i: int, qkv, p, bias, rotation, cache: Cache | None) -> torch.Tensor:
        """Everything between the QKV and the output projection: RoPE, the cache, softmax."""
        cfg = self.cfg
        b, n, _ = qkv.shape
        hd, h, kv = cfg.head_dim, cfg.heads, cfg.n_kv
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], -1)
        q = q.view(b, n, h, hd).transpose(1, 2)
        k = k.view(b, n, kv, hd).transpose(1, 2)
        v = v.view(b, n, kv, hd).transpose(1, 2)
        if rotation is not None:
            q, k = _rope(q, rotation), _rope(k, rotation)
        if cache is not None:
            if len(cache.kv) > i:
                k, v = torch.cat([cache.kv[i][0], k], 2), torch.cat([cache.kv[i][1], v], 2)
                cache.kv[i] = (k, v)
            else:
                cache.kv.append((k, v))
        group = h // kv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, h * hd)

    def _ffn(self, i: int, x, p) -> torch.Tensor:
        m = self._activate(self._adapted(i, "up", x, self._linear(f"{i}.up", x)), p)
        return self._adapted(i, "down", m, self._linear(f"{i}.down", m)) + p["b2"]

    def _activate(self, u, p) -> torch.Tensor:
        if self.cfg.glu:
            gate, up = u.split(u.shape[-1] // 2, -1)
            return _act(self.cfg.activation, gate) * (up + p["b1"])
        return _act(self.cfg.activation, u + p["b1"])


def _lora_ops(cfg: Config, adapter: Adapter) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, op (qkv, o, up, down) → (A, B) over that op's whole product: the adapted
    weights' A side by side, their B stacked block-diagonally at their columns (in the order
    of ``plain_matmuls``), so each op's delta is two small products."""
    q, kv, d = cfg.heads * cfg.head_dim, cfg.n_kv * cfg.head_dim, cfg.hidden
    up = 2 * cfg.ffn if cfg.glu else cfg.ffn
    where = {"wq": ("qkv", 0), "wk": ("qkv", q), "wv": ("qkv", q + kv), "wo": ("o", 0), "w2": ("down", 0),
             "w_gate": ("up", 0), "w1": ("up", cfg.ffn if cfg.glu else 0)}  # fmt: skip
    width = {"qkv": q + 2 * kv, "o": d, "up": up, "down": d}
    if len(adapter.layers) != cfg.layers:
        raise ValueError(f"the adapter has {len(adapter.layers)} layers, the model {cfg.layers}")
    out = []
    for deltas in adapter.layers:
        parts: dict[str, list] = {}
        for key, f in deltas.items():
            op, col = where[key]
            parts.setdefault(op, []).append((col, f))
        ops = {}
        for op, fs in parts.items():
            a = np.concatenate([f.a for _, f in fs], 1)
            b = np.zeros((a.shape[1], width[op]), np.float32)
            row = 0
            for col, f in fs:
                b[row : row + f.rank, col : col + f.b.shape[1]] = f.b
                row += f.rank
            ops[op] = (torch.from_numpy(a), torch.from_numpy(b))
        out.append(ops)
    return out


def _split(y: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    return y[..., :hidden], y[..., hidden:]


def _constants(cfg: Config, params: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per folded op, the two rows P3 adds: carry·W̃ (the bias the servers' input left out)
    and β·W (LayerNorm's shift). Cheap: vector-matrix products of the public weights."""
    plain, layers, out = plain_matmuls(cfg, params), params["layers"], {}

    def pair(norm: dict, w: np.ndarray, carry: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(w, np.float64)
        shift = np.asarray(norm["b"], np.float64) @ w if cfg.norm == "layer" else np.zeros(w.shape[1])
        return np.asarray(carry, np.float64) @ _fold(cfg, norm, w), shift

    for i, p in enumerate(layers):
        out[f"{i}.o+up"] = pair(_norm_before_up(cfg, p), plain[f"{i}.up"], p["bo"])
        if i + 1 < len(layers):
            out[f"{i}.down+qkv"] = pair(_norm_before_qkv(cfg, layers, i), plain[f"{i + 1}.qkv"], p["b2"])
    return out


def _act(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return torch.nn.functional.gelu(x)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if kind == "relu":
        return torch.relu(x)
    return torch.nn.functional.silu(x)


def _rotation(positions: torch.Tensor, theta: float, hd: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's rotate-half RoPE tables (cos, sin) at the given positions, once per pass: every
    layer rotates by the same angles."""
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    ang = positions[:, None, :, None].float() * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def _rope(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (batch, heads, tokens, head_dim) by ``_rotation``'s tables."""
    cos, sin = rotation
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin
