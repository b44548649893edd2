"""Training runs and files: `stip train polyformer` for the ViT (digits) and the LM (CPython's
docs, with its BPE tokenizer), held-out prompts, next-token perplexity, and the model files."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .fit import to_polynomial
from .model import PRESETS, Act, PolyConfig, PolyLM, PolyViT, _Polynomial, perplexity, training_loss

KIND = "stip-polyformer"  # the metadata key of its model files


def train_polyformer(out, preset: str = "digits", dataset: str = "digits", data_dir=None, epochs: int = 40, degree: int = 4,
                     method: str = "lsq", lr: float = 2e-3, seed: int = 0, tick=None, force: bool = False) -> dict:
    """Train (resumable, like `stip train mpcvit`), swap in polynomials, write OUT/model.safetensors
    and OUT/summary.json with the accuracy before and after the swap."""
    import json
    from pathlib import Path

    from .. import data
    from ..train import Schedule, accuracy, fit, open_run

    if preset not in PRESETS or PRESETS[preset].task != "image":
        raise ValueError(f"unknown image preset {preset!r} (choose from {', '.join(k for k, c in PRESETS.items() if c.task == 'image')}; "
                         "--task lm for a language model)")
    out = Path(out)
    train, test = data.load(dataset, data_dir, seed=seed)
    cfg = replace(PRESETS[preset], classes=train.classes, channels=train.images.shape[1], image_size=train.images.shape[-1])
    open_run(out, {"preset": preset, "dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "epochs": epochs,
                   "degree": degree, "method": method, "lr": lr, "seed": seed}, force=force)
    torch.manual_seed(seed)
    model = PolyViT(cfg)
    fit(model, "train", train, Schedule(epochs, lr, 64, seed=seed), training_loss(), out, tick, augment=data.augmentation(dataset))
    summary = {"config": cfg.to_json(), "twin_accuracy": accuracy(model, test)}
    summary["fit"] = to_polynomial(model, train.images, degree, method)
    summary["polynomial_accuracy"] = accuracy(model, test)
    save(model, out / "model.safetensors", {"dataset": dataset, "data_dir": str(data_dir) if data_dir else None, "seed": seed})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_polylm(out, preset: str = "lm", data_dir=None, epochs: int = 8, degree: int = 4, method: str = "lsq",
                 lr: float = 2e-3, seed: int = 0, vocab: int | None = None, tick=None, force: bool = False) -> dict:
    """The LM half: a BPE tokenizer trained on the corpus's training split (``stip.models.text``:
    CPython's own prose and docstrings, or a local folder such as WikiText's), then the
    softmax/LayerNorm/GELU twin and the polynomial-ready LM of the same size, each trained on
    next-token prediction (resumable). The polynomials are swapped in, and validation and test
    perplexity are reported for the twin, the LM before the swap and after it. Writes
    OUT/model.safetensors (the polynomial LM), OUT/twin.safetensors, OUT/tokenizer.json and
    OUT/summary.json."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    from .. import text
    from ..data import Split
    from ..train import Schedule, fit, open_run

    if preset not in PRESETS or PRESETS[preset].task != "lm":
        raise ValueError(f"unknown LM preset {preset!r} (choose from {', '.join(k for k, c in PRESETS.items() if c.task == 'lm')})")
    out = Path(out)
    base = PRESETS[preset]
    vocab = vocab or base.vocab
    open_run(out, {"task": "lm", "preset": preset, "data_dir": str(data_dir) if data_dir else None, "epochs": epochs, "degree": degree,
                   "method": method, "lr": lr, "seed": seed, "vocab": vocab}, force=force)  # fmt: skip
    docs = text.corpus(data_dir, seed=seed)
    tok_path = out / "tokenizer.json"
    if tok_path.exists() and not force:
        tok = Tokenizer.from_file(str(tok_path))
    else:
        tok = text.train_bpe(docs["train"], vocab)
        tok.save(str(tok_path))
    windows = {k: text.windows(tok, v, base.context) for k, v in docs.items()}
    cfg = replace(base, vocab=tok.get_vocab_size())
    train = Split(windows["train"][:, :-1], windows["train"][:, 1:], cfg.vocab)
    summary: dict = {"config": cfg.to_json(), "corpus": {k: {"documents": len(docs[k]), "tokens": int(windows[k].numel() - len(windows[k]))}
                                                        for k in text.SPLITS}}  # fmt: skip
    ppl = lambda m: {k: perplexity(m, windows[k]) for k in ("valid", "test")}  # noqa: E731
    models = {}
    # α = 1: at the ViT's 1e-2 the MLP's inputs spread to ±10.7 and the degree-4 swap took the
    # validation perplexity from 203 to 390; at 1, ±6.8 and 199 → 248 (dim 32, 6 epochs; docs/he.md)
    for stage, c in (("twin", replace(cfg, attention="softmax", norm="layer")), ("train", cfg)):
        torch.manual_seed(seed)
        models[stage] = PolyLM(c)
        fit(models[stage], stage, train, Schedule(epochs, lr, 64, seed=seed), training_loss(alpha=1.0), out, tick)
    twin, model = models["twin"], models["train"]
    summary["twin_perplexity"], summary["gelu_perplexity"] = ppl(twin), ppl(model)
    summary["fit"] = to_polynomial(model, train.images[: 4096], degree, method)
    summary["polynomial_perplexity"] = ppl(model)
    extra = {"data_dir": str(data_dir) if data_dir else None, "seed": seed, "tokenizer": "tokenizer.json"}
    save(model, out / "model.safetensors", extra)
    save(twin, out / "twin.safetensors", extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def held_out(path, count: int, tokens: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``count`` prompts of ``tokens`` ids from an LM folder's held-out split (its own
    tokenizer and corpus), and each prompt's next token: (count, tokens), (count,)."""
    from tokenizers import Tokenizer

    from .. import checkpoint, text

    file = checkpoint.resolve(path)
    meta = checkpoint.info(file, KIND)
    if meta is None or meta["config"].get("task") != "lm":
        raise ValueError(f"{file} is not a polynomial LM written by `stip train polyformer --task lm`")
    tok_path = file.parent / meta.get("tokenizer", "tokenizer.json")
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found: the LM's tokenizer lives beside its model")
    docs = text.corpus(meta.get("data_dir"), seed=meta.get("seed", 0))[split]
    w = text.windows(Tokenizer.from_file(str(tok_path)), docs, tokens)
    if len(w) < count:
        raise ValueError(f"the {split} split holds {len(w)} prompts of {tokens} tokens, not {count}")
    return w[:count, :-1].numpy(), w[:count, -1].numpy()


def next_token_perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(mean cross-entropy) of (N, vocab) logits against (N,) next tokens."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return float(np.exp((lse - logits[np.arange(len(targets)), targets]).mean()))


def save(model: _Polynomial, path, extra: dict | None = None) -> None:
    from .. import checkpoint

    checkpoint.save(model.state_dict(), path, KIND, model.cfg.to_json(), extra)


def is_checkpoint(path) -> bool:
    """True for a file (or a `stip train polyformer` folder's model) that ``load`` reads."""
    from .. import checkpoint

    return checkpoint.info(path, KIND) is not None


def load(path) -> tuple[_Polynomial, dict]:
    """A file written by ``save``, or the model of a `stip train polyformer` folder."""
    from .. import checkpoint

    state, info = checkpoint.load(path, KIND, "a polynomial ViT", "train one with `stip train polyformer OUT`")
    cfg = PolyConfig(**info.pop("config"))
    model = (PolyLM if cfg.task == "lm" else PolyViT)(cfg)
    for name, m in model.named_modules():
        if isinstance(m, Act):
            m.coeffs = torch.zeros_like(state[f"{name}.coeffs"])  # size the buffers before loading
    model.load_state_dict(state)
    return model.eval(), info
