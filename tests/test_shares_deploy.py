"""Shares mode across networks: TLS 1.3 with pinned certificates on both links, and no request
lost when a share server dies, restarts or fails over to a replica (directly, or behind a
real HAProxy). Servers are real processes wherever a process is what dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from stip import tls
from stip.relay import Relay
from stip.serve.process import ServerProcess
from stip.shares import Servers, SharesModel, ShareServer, protocol
from stip.shares.client import _Link

import harness
from conftest import ShareServerProcess

TOKEN = "tok-" + "7f3a9c" * 6  # recognisable on the wire


def _tiny(seed: int = 0):
    return harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=2, ffn=8, vocab=16, batch=1, seq=2,
                                   lengths=[2], seed=seed)).model  # fmt: skip


@pytest.fixture(scope="module")
def certs(share_certs):
    return share_certs


@pytest.fixture(scope="module")
def tls_pair(certs):
    """S1 and S2 in process, on TLS, each with its observe hook recording what it received."""
    model, seen = _tiny(), {"s1": [], "s2": []}
    bound = []
    for name in ("s1", "s2"):
        crt, key, _ = certs[name]
        server = ShareServer.from_model(model, token=TOKEN, observe=lambda op, x, n=name: seen[n].append(op))
        bound.append(server.listen(tls=tls.server_context(crt, key)))
    try:
        yield model, bound, seen
    finally:
        for b in bound:
            b.close()


def _pins(certs, *names):
    return [tls.Trust(pin=certs[n][2]) for n in names]


def test_tls_links_with_pins_compute_what_plain_tcp_does(tls_pair, certs):
    model, (a, b), _ = tls_pair
    prompt = [3, 1, 4, 1, 5]
    with Servers([a.address, b.address], token=TOKEN, trust=_pins(certs, "s1", "s2")) as conn:
        over_tls = SharesModel(model, conn).generate(prompt, 6, stop_at_eos=False).token_ids
    with ShareServer.from_model(model).listen() as p, ShareServer.from_model(model).listen() as q:
        with Servers([p.address, q.address.replace("127.0.0.1", "localhost")]) as conn:
            plain = SharesModel(model, conn).generate(prompt, 6, stop_at_eos=False).token_ids
    assert over_tls == plain


def test_a_ca_file_is_trusted_too(tls_pair, certs):
    _, (a, b), _ = tls_pair
    trust = [tls.Trust(ca=certs["s1"][0]), tls.Trust(ca=certs["s2"][0])]  # self-signed: its own CA
    with Servers([a.address.replace("127.0.0.1", "localhost"), b.address.replace("127.0.0.1", "localhost")],
                 token=TOKEN, trust=trust) as conn:  # fmt: skip
        assert conn.model.startswith("llama-")
    with pytest.raises(tls.TrustError, match="not trusted"):
        Servers([a.address, b.address], token=TOKEN, trust=[tls.Trust(ca=certs["other"][0])] * 2)


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_pair):
    _, (a, b), _ = tls_pair
    before = a.authenticated
    with pytest.raises(ConnectionError, match="closed the connection during hello.*TLS server"):
        Servers([a.address, b.address], token=TOKEN)
    assert a.authenticated == before


def test_a_wrong_pin_is_refused_before_any_byte_of_p3s_leaves(tls_pair, certs):
    _, (a, b), seen = tls_pair
    before, ops = b.authenticated, len(seen["s2"])
    host, port = protocol.parse_address(b.address)
    with Relay((host, port), capture=True) as relay:
        with pytest.raises(tls.TrustError, match="not the pinned"):
            Servers([a.address, relay.address], token=TOKEN, trust=_pins(certs, "s1", "other"))
        time.sleep(0.2)
        up = relay.captured["up"]
    assert b.authenticated == before and len(seen["s2"]) == ops  # no hello, no share
    assert 0 < len(up) < 2048 and TOKEN.encode() not in up  # a ClientHello (and an alert), nothing else


def test_the_token_and_the_shares_never_cross_the_wire_in_the_clear(tls_pair, certs):
    model, (a, b), _ = tls_pair
    for secure in (False, True):
        if secure:
            target, trust = b, _pins(certs, "s1", "s2")
        else:
            target, trust = ShareServer.from_model(model, token=TOKEN).listen(), None
        host, port = protocol.parse_address(target.address)
        with Relay((host, port), capture=True) as relay:
            s1 = a.address if secure else ShareServer.from_model(model, token=TOKEN).listen().address
            with Servers([s1, relay.address], token=TOKEN, trust=trust) as conn:
                SharesModel(model, conn).generate([2, 7, 1], 3, stop_at_eos=False)
            up = relay.captured["up"]
        assert (TOKEN.encode() in up) is not secure  # the capture does see a clear token on plain TCP
        assert (b'"op":"0.qkv"' in up) is not secure


def test_plain_tcp_off_loopback_needs_insecure():
    with pytest.raises(ValueError, match="without TLS"):
        _Link(1, ["10.1.2.3:7001"], None, False, 1.0)
    _Link(1, ["10.1.2.3:7001"], None, True, 1.0)  # --insecure: allowed (the CLI warns)


# --- no request lost: replicas, restarts, a load balancer ------------------------------------------------


def test_p3_fails_over_between_replicas_and_loses_nothing():
    model = _tiny(seed=2)
    prompt, n = [5, 3, 9], 8
    with ShareServer.from_model(model).listen() as s1, ShareServer.from_model(model).listen() as s2a, \
            ShareServer.from_model(model).listen() as s2b:  # fmt: skip
        with Servers([s1.address, f"{s2a.address}|{s2b.address}"]) as conn:
            ref = SharesModel(model, conn).generate(prompt, n, stop_at_eos=False).token_ids
        with Servers([s1.address, f"{s2a.address}|{s2b.address}"], retry_seconds=10) as conn:
            p3 = SharesModel(model, conn)
            killed = []

            def on_token(t):
                if not killed:
                    killed.append(conn.addresses[1])
                    s2a.close()  # the replica in use goes away mid-generation

            got = p3.generate(prompt, n, on_token=on_token, stop_at_eos=False).token_ids
            assert conn.addresses[1] == s2b.address and conn.stats.reconnects >= 1
    assert killed == [s2a.address] and got == ref


@pytest.mark.slow
def test_sigterm_drains_a_replica_and_p3_moves_on_losing_nothing(tmp_path, certs):
    """SIGTERM mid-generation: the replica answers what it holds, hangs up, exits 0; P3
    re-sends to the other replica. Its log has a line per connection and no secret."""
    model = _tiny(seed=6)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "token").write_text(TOKEN)
    with ThreadPoolExecutor(3) as pool:
        s1, s2a, s2b = pool.map(lambda c: ShareServerProcess(tmp_path / "model", certs[c], None, "--token-file", str(tmp_path / "token")),
                                ("s1", "s2", "s2"))  # fmt: skip
    try:
        parties = [s1.address, f"{s2a.address}|{s2b.address}"]
        with Servers(parties, token=TOKEN, trust=_pins(certs, "s1", "s2")) as conn:
            ref = SharesModel(model, conn).generate([6, 1, 3], 8, stop_at_eos=False).token_ids
        with Servers(parties, token=TOKEN, trust=_pins(certs, "s1", "s2"), retry_seconds=10) as conn:
            p3, stopped = SharesModel(model, conn), []

            def on_token(t):
                if not stopped:
                    stopped.append(s2a.proc.send_signal(signal.SIGTERM))

            got = p3.generate([6, 1, 3], 8, on_token=on_token, stop_at_eos=False).token_ids
            assert conn.addresses[1] == s2b.address
        assert s2a.proc.wait(10) == 0 and got == ref
        log = s2a.logged()
        assert "authenticated" in log and "drained" in log and " B in, " in log
        assert TOKEN not in log and "Traceback" not in log
    finally:
        for s in (s1, s2a, s2b):
            s.stop()


def test_a_replica_with_other_weights_is_not_used():
    a, other = _tiny(seed=3), _tiny(seed=4)
    with ShareServer.from_model(a).listen() as s1, ShareServer.from_model(a).listen() as s2, \
            ShareServer.from_model(other).listen() as wrong:  # fmt: skip
        with Servers([s1.address, f"{s2.address}|{wrong.address}"], retry_seconds=1) as conn:
            p3 = SharesModel(a, conn)
            s2.close()
            with pytest.raises(ConnectionError, match="lost the share server S2"):
                p3.generate([1, 2], 2, stop_at_eos=False)


def _free_port() -> int:
    from stip.serve.vllm import free_port

    return free_port()


def _chat(p3: SharesModel, text: str) -> list[int]:
    ids = p3.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_kill_9_of_s2_mid_generation_then_a_restart_loses_no_token(smollm2_shares, certs):
    """The same tokens as plaintext greedy (an uninterrupted shares run gives those:
    test_shares), over TLS with pins."""
    from stip.models.hf import greedy

    path, s1, s2 = smollm2_shares
    with Servers([s1.address, s2.address], trust=_pins(certs, "s1", "s2")) as conn:
        p3 = SharesModel(path, conn)
        prompt = _chat(p3, "What is the capital of France?")
        ref = greedy(p3.hf, [prompt], 10)[0]
        restart = threading.Timer(1.0, s2.start)  # back on the same port a second later

        def on_token(t):
            if not restart.is_alive() and not restart.finished.is_set():
                s2.kill9()  # S2 dies with the next matmul about to be sent
                restart.start()

        got = p3.generate(prompt, 10, on_token=on_token, stop_at_eos=False).token_ids
        restart.join()
        assert conn.stats.reconnects >= 1
    assert got == ref


@pytest.mark.slow
def test_proxy_answers_503_while_s2_is_down_and_serves_again_once_it_is_back(smollm2_shares, certs):
    path, s1, s2 = smollm2_shares
    pins = f"{certs['s1'][2]},{certs['s2'][2]}"
    with ServerProcess(path, "--shares", f"{s1.address},{s2.address}", "--pin", pins, "--timeout", "6", command="proxy", timeout=300) as proxy:
        body = {"model": httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"], "prompt": "Paris is", "max_tokens": 4, "temperature": 0}
        ok = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=120)
        assert ok.status_code == 200, ok.text
        s2.kill9()
        t0 = time.monotonic()
        down = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=120)
        assert down.status_code == 503 and "S2" in down.json()["error"]["message"], down.text
        assert time.monotonic() - t0 < 6 + 10  # P3's retry window, plus a pass of the walk
        s2.start()
        again = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=120)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]


def _in_use(lb, party: str) -> list[str]:
    """The replicas HAProxy has a session open to now (its stats' scur column)."""
    rows = [r.split(",") for r in lb._command("show stat").splitlines()]
    names = {f"r{i}": a for i, a in enumerate(lb.backends[party])}
    return [names[r[1]] for r in rows if len(r) > 4 and r[0] == party and r[1] in names and r[4] not in ("", "0")]


@pytest.mark.slow
def test_killing_a_replica_behind_haproxy_loses_no_token(tmp_path, certs):
    """Two replicas per party behind HAProxy in TCP mode, TLS passed through: P3 pins each
    party's certificate, which its replicas share. The replicas in use die mid-generation."""
    from haproxy import HAProxy

    model = _tiny(seed=5)
    model.save_pretrained(tmp_path / "model")
    with ThreadPoolExecutor(4) as pool:  # the four start side by side
        starting = {p: [pool.submit(ShareServerProcess, tmp_path / "model", certs[p]) for _ in range(2)] for p in ("s1", "s2")}
        replicas = {p: [f.result() for f in fs] for p, fs in starting.items()}
    try:
        with HAProxy({p: [r.address for r in rs] for p, rs in replicas.items()}) as lb:
            parties = [lb.address("s1"), lb.address("s2")]
            with Servers(parties, trust=_pins(certs, "s1", "s2")) as conn:
                ref = SharesModel(model, conn).generate([4, 2, 8], 10, stop_at_eos=False).token_ids
            with Servers(parties, trust=_pins(certs, "s1", "s2"), retry_seconds=20) as conn:
                p3, dead = SharesModel(model, conn), []

                def on_token(t):
                    if not dead:
                        dead.extend(_in_use(lb, "s1") + _in_use(lb, "s2"))
                        for r in [*replicas["s1"], *replicas["s2"]]:
                            if r.address in dead:
                                r.kill9()

                got = p3.generate([4, 2, 8], 10, on_token=on_token, stop_at_eos=False).token_ids
                assert len(dead) == 2 and conn.stats.reconnects >= 2
            assert got == ref
    finally:
        for r in [*replicas["s1"], *replicas["s2"]]:
            r.stop()
