"""CKKS inference of the polynomial ViT: encrypted logits against the plaintext polynomial model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from stip.he import ckks, runner
from stip.models import data, polyformer as pf


def test_parameters_are_128_bit_and_chosen_by_depth():
    assert ckks.params_for(2).n == 8192 and ckks.params_for(3).n == 16384
    assert [ckks.poly_depth(d) for d in (1, 2, 3, 4, 8)] == [1, 2, 3, 3, 4]
    with pytest.raises(ValueError, match="128-bit"):
        ckks.Params(8192, (60, 40, 40, 40, 60))
    with pytest.raises(ValueError, match="degree"):
        ckks.params_for(12)


@pytest.mark.slow
def test_encrypted_logits_equal_the_plaintext_polynomial_model():
    torch.manual_seed(0)
    train, test = data.load("digits")
    model = pf.PolyViT(pf.PRESETS["tiny"]).eval()
    pf.to_polynomial(model, train.images[:256], degree=2)
    plan = pf.he_plan(model)
    patches = model.patches(test.images[:12]).numpy()
    report, logits = runner.run(plan, patches)
    with torch.no_grad():
        ref = model(test.images[:12]).numpy()
    assert np.abs(logits - ref).max() < 1e-2
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and report.argmax_agreement == 1.0
    assert report.refresh_rounds >= 1 and report.bytes_up > 0 and report.bytes_down > 0
    assert report.params["security_bits"] == 128 and report.params["log_q"] <= ckks.MAX_LOG_Q_128[report.params["poly_modulus_degree"]]


def test_server_context_has_no_secret_key():
    user = ckks.User(ckks.PARAMS[0], threads=1)
    server = ckks.Server(user.public_context(), ckks.PARAMS[0], 2, user.refresh, ckks.Link())
    enc = server.load(user.encrypt(np.ones((2, 3))))
    with pytest.raises(ValueError):
        enc.t.decrypt()


@pytest.mark.slow
def test_cli_trains_and_runs_encrypted(tmp_path):
    stip = [sys.executable, "-m", "stip.cli"]
    done = subprocess.run(stip + ["train", "polyformer", str(tmp_path / "p"), "--preset", "tiny", "--epochs", "2", "--degree", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert 0 <= summary["polynomial_accuracy"] <= 1 and summary["fit"]["degree"] == 2
    run = subprocess.run(stip + ["he", "run", "--model", str(tmp_path / "p"), "--images", "4", "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {"seconds", "bytes_up", "bytes_down", "refresh_rounds", "max_abs_error"} <= report.keys()
    assert report["max_abs_error"] < 1e-2
    missing = subprocess.run(stip + ["he", "run", "--model", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "stip train polyformer" in missing.stderr


def test_encrypted_next_token_logits_equal_the_plaintext_polynomial_lm():
    """The LM form: the user encrypts its prompts' embeddings, the server applies the causal
    mask and 1/S(i + 1) as one plaintext product and returns the last position's logits."""
    torch.manual_seed(0)
    cfg = pf.PRESETS["lm-tiny"]
    model, ids = pf.PolyLM(cfg).eval(), torch.randint(0, cfg.vocab, (64, cfg.context))
    pf.to_polynomial(model, ids, degree=2)
    report, logits = runner.run(pf.he_plan(model), ids[:8].numpy())
    with torch.no_grad():
        ref = model(ids[:8])[:, -1].numpy()
    assert logits.shape == (8, cfg.vocab) and np.abs(logits - ref).max() < 1e-2
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and report.argmax_agreement == 1.0 and report.inputs == 8
