"""2PC on SPU against STIP, on the real MiniLM-L6 (all 6 layers), in one run.

For each token count, the same random in-vocabulary input goes through
  * STIP: P3 embeds and permutes, the sealed model runs, P3 un-permutes (in process);
    bytes = the wire messages a request and its answer take (stip.wire);
  * MPC: the same encoder under SPU (SEMI2K and/or CHEETAH), simulation by default, or one
    process per party with --parties procs; bytes = both parties' sent bytes.
It prints MPC time / STIP time, MPC bytes / STIP bytes, and the MPC max abs error against the
plaintext JAX forward.

    python benchmarks/mpc_vs_stip.py [--tokens 32 128] [--protocols semi2k cheetah] [--parties sim] [--json]

CHEETAH is slow on 2 cores (one layer at 32 tokens took about 90 s here): expect the full
default run to take the better part of an hour.
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

from stip import wire
from stip.models import default
from stip.mpc.job import inputs_for
from stip.mpc.runner import simulate
from stip.models.blocks import from_hf
from stip.seal import load_source, seal
from stip.serve import engine


def stip_path(model, sealed, tokens: int, seed: int, rounds: int = 10) -> dict:
    gen = torch.Generator().manual_seed(seed)
    low = min(1000, model.config.vocab_size // 2)
    ids = torch.randint(low, model.config.vocab_size, (1, tokens), generator=gen)
    mask = torch.ones_like(ids)
    client = sealed.client

    def once():
        x = client.permuted_embeddings(ids)
        out = engine.forward(sealed.server, x, mask)
        return x, out, client.unpermute_outputs(out)

    once()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        x, out, _ = once()
        times.append(time.perf_counter() - t0)
    up = len(wire.encode({"embeddings": x, "attention_mask": mask}))
    down = len(wire.encode({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}))
    return {"seconds": statistics.median(times), "bytes": up + down, "bytes_up": up, "bytes_down": down}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--protocols", nargs="+", default=["semi2k", "cheetah"], choices=["semi2k", "cheetah"])
    ap.add_argument("--parties", default="sim", choices=["sim", "procs"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    model = load_source(default.path())
    sealed = seal(model)
    cfg, params = from_hf(model)
    rows = []
    for tokens in args.tokens:
        s = stip_path(model, sealed, tokens, args.seed)
        x = inputs_for(model, tokens, args.seed)
        for protocol in args.protocols:
            print(f"{protocol} ({args.parties}), {tokens} tokens, 6 layers …", file=sys.stderr, flush=True)
            if args.parties == "sim":
                report, _ = simulate(cfg, params, x, protocol)
            else:
                from stip.mpc.parties import run_parties

                report, _ = run_parties(cfg, params, x, protocol)
            mpc_bytes = sum(b for b in report.bytes_sent if b is not None)
            rows.append({
                "tokens": tokens,
                "protocol": protocol,
                "parties": args.parties,
                "mpc_seconds": report.seconds,
                "mpc_bytes": mpc_bytes,
                "mpc_send_actions": report.send_actions,
                "mpc_max_abs_error": report.max_abs_error,
                "stip_seconds": s["seconds"],
                "stip_bytes": s["bytes"],
                "time_ratio": report.seconds / s["seconds"],
                "bytes_ratio": mpc_bytes / s["bytes"],
                "notes": report.notes,
            })
            print(f"  MPC {report.seconds:.1f} s, {mpc_bytes / 1e6:.1f} MB; STIP {s['seconds'] * 1e3:.1f} ms, {s['bytes'] / 1e3:.1f} kB", file=sys.stderr, flush=True)
    result = {"model": default.NAME, "layers": cfg.layers, "field_bits": 64, "fraction_bits": 18, "rows": rows}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{default.NAME}, all {cfg.layers} layers, batch 1; MPC on SPU (FM64, 18 fraction bits), STIP in process")
    print(f"{'tokens':>6} {'protocol':>8} {'MPC s':>9} {'STIP ms':>8} {'time ×':>9} {'MPC MB':>9} {'STIP kB':>8} {'bytes ×':>8} {'MPC rounds':>10} {'MPC max|Δ|':>10}")
    for r in rows:
        print(
            f"{r['tokens']:>6} {r['protocol']:>8} {r['mpc_seconds']:>9.2f} {r['stip_seconds'] * 1e3:>8.2f} {r['time_ratio']:>9.0f} "
            f"{r['mpc_bytes'] / 1e6:>9.1f} {r['stip_bytes'] / 1e3:>8.1f} {r['bytes_ratio']:>8.0f} {max(a for a in r['mpc_send_actions'] if a):>10,} {r['mpc_max_abs_error']:>10.2e}"
        )
    for note in sorted({n for r in rows for n in r["notes"]}):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
