"""Shares mode at serving scale: a share server's capacity with many users, batching on and
off, end-to-end streams through `stip proxy`, and plaintext vLLM beside them, in one run.

    python benchmarks/shares_serving.py [--seconds 10] [--streams 1,4,16,64] [--tokens 32]
                                        [--e2e-streams 1,16] [--skip-vllm] [--out DIR]

1. Capacity (the servers alone). One `stip share-server` process (all cores), batching on, then
   off (`--no-batch`); both, and the byte-counting server below, start before the first load and
   wait idle until their turn. A load generator (`stip.bench.serving.replay`) opens N connections, each
   replaying one SmolLM2 decode step's exact (op, rows) sequence with fresh uniform shares, for
   ``--seconds``. Per level: tokens per second per server, step latency p50/p95, the server's
   CPU seconds per token (/proc), bytes per token, and the generator's own CPU (it shares the cores).
2. End to end. S1 and S2 (batching on, one BLAS thread each) and `stip proxy --shares` on this
   machine; N concurrent chat streams of ``--tokens`` greedy tokens (ignore_eos) by SSE: aggregate
   tok/s, TTFT, ITL p50/p95, P3's CPU seconds per token (the proxy process) and the servers'.
   Exactness: every stream of the largest load equals its prompt's single-stream run, token for token.
   Privacy: S1 counts every byte of every share it received (`--byte-counts`): the chi-square
   uniformity test on all of them. The same on a load-generator run at 16 streams, on a server
   of its own (counting costs CPU: the capacity runs do not count).
3. vLLM, plaintext, its default settings, the same cores, the same prompts and concurrency.

Writes DIR/results.json and DIR/report.md (default benchmarks/results/shares_serving).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from stip.bench.serving import PROMPTS, decode_step, load, replay, tree_cpu_seconds

SETTLE_S = 3.0  # between loads: the previous one's stragglers and vLLM's polling workers go quiet (--settle)


def say(*a) -> None:
    print(*a, flush=True)


def _count(chunk: dict) -> int:
    return len(chunk["choices"][0].get("token_ids") or []) if chunk.get("choices") else 0


def chat_load(url: str, model: str, texts: list[str], n: int) -> dict:
    bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "max_tokens": n, "temperature": 0,
               "ignore_eos": True, "stream": True, "return_token_ids": True} for t in texts]  # fmt: skip
    return asyncio.run(load(f"{url}/v1/chat/completions", bodies, _count))


def completion_load(url: str, model: str, prompts: list[list[int]], n: int) -> dict:
    bodies = [{"model": model, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
               "return_token_ids": True} for p in prompts]  # fmt: skip
    return asyncio.run(load(f"{url}/v1/completions", bodies, _count))


def _measured(fn, pids: dict[str, int]) -> tuple[dict, dict]:
    """fn()'s result and the CPU seconds each named process (and its children) spent on it."""
    before = {k: tree_cpu_seconds(p) for k, p in pids.items()}
    out = fn()
    return out, {k: tree_cpu_seconds(p) - before[k] for k, p in pids.items()}


def share_servers(src: Path, *flags: tuple[str, ...]):
    """One `stip share-server` process per tuple of extra flags, started side by side before
    anything is measured; a started server waiting in accept costs nothing while another is measured."""
    from stip.serve.process import ServerProcess, side_by_side

    return side_by_side(*(lambda f=f: ServerProcess(src, *f, command="share-server", timeout=300) for f in flags))


def capacity(servers: dict[str, object], step, levels: list[int], seconds: float, settle: float = SETTLE_S) -> dict:
    """``servers``: label → a running share server (batching "on", or "off": `--no-batch`)."""
    out = {}
    for label, server in servers.items():
        replay(server.url, step, 1, 1.0, warmup=0.5)  # warm-up: first touches of the weights
        for n in levels:
            time.sleep(settle)
            r = replay(server.url, step, n, seconds, pid=server.proc.pid)
            out[f"{label} {n}"] = {"batching": label == "on", **r.as_dict()}
            say(f"capacity, batching {label:>3}, {n:>2} streams: {r.tok_s:6.1f} tok/s per server, step p50 {r.step_p50_ms:6.1f} ms "
                f"p95 {r.step_p95_ms:6.1f} ms, server CPU {r.server_cpu_s_per_token * 1e3:.1f} ms/token, generator CPU {r.generator_cpu_s:.1f} s")  # fmt: skip
        server.proc.terminate()  # SIGTERM: drain, then the batching summary
        server.proc.wait(60)
        out[f"{label} log"] = [line.split(": ", 1)[-1].strip() for line in server.stderr.splitlines() if "batching:" in line]
    return out


def counted_load(server, step, streams: int, seconds: float) -> dict:
    """A load run on a server that counts every byte it receives (`--byte-counts`): kept apart
    from the capacity runs, whose figures the counting would lower."""
    r = replay(server.url, step, streams, seconds, pid=server.proc.pid)
    server.proc.terminate()  # SIGTERM: the counts are written on the way out
    server.proc.wait(60)
    say(f"a {streams}-stream load on a server counting its bytes: {r.tok_s:.1f} tok/s")
    return r.as_dict()


def end_to_end(src: Path, levels: list[int], tokens: int, counts: Path, settle: float = SETTLE_S) -> dict:
    import httpx

    from stip.serve.process import ServerProcess

    result: dict = {"loads": {}}
    with share_servers(src, ("--threads", "1", "--byte-counts", str(counts)), ("--threads", "1")) as (s1, s2):
        a, b = (s.url.removeprefix("tcp://") for s in (s1, s2))
        with ServerProcess(src, "--shares", f"{a},{b}", "--streams", str(max(levels)), command="proxy", timeout=300) as proxy:
            model = httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"]
            pids = {"p3": proxy.proc.pid, "s1": s1.proc.pid, "s2": s2.proc.pid}
            chat_load(proxy.url, model, PROMPTS[: max(levels)], 2)  # warm-up: every walker connected
            single = {}
            for n in levels:
                time.sleep(settle)
                m, cpu = _measured(lambda n=n: chat_load(proxy.url, model, [PROMPTS[i % len(PROMPTS)] for i in range(n)], tokens), pids)
                ids = [s["ids"] for s in m.pop("each")]
                m |= {"p3_cpu_s_per_token": cpu["p3"] / m["tokens"], "server_cpu_s_per_token": (cpu["s1"] + cpu["s2"]) / 2 / m["tokens"]}
                result["loads"][n] = m
                if n == 1:
                    single[PROMPTS[0]] = ids[0]
                say(f"end to end, {n:>2} streams: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, ITL p50 {m['itl_p50_ms']:.0f} ms "
                    f"p95 {m['itl_p95_ms']:.0f} ms, P3 CPU {m['p3_cpu_s_per_token'] * 1e3:.0f} ms/token, each server {m['server_cpu_s_per_token'] * 1e3:.0f} ms/token")  # fmt: skip
                last = (n, ids)
            n, ids = last
            say(f"exactness: {n} single-stream runs to compare with …")
            for i in range(n):
                text = PROMPTS[i % len(PROMPTS)]
                if text not in single:
                    single[text] = chat_load(proxy.url, model, [text], tokens)["each"][0]["ids"]
            same = [ids[i] == single[PROMPTS[i % len(PROMPTS)]] for i in range(n)]
            result["exact"] = {"streams": n, "tokens": tokens, "identical": sum(same), "all_identical": all(same),
                               "lengths": sorted({len(x) for x in ids})}  # fmt: skip
            say(f"exactness: {sum(same)}/{n} concurrent streams identical to their single-stream runs")
        s1.proc.terminate()
        s1.proc.wait(60)
    return result


def vllm(src: Path, levels: list[int], tokens: int, settle: float = SETTLE_S) -> dict:
    from transformers import AutoTokenizer

    from stip.serve.vllm import VLLMProcess

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)["input_ids"]) for p in PROMPTS]
    say("starting vLLM (its defaults: compiled; minutes) …")
    engine = VLLMProcess(src, name="plain")
    out = {"start_s": engine.ready_seconds, "loads": {}}
    try:
        completion_load(engine.url, engine.name, ids[:2], 8)  # warm-up
        for n in levels:
            time.sleep(settle)
            m, cpu = _measured(lambda n=n: completion_load(engine.url, engine.name, [ids[i % len(ids)] for i in range(n)], tokens),
                               {"vllm": engine.proc.pid})  # fmt: skip
            m.pop("each")
            m["server_cpu_s_per_token"] = cpu["vllm"] / m["tokens"]
            out["loads"][n] = m
            say(f"vLLM, {n:>2} streams: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, ITL p50 {m['itl_p50_ms']:.1f} ms, "
                f"CPU {m['server_cpu_s_per_token'] * 1e3:.0f} ms/token")  # fmt: skip
    finally:
        engine.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per capacity level")
    ap.add_argument("--streams", default="1,4,16,64", help="capacity levels: concurrent decode streams, comma-separated")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per end-to-end and vLLM stream")
    ap.add_argument("--e2e-streams", default="1,16", help="end-to-end and vLLM levels, comma-separated")
    ap.add_argument("--skip-vllm", action="store_true", help="leave out plaintext vLLM")
    ap.add_argument("--skip-e2e", action="store_true", help="leave out the end-to-end streams through stip proxy")
    ap.add_argument("--settle", type=float, default=SETTLE_S, help="seconds of quiet before each load")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/shares_serving"))
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    e2e_levels = [int(x) for x in args.e2e_streams.split(",")]
    if any(n < 1 for n in levels + e2e_levels) or args.seconds <= 0 or args.tokens < 1 or args.settle < 0:
        ap.error("stream counts, --seconds and --tokens must be positive, --settle not negative")

    from stip.attacks.shares import uniformity_of_counts
    from stip.models import chat

    src = chat.path(step=say)
    step = decode_step(src)
    results: dict = {"model": chat.NAME, "decode_step": {"requests": len(step), "rows": sum(n for _, n in step)},
                     "seconds_per_level": args.seconds, "tokens_per_stream": args.tokens,
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                     "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    say(f"{chat.NAME}: a decode step is {len(step)} matmul requests; capacity at {levels} streams, {args.seconds:g} s each")
    with tempfile.TemporaryDirectory(prefix="stip-shares-serving-") as tmp:
        load_counts, e2e_counts = Path(tmp) / "load.json", Path(tmp) / "e2e.json"
        with share_servers(src, (), ("--no-batch",), ("--byte-counts", str(load_counts))) as (on, off, counting):
            results["capacity"] = capacity({"on": on, "off": off}, step, levels, args.seconds, args.settle)
            results["counted_load"] = counted_load(counting, step, min(16, max(levels)), args.seconds)
        if not args.skip_e2e:
            results["e2e"] = end_to_end(src, e2e_levels, args.tokens, e2e_counts, args.settle)
        results["uniformity"] = {}
        for name, f in (("load run, S1", load_counts), ("end to end, S1", e2e_counts)):
            if f.is_file():
                c = json.loads(f.read_text())
                results["uniformity"][name] = {"elements": c["elements"], **uniformity_of_counts(c["counts"])}
    if not args.skip_vllm:
        results["vllm"] = vllm(src, e2e_levels, args.tokens, args.settle)

    cap = results["capacity"]
    lo, hi = min(levels), (16 if 16 in levels else max(levels))
    results["batching_gain"] = cap[f"on {hi}"]["tok_s"] / cap[f"on {lo}"]["tok_s"]
    results["unbatched_gain"] = cap[f"off {hi}"]["tok_s"] / cap[f"off {lo}"]["tok_s"]
    if "vllm" in results and hi in results["vllm"]["loads"]:
        results["over_vllm"] = cap[f"on {hi}"]["tok_s"] / results["vllm"]["loads"][hi]["tok_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(report(results, lo, hi) + "\n")
    say(report(results, lo, hi))
    exact = results.get("e2e", {}).get("exact", {}).get("all_identical", True)
    uniform = all(u["passed"] == 1.0 for u in results["uniformity"].values())
    return 0 if exact and uniform else 1


def _ms(x: float) -> str:
    return "—" if x != x else f"{x:.0f} ms"  # NaN: no whole step began and ended in the window


def report(r: dict, lo: int, hi: int) -> str:
    lines = [f"`python benchmarks/shares_serving.py` — {r['model']}; {r['machine']}, {r['date']}.", "",
             f"**Capacity**: one share server (all cores), a load generator replaying a decode step ({r['decode_step']['requests']} "
             f"requests) per stream with fresh shares, {r['seconds_per_level']:g} s per level.", "",
             "| batching | streams | tok/s per server | step p50 | step p95 | server CPU / token | bytes / token | generator CPU |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, m in r["capacity"].items():
        if k.endswith("log"):
            continue
        lines.append(f"| {'on' if m['batching'] else 'off'} | {m['streams']} | {m['tok_s']:.1f} | {_ms(m['step_p50_ms'])} | {_ms(m['step_p95_ms'])} | "
                     f"{m['server_cpu_s_per_token'] * 1e3:.1f} ms | {m['bytes_per_token'] / 1e3:.1f} kB | {m['generator_cpu_s']:.1f} s |")  # fmt: skip
    lines += ["", f"- batching on: {hi} streams give **{r['batching_gain']:.1f}×** the capacity of {lo} (target ≥ 5); "
              f"off: {r['unbatched_gain']:.1f}×"]  # fmt: skip
    for k in ("on log", "off log"):
        for line in r["capacity"].get(k, []):
            lines.append(f"- server log ({k[:-4]}): {line}")
    if "over_vllm" in r:
        lines.append(f"- share-server capacity at {hi} streams / plaintext vLLM's aggregate at {hi}: **{r['over_vllm']:.2f}** (goal ≥ 0.5)")
    rows = [("shares, end to end (stip proxy, P3 on this machine)", r.get("e2e", {}).get("loads", {})),
            ("plaintext vLLM", r.get("vllm", {}).get("loads", {}))]
    if any(x for _, x in rows):
        lines += ["", f"**Streams**: {r['tokens_per_stream']} greedy tokens each (ignore_eos), SSE, on the same cores.", "",
                  "| path | streams | aggregate tok/s | TTFT p50 | ITL p50 | ITL p95 | server CPU / token | P3 CPU / token | bytes / token (client) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, loads in rows:
            for n, m in loads.items():
                p3 = f"{m['p3_cpu_s_per_token'] * 1e3:.0f} ms" if "p3_cpu_s_per_token" in m else "—"
                lines.append(f"| {name} | {n} | {m['tok_s']:.1f} | {m['ttft_p50_ms']:.0f} ms | {m['itl_p50_ms']:.0f} ms | {m['itl_p95_ms']:.0f} ms | "
                             f"{m['server_cpu_s_per_token'] * 1e3:.0f} ms | {p3} | {m['bytes_per_token']:.0f} B |")  # fmt: skip
    if "e2e" in r:
        e = r["e2e"]["exact"]
        lines.append(f"\n- exactness: {e['identical']}/{e['streams']} concurrent streams of {e['tokens']} greedy tokens identical to their single-stream runs")
    for name, u in r["uniformity"].items():
        lines.append(f"- uniformity, {name}: {u['bytes']:,} bytes of shares received, chi-square p = {u['p']:.3f}, "
                     f"least byte position p = {u['p_min_position']:.3f}; {u['passed'] * 9:.0f}/9 tests pass")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
