"""Shares mode's server: S1 or S2 (P3's side is `stip proxy/query/generate --shares`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, embedded, err, fail, read_token


@app.command("share-server")
def share_server(
    model: Path = typer.Argument(..., metavar="SRC", help="The public model: a local HF folder, or minilm / smollm2 (the embedded models)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7001, help="Port to bind; 0 picks a free one (printed on stdout)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the token P3 must present in its hello."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="BLAS threads for the matmuls (default: all cores; give 1 when both servers share one machine's cores)."),
    limbs: int = typer.Option(2, "--limbs", min=2, max=3, help="Float64 GEMMs per matmul. 2: the low limb's sums round (by less than rounding the input to fixed point already costs); 3: exact mod 2^64, half as much work again. Same answers to P3 either way; the two servers may differ."),
) -> None:
    """Serve a public model's weight matmuls on additive shares (shares mode: run two, on
    parties that do not collude). The server sees uniform ring elements, never an activation.

    One persistent TCP connection per user; no TLS here: across machines, carry the links in a
    tunnel (WireGuard, stunnel), since an eavesdropper on both links could add the shares."""
    import time

    from ..serve.process import ready_line
    from ..shares import ShareServer

    model = embedded(model)
    token = read_token(token_file)
    if threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] binding {host}: the shares travel in the clear; tunnel both links, or an eavesdropper on both can add them")
    t0 = time.perf_counter()
    try:
        server = ShareServer.load(model, limbs=limbs, token=token)
    except (OSError, ValueError) as e:
        fail(str(e))
    try:
        bound = server.listen(host, port)
    except OSError as e:
        fail(f"cannot bind {host}:{port}: {e.strerror or e}")
    err.print(f"loaded {server.model}: {len(server.ops)} matmuls, {limbs} limbs, in {time.perf_counter() - t0:.1f} s")
    print(f"{ready_line('share-server')}tcp://{bound.address} ({server.model})", flush=True)
    try:
        bound.thread.join()
    except KeyboardInterrupt:
        bound.close()
