"""P2, the cloud: serve a sealed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, err, fail, listen, read_token, server_tls


@app.command()
def serve(
    server_dir: Path = typer.Argument(..., metavar="OUT/server", help="The sealed checkpoint folder (never client/ or provider/)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, help="Port to bind; 0 picks a free one (printed on stdout)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the bearer token clients must send."),
    max_batch: int = typer.Option(32, help="Largest batch accepted."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest sequence accepted (default: the model's position limit)."),
    max_body_mb: float = typer.Option(64.0, help="Largest request body, in MiB."),
    max_sessions: int = typer.Option(64, help="Generation sessions open at once."),
    session_idle: float = typer.Option(300.0, help="Seconds after which an idle session expires."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate (stip tls-cert makes one and prints its pin): HTTPS, TLS 1.3 only."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM key of --tls-cert."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain HTTP on a non-loopback address (tokens and activations in the clear)."),
) -> None:
    """Serve a sealed checkpoint (P2): permuted embeddings in, permuted outputs out.

    For a token-mode sealing of a chat model, serve OUT/server with vLLM instead
    (docs/deploy.md) and run `stip proxy` on the user's side."""
    from .. import tls
    from ..serve.app import Limits, create_app
    from ..serve.engine import NotSealed

    context = server_tls(host, tls_cert, tls_key, insecure)
    token = read_token(token_file)
    if token is None and not tls.is_loopback(host):
        err.print(f"[yellow]warning:[/] serving on {host} without --token-file: anyone who reaches it can query the model")
    limits = Limits(
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_batch=max_batch,
        max_tokens=max_tokens,
        max_sessions=max_sessions,
        session_idle_seconds=session_idle,
    )
    try:
        api = create_app(server_dir, token=token, limits=limits)
    except (NotSealed, OSError, ValueError) as e:
        fail(str(e))
    model = api.state.model
    listen(api, host, port, "serve", f"{type(model).__name__}, fingerprint {model.config.stip['fingerprint'][:16]}…", context)


@app.command("tls-cert")
def tls_cert_command(
    prefix: Path = typer.Argument(..., metavar="PREFIX", help="Writes PREFIX.crt and PREFIX.key (mode 0600)."),
    hosts: Optional[list[str]] = typer.Option(None, "--host", metavar="HOST", help="A name or address the certificate is for (repeat; default: localhost, 127.0.0.1, ::1). Only checked by clients that use --ca."),
    days: int = typer.Option(825, "--days", min=1, help="Validity."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing PREFIX.crt/PREFIX.key."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (pin, cert, key)."),
) -> None:
    """Make a self-signed TLS certificate for `stip serve`, `stip proxy` or `stip share-server`
    (--tls-cert/--tls-key) and print its pin, which clients give as --pin. The pin is public;
    the key never leaves the server."""
    import json

    from .. import tls

    cert, key = Path(f"{prefix}.crt"), Path(f"{prefix}.key")
    if not force and (cert.exists() or key.exists()):
        fail(f"{cert} or {key} exists: pass --force to replace it (clients pinning the old one will refuse the new one)")
    try:
        pin = tls.self_signed(cert, key, tuple(hosts) if hosts else ("localhost", "127.0.0.1", "::1"), days=days)
    except (OSError, ValueError) as e:
        fail(f"cannot write {cert}/{key}: {getattr(e, 'strerror', None) or e}")
    print(json.dumps({"pin": pin, "cert": str(cert), "key": str(key)}) if as_json else pin)
