"""The ``stip`` command line. Thin: parses arguments, calls the modules, reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Secure transformer inference. P1 seals a model (seal, audit); P2 serves it; P3 queries it.",
)
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def seal(
    src: Optional[Path] = typer.Argument(None, help="Local Hugging Face model folder (config.json + weights)."),
    out_dir: Optional[Path] = typer.Argument(None, metavar="OUT", help="Folder to write server/, client/ and provider/ into."),
    default: Optional[Path] = typer.Option(None, "--default", metavar="OUT", help="Seal the embedded default model (all-MiniLM-L6-v2) into OUT."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty OUT."),
) -> None:
    """Draw a secret key and seal a model (P1).

    Writes OUT/server (a plain HF checkpoint for the cloud, no secrets), OUT/client (what the
    user needs: tokenizer or image processor, embedding weights, π and π_c) and OUT/provider
    (the full key, keep it private). Prints the key fingerprint.
    """
    from .models import default as default_model
    from .seal import UnsupportedModel, seal_folder

    if default is not None:
        if src is not None or out_dir is not None:
            fail("give either SRC OUT or --default OUT, not both")
        src, out_dir = default_model.path(), default
    elif src is None or out_dir is None:
        fail("usage: stip seal SRC OUT  |  stip seal --default OUT")

    try:
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

            sealed = seal_folder(src, out_dir, step=step, force=force)
    except (FileNotFoundError, FileExistsError, UnsupportedModel, ValueError, OSError) as e:
        fail(str(e))
    out.print(f"sealed [bold]{sealed.key.model['architecture']}[/] into {out_dir}")
    out.print(f"  server/   → the cloud (P2)\n  client/   → the user (P3), out of band\n  provider/ → keep private")
    out.print(f"fingerprint {sealed.key.fingerprint}")


@app.command()
def audit(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="A folder written by `stip seal`."),
    original: Optional[Path] = typer.Option(None, "--original", metavar="SRC", help="The unsealed model folder: also check that no server tensor equals its original."),
) -> None:
    """Check a sealing for leaks: permutations on the server, layer weights on the client,
    embedding tables on the server, unsealed tensors. Exits 1 naming each violation."""
    from .audit import audit as run_audit

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


@app.command()
def demo() -> None:
    """Seal the embedded MiniLM into a temporary folder, audit it, and check that the sealed
    checkpoint, loaded from disk and fed permuted embeddings, gives the plaintext sentence
    embeddings."""
    from .demo import run

    sys.exit(run(out, err))


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    app()


if __name__ == "__main__":
    main()
