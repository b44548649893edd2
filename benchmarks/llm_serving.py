"""Sealed vs unsealed SmolLM2-135M-Instruct on the same vLLM settings, beside today's
`stip serve` path, in one run.

    python benchmarks/llm_serving.py [--rounds 3] [--tokens 128] [--streams 1,16] [--out DIR]

Two vLLM engines (vLLM's default settings: compiled, 1 GiB KV cache) serve the token-mode
sealed checkpoint and the unsealed one; loads alternate between them, round by round, so
all see the same machine state (each load first, middle and last in turn), with a pause
before each so that the other engine is idle. Each load is N concurrent streams of 128 new tokens
(ignore_eos, greedy), one chat prompt per stream. Measured per load: aggregate tok/s, time to
first token (TTFT) and inter-token latency (ITL), p50 and p95, from the client's side:
  direct   raw /v1/completions SSE with token-id prompts (the engine's own cost)
  proxy    the same SSE client through `stip proxy`'s chat route (sealed only: P3's real
           path), with the proxy process's own CPU time per token
  stip serve  the same model sealed in embedding mode on `stip serve`, P3's Client.generate
Writes DIR/results.json and DIR/report.md (default benchmarks/results/llm_serving).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx

from stip.bench.serving import PROMPTS, cpu_seconds, load, summary


# A vLLM CPU worker keeps polling its core for 1–3 s after a load (measured here); the two
# engines share the machine, so each load waits for the other engine to go idle.
SETTLE_S = 5.0


def direct(engine, prompts: list[list[int]], n: int) -> dict:
    bodies = [{"model": engine.name, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True,
               "stream": True, "return_token_ids": True} for p in prompts]  # fmt: skip
    return _summary(asyncio.run(load(f"{engine.url}/v1/completions", bodies, _count)))


def via_proxy(proxy_url: str, model: str, texts: list[str], n: int) -> dict:
    bodies = [{"model": model, "messages": [{"role": "user", "content": t}], "max_tokens": n, "temperature": 0,
               "ignore_eos": True, "stream": True, "return_token_ids": True} for t in texts]  # fmt: skip
    return _summary(asyncio.run(load(f"{proxy_url}/v1/chat/completions", bodies, _count)))


def _count(chunk: dict) -> int:
    return len(chunk["choices"][0].get("token_ids") or []) if chunk.get("choices") else 0


def _summary(m: dict) -> dict:
    m.pop("each")  # the streams' own ids and stamps: not kept
    return m


def stip_serve(client_dir: Path, url: str, prompts: list[list[int]], n: int) -> dict:
    """Embedding mode on `stip serve`: one Client per stream, threads, greedy, no EOS stop."""
    from stip.client.api import Client

    def one(ids):
        stamps = []
        with Client(client_dir, url) as c:
            c.info()
            t0 = time.perf_counter()
            c.generate(ids, n, stop_at_eos=False, on_token=lambda _: stamps.append(time.perf_counter()))
        return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps)}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        streams = list(pool.map(one, prompts))
    return summary(streams, time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per load")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per stream")
    ap.add_argument("--streams", default="1,16", help="concurrent streams per load, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_serving"))
    ap.add_argument("--skip-stip-serve", action="store_true", help="leave out the stip serve path")
    ap.add_argument("--eager", action="store_true", help="vLLM --enforce-eager (starts in ~1 min instead of ~3; slower decoding)")
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]

    from transformers import AutoTokenizer

    from stip.client.bundle import ClientBundle
    from stip.models import chat
    from stip.seal import CLIENT, SERVER, seal_folder
    from stip.serve.process import ServerProcess
    from stip.serve.vllm import VLLMProcess

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    src = chat.path(step=say)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    ids = [list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)["input_ids"]) for p in PROMPTS]
    results: dict = {"model": chat.NAME, "tokens_per_stream": args.tokens, "rounds": args.rounds, "loads": {},
                     "vllm": "--enforce-eager" if args.eager else "defaults (torch.compile)",
                     "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
                     "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="stip-llm-bench-") as tmp:
        tmp = Path(tmp)
        sealed = seal_folder(src, tmp / "tokens", mode="tokens")
        say(f"sealed (token mode), fingerprint {sealed.key.fingerprint[:16]}…; starting two vLLM engines (compiling, minutes) …")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            extra = ("--enforce-eager",) if args.eager else ()
            fs = pool.submit(VLLMProcess, tmp / "tokens" / SERVER, args=extra), pool.submit(VLLMProcess, src, name="unsealed", args=extra)
            engines = {"sealed": fs[0].result(), "unsealed": fs[1].result()}
        results["engine_start_s"] = {k: e.ready_seconds for k, e in engines.items()}
        say(f"engines ready in {time.perf_counter() - t0:.0f} s")
        rows: dict = {}
        bundle = ClientBundle.load(tmp / "tokens" / CLIENT)
        sent = {"sealed": [bundle.rename_ids(p) for p in ids], "unsealed": ids}  # what each engine is sent
        try:
            with ServerProcess(tmp / "tokens" / CLIENT, "--upstream", engines["sealed"].url, command="proxy", timeout=180) as proxy:
                model = httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"]
                for name, e in engines.items():  # warm-up
                    direct(e, sent[name][:2], 8)
                via_proxy(proxy.url, model, PROMPTS[:2], 8)
                loads = {
                    ("sealed", "direct"): lambda n: direct(engines["sealed"], [sent["sealed"][i % len(ids)] for i in range(n)], args.tokens),
                    ("unsealed", "direct"): lambda n: direct(engines["unsealed"], [sent["unsealed"][i % len(ids)] for i in range(n)], args.tokens),
                    ("sealed", "proxy"): lambda n: via_proxy(proxy.url, model, [PROMPTS[i % len(PROMPTS)] for i in range(n)], args.tokens),
                }  # fmt: skip
                keys = list(loads)
                for n in levels:
                    for r in range(args.rounds):
                        for name, path in keys[r % 3 :] + keys[: r % 3]:  # each load first, middle, last in turn
                            time.sleep(SETTLE_S)
                            cpu = cpu_seconds(proxy.proc.pid)
                            m = loads[(name, path)](n)
                            if path == "proxy":
                                m["proxy_cpu_ms_per_token"] = (cpu_seconds(proxy.proc.pid) - cpu) / m["tokens"] * 1e3
                            rows.setdefault((name, path, n), []).append(m)
                            say(f"{n:>2} streams, round {r + 1}, {name:<8} {path:<6}: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, ITL p50 {m['itl_p50_ms']:.1f} ms")
        finally:
            for e in engines.values():
                e.stop()
        if not args.skip_stip_serve:
            seal_folder(src, tmp / "embeddings")
            say("stip serve (embedding mode) …")
            with ServerProcess(tmp / "embeddings" / SERVER, "--max-sessions", "64", timeout=300) as srv:
                stip_serve(tmp / "embeddings" / CLIENT, srv.url, ids[:1], 4)  # warm-up
                for n in levels:
                    m = stip_serve(tmp / "embeddings" / CLIENT, srv.url, [ids[i % len(ids)] for i in range(n)], args.tokens)
                    rows[("sealed", "stip serve", n)] = [m]
                    say(f"{n:>2} streams, sealed stip serve: {m['tok_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_ms']:.0f} ms, ITL p50 {m['itl_p50_ms']:.1f} ms")

    # per load: the median round by aggregate tok/s; sealed/unsealed = median of per-round ratios
    for (name, path, n), ms in rows.items():
        best = sorted(ms, key=lambda m: m["tok_s"])[len(ms) // 2]
        results["loads"][f"{name} {path} {n}"] = {"model": name, "path": path, **best, "rounds_tok_s": [m["tok_s"] for m in ms]}
    ratios = {}
    for n in levels:
        pairs = zip(rows[("sealed", "direct", n)], rows[("unsealed", "direct", n)])
        ratios[n] = statistics.median(s["tok_s"] / u["tok_s"] for s, u in pairs)
        if ("sealed", "stip serve", n) in rows:
            results.setdefault("engine_vs_stip_serve", {})[n] = (
                results["loads"][f"sealed direct {n}"]["tok_s"] / results["loads"][f"sealed stip serve {n}"]["tok_s"])
    results["sealed_over_unsealed_tok_s"] = ratios
    results["proxy_over_direct_tok_s"] = {n: statistics.median(p["tok_s"] / d["tok_s"] for p, d in
                                                               zip(rows[("sealed", "proxy", n)], rows[("sealed", "direct", n)])) for n in levels}  # fmt: skip
    results["proxy_cpu_ms_per_token"] = {n: statistics.median(m["proxy_cpu_ms_per_token"] for m in rows[("sealed", "proxy", n)]) for n in levels}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(report(results) + "\n")
    say(report(results))
    return 0 if all(r >= 0.95 for r in [*ratios.values(), *results["proxy_over_direct_tok_s"].values()]) else 1


def report(r: dict) -> str:
    lines = [f"`python benchmarks/llm_serving.py` — {r['model']}, {r['tokens_per_stream']} new tokens per stream, "
             f"greedy, {r['rounds']} alternating rounds (median round shown); vLLM {r['vllm']}; {r['machine']}, {r['date']}.", "",
             "| model | path | streams | aggregate tok/s | TTFT p50 | TTFT p95 | ITL p50 | ITL p95 |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in r["loads"].values():
        lines.append(f"| {m['model']} | {m['path']} | {m['streams']} | {m['tok_s']:.1f} | {m['ttft_p50_ms']:.0f} ms | {m['ttft_p95_ms']:.0f} ms | "
                     f"{m['itl_p50_ms']:.1f} ms | {m['itl_p95_ms']:.1f} ms |")  # fmt: skip
    lines.append("")
    for n, x in r["sealed_over_unsealed_tok_s"].items():
        lines.append(f"- {n} stream(s): sealed / unsealed aggregate tok/s on vLLM = **{x:.3f}** (median of per-round ratios; target ≥ 0.95)")
    for n, x in r["proxy_over_direct_tok_s"].items():
        lines.append(f"- {n} stream(s): through `stip proxy` / direct, sealed, aggregate tok/s = **{x:.3f}** (median of per-round ratios; target ≥ 0.95); "
                     f"the proxy's own CPU: {r['proxy_cpu_ms_per_token'][n]:.2f} ms per token")
    for n, x in r.get("engine_vs_stip_serve", {}).items():
        lines.append(f"- {n} stream(s): vLLM (sealed, direct) is **{x:.1f}×** the sealed `stip serve` path's tok/s")
    lines.append(f"- engine start: {', '.join(f'{k} {v:.0f} s' for k, v in r['engine_start_s'].items())} (started together)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
