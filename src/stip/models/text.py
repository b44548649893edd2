"""Real English text that every Python install carries, so nothing is downloaded: the prose of
the language reference (``pydoc_data.topics``, 79 documents) and the standard library's
docstrings.

    sentences()          # every clean sentence, topics first, in a fixed order
    sentences(seed=0)    # the same, shuffled reproducibly
    corpus()             # {"train", "valid", "test"}: whole documents, a fixed split (or a local folder's)
    tokenizer = train_bpe(corpus()["train"], 4096)
    windows(tokenizer, corpus()["valid"], context=32)   # (N, 33) token ids for a language model
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

from ..errors import StipError

# A sentence a person could have typed: no code, markup or elisions, of chat-message length.
_CODE = re.compile(r"[<>{}\[\]=_*|\\`#~^@$]|\.\.\.|::|\s-\s|https?:|\w\.\w+\(")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean(text: str) -> list[str]:
    return [s for s in _SPLIT.split(re.sub(r"\s+", " ", text).strip())
            if 40 <= len(s) <= 200 and s[0].isupper() and s[-1] in ".?!" and not _CODE.search(s)]


@lru_cache(maxsize=1)
def _docstrings() -> tuple[str, ...]:
    """Every docstring of the standard library. Parsing it takes seconds, and every process
    that reads text would pay them: the result is kept in the cache folder, under a key of this
    install's version and its files' sizes and times."""
    from .chat import cache_root

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py"))
             if not any(p in f.parts for p in ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"))]  # fmt: skip
    stamp = [sys.version, str(root)] + [(str(f.relative_to(root)), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
    kept = cache_root() / "text" / f"docstrings-{hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]}.json"
    try:
        docs = json.loads(kept.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return tuple(docs)
    except (OSError, ValueError):
        pass
    out = _parse_docstrings(files)
    try:
        from .train import _atomic_write

        kept.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(kept, json.dumps(out).encode("utf-8"))
    except OSError:
        pass  # a read-only cache: parse every time
    return tuple(out)


def _parse_docstrings(files: list[Path]) -> list[str]:
    out = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


@lru_cache(maxsize=1)
def _all() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen, out = set(), []
    for text in [topics[k] for k in sorted(topics)] + list(_docstrings()):
        for s in _clean(text):
            if s not in seen:
                seen.add(s)
                out.append(s)
    return tuple(out)


def sentences(seed: int | None = None) -> list[str]:
    """Every clean sentence (a few thousand); shuffled by ``seed`` when given."""
    out = list(_all())
    if seed is not None:
        import numpy as np

        out = [out[i] for i in np.random.default_rng(seed).permutation(len(out))]
    return out


# --- a language-modelling corpus ----------------------------------------------------------------

SPLITS = ("train", "valid", "test")
EOT = "<|endoftext|>"  # between documents
_WIKITEXT = ("wiki.{}.tokens", "wiki.{}.raw")  # WikiText-2/103's file names (train, valid, test)


class CorpusMissing(StipError, FileNotFoundError):
    """A text folder with no text in it."""


def documents() -> list[str]:
    """The built-in corpus: the language reference's 79 documents, then every docstring of the
    standard library (about 2 MB of English, with code examples in it), whitespace collapsed,
    each distinct text once."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)] + list(_docstrings())
    unique = dict.fromkeys(re.sub(r"\s+", " ", d).strip() for d in docs)  # a docstring copied between modules counts once
    return [d for d in unique if len(d) >= 20]


def corpus(folder: str | Path | None = None, seed: int = 0, held_out: float = 0.05) -> dict[str, list[str]]:
    """Documents per split. Built in: ``documents()`` split by document, ``held_out`` each to
    valid and test (fixed by ``seed``). A folder: WikiText's own files when present
    (wiki.train.tokens … or wiki.train.raw …, one paragraph per line), otherwise every *.txt
    under it, one document per file, split like the built-in corpus."""
    if folder is None:
        return _split(documents(), seed, held_out)
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CorpusMissing(f"{root} is not a folder")
    for pattern in _WIKITEXT:
        files = [root / pattern.format(s) for s in SPLITS]
        if all(f.is_file() for f in files):
            return {s: [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()] for s, f in zip(SPLITS, files)}
    docs = [t for f in sorted(root.rglob("*.txt")) if (t := f.read_text(encoding="utf-8", errors="replace").strip())]
    if len(docs) < 3:
        raise CorpusMissing(f"{root} holds neither WikiText's wiki.{{train,valid,test}}.tokens nor three or more .txt files")
    return _split(docs, seed, held_out)


def _split(docs: list[str], seed: int, held_out: float) -> dict[str, list[str]]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(docs))
    k = max(1, round(held_out * len(docs)))
    pick = lambda idx: [docs[i] for i in sorted(idx)]  # noqa: E731
    return {"train": pick(order[2 * k :]), "valid": pick(order[:k]), "test": pick(order[k : 2 * k])}


def train_bpe(texts: list[str], vocab: int = 4096):
    """A byte-level BPE tokenizer (`tokenizers`) trained on ``texts``: every string encodes,
    nothing is unknown. Token 0 is EOT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return tok


def windows(tokenizer, texts: list[str], context: int):
    """The documents as one token stream (EOT between them), cut into non-overlapping windows
    of ``context`` + 1 ids: inputs are [:, :-1], next-token targets [:, 1:]."""
    import torch

    eot = tokenizer.token_to_id(EOT)
    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        stream += enc.ids + [eot]
    n = (len(stream) - 1) // context
    if n < 1:
        raise ValueError(f"{len(stream)} tokens make no window of {context} + 1")
    return torch.tensor(stream[: n * context + 1]).unfold(0, context + 1, context)  # neighbours share one id
