"""STIP for LLM services: the real SmolLM2-135M-Instruct, sealed in token mode, served by an
unmodified vLLM (a subprocess from .venv-vllm), queried through `stip proxy` by the official
openai client. Two engines: the sealed checkpoint and the unsealed one, session fixtures of
conftest.py (`sealed_engine`, `unsealed_engine`) that other modules share.

vLLM runs with --enforce-eager here: the same engine without its torch.compile warm-up, which
costs ~2.5 min per start on 2 cores (the benchmark uses vLLM's defaults).

The proxy fuzz sends STIP_FUZZ_CASES requests (default 150); `make fuzz` sends 1,000."""

from __future__ import annotations

import os
import socket
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from stip.seal import CLIENT
from stip.serve.process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.engine]

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "List ten ideas for a rainy afternoon with children, and explain each one.",
    "What are the pros and cons of electric cars? Give a detailed answer.",
    "Describe the water cycle to a ten-year-old.",
]
NEW_TOKENS = 64
NEAR_TIE = 1e-3  # a divergence is acceptable only where the reference's top-2 logits are this close
FUZZ_CASES = "STIP_FUZZ_CASES"  # requests the proxy fuzz sends; make fuzz: 1000


@pytest.fixture(scope="module")
def proxy(sealed_engine, smollm2_tokens_dir):
    with ServerProcess(smollm2_tokens_dir / CLIENT, "--upstream", sealed_engine.url, command="proxy", timeout=180) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path, local_files_only=True)


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Plaintext transformers greedy decoding past EOS (as vLLM's ignore_eos), with the top-2
    logit gap at every step."""
    out, gaps, past = [], [], None
    x = torch.tensor([ids])
    for _ in range(n):
        r = model(input_ids=x, past_key_values=past, use_cache=True)
        logits, past = r.logits[0, -1], r.past_key_values
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        nxt = int(logits.argmax())
        out.append(nxt)
        x = torch.tensor([[nxt]])
    return out, gaps


@torch.no_grad()
def _gap_after(model, ids: list[int]) -> float:
    top = model(input_ids=torch.tensor([ids])).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_greedy_sealed_equals_unsealed_and_plaintext(client, model_id, unsealed_engine, smollm2_path, tokenizer):
    """Through proxy → vLLM, the sealed model gives the unsealed model's tokens on the same vLLM,
    and plaintext transformers' tokens, for 64 new tokens on 5 chat prompts. A divergence is
    accepted only at a near-tie of the reference (top-2 logit gap ≤ 1e-3), and each is reported.
    The 5 prompts go to each engine at once (vLLM batches them) while transformers decodes."""
    from transformers import AutoModelForCausalLM

    def sealed(prompt):
        return client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=NEW_TOKENS,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )

    def direct(ids):
        return httpx.post(f"{unsealed_engine.url}/v1/completions", timeout=300, json={
            "model": unsealed_engine.name, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}).json()["choices"][0]["token_ids"]  # fmt: skip

    prompt_ids = [_chat_ids(tokenizer, prompt) for prompt in PROMPTS]
    with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
        answers = [pool.submit(sealed, prompt) for prompt in PROMPTS]
        directs = [pool.submit(direct, ids) for ids in prompt_ids]
        model = AutoModelForCausalLM.from_pretrained(smollm2_path, local_files_only=True).eval()
        plain = [_hf_greedy(model, ids, NEW_TOKENS) for ids in prompt_ids]
        answers, directs = [f.result() for f in answers], [f.result() for f in directs]
    divergences = []
    for prompt, ids, r, direct_ids, (hf, gaps) in zip(PROMPTS, prompt_ids, answers, directs, plain):
        sealed_ids = r.choices[0].token_ids
        assert len(sealed_ids) == NEW_TOKENS and r.usage.completion_tokens == NEW_TOKENS
        for ref_name, ref in (("unsealed vLLM", direct_ids), ("transformers", hf)):
            i = _first_divergence(sealed_ids, ref)
            if i is None:
                continue
            # the reference's own gap at the step where it and the sealed run part ways
            gap = gaps[i] if ref is hf else _gap_after(model, ids + ref[:i])
            divergences.append(f"{prompt[:30]!r} vs {ref_name}: step {i}, reference top-2 gap {gap:.2e}")
            assert gap <= NEAR_TIE, f"sealed output diverges from {ref_name} at step {i} with a top-2 gap of {gap:.2e}"
        assert r.choices[0].message.content == tokenizer.decode(sealed_ids, skip_special_tokens=True)
    for d in divergences:
        warnings.warn(f"near-tie divergence: {d}")


def test_answer_to_the_capital_question(client, model_id):
    r = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0, max_tokens=32,
    )
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop"  # stopped on the sealed end-of-turn id


def test_streaming_equals_non_streaming(client, model_id):
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    whole = client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=40)
    parts, usage = [], None
    for chunk in client.chat.completions.create(
        model=model_id, messages=messages, temperature=0, max_tokens=40, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens

    text = client.completions.create(model=model_id, prompt="The three primary colors are", max_tokens=24, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt="The three primary colors are", max_tokens=24, temperature=0, stream=True) if c.choices)  # fmt: skip
    assert streamed == text.choices[0].text and text.usage.completion_tokens == 24


def test_sampling_options_and_stop(client, model_id):
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Write a poem about autumn."}], max_tokens=24)
    a = client.chat.completions.create(temperature=0.9, top_p=0.9, seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(temperature=0.9, top_p=0.9, seed=7, **kw).choices[0].message.content
    assert a == b  # the engine's seeded sampler, on permuted logits
    r = client.completions.create(model=model_id, prompt="One, two, three, four,", max_tokens=30, temperature=0, stop=[" six", "seven"])
    assert r.choices[0].finish_reason == "stop" and "six" not in r.choices[0].text and r.choices[0].text
    ids = client.completions.create(model=model_id, prompt=[1, 504, 3575], max_tokens=3, temperature=0)  # token-id prompt
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3


def _direct(engine, ids: list[int], **body) -> dict:
    """The unsealed engine asked directly, by ids (logprobs keyed by id)."""
    return httpx.post(f"{engine.url}/v1/completions", timeout=300, json={
        "model": engine.name, "prompt": ids, "return_token_ids": True, "return_tokens_as_token_ids": True, **body}).json()  # fmt: skip


def _by_id(top: dict) -> dict[int, float]:
    return {int(k.rsplit(":", 1)[1]): v for k, v in top.items()}


def test_logprobs_equal_the_unsealed_engines(client, model_id, unsealed_engine, tokenizer):
    """Completions (logprobs 5, echo) and chat (top_logprobs 3) through the sealed path give the
    unsealed engine's logprobs on the same vLLM within 1e-4, prompt included; the top ids,
    restored through π_c, are the unsealed engine's."""
    ids = _chat_ids(tokenizer, "Name a famous painter and one of his works.")
    r = client.completions.create(model=model_id, prompt=ids, max_tokens=8, temperature=0, logprobs=5, echo=True,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    d = _direct(unsealed_engine, ids, max_tokens=8, temperature=0, logprobs=5, echo=True, ignore_eos=True)["choices"][0]
    got, want = r.choices[0].logprobs, d["logprobs"]
    assert r.choices[0].token_ids == d["token_ids"]
    assert len(got.token_logprobs) == len(want["token_logprobs"]) == len(ids) + 8
    assert got.token_logprobs[0] is None and want["token_logprobs"][0] is None
    diff = max(abs(a - b) for a, b in zip(got.token_logprobs[1:], want["token_logprobs"][1:]))
    assert diff <= 1e-4, diff
    top = 0.0
    for g, w in zip(got.top_logprobs[1:], want["top_logprobs"][1:]):
        w = _by_id(w)
        assert set(g) == {tokenizer.decode([t]) for t in w}
        top = max(top, *(abs(g[tokenizer.decode([t])] - v) for t, v in w.items()))
    # float32 rounding: the sealed model sums the same products in another order (its hidden
    # dimensions are permuted). Over ~230 top-5 entries the largest gap has reached 1.02e-4.
    assert top <= 2e-4, top
    warnings.warn(f"token mode: logprobs within {diff:.1e} of the unsealed engine's, top-5 within {top:.1e}")
    assert r.choices[0].text.startswith(tokenizer.decode(ids))

    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Name a famous painter and one of his works."}],
                                          max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    d = _direct(unsealed_engine, ids, max_tokens=8, temperature=0, logprobs=3, ignore_eos=True)["choices"][0]
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in d["token_ids"]]
    assert max(abs(c.logprob - v) for c, v in zip(content, d["logprobs"]["token_logprobs"])) <= 1e-4
    for c, w in zip(content, d["logprobs"]["top_logprobs"]):
        best = sorted(_by_id(w).items(), key=lambda kv: -kv[1])[:3]
        assert [t.token for t in c.top_logprobs] == [tokenizer.decode([t]) for t, _ in best]


def test_n_choices_logit_bias_and_penalties_as_on_the_unsealed_engine(client, model_id, unsealed_engine, tokenizer):
    """n = 3 gives 3 seeded, reproducible choices; a logit_bias that forbids the greedy token
    and a frequency penalty change the answer exactly as they do on the unsealed engine."""
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    kw = dict(model=model_id, messages=messages, max_tokens=12, temperature=1.0, n=3, seed=5)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1

    ids = _chat_ids(tokenizer, "Write one sentence about the sea.")
    first = _direct(unsealed_engine, ids, max_tokens=1, temperature=0)["choices"][0]["token_ids"][0]
    for extra in ({"logit_bias": {str(first): -100}}, {"frequency_penalty": 1.5}, {"presence_penalty": 1.0}):
        sealed = client.completions.create(model=model_id, prompt=ids, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True, "return_token_ids": True, **extra})  # fmt: skip
        direct = _direct(unsealed_engine, ids, max_tokens=16, temperature=0, ignore_eos=True, **extra)["choices"][0]["token_ids"]
        assert sealed.choices[0].token_ids == direct, extra
    biased = client.completions.create(model=model_id, prompt=ids, max_tokens=1, temperature=0, logit_bias={str(first): -100},
                                       extra_body={"return_token_ids": True})  # fmt: skip
    assert biased.choices[0].token_ids[0] != first


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"49152": 1}}, 400, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": [1, 49152]}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
])  # fmt: skip
def test_bad_requests_get_openai_errors(proxy, model_id, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(proxy.url + path, json={"model": model_id, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and (param is None or err["param"] == param)
    assert httpx.post(proxy.url + path, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400


def test_openai_client_sees_the_errors(client, model_id):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=-1)


def test_proxy_refuses_an_engine_serving_another_sealing(unsealed_engine, smollm2_tokens_dir):
    with ServerProcess(smollm2_tokens_dir / CLIENT, "--upstream", unsealed_engine.url, command="proxy") as p:
        r = httpx.post(p.url + "/v1/completions", json={"model": _name(p), "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 502 and "not this client's sealing" in r.json()["error"]["message"]


def _name(p) -> str:
    return httpx.get(p.url + "/v1/models").json()["data"][0]["id"]


def test_upstream_down_is_502_and_silent_upstream_is_504(smollm2_tokens_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with ServerProcess(smollm2_tokens_dir / CLIENT, "--upstream", f"http://127.0.0.1:{dead}", command="proxy") as p:
        r = httpx.post(p.url + "/v1/chat/completions", json={"model": _name(p), "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        r = httpx.post(p.url + "/v1/chat/completions", json={"model": _name(p), "stream": True, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code == 502  # refused before the stream starts, not inside a 200

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    stop = threading.Event()

    def hold():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with ServerProcess(smollm2_tokens_dir / CLIENT, "--upstream", url, "--timeout", "2", "--upstream-model", "x", command="proxy") as p:
            r = httpx.post(p.url + "/v1/completions", json={"model": _name(p), "prompt": "hi"}, timeout=30)
            assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        silent.close()


def test_fuzzed_proxy_never_answers_5xx(sealed_engine, smollm2_tokens_dir):
    """schemathesis generates requests from the proxy's own OpenAPI spec, against the real
    sealed engine; not one may get a 5xx, and a tenth at least must be answered (200) by it.
    STIP_FUZZ_CASES requests (default 150; `make fuzz`: 1,000). New tokens are capped at 1 so
    that the cases that reach the engine stay quick; 7 in 8 cases name the served model (else
    nearly all would stop at the 404)."""
    import schemathesis

    cases = int(os.environ.get(FUZZ_CASES) or 150)
    counts: dict[int, int] = {}
    with ServerProcess(smollm2_tokens_dir / CLIENT, "--upstream", sealed_engine.url, "--max-tokens-limit", "1", command="proxy") as p:
        schema = schemathesis.openapi.from_url(f"{p.url}/openapi.json")
        model = _name(p)

        @settings(max_examples=cases, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
        @given(case=schema.as_strategy())
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body and counts.get("all", 0) % 8:
                case.body["model"] = model  # 7 in 8 get past the model check, into the validators and the engine
            r = case.call(timeout=120)
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            counts["all"] = counts.get("all", 0) + 1
            assert r.status_code < 500, f"{case.method} {case.path} {case.body!r} → {r.status_code} {r.text[:300]}"

        fuzz()
    total = counts.pop("all")
    warnings.warn(f"schemathesis: {total} requests, statuses {dict(sorted(counts.items()))}")
    assert total >= cases
    assert counts.get(200, 0) >= cases // 10  # the fuzz reached the engine, not only the validators (1,000: 368)
