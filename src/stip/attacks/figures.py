"""The figures of docs/threat-model.md: each one an attack run on a sealing of an embedded
model (MiniLM; SmolLM2 for the ids starting ``llm.``) or of a private variant of it, or on a
share server's view (SmolLM2, ids starting ``shares.``), named by an id the document quotes.

    measure(tmp)                       every figure (about 3 hours on 2 cores, 1.7 of them sampling)
    measure(tmp, only={"vocab.public"})
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from . import scenario


# Chat prompts for the LLM figures: written for them, in none of the attacks' built-in texts.
CHAT_PROMPTS = (
    "Can you draft a letter to my landlord, Mr. Patel, about the broken heating at 14 Elm Road?",
    "My daughter Emma has a peanut allergy; what should I pack for her school lunch on Monday?",
    "I owe 4,200 pounds on my Visa card and earn 1,900 a month. How fast can I pay it off?",
)
LLM_LAYERS = (0, 1, 2, 8, 29)
FINETUNE_STEPS = 200
SELF_GENERATE = (100, 1000, 10000)  # sequences P2 samples from its own checkpoint (64 ids each; 10,000: ~43 min a mode on 2 cores)


class Sealings:
    """Sealed folders made on first use, named ``[smollm2/]variant``: the public model, its
    private variants, a second user's sealing, a re-keyed one, and (SmolLM2) a token-mode one
    and a fine-tuned one."""

    def __init__(self, tmp: Path, sources: dict[str, Path]):
        self.tmp, self.sources, self._made = Path(tmp), sources, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self._made:
            from ..seal import rekey, seal_folder

            model, variant = name.split("/") if "/" in name else ("minilm", name)
            src, out = self.sources[model](), self.tmp / name
            if variant in ("public", "user-b"):
                seal_folder(src, out)
            elif variant == "tokens":
                seal_folder(src, out, mode="tokens")
            elif variant == "rekeyed":
                rekey(self["public"], out)
            else:  # "reinit-embeddings", "reinit-all", "drift<scale>", "finetune"
                kind, scale = ("drift", float(variant[5:])) if variant.startswith("drift") else (variant, 1.0)
                seal_folder(scenario.private_variant(src, self._model_dir(name), kind, scale, steps=FINETUNE_STEPS), out)
            self._made[name] = out
        return self._made[name]

    def model(self, name: str) -> Path:
        """A private variant's model folder (before sealing), made on first use."""
        self[name]
        return self._model_dir(name)

    def _model_dir(self, name: str) -> Path:
        return self.tmp / "models" / name


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
    return out + _llm_figures() + _shares_figures()


def _llm_figures() -> list[tuple[str, str, Callable, str]]:
    """SmolLM2-135M-Instruct (public): the causal attack at every depth, weight matching and
    drift, a real fine-tune, frequency analysis in both modes."""
    v, w = scenario.vocab, scenario.weights
    prompts = "--text PROMPT_1 --text PROMPT_2 --text PROMPT_3"
    out = [(f"llm.vocab.layers{k}", "recovery_rate", lambda s, m, k=k: v(s["smollm2/public"], m, CHAT_PROMPTS, layers=k),
            f"stip attack vocab --sealed LLM --public smollm2 --layers {k} {prompts}") for k in LLM_LAYERS]
    out += [
        ("llm.weights.public", "recovery_rate", lambda s, m: w(s["smollm2/public"], m), "stip attack weights --sealed LLM --public smollm2"),
        ("llm.weights.public.tensors", "tensors_unsealed_rate", lambda s, m: w(s["smollm2/public"], m),
         "stip attack weights --sealed LLM --public smollm2"),
        ("llm.weights.public.tokens", "tokens_decrypted", lambda s, m: w(s["smollm2/public"], m), "stip attack weights --sealed LLM --public smollm2"),
    ]
    for scale in ("0.1", "0.3", "1.0"):
        d = f"smollm2/drift{scale}"
        out += [(f"llm.weights.drift{scale}", "recovery_rate", lambda s, m, d=d: w(s[d], m),
                 f"stip attack weights --sealed LLM_DRIFT_{scale} --public smollm2"),
                (f"llm.weights.drift{scale}.tokens", "tokens_decrypted", lambda s, m, d=d: w(s[d], m),
                 f"stip attack weights --sealed LLM_DRIFT_{scale} --public smollm2"),
                (f"llm.vocab.drift{scale}", "recovery_rate", lambda s, m, d=d: v(s[d], m, CHAT_PROMPTS),
                 f"stip attack vocab --sealed LLM_DRIFT_{scale} --public smollm2 {prompts}")]
    ft = "smollm2/finetune"
    out += [
        ("llm.finetune.drift", "drift", lambda s, m: scenario.drift(s.model(ft), m), "stip.attacks.scenario.drift(FINETUNED_MODEL, smollm2)"),
        ("llm.weights.finetune", "recovery_rate", lambda s, m: w(s[ft], m), "stip attack weights --sealed LLM_FINETUNED --public smollm2"),
        ("llm.weights.finetune.tokens", "tokens_decrypted", lambda s, m: w(s[ft], m), "stip attack weights --sealed LLM_FINETUNED --public smollm2"),
        ("llm.vocab.finetune", "recovery_rate", lambda s, m: v(s[ft], m, CHAT_PROMPTS),
         f"stip attack vocab --sealed LLM_FINETUNED --public smollm2 {prompts}"),
    ]
    for mode, sealing in (("tokens", "smollm2/tokens"), ("embeddings", "smollm2/public")):
        name = "LLM_TOKENS" if mode == "tokens" else "LLM"
        out += [(f"llm.frequency.{mode}.requests{n}", f"requests{n}", lambda s, m, x=sealing: scenario.frequency(s[x], m),
                 f"stip attack frequency --sealed {name} --public smollm2") for n in (10, 100, 1000)]
        counts = ",".join(map(str, SELF_GENERATE))
        self_run = lambda s, m, x=sealing: scenario.frequency(s[x], m, requests=(100,), reference_requests=0, self_generate=SELF_GENERATE)  # noqa: E731
        out += [(f"llm.frequency.{mode}.self{n}{stage}", f"self{n}{stage}", self_run,
                 f"stip attack frequency --sealed {name} --public smollm2 --requests 100 --reference 0 --self-generate {counts}")
                for n in SELF_GENERATE for stage in ("", ".unigram")]  # fmt: skip
    return out


def _shares_figures() -> list[tuple[str, str, Callable, str]]:
    """Shares mode on SmolLM2 (public weights): every attack on each server's view, on fresh
    noise (chance) and on the unmasked activations (the attack working); byte uniformity."""
    command = "stip attack shares --public smollm2 --text PROMPT_1 --text PROMPT_2 --text PROMPT_3"
    run = lambda s, m: scenario.shares(m, CHAT_PROMPTS)  # noqa: E731
    out = []
    for attack in ("vocab.input", "vocab.layers1", "vocab.layers2", "frequency"):
        out += [(f"shares.{attack}.{view}", f"{attack}.{view}", run, command) for view in ("s1", "s2", "noise", "unmasked")]
    out += [(f"shares.uniform.{view}", f"uniform.{view}", run, command) for view in ("s1", "s2", "unmasked")]
    return out


IDS = tuple(f[0] for f in _figures())


def measure(tmp: str | Path, only: set[str] | None = None, layers=(1, 2), log=lambda _fid, _fig: None) -> dict:
    """figure id → {value, n, seconds, command, result}. Runs each attack once even when
    several figures read it."""
    from ..models import chat, default

    sources = {"minilm": default.path, "smollm2": chat.path}
    sealings, cache, out = Sealings(Path(tmp), sources), {}, {}
    for fid, key, run, command in _figures(layers):
        if only is not None and fid not in only:
            continue
        t0 = time.perf_counter()
        if command not in cache:
            cache[command] = run(sealings, sources["smollm2" if fid.startswith(("llm.", "shares.")) else "minilm"]()).to_json()
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
