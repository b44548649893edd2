"""P2's inference: a sealed checkpoint run by ordinary `transformers` code on permuted inputs.

P2 holds no permutation and needs none: the sealed weights already expect permuted
activations. Text models run their own ``forward(inputs_embeds=…)``; vision models, whose
forward only takes pixels, run their own layers from the embedded tokens on.

This module imports nothing from ``stip.client`` or ``stip.keys``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import StipError
from ..models.blocks import CAUSAL_TYPES

META = "stip"  # config.json entry written by the sealer
TEXT_TYPES = ("bert", "gpt2", "llama", "qwen2", "mistral")


class NotSealed(StipError, ValueError):
    pass


def load(server_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a sealed checkpoint with plain ``from_pretrained`` and check it is complete.

    P3's tables are absent from the checkpoint by design; every other weight must be there.
    """
    import transformers

    server_dir = Path(server_dir)
    config = transformers.AutoConfig.from_pretrained(server_dir, local_files_only=True)
    meta = getattr(config, META, None)
    if not isinstance(meta, dict) or "fingerprint" not in meta:
        raise NotSealed(f"{server_dir} is not a sealed stip checkpoint (config.json has no '{META}' entry)")
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch or "", None)
    if cls is None:
        raise NotSealed(f"{server_dir}: unknown architecture {arch!r}")
    tf_logger = logging.getLogger("transformers.modeling_utils")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the expected "newly initialized" warning names P3's tables
    try:
        model, info = cls.from_pretrained(server_dir, local_files_only=True, dtype=dtype, output_loading_info=True)
    finally:
        tf_logger.setLevel(level)
    missing = set(info["missing_keys"])
    expected = set(meta["client_side"])
    if missing - expected or info["unexpected_keys"] or info["mismatched_keys"]:
        raise NotSealed(
            f"{server_dir}: checkpoint does not match its architecture "
            f"(missing {sorted(missing - expected)[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]}, "
            f"mismatched {[k for k, *_ in info['mismatched_keys']][:5]})"
        )
    state = model.state_dict()
    with torch.no_grad():
        for name in expected:
            if name in state:
                state[name].zero_()  # randomly initialised by from_pretrained; never used
    return model.eval()


def fingerprint(model) -> str:
    return getattr(model.config, META)["fingerprint"]


def outputs_of(model) -> tuple[str, ...]:
    """The tensors ``forward`` returns for this checkpoint."""
    return ("logits",) if _has_head(model) else ("last_hidden_state", "pooler_output")


def _has_head(model) -> bool:
    return hasattr(model, "classifier") or hasattr(model, "lm_head")


@torch.no_grad()
def forward(
    model,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    use_cache: bool = False,
) -> dict[str, object]:
    """Run the sealed model from permuted embeddings; returns permuted outputs.

    ``embeds`` is (batch, tokens, hidden) for every family. Swin also needs its patch grid,
    which follows from the config.
    """
    mt = model.config.model_type
    if mt in TEXT_TYPES:
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask)
        if mt in CAUSAL_TYPES:
            kwargs.update(position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        out = model(**kwargs)
        result = {k: out[k] for k in outputs_of(model) if out.get(k) is not None}
        if use_cache:
            result["past_key_values"] = out.past_key_values
        return result
    if mt == "vit":
        return _vit(model, embeds)
    if mt == "swin":
        return _swin(model, embeds)
    raise NotSealed(f"no sealed forward for model_type {mt!r}")


def _vit(model, x):
    body = model.vit if hasattr(model, "vit") else model
    for layer in body.layers:
        x = layer(x, None)
    x = body.layernorm(x)
    if hasattr(model, "classifier"):
        return {"logits": model.classifier(x[:, 0, :])}
    return {"last_hidden_state": x, "pooler_output": body.pooler(x) if body.pooler is not None else None}


def swin_grid(c) -> tuple[int, int]:
    size = c.image_size if isinstance(c.image_size, (list, tuple)) else (c.image_size, c.image_size)
    patch = c.patch_size if isinstance(c.patch_size, (list, tuple)) else (c.patch_size, c.patch_size)
    return (size[0] // patch[0], size[1] // patch[1])


def _swin(model, x):
    grid = swin_grid(model.config)
    if x.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"Swin expects {grid[0] * grid[1]} patch tokens, got {x.shape[1]}")
    body = model.swin
    h = body.encoder(x, grid).last_hidden_state
    h = body.layernorm(h)
    pooled = torch.flatten(body.pooler(h.transpose(1, 2)), 1)
    return {"logits": model.classifier(pooled)}


# --- shapes P2 may check inputs against (no secrets in any of them) ---------------------------------


def is_causal(model) -> bool:
    return model.config.model_type in CAUSAL_TYPES


def input_dim(model) -> int:
    """Width of the embeddings P3 sends."""
    c = model.config
    return c.embed_dim if c.model_type == "swin" else c.hidden_size


def fixed_tokens(model) -> int | None:
    """Vision models take exactly one token per patch (plus ViT's class token)."""
    c = model.config
    if c.model_type == "swin":
        g = swin_grid(c)
        return g[0] * g[1]
    if c.model_type == "vit":
        size = c.image_size if isinstance(c.image_size, int) else c.image_size[0]
        patch = c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0]
        return (size // patch) ** 2 + 1
    return None


def max_positions(model) -> int | None:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(c, attr, None):
            return int(getattr(c, attr))
    return fixed_tokens(model)


def output_size(model) -> int:
    c = model.config
    if hasattr(model, "lm_head"):
        return c.vocab_size
    if hasattr(model, "classifier"):
        return c.num_labels
    return input_dim(model)


def describe(model) -> dict:
    """Model info for ``/v1/info``: architecture and shapes, nothing secret."""
    c = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": c.model_type,
        "fingerprint": fingerprint(model),
        "input_dim": input_dim(model),
        "output_size": output_size(model),
        "outputs": list(outputs_of(model)),
        "causal": is_causal(model),
        "fixed_tokens": fixed_tokens(model),
        "max_positions": max_positions(model),
    }
