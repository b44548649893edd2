"""Attacks from P2's side on the real MiniLM: the documented limitations are real, the
mitigations do what docs/threat-model.md says, and its figures are what the commands measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stip.attacks import attention, figures, plaintext, scenario
from stip.models.hf import hidden
from stip.seal import load_source, rekey, seal_folder
from stip.serve import engine

STIP = [sys.executable, "-m", "stip.cli"]
DOC = Path(__file__).parents[1] / "docs" / "threat-model.md"


@pytest.fixture(scope="module")
def private_embeddings(tmp_path_factory, minilm_path):
    tmp = tmp_path_factory.mktemp("private-emb")
    seal_folder(scenario.private_variant(minilm_path, tmp / "model", "reinit-embeddings"), tmp / "sealed")
    return tmp / "sealed"


@pytest.mark.slow
def test_vocab_matching_recovers_tokens_of_a_public_model(minilm_sealed_dir, minilm_path):
    r = scenario.vocab(minilm_sealed_dir, minilm_path)
    assert r.recovery_rate >= 0.9 and r.n == 56  # measured: 1.0
    assert r.details["recovered"][1] == "my password is hunter2 and my bank is in zurich."


@pytest.mark.slow
def test_vocab_matching_fails_on_private_embeddings(private_embeddings, minilm_path):
    assert scenario.vocab(private_embeddings, minilm_path).recovery_rate <= 0.1


@pytest.mark.slow
def test_weight_matching_recovers_the_key_of_a_public_model_and_decrypts_traffic(minilm_sealed_dir, minilm_path):
    r = scenario.weights(minilm_sealed_dir, minilm_path)
    assert r.recovery_rate == 1.0 and r.n == 384
    assert r.details["tensors_unsealed"] == r.details["tensors"]  # every per-layer permutation too
    assert r.details["traffic_rows_decrypted"] == 1.0 and r.details["tokens_decrypted"] == 1.0


@pytest.mark.slow
def test_weight_matching_fails_on_private_weights(tmp_path, minilm_path):
    seal_folder(scenario.private_variant(minilm_path, tmp_path / "model", "reinit-all"), tmp_path / "sealed")
    r = scenario.weights(tmp_path / "sealed", minilm_path)
    assert r.recovery_rate <= 0.05 and r.details["traffic_rows_decrypted"] == 0.0


def test_known_plaintext_recovers_pi_exactly(minilm_sealed_dir):
    t = scenario.capture(minilm_sealed_dir, scenario.TEXTS[:1])
    pi = plaintext.known_plaintext(t.plain[0].numpy(), t.sent[0].numpy())
    assert np.array_equal(pi, scenario._true_key(minilm_sealed_dir).pi)


@pytest.mark.slow
def test_p2_sees_plaintext_hidden_states_and_attention_maps_up_to_order(minilm_sealed_dir, minilm_path):
    t = scenario.capture(minilm_sealed_dir)
    server, public = engine.load(minilm_sealed_dir / "server"), load_source(minilm_path)
    pi = torch.tensor(scenario._true_key(minilm_sealed_dir).pi)
    keep = t.mask.bool()
    seen = hidden(server, 2, inputs_embeds=t.sent, attention_mask=t.mask)
    truth = hidden(public, 2, input_ids=t.ids, attention_mask=t.mask)[..., pi]
    assert (seen - truth)[keep].abs().max() < 1e-4
    sealed_maps, plain_maps = attention.maps(server, t.mask, inputs_embeds=t.sent), attention.maps(public, t.mask, input_ids=t.ids)
    for a, p in zip(sealed_maps, plain_maps):  # the same maps, heads reordered
        assert (a.sort(1).values - p.sort(1).values).abs().max() < 1e-4


@pytest.mark.slow
def test_rekey_is_lossless_and_retires_the_old_key(minilm_sealed_dir, minilm_path, tmp_path):
    new = rekey(minilm_sealed_dir, tmp_path / "rekeyed")
    assert new.key.fingerprint != scenario._true_key(minilm_sealed_dir).fingerprint
    t = scenario.capture(tmp_path / "rekeyed")
    server = engine.load(tmp_path / "rekeyed" / "server")
    got = new.client.unpermute_outputs(engine.forward(server, t.sent, attention_mask=t.mask))["last_hidden_state"]
    with torch.no_grad():
        ref = load_source(minilm_path)(input_ids=t.ids, attention_mask=t.mask).last_hidden_state
    assert (got - ref)[t.mask.bool()].abs().max() < 1e-4
    stale = scenario.cross_key(minilm_sealed_dir, tmp_path / "rekeyed")
    assert stale.recovery_rate < 0.05 and stale.details["traffic_rows_decrypted"] == 0.0


@pytest.mark.slow
def test_seal_warns_when_the_model_is_a_public_checkpoint(minilm_path, tmp_path):
    done = subprocess.run(STIP + ["seal", str(minilm_path), str(tmp_path / "a"), "--public-base", str(minilm_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("WARNING") == 2 and "vocabulary matching" in done.stderr and "weight matching" in done.stderr
    other = tmp_path / "other"
    scenario.private_variant(minilm_path, other, "reinit-all")
    done = subprocess.run(STIP + ["seal", str(other), str(tmp_path / "b"), "--public-base", str(minilm_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "WARNING" not in done.stderr and "embedding table not public" in done.stderr


def test_attack_cli_prints_recovery_rate_and_n(minilm_sealed_dir):
    done = subprocess.run(STIP + ["attack", "known-plaintext", "--sealed", str(minilm_sealed_dir), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["recovery_rate"] == 1.0 and r["n"] == 384 and r["traffic_rows_decrypted"] == 1.0
    bad = subprocess.run(STIP + ["attack", "vocab", "--sealed", "/nonexistent", "--public", "/nonexistent"], capture_output=True, text=True)
    assert bad.returncode == 1 and "is not a folder" in bad.stderr
    none = subprocess.run(STIP + ["attack", "attention", "--sealed", str(minilm_sealed_dir), "--text", "one two three"],
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 1 and "no token repeats" in none.stderr


# The figures this test re-measures (the rest, the SmolLM2 causal attack at depth, drift,
# fine-tuning and frequency analysis, take ~90 min: benchmarks/attacks.py runs the same check on
# all). STIP_FIGURES picks which: unset, SAMPLE (~35 s on 2 cores: every MiniLM attack, where it
# works and where it fails); "all", every one of QUICK (`make figures`, ~2.5 min); or
# comma-separated id prefixes, those of any figure (e.g. "llm.vocab.layers8").
QUICK = {"llm.vocab.layers0", "llm.vocab.layers1", "vocab.public", "weights.public", "weights.public.tokens", "known_plaintext.public", "known_plaintext.public.traffic",
         "attention.public.auc", "attention.public.precision", "vocab.private_embeddings", "weights.private_embeddings",
         "weights.private_all", "per_user.other_user_traffic", "rekey.old_key_traffic", "rekey.vocab", "rekey.weights"}
SAMPLE = {"vocab.public", "weights.public", "weights.public.tokens", "known_plaintext.public", "known_plaintext.public.traffic",
          "attention.public.auc", "attention.public.precision", "weights.private_all", "per_user.other_user_traffic",
          "rekey.old_key_traffic", "rekey.weights"}
FIGURES = "STIP_FIGURES"


def _selected_figures() -> set[str]:
    chosen = os.environ.get(FIGURES, "").strip()
    if not chosen:
        return SAMPLE
    if chosen == "all":
        return QUICK
    prefixes = tuple(p.strip() for p in chosen.split(",") if p.strip())
    picked = {f for f in figures.IDS if f.startswith(prefixes)}
    assert picked, f"{FIGURES}={chosen!r} matches no figure id"
    return picked


@pytest.mark.slow
def test_threat_model_figures_are_what_the_commands_measure(tmp_path):
    """Every figure id is in the document; those STIP_FIGURES selects (default SAMPLE, "all":
    QUICK) are re-measured here and agree with it within 5 points."""
    text = DOC.read_text()
    doc = figures.documented(text)
    assert set(doc) == set(figures.IDS)
    assert SAMPLE <= QUICK <= set(figures.IDS)
    chosen = _selected_figures()
    measured = figures.measure(tmp_path, only=chosen)
    assert set(measured) == chosen
    assert figures.disagreements(text, measured) == []


def test_documented_figures_are_parsed_and_compared():
    text = "| `a.b` | what | 97.5 % | `cmd` |\n| `c` | x | 0.0 % | y |\n| not a figure | 1 % |"
    assert figures.documented(text) == {"a.b": 0.975, "c": 0.0}
    assert figures.disagreements(text, {"a.b": {"value": 0.90}, "c": {"value": 0.01}}) == ["a.b: documented 97.5 %, measured 90.0 %"]


# --- token mode against embedding mode (docs/threat-model.md, "Token mode") -------------------------


@pytest.mark.slow
def test_embedding_mode_already_gives_p2_the_token_mode_ids_of_a_tied_model():
    """SmolLM2 ties its head to its word table: in embedding mode every row P2 receives is a row
    of P2's own sealed head, so P2 reads off exactly the ids token mode would send it."""
    from transformers import AutoTokenizer

    from stip.attacks import tokens
    from stip.models import chat
    from stip.seal import seal

    src = chat.path()
    sealed = seal(load_source(src), inplace=True)  # embedding mode
    ids = AutoTokenizer.from_pretrained(src)(scenario.TEXTS[1], return_tensors="pt")["input_ids"]
    rows = sealed.client.permuted_embeddings(ids)[0].numpy()
    got = tokens.renamed_ids(rows, sealed.server.lm_head.weight.detach().numpy())
    want = np.argsort(sealed.key.pi_c)[ids[0].numpy()]  # token mode's renaming: π_c⁻¹[t]
    assert (got == want).mean() == 1.0  # measured: 100 % of the prompt's tokens


def test_token_mode_hands_p2_a_public_position_table_and_with_it_pi():
    """GPT-2 in token mode: P2 holds wpe[:, π]; with the public wpe that is a known-plaintext pair."""
    import transformers as T

    from stip.attacks import tokens
    from stip.seal import seal

    torch.manual_seed(0)
    public = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)).eval()
    sealed = seal(public, mode="tokens")
    pi = tokens.pi_from_table(public.transformer.wpe.weight.detach().numpy(), sealed.server.transformer.wpe.weight.detach().numpy())
    assert (pi == sealed.key.pi).mean() == 1.0  # measured: 100 % of π
    assert (seal(public).server.transformer.wpe.weight == 0).all()  # embedding mode: P2's copy is zeros


# --- a real chat model (docs/threat-model.md, "Measured attacks on a chat model") ------------------

LLAMA = dict(seed=3, heads=4, head_dim=8, kv_heads=2, layers=2, ffn=48, vocab=97, batch=1, seq=4, lengths=[4])


def test_hidden_states_after_k_layers_are_the_models_own():
    """One walk for every family: the residual stream entering layer k, as HF reports it."""
    from harness import bert_case, llama_case

    bert = bert_case(dict(seed=1, heads=2, head_dim=8, layers=3, ffn=32, vocab=50, batch=2, seq=5, lengths=[5, 3]), "BertModel")
    for case, depth in ((llama_case(LLAMA), 2), (bert, 3)):
        ref = case.model.base_model(**case.inputs, output_hidden_states=True).hidden_states
        for k in range(depth):  # the last entry is after the final norm (LLaMA), so stop before it
            assert torch.allclose(hidden(case.model, k, **case.inputs), ref[k], atol=1e-6)
    with pytest.raises(ValueError, match="k must be in 0..2"):
        hidden(llama_case(LLAMA).model, 3, **llama_case(LLAMA).inputs)


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_p2s_log_of_greedy_answers_is_the_plaintext_answer_renamed(mode):
    """What the frequency attack reads: in both modes, P2 sees π_c⁻¹ of the plaintext greedy ids."""
    from harness import llama_case

    from stip.models.hf import greedy
    from stip.seal import seal

    case = llama_case({**LLAMA, "vocab": 61}, tie=True)
    prompts = [[5, 9, 2], [7, 7, 7, 7, 1], [3]]
    plain = greedy(case.model, prompts, 6, stop={4}, batch=2)
    alone = [case.model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist() for p in prompts]
    assert [a[: len(b)] for a, b in zip(alone, plain)] == plain  # batching and padding change nothing
    sealed = seal(case.model, mode=mode)
    seen, real = scenario._log_requests(sealed.server, sealed.client, prompts, 6, stop=4)
    assert real == plain
    assert seen == [sealed.client.rename_ids(r) for r in plain]


@pytest.mark.parametrize("mode", ["embeddings", "tokens"])
def test_p2_generates_renamed_text_from_its_own_checkpoint_alone(mode):
    """Self-generation needs neither the key nor P3: from the sealed checkpoint (embedding mode:
    its tied head's rows as the input rows), greedy from a start id is the public model's
    greedy renamed; sampling gives sequences of renamed ids of the asked length."""
    from harness import llama_case

    from stip.models.hf import greedy
    from stip.seal import seal

    case = llama_case({**LLAMA, "vocab": 61}, tie=True)
    # HF zeroes the pad row: from it every logit is 0, greedy is a tie broken by id order, and
    # the renaming changes that order (1 run in 10 failed, 20 of 200 trials here)
    with torch.no_grad():
        case.model.get_input_embeddings().weight[0].normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    sealed = seal(case.model, mode=mode)
    for row in scenario.self_generated(sealed.server, mode, 6, length=5, temperature=0.0):
        real = sealed.client.restore_ids(row)
        assert greedy(case.model, [real[:1]], 5)[0] == real[1:]
    sampled = scenario.self_generated(sealed.server, mode, 8, length=7, seed=3)
    assert [len(s) for s in sampled] == [8] * 8 and sampled == scenario.self_generated(sealed.server, mode, 8, length=7, seed=3)
    assert len({tuple(s) for s in sampled}) == 8


@pytest.mark.slow
def test_p2_decodes_the_renamed_stream_from_text_it_sampled_itself(smollm2_tokens_dir, smollm2_path):
    """The small version of `llm.frequency.tokens.self*` (benchmarks/attacks.py runs 100 and
    1,000 sequences): P2 samples 100 sequences of 64 renamed ids from its own sealed
    SmolLM2, solves against public text, and reads the logged requests it never solved on far
    above chance (one over the reference's distinct tokens: well under 0.1 %). On two sealings: 5.4 %
    and more; at this size the rate moves with the sampled text, so the bar is low."""
    r = scenario.frequency(smollm2_tokens_dir, smollm2_path, requests=(20,), reference_requests=0, self_generate=(100,), length=64)
    assert r.details["by_requests"] == {} and r.recovery_rate == r.details["self100"]
    assert r.recovery_rate >= 0.02, r.details


def test_frequency_analysis_reads_a_renamed_token_stream():
    """Real text (CPython's docs, SmolLM2's tokenizer), renamed by a secret permutation: unigram
    and bigram matching against other sentences recovers a large share of it; the same text with
    a reference of shuffled tokens (no bigram structure) recovers far less."""
    from transformers import AutoTokenizer

    from stip.attacks import frequency
    from stip.models import chat, text

    tok = AutoTokenizer.from_pretrained(chat.path())
    pool = [tok(s)["input_ids"] for s in text.sentences(seed=0)[:1100]]
    observed_plain, reference = pool[:300], pool[300:]
    perm = np.random.default_rng(5).permutation(len(tok))  # the renaming (a sealing's π_c)
    observed = [[int(perm[t]) for t in s] for s in observed_plain]
    mapping = frequency.solve(observed, reference)
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    rate = frequency.recovered(mapping, observed, observed_plain)
    rng = np.random.default_rng(0)
    flat = rng.permutation([t for s in reference for t in s]).tolist()
    shuffled = [flat[i : i + 20] for i in range(0, len(flat), 20)]
    unigram_only = frequency.recovered(frequency.solve(observed, shuffled), observed, observed_plain)
    assert rate >= 0.35 and rate > unigram_only + 0.15, (rate, unigram_only)  # measured: 41 % and 17 %


def test_the_user_span_of_a_chat_prompt_is_the_message():
    from transformers import AutoTokenizer

    from stip.models import chat

    tok = AutoTokenizer.from_pretrained(chat.path())
    message = "My daughter Emma has a peanut allergy."
    ids, user = scenario.prompt_ids(tok, message)
    assert tok.decode([t for t, u in zip(ids, user) if u]) == message
    assert 0 < sum(user) < len(ids) and "<|im_start|>" in tok.decode([t for t, u in zip(ids, user) if not u])


def test_weight_matching_recovers_every_layer_of_a_llama():
    from harness import llama_case

    from stip.attacks import weights
    from stip.seal import seal

    public = llama_case(LLAMA).model
    sealed = seal(public)
    m = weights.match(sealed.server.state_dict(), public.state_dict(), public.config.hidden_size)
    assert (m.pi == sealed.key.pi).all()
    assert all(m.unsealed.values()) and set(scenario._per_layer(m.unsealed)) == {0, 1}


def test_attack_frequency_cli_refuses_bad_input(minilm_sealed_dir, minilm_path):
    bad = subprocess.run(STIP + ["attack", "frequency", "--sealed", str(minilm_sealed_dir), "--public", str(minilm_path), "--requests", "ten"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "comma-separated integers" in bad.stderr
    encoder = subprocess.run(STIP + ["attack", "frequency", "--sealed", str(minilm_sealed_dir), "--public", str(minilm_path), "--requests", "2"],
                             capture_output=True, text=True, timeout=300)
    assert encoder.returncode == 1 and "needs a causal language model" in encoder.stderr
