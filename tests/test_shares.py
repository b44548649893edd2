"""Shares mode: the ring arithmetic is exact, every family walks to the plaintext outputs,
the share servers (real subprocesses) serve MiniLM and SmolLM2 losslessly, `stip proxy
--shares` serves the openai client, bad input is refused, and a server's view is uniform and
useless to the attack suite."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import warnings

import numpy as np
import openai
import pytest
import torch
from hypothesis import given, settings, strategies as st

from stip import tls, wire
from stip.attacks import shares as attacks
from stip.serve.process import ServerProcess, side_by_side
from stip.shares import Servers, SharesError, SharesModel, ShareServer, protocol, ring

import harness

# --- the ring --------------------------------------------------------------------------------------


def _off_by(got: np.ndarray, want: list[list[int]]) -> int:
    """The largest distance mod 2^64 between ring elements and exact integers."""
    return max(min(d, 2**64 - d) for g, w in zip(got.view(np.uint64).tolist(), want) for d in ((a - b) % 2**64 for a, b in zip(g, w)))


@settings(max_examples=40)
@given(rows=st.integers(1, 4), d=st.integers(1, 300), m=st.integers(1, 6), limbs=st.sampled_from([2, 3]),
       scale=st.floats(-4, 3), seed=st.integers(0, 2**32 - 1))  # fmt: skip
def test_ring_matmul_mod_2_64_is_exact_at_3_limbs_and_within_its_bound_at_2(rows, d, m, limbs, scale, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**63), 2**63, (rows, d), dtype=np.int64)
    w = ring.Weight.encode(rng.standard_normal((d, m)) * 10.0**scale, limbs)
    want = [[sum(int(a) * int(b) for a, b in zip(x[i], w.w[:, j].astype(np.int64))) % 2**64 for j in range(m)]
            for i in range(rows)]  # fmt: skip
    assert _off_by(ring.matmul(x, w), want) <= ring.error_bound(w)
    assert (ring.error_bound(w) == 0) == (limbs == 3)
    assert ring.error_bound(w) <= d * 2.0**20  # while rounding x to fixed point may cost up to 2^31


def test_the_bound_holds_at_its_limit():
    """Columns at the largest mass the encoding allows, limbs at their extremes."""
    for limbs in (2, 3):
        w = ring.Weight.encode(np.full((4096, 3), 7.0), limbs)
        assert np.abs(w.w).sum(0).max() <= 2.0**ring.MASS
        x = np.array([[-(2**63)] * 4096, [2**63 - 1] * 4096], dtype=np.int64)
        col = int(w.w[0, 0])
        want = [[(int(v) * col * 4096) % 2**64] for v in (-(2**63), 2**63 - 1)]
        assert _off_by(ring.matmul(x, w)[:, :1], want) <= ring.error_bound(w)


def test_shares_reconstruct_x_times_w():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((5, 64)) * 30, rng.standard_normal((64, 8)) * 0.05
    weight = ring.Weight.encode(w)
    enc, rows = ring.encode(x)
    a, b = ring.share(enc)
    assert not np.array_equal(a, ring.share(enc)[0])  # fresh masks every time
    y = ring.decode(ring.reconstruct(ring.matmul(a, weight), ring.matmul(b, weight)), rows, weight.exponents)
    assert np.abs(y - x @ w).max() < 1e-6 * np.abs(x @ w).max()
    with pytest.raises(ring.RangeError):
        ring.encode(np.array([[1.0, np.nan]]))


# --- every family, through the one harness ------------------------------------------------------------


RUNS = {2: harness.run_shares, 4: harness.run_shares_4}  # rounds per layer → the harness's run


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=3)
@given(harness.text_shape())
def test_bert_walks_losslessly(rounds, s):
    harness.assert_equivalent(harness.bert_case(s, "BertModel"), run=RUNS[rounds])


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=3)
@given(harness.text_shape())
def test_gpt2_walks_losslessly(rounds, s):
    harness.assert_equivalent(harness.gpt2_case(s), run=RUNS[rounds])


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=4)
@given(harness.text_shape(gqa=True), st.sampled_from(["llama", "qwen2", "mistral"]), st.booleans())
def test_llama_family_walks_losslessly(rounds, s, arch, tie):
    harness.assert_equivalent(harness.llama_case(s, arch, tie=tie), run=RUNS[rounds])


@pytest.mark.parametrize("rounds, per_step", [(2, 2 * 2 + 2), (4, 4 * 2 + 1)])  # + layer 0's QKV and the head; + the head
def test_generation_with_p3s_cache_equals_the_full_forward(rounds, per_step):
    case = harness.llama_case(dict(heads=4, kv_heads=2, head_dim=8, layers=2, ffn=24, vocab=40, batch=1, seq=6,
                                   lengths=[6], seed=3))  # fmt: skip
    servers = [ShareServer.from_model(case.model) for _ in range(2)]
    with servers[0].listen() as a, servers[1].listen() as b, Servers([a.address, b.address]) as conn:
        p3 = SharesModel(case.model, conn, rounds)
        g = p3.generate([1, 2, 3], 6, keep_logits=True, stop_at_eos=False)
        full = case.model(input_ids=torch.tensor([[1, 2, 3] + g.token_ids])).logits[0, 2:-1]
        assert torch.allclose(torch.stack(g.logits), full, atol=1e-4)
        assert g.token_ids == full.argmax(-1).tolist()
        assert conn.stats.rounds == 6 * per_step


def test_the_folded_block_weight_is_what_the_walk_algebra_says():
    """[o | h̃]·[[W_o, W_o·W̃], [0, W]] = [o·W_o | o·W_o·W̃ + h̃·W] on the ring, with h̃ = h∘γ
    and W̃ = diag(γ)·W: the second half is (h + o·W_o)·W̃. The server's GEMM that skips the
    zero block gives the dense product's bits."""
    from stip.shares.walk import _block

    rng = np.random.default_rng(1)
    wo, w, g = rng.standard_normal((6, 4)) * 0.3, rng.standard_normal((4, 5)) * 0.3, rng.uniform(0.5, 2, 4)
    o, h = rng.standard_normal((3, 6)), rng.standard_normal((3, 4)) * 20
    block = _block(wo, g[:, None] * w, w)
    skip, dense = ring.Weight.encode(block, zero=(6, 4)), ring.Weight.encode(block)
    x, rows = ring.encode(np.concatenate([o, h * g], 1))
    assert np.array_equal(ring.matmul(x, skip), ring.matmul(x, dense))
    y = ring.decode(ring.matmul(x, skip), rows, skip.exponents)
    want = np.concatenate([o @ wo, (h + o @ wo) @ (g[:, None] * w)], 1)
    assert np.abs(y - want).max() < 1e-6 * np.abs(want).max()
    with pytest.raises(ValueError, match="not"):
        ring.Weight.encode(block, zero=(5, 4))


def test_an_older_server_without_the_folded_ops_is_named_and_4_rounds_still_work():
    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2,
                                   lengths=[2], seed=0))  # fmt: skip
    servers = [ShareServer.from_model(case.model) for _ in range(2)]
    for s in servers:
        s.ops = {k: v for k, v in s.ops.items() if "+" not in k}
    with servers[0].listen() as a, servers[1].listen() as b, Servers([a.address, b.address]) as conn:
        with pytest.raises(SharesError, match="--rounds 4"):
            SharesModel(case.model, conn)
        assert SharesModel(case.model, conn, rounds=4).generate([1, 2], 2, stop_at_eos=False).token_ids
    with pytest.raises(ValueError, match="4 or 2"):
        SharesModel(case.model, conn, rounds=3)


@pytest.mark.parametrize("rounds", [2, 4])
def test_prepared_masks_move_the_online_phase_to_one_server(rounds):
    case = harness.llama_case(dict(heads=4, kv_heads=2, head_dim=8, layers=2, ffn=24, vocab=40, batch=1, seq=6,
                                   lengths=[6], seed=5))  # fmt: skip
    seen = [[], []]
    servers = [ShareServer.from_model(case.model, observe=lambda op, x, i=i: seen[i].append(op)) for i in range(2)]
    with servers[0].listen() as a, servers[1].listen() as b, Servers([a.address, b.address]) as conn:
        p3 = SharesModel(case.model, conn, rounds)
        want = p3.generate([1, 2, 3], 5, keep_logits=True, stop_at_eos=False)
        plan = p3.plan(3, 5)
        first, head = "0.qkv", "head"
        assert len(plan) == 5 * (4 * 2 + 1 if rounds == 4 else 2 * 2 + 2) and plan[0] == (first, 3) and plan[-1] == (head, 1)
        assert {name for name, _ in plan} == set(p3.walk.ops())
        conn.prepare(plan)
        assert conn.offline.rounds == len({name for name, _ in plan}) and conn.offline.bytes_up[1] == 0
        assert conn.prepared(first) == 3 + 4 and conn.prepared(head) == 5
        seen[0].clear(), seen[1].clear()
        before = conn.stats.copy()
        got = p3.generate([1, 2, 3], 5, keep_logits=True, stop_at_eos=False)
        online = conn.stats.since(before)
        assert got.token_ids == want.token_ids
        assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-5)
        assert seen[0] == [] and len(seen[1]) == len(plan) == online.rounds  # S1 idle online
        assert online.bytes_up[0] == 0 and not any(conn.prepared(name) for name in conn.ops)  # every mask used, once
        conn.prepare([("0.o", 2)])
        conn.prepare([("0.o", 2)])
        r, y = conn._take("0.o", 3)  # across two blocks, in order
        assert r.shape[0] == y.shape[0] == 3 and conn.prepared("0.o") == 1 and conn._take("0.o", 2) is None


def test_a_rope_the_walk_does_not_compute_is_refused():
    import transformers as T

    scaled = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                              vocab_size=10, rope_scaling={"rope_type": "linear", "factor": 2.0}))  # fmt: skip
    with pytest.raises(ValueError, match="RoPE of type 'linear'"):
        ShareServer.from_model(scaled)


# --- the server refuses what it must ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2,
                                   lengths=[2], seed=0))  # fmt: skip
    with ShareServer.from_model(case.model, token="s3cret").listen() as bound:
        yield bound


def _ask(sock, tensors, meta):
    protocol.send(sock, wire.encode(tensors, meta))
    return wire.decode(protocol.recv(sock))


def _closed(sock) -> bool:
    try:
        return protocol.recv(sock) is None
    except ConnectionError:
        return True


def test_server_takes_one_small_hello_from_a_stranger(tiny_server):
    host, port = protocol.parse_address(tiny_server.address)
    x = torch.zeros(1, 8, dtype=torch.int64)
    for tensors, meta in [({"x": x}, {"op": "0.qkv"}), ({}, {"op": "hello", "token": "wrong"}),
                          ({}, {"op": "hello", "token": "s3crét"})]:  # fmt: skip  (not ASCII: no crash)
        with socket.create_connection((host, port)) as sock:
            assert "unauthorised" in _ask(sock, tensors, meta)[1]["error"]
            assert _closed(sock)  # one frame before a good hello, no second try
    with socket.create_connection((host, port)) as sock:  # bulk data before hello: refused unread
        protocol.send(sock, wire.encode({"x": torch.zeros(1, 4096, dtype=torch.int64)}, {"op": "0.qkv"}))
        assert "before hello" in wire.decode(protocol.recv(sock))[1]["error"]
        assert _closed(sock)


def test_server_refuses_bad_requests_and_keeps_the_connection(tiny_server):
    host, port = protocol.parse_address(tiny_server.address)
    x = torch.zeros(1, 8, dtype=torch.int64)
    with socket.create_connection((host, port)) as sock:
        hello = _ask(sock, {}, {"op": "hello", "token": "s3cret"})[1]
        assert json.loads(hello["ops"])["0.qkv"] == [8, 16]
        assert "unknown matmul" in _ask(sock, {"x": x}, {"op": "9.qkv"})[1]["error"]
        assert "takes" in _ask(sock, {"x": torch.zeros(1, 7, dtype=torch.int64)}, {"op": "0.qkv"})[1]["error"]
        assert "dtype" in _ask(sock, {"x": torch.zeros(1, 8)}, {"op": "0.qkv"})[1]["error"]
        assert "missing" in _ask(sock, {}, {"op": "0.qkv"})[1]["error"]
        assert _ask(sock, {"x": x}, {"op": "0.qkv"})[0]["y"].shape == (1, 16)
        sock.sendall(b"\x05\x00\x00\x00\x00\x00\x00\x00junk!")  # not a message: an error reply
        assert "malformed" in wire.decode(protocol.recv(sock))[1]["error"]
        sock.sendall((1 << 40).to_bytes(8, "little"))  # a frame too large: an error, then the server hangs up
        assert "over the limit" in wire.decode(protocol.recv(sock))[1]["error"]
        assert _closed(sock)
    with Servers([tiny_server.address, tiny_server.address.replace("127.0.0.1", "localhost")], token="s3cret") as s:
        assert s.model.startswith("llama-")  # and it still serves new connections
    with pytest.raises(SharesError, match="unauthorised"):
        Servers([tiny_server.address, tiny_server.address.replace("127.0.0.1", "localhost")])


def test_client_refuses_one_server_twice_and_a_dead_server(tiny_server):
    with pytest.raises(ValueError, match="two different"):
        Servers([tiny_server.address, tiny_server.address])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConnectionError, match="cannot reach"):
        Servers([tiny_server.address, dead], token="s3cret")
    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2,
                                   lengths=[2], seed=0))  # fmt: skip
    other = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2,
                                    lengths=[2], seed=1))  # fmt: skip
    with ShareServer.from_model(case.model).listen() as a, ShareServer.from_model(other.model).listen() as b:
        with pytest.raises(SharesError, match="different models"):
            Servers([a.address, b.address])
        with Servers([a.address, a.address.replace("127.0.0.1", "localhost")]) as conn:
            with pytest.raises(SharesError, match="not the model P3 loaded"):
                SharesModel(other.model, conn)


# --- the real models, servers as subprocesses ---------------------------------------------------------


@pytest.fixture(scope="module")
def certs(share_certs):
    """S1's and S2's certificates: the real models' servers run TLS 1.3, P3 pins both."""
    return [share_certs["s1"], share_certs["s2"]]


def _server(src, cert):
    return ServerProcess(src, "--threads", "1", "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]),
                         command="share-server", timeout=300)  # fmt: skip


def _servers(src, certs):
    """S1 and S2, started side by side."""
    return side_by_side(*(lambda c=c: _server(src, c) for c in certs))


def _trust(certs) -> list:
    return [tls.Trust(pin=pin) for _, _, pin in certs]


def _pins(certs) -> str:
    return ",".join(pin for _, _, pin in certs)


@pytest.mark.slow
def test_minilm_embeddings_through_two_share_server_processes(minilm_path, certs):
    from transformers import AutoModel, AutoTokenizer

    from stip.models.default import mean_pool

    texts = ["The quick brown fox jumps over the lazy dog.", "Shares mode hides the input from each server.", "Hi"]
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = AutoModel.from_pretrained(minilm_path)(**batch).last_hidden_state
    ref = torch.nn.functional.normalize(mean_pool(h, batch["attention_mask"]), dim=-1)
    with _servers(minilm_path, certs) as (s1, s2):
        with Servers([s1.url, s2.url], trust=_trust(certs)) as conn:
            for rounds, per_pass in ((2, 1 + 2 * 6), (4, 4 * 6)):  # the must-show: ≤ 13 a pass, folded
                before = conn.stats.copy()
                got = SharesModel(minilm_path, conn, rounds).encode(texts)
                assert conn.stats.since(before).rounds == per_pass and min(conn.stats.bytes_up) > 0
                cos = (got.embedding * ref).sum(-1)
                assert cos.min() >= 0.9999, (rounds, cos)
        r = subprocess.run([sys.executable, "-m", "stip.cli", "query", "minilm", *texts, "--shares", f"{s1.url},{s2.url}",
                            "--pin", _pins(certs), "--json"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 0, r.stderr
        emb = torch.tensor(json.loads(r.stdout)["embedding"])
        assert (emb * ref).sum(-1).min() >= 0.9999
        assert "13 round trips" in r.stderr
        bad = subprocess.run([sys.executable, "-m", "stip.cli", "query", "minilm", "x", "--shares", f"{s1.url},{s2.url}",
                              "--pin", _pins(certs), "--rounds", "3"], capture_output=True, text=True, timeout=120)  # fmt: skip
        assert bad.returncode == 1 and "--rounds takes 2 or 4" in bad.stderr
        with ServerProcess("minilm", "--shares", f"{s1.url},{s2.url}", "--pin", _pins(certs), command="proxy", timeout=300) as proxy:
            client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=300)
            got = client.embeddings.create(model=client.models.list().data[0].id, input=texts)  # the official client, unchanged
        vectors = torch.tensor([d.embedding for d in got.data])
        assert float(torch.nn.functional.cosine_similarity(vectors, emb, dim=-1).min()) >= 0.9999


@pytest.fixture(scope="module")
def smollm2_servers(smollm2_shares):
    path, s1, s2 = smollm2_shares
    return path, s1.address, s2.address


@pytest.fixture(scope="module")
def smollm2_plain(smollm2_servers):
    from stip.seal import load_source

    return load_source(smollm2_servers[0])


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_greedy_is_identical_and_logits_within_1e_3(smollm2_servers, smollm2_plain, certs):
    """The must-show at test scale (2 prompts × 12 tokens; the benchmark runs 5 × 32), over TLS."""
    path, a, b = smollm2_servers
    with Servers([a, b], trust=_trust(certs)) as conn:
        # one prompt per schedule; rounds counted per decode step (the must-show: ≤ 62 folded)
        for rounds, per_token, text in ((2, 1 + 2 * 30 + 1, "What is the capital of France?"),
                                        (4, 4 * 30 + 1, "Name three primary colours.")):  # fmt: skip
            p3, steps = SharesModel(path, conn, rounds), []
            prompt = _chat(p3.tokenizer, text)
            g = p3.generate(prompt, 12, keep_logits=True, on_token=lambda _t: steps.append(conn.stats.rounds), stop_at_eos=False)
            assert {b - a for a, b in zip(steps, steps[1:])} == {per_token}
            with torch.no_grad():
                ref = smollm2_plain(input_ids=torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1 : -1]
            assert float((torch.stack(g.logits) - ref).abs().max()) <= 1e-3, rounds
            assert g.token_ids == ref.argmax(-1).tolist(), rounds


@pytest.mark.slow
def test_concurrent_walks_batched_at_the_servers_equal_greedy_alone(smollm2_servers, smollm2_plain, certs):
    """Exactness under load at test scale (4 streams × 8 tokens; `make bench-serving` runs 16 × 32
    against single-stream runs): walkers forked from one model, each on its own connections, at
    once; the servers batch their matmuls together; every stream equals plaintext greedy."""
    from concurrent.futures import ThreadPoolExecutor

    from stip.models.hf import greedy
    from stip.shares import one_thread

    path, a, b = smollm2_servers
    with Servers([a, b], trust=_trust(certs)) as conn:
        first = SharesModel(path, conn)
        walkers = [first] + [first.fork() for _ in range(3)]
        assert len({id(w.servers) for w in walkers}) == 4 and all(w.walk.layers is first.walk.layers for w in walkers)
        prompts = [_chat(first.tokenizer, t) for t in ("Hi!", "What is 2 + 2?", "Name a colour.", "Say yes.")]
        with one_thread(), ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda wp: wp[0].generate(wp[1], 8).token_ids, zip(walkers, prompts)))
        for w in walkers[1:]:
            w.servers.close()
    assert got == [greedy(smollm2_plain, [p], 8)[0] for p in prompts]


def test_the_engine_runs_up_to_streams_generations_at_once():
    """Three requests, two walkers: two run at once, the third waits for one to be free; each
    stream gets its whole answer, and no more walkers exist than ``streams``."""
    import asyncio

    from stip.client.generation import Ask
    from stip.shares.engine import SharesEngine

    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2,
                                   lengths=[2], seed=0))  # fmt: skip
    with ShareServer.from_model(case.model).listen() as s1, ShareServer.from_model(case.model).listen() as s2:
        engine = SharesEngine(SharesModel(case.model, Servers([s1.address, s2.address])), streams=2)
        want = [engine.model.generate([1, 2, i], 5, stop_at_eos=False).token_ids for i in range(3)]

        async def one(i):
            out = []
            async for piece in engine.generate(Ask([1, 2, i], 5)):
                out += piece.ids
            return out

        async def run():
            try:
                return await asyncio.gather(*(one(i) for i in range(3)))
            finally:
                await engine.close()

        got = asyncio.run(run())
    assert got == want and len(engine.walkers) == 2


@pytest.mark.slow
def test_smollm2_with_an_adapter_trained_here_equals_peft_merged(smollm2_servers, smollm2_plain, certs, tmp_path):
    """A real LoRA, short (`stip train lora`: 8 steps; the benchmark trains 300), on P3 alone:
    greedy and logits equal PEFT's merged model on both schedules, the adapter changes the
    base's answer, and `stip generate --adapter` gives the same tokens."""
    import copy

    from stip.models import lora

    path, a, b = smollm2_servers
    adapter = tmp_path / "adapter"
    r = subprocess.run([sys.executable, "-m", "stip.cli", "train", "lora", str(adapter), "--model", str(path), "--steps", "8",
                        "--rank", "8", "--lr", "3e-3", "--length", "64", "--eval-windows", "2", "--json"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    held_out = json.loads(r.stdout)["held_out"]
    assert held_out["perplexity_adapted"] < held_out["perplexity_base"], held_out
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    merged = lora.merge(copy.deepcopy(smollm2_plain), adapter)
    changed = 0
    with Servers([a, b], trust=_trust(certs)) as conn:
        for rounds, text in ((2, "What is the capital of France?"), (4, "Name three primary colours.")):
            p3 = SharesModel(path, conn, rounds, adapter)
            prompt = _chat(p3.tokenizer, text)
            g = p3.generate(prompt, 12, keep_logits=True, stop_at_eos=False)
            with torch.no_grad():
                ref = merged(input_ids=torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1 : -1]
                base = smollm2_plain(input_ids=torch.tensor([prompt + g.token_ids])).logits[0, len(prompt) - 1 : -1]
            assert float((torch.stack(g.logits) - ref).abs().max()) <= 1e-3, rounds
            assert g.token_ids == ref.argmax(-1).tolist(), rounds
            changed += int((base.argmax(-1) != ref.argmax(-1)).sum())
    assert changed >= 1, "the adapter changed no greedy token: this test would prove nothing"
    ids = ",".join(map(str, prompt))
    r = subprocess.run([sys.executable, "-m", "stip.cli", "generate", str(path), "--ids", ids, "--shares", f"{a},{b}", "--pin", _pins(certs),
                        "--adapter", str(adapter), "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == g.token_ids[:4] and "applied here" in r.stderr


@pytest.mark.slow
def test_openai_client_through_stip_proxy_in_shares_mode(smollm2_servers, smollm2_plain, certs):
    """The official client, unchanged, through the proxy; the proxy's links to S1 and S2 are TLS, pinned."""
    from stip.models.hf import greedy

    path, a, b = smollm2_servers
    with ServerProcess(path, "--shares", f"{a},{b}", "--pin", _pins(certs), "--prepare-tokens", "64", command="proxy",
                       timeout=300) as proxy:  # fmt: skip
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        question = "What is the capital of France?"
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        want = greedy(smollm2_plain, [_chat(tok, question)], 8, stop={tok.eos_token_id})[0]
        assert r.choices[0].message.content == tok.decode(want, skip_special_tokens=True)
        assert r.usage.completion_tokens == len(want)
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=8,
                                                temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=10**9)

        # logprobs (P3's own), n, logit_bias: as the plaintext model gives them
        ids = _chat(tok, question)
        lp = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, logprobs=3, echo=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0]  # fmt: skip
        with torch.no_grad():
            every = torch.log_softmax(smollm2_plain(input_ids=torch.tensor([ids + lp.token_ids])).logits[0].double(), -1)
        whole = ids + lp.token_ids
        want = every[torch.arange(len(whole) - 1), whole[1:]]
        got = torch.tensor(lp.logprobs.token_logprobs[1:], dtype=torch.float64)
        assert lp.logprobs.token_logprobs[0] is None and lp.token_ids == want_ids(smollm2_plain, ids, 4)
        LOGPROB_ERRORS.append(float((got - want).abs().max()))
        assert LOGPROB_ERRORS[-1] <= LOGPROB_TOLERANCE, LOGPROB_ERRORS
        warnings.warn(f"shares mode through the proxy: logprobs within {LOGPROB_ERRORS[-1]:.1e} of plaintext")
        for top, row in zip(lp.logprobs.top_logprobs[len(ids):], every[len(ids) - 1 :]):
            assert {tok.decode([t]) for t in row.topk(3).indices.tolist()} <= set(top)
        kw = dict(model=model, prompt=ids, max_tokens=6, temperature=1.0, n=3, seed=9, extra_body={"ignore_eos": True})
        a, b = client.completions.create(**kw), client.completions.create(**kw)
        assert [c.index for c in a.choices] == [0, 1, 2] and [c.text for c in a.choices] == [c.text for c in b.choices]
        first = lp.token_ids[0]
        biased = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, logit_bias={str(first): -100},
                                           extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids  # fmt: skip
        assert biased[0] != first and biased == want_ids(smollm2_plain, ids, 4, {first: -100.0})


LOGPROB_TOLERANCE = 1e-4  # the bound; measured 3.5e-5 (fixed point on Z_2^64 against float32 plaintext)
LOGPROB_ERRORS: list[float] = []


@torch.no_grad()
def want_ids(model, ids: list[int], n: int, bias: dict[int, float] = {}) -> list[int]:
    """Plaintext greedy with a logit bias, the whole sequence each step."""
    out = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([out])).logits[0, -1].double()
        for t, b in bias.items():
            logits[t] += b
        out.append(int(logits.argmax()))
    return out[len(ids):]


# --- what a server's view gives the attacks --------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_views(minilm_path):
    from transformers import AutoTokenizer

    from stip.seal import load_source

    model, tok = load_source(minilm_path), AutoTokenizer.from_pretrained(minilm_path)
    ids = [tok(t)["input_ids"] for t in ("My password is hunter2.", "John has diabetes.")]
    return model, ids, attacks.observe(model, ids)


def test_each_servers_bytes_are_uniform_and_the_unshared_encoding_is_not(minilm_views):
    _, _, views = minilm_views
    for server in (0, 1):
        u = attacks.uniformity(views.bytes[server])
        assert u["bytes"] > 500_000 and u["passed"] == 1.0, u
    control = attacks.uniformity(views.plain)
    assert control["p"] < 1e-12 and control["passed"] <= 2 / 9


def test_vocabulary_matching_is_at_chance_on_a_share_and_exact_on_the_activations(minilm_views):
    model, ids, views = minilm_views
    for server in (0, 1):
        assert attacks.vocab_input(views, server, model, ids)["rate"] <= 1 / 14  # at most one lucky token
    assert attacks.vocab_input(attacks.unmasked(views), 0, model, ids)["rate"] == 1.0
