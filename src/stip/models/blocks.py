"""A transformer's blocks as plain data: a `Config` and float32 weights, read once from the
`transformers` models STIP seals, for every walk that is not the HF model itself (the MPC
forward in `stip.mpc.model`, P3's walk in shares mode in `stip.shares.walk`).

    cfg, params = from_hf(model)             # BERT, GPT-2, LLaMA/Qwen2/Mistral, ViT
    x = embed(model, input_ids=…)            # the user's side: embeddings before layer 0

Weights are float32 numpy arrays, laid out for ``x @ W`` (in, out).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

KINDS = ("softmax", "relu_softmax", "scaling", "poly")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "poly")


@dataclass(frozen=True)
class Config:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    kv_heads: int | None = None
    prenorm: bool = True  # False: BERT's post-LN blocks
    norm: str = "layer"  # "layer" | "rms" | "none" (BatchNorm, folded into the next linear map)
    eps: float = 1e-12
    embed_norm: bool = False  # BERT normalises the embedding sum
    final_norm: bool = True
    activation: str = "gelu"
    glu: bool = False  # SwiGLU: act(x W_gate) * (x W_up)
    attention: str | tuple = "softmax"  # one kind, or per layer a tuple of per-head kinds
    causal: bool = False
    rope_theta: float | None = None
    # None | "first_token" (ViT classifier) | "every_token" (LM head) | "last_token" (the next
    # token only) | "token_sum" (a mean pool whose 1/n is folded into the head weights)
    head: str | None = None
    # coefficients c0 + c1 x + … for "poly" activations; or one such tuple per layer
    poly_act: tuple = ()
    poly_attn: tuple = ()  # the same for "poly" attention scores
    attn_scale: str = "none"  # poly attention: divide by "none" | "sqrt_n" | "n" (causal: of each row's length)
    # MPCViT+: per layer, the token rows whose MLP activation is kept; the others are identity
    act_rows: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        for kind in self.head_kinds(0) if self.layers else ():
            for k in (kind,) if isinstance(kind, str) else kind:  # a head may list one kind per row
                if k not in KINDS:
                    raise ValueError(f"attention kind {k!r} is not one of {KINDS}")

    @property
    def n_kv(self) -> int:
        return self.kv_heads or self.heads

    def head_kinds(self, layer: int) -> tuple[str, ...]:
        if isinstance(self.attention, str):
            return (self.attention,) * self.heads
        kinds = tuple(self.attention[layer])
        if len(kinds) != self.heads:
            raise ValueError(f"layer {layer} lists {len(kinds)} attention kinds for {self.heads} heads")
        return kinds

    def with_layers(self, k: int) -> "Config":
        kinds = self.attention if isinstance(self.attention, str) else tuple(self.attention[:k])
        rows = None if self.act_rows is None else self.act_rows[:k]
        return replace(self, layers=k, attention=kinds, act_rows=rows)


CAUSAL_TYPES = ("gpt2", "llama", "qwen2", "mistral")  # the families read as causal LMs


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _lin(lin, transpose=True):
    w = _np(lin.weight)
    b = _np(lin.bias) if getattr(lin, "bias", None) is not None else np.zeros(w.shape[0 if transpose else 1], np.float32)
    return (w.T if transpose else w), b


def _ln(norm):
    g = _np(norm.weight)
    b = _np(norm.bias) if getattr(norm, "bias", None) is not None else np.zeros_like(g)
    return {"g": g, "b": b}


def from_hf(model) -> tuple[Config, dict]:
    mt = model.config.model_type
    loader = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "qwen2": _llama, "mistral": _llama, "vit": _vit}.get(mt)
    if loader is None:
        raise ValueError(f"no block loader for model_type {mt!r} (supported: bert, gpt2, llama, qwen2, mistral, vit)")
    return loader(model)


def _block(q, k, v, o, ln1, ln2, w1, w2, gate=None) -> dict:
    p = {"ln1": _ln(ln1), "ln2": _ln(ln2)}
    for name, lin in (("q", q), ("k", k), ("v", v), ("o", o)):
        p["w" + name], p["b" + name] = _lin(lin)
    p["w1"], p["b1"] = _lin(w1)
    p["w2"], p["b2"] = _lin(w2)
    if gate is not None:
        p["w_gate"] = _lin(gate)[0]
    return p


def _bert(model):
    c = model.config
    body = model.bert if hasattr(model, "bert") else model
    cfg = Config(
        hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads, ffn=c.intermediate_size, prenorm=False,
        eps=c.layer_norm_eps, embed_norm=True, final_norm=False, activation="gelu",
    )
    layers = [
        _block(l.attention.self.query, l.attention.self.key, l.attention.self.value, l.attention.output.dense,
               l.attention.output.LayerNorm, l.output.LayerNorm, l.intermediate.dense, l.output.dense)
        for l in body.encoder.layer
    ]
    return cfg, {"embed_norm": _ln(body.embeddings.LayerNorm), "layers": layers}


def _gpt2(model):
    c = model.config
    d = c.n_embd
    cfg = Config(
        hidden=d, layers=c.n_layer, heads=c.n_head, head_dim=d // c.n_head, ffn=c.n_inner or 4 * d,
        eps=c.layer_norm_epsilon, activation="gelu_tanh", causal=True, head="every_token",
    )
    layers = []
    for blk in model.transformer.h:
        w, b = _np(blk.attn.c_attn.weight), _np(blk.attn.c_attn.bias)  # Conv1D: (in, out)
        p = {"ln1": _ln(blk.ln_1), "ln2": _ln(blk.ln_2)}
        for i, name in enumerate("qkv"):
            p["w" + name], p["b" + name] = w[:, i * d : (i + 1) * d], b[i * d : (i + 1) * d]
        p["wo"], p["bo"] = _lin(blk.attn.c_proj, transpose=False)
        p["w1"], p["b1"] = _lin(blk.mlp.c_fc, transpose=False)
        p["w2"], p["b2"] = _lin(blk.mlp.c_proj, transpose=False)
        layers.append(p)
    head = {"w": _np(model.lm_head.weight).T, "b": np.zeros(c.vocab_size, np.float32)}
    return cfg, {"layers": layers, "final_norm": _ln(model.transformer.ln_f), "head": head}


def _llama(model):
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = Config(
        hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads, head_dim=hd,
        ffn=c.intermediate_size, kv_heads=c.num_key_value_heads, norm="rms", eps=c.rms_norm_eps,
        activation="silu", glu=True, causal=True, rope_theta=_rope_theta(c), head="every_token",
    )
    layers = []
    for l in model.model.layers:
        a, m = l.self_attn, l.mlp
        layers.append(_block(a.q_proj, a.k_proj, a.v_proj, a.o_proj, l.input_layernorm, l.post_attention_layernorm,
                             m.up_proj, m.down_proj, gate=m.gate_proj))
    head = {"w": _np(model.lm_head.weight).T, "b": np.zeros(c.vocab_size, np.float32)}
    return cfg, {"layers": layers, "final_norm": _ln(model.model.norm), "head": head}


def _rope_theta(c) -> float:
    """The RoPE base; the walks compute plain RoPE, so a scaled variant (llama3, yarn, …) is refused."""
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"RoPE of type {kind!r} is not supported here (plain RoPE only)")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(c, "rope_theta", None) or 10000.0)


def _vit(model):
    c = model.config
    body = model.vit if hasattr(model, "vit") else model
    cls = hasattr(model, "classifier")
    cfg = Config(
        hidden=c.hidden_size, layers=c.num_hidden_layers, heads=c.num_attention_heads,
        head_dim=c.hidden_size // c.num_attention_heads, ffn=c.intermediate_size, eps=c.layer_norm_eps,
        activation="gelu", head="first_token" if cls else None,
    )
    layers = [
        _block(l.attention.q_proj, l.attention.k_proj, l.attention.v_proj, l.attention.o_proj,
               l.layernorm_before, l.layernorm_after, l.mlp.fc1, l.mlp.fc2)
        for l in body.layers
    ]
    params = {"layers": layers, "final_norm": _ln(body.layernorm)}
    if cls:
        params["head"] = dict(zip(("w", "b"), _lin(model.classifier)))
    return cfg, params


@torch.no_grad()
def embed(model, position_offset: int = 0, **inputs) -> np.ndarray:
    """The user's side: what enters layer 0 (the same cut as STIP's client). With a KV cache,
    ``position_offset`` is the number of positions already seen."""
    mt = model.config.model_type
    if mt == "bert":
        e = (model.bert if hasattr(model, "bert") else model).embeddings
        ids = inputs["input_ids"]
        pos = torch.arange(position_offset, position_offset + ids.shape[1])
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(ids))
    elif mt == "gpt2":
        ids = inputs["input_ids"]
        x = model.transformer.wte(ids) + model.transformer.wpe(torch.arange(position_offset, position_offset + ids.shape[1]))
    elif mt in ("llama", "qwen2", "mistral"):
        x = model.model.embed_tokens(inputs["input_ids"])
    elif mt == "vit":
        x = (model.vit if hasattr(model, "vit") else model).embeddings(inputs["pixel_values"])
    else:
        raise ValueError(f"no embedding for model_type {mt!r}")
    return _np(x)
