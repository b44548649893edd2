"""Every figure of docs/threat-model.md, measured in one run on the embedded MiniLM (5–8 min).

Seals the public MiniLM and private variants (re-initialised word table, re-initialised
weights, weights drifted by noise), re-keys one sealing, then runs each attack from P2's side
(`stip.attacks.figures`). Writes benchmarks/results/attacks/figures.json and prints a table.

    python benchmarks/attacks.py [--layers 1,2] [--out DIR]
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
    ap.add_argument("--check", type=Path, default=Path("docs/threat-model.md"), help="compare with this document's figures")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    layers = tuple(int(k) for k in args.layers.split(",") if k)
    show = lambda fid, f: print(f"{fid:34s} {100 * f['value']:6.1f} %  (n={f['n']}, {f['seconds']} s)  {f['command']}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="stip-attacks-") as tmp:
        result = figures.measure(Path(tmp), layers=layers, log=show)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures.json").write_text(json.dumps(result, indent=2))
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
