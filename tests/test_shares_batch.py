"""Cross-user batching in the share server: many connections' requests in one GEMM, each
connection's rows back to it alone, exact, and no wait for a lone user."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from stip import wire
from stip.shares import ShareServer, protocol, ring
from stip.shares.batch import Batcher, furthest_behind, positions

import harness


SMOL = ["0.qkv", *(f"{i}.{op}" for i in range(30) for op in ("qkv", "o", "up", "down", "o+up", "down+qkv")), "head"]


def test_ops_sit_where_they_run_in_a_pass():
    at = positions(SMOL)
    assert [at[o] for o in ("0.qkv", "0.o+up", "0.up", "0.down+qkv", "1.qkv", "3.o")] == [0, 1, 2, 3, 4, 13]
    assert at["0.o"] == at["0.o+up"] and at["2.down"] == at["2.down+qkv"]
    assert at["head"] == at["29.down"] + 1 == max(at.values())  # the end of a pass, not the middle


def test_the_op_furthest_behind_is_served_first_round_the_pass():
    at = positions(SMOL)
    assert furthest_behind(["5.qkv", "5.o+up", "9.down+qkv"], at) == "5.qkv"
    # a convoy that wrapped round: the leaders are at layer 0 of the next token, the tail at layer 29
    assert furthest_behind(["0.qkv", "29.o+up", "1.o+up"], at) == "29.o+up"
    assert furthest_behind(["0.qkv", "head", "1.o+up"], at) == "head"
    assert furthest_behind(["7.up"], at) == "7.up"


@pytest.fixture(scope="module")
def case():
    return harness.llama_case(dict(heads=4, kv_heads=2, head_dim=8, layers=2, ffn=64, vocab=32, batch=1, seq=2,
                                   lengths=[2], seed=1))  # fmt: skip


def _connect(bound):
    host, port = protocol.parse_address(bound.address)
    sock = protocol.nodelay(__import__("socket").create_connection((host, port), timeout=30))
    protocol.send(sock, wire.encode({}, {"op": protocol.HELLO}))
    wire.decode(protocol.recv(sock))
    return sock


def _ask(sock, op, x):
    protocol.send(sock, wire.encode({"x": torch.from_numpy(x)}, {"op": op}))
    tensors, meta = wire.decode(protocol.recv(sock))
    return tensors["y"].numpy() if "y" in tensors else meta["error"]


def test_each_connection_gets_its_own_rows_from_one_gemm_bit_for_bit(case):
    """Eight users at once, each with its own row count and values: every answer is exactly its
    own x·W̃ mod 2^64 (3 limbs: no rounding anywhere), and the GEMMs really were shared. A bad
    request among them gets its error and disturbs no one."""
    server = ShareServer.from_model(case.model, limbs=3, batch_window=0.05)
    users, rounds, op = 8, 6, "0.o+up"
    weight = server.ops[op]
    rng = np.random.default_rng(0)
    xs = [[ring.uniform(int(n) * weight.shape[0]).reshape(int(n), -1) for n in rng.integers(1, 5, rounds)] for _ in range(users)]
    got, bad = [[None] * rounds for _ in range(users)], []
    with server.listen() as bound:
        socks = [_connect(bound) for _ in range(users + 1)]
        gate = threading.Barrier(users + 1)

        def user(i):
            for r in range(rounds):
                gate.wait()
                got[i][r] = _ask(socks[i], op, xs[i][r])

        def rogue():
            for _ in range(rounds):
                gate.wait()
                bad.append(_ask(socks[-1], op, np.zeros((2, weight.shape[0] + 1), np.int64)))

        threads = [threading.Thread(target=user, args=(i,)) for i in range(users)] + [threading.Thread(target=rogue)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stats = bound.batcher.stats
        for s in socks:
            s.close()
    for i in range(users):
        for r in range(rounds):
            assert isinstance(got[i][r], np.ndarray), got[i][r]
            np.testing.assert_array_equal(got[i][r], ring.matmul(xs[i][r], weight))
    assert all("takes" in b for b in bad) and len(bad) == rounds
    assert stats.largest >= 4 and stats.batches < users * rounds  # rows from several users did share GEMMs


def test_at_2_limbs_a_batched_answer_stays_within_the_bound(case):
    weight = ShareServer.from_model(case.model).ops["0.down+qkv"]
    batcher = Batcher({"0.down+qkv": weight}, window=0.05)
    xs = [ring.uniform(3 * weight.shape[0]).reshape(3, -1) for _ in range(6)]
    out = [None] * len(xs)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, batcher.matmul("0.down+qkv", xs[i], who=i)[0])) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    exact = ShareServer.from_model(case.model, limbs=3).ops["0.down+qkv"]
    for x, y in zip(xs, out):
        err = np.abs((y - ring.matmul(x, exact)).astype(np.float64))  # int64 wraps: the difference mod 2^64
        assert err.max() <= ring.error_bound(weight)


def test_a_lone_user_never_waits_for_the_window(case):
    """A 1-second window, and a lone user's 30 requests still take milliseconds each: the
    worker waits only for the last batch's own users, and this one is back at once. A user
    who hangs up is not waited for either."""
    server = ShareServer.from_model(case.model, batch_window=1.0)
    weight = server.ops["0.qkv"]
    with server.listen() as bound:
        a, b = _connect(bound), _connect(bound)
        x = ring.uniform(weight.shape[0]).reshape(1, -1)
        both = [threading.Thread(target=_ask, args=(s, "0.qkv", x)) for s in (a, b)]
        for t in both:
            t.start()
        for t in both:
            t.join(10)
        b.close()  # b rode the last batch, then left
        time.sleep(0.1)
        t0 = time.perf_counter()
        for _ in range(30):
            assert isinstance(_ask(a, "0.qkv", x), np.ndarray)
        lone = time.perf_counter() - t0
        a.close()
    assert lone < 1.0, f"30 lone requests took {lone:.2f} s under a 1 s window"


def test_batching_off_answers_on_each_connection(case):
    server = ShareServer.from_model(case.model, batch_window=None)
    with server.listen() as bound:
        assert bound.batcher is None
        s = _connect(bound)
        x = ring.uniform(server.ops["0.qkv"].shape[0]).reshape(1, -1)
        y = _ask(s, "0.qkv", x)
        s.close()
    assert np.abs((y - ring.matmul(x, server.ops["0.qkv"])).astype(np.float64)).max() <= ring.error_bound(server.ops["0.qkv"])


def test_a_servers_byte_counts_give_the_same_uniformity_test_as_its_shares(tmp_path):
    """`--byte-counts` keeps 8 × 256 counters of everything received instead of the bytes: the
    chi-square test on them equals the test on the shares themselves, and fails a fixed-point
    encoding the same way."""
    import json

    from stip.attacks.shares import uniformity, uniformity_of_counts
    from stip.shares.server import ByteCounts

    shares = [ring.uniform(n * 64).reshape(n, 64) for n in (1, 3, 17)]
    counts = ByteCounts()
    for x in shares:
        counts("0.qkv", x)
    counts.write(tmp_path / "c.json")
    kept = json.loads((tmp_path / "c.json").read_text())
    assert kept["elements"] == sum(x.size for x in shares)
    assert uniformity_of_counts(kept["counts"]) == uniformity(shares)
    plain, _ = ring.encode(np.random.default_rng(0).standard_normal((64, 64)))
    biased = ByteCounts()
    biased("0.qkv", plain)
    assert uniformity_of_counts(biased.counts) == uniformity([plain])
    assert uniformity([plain])["passed"] < 0.5


@pytest.mark.slow
def test_the_serving_benchmark_on_a_sample(tmp_path, smollm2_path):
    """`benchmarks/shares_serving.py` at sample scale (make bench-serving: 1–64 streams × 10 s, 16
    × 32 tokens end to end, vLLM beside): capacity with batching on and off from the load
    generator, a counted load's byte-uniformity, and a report that shows the JSON's numbers.
    The end-to-end part is left to the full run (~2 min here): concurrent walks through the
    batching servers are tested above, the proxy's streams pool in test_shares.py."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "benchmarks/shares_serving.py", "--seconds", "1.5", "--streams", "1,3", "--skip-e2e",
                           "--skip-vllm", "--settle", "0", "--out", str(out)], capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    step = r["decode_step"]["requests"]
    assert step == 1 + 2 * 30 + 1  # SmolLM2's folded decode step, the head included
    for key in ("on 1", "on 3", "off 1", "off 3"):
        m = r["capacity"][key]
        assert m["tok_s"] > 0 and m["server_cpu_s_per_token"] > 0 and m["steps"] > 0
        assert f"| {key.split()[0]} | {m['streams']} | {m['tok_s']:.1f} |" in report
    assert r["batching_gain"] == pytest.approx(r["capacity"]["on 3"]["tok_s"] / r["capacity"]["on 1"]["tok_s"])
    assert any("requests in" in line for line in r["capacity"]["on log"])  # the server's own batching summary
    assert r["counted_load"]["tok_s"] > 0 and list(r["uniformity"]) == ["load run, S1"]
    for u in r["uniformity"].values():
        assert u["passed"] == 1.0 and u["bytes"] > 10**6
        assert f"{u['bytes']:,} bytes" in report
