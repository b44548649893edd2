"""What TLS 1.3 costs shares mode, measured side by side in one run (a few minutes on 2 cores).

Two share-server pairs of the same model run at once, one pair on plain TCP and one on TLS
with pinned self-signed certificates (ECDSA P-256), every process with one BLAS thread; P3 in
this process on one thread. Runs alternate between the pairs so that drift on the machine
falls on both. Measured:

1. a one-row round trip (MiniLM's first QKV matmul, 384 → 1,152), median of --rows runs;
2. MiniLM at 128 tokens, one encoder pass (24 rounds), median of --passes;
3. SmolLM2-135M-Instruct per generated token (121 rounds), median over --tokens greedy steps.

    python benchmarks/shares_tls.py [--out benchmarks/results/shares-tls] [--rows 300] [--passes 7] [--tokens 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from stip import tls
from stip.models import chat, default
from stip.serve.process import ServerProcess
from stip.shares import Servers, SharesModel, one_thread


@contextmanager
def connected(path, certs):
    """Connections to a plain pair and a TLS pair of the same model: {"plain": …, "tls": …}."""
    spawn = lambda *a: ServerProcess(path, "--threads", "1", *a, command="share-server", timeout=600)  # noqa: E731
    procs = [spawn(), spawn(), *(spawn("--tls-cert", str(c), "--tls-key", str(k)) for c, k, _ in certs)]
    try:
        conns = {
            "plain": Servers([procs[0].url, procs[1].url]),
            "tls": Servers([procs[2].url, procs[3].url], trust=[tls.Trust(pin=p) for _, _, p in certs]),
        }
        try:
            yield conns
        finally:
            for c in conns.values():
                c.close()
    finally:
        for proc in procs:
            proc.stop()


def alternate(fn, conns: dict, n: int) -> dict[str, list[float]]:
    out = {k: [] for k in conns}
    for _ in range(n):
        for k, c in conns.items():
            out[k].append(fn(c))
    return out


def summary(times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"plain_s": med["plain"], "tls_s": med["tls"], "ratio": med["tls"] / med["plain"], "n": len(times["plain"])}


def minilm(path, certs, rows: int, passes: int, log) -> dict:
    from transformers import AutoTokenizer

    with connected(path, certs) as conns:
        models = {k: SharesModel(path, c) for k, c in conns.items()}
        x = torch.randn(1, 384)

        def one_row(c):
            t0 = time.perf_counter()
            c.matmul("0.qkv", x)
            return time.perf_counter() - t0

        alternate(one_row, conns, 20)  # warm-up
        r = {"one_row": summary(alternate(one_row, conns, rows))}
        log(f"one-row round trip: {r['one_row']}")
        tok = AutoTokenizer.from_pretrained(path)
        text = " ".join(["Shares mode hides every activation from each of the two share servers."] * 12)
        batch = tok([text], truncation=True, max_length=128, padding="max_length", return_tensors="pt")
        assert batch["input_ids"].shape[1] == 128

        def one_pass(c):
            m = models["plain" if c is conns["plain"] else "tls"]
            t0 = time.perf_counter()
            m.encode_ids(batch["input_ids"], batch["attention_mask"])
            return time.perf_counter() - t0

        alternate(one_pass, conns, 1)
        r["minilm_128"] = summary(alternate(one_pass, conns, passes))
        log(f"MiniLM at 128 tokens: {r['minilm_128']}")
        return r


def smollm2(path, certs, tokens: int, log) -> dict:
    with connected(path, certs) as conns:
        models = {k: SharesModel(path, c) for k, c in conns.items()}
        ids = models["plain"].tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                            add_generation_prompt=True, tokenize=True)  # fmt: skip
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        steps: dict[str, list[float]] = {"plain": [], "tls": []}
        answers = {}
        for _ in range(2):  # two rounds, alternating, each a whole generation
            for k, m in models.items():
                stamps = []
                g = m.generate(ids, tokens, on_token=lambda _t: stamps.append(time.perf_counter()), stop_at_eos=False)
                steps[k] += [b - a for a, b in zip(stamps, stamps[1:])]
                answers[k] = g.token_ids
        assert answers["plain"] == answers["tls"]
        r = {"smollm2_token": summary(steps)}
        log(f"SmolLM2 per token: {r['smollm2_token']}")
        return r


def markdown(r: dict) -> str:
    names = {"one_row": "one-row round trip (MiniLM 0.qkv)", "minilm_128": "MiniLM, 128 tokens, one pass (24 rounds)",
             "smollm2_token": "SmolLM2, per generated token (121 rounds)"}  # fmt: skip
    lines = ["| measure | plain TCP | TLS 1.3, pinned | TLS / plain | n |", "|---|---|---|---|---|"]
    for k, name in names.items():
        if k in r:
            m = r[k]
            lines.append(f"| {name} | {m['plain_s'] * 1e3:.2f} ms | {m['tls_s'] * 1e3:.2f} ms | {m['ratio']:.3f} | {m['n']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shares-tls"))
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--passes", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=24)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        certs = [(Path(d, f"s{i}.crt"), Path(d, f"s{i}.key")) for i in (1, 2)]
        certs = [(c, k, tls.self_signed(c, k)) for c, k in certs]
        t0 = time.perf_counter()
        with one_thread():
            r = minilm(default.path(), certs, args.rows, args.passes, log)
            r |= smollm2(chat.path(), certs, args.tokens, log)
    r["seconds"] = time.perf_counter() - t0
    r["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (args.out / "results.json").write_text(json.dumps(r, indent=2))
    (args.out / "table.md").write_text(markdown(r) + "\n")
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
