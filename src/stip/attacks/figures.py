"""The figures of docs/threat-model.md: each one an attack run on a sealing of the embedded
MiniLM or of a private variant of it, named by an id the document quotes.

    measure(tmp)                       every figure (5–8 minutes on 2 cores)
    measure(tmp, only={"vocab.public"})
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import scenario


class Sealings:
    """Sealed folders made on first use: the public MiniLM, its private variants, a second
    user's sealing and a re-keyed one."""

    def __init__(self, tmp: Path, src: Path):
        self.tmp, self.src, self._made = Path(tmp), Path(src), {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._made:
            from ..seal import rekey, seal_folder

            out = self.tmp / name
            if name in ("public", "user-b"):
                seal_folder(self.src, out)
            elif name == "rekeyed":
                rekey(self["public"], out)
            else:  # "reinit-embeddings", "reinit-all", "drift<scale>"
                kind, scale = ("drift", float(name[5:])) if name.startswith("drift") else (name, 1.0)
                seal_folder(scenario.private_variant(self.src, self.tmp / f"model-{name}", kind, scale), out)
            self._made[name] = out
        return self._made[name]


def _figures(layers=(1, 2)) -> list[tuple[str, str, Callable, str]]:
    """(id, the value's key in the attack's JSON, run(sealings, src), the command)."""
    v, w = scenario.vocab, scenario.weights
    out = [("vocab.public", "recovery_rate", lambda s, m: v(s["public"], m), "stip attack vocab --sealed PUBLIC --public MINILM")]
    out += [(f"vocab.public.layers{k}", "recovery_rate", lambda s, m, k=k: v(s["public"], m, layers=k),
             f"stip attack vocab --sealed PUBLIC --public MINILM --layers {k}") for k in layers]
    out += [
        ("weights.public", "recovery_rate", lambda s, m: w(s["public"], m), "stip attack weights --sealed PUBLIC --public MINILM"),
        ("weights.public.tokens", "tokens_decrypted", lambda s, m: w(s["public"], m), "stip attack weights --sealed PUBLIC --public MINILM"),
        ("known_plaintext.public", "recovery_rate", lambda s, m: scenario.known_plaintext(s["public"]), "stip attack known-plaintext --sealed PUBLIC"),
        ("known_plaintext.public.traffic", "traffic_rows_decrypted", lambda s, m: scenario.known_plaintext(s["public"]),
         "stip attack known-plaintext --sealed PUBLIC"),
        ("attention.public.auc", "auc", lambda s, m: scenario.attention(s["public"]), "stip attack attention --sealed PUBLIC"),
        ("attention.public.precision", "recovery_rate", lambda s, m: scenario.attention(s["public"]), "stip attack attention --sealed PUBLIC"),
        ("vocab.private_embeddings", "recovery_rate", lambda s, m: v(s["reinit-embeddings"], m),
         "stip attack vocab --sealed PRIVATE_EMBEDDINGS --public MINILM"),
        ("weights.private_embeddings", "recovery_rate", lambda s, m: w(s["reinit-embeddings"], m),
         "stip attack weights --sealed PRIVATE_EMBEDDINGS --public MINILM"),
        ("weights.private_all", "recovery_rate", lambda s, m: w(s["reinit-all"], m), "stip attack weights --sealed PRIVATE_ALL --public MINILM"),
        ("vocab.private_all", "recovery_rate", lambda s, m: v(s["reinit-all"], m), "stip attack vocab --sealed PRIVATE_ALL --public MINILM"),
    ]
    for scale in ("0.1", "0.3", "1.0"):
        out += [(f"weights.drift{scale}", "recovery_rate", lambda s, m, d=f"drift{scale}": w(s[d], m),
                 f"stip attack weights --sealed DRIFT_{scale} --public MINILM"),
                (f"vocab.drift{scale}", "recovery_rate", lambda s, m, d=f"drift{scale}": v(s[d], m),
                 f"stip attack vocab --sealed DRIFT_{scale} --public MINILM")]
    out += [
        ("per_user.other_user_traffic", "traffic_rows_decrypted", lambda s, m: scenario.cross_key(s["public"], s["user-b"]),
         "stip.attacks.scenario.cross_key(PUBLIC, USER_B)"),
        ("rekey.old_key_traffic", "traffic_rows_decrypted", lambda s, m: scenario.cross_key(s["public"], s["rekeyed"]),
         "stip rekey PUBLIC REKEYED; stip.attacks.scenario.cross_key(PUBLIC, REKEYED)"),
        ("rekey.vocab", "recovery_rate", lambda s, m: v(s["rekeyed"], m), "stip attack vocab --sealed REKEYED --public MINILM"),
        ("rekey.weights", "recovery_rate", lambda s, m: w(s["rekeyed"], m), "stip attack weights --sealed REKEYED --public MINILM"),
    ]
    return out


IDS = tuple(f[0] for f in _figures())


def measure(tmp: str | Path, only: set[str] | None = None, layers=(1, 2), log=lambda _fid, _fig: None) -> dict:
    """figure id → {value, n, seconds, command, result}. Runs each attack once even when
    several figures read it."""
    from ..models.default import path as minilm

    src = minilm()
    sealings, cache, out = Sealings(Path(tmp), src), {}, {}
    for fid, key, run, command in _figures(layers):
        if only is not None and fid not in only:
            continue
        t0 = time.perf_counter()
        if command not in cache:
            cache[command] = run(sealings, src).to_json()
        r = cache[command]
        out[fid] = {"value": r[key], "n": r["n"], "seconds": round(time.perf_counter() - t0, 1), "command": command, "result": r}
        log(fid, out[fid])
    return out


def documented(markdown: str) -> dict[str, float]:
    """The figures a document quotes, from its table rows ``| `id` | … | 12.3 % | …``."""
    import re

    found = {}
    for line in markdown.splitlines():
        m = re.match(r"\|\s*`([a-z0-9_.]+)`\s*\|[^|]*\|\s*([0-9.]+)\s*%\s*\|", line)
        if m:
            found[m.group(1)] = float(m.group(2)) / 100
    return found


def disagreements(markdown: str, measured: dict, tolerance: float = 0.05) -> list[str]:
    """Where a documented figure and its measurement differ by more than ``tolerance``."""
    doc = documented(markdown)
    return [f"{fid}: documented {100 * doc[fid]:.1f} %, measured {100 * m['value']:.1f} %"
            for fid, m in measured.items() if fid in doc and abs(doc[fid] - m["value"]) > tolerance]
