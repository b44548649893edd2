"""The ``stip`` command line. Thin: parses arguments, calls the modules, reports.

One module per party or baseline: provider (seal, rekey, audit), cloud (serve, tls-cert), shares
(share-server), user (proxy, query, generate, demo), mpc, train, he, attack, bench. This module holds what they share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

# Nothing is ever fetched from a hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import typer
from rich.console import Console

if TYPE_CHECKING:
    from ..tls import Trust

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


def server_tls(host: str, cert: Path | None, key: Path | None, insecure: bool):
    """The TLS 1.3 context a server listens with; None (plain) only on loopback or --insecure."""
    from .. import tls

    if (cert is None) != (key is None):
        fail("give --tls-cert and --tls-key together")
    if cert is not None:
        try:
            return tls.server_context(cert, key)
        except ValueError as e:
            fail(str(e))
    if not tls.is_loopback(host):
        if not insecure:
            fail(f"binding {host} without TLS: give --tls-cert/--tls-key (stip tls-cert makes a pair), or --insecure on a network you trust")
        err.print(f"[yellow]warning:[/] --insecure: binding {host} without TLS; anyone on the path reads and alters the traffic")
    return None


def listen(api, host: str, port: int, command: str, what: str, context=None) -> None:
    """Bind (port 0: a free one), print the ready line with the URL, serve until stopped;
    over TLS when ``context`` (from `server_tls`) is given."""
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
    scheme = "https" if context is not None else "http"
    name = f"[{host}]" if ":" in host else host
    print(f"{ready_line(command)}{scheme}://{name}:{sock.getsockname()[1]} ({what})", flush=True)
    # stip's own context rather than uvicorn's ssl_* options: those cannot require TLS 1.3
    secure = {"ssl_context_factory": lambda *_: context} if context is not None else {}
    uvicorn.Server(uvicorn.Config(api, log_level="warning", access_log=False, **secure)).run(sockets=[sock])


def trusts(pin: str | None, ca: Path | None, parties: int = 1) -> list[Trust] | None:
    """`--pin`/`--ca` as one `tls.Trust` per peer: ``pin`` holds one pin per peer, comma-
    separated in the peers' order; ``ca`` applies to all. None when neither is given."""
    from .. import tls

    if pin is not None and ca is not None:
        fail("give --pin or --ca, not both")
    try:
        if ca is not None:
            return [tls.Trust(ca=ca)] * parties
        if pin is None:
            return None
        pins = [p.strip() for p in pin.split(",")]
        if len(pins) != parties:
            fail(f"--pin takes one pin per server, comma-separated in the order of --shares: {parties} expected, {len(pins)} given"
                 if parties > 1 else "--pin takes one pin (sha256:…, as stip tls-cert prints it)")  # fmt: skip
        return [tls.Trust(pin=p) for p in pins]
    except ValueError as e:
        fail(str(e))


def plain_warning(url: str, insecure: bool) -> None:
    """The CLI's warning for an explicit --insecure plain link (the refusal is the client's)."""
    from urllib.parse import urlsplit

    from .. import tls

    host = urlsplit(url).hostname
    if insecure and url.startswith("http://") and not tls.is_loopback(host):
        err.print(f"[yellow]warning:[/] --insecure: talking to {host} without TLS; anyone on the path reads and alters the traffic")


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
    """The console script: a `StipError` that a command lets through becomes its message and
    exit code 1; anything else is a bug and keeps its traceback."""
    import transformers

    from ..errors import StipError

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        app()
    except StipError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
