"""P2, the cloud: serve a sealed checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, err, fail, listen, read_token


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
) -> None:
    """Serve a sealed checkpoint (P2): permuted embeddings in, permuted outputs out.

    For a token-mode sealing of a chat model, serve OUT/server with vLLM instead
    (docs/deploy.md) and run `stip proxy` on the user's side."""
    from ..serve.app import Limits, create_app
    from ..serve.engine import NotSealed

    token = read_token(token_file)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
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
    listen(api, host, port, "serve", f"{type(model).__name__}, fingerprint {model.config.stip['fingerprint'][:16]}…")
