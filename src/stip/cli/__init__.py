"""The ``stip`` command line. Thin: parses arguments, calls the modules, reports.

One module per party or baseline: provider (seal, rekey, audit), cloud (serve), shares
(share-server), user (proxy, query, generate, demo), mpc, train, he, attack, bench. This module holds what they share."""

from __future__ import annotations

import os
from pathlib import Path

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer
from rich.console import Console

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


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as e:
        fail(f"cannot read token file {path}: {e.strerror or e}")
    if not token:
        fail(f"token file {path} is empty")
    return token


def listen(api, host: str, port: int, command: str, what: str) -> None:
    """Bind (port 0: a free one), print the ready line with the URL, serve until stopped."""
    import socket

    import uvicorn

    from ..serve.process import ready_line

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        fail(f"cannot bind {host}:{port}: {e.strerror or e}")
    sock.listen(128)
    print(f"{ready_line(command)}http://{host}:{sock.getsockname()[1]} ({what})", flush=True)
    uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False)).run(sockets=[sock])


EMBEDDED = ("minilm", "smollm2")


def embedded(path: Path | None) -> Path | None:
    """`minilm` and `smollm2` name the embedded models wherever a model folder is taken."""
    if path is None or str(path) not in EMBEDDED:
        return path
    from ..models import chat, default

    try:
        return default.path() if str(path) == "minilm" else chat.path(step=lambda msg: err.print(msg))
    except (RuntimeError, OSError) as e:
        fail(str(e))


from . import provider, cloud, shares, user, mpc, train, he, attack, bench  # noqa: E402,F401  (registers the commands)


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    app()
