"""P1, the model provider: seal a model, re-key a sealing, audit one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import app, embedded, err, fail, out


@app.command()
def seal(
    src: Optional[Path] = typer.Argument(None, help="Local Hugging Face model folder (config.json + weights), or minilm / smollm2."),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder to write server/, client/ and provider/ into."),
    default: Optional[Path] = typer.Option(None, "--default", metavar="OUT", help="Seal the embedded default model (all-MiniLM-L6-v2) into OUT."),
    chat: Optional[Path] = typer.Option(None, "--chat", metavar="OUT", help="Seal the embedded chat model (SmolLM2-135M-Instruct) into OUT; token mode unless --mode says otherwise."),
    mode: Optional[str] = typer.Option(None, "--mode", help="embeddings (default: P3 embeds, sends rows permuted by π) or tokens (causal LMs: P2 embeds ids renamed by π_c, so vLLM can serve it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty OUT."),
    public_base: Optional[Path] = typer.Option(None, "--public-base", metavar="DIR", help="A public checkpoint this model derives from: warn if the cloud could use it to attack (docs/threat-model.md)."),
) -> None:
    """Draw a secret key and seal a model (P1).

    Writes OUT/server (a plain HF checkpoint for the cloud, no secrets), OUT/client (what the
    user needs: tokenizer or image processor, embedding weights, π and π_c) and OUT/provider
    (the full key, keep it private). Prints the key fingerprint.
    """
    from ..client.bundle import MODES, TOKENS
    from ..models import chat as chat_model
    from ..models import default as default_model
    from ..seal import EMBEDDINGS, UnsupportedModel, seal_folder

    if mode is not None and mode not in MODES:
        fail(f"--mode is one of {', '.join(MODES)}, not {mode!r}")
    src = embedded(src)
    given = [x for x in (default, chat) if x is not None]
    if len(given) > 1 or (given and (src is not None or out_dir is not None)):
        fail("give one of SRC OUT, --default OUT or --chat OUT")
    if default is not None:
        src, out_dir = default_model.path(), default
    elif chat is not None:
        try:
            with err.status("preparing the chat model (converted from GGUF once, ~40 s) …"):
                src, out_dir = chat_model.path(), chat
        except (RuntimeError, OSError) as e:
            fail(str(e))
        mode = mode or TOKENS
    elif src is None or out_dir is None:
        fail("usage: stip seal SRC OUT  |  stip seal --default OUT  |  stip seal --chat OUT")

    try:
        if public_base is not None:
            _warn_public_base(src, public_base)
        from transformers import AutoConfig

        if not (src / "config.json").is_file():
            raise FileNotFoundError(f"{src} is not a local Hugging Face model folder (no config.json)")
        cfg = AutoConfig.from_pretrained(src, local_files_only=True)
        steps = (getattr(cfg, "num_hidden_layers", None) or sum(getattr(cfg, "depths", None) or [0])) + 3
        columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task(f"sealing {src.name}", total=steps)

            def step(what: str) -> None:
                progress.update(task, advance=1, description=f"sealing: {what}")

            sealed = seal_folder(src, out_dir, mode=mode or EMBEDDINGS, step=step, force=force)
    except (FileNotFoundError, FileExistsError, UnsupportedModel, ValueError, OSError) as e:
        fail(str(e))
    out.print(f"sealed [bold]{sealed.key.model['architecture']}[/] into {out_dir} ({sealed.client.mode} mode)")
    out.print("  server/   → the cloud (P2)\n  client/   → the user (P3), out of band\n  provider/ → keep private")
    out.print(f"fingerprint {sealed.key.fingerprint}")


def _warn_public_base(src: Path, base: Path) -> None:
    from ..attacks import exposure
    from ..models.source import load_source

    report = exposure.compare(load_source(src), load_source(base))
    found = exposure.warnings(report)
    for w in found:
        err.print(f"[bold red]WARNING — STIP does not protect this deployment:[/] {w}", highlight=False, soft_wrap=True)
    if found:
        err.print("[bold red]Mitigations:[/] keep the embedding table private (fine-tune or re-initialise it) and the "
                  "weights far from the public base; see docs/threat-model.md.")
    else:
        err.print(f"checked against {base}: {len(report['identical'])} identical and {len(report['near'])} near tensors, "
                  "embedding table not public")


@app.command()
def rekey(
    sealed_dir: Path = typer.Argument(..., metavar="OUT", help="A folder written by `stip seal` (with provider/)."),
    new_dir: Path = typer.Argument(..., metavar="NEW", help="Folder for the re-keyed server/, client/ and provider/."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty NEW."),
) -> None:
    """Re-key a sealed model from its provider key alone (P1): a fresh key composed with the old
    one, for key rotation or one key per user. The old client key no longer decrypts anything."""
    from ..keys import InvalidKey
    from ..seal import rekey as run_rekey
    from ..serve.engine import NotSealed

    try:
        with err.status(f"re-keying {sealed_dir} …"):
            sealed = run_rekey(sealed_dir, new_dir, force=force)
    except (FileNotFoundError, FileExistsError, InvalidKey, NotSealed, ValueError, OSError) as e:
        fail(str(e))
    out.print(f"re-keyed into {new_dir}; fingerprint {sealed.key.fingerprint}")


@app.command()
def audit(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="A folder written by `stip seal`."),
    original: Optional[Path] = typer.Option(None, "--original", metavar="SRC", help="The unsealed model folder: also check that no server tensor equals its original."),
) -> None:
    """Check a sealing for leaks: permutations on the server, layer weights on the client,
    embedding tables on the server, unsealed tensors. Exits 1 naming each violation."""
    from ..audit import audit as run_audit

    if not out_dir.is_dir():
        fail(f"{out_dir} is not a folder")
    try:
        violations = run_audit(out_dir, original)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    if violations:
        for v in violations:
            err.print(f"[bold red]VIOLATION[/] {v}", highlight=False, soft_wrap=True)
        err.print(f"audit failed: {len(violations)} violation(s) in {out_dir}")
        raise typer.Exit(1)
    checked = "server/, client/, provider/" + (f", against {original}" if original else "")
    out.print(f"[green]audit passed[/]: {checked}")
