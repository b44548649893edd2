"""The two-party MPC baseline (SecretFlow SPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, err, fail, out


mpc_app = typer.Typer(no_args_is_help=True, help="The two-party MPC baseline on SecretFlow SPU.")
app.add_typer(mpc_app, name="mpc")


@mpc_app.command("run")
def mpc_run(
    model: Optional[Path] = typer.Option(None, "--model", metavar="SRC", help="Local HF model folder, or a `stip train mpcvit` folder (default: the embedded MiniLM)."),
    protocol: str = typer.Option("semi2k", "--protocol", help="semi2k | cheetah | aby3 (aby3: simulation only)."),
    parties: str = typer.Option("sim", "--parties", help="sim: one process; procs: one OS process per party over TCP."),
    tokens: int = typer.Option(32, "--tokens", min=1, help="Input length (vision models: fixed by the image size)."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, help="Run only the first K layers."),
    network: str = typer.Option("none", "--network", help="none | lan (1 Gbit/s, 0.1 ms) | wan (100 Mbit/s, 40 ms); procs only."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random input tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Run the model's forward under 2PC (the user's embeddings and the owner's weights are
    both secret; only the user learns the output) and report wall time, bytes sent per party,
    send actions (the rounds proxy) and max error against plaintext."""
    import json

    from ..models import default as default_model
    from ..mpc import netem
    from ..mpc.job import Job, run
    from ..mpc.runner import PROTOCOLS

    if protocol not in PROTOCOLS:
        fail(f"--protocol must be one of {', '.join(PROTOCOLS)}")
    if parties not in ("sim", "procs"):
        fail("--parties must be sim or procs")
    if network not in ("none", *netem.PROFILES):
        fail(f"--network must be none, {', '.join(netem.PROFILES)}")
    if parties == "procs" and protocol == "aby3":
        fail("real-party runs are two-party: use semi2k or cheetah")
    job = Job(model=model or default_model.path(), protocol=protocol, parties=parties, tokens=tokens, layers=layers, network=network, seed=seed)
    try:
        with err.status(f"running {protocol} ({parties}) …"):
            report, extras = run(job)
    except netem.Unavailable as e:
        fail(f"network emulation is not available here: {e}")
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps({**report.to_json(), **extras}))
        return
    from rich.table import Table

    t = Table(title=f"{protocol.upper()} {parties}, {extras['model_type']}, {extras['tokens']} tokens, {extras['layers']} layers", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("wall time", f"{report.seconds:.3f} s")
    for rank, (b, a) in enumerate(zip(report.bytes_sent, report.send_actions)):
        t.add_row(f"party {rank}: bytes sent / send actions", f"{b:,} / {a:,}" if b is not None else "not profiled")
    t.add_row("max abs error vs plaintext", f"{report.max_abs_error:.2e}")
    t.add_row("fixed point", f"FM{report.field_bits}, {report.fraction_bits} fraction bits")
    for name, seconds in extras["estimates"].items():
        p = netem.PROFILES[name]
        t.add_row(f"estimate on {name} ({p.mbit_per_s:g} Mbit/s, {p.one_way_ms} ms)", f"{seconds:.2f} s")
    out.print(t)
    for note in report.notes + extras.get("network_applied", []) + [extras.get("network_note", "")]:
        if note:
            out.print(f"note: {note}", highlight=False)
