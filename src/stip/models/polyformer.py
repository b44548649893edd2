"""The polynomial transformer of Zimerman et al. (ICML 2024) for CKKS inference: a ViT
(``PolyViT``) and a causal language model (``PolyLM``) from the same blocks.

Attention is a pointwise activation of the scores divided by a length scale,
    Att(Q, K, V) = σ(QKᵀ/√d_h) · V / S(L),   S(L) = √L ("sqrt_n") or L ("n"),
and for the LM, causally: row i sees positions j ≤ i, divided by S(i + 1) (an elementwise
product with a scaled 0/1 matrix). Normalisation is BatchNorm (an affine map at inference,
folded into the next linear layer), with an extra BatchNorm inside each MLP; the paper keeps
LayerNorm for language, with a polynomial 1/√var, which we do not build. Training adds a range penalty on every activation's
input (outside [-R, R]) and a variance penalty on every BatchNorm's input variance (above a
ceiling). After training, ``to_polynomial`` fits a polynomial to each activation over the
range its inputs took on the training set and swaps it in, without further training.

    model = PolyViT(PRESETS["digits"])      # GELU activations while training
    to_polynomial(model, train.images, degree=2)
    plan = he_plan(model)                    # folded numpy weights for stip.he
    lm = PolyLM(PRESETS["lm"])               # ids (batch, tokens) → next-token logits per position
    twin = PolyLM(replace(PRESETS["lm"], attention="softmax", norm="layer"))   # its softmax/LayerNorm twin
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FITS = ("lsq", "minimax")
KIND = "stip-polyformer"  # the metadata key of its model files


@dataclass(frozen=True)
class PolyConfig:
    image_size: int = 8
    patch: int = 4
    channels: int = 1
    dim: int = 16
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 2
    classes: int = 10
    activation: str = "gelu"  # what the polynomials replace: "gelu" | "relu"
    attn_scale: str = "sqrt_n"  # S(L): "sqrt_n" | "n"
    act_range: float = 4.0  # R of the range penalty
    var_ceiling: float = 50.0  # of the variance penalty
    task: str = "image"  # "image" (PolyViT) | "lm" (PolyLM)
    vocab: int = 0  # lm
    context: int = 0  # lm: the longest input
    attention: str = "poly"  # "poly": σ(scores)/S(L) | "softmax": the twin
    norm: str = "batch"  # "batch" | "layer": the twin

    def __post_init__(self):
        if self.task not in ("image", "lm") or self.attention not in ("poly", "softmax") or self.norm not in ("batch", "layer"):
            raise ValueError(f"unknown task, attention or norm in {self}")
        if self.task == "lm" and (self.vocab < 2 or self.context < 1):
            raise ValueError("a language model needs vocab ≥ 2 and context ≥ 1")

    @property
    def causal(self) -> bool:
        return self.task == "lm"

    @property
    def tokens(self) -> int:
        return self.context if self.task == "lm" else (self.image_size // self.patch) ** 2

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch

    def to_json(self) -> dict:
        return asdict(self)


PRESETS = {
    "digits": PolyConfig(),
    "tiny": PolyConfig(dim=8, layers=1, heads=2, mlp_ratio=1),
    "lm": PolyConfig(task="lm", vocab=4096, context=32, dim=32, layers=2, heads=2, mlp_ratio=2),
    "lm-tiny": PolyConfig(task="lm", vocab=64, context=6, dim=8, layers=1, heads=2, mlp_ratio=1),
}


class Act(nn.Module):
    """GELU/ReLU while training (recording the range penalty), a fitted polynomial after the
    swap. Tracks the min and max of its inputs while ``calibrating``."""

    def __init__(self, cfg: PolyConfig):
        super().__init__()
        self.kind, self.bound = cfg.activation, cfg.act_range
        self.register_buffer("coeffs", torch.zeros(0))  # power basis, c0 first; empty: not swapped
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.calibrating = False
        self.penalty = torch.tensor(0.0)

    def forward(self, x):
        if self.calibrating:
            self.lo.fill_(min(float(self.lo), float(x.min())))
            self.hi.fill_(max(float(self.hi), float(x.max())))
        if self.training:
            self.penalty = F.relu(x.abs() - self.bound).pow(2).mean()
        if self.coeffs.numel():
            return poly(self.coeffs, x)
        return F.gelu(x) if self.kind == "gelu" else F.relu(x)

    def reference(self, x: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(x)
        return (F.gelu(t) if self.kind == "gelu" else F.relu(t)).numpy()


def poly(coeffs, x):
    out = torch.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):  # Horner
        out = out * x + c
    return out


class Norm(nn.BatchNorm1d):
    """BatchNorm over the feature dimension of (batch, tokens, dim), with the variance penalty."""

    def __init__(self, dim: int, ceiling: float):
        super().__init__(dim)
        self.ceiling = ceiling
        self.penalty = torch.tensor(0.0)

    def forward(self, x):
        if self.training:
            self.penalty = F.relu(x.reshape(-1, x.shape[-1]).var(0) - self.ceiling).mean()
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) of the inference-time map y = x·scale + shift."""
        s = self.weight / torch.sqrt(self.running_var + self.eps)
        return s.detach().numpy().astype(np.float64), (self.bias - self.running_mean * s).detach().numpy().astype(np.float64)


def length_scale(cfg: PolyConfig, n) -> float | np.ndarray:
    """S(n): √n or n."""
    return np.sqrt(n) if cfg.attn_scale == "sqrt_n" else np.asarray(n, np.float64) * 1.0


def attention_mask(cfg: PolyConfig, n: int) -> np.ndarray:
    """(n, n): what σ(scores) is multiplied by, elementwise. Causal: row i keeps j ≤ i and is
    divided by S(i + 1); otherwise every entry is 1/S(n)."""
    if not cfg.causal:
        return np.full((n, n), 1.0 / length_scale(cfg, n))
    return np.tril(np.ones((n, n))) / length_scale(cfg, np.arange(1, n + 1))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: PolyConfig):
        super().__init__()
        self.cfg = cfg
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.act = Act(cfg)

    def forward(self, x):
        b, n, d = x.shape
        h = self.cfg.heads
        split = lambda t: t.reshape(b, n, h, d // h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if self.cfg.attention == "softmax":
            if self.cfg.causal:
                s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            a = s.softmax(-1)
        else:
            mask = torch.as_tensor(attention_mask(self.cfg, n), dtype=s.dtype)
            if self.cfg.causal:  # σ of future scores is multiplied by 0: keep them out of its range
                s = s * (mask != 0)
            a = self.act(s) * mask
        return self.o((a @ v).transpose(1, 2).reshape(b, n, d))


def norm(cfg: PolyConfig, dim: int) -> nn.Module:
    return Norm(dim, cfg.var_ceiling) if cfg.norm == "batch" else nn.LayerNorm(dim)


class Block(nn.Module):
    def __init__(self, cfg: PolyConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        # the BatchNorm inside the MLP is the paper's; a LayerNorm twin is a plain transformer
        self.norm1, self.norm2 = norm(cfg, cfg.dim), norm(cfg, cfg.dim)
        self.norm_mlp = norm(cfg, hidden) if cfg.norm == "batch" else nn.Identity()
        self.attn = Attention(cfg)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, hidden), nn.Linear(hidden, cfg.dim)
        self.act = Act(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.norm_mlp(self.fc1(self.norm2(x)))))


class _Polynomial(nn.Module):
    """What both models share: blocks, the final norm, the activations and the penalties."""

    def __init__(self, cfg: PolyConfig):
        super().__init__()
        self.cfg = cfg
        self.pos = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = norm(cfg, cfg.dim)

    def forward(self, inputs):
        return self.body(self.embed(inputs))

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:  # drop the last training step's penalties and the graph they hold
            for m in self.modules():
                if isinstance(m, (Act, Norm)):
                    m.penalty = torch.tensor(0.0)
        return self

    def acts(self) -> list[Act]:
        return [m for m in self.modules() if isinstance(m, Act)]

    def regularisers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(range penalty, variance penalty) of the last training forward."""
        rng = sum(a.penalty for a in self.acts())
        var = sum(m.penalty for m in self.modules() if isinstance(m, Norm))
        return rng, var

    def is_polynomial(self) -> bool:
        return self.cfg.attention == "poly" and self.cfg.norm == "batch" and all(a.coeffs.numel() for a in self.acts())


class PolyLM(_Polynomial):
    """A causal LM: token ids (batch, n ≤ context) → next-token logits (batch, n, vocab)."""

    def __init__(self, cfg: PolyConfig):
        if cfg.task != "lm":
            raise ValueError("PolyLM takes a config with task='lm'")
        super().__init__(cfg)
        self.tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab)

    def embed(self, ids):
        """Token and position embedding: the user's side in every private mode."""
        if ids.shape[1] > self.cfg.context:
            raise ValueError(f"{ids.shape[1]} tokens exceed the context of {self.cfg.context}")
        return self.tokens(ids) + self.pos[:, : ids.shape[1]]

    def body(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class PolyViT(_Polynomial):
    def __init__(self, cfg: PolyConfig):
        if cfg.task != "image":
            raise ValueError("PolyViT takes a config with task='image'")
        super().__init__(cfg)
        self.patch = nn.Linear(cfg.patch_dim, cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def patches(self, images):
        """(batch, tokens, patch_dim): what the user encrypts (pixels only, no weights)."""
        return patches(images, self.cfg.patch)

    def embed(self, images):
        """Patch and position embedding: STIP's client-side part."""
        return self.patch(self.patches(images)) + self.pos

    def body(self, x):
        """Blocks, final norm, mean pool and head: what a STIP server runs on sealed weights."""
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(1))


def patches(images, size: int):
    """Non-overlapping size×size patches of (batch, channels, H, W), flattened per token."""
    return F.unfold(images, size, stride=size).transpose(1, 2)


def task_loss(model, x, y):
    """Cross-entropy: of the class, or of every next token."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def training_loss(alpha: float = 1e-2, beta: float = 1e-3):
    """L_task + α·L_range + β·L_variance."""

    def loss(model: _Polynomial, x, y):
        task = task_loss(model, x, y)
        if model.cfg.attention != "poly":  # the softmax twin trains on its task alone
            return task
        rng, var = model.regularisers()
        return task + alpha * rng + beta * var

    return loss


@torch.no_grad()
def perplexity(model: PolyLM, windows: torch.Tensor, batch_size: int = 256, last_only: bool = False) -> float:
    """exp(mean next-token cross-entropy) over (N, n + 1) windows: every position, or the
    last of each window only."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size]
        logits = model(w[:, :-1])
        if last_only:
            logits, target = logits[:, -1], w[:, -1]
        else:
            target = w[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
        count += target.numel()
    return math.exp(total / count)


# --- the polynomial swap ------------------------------------------------------------------------


def fit_polynomial(f, lo: float, hi: float, degree: int, method: str = "lsq", points: int = 2001) -> np.ndarray:
    """Power-basis coefficients (c0 first) of a degree-``degree`` fit of f on [lo, hi]:
    least squares on a dense grid, or minimax by Lawson's iteratively reweighted least squares."""
    if method not in FITS:
        raise ValueError(f"fit must be one of {FITS}")
    if degree < 1 or not hi > lo:
        raise ValueError("need degree ≥ 1 and a non-empty range")
    x = np.linspace(lo, hi, points)
    y = f(x)
    w = np.ones_like(x)
    for _ in range(1 if method == "lsq" else 200):
        fit = np.polynomial.Chebyshev.fit(x, y, degree, domain=[lo, hi], w=np.sqrt(w))
        err = np.abs(fit(x) - y)
        w = w * (err + 1e-12)
        w /= w.sum()
    return fit.convert(kind=np.polynomial.Polynomial).coef.astype(np.float64)


@torch.no_grad()
def to_polynomial(model: PolyViT, images: torch.Tensor, degree: int = 2, method: str = "lsq", margin: float = 0.05,
                  batch_size: int = 256) -> dict:
    """Fit each activation over the range its inputs take on ``images`` (widened by ``margin``
    of its width) and swap the polynomial in. Returns per-site ranges and max fit errors."""
    model.eval()
    acts = model.acts()
    for a in acts:
        a.coeffs = torch.zeros(0)
        a.lo.fill_(float("inf"))
        a.hi.fill_(float("-inf"))
        a.calibrating = True
    try:
        for i in range(0, len(images), batch_size):
            model(images[i : i + batch_size])
    finally:
        for a in acts:
            a.calibrating = False
    sites = []
    for a in acts:
        lo, hi = float(a.lo), float(a.hi)
        pad = margin * (hi - lo)
        lo, hi = lo - pad, hi + pad
        c = fit_polynomial(a.reference, lo, hi, degree, method)
        grid = np.linspace(lo, hi, 2001)
        sites.append({"range": [lo, hi], "max_fit_error": float(np.abs(np.polynomial.polynomial.polyval(grid, c) - a.reference(grid)).max())})
        a.coeffs = torch.as_tensor(c, dtype=torch.float32)
    return {"degree": degree, "method": method, "sites": sites}


# --- the folded plan that stip.he evaluates ----------------------------------------------------


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


def to_mpc(model: _Polynomial):
    """The folded plan as ``stip.mpc.model`` (Config, params): BatchNorms folded (norm "none"),
    polynomial attention and activations with each layer's own coefficients; a summed pool
    (ViT) or the last position's logits (LM, causal, 1/S(i + 1) per row). Its input is the
    user's embedding ``embed_plan(plan, inputs)``."""
    from .blocks import Config

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


def embed_plan(plan: dict, inputs: np.ndarray, dtype=np.float32) -> np.ndarray:
    """The user's side of every mode: patch (ViT) or token (LM) and position embedding."""
    if plan_config(plan).causal:
        ids = np.asarray(inputs)
        return (plan["tokens"][ids] + plan["pos"][: ids.shape[-1]]).astype(dtype)
    return (inputs @ plan["patch"] + plan["pos"]).astype(dtype)


# --- training run and files ---------------------------------------------------------------------


def train_polyformer(out, preset: str = "digits", dataset: str = "digits", data_dir=None, epochs: int = 40, degree: int = 4,
                     method: str = "lsq", lr: float = 2e-3, seed: int = 0, tick=None, force: bool = False) -> dict:
    """Train (resumable, like `stip train mpcvit`), swap in polynomials, write OUT/model.safetensors
    and OUT/summary.json with the accuracy before and after the swap."""
    import json
    from pathlib import Path

    from . import data
    from .train import Schedule, accuracy, fit, open_run

    if preset not in PRESETS or PRESETS[preset].task != "image":
        raise ValueError(f"unknown image preset {preset!r} (choose from {', '.join(k for k, c in PRESETS.items() if c.task == 'image')}; "
                         "--task lm for a language model)")
    out = Path(out)
    train, test = data.load(dataset, data_dir, seed=seed)
    cfg = replace(PRESETS[preset], classes=train.classes, channels=train.images.shape[1], image_size=train.images.shape[-1])
    open_run(out, {"preset": preset, "dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "epochs": epochs,
                   "degree": degree, "method": method, "lr": lr, "seed": seed}, force=force)
    torch.manual_seed(seed)
    model = PolyViT(cfg)
    fit(model, "train", train, Schedule(epochs, lr, 64, seed=seed), training_loss(), out, tick, augment=data.augmentation(dataset))
    summary = {"config": cfg.to_json(), "twin_accuracy": accuracy(model, test)}
    summary["fit"] = to_polynomial(model, train.images, degree, method)
    summary["polynomial_accuracy"] = accuracy(model, test)
    save(model, out / "model.safetensors", {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "seed": seed})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_polylm(out, preset: str = "lm", data_dir=None, epochs: int = 8, degree: int = 4, method: str = "lsq",
                 lr: float = 2e-3, seed: int = 0, vocab: int | None = None, tick=None, force: bool = False) -> dict:
    """The LM half: a BPE tokenizer trained on the corpus's training split (``stip.models.text``:
    CPython's own prose and docstrings, or a local folder such as WikiText's), then the
    softmax/LayerNorm/GELU twin and the polynomial-ready LM of the same size, each trained on
    next-token prediction (resumable). The polynomials are swapped in, and validation and test
    perplexity are reported for the twin, the LM before the swap and after it. Writes
    OUT/model.safetensors (the polynomial LM), OUT/twin.safetensors, OUT/tokenizer.json and
    OUT/summary.json."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    from . import text
    from .data import Split
    from .train import Schedule, fit, open_run

    if preset not in PRESETS or PRESETS[preset].task != "lm":
        raise ValueError(f"unknown LM preset {preset!r} (choose from {', '.join(k for k, c in PRESETS.items() if c.task == 'lm')})")
    out = Path(out)
    base = PRESETS[preset]
    vocab = vocab or base.vocab
    open_run(out, {"task": "lm", "preset": preset, "data_dir": str(data_dir) if data_dir else None, "epochs": epochs, "degree": degree,
                   "method": method, "lr": lr, "seed": seed, "vocab": vocab}, force=force)  # fmt: skip
    docs = text.corpus(data_dir, seed=seed)
    tok_path = out / "tokenizer.json"
    if tok_path.exists() and not force:
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = text.train_bpe(docs["train"], vocab)
        tok.save(str(tok_path))
    windows = {k: text.windows(tok, v, base.context) for k, v in docs.items()}
    cfg = replace(base, vocab=tok.get_vocab_size())
    train = Split(windows["train"][:, :-1], windows["train"][:, 1:], cfg.vocab)
    summary: dict = {"config": cfg.to_json(), "corpus": {k: {"documents": len(docs[k]), "tokens": int(windows[k].numel() - len(windows[k]))}
                                                        for k in text.SPLITS}}  # fmt: skip
    ppl = lambda m: {k: perplexity(m, windows[k]) for k in ("valid", "test")}  # noqa: E731
    models = {}
    # α = 1: at the ViT's 1e-2 the MLP's inputs spread to ±10.7 and the degree-4 swap took the
    # validation perplexity from 203 to 390; at 1, ±6.8 and 199 → 248 (dim 32, 6 epochs; docs/he.md)
    for stage, c in (("twin", replace(cfg, attention="softmax", norm="layer")), ("train", cfg)):
        torch.manual_seed(seed)
        models[stage] = PolyLM(c)
        fit(models[stage], stage, train, Schedule(epochs, lr, 64, seed=seed), training_loss(alpha=1.0), out, tick)
    twin, model = models["twin"], models["train"]
    summary["twin_perplexity"], summary["gelu_perplexity"] = ppl(twin), ppl(model)
    summary["fit"] = to_polynomial(model, train.images[: 4096], degree, method)
    summary["polynomial_perplexity"] = ppl(model)
    extra = {"data_dir": str(data_dir) if data_dir else None, "seed": seed, "tokenizer": "tokenizer.json"}
    save(model, out / "model.safetensors", extra)
    save(twin, out / "twin.safetensors", extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def held_out(path, count: int, tokens: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``count`` prompts of ``tokens`` ids from an LM folder's held-out split (its own
    tokenizer and corpus), and each prompt's next token: (count, tokens), (count,)."""
    from tokenizers import Tokenizer

    from . import checkpoint, text

    file = checkpoint.resolve(path)
    meta = checkpoint.info(file, KIND)
    if meta is None or meta["config"].get("task") != "lm":
        raise ValueError(f"{file} is not a polynomial LM written by `stip train polyformer --task lm`")
    tok_path = file.parent / meta.get("tokenizer", "tokenizer.json")
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found: the LM's tokenizer lives beside its model")
    docs = text.corpus(meta.get("data_dir"), seed=meta.get("seed", 0))[split]
    w = text.windows(Tokenizer.from_file(str(tok_path)), docs, tokens)
    if len(w) < count:
        raise ValueError(f"the {split} split holds {len(w)} prompts of {tokens} tokens, not {count}")
    return w[:count, :-1].numpy(), w[:count, -1].numpy()


def next_token_perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of (N, vocab) logits against (N,) next tokens."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float(np.exp((lse - logits[np.arange(len(targets)), targets]).mean()))


def save(model: _Polynomial, path, extra: dict | None = None) -> None:
    from . import checkpoint

    checkpoint.save(model.state_dict(), path, KIND, model.cfg.to_json(), extra)


def is_checkpoint(path) -> bool:
    """True for a file (or a `stip train polyformer` folder's model) that ``load`` reads."""
    from . import checkpoint

    return checkpoint.info(path, KIND) is not None


def load(path) -> tuple[_Polynomial, dict]:
    """A file written by ``save``, or the model of a `stip train polyformer` folder."""
    from . import checkpoint

    state, info = checkpoint.load(path, KIND, "a polynomial ViT", "train one with `stip train polyformer OUT`")
    cfg = PolyConfig(**info.pop("config"))
    model = (PolyLM if cfg.task == "lm" else PolyViT)(cfg)
    for name, m in model.named_modules():
        if isinstance(m, Act):
            m.coeffs = torch.zeros_like(state[f"{name}.coeffs"])  # size the buffers before loading
    model.load_state_dict(state)
    return model.eval(), info
