"""Shares mode's server: S1 or S2 (P3's side is `stip proxy/query/generate --shares`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, embedded, err, fail, read_token, server_tls


@app.command("share-server")
def share_server(
    model: Path = typer.Argument(..., metavar="SRC", help="The public model: a local HF folder, or minilm / smollm2 (the embedded models)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(7001, help="Port to bind; 0 picks a free one (printed on stdout)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File holding the token P3 must present in its hello."),
    tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="PEM certificate (stip tls-cert makes one and prints its pin): TLS 1.3 on every connection."),
    tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="PEM key of --tls-cert."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow plain TCP on a non-loopback address (anyone on both links could add the shares)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="BLAS threads for the matmuls (default: all cores; give 1 when both servers share one machine's cores)."),
    limbs: int = typer.Option(2, "--limbs", min=2, max=3, help="Float64 GEMMs per matmul. 2: the low limb's sums round (by less than rounding the input to fixed point already costs); 3: exact mod 2^64, half as much work again. Same answers to P3 either way; the two servers may differ."),
    max_connections: int = typer.Option(256, "--max-connections", min=1, help="Connections open at once; more are closed on accept."),
    max_rows: int = typer.Option(16384, "--max-rows", min=1, help="Rows (token positions) per matmul request."),
    idle_seconds: float = typer.Option(900.0, "--idle-seconds", min=1.0, help="Close an authenticated connection idle this long."),
    hello_seconds: float = typer.Option(10.0, "--hello-seconds", min=0.1, help="From accept to a good hello (TLS handshake included); a connection without one is closed."),
    drain_seconds: float = typer.Option(30.0, "--drain-seconds", min=0.0, help="On SIGTERM, wait this long for requests in flight."),
    batch_window_ms: float = typer.Option(20.0, "--batch-window-ms", min=0.0, max=1000.0, help="Cross-user batching: after a GEMM, wait up to this long for its users' next requests, so that all users' requests for one matmul run as one GEMM (a lone user never waits; 0: stack only what is already waiting)."),
    no_batch: bool = typer.Option(False, "--no-batch", help="Answer each request on its own connection's thread, one GEMM each (the unbatched baseline)."),
    byte_counts: Optional[Path] = typer.Option(None, "--byte-counts", metavar="FILE", help="On exit, write how often each byte value occurred at each byte position of every share received (JSON, 16 KiB): the server's whole view, for the uniformity test (stip.attacks.shares.uniformity_of_counts)."),
) -> None:
    """Serve a public model's weight matmuls on additive shares (shares mode: run two, on
    parties that do not collude). The server sees uniform ring elements, never an activation.
    It holds the matmuls of both schedules, 2 round trips per layer (block weights with the
    norms folded in) and 4, and P3 picks one per connection (--rounds).

    One persistent connection per user, TLS 1.3 with --tls-cert/--tls-key (P3 pins the
    certificate or checks it against a CA). Stateless: a restart or another replica of the same
    party loses nothing, P3 reconnects and re-sends. SIGTERM answers what is in flight, then exits.
    Requests for the same matmul from many users run as one GEMM, each user getting its own rows."""
    import logging
    import signal
    import threading
    import time

    from ..serve.process import ready_line
    from ..shares import ShareServer
    from ..shares.server import ByteCounts, Limits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = embedded(model)
    token = read_token(token_file)
    context = server_tls(host, tls_cert, tls_key, insecure)
    if threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    t0 = time.perf_counter()
    limits = Limits(connections=max_connections, max_rows=max_rows, idle_seconds=idle_seconds, hello_seconds=hello_seconds)
    try:
        window = None if no_batch else batch_window_ms / 1e3
        counts = ByteCounts() if byte_counts is not None else None
        server = ShareServer.load(model, limbs=limbs, token=token, limits=limits, batch_window=window, observe=counts)
    except (OSError, ValueError) as e:
        fail(str(e))
    try:
        bound = server.listen(host, port, tls=context)
    except OSError as e:
        fail(f"cannot bind {host}:{port}: {e.strerror or e}")
    batching = "no batching" if no_batch else f"batching within {batch_window_ms:g} ms"
    err.print(f"loaded {server.model}: {len(server.ops)} matmuls, {limbs} limbs, {batching}, in {time.perf_counter() - t0:.1f} s")
    scheme = "tls" if context is not None else "tcp"
    print(f"{ready_line('share-server')}{scheme}://{bound.address} ({server.model})", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    done = bound.drain(drain_seconds)
    err.print("drained: every request in flight answered" if done else f"stopped with {bound.connections} requests unanswered after {drain_seconds:.0f} s")
    bound.close()  # the batching summary goes to the log
    if counts is not None:
        counts.write(byte_counts)
        err.print(f"byte counts of {counts.elements:,} ring elements received: {byte_counts}")
