"""The modules: config and presets, the polynomial (or GELU) activation, BatchNorm, polynomial
attention with its length scale and causal mask, the blocks, `PolyViT` and `PolyLM`; the training
loss with its range and variance penalties, and perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
    "digits": PolyConfig(patch=2),  # 16 tokens of 2×2 pixels
    "tiny": PolyConfig(dim=8, layers=1, heads=2, mlp_ratio=1),
    "lm": PolyConfig(task="lm", vocab=4096, context=32, dim=64, layers=2, heads=2, mlp_ratio=2),
    "lm-128": PolyConfig(task="lm", vocab=4096, context=128, dim=64, layers=2, heads=2, mlp_ratio=2),
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
