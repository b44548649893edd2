"""MPCViT under 2PC: latency, bytes and accuracy of heterogeneous attention, in one run.

1. Latency at the ViT-7-4-32 shape (7 layers, 4 heads, dim 256, MLP ratio 2, 65 tokens),
   SPU SEMI2K simulation, batch 1: all-softmax, all-ReLU-softmax, all-scaling, and
   μ ∈ {0.1, 0.3, 0.5, 0.7} (that fraction of heads ReLU-softmax, spread over the layers, the
   rest scaling). Under SPU every head of one kind costs the same, so where the heads sit
   does not change the cost; the weights are random (costs do not depend on them).
2. Accuracy against latency: `stip train mpcvit` on digits (or --dataset/--data-dir/--preset)
   at each μ, sharing one softmax teacher and one search; each trained model, with its own
   searched heads, is then run under SEMI2K and its latency measured.
Writes OUT/mpcvit_latency.json, OUT/mpcvit_latency.md (the table) and
OUT/mpcvit_latency.png (accuracy vs latency; latency per configuration).

    python benchmarks/mpcvit_latency.py [--out benchmarks/results/mpcvit] [--skip-accuracy]

About 15 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from stip.mpc import mpcvit
from stip.mpc import netem
from stip.mpc.runner import simulate

MUS = (0.1, 0.3, 0.5, 0.7)


def measure(model: mpcvit.MPCViT, seed: int = 0) -> dict:
    cfg, params = mpcvit.to_mpc(model)
    c = model.cfg
    images = torch.randn(1, c.channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))
    report, _ = simulate(cfg, params, mpcvit.embed(model, images), "semi2k")
    est = {name: netem.estimate(report.seconds, report.bytes_sent, report.send_actions[0], netem.PROFILES[name]) for name in ("lan", "wan")}
    return {"seconds": report.seconds, "bytes": sum(report.bytes_sent), "send_actions": report.send_actions[0],
            "lan_estimate_s": est["lan"], "wan_estimate_s": est["wan"], "max_abs_error": report.max_abs_error}


def latency_table(log) -> list[dict]:
    torch.manual_seed(0)
    base = mpcvit.MPCViT(replace(mpcvit.PRESETS["vit-7-4-32"], linear_gelu=True)).eval()
    rows = []
    plans = [(p, None) for p in ("softmax", "relu_softmax", "scaling", *MUS)] + [(mu, mu) for mu in MUS]
    for pattern, gelu in plans:
        model = mpcvit.set_kinds(base, pattern, gelu=1.0 if gelu is None else gelu)
        if isinstance(pattern, str):
            name = f"all {pattern}"
        else:
            name = f"MPCViT μ={pattern}" if gelu is None else f"MPCViT+ μ={pattern}"
        log(f"  ViT-7-4-32 {name} …")
        gelu_rows = int(sum(blk.mlp.gelu.sum() for blk in model.blocks))
        rows.append({"config": name, "mu": pattern if isinstance(pattern, float) else None, "plus": gelu is not None,
                     **measure(model), **model.kind_counts(), "gelu_rows": gelu_rows})
    return rows


def accuracy_runs(args, log) -> list[dict]:
    """Train at each μ, MPCViT (attention only) and MPCViT+ (attention and GELU), sharing one
    teacher, and one search per variant; then run each trained model under SEMI2K."""
    rows = []
    for plus in (False, True):
        first = None
        for mu in MUS:
            out = args.out / "runs" / f"{'plus-' if plus else ''}mu{mu}"
            donor = first or (args.out / "runs" / f"mu{MUS[0]}" if plus else None)
            shared = ("teacher.pt", "search.pt") if first else ("teacher.pt",)
            if donor is not None and not (out / "stages" / shared[-1]).exists():
                (out / "stages").mkdir(parents=True, exist_ok=True)
                for name in shared:
                    shutil.copy(donor / "stages" / name, out / "stages" / name)
                shutil.copy(donor / "head_costs.json", out)
            recipe = mpcvit.Recipe(dataset=args.dataset, data_dir=args.data_dir, preset=args.preset, mu=mu, linear_gelu=plus)
            name = f"{'MPCViT+' if plus else 'MPCViT'} μ={mu}"
            log(f"  training {name} ({args.preset} on {args.dataset}) …")
            summary = mpcvit.train_mpcvit(recipe, out)
            first = first or out
            log(f"  SEMI2K run of the trained {name} …")
            rows.append({"config": name, "mu": mu, "plus": plus, "accuracy": summary["accuracy"],
                         "accuracy_without_retraining": summary["binarized_accuracy"], **measure(mpcvit.load(out)[0])})
    teacher = mpcvit.load(args.out / "runs" / f"mu{MUS[0]}" / "teacher.safetensors")[0]
    log("  SEMI2K run of the softmax teacher …")
    rows.insert(0, {"config": "softmax teacher", "mu": None, "plus": False, "accuracy": summary["teacher_accuracy"], **measure(teacher)})
    return rows


def write(args, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = result["vit_7_4_32"]
    soft = lat[0]["seconds"]
    lines = ["# MPCViT under SPU SEMI2K (simulation, 2 parties)", "",
             f"Machine: {result['machine']}. Batch 1, FM64, 18 fraction bits; SEMI2K with trusted-first-party",
             "triples (no offline cost). Latency: the simulation's wall time (compute only, no network).",
             "Bytes: both parties' sent bytes. LAN estimate: latency + bytes/1 Gbit/s + send actions × 0.2 ms;",
             "WAN: 100 Mbit/s and 80 ms per round.", "",
             "## ViT-7-4-32 shape (65 tokens), random weights", "",
             "| configuration | attention rows ReLU-softmax / scaling / softmax | GELU rows | latency (s) | × softmax | MB sent | send actions | LAN est. (s) | WAN est. (s) | WAN × softmax |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in lat:
        lines.append(f"| {r['config']} | {r['relu_softmax']} / {r['scaling']} / {r['softmax']} | {r['gelu_rows']} | {r['seconds']:.2f} | "
                     f"{r['seconds'] / soft:.2f} | {r['bytes'] / 1e6:.1f} | {r['send_actions']:,} | {r['lan_estimate_s']:.2f} | "
                     f"{r['wan_estimate_s']:.1f} | {r['wan_estimate_s'] / lat[0]['wan_estimate_s']:.2f} |")
    lines += ["", f"μ=0.3 / all-softmax latency in this run: MPCViT **{result['mu_0.3_over_softmax']:.3f}**, "
              f"MPCViT+ **{result['plus_mu_0.3_over_softmax']:.3f}** (target ≤ 0.6)."]
    acc = result.get("accuracy")
    if acc:
        a = result["accuracy_setting"]
        lines += ["", f"## Accuracy against latency: {a['preset']} trained on {a['dataset']} (test split), each model under SEMI2K", "",
                  "| model | accuracy | accuracy before retraining | latency (s) | MB sent | send actions |", "|---|---|---|---|---|---|"]
        for r in acc:
            before = f"{100 * r['accuracy_without_retraining']:.2f} %" if "accuracy_without_retraining" in r else "—"
            lines.append(f"| {r['config']} | {100 * r['accuracy']:.2f} % | {before} | {r['seconds']:.2f} | {r['bytes'] / 1e6:.1f} | {r['send_actions']:,} |")
    (args.out / "mpcvit_latency.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(12 if acc else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.bar([r["config"] for r in lat], [r["seconds"] for r in lat], color=["tab:red"] + ["tab:blue"] * (len(lat) - 1))
    ax.set_ylabel("SEMI2K latency (s)")
    ax.set_title("ViT-7-4-32, batch 1")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    if acc:
        ax = axes[0][1]
        for r in acc:
            color = "tab:red" if r["mu"] is None else ("tab:purple" if r["plus"] else "tab:green")
            ax.scatter(r["seconds"], 100 * r["accuracy"], color=color)
            ax.annotate(r["config"], (r["seconds"], 100 * r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("SEMI2K latency (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{result['accuracy_setting']['preset']} on {result['accuracy_setting']['dataset']}")
    fig.tight_layout()
    fig.savefig(args.out / "mpcvit_latency.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mpcvit"))
    ap.add_argument("--skip-accuracy", action="store_true", help="only the ViT-7-4-32 latency table")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--preset", default="digits")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"}
    log("latency at the ViT-7-4-32 shape")
    result["vit_7_4_32"] = latency_table(log)
    if not args.skip_accuracy:
        log("accuracy against latency")
        result["accuracy_setting"] = {"dataset": args.dataset, "preset": args.preset}
        result["accuracy"] = accuracy_runs(args, log)
    soft = result["vit_7_4_32"][0]["seconds"]
    mu3 = [r for r in result["vit_7_4_32"] if r["mu"] == 0.3]
    result["mu_0.3_over_softmax"] = next(r for r in mu3 if not r["plus"])["seconds"] / soft
    result["plus_mu_0.3_over_softmax"] = next(r for r in mu3 if r["plus"])["seconds"] / soft
    (args.out / "mpcvit_latency.json").write_text(json.dumps(result, indent=2))
    write(args, result)
    print((args.out / "mpcvit_latency.md").read_text())
    log(f"wrote {args.out}/mpcvit_latency.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
