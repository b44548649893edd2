"""Loading a local Hugging Face folder, and the architectures stip supports.

The ground floor every party stands on: P1 seals what this loads, P3 and the share servers
walk it in shares mode, the baselines and attacks read it. Nothing is ever fetched from a hub.

    model = load_source("path/to/hf-model")   # float32, eval mode
    family("bert")                            # "bert": the sealer's module for it
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import StipError

# family → (config.model_type values, architecture classes): one row per sealing module.
FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (("bert",), ("BertModel", "BertForSequenceClassification", "BertForTokenClassification")),
    "gpt2": (("gpt2",), ("GPT2LMHeadModel",)),
    "llama": (("llama", "qwen2", "mistral"), ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")),
    "vit": (("vit",), ("ViTForImageClassification", "ViTModel")),
    "swin": (("swin",), ("SwinForImageClassification",)),
}


class UnsupportedModel(StipError, ValueError):
    pass


def supported() -> dict[str, tuple[str, ...]]:
    """model_type -> supported architecture classes."""
    return {t: archs for types, archs in FAMILIES.values() for t in types}


def _listing() -> str:
    return "; ".join(f"{t}: {', '.join(a)}" for t, a in supported().items())


def family(model) -> str:
    """The family of a loaded model, checking its class as well as its model type."""
    mt = getattr(model.config, "model_type", None)
    arch = type(model).__name__
    for name, (types, archs) in FAMILIES.items():
        if mt in types:
            if arch not in archs:
                raise UnsupportedModel(f"{arch} is not supported for model_type {mt!r}; supported: {', '.join(archs)}")
            return name
    raise UnsupportedModel(f"model_type {mt!r} ({arch}) is not supported. Supported architectures — {_listing()}")


def load_source(src: str | Path):
    """Load a local Hugging Face model folder (never a hub id: nothing is downloaded)."""
    import transformers

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a local Hugging Face model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(src, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    mt = config.model_type
    allowed = supported().get(mt)
    if allowed is None:
        raise UnsupportedModel(f"model_type {mt!r} is not supported. Supported architectures — {_listing()}")
    arch = next((a for a in archs if a in allowed), None)
    if arch is None:
        raise UnsupportedModel(f"{src} declares architectures {archs or '(none)'}; supported for {mt!r}: {', '.join(allowed)}")
    model = getattr(transformers, arch).from_pretrained(src, local_files_only=True, dtype=torch.float32)
    return model.eval()
