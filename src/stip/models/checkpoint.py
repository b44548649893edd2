"""Model files for the baselines' models: safetensors weights, with the model's config (and
any extra facts) as JSON under one metadata key that names the kind of model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FILE = "model.safetensors"  # the model inside a `stip train …` folder


def resolve(path) -> Path:
    """A model file, or the model of a run folder."""
    path = Path(path)
    return path / FILE if path.is_dir() else path


def save(state: dict[str, torch.Tensor], path, kind: str, config: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={kind: json.dumps({"config": config, **(extra or {})})})


def info(path, kind: str) -> dict | None:
    """The JSON stored under ``kind``, or None when the file is not that kind of model."""
    from safetensors import safe_open

    path = resolve(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(kind)
    except Exception:  # not a safetensors file at all
        return None
    return None if meta is None else json.loads(meta)


def load(path, kind: str, what: str, how: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, stored JSON); errors name ``what`` the file should be and ``how`` to make one."""
    from safetensors.torch import load_file

    path = resolve(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {how}")
    stored = info(path, kind)
    if stored is None:
        raise ValueError(f"{path} is not {what} written by stip")
    return load_file(str(path)), stored
