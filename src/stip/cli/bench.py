"""Every protection mode side by side on one model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from . import app, embedded, err, fail, out


@app.command()
def bench(
    model: Optional[Path] = typer.Option(None, "--model", metavar="SRC", help="Local HF model folder, a `stip train polyformer` folder, or minilm / smollm2 (the embedded models; default: minilm)."),
    tokens: int = typer.Option(32, "--tokens", min=1, help="Input length for text models (image models: fixed by the image size)."),
    modes: str = typer.Option(",".join(("plain", "stip", "shares", "mpc-semi2k", "mpc-cheetah", "he")), "--modes", help="Comma-separated: plain, stip, shares, mpc-semi2k, mpc-cheetah, he."),
    network: str = typer.Option("none", "--network", help="none | lan | wan: add the network time per mode, estimated, and measured through relays that emulate it (shares, STIP)."),
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="Writes DIR/results.json, DIR/report.md, DIR/latency.png, DIR/bytes.png."),
    full: bool = typer.Option(False, "--full", help="MPC on every layer (default: CHEETAH on 1 layer, so the run ends in minutes)."),
    mpc_layers: Optional[int] = typer.Option(None, "--mpc-layers", min=1, help="Layers for both MPC protocols (overrides the default and --full)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed runs of plaintext and STIP (alternating)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Inputs per inference (images for HE: one batch in the slots)."),
    shares_limbs: int = typer.Option(2, "--shares-limbs", min=2, max=3, help="stip share-server --limbs: 2 (default) or 3, exact mod 2^64 at 1.5× the servers' work."),
    shares_rounds: int = typer.Option(2, "--shares-rounds", min=2, max=4, help="Shares mode's schedule: 2 round trips per layer (default) or 4."),
    readme: Optional[Path] = typer.Option(None, "--readme", metavar="FILE", help="Also put the table into FILE between `<!-- stip bench: NAME -->` markers."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json's object on stdout."),
) -> None:
    """Every protection mode on one model and one input in one run: latency, bytes up and down,
    rounds, max error and top-1 agreement against plaintext, ratio to plaintext; with the
    published figures beside them, marked as reported, not re-run."""
    import json
    import shlex
    import time

    from ..bench import Settings, report, run

    model = embedded(model)
    try:
        settings = Settings(model=model, out=out_dir, tokens=tokens, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                            network=network, full=full, repeats=repeats, batch=batch, mpc_layers=mpc_layers,
                            shares_limbs=shares_limbs, shares_rounds=shares_rounds)
    except ValueError as e:
        fail(str(e))
    t0 = time.perf_counter()
    try:
        with err.status("stip bench …") as status:
            results = run(settings, progress=lambda msg: (status.update(f"stip bench: {msg}"), err.log(msg)))
    except (FileNotFoundError, ValueError, OSError) as e:
        fail(str(e))
    results["command"] = "stip bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "stip bench"
    results["seconds"] = time.perf_counter() - t0
    results["machine"] = report.machine()
    report.write(results, out_dir)
    if readme is not None:
        report.update_readme(readme, results)
    if as_json:
        print(json.dumps(results))
        return
    out.print(report.table(results), highlight=False, soft_wrap=True)
    out.print(f"wrote {out_dir}/results.json, report.md, latency.png, bytes.png")
