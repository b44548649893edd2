"""`stip bench` on a tiny polynomial ViT, where every mode runs: the JSON and the report agree,
and the ratios come from the measured runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from stip.bench import Settings, report
from stip.bench.references import REFERENCES

STIP = [sys.executable, "-m", "stip.cli"]


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    done = subprocess.run(STIP + ["train", "polyformer", str(tmp / "poly"), "--preset", "tiny", "--epochs", "2", "--degree", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    readme = tmp / "README.md"
    readme.write_text("# x\n\n<!-- stip bench: poly -->\nstale\n<!-- /stip bench: poly -->\n\nafter\n")
    done = subprocess.run(STIP + ["bench", "--model", str(tmp / "poly"), "--out", str(tmp / "out"), "--repeats", "3", "--network", "wan",
                                  "--readme", str(readme)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return tmp, json.loads((tmp / "out" / "results.json").read_text())


@pytest.mark.slow
def test_every_mode_runs_and_agrees_with_plaintext(benched):
    _, r = benched
    assert [row["mode"] for row in r["rows"]] == ["plain", "stip", "mpc-semi2k", "mpc-cheetah", "he"]
    assert [(x["mode"], "polynomial models" in x["reason"]) for x in r["skipped"]] == [("shares", True)]
    for row in r["rows"]:
        assert row["top1_agreement"] == 1.0 and row["max_abs_error"] < 1e-2, row["mode"]
        assert row["latency_s"] > 0 and row["runs"] >= 1
    by = {row["mode"]: row for row in r["rows"]}
    assert by["stip"]["max_abs_error"] < 1e-5 and by["stip"]["rounds"] == 1
    assert by["he"]["rounds"] >= 2 and by["mpc-cheetah"]["bytes_up"] > by["mpc-semi2k"]["bytes_up"] > by["stip"]["bytes_up"]


@pytest.mark.slow
def test_ratios_are_computed_from_the_measured_runs(benched):
    _, r = benched
    plain = next(row for row in r["rows"] if row["mode"] == "plain")
    for row in r["rows"]:
        assert row["plain_latency_s"] == plain["latency_s"]  # one depth: the same plaintext runs
        assert row["ratio"] == pytest.approx(row["latency_s"] / plain["latency_s"], rel=1e-12)
        if row["mode"] != "plain":
            assert row["network_latency_s"] > row["latency_s"]
    assert plain["ratio"] == 1.0


@pytest.mark.slow
def test_report_and_readme_show_the_json_numbers(benched):
    tmp, r = benched
    md = (tmp / "out" / "report.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in md.splitlines()
            if re.match(r"\| (plaintext|STIP|MPC|HE)", line)}
    for row in r["rows"]:
        cells = rows[report.LABELS[row["mode"]]]
        assert cells[5] == f"{row['ratio']:,.2f}×" and cells[2].startswith(report._ms(row["latency_s"]))
        assert cells[6] == report._bytes(row["bytes_up"]) and cells[11] == f"{100 * row['top1_agreement']:.1f} %"
        peak = row["peak_memory_bytes"]
        assert cells[9] == ("—" if peak is None else f"{peak / 2**30:.2f} GiB") and (peak is None) == (row["mode"] != "he")
        measured = row["network_measured_s"]
        assert cells[4] == ("—" if measured is None else report._ms(measured)) and (measured is None) == (row["mode"] != "stip")
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] in md
    assert all(ref["figure"] in md for ref in REFERENCES) and md.count("reported, not re-run") >= len(REFERENCES)
    assert (tmp / "out" / "latency.png").stat().st_size > 0 and (tmp / "out" / "bytes.png").stat().st_size > 0
    readme = (tmp / "README.md").read_text()
    assert "stale" not in readme and report.table(r) in readme and readme.endswith("after\n")


@pytest.mark.slow
def test_shares_rows_and_a_mode_that_cannot_run_skipped_with_its_reason(tmp_path, minilm_path):
    from stip.bench import run

    r = run(Settings(model=minilm_path, out=tmp_path, tokens=4, modes=("plain", "shares", "he"), repeats=1, network="lan"))
    assert [row["mode"] for row in r["rows"]] == ["plain", "shares", "shares-prepared"]
    assert r["skipped"][0]["mode"] == "he" and "polynomial" in r["skipped"][0]["reason"]
    # 4 tokens, int64, folded: layer 0's QKV, then per layer [o | h] and [m | h₂] (the last: m alone)
    payload = 4 * 8 * (384 + 6 * 2 * 384 + 5 * (1536 + 384) + 1536)
    for row in r["rows"][1:]:
        assert row["rounds"] == 13 and row["max_abs_error"] < 1e-4 and row["top1_agreement"] == 1.0
        assert payload < row["bytes_up"] < payload + 13 * 200 and row["network_latency_s"] > row["latency_s"]
        # measured through relays at the LAN's 0.2 ms RTT: at least the 13 round trips
        assert row["network_measured_s"] > 13 * 0.2e-3 and row["network_measured_s"] > 0.5 * row["latency_s"]
    assert "offline" in r["rows"][2]["notes"][0] and "offline" not in r["rows"][1]["notes"][0]


def test_bad_settings_fail_with_one_line(tmp_path):
    done = subprocess.run(STIP + ["bench", "--modes", "plain,quantum", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and "unknown mode(s) quantum" in done.stderr
    with pytest.raises(ValueError, match="network"):
        Settings(network="satellite")
