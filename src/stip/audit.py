"""``stip audit OUT``: check the three folders of a sealing for what must not be there.

    server/    only config and weights; no permutation (as a tensor, a file or a config list);
               P3's embedding tables absent or all zero; with --original, no tensor left unsealed
    client/    only the manifest, config, embedding tensors, client key and preprocessing files;
               no transformer-layer weight; no per-layer permutation
    provider/  the full key
    all three  one key fingerprint; key files readable by their owner only (0600)

Every finding is a ``Violation`` naming the folder, the file and what is wrong.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import keys
from .client.bundle import CONFIG, EMBEDDINGS, KEY, MANIFEST, TENSORS, TOKENS, ClientBundle, InvalidBundle
from .keys import InvalidKey, Key
from .seal import CLIENT, KEY_FILE, PREPROCESSING_FILES, PROVIDER, SERVER, SERVER_META, base_prefix, family_of

SERVER_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class Violation:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def audit(out: str | Path, original: str | Path | None = None) -> list[Violation]:
    out = Path(out)
    found: list[Violation] = []
    for part in (SERVER, CLIENT, PROVIDER):
        if not (out / part).is_dir():
            found.append(Violation(f"{part}/", "folder is missing"))
    if found:
        return found

    provider_key = _provider(out / PROVIDER, found)
    client_fp = _client(out / CLIENT, found)
    server_fp, server_tensors, mode = _server(out / SERVER, found)

    fps = {"provider": provider_key.fingerprint if provider_key else None, "client": client_fp, "server": server_fp}
    known = {k: v for k, v in fps.items() if v}
    if len(set(known.values())) > 1:
        listing = ", ".join(f"{k} {v[:16]}…" for k, v in known.items())
        found.append(Violation("OUT", f"the three folders carry different key fingerprints ({listing})"))

    if original is not None and server_tensors is not None:
        _against_original(Path(original), server_tensors, provider_key, mode, found)
    return found


def _mode_is_private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def _provider(folder: Path, found: list[Violation]) -> Key | None:
    path = folder / KEY_FILE
    if not path.is_file():
        found.append(Violation(f"provider/{KEY_FILE}", "the provider key is missing"))
        return None
    if not _mode_is_private(path):
        found.append(Violation(f"provider/{KEY_FILE}", f"mode {oct(stat.S_IMODE(path.stat().st_mode))}: readable by others (must be 0600)"))
    try:
        key = keys.load(path)
    except InvalidKey as e:
        found.append(Violation(f"provider/{KEY_FILE}", str(e)))
        return None
    if not isinstance(key, Key):
        found.append(Violation(f"provider/{KEY_FILE}", "holds a client key, not the full provider key"))
        return None
    return key


def _client(folder: Path, found: list[Violation]) -> str | None:
    allowed = {MANIFEST, CONFIG, TENSORS, KEY, *PREPROCESSING_FILES}
    for f in sorted(folder.iterdir()):
        if f.name not in allowed:
            what = "weights" if f.suffix in (".safetensors", ".bin", ".pt", ".pth") else "file"
            found.append(Violation(f"client/{f.name}", f"unexpected {what}: the client folder holds only P3's share"))
    key_path = folder / KEY
    if key_path.is_file() and not _mode_is_private(key_path):
        found.append(Violation(f"client/{KEY}", f"mode {oct(stat.S_IMODE(key_path.stat().st_mode))}: readable by others (must be 0600)"))
    try:
        bundle = ClientBundle.load(folder)
    except (InvalidBundle, InvalidKey, OSError, ValueError) as e:
        found.append(Violation("client/", str(e)))
        return None
    if bundle.mode == TOKENS and (folder / TENSORS).exists():
        found.append(Violation(f"client/{TENSORS}", "a token-mode client holds no embedding table"))
    skeleton = _skeleton(bundle.config, bundle.key.model.get("architecture"))
    if skeleton is not None:
        prefix = base_prefix(skeleton)
        client_side = family_of(skeleton).client_side(skeleton) if bundle.mode == EMBEDDINGS else {}
        expected = {n.removeprefix(prefix) for n in client_side}
        for name in sorted(set(bundle.tensors) - expected):
            found.append(Violation(f"client/{TENSORS}", f"holds {name!r}, which is not an embedding weight (a transformer-layer weight must never reach P3)"))
    return bundle.fingerprint


def _server(folder: Path, found: list[Violation]):
    from safetensors import safe_open

    for f in sorted(folder.iterdir()):
        ok = f.name in SERVER_FILES or (f.suffix == ".safetensors" and f.name.startswith("model"))
        if not ok:
            found.append(Violation(f"server/{f.name}", "unexpected file: P2's folder holds only config and weights"))
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        found.append(Violation("server/config.json", f"unreadable ({e})"))
        return None, None, EMBEDDINGS
    meta = cfg.get(SERVER_META)
    fp = meta.get("fingerprint") if isinstance(meta, dict) else None
    mode = meta.get("mode", EMBEDDINGS) if isinstance(meta, dict) else EMBEDDINGS
    if fp is None:
        found.append(Violation("server/config.json", f"no '{SERVER_META}' entry: not a sealed checkpoint"))
    for where, value in _int_lists(cfg):
        if _is_permutation(np.asarray(value)):
            found.append(Violation("server/config.json", f"{where} is a permutation"))

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                tensors[name] = st.get_tensor(name)
    if not tensors:
        found.append(Violation("server/", "no safetensors weights"))
    for name, t in tensors.items():
        if not t.is_floating_point() and t.dim() == 1 and _is_permutation(t.numpy()):
            found.append(Violation(f"server/{name}", "is a permutation"))

    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    skeleton = _skeleton(config, (cfg.get("architectures") or [None])[0])
    if skeleton is not None and mode == EMBEDDINGS:  # in token mode P2 holds the sealed word table
        for name, how in family_of(skeleton).client_side(skeleton).items():
            t = tensors.get(name)
            if t is None:
                continue
            if how == "drop" or bool(t.abs().sum() != 0):
                found.append(Violation(f"server/{name}", "holds P3's embedding table (it must be absent, or all zeros where the model adds it)"))
    return fp, tensors, mode


def _skeleton(config, arch: str | None):
    """The architecture without weights, to ask its family what is client-side."""
    import transformers

    cls = getattr(transformers, arch or "", None)
    if cls is None:
        return None
    with torch.device("meta"):
        model = cls(config)
    try:
        family_of(model)
    except ValueError:
        return None
    return model


def _int_lists(obj, path="config"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _int_lists(v, f"{path}.{k}")
    elif isinstance(obj, list):
        if len(obj) >= 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in obj):
            yield path, obj
        else:
            for i, v in enumerate(obj):
                yield from _int_lists(v, f"{path}[{i}]")


def _is_permutation(a: np.ndarray) -> bool:
    n = a.size
    return a.ndim == 1 and n >= 2 and np.array_equal(np.sort(a), np.arange(n))


def _against_original(src: Path, server: dict[str, torch.Tensor], key: Key | None, mode: str, found: list[Violation]) -> None:
    """A server tensor equal to the original one was not sealed.

    Where the provider key is readable, a tensor counts only if sealing it with that key moves
    it: a per-head table of a 2-head layer whose head order came out unchanged is no finding.
    Without the key, constant or tiny tensors are passed over for the same reason.
    """
    from .seal import load_source, seal

    model = load_source(src)
    original = model.state_dict()
    expected = None
    if key is not None:
        try:
            expected = seal(model, key, mode=mode).server.state_dict()
        except (InvalidKey, ValueError) as e:
            found.append(Violation("provider/key.stip", f"does not belong to {src}: {e}"))
    for name, t in server.items():
        o = original.get(name)
        if o is None or o.shape != t.shape or not torch.equal(o, t):
            continue
        if expected is not None:
            moves = not torch.equal(expected[name], o)
        else:
            moves = o.numel() >= 8 and bool((o != o.flatten()[0]).any())
        if moves:
            found.append(Violation(f"server/{name}", "equals the original tensor: it was not sealed"))
