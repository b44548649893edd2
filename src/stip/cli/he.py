"""The homomorphic-encryption baseline (CKKS)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import app, err, fail, out


he_app = typer.Typer(no_args_is_help=True, help="The homomorphic-encryption baseline (CKKS, TenSEAL).")
app.add_typer(he_app, name="he")


@he_app.command("run")
def he_run(
    model: Path = typer.Option(..., "--model", metavar="OUT", help="A `stip train polyformer` folder or its model.safetensors."),
    images: int = typer.Option(16, "--images", min=1, help="Test images to encrypt, packed in one batch's slots."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Encrypted inference: the user encrypts image patches under CKKS, the server computes the
    polynomial ViT on ciphertexts with its plaintext weights (client-aided refresh when depth
    runs out), the user decrypts. Reports time, ciphertext bytes each way, refresh rounds and
    max error against the plaintext polynomial model."""
    import json

    from ..he.runner import run
    from ..models import data, polyformer

    try:
        net, info = polyformer.load(model)
        _, test = data.load(info.get("dataset", "digits"), info.get("data_dir"), seed=info.get("seed", 0))
        patches = net.patches(test.images[:images]).numpy()
        with err.status(f"encrypted inference of {len(patches)} images …"):
            report, _ = run(polyformer.he_plan(net), patches)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(report.to_json()))
        return
    from rich.table import Table

    t = Table(title=f"CKKS, {report.images} images in one batch", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row("wall time (batch) / per image", f"{report.seconds:.2f} s / {report.seconds_per_image:.3f} s")
    t.add_row("server / client compute", f"{report.server_seconds:.2f} s / {report.client_seconds:.2f} s")
    t.add_row("ciphertext bytes up / down", f"{report.bytes_up:,} / {report.bytes_down:,}")
    t.add_row("public keys (once)", f"{report.key_bytes:,}")
    t.add_row("refresh round trips (ciphertexts)", f"{report.refresh_rounds} ({report.refreshed_ciphertexts:,})")
    t.add_row("max abs error vs plaintext polynomial model", f"{report.max_abs_error:.2e}")
    t.add_row("argmax agreement", f"{100 * report.argmax_agreement:.1f} %")
    p = report.params
    t.add_row("parameters", f"N={p['poly_modulus_degree']}, log q={p['log_q']}, scale 2^{p['scale_bits']}, {p['levels']} levels, 128-bit")
    out.print(t)
