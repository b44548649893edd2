"""The homomorphic-encryption baseline (CKKS)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app, err, fail, out


he_app = typer.Typer(no_args_is_help=True, help="The homomorphic-encryption baseline (CKKS on SEAL, packed with rotations).")
app.add_typer(he_app, name="he")


@he_app.command("run")
def he_run(
    model: Path = typer.Option(..., "--model", metavar="OUT", help="A `stip train polyformer` folder or its model.safetensors."),
    images: int = typer.Option(16, "--images", min=1, help="ViT: test images to encrypt, as many a ciphertext as its slots hold."),
    prompts: int = typer.Option(32, "--prompts", min=1, help="LM: held-out prompts to encrypt, as many a ciphertext as its slots hold."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="LM: tokens per prompt (default and most: the model's context)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Encrypted inference: the user encrypts image patches (ViT) or its prompts' embeddings
    (LM) under CKKS, token-major in the slots; the server computes the polynomial model on
    ciphertexts with its plaintext weights, by rotations (client-aided refresh when depth runs
    out); the user decrypts the class or next-token logits. Reports time, ciphertext bytes each
    way, rounds, peak memory, max error against the plaintext polynomial model and, for an LM,
    the next-token perplexity of both."""
    import json

    from ..he.runner import run
    from ..models import data, polyformer

    try:
        net, info = polyformer.load(model)
        plan = polyformer.he_plan(net)
        if net.cfg.causal:
            tokens = tokens or net.cfg.context
            if tokens > net.cfg.context:
                raise ValueError(f"--tokens {tokens} exceeds the model's context of {net.cfg.context}")
            inputs, targets = polyformer.held_out(model, prompts, tokens)
        else:
            _, test = data.load(info.get("dataset", "digits"), info.get("data_dir"), seed=info.get("seed", 0))
            inputs = net.patches(test.images[:images]).numpy()
        what = "prompts" if net.cfg.causal else "images"
        with err.status(f"encrypted inference of {len(inputs)} {what} …"):
            report, logits = run(plan, inputs)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    result = report.to_json()
    if net.cfg.causal:
        result["perplexity"] = {"ckks": polyformer.next_token_perplexity(logits, targets),
                                "plaintext": polyformer.next_token_perplexity(polyformer.plan_forward(plan, inputs), targets),
                                "prompts": len(inputs), "tokens": tokens}  # fmt: skip
    if as_json:
        print(json.dumps(result))
        return
    from rich.table import Table

    t = Table(title=f"CKKS, {report.inputs} {what} in {report.ciphertexts} ciphertext(s)", show_header=False)
    t.add_column("")
    t.add_column("", justify="right")
    t.add_row(f"wall time (all) / per {what[:-1]}", f"{report.seconds:.2f} s / {report.seconds_per_input:.3f} s")
    t.add_row("server / client compute", f"{report.server_seconds:.2f} s / {report.client_seconds:.2f} s")
    t.add_row("ciphertext bytes up / down", f"{report.bytes_up:,} / {report.bytes_down:,}")
    t.add_row(f"public keys (once; {report.rotation_keys} rotation keys)", f"{report.key_bytes:,}")
    t.add_row("rotations", f"{report.rotations:,}")
    t.add_row("peak memory (both parties, one process)", f"{report.peak_memory_bytes / 2**30:.2f} GiB")
    t.add_row("refresh round trips (ciphertexts)", f"{report.refresh_rounds} ({report.refreshed_ciphertexts:,})")
    t.add_row("max abs error vs plaintext polynomial model", f"{report.max_abs_error:.2e}")
    t.add_row("argmax agreement", f"{100 * report.argmax_agreement:.1f} %")
    if "perplexity" in result:
        ppl = result["perplexity"]
        t.add_row(f"next-token perplexity, {ppl['prompts']} held-out prompts of {tokens} tokens: CKKS / plaintext",
                  f"{ppl['ckks']:,.2f} / {ppl['plaintext']:,.2f}")
    p = report.params
    t.add_row("parameters", f"N={p['poly_modulus_degree']}, log q={p['log_q']}, scale 2^{p['scale_bits']}, {p['levels']} levels, 128-bit")
    out.print(t)
