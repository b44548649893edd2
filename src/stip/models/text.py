"""Real English text that every Python install carries, so nothing is downloaded: the prose of
the language reference (``pydoc_data.topics``, 79 documents) and the standard library's
docstrings.

    sentences()          # every clean sentence, topics first, in a fixed order
    sentences(seed=0)    # the same, shuffled reproducibly
"""

from __future__ import annotations

import ast
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

# A sentence a person could have typed: no code, markup or elisions, of chat-message length.
_CODE = re.compile(r"[<>{}\[\]=_*|\\`#~^@$]|\.\.\.|::|\s-\s|https?:|\w\.\w+\(")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _clean(text: str) -> list[str]:
    return [s for s in _SPLIT.split(re.sub(r"\s+", " ", text).strip())
            if 40 <= len(s) <= 200 and s[0].isupper() and s[-1] in ".?!" and not _CODE.search(s)]


def _docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if any(p in f.parts for p in ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo")):
            continue
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
    for text in [topics[k] for k in sorted(topics)] + _docstrings():
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
