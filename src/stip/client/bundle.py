"""The client bundle: everything P3 needs and nothing more.

On disk (``OUT/client``):
    manifest.json           model type, mode, shapes, key fingerprint, which files are here
    config.json             the model's config (shapes, label names)
    embeddings.safetensors  the embedding module's weights, unpermuted (P3's own side)
    key.stip                the client key: π and π_c (mode 0600)
    tokenizer / image-processor files copied from the source model
No transformer-layer weight and no per-layer permutation is ever part of it.

Two modes. In embedding mode (the paper's) P3 embeds and sends rows permuted by π. In token
mode (causal LMs) P2 holds the sealed word table and P3 sends token ids renamed by π_c: the
id P3 sends for token t is the position of t in π_c, the same name the sealed head gives t
in its output, so an engine feeds its own sampled id back. A token-mode bundle holds no
tensor and no π.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import StipError
from .. import keys
from ..keys import ClientKey, InvalidKey
from . import embed as embed_

FORMAT = "stip-client/1"
EMBEDDINGS, TOKENS = "embeddings", "tokens"
MODES = (EMBEDDINGS, TOKENS)
MANIFEST, CONFIG, TENSORS, KEY = "manifest.json", "config.json", "embeddings.safetensors", "key.stip"


class InvalidBundle(StipError, ValueError):
    pass


def permute(x: torch.Tensor, p: np.ndarray | torch.Tensor) -> torch.Tensor:
    """x permuted by p along the last dimension: ``x[..., p]``."""
    index = p if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=torch.long)
    return x.index_select(-1, index.to(x.device))


def unpermute(x: torch.Tensor, p: np.ndarray) -> torch.Tensor:
    """Undo ``permute(·, p)``."""
    return permute(x, keys.invert(p))


# Which part of the client key undoes each output the server can return.
OUTPUT_PERMUTATION = {"last_hidden_state": "pi", "pooler_output": "pi_c", "logits": "pi_c"}


@dataclass
class ClientBundle:
    config: object  # transformers.PretrainedConfig
    key: ClientKey
    tensors: dict[str, torch.Tensor]
    preprocessing: list[str] = field(default_factory=list)
    mode: str = EMBEDDINGS
    _embedder: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidBundle(f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if self.mode == TOKENS and (self.tensors or not self.key.tokens_only):
            raise InvalidBundle("a token-mode bundle holds π_c only: no embedding tensor, no π")

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    @property
    def embedder(self) -> torch.nn.Module:
        if self.mode == TOKENS:
            raise InvalidBundle("a token-mode bundle has no embedder: P2 embeds the renamed ids")
        if self._embedder is None:
            self._embedder = embed_.build(self.config, self.tensors)
        return self._embedder

    @cached_property
    def _index(self) -> dict[str, torch.Tensor]:
        """Gather indices, built once: per-token generation un-permutes a vocabulary-sized
        vector every step."""
        index = {
            "pi_c": torch.tensor(self.key.pi_c, dtype=torch.long),
            "pi_c.inverse": torch.tensor(keys.invert(self.key.pi_c), dtype=torch.long),
        }
        if not self.key.tokens_only:
            index["pi"] = torch.tensor(self.key.pi, dtype=torch.long)
            index["pi.inverse"] = torch.tensor(keys.invert(self.key.pi), dtype=torch.long)
        return index

    def rename_ids(self, ids: list[int]) -> list[int]:
        """Token mode, outbound: the name P2 knows each token by (its position in π_c)."""
        return self._index["pi_c.inverse"][torch.as_tensor(ids, dtype=torch.long)].tolist()

    def restore_ids(self, ids: list[int]) -> list[int]:
        """Token mode, inbound: the real token behind each id P2 returns."""
        return self._index["pi_c"][torch.as_tensor(ids, dtype=torch.long)].tolist()

    def permuted_embeddings(self, *args, **kwargs) -> torch.Tensor:
        """Embed locally (text: token ids; images: pixel values), then permute by π."""
        return permute(self.embedder(*args, **kwargs), self._index["pi"])

    def unpermute_outputs(self, outputs: dict) -> dict:
        """Restore the server's permuted outputs: hidden states by π, pooled output and
        logits by π_c. Anything else (e.g. a KV cache handle) is returned as it is."""
        restored = {}
        for name, value in outputs.items():
            which = OUTPUT_PERMUTATION.get(name)
            restored[name] = value if which is None or value is None else permute(value, self._index[which + ".inverse"])
        return restored

    def manifest(self) -> dict:
        c = self.config
        tokens = self.mode == TOKENS
        return {
            "format": FORMAT,
            "model_type": c.model_type,
            "architecture": self.key.model.get("architecture"),
            "fingerprint": self.key.fingerprint,
            "mode": self.mode,
            "modality": embed_.TEXT if tokens else self.embedder.modality,
            "hidden_size": None if tokens else len(self.key.pi),
            "output_size": len(self.key.pi_c),
            "embedding_tensors": {n: list(t.shape) for n, t in sorted(self.tensors.items())},
            "preprocessing": sorted(self.preprocessing),
        }

    def save(self, folder: str | Path, preprocessing: list[str] | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if preprocessing is not None:
            self.preprocessing = list(preprocessing)
        self.config.save_pretrained(folder)
        if self.mode == EMBEDDINGS:
            save_file({n: t.contiguous() for n, t in self.tensors.items()}, folder / TENSORS, metadata={"format": "pt"})
        self.key.save(folder / KEY)
        (folder / MANIFEST).write_text(json.dumps(self.manifest(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ClientBundle":
        import transformers
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise InvalidBundle(f"{folder} is not a stip client folder (no {MANIFEST})") from None
        except json.JSONDecodeError as e:
            raise InvalidBundle(f"{folder / MANIFEST} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise InvalidBundle(f"{folder / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        key = keys.load(folder / KEY)
        if not isinstance(key, ClientKey):
            raise InvalidKey(f"{folder / KEY} is a provider key; the client folder must hold only the client key")
        if key.fingerprint != manifest["fingerprint"]:
            raise InvalidBundle(
                f"{folder}: the key's fingerprint {key.fingerprint[:16]}… does not match the manifest's "
                f"{manifest['fingerprint'][:16]}…"
            )
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        mode = manifest.get("mode", EMBEDDINGS)
        tensors = load_file(folder / TENSORS) if mode == EMBEDDINGS else {}
        expected = {n: list(s) for n, s in manifest["embedding_tensors"].items()}
        found = {n: list(t.shape) for n, t in tensors.items()}
        if found != expected:
            raise InvalidBundle(f"{folder / TENSORS} does not hold the tensors its manifest lists")
        return cls(config=config, key=key, tensors=tensors, preprocessing=manifest.get("preprocessing", []), mode=mode)
