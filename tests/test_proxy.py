"""`stip proxy` in front of `stip serve` (an embedding-mode sealing): the generation loop runs in
the proxy (P3), one STIP session per choice, so logprobs, ``n``, penalties and ``logit_bias``
are P3's own. Checked through the official openai client against plaintext transformers, on a
small Llama with a word-level tokenizer made here; /v1/embeddings on MiniLM against `stip
query`'s vectors. Real processes: `stip serve` and `stip proxy`. (Token mode on vLLM:
test_llm.py; shares mode: test_shares.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import httpx
import openai
import pytest
import torch
import transformers as T

from stip.client.generation import Piece
from stip.seal import seal_folder
from stip.serve.process import ServerProcess

WORDS = ["<eos>", "<unk>"] + "the a cat dog sat ran on under mat roof and then it was red blue big small one two three".split()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A small Llama (vocabulary: WORDS) with its tokenizer, sealed in embedding mode."""
    torch.manual_seed(3)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                        vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=None, eos_token_id=0, pad_token_id=None,
                        initializer_range=0.3)  # fmt: skip
    model = T.LlamaForCausalLM(cfg).eval()
    src, out = tmp_path_factory.mktemp("lm-src"), tmp_path_factory.mktemp("lm-sealed")
    model.save_pretrained(src)
    _tokenizer().save_pretrained(src)
    seal_folder(src, out)
    return model, out


@pytest.fixture(scope="module")
def lm_proxy(lm):
    _, out = lm
    with ServerProcess(out / "server") as srv, \
            ServerProcess(out / "client", "--upstream", srv.url, command="proxy", timeout=120) as proxy:  # fmt: skip
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, client.models.list().data[0].id, proxy


@torch.no_grad()
def _plain(model, prompt: list[int], n: int, bias: dict[int, float] = {}, frequency: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy in plaintext (the whole sequence each step), with a logit bias and a frequency
    penalty as OpenAI defines them; the raw log-softmax of every step."""
    ids, out, lps = list(prompt), [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        lps.append(torch.log_softmax(logits, -1))
        adjusted = logits.clone()
        for t, b in bias.items():
            adjusted[t] += b
        for t in set(out):
            adjusted[t] -= frequency * out.count(t)
        out.append(int(adjusted.argmax()))
        ids.append(out[-1])
    return out, lps


PROMPT = "the cat sat on the mat and then"


def test_logprobs_and_echo_equal_plaintext(lm, lm_proxy):
    model, _ = lm
    client, name, _ = lm_proxy
    ids = _tokenizer()(PROMPT)["input_ids"]
    want, lps = _plain(model, ids, 6)
    r = client.completions.create(model=name, prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    c = r.choices[0]
    assert c.token_ids == want
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = torch.tensor(lp.token_logprobs[len(ids):], dtype=torch.float64)
    assert float((got - torch.stack([l[t] for l, t in zip(lps, want)])).abs().max()) <= 1e-4
    for top, l in zip(lp.top_logprobs[len(ids):], lps):  # the 3 likeliest (and the chosen one)
        best = l.topk(3)
        assert {WORDS[i] for i in best.indices.tolist()} <= set(top)
    with torch.no_grad():  # the prompt's own logprobs: the model's prediction of each next prompt id
        whole = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    prompt_lp = torch.tensor(lp.token_logprobs[1 : len(ids)], dtype=torch.float64)
    assert float((prompt_lp - whole[torch.arange(len(ids) - 1), ids[1:]]).abs().max()) <= 1e-4
    assert c.text.startswith(PROMPT)

    chat = httpx.post(f"{lm_proxy[2].url}/v1/completions", json={"model": name, "prompt": ids, "max_tokens": 2, "temperature": 0,
                                                                  "logprobs": 0, "ignore_eos": True}, timeout=60).json()  # fmt: skip
    assert chat["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx([float(lps[0][want[0]]), float(lps[1][want[1]])], abs=1e-4)


def test_n_choices_are_seeded_and_reproducible(lm_proxy):
    client, name, _ = lm_proxy
    kw = dict(model=name, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11, extra_body={"ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # three draws, not one answer thrice
    assert a.usage.completion_tokens == 24
    streamed = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_logit_bias_and_frequency_penalty_change_the_answer_as_in_plaintext(lm, lm_proxy):
    model, _ = lm
    client, name, _ = lm_proxy
    ids = _tokenizer()(PROMPT)["input_ids"]
    greedy, _ = _plain(model, ids, 8)
    banned = {greedy[0]: -100.0}
    want, _ = _plain(model, ids, 8, bias=banned)
    assert want != greedy
    r = client.completions.create(model=name, prompt=ids, max_tokens=8, temperature=0, logit_bias={str(greedy[0]): -100},
                                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert r.choices[0].token_ids == want
    want, _ = _plain(model, ids, 12, frequency=1.5)
    r = client.completions.create(model=name, prompt=ids, max_tokens=12, temperature=0, frequency_penalty=1.5,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})  # fmt: skip
    assert r.choices[0].token_ids == want
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=name, prompt=ids, max_tokens=2, logit_bias={str(len(WORDS)): 1})
    with pytest.raises(openai.BadRequestError):  # an LM has no embeddings
        client.embeddings.create(model=name, input="the cat")


class _Ending:
    """An engine whose every call ends a moment after its last piece, as vLLM's stream ends
    with [DONE]; it counts the calls that ended by themselves and those cut off."""

    def __init__(self, finish_after: int):
        self.finish_after, self.ended, self.cut = finish_after, 0, 0

    async def check(self, local):
        pass

    async def close(self):
        pass

    async def generate(self, ask):
        try:
            for k in range(self.finish_after):
                yield Piece(0, [WORDS.index("cat")], [], "length" if k == self.finish_after - 1 else None)
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
        except BaseException:
            self.cut += 1
            raise
        self.ended += 1


@pytest.mark.parametrize("stop", [None, "cat"])
def test_a_call_the_engine_ends_is_never_cut_and_a_stop_string_cuts_it(lm, stop):
    """When the engine ends every choice, the proxy reads each call to its end: cancelling an
    httpx stream in mid-read left its connection checked out of the pool, and after 256 such
    answers the proxy hung (seen with lm_eval: echo, max_tokens=1, 8 prompts a request). A stop
    string the proxy finds itself must still stop the engine's calls at once."""
    from fastapi.testclient import TestClient

    from stip.client.proxy import create_app

    engine = _Ending(finish_after=1 if stop is None else 50)
    with TestClient(create_app(lm[1] / "client", engine)) as c:
        r = c.post("/v1/completions", json={"model": c.get("/v1/models").json()["data"][0]["id"], "prompt": [[2, 4], [3, 4], [2, 5]],
                                            "max_tokens": 50, "stop": stop})  # fmt: skip
        assert r.status_code == 200, r.text
        assert [ch["finish_reason"] for ch in r.json()["choices"]] == ["length" if stop is None else "stop"] * 3
    assert (engine.ended, engine.cut) == ((3, 0) if stop is None else (0, 3))


def test_embeddings_equal_stip_query(minilm_sealed_dir):
    texts = ["The cat sat on the mat.", "Stock markets fell sharply on Monday.", "A kitten rests on a rug."]
    with ServerProcess(minilm_sealed_dir / "server") as srv, \
            ServerProcess(minilm_sealed_dir / "client", "--upstream", srv.url, command="proxy", timeout=120) as proxy:  # fmt: skip
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        got = client.embeddings.create(model=name, input=texts)
        one = client.embeddings.create(model=name, input=texts[1])
        b64 = client.embeddings.create(model=name, input=texts[:1], encoding_format="base64")
        r = subprocess.run([sys.executable, "-m", "stip.cli", "query", str(minilm_sealed_dir / "client"), "--server", srv.url, "--json", *texts],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        with pytest.raises(openai.BadRequestError):  # an encoder does not generate
            client.completions.create(model=name, prompt="hi", max_tokens=2)
    assert r.returncode == 0, r.stderr
    want = torch.tensor(json.loads(r.stdout)["embedding"])
    vectors = torch.tensor([d.embedding for d in got.data])
    assert [d.index for d in got.data] == [0, 1, 2] and got.usage.prompt_tokens > 0
    cos = torch.nn.functional.cosine_similarity(vectors, want, dim=-1)
    assert float(cos.min()) >= 0.9999, cos
    assert float(torch.nn.functional.cosine_similarity(torch.tensor(one.data[0].embedding), want[1], dim=0)) >= 0.9999
    raw = torch.frombuffer(bytearray(base64.b64decode(b64.data[0].embedding)), dtype=torch.float32)  # given explicitly, it stays base64
    assert float(torch.nn.functional.cosine_similarity(raw, want[0], dim=0)) >= 0.9999
