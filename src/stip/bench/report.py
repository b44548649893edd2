"""What `stip bench` writes: results.json, report.md and two plots, all from one result dict.

The table in report.md (and the README's headline table) is rendered from results.json by
``table``; nothing in it is typed by hand.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path

from .references import REFERENCES

LABELS = {"plain": "plaintext", "stip": "STIP", "shares": "shares (2 servers)", "shares-prepared": "shares, masks prepared", "mpc-semi2k": "MPC SEMI2K", "mpc-cheetah": "MPC CHEETAH", "he": "HE (CKKS)"}


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "spu", "tenseal", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _ms(s: float) -> str:
    return f"{s * 1e3:,.2f} ms" if s < 1 else f"{s:,.2f} s"


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def table(results: dict) -> str:
    """The measured table, as Markdown."""
    net = results["settings"]["network"]
    head = ["mode", "layers", "latency (median)", "× plaintext", "bytes up", "bytes down", "rounds", "peak memory", "max abs error",
            "top-1 agreement"]
    if net != "none":
        head[3:3] = [f"latency + {net} estimate", f"{net}, measured"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [LABELS[r["mode"]], str(r["layers"]), f"{_ms(r['latency_s'])} (n={r['runs']})", f"{r['ratio']:,.2f}×",
                 _bytes(r["bytes_up"]), _bytes(r["bytes_down"]), "—" if r["rounds"] is None else f"{r['rounds']:,}",
                 "—" if r.get("peak_memory_bytes") is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
                 f"{r['max_abs_error']:.1e}", f"{100 * r['top1_agreement']:.1f} %"]
        if net != "none":
            cells[3:3] = ["—" if r["network_latency_s"] is None else _ms(r["network_latency_s"]),
                          "—" if r.get("network_measured_s") is None else _ms(r["network_measured_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    for s in results["skipped"]:
        lines.append(f"| {LABELS[s['mode']]} | skipped: {s['reason']} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def headline(results: dict) -> str:
    """The table with a one-line caption, for the README."""
    m, sub = results["machine"], results["subject"]
    return (f"`{results['command']}` — {sub['description']}; {m['cpu']}, {m['cores']} cores, {m['date']}.\n\n" + table(results))


def _references() -> str:
    lines = ["| system | mode | model | setting | figure |", "|---|---|---|---|---|"]
    for r in REFERENCES:
        lines.append(f"| {r['system']} | {r['mode']} | {r['model']} | {r['setting']} | {r['figure']} (reported, not re-run) |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, sub = results["machine"], results["subject"]
    v = ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val)
    notes = results["notes"] + sorted({n for r in results["rows"] for n in r["notes"]})
    parts = [
        f"# stip bench: {sub['name']}",
        f"`{results['command']}`",
        f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['platform']}; Python {m['python']}; {v}. "
        f"Run {m['date']}, {results['seconds']:.0f} s in all.",
        f"**Model and input**: {sub['description']}. Every mode ran on the same input in one process tree; plaintext "
        f"and STIP alternated {results['settings']['repeats']} times after a warm-up, MPC and HE ran once. Errors and "
        "top-1 agreement are against the plaintext model at the same depth; × plaintext divides by its median latency "
        "measured in the same run.",
        "## Measured", table(results),
        "![latency](latency.png)\n\n![bytes](bytes.png)",
        "## Notes", "\n".join(f"- {n}" for n in notes) or "- none",
        "## Published figures (reported, not re-run)",
        "Other papers' numbers in their own settings, for orientation only: hardware, parties, networks and model sizes "
        "differ from the run above.",
        _references(),
    ]
    return "\n\n".join(parts) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [f"{LABELS[r['mode']]}\n({r['layers']} layers)" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [r["latency_s"] for r in rows], color="#4477aa")
    ax.set_yscale("log")
    ax.set_ylabel("latency, s (log)")
    ax.set_title(f"{results['subject']['name']}: latency per mode")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sent = [r for r in rows if r["bytes_up"] is not None]
    xs = range(len(sent))
    ax.bar([x - 0.2 for x in xs], [r["bytes_up"] for r in sent], 0.4, label="up (user → cloud)", color="#228833")
    ax.bar([x + 0.2 for x in xs], [r["bytes_down"] or 0 for r in sent], 0.4, label="down", color="#ccbb44")
    ax.set_xticks(list(xs), [f"{LABELS[r['mode']]}" for r in sent])
    ax.set_yscale("log")
    ax.set_ylabel("bytes (log)")
    ax.legend()
    ax.set_title("bytes on the wire per inference")
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots(results, out)
    (out / "report.md").write_text(markdown(results))


def update_readme(readme: Path, results: dict) -> None:
    """Replace the block between ``<!-- stip bench: NAME -->`` and ``<!-- /stip bench: NAME -->``
    (NAME: the subject's name) with the headline table; append the block if it is missing."""
    name = results["subject"]["name"]
    begin, end = f"<!-- stip bench: {name} -->", f"<!-- /stip bench: {name} -->"
    text = readme.read_text()
    block = f"{begin}\n{headline(results)}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
