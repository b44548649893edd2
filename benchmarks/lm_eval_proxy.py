"""A real evaluation harness as the user's application: lm-evaluation-harness (`lm_eval`, its
`local-completions` model) scores a multiple-choice task through `stip proxy` on the sealed
SmolLM2, and the same task on the unsealed model on the same vLLM.

    python benchmarks/lm_eval_proxy.py [--items 200] [--out DIR]      # make bench-eval

The task is built here from local text, so nothing comes from a hub: sentences of CPython's
docs (`stip.models.text`), each cut after about 60 % of its words; the model chooses the true
ending among it and the endings of three other sentences (`acc`, and `acc_norm` by length).
lm_eval tokenizes with SmolLM2's own tokenizer and sends token ids with ``echo``,
``logprobs: 1``, ``max_tokens: 1``; P3's proxy renames them by π_c, and restores every id of
the logprobs it gets back. Sealed and unsealed must score the same, item by item; the report
gives the largest difference of a choice's log-likelihood between the two.

lm_eval lives in its own environment (`.venv-eval`, made by `make bench-eval`; it pulls no
torch), named by ``--lm-eval``. Writes DIR/results.json and DIR/report.md (default
benchmarks/results/lm_eval), and each run's lm_eval output, samples and log in DIR/sealed and
DIR/unsealed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

TASK = "stip_docs_cloze"
CHOICES = 4


def items(n: int, seed: int = 0) -> list[dict]:
    """``n`` cloze items from the docs' sentences: a context, four endings, the true one's index."""
    from stip.models.text import sentences

    rng = random.Random(seed)
    cut = []
    for s in sentences(seed=seed):
        words = s.split()
        if len(words) >= 8:
            k = round(0.6 * len(words))
            cut.append((" ".join(words[:k]), " ".join(words[k:])))
    if len(cut) < n * CHOICES:
        raise SystemExit(f"only {len(cut)} usable sentences for {n} items")
    pool, out = cut[n:], []
    for i, (context, ending) in enumerate(cut[:n]):
        others = [e for _, e in rng.sample(pool, CHOICES + 2) if e != ending][: CHOICES - 1]
        choices = [ending, *others]
        rng.shuffle(choices)
        out.append({"id": i, "context": context, "choices": choices, "gold": choices.index(ending)})
    return out


def write_task(folder: Path, data: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'items.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def run_lm_eval(lm_eval_python: Path, url: str, model: str, tokenizer: Path, tasks: Path, out: Path) -> tuple[dict, dict, float]:
    """One lm_eval run: (metrics, {(doc, choice): log-likelihood}, seconds)."""
    model_args = ",".join([f"model={model}", f"base_url={url}/v1/completions", "tokenizer_backend=huggingface",
                           f"tokenizer={tokenizer}", "tokenized_requests=True", "num_concurrent=2", "max_retries=1"])  # fmt: skip
    cmd = [str(lm_eval_python), "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "8", "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OPENAI_API_KEY="unused")
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)  # a previous run's files would be read as this one's
    out.mkdir(parents=True)
    log = out / "lm_eval.log"
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:  # its first complaints say why; the traceback after them is the fallout
        first = [ln for ln in log.read_text(errors="replace").splitlines() if " ERROR " in ln or " WARNING " in ln and "failed" in ln]
        raise SystemExit(f"lm_eval failed ({done.returncode}); its log: {log}\n" + "\n".join(first[:5]))
    results = json.loads(max(out.rglob("results_*.json")).read_text())["results"][TASK]
    scores = {}
    for line in max(out.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines():
        s = json.loads(line)
        for c, resp in enumerate(s["resps"]):
            scores[(s["doc_id"], c)] = float(resp[0][0])
    return {k.split(",")[0]: v for k, v in results.items() if k.split(",")[0] in ("acc", "acc_norm")}, scores, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200, help="multiple-choice items (4 choices each)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_eval"))
    ap.add_argument("--lm-eval", type=Path, default=Path(".venv-eval/bin/python"), help="the Python that has lm_eval")
    args = ap.parse_args()
    if not args.lm_eval.is_file():
        raise SystemExit(f"no lm_eval environment at {args.lm_eval}: run `make bench-eval`, or pass --lm-eval")

    from stip.models import chat
    from stip.seal import CLIENT, SERVER, seal_folder
    from stip.serve.process import ServerProcess, side_by_side
    from stip.serve.vllm import VLLMProcess

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    src = chat.path(step=say)
    data = items(args.items)
    with tempfile.TemporaryDirectory(prefix="stip-lm-eval-") as tmp:
        tmp = Path(tmp)
        write_task(tmp / "task", data)
        sealed = seal_folder(src, tmp / "tokens", mode="tokens")
        say(f"{args.items} items; sealed (token mode), fingerprint {sealed.key.fingerprint[:16]}…; starting two vLLM engines …")
        starts = (lambda: VLLMProcess(tmp / "tokens" / SERVER, args=("--enforce-eager",)),
                  lambda: VLLMProcess(src, name="unsealed", args=("--enforce-eager",), tokenizer=True))  # fmt: skip
        with side_by_side(*starts) as (sealed_engine, unsealed_engine):
            with ServerProcess(tmp / "tokens" / CLIENT, "--upstream", sealed_engine.url, command="proxy", timeout=180) as proxy:
                model = httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"]
                say(f"lm_eval → stip proxy ({model}) → sealed vLLM …")
                sealed_m, sealed_s, sealed_t = run_lm_eval(args.lm_eval, proxy.url, model, src, tmp / "task", args.out / "sealed")
            say("lm_eval → unsealed vLLM …")
            plain_m, plain_s, plain_t = run_lm_eval(args.lm_eval, unsealed_engine.url, "unsealed", src, tmp / "task", args.out / "unsealed")
    assert sealed_s.keys() == plain_s.keys() and len(sealed_s) == args.items * CHOICES
    diff = max(abs(sealed_s[k] - plain_s[k]) for k in plain_s)
    picks = lambda s: [max(range(CHOICES), key=lambda c: s[(i, c)]) for i in range(args.items)]  # noqa: E731
    same = sum(a == b for a, b in zip(picks(sealed_s), picks(plain_s)))
    results = {"task": TASK, "items": args.items, "choices": CHOICES, "model": chat.NAME,
               "lm_eval": subprocess.run([str(args.lm_eval), "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                                         capture_output=True, text=True).stdout.strip(),
               "sealed": {**sealed_m, "seconds": sealed_t}, "unsealed": {**plain_m, "seconds": plain_t},
               "max_abs_delta_loglikelihood": diff, "same_choice": same,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(report(results) + "\n")
    say(report(results))
    ok = same == args.items and all(sealed_m[k] == plain_m[k] for k in plain_m)
    return 0 if ok else 1


def report(r: dict) -> str:
    s, u = r["sealed"], r["unsealed"]
    return "\n".join([
        f"`python benchmarks/lm_eval_proxy.py` — lm_eval {r['lm_eval']} `local-completions`, task `{r['task']}` "
        f"({r['items']} items × {r['choices']} choices, CPython docs), {r['model']} on vLLM (float32); {r['machine']}, {r['date']}.", "",
        "| path | acc | acc_norm | run time |", "|---|---|---|---|",
        f"| lm_eval → stip proxy → sealed vLLM | {s['acc']:.4f} | {s['acc_norm']:.4f} | {s['seconds']:.0f} s |",
        f"| lm_eval → unsealed vLLM | {u['acc']:.4f} | {u['acc_norm']:.4f} | {u['seconds']:.0f} s |", "",
        f"- the same choice on {r['same_choice']} of {r['items']} items",
        f"- max |Δ log-likelihood| of a choice, sealed vs unsealed: **{r['max_abs_delta_loglikelihood']:.2e}**",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
