"""Every figure of docs/threat-model.md, measured in one run (about 3 hours on 2 cores: MiniLM
5–8 min, the SmolLM2 figures the rest).

Seals the public MiniLM and SmolLM2 and private variants (re-initialised word table,
re-initialised weights, weights drifted by noise, SmolLM2 fine-tuned for real), re-keys one
sealing, then runs each attack from P2's side (`stip.attacks.figures`). Writes
benchmarks/results/attacks/figures.json (merged with earlier runs' other figures) and prints a
table; exits 1 when a figure differs from the document by more than 5 points.

    python benchmarks/attacks.py [--only llm.,vocab.public] [--layers 1,2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import transformers

from stip.attacks import figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2", help="hidden-state depths for vocabulary matching ('' for none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/attacks"))
    ap.add_argument("--only", default="", help="comma-separated figure id prefixes to run (default: all)")
    ap.add_argument("--check", type=Path, default=Path("docs/threat-model.md"), help="compare with this document's figures")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    layers = tuple(int(k) for k in args.layers.split(",") if k)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "figures.json"
    merged = json.loads(saved.read_text()) if saved.is_file() else {}

    def show(fid, f):  # print, and save as we go: a crash an hour in keeps what was measured
        print(f"{fid:34s} {100 * f['value']:6.1f} %  (n={f['n']}, {f['seconds']} s)  {f['command']}", flush=True)
        merged[fid] = f
        saved.write_text(json.dumps(merged, indent=2))

    prefixes = tuple(p for p in args.only.split(",") if p)
    only = {f for f in figures.IDS if f.startswith(prefixes)} if prefixes else None
    if only == set():
        ap.error(f"--only {args.only!r} matches no figure id")
    with tempfile.TemporaryDirectory(prefix="stip-attacks-") as tmp:
        result = figures.measure(Path(tmp), only=only, layers=layers, log=show)
    print(f"wrote {args.out / 'figures.json'}")
    if args.check.is_file():
        off = figures.disagreements(args.check.read_text(), result)
        for line in off:
            print(f"DIFFERS from {args.check}: {line}")
        print(f"{args.check}: {'all figures agree within 5 points' if not off else f'{len(off)} figure(s) differ'}")
        return 1 if off else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
