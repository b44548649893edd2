"""A private LoRA fine-tune in shares mode, in one run (about 45 minutes on 2 cores with the
adapter's training; about 25 when OUT/adapter is already trained).

1. `stip train lora OUT/adapter`: a rank-16 LoRA on all seven projections of SmolLM2-135M-
   Instruct, on CPython's docs, on CPU; held-out perplexity (test split) before and after.
   Reused when OUT/adapter holds a finished run.
2. Equality: shares mode with the adapter on P3 against PEFT's merged model in plaintext
   transformers, 5 chat prompts × 32 greedy tokens, on both schedules (2 and 4 round trips per
   layer); tokens, logits, and how many greedy tokens the adapter changes against the base.
3. Cost per generated token on loopback, with and without the adapter, both schedules: latency,
   round trips and bytes per server (the same with and without), and P3's time on the adapter's
   products (`Walk.adapter_seconds`).
4. What a server sees with the adapter in use: the shares attack suite (`stip attack shares
   --adapter`), each attack on S1's and S2's view and on the controls, and byte uniformity.
5. STIP on the same fine-tune: the adapter merged into the weights, sealed; weight matching
   against the public base recovers π and decrypts the traffic (`stip attack weights`).

    python benchmarks/lora.py [--out benchmarks/results/lora] [--steps 300] [--requests 100]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from shares import NEAR_TIE, NEW_TOKENS, PROMPTS, chat_ids, plain_greedy, servers, write
from stip.bench import report
from stip.models import chat, lora
from stip.shares import Servers, SharesModel, one_thread

TIMED_STEPS = 16  # decode steps timed per cell


def equality(path, adapter_dir, log) -> dict:
    from transformers import AutoTokenizer

    from stip.seal import load_source

    tok = AutoTokenizer.from_pretrained(path)
    base = load_source(path)
    merged = lora.merge(copy.deepcopy(base), adapter_dir)
    ids = {text: chat_ids(tok, text) for text in PROMPTS}
    refs = {text: plain_greedy(merged, ids[text], NEW_TOKENS) for text in PROMPTS}
    base_tokens = {text: plain_greedy(base, ids[text], NEW_TOKENS)[0] for text in PROMPTS}
    changed = {text: sum(a != b for a, b in zip(refs[text][0], base_tokens[text])) for text in PROMPTS}
    runs = []
    a, b = servers(path, 1)
    with a, b, Servers([a.url, b.url]) as conn, one_thread():
        for rounds in (2, 4):
            p3 = SharesModel(path, conn, rounds, adapter_dir)
            for text in PROMPTS:
                want, ref_logits, gaps, _ = refs[text]
                g = p3.generate(ids[text], NEW_TOKENS, keep_logits=True, stop_at_eos=False)
                first = next((i for i, (x, y) in enumerate(zip(g.token_ids, want)) if x != y), None)
                n = len(g.token_ids) if first is None else first + 1  # logits compared up to the first divergence
                err = max(float((x - y).abs().max()) for x, y in zip(g.logits[:n], ref_logits[:n]))
                runs.append({"schedule": rounds, "prompt": text, "identical": first is None, "first_divergence": first,
                             "near_tie": None if first is None else gaps[first] <= NEAR_TIE,
                             "max_abs_logit_error": err, "tokens_changed_by_adapter": changed[text],
                             "text": tok.decode(g.token_ids, skip_special_tokens=True),
                             "base_text": tok.decode(base_tokens[text], skip_special_tokens=True)})  # fmt: skip
                log(f"  {rounds} rounds/layer, {text!r}: identical={first is None}, max logit error {err:.1e}, "
                    f"{changed[text]} of {NEW_TOKENS} tokens changed by the adapter")
    return {"runs": runs, "identical": sum(r["identical"] for r in runs), "count": len(runs),
            "lossless": all(r["identical"] or r["near_tie"] for r in runs),
            "max_abs_logit_error": max(r["max_abs_logit_error"] for r in runs),
            "tokens_changed_by_adapter": sum(changed.values()), "tokens": NEW_TOKENS * len(PROMPTS)}  # fmt: skip


def cost(path, adapter_dir, log) -> list[dict]:
    """Per decode step, with and without the adapter, alternated so drift hits both alike."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = chat_ids(tok, PROMPTS[0])
    cells: dict[tuple, list] = {}
    a, b = servers(path, 1)
    with a, b, Servers([a.url, b.url]) as conn, one_thread():
        models = {(r, ad): SharesModel(path, conn, r, adapter_dir if ad else None) for r in (2, 4) for ad in (False, True)}
        for repeat in range(3):  # the first warms up
            for key, p3 in models.items():
                marks = []
                p3.generate(ids, TIMED_STEPS + 1, min_tokens=TIMED_STEPS + 1,
                            on_token=lambda _t: marks.append((time.perf_counter(), conn.stats.copy(), p3.walk.adapter_seconds)))
                if repeat:
                    for i in range(1, len(marks)):
                        d = marks[i][1].since(marks[i - 1][1])
                        cells.setdefault(key, []).append({"s": marks[i][0] - marks[i - 1][0], "adapter_s": marks[i][2] - marks[i - 1][2],
                                                          "rounds": d.rounds, "up": d.bytes_up[0], "down": d.bytes_down[0]})  # fmt: skip
    out = []
    for (rounds, adapted), steps in cells.items():
        med = lambda k: statistics.median(s[k] for s in steps)  # noqa: E731
        out.append({"schedule": rounds, "adapter": adapted, "steps": len(steps), "latency_s": med("s"), "adapter_s": med("adapter_s"),
                    "rounds": med("rounds"), "bytes_up_per_server": med("up"), "bytes_down_per_server": med("down")})  # fmt: skip
        log(f"  {rounds} rounds/layer, {'with' if adapted else 'without'} the adapter: {med('s') * 1e3:.0f} ms per token, "
            f"adapter {med('adapter_s') * 1e3:.2f} ms, {med('rounds'):.0f} round trips")
    return out


def stip_on_the_merged_fine_tune(path, adapter_dir, work: Path, log) -> dict:
    """STIP cannot keep an adapter apart: P1 seals the merged weights, and P2 matches them
    against the public base."""
    from stip.attacks import scenario
    from stip.seal import copy_preprocessing, load_source, seal_folder

    merged_dir, sealed = work / "merged", work / "sealed"
    lora.merge(load_source(path), adapter_dir).save_pretrained(merged_dir)
    copy_preprocessing(path, merged_dir)
    seal_folder(merged_dir, sealed)
    drift = scenario.drift(merged_dir, path)
    log(f"  merged drift from the base: {100 * drift.recovery_rate:.2f} % of a tensor's std (median)")
    w = scenario.weights(sealed, path)
    log(f"  weight matching: π {100 * w.recovery_rate:.1f} %, tokens decrypted {100 * w.details['tokens_decrypted']:.1f} %")
    return {"drift_median": drift.recovery_rate, "drift_max": drift.details["max"], "pi": w.recovery_rate,
            "tokens_decrypted": w.details["tokens_decrypted"], "tensors_unsealed_rate": w.details["tensors_unsealed_rate"]}  # fmt: skip


def markdown(r: dict) -> str:
    t, e, c, s, a = r["training"], r["equality"], r["cost"], r["stip"], r["attacks"]
    h = t["held_out"]
    ms = lambda x: f"{x * 1e3:,.1f} ms"  # noqa: E731
    lines = [f"# A private LoRA in shares mode ({r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['date']})", "",
             f"`{r['command']}`: {r['seconds'] / 60:.1f} min.", "",
             "## The adapter, trained here", "",
             f"LoRA r={t['rank']}, α={t['alpha']} on {', '.join(t['targets'])} of SmolLM2-135M-Instruct: {t['trainable_parameters']:,} "
             f"parameters; {t['steps']} steps of {t['tokens_per_step']} tokens of CPython's docs in {t['train_seconds'] / 60:.1f} min "
             f"({t['seconds_per_step']:.2f} s a step).", "",
             f"Held-out perplexity ({h['windows']} windows, {h['tokens']:,} tokens of the test split): base **{h['perplexity_base']:.2f}** → "
             f"adapted **{h['perplexity_adapted']:.2f}** ({100 * h['change']:+.1f} %).", "",
             f"## Equality against PEFT's merged model ({len(PROMPTS)} prompts × {NEW_TOKENS} greedy tokens, each schedule)", "",
             f"Identical: **{e['identical']}/{e['count']}** runs; max |logit error| **{e['max_abs_logit_error']:.1e}**; the adapter changes "
             f"**{e['tokens_changed_by_adapter']}** of the {e['tokens']} greedy tokens against the base.", "",
             "| rounds per layer | prompt | identical | max logit error | tokens changed by the adapter |", "|---|---|---|---|---|"]  # fmt: skip
    for x in e["runs"]:
        same = "yes" if x["identical"] else f"no: token {x['first_divergence']} ({'near-tie' if x['near_tie'] else 'not a tie'})"
        lines.append(f"| {x['schedule']} | {x['prompt']} | {same} | {x['max_abs_logit_error']:.1e} | {x['tokens_changed_by_adapter']} |")
    lines += ["", "## Cost per generated token (loopback; P3 and both servers on this machine)", "",
              "| rounds per layer | adapter | latency | P3's adapter products | round trips | bytes to / from S1 |", "|---|---|---|---|---|---|"]
    for x in sorted(c, key=lambda x: (x["schedule"], x["adapter"])):
        lines.append(f"| {x['schedule']} | {'yes' if x['adapter'] else 'no'} | {ms(x['latency_s'])} | {ms(x['adapter_s'])} | "
                     f"{x['rounds']:.0f} | {x['bytes_up_per_server'] / 1e3:,.0f} / {x['bytes_down_per_server'] / 1e3:,.0f} kB |")
    lines += ["", f"## A server's view with the adapter in use (`stip attack shares --adapter`, {a['schedule']} rounds per layer)", "",
              "| attack | S1 | S2 | fresh noise | unmasked (control) |", "|---|---|---|---|---|"]
    for key in sorted({k.rsplit(".", 1)[0] for k in a if k.startswith(("vocab.", "frequency.")) and k.endswith(".s1")}):
        lines.append(f"| {key} | " + " | ".join(f"{100 * a[f'{key}.{v}']:.1f} %" for v in ("s1", "s2", "noise", "unmasked")) + " |")
    lines += ["", f"Byte uniformity (9 chi-square tests on {a['uniform.bytes']:,} bytes a server): S1 {a['uniform.s1']:.0%} pass, "
              f"S2 {a['uniform.s2']:.0%}; the unmasked encodings {a['uniform.unmasked']:.0%}.", "",
              "## STIP on the same fine-tune (the adapter merged, then sealed)", "",
              f"Merged drift from the base: {100 * s['drift_median']:.2f} % of a tensor's std (median; max {100 * s['drift_max']:.1f} %). "
              f"Weight matching against the public base: π **{100 * s['pi']:.1f} %**, tensors un-permuted {100 * s['tensors_unsealed_rate']:.1f} %, "
              f"prompt tokens decrypted **{100 * s['tokens_decrypted']:.1f} %**.", ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lora"))
    ap.add_argument("--steps", type=int, default=300, help="training steps of the adapter")
    ap.add_argument("--requests", type=int, default=100, help="chat requests for the frequency attack on a server's view")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)  # noqa: E731
    path, adapter_dir = chat.path(), args.out / "adapter"
    log(f"the adapter: {adapter_dir} ({args.steps} steps; reused when trained)")
    training = lora.train(path, adapter_dir, steps=args.steps,
                          tick=lambda step, total, info: step % 25 == 0 and log(f"  step {step}/{total}: {info}"))
    log(f"  held-out perplexity {training['held_out']['perplexity_base']:.2f} → {training['held_out']['perplexity_adapted']:.2f}")
    log("equality against PEFT's merged model, both schedules")
    eq = equality(path, adapter_dir, log)
    log("cost per token with and without the adapter")
    costs = cost(path, adapter_dir, log)
    log("the attack suite on a server's view, the adapter in use")
    from stip.attacks.figures import CHAT_PROMPTS
    from stip.attacks.shares import suite

    attacks = suite(path, CHAT_PROMPTS, requests=args.requests, log=lambda m: log("  " + m), adapter=adapter_dir)
    log("STIP on the merged fine-tune: weight matching")
    with tempfile.TemporaryDirectory() as work:
        stip_ = stip_on_the_merged_fine_tune(path, adapter_dir, Path(work), log)
    result = {"command": "python benchmarks/lora.py " + " ".join(sys.argv[1:]), "machine": report.machine(), "training": training,
              "equality": eq, "cost": costs, "attacks": attacks, "stip": stip_, "seconds": time.perf_counter() - t0}  # fmt: skip
    write(args.out, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
