"""P1's side: seal a Hugging Face model with a secret key.

    sealed = seal(model)                  # in memory: Sealed(server, client, key)
    sealed = seal(model, key)             # with a key drawn earlier for this model
    sealed = seal(model, mode="tokens")   # causal LMs: P2 embeds renamed token ids itself
    seal_folder("path/to/hf-model", "out")  # on disk: out/server, out/client, out/provider

One module per architecture family (bert, gpt2, llama, vit, swin), each reading like its
table in stip-algebra.md, behind one dispatch on ``config.model_type``. Families whose
models generate text also define ``seal_tokens_`` (token mode).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from .. import keys as keys_
from ..client.bundle import EMBEDDINGS, MODES, TOKENS, ClientBundle
from ..keys import Key
from ..models import source
from ..models.source import UnsupportedModel, load_source, supported  # noqa: F401  (P1's API too)
from . import bert, gpt2, llama, swin, vit

FAMILIES: dict[str, ModuleType] = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit, "swin": swin}
SERVER_META = "stip"  # the config.json entry that tells P2 what is client-side


def family_of(model) -> ModuleType:
    """The sealing module for ``model`` (`stip.models.source` says which architectures)."""
    return FAMILIES[source.family(model)]


def base_prefix(model) -> str:
    """The prefix that head models put before base-model names ('bert.', 'transformer.', …)."""
    p = getattr(model, "base_model_prefix", "")
    return f"{p}." if p and hasattr(model, p) else ""


def identity(model) -> dict:
    """Who the key belongs to: architecture and a SHA-256 over config and weights."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"model_type": model.config.model_type, "architecture": type(model).__name__, "digest": h.hexdigest()}


@dataclass
class Sealed:
    """The three shares of one sealing: P2's model, P3's bundle, P1's key."""

    server: torch.nn.Module
    client: ClientBundle
    key: Key


def seal(
    model,
    key: Key | None = None,
    *,
    mode: str = EMBEDDINGS,
    inplace: bool = False,
    step: Callable[[str], None] = lambda _: None,
) -> Sealed:
    """Seal ``model`` with ``key``, or with a freshly drawn one.

    ``mode="embeddings"`` (the paper's): P3 embeds and sends rows permuted by π.
    ``mode="tokens"`` (causal LMs): P2's checkpoint keeps the word table, sealed, and is fed
    token ids renamed by π_c, so an unmodified engine serves it.
    The model is left untouched unless ``inplace`` (which spares a second copy of the weights
    when the original is not needed afterwards)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    fam = family_of(model)
    if mode == TOKENS and not hasattr(fam, "seal_tokens_"):
        raise UnsupportedModel(f"token mode is for causal language models; {type(model).__name__} takes embedding mode")
    layout = fam.layout(model)
    ident = identity(model)
    if key is None:
        key = keys_.generate(layout, ident)
    else:
        key.matches(layout, ident)
    client_side = fam.client_side(model) if mode == EMBEDDINGS else {}
    prefix = base_prefix(model)
    state = model.state_dict()
    client_tensors = {name.removeprefix(prefix): state[name].detach().clone() for name in client_side}
    bundle = ClientBundle(
        config=copy.deepcopy(model.config), key=key.client_key(tokens=mode == TOKENS), tensors=client_tensors, mode=mode
    )

    server = (model if inplace else copy.deepcopy(model)).eval()
    tied = _tied(server)
    fam.seal_(server, key, step)
    if mode == TOKENS:
        _seal_tokens(fam, server, key, tied)
    sd = server.state_dict()
    with torch.no_grad():
        for name in client_side:
            sd[name].zero_()  # P2 never holds P3's tables, not even in memory
    _server_config(server.config, key, client_side, mode)
    return Sealed(server=server, client=bundle, key=key)


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def _seal_tokens(fam: ModuleType, server, key: Key, tied: bool) -> None:
    """Token mode on top of a sealed body: seal the word table (rows by π_c, columns by π),
    re-tie a tied head (both tables are then the same matrix E[π_c][:, π]), and rename the
    special ids in P2's configs so that the engine stops on the sealed end-of-text id."""
    fam.seal_tokens_(server, key)
    if tied:
        emb, head = server.get_input_embeddings(), server.get_output_embeddings()
        if not torch.equal(emb.weight, head.weight):
            raise AssertionError("a tied head sealed differently from its word table")
        head.weight = emb.weight
        server.config.tie_word_embeddings = True
    rename = keys_.invert(key.pi_c)

    def renamed(name: str, t: int) -> int:
        if not 0 <= t < len(rename):
            raise UnsupportedModel(f"{name}={t} lies outside the vocabulary of {len(rename)}: fix the model's config")
        return int(rename[t])

    configs = [server.config] + ([server.generation_config] if getattr(server, "generation_config", None) else [])
    for cfg in configs:
        for name in SPECIAL_IDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                setattr(cfg, name, renamed(name, value))
            elif isinstance(value, list):
                setattr(cfg, name, [renamed(name, v) for v in value])


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _server_config(config, key: Key, client_side: dict[str, str], mode: str = EMBEDDINGS) -> None:
    """Strip from P2's config what identifies the user-facing model beyond its shapes."""
    config._name_or_path = ""
    config.__dict__.pop("_model_name_or_path", None)  # a GGUF's own name for the model
    n = getattr(config, "num_labels", None)
    if getattr(config, "id2label", None) and n:
        # Label names stay with P3 (and P2's outputs are in π_c order anyway).
        config.id2label = {i: f"LABEL_{i}" for i in range(n)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    setattr(
        config,
        SERVER_META,
        {
            "format": 1,
            "mode": mode,
            "fingerprint": key.fingerprint,
            "client_side": sorted(n for n, how in client_side.items() if how == "drop"),
            "zeroed": sorted(n for n, how in client_side.items() if how == "zero"),
        },
    )


# --- on disk --------------------------------------------------------------------------------------

SERVER, CLIENT, PROVIDER = "server", "client", "provider"
KEY_FILE = "key.stip"
PREPROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def seal_folder(
    src: str | Path,
    out: str | Path,
    key: Key | None = None,
    *,
    mode: str = EMBEDDINGS,
    step: Callable[[str], None] = lambda _: None,
    force: bool = False,
) -> Sealed:
    """Seal the model in ``src`` and write out/server, out/client and out/provider."""
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force to replace it)")
        for part in (SERVER, CLIENT, PROVIDER):
            shutil.rmtree(out / part, ignore_errors=True)
    model = load_source(src)
    step("loaded")
    sealed = seal(model, key, mode=mode, inplace=True, step=step)
    write(sealed, out, preprocessing_from=src)
    step("written")
    return sealed


def write(sealed: Sealed, out: str | Path, preprocessing_from: str | Path | None = None) -> None:
    out = Path(out)
    server_dir, client_dir, provider_dir = out / SERVER, out / CLIENT, out / PROVIDER
    for d in (server_dir, client_dir, provider_dir):
        d.mkdir(parents=True, exist_ok=True)
    provider_dir.chmod(0o700)

    meta = sealed.server.config.stip
    state = {
        name: t.contiguous()
        for name, t in sealed.server.state_dict().items()
        if name not in set(meta["client_side"])
    }
    sealed.server.save_pretrained(server_dir, state_dict=state)

    files = copy_preprocessing(preprocessing_from, client_dir) if preprocessing_from is not None else []
    if sealed.client.mode == EMBEDDINGS and sealed.client.embedder.modality == "image" and "preprocessor_config.json" not in files:
        _default_image_processor(sealed.client.config).save_pretrained(client_dir)
        files.append("preprocessor_config.json")
    sealed.client.save(client_dir, preprocessing=files)
    sealed.key.save(provider_dir / KEY_FILE)


def rekey(sealed_dir: str | Path, out: str | Path, *, force: bool = False) -> Sealed:
    """Re-key a sealed model from its provider key alone (no need for the original weights):
    draw a fresh key F and seal the sealed model with it. Sealing is a gather on every axis,
    so the result is the model sealed under the composition Π∘F (each permutation p becomes
    p[f]); the client keeps its embedding tables and gets the new π, π_c. Use it to rotate keys,
    or to give each user their own key from one sealing."""
    from ..serve import engine

    sealed_dir, out = Path(sealed_dir), Path(out)
    if out.resolve() == sealed_dir.resolve():
        raise ValueError("write the re-keyed model to a new folder, not over the one it comes from")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force to replace it)")
        for part in (SERVER, CLIENT, PROVIDER):
            shutil.rmtree(out / part, ignore_errors=True)
    old = keys_.load(sealed_dir / PROVIDER / KEY_FILE)
    if not isinstance(old, Key):
        raise keys_.InvalidKey(f"{sealed_dir / PROVIDER / KEY_FILE} is not a provider key")
    server = engine.load(sealed_dir / SERVER)
    bundle = ClientBundle.load(sealed_dir / CLIENT)
    meta = getattr(server.config, SERVER_META)
    if not old.fingerprint == bundle.fingerprint == meta["fingerprint"]:
        raise keys_.InvalidKey(f"{sealed_dir}: the provider key, client key and server checkpoint belong to different sealings")
    fresh = keys_.generate(old.layout, old.model)
    mode = meta.get("mode", EMBEDDINGS)
    fam, tied = family_of(server), _tied(server)
    fam.seal_(server, fresh)
    if mode == TOKENS:  # the ids P2 knows are renamed again: composing renames is a gather too
        _seal_tokens(fam, server, fresh, tied)
    new = Key({n: old[n][fresh[n]] for n in old.names()}, old.layout, old.model)
    client_side = {n: "drop" for n in meta["client_side"]} | {n: "zero" for n in meta["zeroed"]}
    _server_config(server.config, new, client_side, mode)
    client = ClientBundle(config=bundle.config, key=new.client_key(tokens=mode == TOKENS), tensors=bundle.tensors, mode=mode)
    sealed = Sealed(server=server, client=client, key=new)
    write(sealed, out, preprocessing_from=sealed_dir / CLIENT)
    return sealed


def copy_preprocessing(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / image-processor files that ``src`` has into ``dst``; their names."""
    found = [name for name in PREPROCESSING_FILES if (Path(src) / name).is_file()]
    for name in found:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return found


def _default_image_processor(config):
    """For a source without one: resize to the model's input size, ImageNet-style normalisation."""
    from transformers import ViTImageProcessor

    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size, config.image_size)
    return ViTImageProcessor(size={"height": int(size[0]), "width": int(size[1])})
