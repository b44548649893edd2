"""The polynomial transformer: training with its regularisers, the polynomial swap, the folded
plan that the HE server evaluates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stip.models import data, polyformer as pf
from stip.models.train import Schedule, accuracy, fit
from stip.mpc.polyformer import to_mpc


def test_fits_approximate_gelu_and_minimax_lowers_the_peak_error():
    x = np.linspace(-4, 4, 2001)
    gelu = lambda v: torch.nn.functional.gelu(torch.as_tensor(v)).numpy()  # noqa: E731
    err = {m: np.abs(np.polynomial.polynomial.polyval(x, pf.fit_polynomial(gelu, -4, 4, 4, m)) - gelu(x)).max() for m in pf.FITS}
    assert err["minimax"] < err["lsq"] < 0.2
    with pytest.raises(ValueError):
        pf.fit_polynomial(gelu, 1, 1, 4)


@pytest.mark.slow
def test_digits_polynomial_model_keeps_its_accuracy(tmp_path):
    """Within 3 points of its non-polynomial twin (the same weights with GELU), and the
    folded plan equals the torch polynomial model."""
    torch.manual_seed(0)
    train, test = data.load("digits")
    model = pf.PolyViT(pf.PRESETS["digits"])
    fit(model, "poly", train, Schedule(40, 2e-3, 64), pf.training_loss(), tmp_path)
    twin = accuracy(model, test)
    assert twin >= 0.93
    with pytest.raises(ValueError, match="polynomials first"):
        pf.he_plan(model)
    # degree 6 (3 levels under CKKS, as 4): at 16 tokens degree 4 cost 5.9 points (docs/he.md)
    info = pf.to_polynomial(model, train.images, degree=6)
    assert model.is_polynomial() and len(info["sites"]) == 2 * pf.PRESETS["digits"].layers
    assert accuracy(model, test) >= twin - 0.03
    plan = pf.he_plan(model)
    images = test.images[:64]
    with torch.no_grad():
        ref = model(images).numpy()
    got = pf.plan_forward(plan, model.patches(images).numpy().astype(np.float64))
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
def test_the_same_model_runs_under_two_party_mpc_as_separate_processes():
    """`stip.mpc.polyformer.to_mpc`: the JAX forward equals torch, the config survives the parties' JSON
    job file (per-layer polynomials included), and SEMI2K between two OS processes agrees."""
    import json

    from stip.mpc.model import forward
    from stip.mpc.parties import config_from_json, config_to_json, run_parties

    torch.manual_seed(0)
    train, test = data.load("digits")
    model = pf.PolyViT(pf.PRESETS["tiny"]).eval()
    pf.to_polynomial(model, train.images[:256], degree=2)
    cfg, params = to_mpc(model)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    x = pf.embed_plan(pf.he_plan(model), model.patches(test.images[:2]).numpy())
    with torch.no_grad():
        ref = model(test.images[:2]).numpy()
    assert np.abs(np.asarray(forward(cfg, params, x)) - ref).max() < 1e-4
    report, out = run_parties(cfg, params, x, "semi2k")
    assert report.mode == "procs" and np.abs(out - ref).max() < 1e-2 and (out.argmax(-1) == ref.argmax(-1)).all()


# --- the language model ------------------------------------------------------------------------


def _tiny_lm(seed: int = 0):
    """lm-tiny after a few steps on random ids (so its BatchNorm statistics are not the
    defaults), with degree-2 polynomials swapped in; and the ids."""
    torch.manual_seed(seed)
    cfg = pf.PRESETS["lm-tiny"]
    model, ids = pf.PolyLM(cfg).train(), torch.randint(0, cfg.vocab, (128, cfg.context + 1))
    opt, loss = torch.optim.Adam(model.parameters(), 1e-2), pf.training_loss()
    for _ in range(20):
        opt.zero_grad()
        loss(model, ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
    pf.to_polynomial(model, ids[:, :-1], degree=2)
    return model.eval(), ids[:, :-1]


def test_lm_is_causal_and_the_plan_mpc_and_sealed_forms_equal_it():
    from stip.mpc.model import forward
    from stip.seal import polyformer as sealing

    model, ids = _tiny_lm()
    twin = pf.PolyLM(dataclasses.replace(model.cfg, attention="softmax", norm="layer")).eval()
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % model.cfg.vocab
    with torch.no_grad():
        for m in (model, twin):  # changing the last token changes no earlier position's logits
            a, b = m(ids), m(later)
            assert torch.allclose(a[:, :-1], b[:, :-1]) and not torch.allclose(a[:, -1], b[:, -1])
        ref = model(ids[:8])[:, -1].numpy()
    plan = pf.he_plan(model)
    assert np.abs(pf.plan_forward(plan, ids[:8].numpy()) - ref).max() < 1e-4
    cfg, params = to_mpc(model)
    assert cfg.causal and cfg.head == "last_token"
    assert np.abs(np.asarray(forward(cfg, params, pf.embed_plan(plan, ids[:8].numpy()))) - ref).max() < 1e-4
    sealed = sealing.seal(model)
    with torch.no_grad():
        got = sealed.client.decode(sealed.server.body(sealed.client.embed(ids[:8]))[:, -1]).numpy()
    assert np.abs(got - ref).max() < 1e-4 and not sealed.server.tokens.weight.any() and not sealed.server.pos.any()
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, model.cfg.context + 1, dtype=torch.long))


def test_the_corpus_is_split_by_document_and_reads_local_folders(tmp_path):
    from stip.models import text

    built_in = text.corpus()
    assert {len(set(built_in[a]) & set(built_in[b])) for a, b in (("train", "valid"), ("train", "test"), ("valid", "test"))} == {0}
    assert len(built_in["valid"]) > 300 and sum(map(len, built_in["train"])) > 1_000_000  # CPython's prose and docstrings
    wiki = tmp_path / "wikitext-103"
    wiki.mkdir()
    for split in text.SPLITS:
        (wiki / f"wiki.{split}.tokens").write_text(f" = Title = \n\n {split} line one .\n {split} line two .\n")
    assert text.corpus(wiki)["valid"] == ["= Title =", "valid line one .", "valid line two ."]
    (tmp_path / "txt").mkdir()
    for i in range(20):
        (tmp_path / "txt" / f"{i}.txt").write_text(f"document {i}")
    loose = text.corpus(tmp_path / "txt")
    assert sorted(sum(loose.values(), [])) == sorted(f"document {i}" for i in range(20)) and all(loose.values())
    with pytest.raises(text.CorpusMissing):
        text.corpus(tmp_path / "nothing")
    tok = text.train_bpe(built_in["valid"], 300)
    w = text.windows(tok, built_in["valid"][:20], 8)
    assert w.shape[1] == 9 and tok.get_vocab_size() == 300 and tok.decode(w[0].tolist())


def test_the_standard_librarys_docstrings_are_parsed_once_per_install(tmp_path, monkeypatch):
    from stip.models import chat, text

    parsed = []
    monkeypatch.setenv(chat.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(text, "_parse_docstrings", lambda files: parsed.append(len(files)) or ["Doc one.", "Doc two."])
    monkeypatch.setattr(text, "_docstrings", text._docstrings.__wrapped__)  # no in-process memo: only the folder's
    assert text._docstrings() == ("Doc one.", "Doc two.") and len(parsed) == 1 and parsed[0] > 100
    assert text._docstrings() == ("Doc one.", "Doc two.") and len(parsed) == 1  # read back, not parsed
    [kept] = (tmp_path / "text").iterdir()
    kept.write_text("{not json")
    assert text._docstrings() == ("Doc one.", "Doc two.") and len(parsed) == 2  # a damaged file: parsed again
    assert [p.name for p in (tmp_path / "text").iterdir()] == [kept.name]


@pytest.mark.slow
def test_lm_cli_trains_reports_perplexity_and_runs_under_ckks_and_the_bench(tmp_path):
    import json
    import subprocess
    import sys

    from stip.models import text

    corpus = tmp_path / "wikitext"  # WikiText's layout, real sentences: small enough for a test
    corpus.mkdir()
    lines = text.sentences(seed=0)
    for split, part in zip(text.SPLITS, (lines[:1500], lines[1500:1700], lines[1700:1900])):
        (corpus / f"wiki.{split}.tokens").write_text("\n".join(part))
    stip = [sys.executable, "-m", "stip.cli"]
    done = subprocess.run(stip + ["train", "polyformer", str(tmp_path / "lm"), "--task", "lm", "--preset", "lm-tiny", "--epochs", "2",
                                  "--vocab", "300", "--degree", "2", "--data-dir", str(corpus), "--json"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    for key in ("twin_perplexity", "gelu_perplexity", "polynomial_perplexity"):
        assert 1 < s[key]["valid"] < 300 and 1 < s[key]["test"] < 300, (key, s[key])  # better than uniform over 300 tokens
    assert {p.name for p in (tmp_path / "lm").iterdir()} >= {"model.safetensors", "twin.safetensors", "tokenizer.json", "summary.json"}
    run = subprocess.run(stip + ["he", "run", "--model", str(tmp_path / "lm"), "--prompts", "6", "--tokens", "5", "--json"],  # padded to 8
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout)
    assert r["inputs"] == 6 and r["max_abs_error"] < 1e-2 and r["argmax_agreement"] == 1.0
    assert r["perplexity"]["ckks"] == pytest.approx(r["perplexity"]["plaintext"], rel=1e-3)
    too_long = subprocess.run(stip + ["he", "run", "--model", str(tmp_path / "lm"), "--tokens", "99"], capture_output=True, text=True, timeout=120)
    assert too_long.returncode == 1 and "context" in too_long.stderr
    bench = subprocess.run(stip + ["bench", "--model", str(tmp_path / "lm"), "--modes", "plain,stip,he", "--tokens", "4", "--batch", "4",
                                   "--repeats", "1", "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bench.returncode == 0, bench.stderr
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert b["subject"]["kind"] == "polylm" and [x["mode"] for x in b["rows"]] == ["plain", "stip", "he"]
    assert all(x["top1_agreement"] == 1.0 and x["max_abs_error"] < 1e-2 for x in b["rows"])
