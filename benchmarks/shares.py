"""Shares mode's evidence in one run (about 15 minutes on 2 cores): lossless, fast, and what it
costs per generated token. Everything runs on this machine: two `stip share-server` processes
on loopback (one BLAS thread each) and P3 in this process (one thread), so the three share the
cores; LAN and WAN columns are estimates (rounds × RTT + one server's bytes / bandwidth added
to the loopback time), not emulations.

1. `stip bench` on MiniLM at --tokens (default 128): plaintext, STIP, shares, MPC SEMI2K, side
   by side (`stip.bench.run`).
2. MiniLM sentence embeddings of real sentences: cosine with the plaintext model.
3. SmolLM2-135M-Instruct: greedy over 5 chat prompts × 32 tokens, tokens and logits against
   plaintext transformers (a divergence counts only at a near-tie, top-2 gap ≤ 1e-3), with
   both servers online and again with the masks prepared offline (S2 alone online).
4. SmolLM2 per generated token, both ways: latency, rounds, bytes to and from a server, P3's
   own compute, the servers' matmul time, LAN/WAN estimates; the offline phase's cost;
   plaintext decoding on the same machine for scale; a one-row round trip on loopback.

    python benchmarks/shares.py [--out benchmarks/results/shares] [--tokens 128] [--no-mpc]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from stip.bench import Settings, report, run as bench_run
from stip.models import chat, default
from stip.mpc import netem
from stip.serve.process import ServerProcess
from stip.shares import Servers, SharesModel, one_thread

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for learning to cook.",
    "Translate 'good morning, my friend' into Spanish and German.",
)
NEW_TOKENS = 32
NEAR_TIE = 1e-3
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "My password is hunter2 and my bank is in Zurich.",
    "Patient John Smith was diagnosed with diabetes in 2019.",
    "Shares mode hides every activation from each of the two servers.",
)


def servers(path, threads: int | None = 1):
    args = ("--threads", str(threads)) if threads else ()
    spawn = lambda: ServerProcess(path, *args, command="share-server", timeout=600)  # noqa: E731
    return spawn(), spawn()


def chat_ids(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def plain_greedy(model, ids, n):
    """Plaintext transformers greedy with a KV cache: tokens, per-step logits, top-2 gaps, per-step seconds."""
    out, logits, gaps, times, past, x = [], [], [], [], None, torch.tensor([ids])
    for _ in range(n):
        t0 = time.perf_counter()
        r = model(input_ids=x, past_key_values=past, use_cache=True)
        row, past = r.logits[0, -1], r.past_key_values
        times.append(time.perf_counter() - t0)
        top = row.topk(2).values
        gaps.append(float(top[0] - top[1]))
        logits.append(row)
        out.append(int(row.argmax()))
        x = torch.tensor([[out[-1]]])
    return out, logits, gaps, times


def minilm_cosine(path) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from stip.models.default import mean_pool

    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(list(SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(path)(**batch).last_hidden_state
    ref = torch.nn.functional.normalize(mean_pool(h, batch["attention_mask"]), dim=-1)
    a, b = servers(path)
    with a, b, Servers([a.url, b.url]) as conn:
        got = SharesModel(path, conn).encode(list(SENTENCES)).embedding
    cos = (got * ref).sum(-1)
    return {"sentences": len(SENTENCES), "cosine_min": float(cos.min()), "cosine": cos.tolist()}


def smollm2(path, log) -> dict:
    """Both servers online (one BLAS thread each: they compute at the same time), then with the
    masks prepared before each request (the servers on every core: online, S2 computes alone)."""
    from stip.seal import load_source

    plain = load_source(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    refs = {text: plain_greedy(plain, chat_ids(tok, text), NEW_TOKENS) for text in PROMPTS}
    plain_steps = [t for _, _, _, times in refs.values() for t in times[1:]]
    prompts, steps, offline, rtt = [], {False: [], True: []}, [], None
    for prepared, threads in ((False, 1), (True, None)):
        a, b = servers(path, threads)
        with a, b, Servers([a.url, b.url]) as conn, one_thread():
            p3 = SharesModel(path, conn)
            if rtt is None:  # the round trip of a one-row matmul (both servers), after a warm-up
                x = torch.randn(1, p3.cfg.hidden)
                for _ in range(50):
                    conn.matmul("0.o", x)
                t0 = time.perf_counter()
                for _ in range(500):
                    conn.matmul("0.o", x)
                rtt = (time.perf_counter() - t0) / 500
            for text in PROMPTS:
                ids = chat_ids(tok, text)
                want, ref_logits, gaps, _ = refs[text]
                if prepared:  # the offline phase for this request, before it is sent
                    t0, before = time.perf_counter(), conn.offline.copy()
                    conn.prepare(p3.plan(len(ids), NEW_TOKENS))
                    d = conn.offline.since(before)
                    offline.append({"seconds": time.perf_counter() - t0, "up": d.bytes_up[0], "down": d.bytes_down[0]})
                marks, snaps = [], []

                def mark(_token):
                    marks.append(time.perf_counter())
                    snaps.append(conn.stats.copy())

                t0 = time.perf_counter()
                g = p3.generate(ids, NEW_TOKENS, keep_logits=True, on_token=mark)
                first = next((i for i, (x, y) in enumerate(zip(g.token_ids, want)) if x != y), None)
                err = max(float((a_ - b_).abs().max()) for a_, b_ in zip(g.logits, ref_logits))
                prompts.append({"prompt": text, "prepared": prepared, "prompt_tokens": len(ids), "identical": first is None,
                                "first_divergence": first, "gap_at_divergence": None if first is None else gaps[first],
                                "max_abs_logit_error": err, "prefill_s": marks[0] - t0,
                                "text": tok.decode(g.token_ids, skip_special_tokens=True)})  # fmt: skip
                for i in range(1, len(marks)):  # decode steps: token i-1 in, token i out
                    d = snaps[i].since(snaps[i - 1])
                    steps[prepared].append({"seconds": marks[i] - marks[i - 1], "rounds": d.rounds, "up": d.bytes_up,
                                            "down": d.bytes_down, "wait": d.wait_seconds, "share": d.share_seconds,
                                            "server": d.server_seconds})  # fmt: skip
                log(f"  {text!r}{' (prepared)' if prepared else ''}: identical={first is None}, max logit error {err:.1e}, "
                    f"prefill {marks[0] - t0:.2f} s")
    out = {"prompts": prompts, "new_tokens": NEW_TOKENS, "identical": sum(p["identical"] for p in prompts),
           "runs": len(prompts), "max_abs_logit_error": max(p["max_abs_logit_error"] for p in prompts),
           "loopback_round_trip_s": rtt, "plaintext_decode_s": statistics.median(plain_steps),
           "offline_per_request": {"seconds": statistics.median(o["seconds"] for o in offline),
                                   "bytes_up": statistics.median(o["up"] for o in offline),
                                   "bytes_down": statistics.median(o["down"] for o in offline)}}  # fmt: skip
    for prepared, key in ((False, "per_token"), (True, "per_token_prepared")):
        st = steps[prepared]
        server = 1 if prepared else 0  # the server that carries the online traffic
        med = lambda f: statistics.median(f(x) for x in st)  # noqa: E731
        t = {"steps": len(st), "latency_s": med(lambda x: x["seconds"]), "rounds": med(lambda x: x["rounds"]),
             "bytes_up_per_server": med(lambda x: x["up"][server]), "bytes_down_per_server": med(lambda x: x["down"][server]),
             "p3_compute_s": med(lambda x: x["seconds"] - x["wait"]),  # everything P3 does itself
             "p3_sharing_s": med(lambda x: x["share"]),  # of which: encode, mask, frame, decode
             "server_matmul_s": med(lambda x: max(x["server"])), "wait_s": med(lambda x: x["wait"])}  # fmt: skip
        for name, p in netem.PROFILES.items():
            t[f"{name}_estimate_s"] = netem.estimate(t["latency_s"], [t["bytes_up_per_server"], t["bytes_down_per_server"]],
                                                     t["rounds"], p)  # fmt: skip
            # servers on machines of their own: P3's compute + one server's matmuls + the network
            t[f"{name}_separate_machines_s"] = netem.estimate(t["p3_compute_s"] + t["server_matmul_s"],
                                                              [t["bytes_up_per_server"], t["bytes_down_per_server"]], t["rounds"], p)
        out[key] = t
    return out


def markdown(r: dict) -> str:
    b, s, m = r["bench"], r["smollm2"], r["minilm"]
    rows = {row["mode"]: row for row in b["rows"]}
    lines = [f"# Shares mode, measured ({r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['date']})", "",
             f"`{r['command']}` — {r['seconds'] / 60:.1f} min.", "", f"## MiniLM, {b['subject']['tokens']} tokens: every mode in one run", "",
             report.table(b), ""]  # fmt: skip
    lines += [f"- {report.LABELS[row['mode']]}: {'; '.join(row['notes'])}" for row in b["rows"] if row["notes"]] + [""]
    ratios = [f"{report.LABELS[k]} / plaintext: **{rows[k]['ratio']:,.2f}×**" for k in ("shares", "shares-prepared", "mpc-semi2k") if k in rows]
    lines += ["; ".join(ratios) + ".", "", "With three limbs (`--shares-limbs 3`: the servers' answers exact mod 2^64, at 1.5× "
              "their GEMM work), same run:", "", report.table(r["bench_3_limbs"]), ""]
    lines += [f"- {report.LABELS[row['mode']]}: {'; '.join(row['notes'])}" for row in r["bench_3_limbs"]["rows"] if row["notes"]]
    lines += ["",
              f"MiniLM sentence embeddings of {m['sentences']} real sentences: cosine with plaintext ≥ **{m['cosine_min']:.7f}**.", "",
              f"## SmolLM2-135M-Instruct: {len(PROMPTS)} prompts × {s['new_tokens']} greedy tokens, twice (both servers online, one BLAS "
              "thread each; masks prepared, servers on every core)", "",
              f"Identical to plaintext transformers: **{s['identical']}/{s['runs']}** runs; max |logit error| **{s['max_abs_logit_error']:.1e}**.", "",
              "| prompt | masks | prompt tokens | identical | max logit error | prefill |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p in s["prompts"]:
        same = "yes" if p["identical"] else f"no: token {p['first_divergence']} (top-2 gap {p['gap_at_divergence']:.1e})"
        lines.append(f"| {p['prompt']} | {'prepared' if p['prepared'] else 'online'} | {p['prompt_tokens']} | {same} | "
                     f"{p['max_abs_logit_error']:.1e} | {p['prefill_s']:.2f} s |")
    kb = lambda n: f"{n / 1e3:,.0f} kB"  # noqa: E731
    net = lambda k: f"{netem.PROFILES[k].mbit_per_s:g} Mbit/s, {netem.PROFILES[k].rtt_s * 1e3:g} ms RTT"  # noqa: E731
    ms = lambda x: f"{x * 1e3:,.0f} ms"  # noqa: E731
    a, p = s["per_token"], s["per_token_prepared"]
    o = s["offline_per_request"]
    lines += ["", f"Per generated token (median over {a['steps']} decode steps each); plaintext transformers decodes a token in "
              f"{ms(s['plaintext_decode_s'])} on the same machine; a one-row round trip to both servers on loopback takes "
              f"{s['loopback_round_trip_s'] * 1e6:,.0f} µs.", "",
              "| per token | both servers online | masks prepared (online: S2 alone) |", "|---|---|---|",
              f"| latency, loopback, P3 and both servers on this machine | {ms(a['latency_s'])} | {ms(p['latency_s'])} |",
              f"| × plaintext decode | {a['latency_s'] / s['plaintext_decode_s']:.1f}× | {p['latency_s'] / s['plaintext_decode_s']:.1f}× |",
              f"| round trips | {a['rounds']:.0f} | {p['rounds']:.0f} |",
              f"| bytes to / from one server | {kb(a['bytes_up_per_server'])} / {kb(a['bytes_down_per_server'])} | "
              f"{kb(p['bytes_up_per_server'])} / {kb(p['bytes_down_per_server'])} (S1: none) |",
              f"| P3's own compute (walk, masking, framing) | {ms(a['p3_compute_s'])} (masking {ms(a['p3_sharing_s'])}) | "
              f"{ms(p['p3_compute_s'])} (masking {ms(p['p3_sharing_s'])}) |",
              f"| a server's matmuls (the slower) | {ms(a['server_matmul_s'])} | {ms(p['server_matmul_s'])} |",
              f"| LAN estimate ({net('lan')}): loopback + network | {ms(a['lan_estimate_s'])} | {ms(p['lan_estimate_s'])} |",
              f"| WAN estimate ({net('wan')}): loopback + network | {ms(a['wan_estimate_s'])} | {ms(p['wan_estimate_s'])} |",
              f"| LAN, servers on machines of their own: P3 + server + network | {ms(a['lan_separate_machines_s'])} | {ms(p['lan_separate_machines_s'])} |",
              f"| WAN, servers on machines of their own | {ms(a['wan_separate_machines_s'])} | {ms(p['wan_separate_machines_s'])} |",
              "", f"Offline phase per request ({s['new_tokens']} tokens), S1 alone: {o['seconds']:.2f} s, {o['bytes_up'] / 1e6:,.1f} MB up, "
              f"{o['bytes_down'] / 1e6:,.1f} MB down."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shares"))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--no-mpc", action="store_true", help="leave MPC SEMI2K out of the side-by-side run")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)  # noqa: E731
    modes = ("plain", "stip", "shares") + (() if args.no_mpc else ("mpc-semi2k",))
    log(f"stip bench on MiniLM, {args.tokens} tokens: {', '.join(modes)}")
    bench = bench_run(Settings(tokens=args.tokens, modes=modes, network="wan", out=args.out), progress=log)
    log("again with three limbs: plaintext and shares")
    bench3 = bench_run(Settings(tokens=args.tokens, modes=("plain", "shares"), network="wan", out=args.out, shares_limbs=3),
                       progress=log)  # fmt: skip
    log("MiniLM embeddings of real sentences")
    minilm = minilm_cosine(default.path())
    log("SmolLM2: greedy against plaintext, per-token costs")
    llm = smollm2(chat.path(), log)
    result = {"command": "python benchmarks/shares.py " + " ".join(sys.argv[1:]), "machine": report.machine(), "bench": bench,
              "bench_3_limbs": bench3,
              "minilm": minilm, "smollm2": llm, "seconds": time.perf_counter() - t0}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "report.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}/results.json and report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
