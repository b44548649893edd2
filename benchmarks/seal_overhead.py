"""Sealed forward vs plaintext forward, same engine, real MiniLM-L6, 128 tokens.

Both sides run ``BertModel.forward(inputs_embeds=…)`` in the same process: the plaintext model
on word embeddings (it adds positions and token types itself), the sealed model on P3's
permuted sums (its position and token-type tables are zero). Same arithmetic, so the
target ratio is ≤ 1.02. Rounds alternate which side goes first.

    python benchmarks/seal_overhead.py [--tokens 128] [--batches 1 8] [--rounds 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers

from stip.client import unpermute
from stip.models import default
from stip.seal import load_source, seal
from stip.serve import engine

TARGET = 1.02


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(plain_model, sealed, batch: int, tokens: int, rounds: int, warmup: int = 3) -> dict:
    vocab = plain_model.config.vocab_size
    gen = torch.Generator().manual_seed(batch * 1000 + tokens)
    ids = torch.randint(1000, vocab, (batch, tokens), generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    with torch.no_grad():
        word = plain_model.embeddings.word_embeddings(ids)
    x = sealed.client.permuted_embeddings(ids)

    def plain():
        return engine.forward(plain_model, word, mask)

    def sealed_fwd():
        return engine.forward(sealed.server, x, mask)

    for _ in range(warmup):
        plain(), sealed_fwd()
    ref = plain()["last_hidden_state"]
    got = unpermute(sealed_fwd()["last_hidden_state"], sealed.key.pi)
    max_err = float((ref - got).abs().max())

    t_plain, t_sealed = [], []
    for r in range(rounds):
        if r % 2:
            t_plain.append(timed(plain))
            t_sealed.append(timed(sealed_fwd))
        else:
            t_sealed.append(timed(sealed_fwd))
            t_plain.append(timed(plain))
    client = sealed.client
    out = sealed_fwd()["last_hidden_state"]
    t_permute = statistics.median(timed(lambda: client.permuted_embeddings(ids)) for _ in range(50))
    t_unpermute = statistics.median(timed(lambda: unpermute(out, client.key.pi)) for _ in range(50))
    paired = [s / p for s, p in zip(t_sealed, t_plain)]
    return {
        "batch": batch,
        "tokens": tokens,
        "rounds": rounds,
        "plain_ms": statistics.median(t_plain) * 1e3,
        "sealed_ms": statistics.median(t_sealed) * 1e3,
        # Each round's sealed/plain pair ran back to back: the median of those ratios cancels
        # the machine's drift better than a ratio of medians.
        "ratio": statistics.median(paired),
        "ratio_of_medians": statistics.median(t_sealed) / statistics.median(t_plain),
        "client_embed_permute_ms": t_permute * 1e3,
        "client_unpermute_ms": t_unpermute * 1e3,
        "max_abs_error": max_err,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    plain_model = load_source(default.path())
    sealed = seal(plain_model)
    rows = []
    for b in args.batches:
        print(f"measuring batch {b} × {args.tokens} tokens, {args.rounds} alternating rounds…", file=sys.stderr)
        rows.append(measure(plain_model, sealed, b, args.tokens, args.rounds))

    result = {"model": default.NAME, "threads": args.threads, "torch": torch.__version__, "target_ratio": TARGET, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{default.NAME}, torch {torch.__version__}, {args.threads} threads; ratio = median over rounds of sealed/plain, run back to back in alternating order")
    print(f"{'batch':>5} {'tokens':>6} {'plain ms':>9} {'sealed ms':>10} {'ratio':>6} {'ratio of medians':>17} {'P3 embed+π ms':>14} {'P3 un-π ms':>11} {'max |Δ|':>9}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['tokens']:>6} {r['plain_ms']:>9.2f} {r['sealed_ms']:>10.2f} {r['ratio']:>6.3f} "
            f"{r['ratio_of_medians']:>17.3f} {r['client_embed_permute_ms']:>14.3f} {r['client_unpermute_ms']:>11.3f} {r['max_abs_error']:>9.1e}"
        )
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} (target ≤ {TARGET})" + ("" if worst <= TARGET else "  — above target"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
