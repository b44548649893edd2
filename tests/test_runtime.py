"""The three-party runtime: `stip serve` as a real subprocess on loopback, P3's client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

import harness
from stip import wire
from stip.client.api import Client, KeyMismatch
from stip.client.generation import Sampling
from stip.models import default
from stip.seal import load_source, seal_folder
from stip.serve.process import ServerProcess

TOKEN = "test-token-3f9a"
OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tok") / "token"
    f.write_text(TOKEN + "\n")
    return f


@pytest.fixture(scope="module")
def minilm_server(minilm_sealed_dir, token_file):
    with ServerProcess(minilm_sealed_dir / "server", "--max-body-mb", "1", "--max-batch", "16", token_file=token_file) as srv:
        yield srv


def _sealed(tmp_path_factory, model, name):
    src = tmp_path_factory.mktemp(name + "-src")
    model.save_pretrained(src)
    out = tmp_path_factory.mktemp(name + "-sealed")
    seal_folder(src, out)
    return src, out


def _gpt2():
    torch.manual_seed(11)
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=96, bos_token_id=None, eos_token_id=None, initializer_range=0.1)
    return T.GPT2LMHeadModel(cfg).eval()


def _llama():
    torch.manual_seed(12)
    cfg = T.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
        vocab_size=128, max_position_embeddings=96, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        initializer_range=0.1,
    )
    model = T.LlamaForCausalLM(cfg)
    harness.randomize_norms(model, torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def gpt2_sealed(tmp_path_factory):
    return _sealed(tmp_path_factory, _gpt2(), "gpt2")


@pytest.fixture(scope="module")
def gpt2_server(gpt2_sealed):
    with ServerProcess(gpt2_sealed[1] / "server", "--session-idle", "1.5", "--max-sessions", "4") as srv:
        yield srv


# --- answers equal plaintext -----------------------------------------------------------------------


def test_minilm_embeddings_equal_plaintext(minilm_server, minilm_sealed_dir, minilm_path):
    from test_minilm import SENTENCES

    with Client(minilm_sealed_dir / "client", minilm_server.url, token=TOKEN) as c:
        enc = c.encode(SENTENCES[:16])
        assert c.stats.bytes_up > 0 and c.stats.bytes_down > 0 and c.stats.server_seconds > 0
    batch = c.tokenizer(SENTENCES[:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = load_source(minilm_path)(**batch).last_hidden_state
    ref = torch.nn.functional.normalize(default.mean_pool(plain, batch["attention_mask"]), dim=-1)
    assert float(torch.nn.functional.cosine_similarity(ref, enc.embedding).min()) >= 0.99999


def test_vit_classifier_gives_the_original_logits(tmp_path_factory, tmp_path):
    case = harness.vit_case(dict(heads=4, head_dim=8, layers=2, ffn=64, patch=4, grid=4, batch=1, labels=7, seed=21))
    src, out = _sealed(tmp_path_factory, case.model, "vit")
    paths = []
    rng = np.random.default_rng(0)
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (24 + 8 * i, 20, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    with ServerProcess(out / "server") as srv, Client(out / "client", srv.url) as c:
        got = c.classify(paths)
        pixels = c.image_processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        r = _cli("query", out / "client", "--server", srv.url, "--json", *paths)  # images as file paths
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["label"] == got.labels
    with torch.no_grad():
        ref = case.model(pixel_values=pixels).logits
    assert float((got.logits - ref).abs().max()) <= 1e-4
    assert torch.equal(got.logits.argmax(-1), ref.argmax(-1))
    assert len(got.labels) == 3


@pytest.mark.parametrize("which", ["gpt2", "llama-gqa"])
def test_greedy_generation_matches_transformers_generate(which, tmp_path_factory, gpt2_sealed, gpt2_server):
    if which == "gpt2":
        (src, out), srv = gpt2_sealed, gpt2_server
        model = _gpt2()
        srv_ctx = None
    else:
        model = _llama()
        src, out = _sealed(tmp_path_factory, model, "llama")
        srv_ctx = ServerProcess(out / "server")
        srv = srv_ctx
    try:
        prompt = [5, 17, 99, 3, 42, 8]
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
        with Client(out / "client", srv.url) as c:
            got = c.generate(prompt, max_new_tokens=40)
            assert c.stats.requests == 40  # one round trip per token
        assert len(got.token_ids) == 40
        assert got.token_ids == ref
    finally:
        if srv_ctx is not None:
            srv_ctx.stop()


def test_sampling_is_repeatable_with_a_seed(gpt2_sealed, gpt2_server):
    with Client(gpt2_sealed[1] / "client", gpt2_server.url) as c:
        a = c.generate([1, 2, 3], 12, Sampling(temperature=0.8, top_p=0.9, seed=7))
        b = c.generate([1, 2, 3], 12, Sampling(temperature=0.8, top_p=0.9, seed=7))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    """P3's one sampler (every engine's temperature > 0): rows drawn at their probabilities,
    an id of probability 0 never, the same seed the same draws."""
    import torch

    from stip.models.hf import draw

    p = torch.tensor([[0.0, 0.2, 0.0, 0.8, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = torch.cat([draw(p, torch.Generator().manual_seed(i)) for i in range(4000)], 1)
    counts = torch.stack([torch.bincount(row, minlength=5) for row in got]) / got.shape[1]
    assert (counts - p).abs().max() < 0.03 and not counts[p == 0].any()
    assert torch.equal(draw(p.repeat(20, 1), torch.Generator().manual_seed(1)), draw(p.repeat(20, 1), torch.Generator().manual_seed(1)))


def test_servers_started_side_by_side_are_all_stopped_also_when_one_fails():
    from stip.serve.process import side_by_side

    class Fake:
        stopped = 0

        def stop(self):
            self.stopped += 1

    def broken():
        raise RuntimeError("the share server did not start")

    with side_by_side(Fake, Fake) as (a, b):
        assert (a.stopped, b.stopped) == (0, 0)
    assert (a.stopped, b.stopped) == (1, 1)
    started = []
    with pytest.raises(RuntimeError, match="did not start"):
        with side_by_side(lambda: started.append(Fake()) or started[-1], broken):
            pass
    assert [f.stopped for f in started] == [1]


def test_sixteen_clients_in_parallel(minilm_server, minilm_sealed_dir, minilm_path):
    from test_minilm import SENTENCES

    model = load_source(minilm_path)
    groups = [SENTENCES[i : i + 3] for i in range(16)]

    def one(texts):
        with Client(minilm_sealed_dir / "client", minilm_server.url, token=TOKEN) as c:
            enc = c.encode(texts)
            batch = c.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = torch.nn.functional.normalize(default.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]), dim=-1)
        return float(torch.nn.functional.cosine_similarity(ref, enc.embedding).min())

    with ThreadPoolExecutor(16) as pool:
        cosines = list(pool.map(one, groups))
    assert len(cosines) == 16 and min(cosines) >= 0.99999


# --- bad input: a clear 4xx, and the server keeps serving --------------------------------------------


def _post(srv, path, body, token=TOKEN, **kw):
    headers = dict(OCTET, **({"Authorization": f"Bearer {token}"} if token else {}))
    return httpx.post(srv.url + path, content=body, headers=headers, timeout=30, **kw)


def _x(b=1, n=4, d=384, dtype=torch.float32):
    return torch.randn(b, n, d, dtype=dtype)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"this is not safetensors", 400, "malformed"),
        (json.dumps({"embeddings": [[1.0, 2.0]]}).encode(), 400, "malformed"),
        (wire.encode({"embeddings": _x(d=10)}), 422, "width 10"),
        (wire.encode({"embeddings": torch.randn(4, 384)}), 422, "3 dimensions"),
        (wire.encode({"embeddings": _x().to(torch.float64)}), 422, "dtype float64"),
        (wire.encode({"embeddings": torch.full((1, 2, 384), float("nan"))}), 422, "NaN"),
        (wire.encode({"embeddings": _x(), "attention_mask": torch.ones(1, 5, dtype=torch.long)}), 422, "shape"),
        (wire.encode({"embeddings": _x(), "attention_mask": torch.full((1, 4), 3)}), 422, "values in 0..1"),
        (wire.encode({"embeddings": _x(), "input_ids": torch.ones(1, 4, dtype=torch.long)}), 422, "unexpected tensor"),
        (wire.encode({"embeddings": _x(n=513)}), 413, "exceeds the limit of 512"),
        (wire.encode({"embeddings": _x(b=17, n=2)}), 413, "batch of 17"),
        (wire.encode({"embeddings": _x(n=700)}), 413, "exceeds the limit"),  # > 1 MiB body
    ],
)
def test_bad_forward_bodies(minilm_server, body, status, fragment):
    r = _post(minilm_server, "/v1/forward", body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
    assert httpx.get(minilm_server.url + "/v1/health").status_code == 200


def test_auth(minilm_server):
    body = wire.encode({"embeddings": _x()})
    for token in (None, "wrong-token"):
        r = _post(minilm_server, "/v1/forward", body, token=token)
        assert r.status_code == 401 and "token" in r.json()["error"]["message"]
    assert httpx.get(minilm_server.url + "/v1/info").status_code == 401
    assert _post(minilm_server, "/v1/forward", body).status_code == 200
    assert httpx.get(minilm_server.url + "/v1/health").status_code == 200  # health needs no token


def test_client_refuses_a_server_with_another_key(minilm_server, minilm_path, tmp_path):
    seal_folder(minilm_path, tmp_path / "other")
    with Client(tmp_path / "other" / "client", minilm_server.url, token=TOKEN) as c, pytest.raises(KeyMismatch):
        c.encode(["hello"])


def test_sessions_only_for_causal_models(minilm_server):
    r = _post(minilm_server, "/v1/sessions", wire.encode({"embeddings": _x()}))
    assert r.status_code == 404 and "causal" in r.json()["error"]["message"]


def test_unknown_and_expired_sessions(gpt2_server):
    x = torch.randn(1, 3, 64)
    r = _post(gpt2_server, "/v1/sessions/nope/step", wire.encode({"embeddings": x[:, :1]}), token=None)
    assert r.status_code == 404 and "unknown session" in r.json()["error"]["message"]
    r = _post(gpt2_server, "/v1/sessions", wire.encode({"embeddings": x}), token=None)
    assert r.status_code == 200
    sid = r.headers["X-Stip-Session"]
    assert wire.decode(r.content)[1]["session"] == sid
    time.sleep(2.5)  # idle limit 1.5 s; the server sweeps every 0.75 s
    assert httpx.get(gpt2_server.url + "/v1/health").json()["open_sessions"] == 0  # freed while idle
    r = _post(gpt2_server, f"/v1/sessions/{sid}/step", wire.encode({"embeddings": x[:, :1]}), token=None)
    assert r.status_code == 410 and "expired" in r.json()["error"]["message"]
    assert httpx.delete(gpt2_server.url + f"/v1/sessions/{sid}").status_code == 410
    assert httpx.get(gpt2_server.url + "/v1/health").status_code == 200


def test_session_cap(gpt2_server):
    x = wire.encode({"embeddings": torch.randn(1, 2, 64)})
    opened = []
    try:
        for _ in range(4):
            r = _post(gpt2_server, "/v1/sessions", x, token=None)
            assert r.status_code == 200
            opened.append(r.headers["X-Stip-Session"])
        r = _post(gpt2_server, "/v1/sessions", x, token=None)
        assert r.status_code == 429 and "too many open sessions" in r.json()["error"]["message"]
    finally:
        for sid in opened:
            httpx.delete(gpt2_server.url + f"/v1/sessions/{sid}")
    r = _post(gpt2_server, "/v1/sessions", x, token=None)  # room again
    assert r.status_code == 200
    httpx.delete(gpt2_server.url + f"/v1/sessions/{r.headers['X-Stip-Session']}")


def test_session_too_long(gpt2_server):
    r = _post(gpt2_server, "/v1/sessions", wire.encode({"embeddings": torch.randn(1, 97, 64)}), token=None)
    assert r.status_code == 413


def test_close_racing_a_step(gpt2_server):
    """Close while steps are in flight: every answer is 2xx or a clear 4xx, never a 500,
    and the session is gone afterwards."""
    x = torch.randn(1, 4, 64)
    for _ in range(5):
        r = _post(gpt2_server, "/v1/sessions", wire.encode({"embeddings": x}), token=None)
        sid = r.headers["X-Stip-Session"]
        step = wire.encode({"embeddings": x[:, :1]})
        results = []
        barrier = threading.Barrier(4)

        def stepper():
            barrier.wait()
            results.append(_post(gpt2_server, f"/v1/sessions/{sid}/step", step, token=None).status_code)

        def closer():
            barrier.wait()
            results.append(httpx.delete(gpt2_server.url + f"/v1/sessions/{sid}").status_code)

        threads = [threading.Thread(target=stepper) for _ in range(3)] + [threading.Thread(target=closer)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s in (200, 404, 409) for s in results), results
        assert 200 in results
        r = _post(gpt2_server, f"/v1/sessions/{sid}/step", step, token=None)
        assert r.status_code == 404
    assert httpx.get(gpt2_server.url + "/v1/health").status_code == 200


def test_openapi_describes_binary_endpoints(minilm_server):
    spec = httpx.get(minilm_server.url + "/openapi.json").json()
    for path in ("/v1/forward", "/v1/sessions", "/v1/sessions/{session_id}/step"):
        op = spec["paths"][path]["post"]
        assert "application/octet-stream" in op["requestBody"]["content"]
        assert "application/octet-stream" in op["responses"]["200"]["content"]
        assert {"400", "401", "413", "422"} <= set(op["responses"])
    assert "delete" in spec["paths"]["/v1/sessions/{session_id}"]
    assert "/v1/health" in spec["paths"] and "/v1/info" in spec["paths"]


def test_wrong_method_is_405_with_allow(minilm_server):
    """RFC 9110: a 405 names the methods the resource has (found by fuzzing with schemathesis)."""
    for method, path, allowed in (("GET", "/v1/forward", "POST"), ("PUT", "/v1/health", "GET"), ("POST", "/v1/info", "GET")):
        r = httpx.request(method, minilm_server.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 405 and r.json()["error"]["status"] == 405
        assert allowed in r.headers["allow"]


# --- the command line ------------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "stip.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_query_json(minilm_server, minilm_sealed_dir, token_file):
    r = _cli("query", minilm_sealed_dir / "client", "--server", minilm_server.url, "--token-file", token_file, "--json", "hello world", "secure inference")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert len(obj["embedding"]) == 2 and len(obj["embedding"][0]) == 384
    assert len(obj["last_hidden_state"][0]) == 4  # [CLS] hello world [SEP]


def test_query_errors_are_one_line(minilm_server, minilm_sealed_dir):
    r = _cli("query", minilm_sealed_dir / "client", "--server", minilm_server.url, "hello")
    assert r.returncode == 1 and "401" in r.stderr and "Traceback" not in r.stderr
    r = _cli("query", minilm_sealed_dir / "client", "--server", "http://127.0.0.1:9", "hello")
    assert r.returncode == 1 and "cannot reach the server" in r.stderr


def test_generate_json(gpt2_sealed, gpt2_server):
    r = _cli("generate", gpt2_sealed[1] / "client", "--server", gpt2_server.url, "--ids", "5,17,99", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert len(obj["token_ids"]) == 8 and obj["text"] is None
    with Client(gpt2_sealed[1] / "client", gpt2_server.url) as c:
        assert c.generate([5, 17, 99], 8).token_ids == obj["token_ids"]


def test_serve_refuses_a_folder_that_is_not_sealed(minilm_path):
    r = _cli("serve", minilm_path, "--port", "0")
    assert r.returncode == 1 and "not a sealed stip checkpoint" in r.stderr


def test_serve_refuses_a_token_mode_sealing(tmp_path_factory):
    src = tmp_path_factory.mktemp("llama-src")
    _llama().save_pretrained(src)
    out = tmp_path_factory.mktemp("llama-tokens")
    seal_folder(src, out, mode="tokens")
    r = _cli("serve", out / "server", "--port", "0")
    assert r.returncode == 1 and "vLLM" in r.stderr and "stip proxy" in r.stderr


def test_oversized_body_without_content_length(minilm_server):
    """A chunked upload is cut off at the limit too."""
    def chunks():
        for _ in range(20):
            yield b"\0" * (128 << 10)  # 2.5 MiB in all, limit 1 MiB

    r = httpx.post(minilm_server.url + "/v1/forward", content=chunks(), headers=dict(OCTET, Authorization=f"Bearer {TOKEN}"), timeout=30)
    assert r.status_code == 413
    assert httpx.get(minilm_server.url + "/v1/health").status_code == 200


def test_the_one_generation_loop_stops_bans_penalises_and_validates():
    """`generation.generate`, every P3 engine's loop, on a fake engine whose logits favour id 0
    (the stop id), then 1, then 2: min_tokens bans the stop id, a frequency penalty moves
    greedy off a repeated id, logit_bias outranks the logits, bad settings are refused."""
    from stip.client.generation import Sampling, generate

    fed = []

    def step(ids, offset, every):
        fed.append((list(ids), offset))
        row = torch.tensor([3.0, 2.0, 1.0, 0.0])
        return row.repeat(len(ids), 1) if every else row[None]

    assert generate(step, [3, 3], 5, vocab=4, stop={0}).token_ids == [0]
    g = generate(step, [3, 3], 5, vocab=4, stop={0}, min_tokens=3)
    assert g.token_ids == [1, 1, 1, 0] and g.finish_reason == "stop" and fed[-1] == ([1], 4)
    assert generate(step, [3], 4, Sampling(frequency_penalty=1.5), vocab=4).token_ids == [0, 1, 0, 2]
    assert generate(step, [3], 2, Sampling(logit_bias={3: 10.0}), vocab=4).token_ids == [3, 3]
    g = generate(step, [3, 1], 2, Sampling(logprobs=2, prompt_logprobs=1), vocab=4)
    want = float(torch.log_softmax(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64), -1)[0])
    assert g.logprobs[0].token == 0 and abs(g.logprobs[0].logprob - want) < 1e-12 and [t for t, _ in g.logprobs[0].top] == [0, 1]
    assert g.prompt_logprobs[0] is None and g.prompt_logprobs[1].token == 1 and g.finish_reason == "length"
    for bad in (dict(temperature=-1), dict(top_p=0), dict(frequency_penalty=3), dict(logit_bias={1: 101}), dict(logprobs=21)):
        with pytest.raises(ValueError):
            Sampling(**bad)
    with pytest.raises(ValueError, match="logit_bias"):
        generate(step, [3], 2, Sampling(logit_bias={9: 1.0}), vocab=4)
