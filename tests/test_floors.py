"""The floors of docs/architecture.md, read from the source: every import, at module level or
inside a function, resolved to the stip module it names."""

import ast
import builtins
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

MODELS = ("stip.models",)
CORE = ("stip.keys", "stip.seal", "stip.serve", "stip.client", "stip.wire")
ABOVE_CORE = ("stip.mpc", "stip.he", "stip.attacks", "stip.bench", "stip.cli", "stip.demo")
P2 = ("stip.serve", "stip.shares.server", "stip.shares.batch", "stip.shares.protocol", "stip.shares.ring")
P3 = ("stip.client", "stip.shares.client", "stip.shares.engine")
P3_AND_SEALER = (*P3, "stip.seal", "stip.keys")
P2_ONLY = ("stip.serve", "stip.shares.server", "stip.shares.batch")  # protocol and ring: both sides' frames


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _imports() -> dict[str, set[str]]:
    """module → the stip modules it imports."""
    out = {}
    for f in sorted((SRC / "stip").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        module = ".".join(parts[:-1] if is_package else parts)
        package = module if is_package else module.rpartition(".")[0]
        names = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.split(".")[0] == "stip"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "stip":
                    # `from .x import y`: y may be a submodule of x
                    names |= {base} | {f"{base}.{a.name}" for a in node.names}
        out[module] = names
    return out


def _broken(importer: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    known = set(IMPORTS)
    return sorted(f"{m} imports {n}" for m, names in IMPORTS.items() if _under(m, importer)
                  for n in names if n in known and _under(n, forbidden))  # fmt: skip


IMPORTS = _imports()


def test_the_source_tree_was_read():
    assert len(IMPORTS) > 50 and "stip.shares.server" in IMPORTS and "stip.wire" in IMPORTS["stip.shares.server"]


def test_models_is_the_ground_floor():
    above = tuple(m for m in IMPORTS if m not in ("stip", "stip.errors") and not _under(m, MODELS))
    assert _broken(MODELS, above) == []


def test_the_error_base_imports_nothing():
    assert IMPORTS["stip.errors"] == set()


def test_every_error_stip_defines_has_the_one_base():
    """A public exception class anywhere in stip derives from StipError (the CLI's one mapping);
    private ones (``_Gone``) are control flow, and a bench Skip is not an error."""
    builtin = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    orphans = []
    for f in sorted((SRC / "stip").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and node.name not in ("Skip", "StipError"):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                if bases & builtin and "StipError" not in bases and not bases - builtin:
                    orphans.append(f"{f.relative_to(SRC)}:{node.name}")
    assert orphans == []


def test_the_core_imports_no_baseline_attack_or_bench():
    assert _broken(CORE, ABOVE_CORE) == []


@pytest.mark.parametrize("p2", P2)
def test_p2_imports_nothing_of_p3_nor_the_sealer(p2):
    assert _broken((p2,), P3_AND_SEALER) == []


def test_p3_imports_nothing_of_p2():
    assert _broken(P3, P2_ONLY) == []


def test_a_share_servers_process_loads_no_p3_code():
    """The package's own __init__ resolves its names lazily: importing the server through it
    loads no client."""
    import subprocess
    import sys

    code = "import sys; from stip.shares import ShareServer; print(' '.join(m for m in sys.modules if m.startswith('stip')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert "stip.shares.server" in loaded and not [m for m in loaded if _under(m, P3_AND_SEALER)], loaded
