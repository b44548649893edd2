"""``stip mpc run``: load a model, build the user's input, run it under SPU, report costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import netem
from .model import truncate
from .parties import run_parties
from .runner import CostReport, simulate
from ..models.blocks import embed, from_hf


@dataclass
class Job:
    model: Path
    protocol: str = "semi2k"
    parties: str = "sim"
    tokens: int = 32
    layers: int | None = None
    network: str = "none"
    seed: int = 0


def inputs_for(model, tokens: int, seed: int) -> np.ndarray:
    """The user's embeddings: random in-vocabulary tokens (or random pixels for ViT)."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    if c.model_type == "vit":
        return embed(model, pixel_values=torch.randn(1, c.num_channels, c.image_size, c.image_size, generator=gen))
    low = min(1000, c.vocab_size // 2)
    return embed(model, input_ids=torch.randint(low, c.vocab_size, (1, tokens), generator=gen))


def run(job: Job, model=None) -> tuple[CostReport, dict]:
    """Returns the report and extras (network applied, analytic estimates)."""
    from . import mpcvit

    if model is None and mpcvit.is_checkpoint(job.model):
        model = mpcvit.load(job.model)[0]
    if isinstance(model, mpcvit.MPCViT):  # a `stip train mpcvit` model, heads as searched
        cfg, params = mpcvit.to_mpc(model)
        c = model.cfg
        images = torch.randn(1, c.channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(job.seed))
        x, model_type = mpcvit.embed(model, images), "mpcvit"
    else:
        from ..models.source import load_source

        model = model if model is not None else load_source(job.model)
        cfg, params = from_hf(model)
        x, model_type = None, model.config.model_type
    if job.layers is not None:
        if not 1 <= job.layers <= cfg.layers:
            raise ValueError(f"--layers must lie in 1..{cfg.layers}")
        cfg, params = truncate(cfg, params, job.layers)
    if x is None:
        x = inputs_for(model, job.tokens, job.seed)
    extras: dict = {"tokens": int(x.shape[1]), "layers": cfg.layers, "model_type": model_type}
    if job.parties == "sim":
        if job.network != "none":
            extras["network_note"] = "simulation has no network: the time is compute only; see the estimate"
        report, _ = simulate(cfg, params, x, job.protocol)
    elif job.network == "none":
        report, _ = run_parties(cfg, params, x, job.protocol)
    else:
        profile = netem.PROFILES[job.network]
        with netem.two_hosts(profile) as (hosts, wrap, applied):
            report, _ = run_parties(cfg, params, x, job.protocol, hosts=hosts, wrap=wrap)
        extras["network_applied"] = applied
    rounds = max(a for a in report.send_actions if a is not None)
    extras["estimates"] = {
        name: netem.estimate(report.seconds, report.bytes_sent, rounds, p) for name, p in netem.PROFILES.items()
    }
    extras["estimate_formula"] = "measured seconds + max bytes sent / bandwidth + send actions × RTT"
    return report, extras
