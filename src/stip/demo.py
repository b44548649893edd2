"""``stip demo``: the provider's side, end to end on the embedded MiniLM.

Seals the model into a temporary folder, audits the three shares against the original,
then loads the sealed checkpoint the way the cloud does and the client folder the way the
user does, and checks that sentence embeddings through the sealed path equal plaintext.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

SENTENCES = [
    "Secure inference keeps the user's text away from the cloud.",
    "The model provider draws secret permutations and seals the weights.",
    "A permutation hides the order of coordinates, not their values.",
    "Paris is the capital of France.",
]


def run(out, err) -> int:
    from transformers import AutoTokenizer

    from . import audit, seal
    from .client import ClientBundle, permute, unpermute
    from .models import default
    from .serve import engine

    src = default.path()
    with tempfile.TemporaryDirectory(prefix="stip-demo-") as tmp:
        t0 = time.perf_counter()
        sealed = seal.seal_folder(src, tmp)
        t_seal = time.perf_counter() - t0
        out.print(f"sealed {default.NAME} in {t_seal:.2f} s — fingerprint {sealed.key.fingerprint[:16]}…")

        violations = audit.audit(tmp, original=src)
        for v in violations:
            err.print(f"[bold red]VIOLATION[/] {v}", highlight=False)
        out.print("audit: " + ("[green]passed[/]" if not violations else f"[red]{len(violations)} violation(s)[/]"))

        server = engine.load(Path(tmp) / seal.SERVER)  # P2 loads only server/
        client = ClientBundle.load(Path(tmp) / seal.CLIENT)  # P3 loads only client/
        tok = AutoTokenizer.from_pretrained(Path(tmp) / seal.CLIENT, local_files_only=True)
        batch = tok(SENTENCES, padding=True, return_tensors="pt")

        plain_model = seal.load_source(src)
        with torch.no_grad():
            plain = plain_model(**batch).last_hidden_state
            x = permute(client.embedder(batch["input_ids"], token_type_ids=batch.get("token_type_ids")), client.key.pi)
            hidden = engine.forward(server, x, batch["attention_mask"])["last_hidden_state"]
            hidden = unpermute(hidden, client.key.pi)
        e_plain = default.mean_pool(plain, batch["attention_mask"])
        e_sealed = default.mean_pool(hidden, batch["attention_mask"])
        cos = torch.nn.functional.cosine_similarity(e_plain, e_sealed)
        max_err = float((plain - hidden).abs().max())

    table = Table(title="sealed vs plaintext: MiniLM-L6 loaded from disk")
    for col in ("sentences", "tokens", "max |Δ| hidden", "min cosine"):
        table.add_column(col, justify="right")
    table.add_row(str(len(SENTENCES)), str(int(batch["attention_mask"].sum())), f"{max_err:.1e}", f"{float(cos.min()):.7f}")
    out.print(table)
    ok = not violations and float(cos.min()) >= 1 - 1e-5
    out.print("[green]lossless: sealed outputs equal plaintext[/]" if ok else "[red]MISMATCH[/]")
    return 0 if ok else 1
