"""MPCViT (Zeng, Li et al., ICCV 2023): a ViT whose heads are softmax, ReLU-softmax or scaling
attention, found by a differentiable search and then retrained with self-distillation.

With S = QKᵀ/√d_h over N tokens, a head's weights are
    softmax        softmax(S)
    relu_softmax   ReLU(S) / (Σ_j ReLU(S) + ε)
    scaling        S / N
In search mode each unit (a head, a whole layer, or one query row of a head: the granularity)
mixes α·ReLUSoftmax + (1−α)·Scaling with α ∈ [0, 1]; `binarize` turns the top μ fraction of α
into ReLU-softmax and the rest into scaling. MPCViT+ mixes β·GELU(x) + (1−β)·x per token in the
MLPs the same way (``linear_gelu``).

    model = MPCViT(PRESETS["digits"])           # a softmax teacher
    model.start_search("head")                   # α per head
    binarize(model, mu=0.3)                      # fixed heterogeneous heads
    cfg, params = to_mpc(model)                  # for stip.mpc: runs under SPU with these heads
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Codes in a layer's `kinds` buffer, (heads, tokens): one per query row.
SCALING, RELU_SOFTMAX, SOFTMAX = 0, 1, 2
KIND_NAMES = {SCALING: "scaling", RELU_SOFTMAX: "relu_softmax", SOFTMAX: "softmax"}
GRANULARITIES = ("head", "layer", "row")
KIND = "stip-mpcvit"  # the metadata key of its model files
EPS = 1e-5


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch: int
    channels: int
    dim: int
    layers: int
    heads: int
    mlp_ratio: float
    classes: int
    linear_gelu: bool = False  # MPCViT+

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_json(self) -> dict:
        return asdict(self)


PRESETS = {
    "digits": ViTConfig(image_size=8, patch=2, channels=1, dim=64, layers=4, heads=4, mlp_ratio=2, classes=10),
    "vit-7-4-32": ViTConfig(image_size=32, patch=4, channels=3, dim=256, layers=7, heads=4, mlp_ratio=2, classes=10),
    "vit-9-12-64": ViTConfig(image_size=64, patch=4, channels=3, dim=192, layers=9, heads=12, mlp_ratio=2, classes=200),
}


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.register_buffer("kinds", torch.full((cfg.heads, cfg.tokens), SOFTMAX, dtype=torch.int64))
        self.alpha: nn.Parameter | None = None  # set while searching

    def forward(self, x):
        b, n, _ = x.shape
        h, hd = self.cfg.heads, self.cfg.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scaling = s / n
        if self.alpha is not None:
            a = self.alpha.clamp(0, 1).expand(h, n)[None, :, :, None]
            w = a * relu_softmax(s) + (1 - a) * scaling
        else:
            kinds = self.kinds[None, :, :, None]
            w = torch.zeros_like(s)
            if (self.kinds == SOFTMAX).any():
                w = torch.where(kinds == SOFTMAX, s.softmax(-1), w)
            if (self.kinds == RELU_SOFTMAX).any():
                w = torch.where(kinds == RELU_SOFTMAX, relu_softmax(s), w)
            w = torch.where(kinds == SCALING, scaling, w)
        return self.proj((w @ v).transpose(1, 2).reshape(b, n, h * hd))


def relu_softmax(s):
    r = F.relu(s)
    return r / (r.sum(-1, keepdim=True) + EPS)


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, hidden), nn.Linear(hidden, cfg.dim)
        # 1: GELU, 0: identity, per token (MPCViT+); all GELU unless linear_gelu is searched
        self.register_buffer("gelu", torch.ones(cfg.tokens))
        self.beta: nn.Parameter | None = None

    def forward(self, x):
        u = self.fc1(x)
        g = self.beta.clamp(0, 1) if self.beta is not None else self.gelu
        g = g[None, :, None]
        return self.fc2(g * F.gelu(u) + (1 - g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MPCViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch, cfg.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos = nn.Parameter(torch.randn(1, cfg.tokens, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.classes)

    def embed(self, images):
        """The user's side of the cut (as in STIP and the MPC runner): patches, [CLS], positions."""
        x = self.patch(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos

    def features(self, images):
        """Last-layer token features after the final norm (the distillation target)."""
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, images, return_features: bool = False):
        f = self.features(images)
        logits = self.head(f[:, 0])
        return (logits, f) if return_features else logits

    # --- search and binarisation ---------------------------------------------------------------

    def start_search(self, granularity: str = "head", init: float = 0.5) -> None:
        """Give every attention unit a learnable α (and every MLP token a β with linear_gelu)."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
        c = self.cfg
        shape = {"head": (c.heads, 1), "layer": (1, 1), "row": (c.heads, c.tokens)}[granularity]
        for blk in self.blocks:
            blk.attn.alpha = nn.Parameter(torch.full(shape, init))
            if c.linear_gelu:
                blk.mlp.beta = nn.Parameter(torch.full((c.tokens,), init))

    def searching(self) -> bool:
        return self.blocks[0].attn.alpha is not None

    def search_parameters(self):
        for blk in self.blocks:
            if blk.attn.alpha is not None:
                yield blk.attn.alpha
            if blk.mlp.beta is not None:
                yield blk.mlp.beta

    @torch.no_grad()
    def clamp_search(self) -> None:
        for p in self.search_parameters():
            p.clamp_(0, 1)

    def head_kinds(self) -> list[list[str | tuple[str, ...]]]:
        """Per layer, per head: one kind, or per query row a kind when rows differ."""
        out = []
        for blk in self.blocks:
            layer = []
            for row in blk.attn.kinds.tolist():
                names = tuple(KIND_NAMES[k] for k in row)
                layer.append(names[0] if len(set(names)) == 1 else names)
            out.append(layer)
        return out

    def kind_counts(self) -> dict[str, int]:
        """How many (layer, head, row) units use each kind."""
        kinds = torch.stack([blk.attn.kinds for blk in self.blocks])
        return {name: int((kinds == code).sum()) for code, name in KIND_NAMES.items()}


@torch.no_grad()
def binarize(model: MPCViT, mu: float) -> dict:
    """Top μ fraction of α (over all units of all layers) → ReLU-softmax, the rest → scaling;
    the same for β (GELU vs identity) when searched. Ends search mode. Returns a summary."""
    if not 0 <= mu <= 1:
        raise ValueError("mu must lie in [0, 1]")
    if not model.searching():
        raise ValueError("the model is not in search mode: nothing to binarize")
    c = model.cfg
    alphas = [blk.attn.alpha.detach().clamp(0, 1) for blk in model.blocks]
    chosen = _top_fraction([a.flatten() for a in alphas], mu)
    for blk, a, keep in zip(model.blocks, alphas, chosen):
        mask = keep.reshape(a.shape).expand(c.heads, c.tokens)
        blk.attn.kinds.copy_(torch.where(mask, RELU_SOFTMAX, SCALING))
        blk.attn.alpha = None
    summary = {"mu": mu, "units": sum(a.numel() for a in alphas), "relu_softmax_units": int(sum(k.sum() for k in chosen))}
    if c.linear_gelu:
        betas = [blk.mlp.beta.detach().clamp(0, 1) for blk in model.blocks]
        for blk, keep in zip(model.blocks, _top_fraction(betas, mu)):
            blk.mlp.gelu.copy_(keep.float())
            blk.mlp.beta = None
        summary["gelu_tokens"] = int(sum(blk.mlp.gelu.sum() for blk in model.blocks))
    return summary


def _top_fraction(groups: list[torch.Tensor], mu: float) -> list[torch.Tensor]:
    flat = torch.cat(groups)
    k = int(round(mu * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k:
        keep[torch.argsort(flat, descending=True, stable=True)[:k]] = True
    return list(keep.split([g.numel() for g in groups]))


@torch.no_grad()
def set_kinds(model: MPCViT, pattern: str | float, gelu: float | None = None) -> MPCViT:
    """Fix every head to one kind ("softmax" | "relu_softmax" | "scaling"), or a fraction μ of
    heads to ReLU-softmax spread evenly over layers and the rest to scaling; with ``gelu``, keep
    GELU on that fraction of each MLP's tokens and make the rest identity (MPCViT+). Shapes for
    latency measurement without a search: under SPU every unit of one kind costs the same."""
    c = model.cfg
    if isinstance(pattern, str):
        code = {v: k for k, v in KIND_NAMES.items()}[pattern]
        for blk in model.blocks:
            blk.attn.kinds.fill_(code)
    else:
        picks = _spread(pattern, c.layers * c.heads)
        for i, blk in enumerate(model.blocks):
            for h in range(c.heads):
                blk.attn.kinds[h].fill_(RELU_SOFTMAX if i * c.heads + h in picks else SCALING)
    if gelu is not None:
        if not c.linear_gelu:
            raise ValueError("a GELU fraction needs a linear_gelu (MPCViT+) config")
        keep = _spread(gelu, c.tokens)
        for blk in model.blocks:
            blk.mlp.gelu.copy_(torch.tensor([float(t in keep) for t in range(c.tokens)]))
    return model


def _spread(fraction: float, units: int) -> set[int]:
    k = int(round(fraction * units))
    return set(np.linspace(0, units, k, endpoint=False).astype(int).tolist()) if k else set()


# --- export to the SPU runner -------------------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


@torch.no_grad()
def to_mpc(model: MPCViT):
    """(stip.mpc.model.Config, params) running this model's heads as they are under SPU."""
    from .model import Config

    if model.searching():
        raise ValueError("binarize the model before export: search mode mixes two kinds per unit")
    c = model.cfg
    act_rows = None
    if c.linear_gelu:
        act_rows = tuple(tuple(int(i) for i in torch.nonzero(blk.mlp.gelu).flatten()) for blk in model.blocks)
    cfg = Config(
        hidden=c.dim, layers=c.layers, heads=c.heads, head_dim=c.head_dim, ffn=int(c.dim * c.mlp_ratio),
        eps=model.norm.eps, activation="gelu", head="first_token",
        attention=tuple(tuple(layer) for layer in model.head_kinds()), act_rows=act_rows,
    )
    layers = []
    for blk in model.blocks:
        w, b = _np(blk.attn.qkv.weight).T, _np(blk.attn.qkv.bias)
        d = c.dim
        p = {"ln1": {"g": _np(blk.ln1.weight), "b": _np(blk.ln1.bias)}, "ln2": {"g": _np(blk.ln2.weight), "b": _np(blk.ln2.bias)}}
        for i, name in enumerate("qkv"):
            p["w" + name], p["b" + name] = w[:, i * d : (i + 1) * d], b[i * d : (i + 1) * d]
        p["wo"], p["bo"] = _np(blk.attn.proj.weight).T, _np(blk.attn.proj.bias)
        p["w1"], p["b1"] = _np(blk.mlp.fc1.weight).T, _np(blk.mlp.fc1.bias)
        p["w2"], p["b2"] = _np(blk.mlp.fc2.weight).T, _np(blk.mlp.fc2.bias)
        layers.append(p)
    params = {
        "layers": layers,
        "final_norm": {"g": _np(model.norm.weight), "b": _np(model.norm.bias)},
        "head": {"w": _np(model.head.weight).T, "b": _np(model.head.bias)},
    }
    return cfg, params


@torch.no_grad()
def embed(model: MPCViT, images: torch.Tensor) -> np.ndarray:
    return _np(model.embed(images))


# --- files --------------------------------------------------------------------------------------


def save(model: MPCViT, path, extra: dict | None = None) -> None:
    """safetensors weights (buffers included: the head kinds) + the config in its metadata."""
    from ..models import checkpoint

    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("alpha", "beta"))}
    checkpoint.save(state, path, KIND, model.cfg.to_json(), extra)


def is_checkpoint(path) -> bool:
    """True for a file (or a `stip train mpcvit` folder's model) that ``load`` reads."""
    from ..models import checkpoint

    return checkpoint.info(path, KIND) is not None


def load(path) -> tuple[MPCViT, dict]:
    """Reads a file written by ``save``, or the final model of a `stip train mpcvit` folder."""
    from ..models import checkpoint

    state, info = checkpoint.load(path, KIND, "an MPCViT checkpoint", "train one with `stip train mpcvit OUT`")
    model = MPCViT(ViTConfig(**info.pop("config")))
    model.load_state_dict(state)
    return model.eval(), info


# --- the recipe: teacher → search → binarize → distil ---------------------------------------


@dataclass
class Recipe:
    """``stip train mpcvit`` settings. Epoch counts are per stage."""

    dataset: str = "digits"
    data_dir: str | None = None
    preset: str = "digits"
    linear_gelu: bool = False
    granularity: str = "head"
    mu: float = 0.3
    lam: float = 1e-5  # the L1 weight on α (MPCViT's λ)
    latency_weights: str = "measured"  # "measured": per-unit weights from SPU costs | "uniform"
    distill: bool = True
    teacher_epochs: int = 60
    search_epochs: int = 5
    distill_epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def vit_config(self, classes: int) -> ViTConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        from dataclasses import replace

        return replace(PRESETS[self.preset], classes=classes, linear_gelu=self.linear_gelu)


def unit_latency(cfg: ViTConfig, granularity: str, measured: dict | None) -> dict:
    """The latency one α unit saves as scaling instead of ReLU-softmax, from measured SPU costs
    of one head (LAN estimate: time + bytes/bandwidth + rounds × RTT). It is the L1 weight of
    every unit, normalised to a mean of 1 so that λ keeps MPCViT's meaning: every unit of one
    granularity covers the same work, so the normalised weight is 1 — MPCViT's plain L1."""
    if measured is None:
        return {}
    from . import netem

    lan = netem.PROFILES["lan"]
    est = {k: netem.estimate(v["seconds"], [v["bytes"]], v["send_actions"], lan) for k, v in measured.items()}
    per_head = max(est["relu_softmax"] - est["scaling"], 0.0)
    rows = {"head": 1, "layer": 1 / cfg.heads, "row": cfg.tokens}[granularity]
    return {"lan_seconds_per_head": est, "seconds_saved_per_unit": per_head / rows}


def train_mpcvit(recipe: Recipe, out, tick=None, force: bool = False) -> dict:
    """Runs (or resumes) the four stages into OUT; returns the summary also written to
    OUT/summary.json. OUT/model.safetensors is the final heterogeneous model."""
    import copy
    import json
    from pathlib import Path

    from ..models import data
    from ..models.train import Schedule, accuracy, cross_entropy, fit, open_run, settings_of

    out = Path(out)
    if recipe.granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}")
    if recipe.latency_weights not in ("measured", "uniform"):
        raise ValueError("latency weights must be measured or uniform")
    train, test = data.load(recipe.dataset, recipe.data_dir, seed=recipe.seed)
    cfg = recipe.vit_config(train.classes)
    if train.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"preset {recipe.preset} takes {cfg.channels}×{cfg.image_size}×{cfg.image_size} images; "
                         f"{recipe.dataset} has {tuple(train.images.shape[1:])}")
    open_run(out, settings_of(recipe), force=force)
    sched = lambda epochs: Schedule(epochs, recipe.lr, recipe.batch_size, seed=recipe.seed)  # noqa: E731
    summary: dict = {"recipe": settings_of(recipe), "config": cfg.to_json(), "test_images": len(test)}

    torch.manual_seed(recipe.seed)
    teacher = MPCViT(cfg)
    aug = data.augmentation(recipe.dataset)
    fit(teacher, "teacher", train, sched(recipe.teacher_epochs), cross_entropy, out, tick, augment=aug)
    summary["teacher_accuracy"] = accuracy(teacher, test)

    costs_file = out / "head_costs.json"
    measured = None
    if recipe.latency_weights == "measured":
        if not costs_file.exists():
            from .runner import head_costs

            if tick is not None:
                tick("spu head costs", 0, 1, "measuring one head of each kind under SEMI2K")
            costs_file.write_text(json.dumps(head_costs(cfg.tokens, cfg.head_dim, kinds=("relu_softmax", "scaling"))))
            if tick is not None:
                tick("spu head costs", 1, 1, "done")
        measured = json.loads(costs_file.read_text())
    summary["latency_weights"] = {"kind": recipe.latency_weights, "measured": measured, **unit_latency(cfg, recipe.granularity, measured)}

    model = copy.deepcopy(teacher)
    model.start_search(recipe.granularity)

    def search_loss(m, x, y):
        penalty = sum(p.abs().sum() for p in m.search_parameters())
        return F.cross_entropy(m(x), y) + recipe.lam * penalty  # unit weight 1: see unit_latency

    fit(model, "search", train, sched(recipe.search_epochs), search_loss, out, tick, after_step=model.clamp_search, augment=aug)
    summary["search_accuracy"] = accuracy(model, test)
    summary["binarize"] = binarize(model, recipe.mu)
    summary["binarized_accuracy"] = accuracy(model, test)

    teacher.requires_grad_(False)
    name = "distill" if recipe.distill else "retrain"
    fit(model, name, train, sched(recipe.distill_epochs), distill_loss(teacher) if recipe.distill else cross_entropy, out, tick, augment=aug)
    summary["accuracy"] = accuracy(model, test)
    summary["head_kinds"] = model.kind_counts()
    save(model, out / "model.safetensors", {"recipe": settings_of(recipe), "accuracy": summary["accuracy"]})
    save(teacher, out / "teacher.safetensors", {"recipe": settings_of(recipe), "accuracy": summary["teacher_accuracy"]})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def distill_loss(teacher: MPCViT, temperature: float = 1.0):
    """MPCViT's self-distillation: KL on the logits + MSE on the last-layer token features + CE."""

    def loss(student, x, y):
        with torch.no_grad():
            t_logits, t_feat = teacher(x, return_features=True)
        s_logits, s_feat = student(x, return_features=True)
        kl = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2
        return F.cross_entropy(s_logits, y) + kl + F.mse_loss(s_feat, t_feat)

    return loss
