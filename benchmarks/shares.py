"""Shares mode's evidence in one run (about 25 minutes on 2 cores): lossless, what it costs per
token, and its latency over emulated networks, measured beside each estimate. Two `stip
share-server` processes on loopback (one BLAS thread each, or every core when the masks are
prepared) and P3 in this process (one thread) share this machine's cores; networks are
emulated by one `stip.relay` process per server (each direction delayed by RTT/2 and paced at
the bandwidth; this kernel has no netem).

1. `stip bench` on MiniLM at --tokens (default 128): plaintext, STIP, shares, MPC SEMI2K, side
   by side, with the WAN column estimated and measured (`stip.bench.run`); again with 3 limbs.
2. MiniLM sentence embeddings of real sentences: cosine with the plaintext model.
3. SmolLM2-135M-Instruct on the 2-round schedule: greedy over 5 chat prompts × 32 tokens,
   tokens and logits against plaintext transformers (a divergence counts only at a near-tie,
   top-2 gap ≤ 1e-3), both servers online and again with the masks prepared (S2 alone online).
4. Both schedules (2 and 4 rounds per layer) × masks online or prepared × loopback, LAN (1 ms,
   1 Gbit/s), WAN (40 ms and 80 ms, 100 Mbit/s): SmolLM2 per generated token and MiniLM at
   --tokens, measured through the relays, each beside its estimate (the loopback figure +
   rounds × RTT + bytes up and down / bandwidth).
5. P3's own compute per token, both schedules: its thread's CPU time in the loopback run, and
   its wall time with the servers' answers replayed from memory (servers elsewhere: nothing of
   theirs on P3's cores); plaintext decoding on one thread on the same machine for scale.

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

from stip import relay, wire
from stip.bench import Settings, report, run as bench_run
from stip.models import chat, default
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
NETWORKS = {"loopback": (0.0, None), "lan": (1e-3, 1e9), "wan40": (0.04, 100e6), "wan80": (0.08, 100e6)}  # RTT s, bit/s
STEPS = {"loopback": 12, "lan": 12, "wan40": 6, "wan80": 6}  # SmolLM2 decode steps timed per cell
PASSES = 3  # MiniLM passes timed per cell
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
    """The 2-round schedule, lossless: both servers online (one BLAS thread each: they compute
    at the same time), then with the masks prepared before each request (the servers on every
    core: online, S2 computes alone). Per-token costs on loopback from the same runs."""
    from stip.seal import load_source

    plain = load_source(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    refs = {text: plain_greedy(plain, chat_ids(tok, text), NEW_TOKENS) for text in PROMPTS}
    prompts, steps = [], {False: [], True: []}
    for prepared, threads in ((False, 1), (True, None)):
        a, b = servers(path, threads)
        with a, b, Servers([a.url, b.url]) as conn, one_thread():
            p3 = SharesModel(path, conn, 2)
            for text in PROMPTS:
                ids = chat_ids(tok, text)
                want, ref_logits, gaps, _ = refs[text]
                if prepared:  # the offline phase for this request, before it is sent
                    conn.prepare(p3.plan(len(ids), NEW_TOKENS))
                marks, snaps = [], []

                def mark(_token):
                    marks.append((time.perf_counter(), time.thread_time()))
                    snaps.append(conn.stats.copy())

                t0 = time.perf_counter()
                g = p3.generate(ids, NEW_TOKENS, keep_logits=True, on_token=mark, stop_at_eos=False)
                first = next((i for i, (x, y) in enumerate(zip(g.token_ids, want)) if x != y), None)
                err = max(float((a_ - b_).abs().max()) for a_, b_ in zip(g.logits, ref_logits))
                prompts.append({"prompt": text, "prepared": prepared, "prompt_tokens": len(ids), "identical": first is None,
                                "first_divergence": first, "gap_at_divergence": None if first is None else gaps[first],
                                "max_abs_logit_error": err, "prefill_s": marks[0][0] - t0,
                                "text": tok.decode(g.token_ids, skip_special_tokens=True)})  # fmt: skip
                for i in range(1, len(marks)):  # decode steps: token i-1 in, token i out
                    d = snaps[i].since(snaps[i - 1])
                    steps[prepared].append({"seconds": marks[i][0] - marks[i - 1][0], "cpu": marks[i][1] - marks[i - 1][1],
                                            "rounds": d.rounds, "up": d.bytes_up, "down": d.bytes_down, "wait": d.wait_seconds,
                                            "share": d.share_seconds, "server": d.server_seconds})  # fmt: skip
                log(f"  {text!r}{' (prepared)' if prepared else ''}: identical={first is None}, max logit error {err:.1e}, "
                    f"prefill {marks[0][0] - t0:.2f} s")
    out = {"prompts": prompts, "new_tokens": NEW_TOKENS, "identical": sum(p["identical"] for p in prompts),
           "runs": len(prompts), "max_abs_logit_error": max(p["max_abs_logit_error"] for p in prompts)}  # fmt: skip
    for prepared, key in ((False, "per_token"), (True, "per_token_prepared")):
        st = steps[prepared]
        server = 1 if prepared else 0  # the server that carries the online traffic
        med = lambda f: statistics.median(f(x) for x in st)  # noqa: E731
        out[key] = {"steps": len(st), "latency_s": med(lambda x: x["seconds"]), "rounds": med(lambda x: x["rounds"]),
                    "bytes_up_per_server": med(lambda x: x["up"][server]), "bytes_down_per_server": med(lambda x: x["down"][server]),
                    "p3_wall_s": med(lambda x: x["seconds"] - x["wait"]),  # everything P3 does itself, as the clock sees it
                    "p3_cpu_s": med(lambda x: x["cpu"]),  # P3's thread on a core
                    "p3_sharing_s": med(lambda x: x["share"]),  # of which: encode, mask, frame, decode
                    "server_matmul_s": med(lambda x: max(x["server"])), "wait_s": med(lambda x: x["wait"])}  # fmt: skip
    return out


def _per_token(p3, conn, ids, steps: int, prepared: bool) -> dict:
    """One generation: the median decode step's latency, rounds and bytes of the busier server."""
    if prepared:
        conn.prepare(p3.plan(len(ids), steps + 1))
    marks, snaps = [], []
    p3.generate(ids, steps + 1, on_token=lambda _t: (marks.append(time.perf_counter()), snaps.append(conn.stats.copy())), stop_at_eos=False)
    ds = [snaps[i].since(snaps[i - 1]) for i in range(1, len(snaps))]
    server = 1 if prepared else 0
    return {"latency_s": statistics.median(marks[i] - marks[i - 1] for i in range(1, len(marks))),
            "rounds": statistics.median(d.rounds for d in ds), "up": statistics.median(d.bytes_up[server] for d in ds),
            "down": statistics.median(d.bytes_down[server] for d in ds)}  # fmt: skip


def _per_pass(p3, conn, ids, prepared: bool) -> dict:
    times, last = [], None
    for i in range(PASSES + 1):  # the first warms up
        if prepared:
            conn.prepare(p3.plan(ids.shape[1]))
        before, t0 = conn.stats.copy(), time.perf_counter()
        p3.forward(ids)
        if i:
            times.append(time.perf_counter() - t0)
        last = conn.stats.since(before)
    server = 1 if prepared else 0
    return {"latency_s": statistics.median(times), "rounds": last.rounds, "up": last.bytes_up[server], "down": last.bytes_down[server]}


def networks(llm_path, encoder_path, tokens: int, log) -> list[dict]:
    """Every (model, schedule, masks, network) cell, measured through relay processes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_path)
    prompt = chat_ids(tok, PROMPTS[0])
    enc_ids = torch.randint(1000, 30000, (1, tokens), generator=torch.Generator().manual_seed(0))
    cells = []
    for model, path in (("smollm2", llm_path), ("minilm", encoder_path)):
        for prepared, threads in ((False, 1), (True, None)):
            a, b = servers(path, threads)
            with a, b:
                for net, (rtt, bandwidth) in NETWORKS.items():
                    from contextlib import ExitStack

                    with ExitStack() as stack:
                        via = [x.url if not rtt else stack.enter_context(relay.emulated(x.url, rtt, bandwidth)) for x in (a, b)]
                        conn = stack.enter_context(Servers(via, timeout=600))
                        stack.enter_context(one_thread())
                        for rounds in (2, 4):
                            p3 = SharesModel(path, conn, rounds)
                            if model == "smollm2":
                                r = _per_token(p3, conn, prompt, STEPS[net], prepared)
                            else:
                                r = _per_pass(p3, conn, enc_ids, prepared)
                            cells.append({"model": model, "schedule": rounds, "prepared": prepared, "network": net, "rtt_s": rtt,
                                          "bit_per_s": bandwidth, **r})  # fmt: skip
                            log(f"  {model}, {rounds} rounds/layer, {'prepared' if prepared else 'online'}, {net}: "
                                f"{r['latency_s'] * 1e3:,.0f} ms ({r['rounds']:.0f} round trips)")
    for c in cells:  # the estimate: this cell's loopback figure + the network's rounds × RTT + bytes / bandwidth
        base = next(x for x in cells if x["network"] == "loopback" and all(x[k] == c[k] for k in ("model", "schedule", "prepared")))
        transfer = 0.0 if c["bit_per_s"] is None else (c["up"] + c["down"]) * 8 / c["bit_per_s"]
        c["estimate_s"] = base["latency_s"] + c["rounds"] * c["rtt_s"] + transfer
    return cells


def p3_alone(path, log) -> dict:
    """P3's own compute per decode step with nothing else on its cores: the servers' answers
    (right shapes, small random ring elements) replayed from memory, so the time is P3's walk,
    masking, encoding, framing and decoding alone. Plaintext transformers' decode step, one
    thread, for scale."""
    import numpy as np

    from stip.seal import load_source

    a, b = servers(path, 1)
    with a, b, Servers([a.url, b.url]) as conn:
        models = {rounds: SharesModel(path, conn, rounds) for rounds in (2, 4)}
    replies = {}

    def replay(blobs, to=(0, 1), stats=None, links=None):
        out = []
        for blob in blobs:  # the server's side of the exchange, off P3's clock
            t0 = time.perf_counter()
            tensors, meta = wire.decode(blob)
            key = (meta["op"], tensors["x"].shape[0])
            if key not in replies:
                y = torch.from_numpy(np.random.default_rng(0).integers(-(2**40), 2**40, (key[1], conn.ops[key[0]][1])))
                replies[key] = wire.encode({"y": y}, {"seconds": "0"})
            out.append(replies[key])
            off[0] += time.perf_counter() - t0
        conn.stats.rounds += 1
        return [wire.decode(r) for r in out]  # P3 reads the answers: on its clock

    conn._ask = replay  # this instance only: its sockets are closed
    tok = models[2].tokenizer
    ids = chat_ids(tok, PROMPTS[0])
    out = {}
    with one_thread():
        for rounds, p3 in models.items():
            steps = []
            for _ in range(2):  # the first warms up
                off, marks = [0.0], []
                p3.generate(ids, 17, on_token=lambda _t: marks.append((time.perf_counter(), off[0])), stop_at_eos=False)
                steps = [(marks[i][0] - marks[i - 1][0]) - (marks[i][1] - marks[i - 1][1]) for i in range(1, len(marks))]
            out[rounds] = statistics.median(steps)
            log(f"  P3 alone, {rounds} rounds/layer: {out[rounds] * 1e3:.1f} ms per token")
        model = load_source(path)
        with torch.no_grad():
            _, _, _, times = plain_greedy(model, ids, 17)
    return {"p3_alone_s": {str(k): v for k, v in out.items()}, "plaintext_decode_s": statistics.median(times[1:])}


def markdown(r: dict) -> str:
    b, s, m, cells, alone = r["bench"], r["smollm2"], r["minilm"], r["networks"], r["p3"]
    rows = {row["mode"]: row for row in b["rows"]}
    lines = [f"# Shares mode, measured ({r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['date']})", "",
             f"`{r['command']}` — {r['seconds'] / 60:.1f} min.", "", f"## MiniLM, {b['subject']['tokens']} tokens: every mode in one run", "",
             report.table(b), ""]  # fmt: skip
    lines += [f"- {report.LABELS[row['mode']]}: {'; '.join(row['notes'])}" for row in b["rows"] if row["notes"]]
    lines += [f"- {n}" for n in b["notes"]] + [""]
    ratios = [f"{report.LABELS[k]} / plaintext: **{rows[k]['ratio']:,.2f}×**" for k in ("shares", "shares-prepared", "mpc-semi2k") if k in rows]
    lines += ["; ".join(ratios) + ".", "", "With three limbs (`--shares-limbs 3`: the servers' answers exact mod 2^64, at 1.5× "
              "their GEMM work), same run:", "", report.table(r["bench_3_limbs"]), ""]
    lines += ["",
              f"MiniLM sentence embeddings of {m['sentences']} real sentences (2 rounds per layer): cosine with plaintext ≥ **{m['cosine_min']:.7f}**.", "",
              f"## SmolLM2-135M-Instruct, 2 rounds per layer: {len(PROMPTS)} prompts × {s['new_tokens']} greedy tokens, twice (both servers "
              "online, one BLAS thread each; masks prepared, servers on every core)", "",
              f"Identical to plaintext transformers: **{s['identical']}/{s['runs']}** runs; max |logit error| **{s['max_abs_logit_error']:.1e}**.", "",
              "| prompt | masks | prompt tokens | identical | max logit error | prefill |", "|---|---|---|---|---|---|"]  # fmt: skip
    for p in s["prompts"]:
        same = "yes" if p["identical"] else f"no: token {p['first_divergence']} (top-2 gap {p['gap_at_divergence']:.1e})"
        lines.append(f"| {p['prompt']} | {'prepared' if p['prepared'] else 'online'} | {p['prompt_tokens']} | {same} | "
                     f"{p['max_abs_logit_error']:.1e} | {p['prefill_s']:.2f} s |")
    kb = lambda n: f"{n / 1e3:,.0f} kB"  # noqa: E731
    ms = lambda x: f"{x * 1e3:,.0f} ms"  # noqa: E731
    a, p = s["per_token"], s["per_token_prepared"]
    lines += ["", f"Per generated token on loopback, 2 rounds per layer (median over {a['steps']} decode steps each):", "",
              "| per token | both servers online | masks prepared (online: S2 alone) |", "|---|---|---|",
              f"| latency, P3 and both servers on this machine | {ms(a['latency_s'])} | {ms(p['latency_s'])} |",
              f"| round trips | {a['rounds']:.0f} | {p['rounds']:.0f} |",
              f"| bytes to / from one server | {kb(a['bytes_up_per_server'])} / {kb(a['bytes_down_per_server'])} | "
              f"{kb(p['bytes_up_per_server'])} / {kb(p['bytes_down_per_server'])} (S1: none) |",
              f"| P3's wall time outside the waits | {ms(a['p3_wall_s'])} | {ms(p['p3_wall_s'])} |",
              f"| P3's thread CPU time | {ms(a['p3_cpu_s'])} | {ms(p['p3_cpu_s'])} |",
              f"| of which encode, mask, frame, decode | {ms(a['p3_sharing_s'])} | {ms(p['p3_sharing_s'])} |",
              f"| a server's matmuls (the slower) | {ms(a['server_matmul_s'])} | {ms(p['server_matmul_s'])} |", ""]  # fmt: skip
    pd = alone["plaintext_decode_s"]
    lines += [f"P3's own compute per token with the servers' answers replayed from memory (nothing else on its cores): "
              f"**{ms(alone['p3_alone_s']['2'])}** at 2 rounds per layer, {ms(alone['p3_alone_s']['4'])} at 4; plaintext transformers "
              f"decodes a token in {ms(pd)} on one thread here: **{alone['p3_alone_s']['2'] / pd:.2f}×** and "
              f"{alone['p3_alone_s']['4'] / pd:.2f}×.", ""]  # fmt: skip
    for model, unit in (("smollm2", "per generated token"), ("minilm", f"per {b['subject']['tokens']}-token pass")):
        lines += [f"## {'SmolLM2' if model == 'smollm2' else 'MiniLM'}, {unit}: measured through relays (estimate)", "",
                  "| rounds per layer | masks | round trips | bytes up / down (busier server) | " + " | ".join(NETWORKS) + " |",
                  "|---|---|---|---|" + "---|" * len(NETWORKS)]  # fmt: skip
        for rounds in (2, 4):
            for prepared in (False, True):
                row = {c["network"]: c for c in cells if c["model"] == model and c["schedule"] == rounds and c["prepared"] == prepared}
                lo = row["loopback"]
                nets = [ms(row[n]["latency_s"]) + ("" if n == "loopback" else f" ({ms(row[n]['estimate_s'])})") for n in NETWORKS]
                lines.append(f"| {rounds} | {'prepared' if prepared else 'online'} | {lo['rounds']:.0f} | {kb(lo['up'])} / {kb(lo['down'])} | "
                             + " | ".join(nets) + " |")
        lines.append("")
    lines += ["Networks: " + "; ".join(f"{n} {rtt * 1e3:g} ms RTT" + (f", {bw / 1e6:g} Mbit/s" if bw else "") for n, (rtt, bw) in NETWORKS.items()
                                       if rtt) + ". One relay process per server; no loss, no congestion window."]  # fmt: skip
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
    bench3 = bench_run(Settings(tokens=args.tokens, modes=("plain", "shares"), out=args.out, shares_limbs=3), progress=log)
    log("MiniLM embeddings of real sentences")
    minilm = minilm_cosine(default.path())
    log("SmolLM2: greedy against plaintext, per-token costs")
    llm = smollm2(chat.path(), log)
    log("both schedules over emulated networks")
    cells = networks(chat.path(), default.path(), args.tokens, log)
    log("P3's own compute, alone")
    alone = p3_alone(chat.path(), log)
    result = {"command": "python benchmarks/shares.py " + " ".join(sys.argv[1:]), "machine": report.machine(), "bench": bench,
              "bench_3_limbs": bench3, "minilm": minilm, "smollm2": llm, "networks": cells, "p3": alone,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    write(args.out, result, markdown)
    return 0


def write(out: Path, result: dict, render) -> None:
    """DIR/results.json and DIR/report.md (``render(result)``), and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(render(result))
    print(render(result))
    print(f"wrote {out}/results.json and report.md")


if __name__ == "__main__":
    sys.exit(main())
