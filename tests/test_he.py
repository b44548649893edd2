"""CKKS inference of the polynomial ViT and LM, packed with rotations: the slot maps against the
products they pack, the encrypted logits against the plaintext polynomial model."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from stip.he import ckks, packing, runner
from stip.models import data, polyformer as pf


def test_parameters_are_128_bit_and_chosen_by_depth():
    assert ckks.params_for(2).n == 8192 and ckks.params_for(3).n == 16384
    assert [ckks.poly_depth(d) for d in (1, 2, 3, 4, 6, 7, 8)] == [1, 2, 2, 3, 3, 3, 4]
    with pytest.raises(ValueError, match="128-bit"):
        ckks.Params(8192, (60, 40, 40, 40, 60))
    with pytest.raises(ValueError, match="degree"):
        ckks.params_for(12)


def test_slot_maps_compute_the_products_they_pack():
    """Block maps (a per-token product) and the LM head's map (on a replicated token) against
    numpy, on plaintext slots: the diagonals and the layout, without encryption."""
    rng = np.random.default_rng(0)
    layout = packing.Layout(slots=1024, tokens=8, width=16)
    x = rng.normal(size=(layout.per_ciphertext, 5, 12))  # 5 tokens of 12 features, zero padded
    w = rng.normal(size=(12, 10))
    scale = rng.normal(size=8)
    (slots,) = layout.pack(x)
    m = packing.block_map(layout, w, token_scale=scale)
    want = np.zeros((layout.per_ciphertext, 8, 16))
    want[:, :5, :10] = (x @ w) * scale[:5, None]
    assert np.allclose(m.apply(slots).reshape(want.shape), want)
    assert len(m.diagonals) <= 2 * layout.width - 1 and m.steps() <= set(range(-32, 33))
    head = rng.normal(size=(12, 100))
    last = np.zeros(layout.slots)
    last[: layout.width] = np.pad(x[0, 4], (0, 4))
    replicated = sum(np.roll(last, k * layout.width) for k in range(layout.slots // layout.width))
    y = packing.replicated_head_map(layout, head, 128).apply(replicated)
    assert np.allclose(y[:100], x[0, 4] @ head) and np.allclose(y[128:228], x[0, 4] @ head)


def test_linear_by_baby_and_giant_steps_and_rotations_on_ciphertexts():
    params = ckks.PARAMS[0]  # N=8192: a small, fast chain
    layout = packing.Layout(params.slots, tokens=16, width=16)
    rng = np.random.default_rng(1)
    maps = [packing.block_map(layout, rng.normal(size=(16, 16))) for _ in range(2)]
    steps = set().union(*(m.steps() for m in maps)) | {16, 32, -1}
    user = ckks.User(params, steps)
    server = ckks.Server(user.public_keys(), params, user.refresh, ckks.Link())
    x = rng.normal(size=params.slots)
    enc = server.load(user.encrypt(x))
    ys = server.linear(enc, maps)
    for y, m in zip(ys, maps):
        assert y.level == enc.level - 1 and np.abs(user.decrypt(server.dump(y)) - m.apply(x)).max() < 1e-4
    assert np.abs(user.decrypt(server.dump(server.rotate_sum(enc, 16, 4))) - sum(np.roll(x, -16 * k) for k in range(4))).max() < 1e-4
    assert np.abs(user.decrypt(server.dump(server.rotate(enc, -1))) - np.roll(x, 1)).max() < 1e-4
    square = server.multiply(enc, enc)
    (fresh,) = server.ensure([server.lower(square, 0)], 2)  # masked, re-encrypted by the user, unmasked
    assert fresh.level == params.levels and np.abs(user.decrypt(server.dump(fresh)) - x * x).max() < 1e-3
    params = ckks.PARAMS[1]  # degree 6 in 3 levels
    user = ckks.User(params, set())
    server = ckks.Server(user.public_keys(), params, user.refresh, ckks.Link())
    x = rng.uniform(-2, 2, params.slots)
    coeffs = np.array([0.5, -1.0, 0.25, 0.0, 0.1, -0.02, 0.01])
    poly = server.poly(server.load(user.encrypt(x)), coeffs)
    assert poly.level == params.levels - 3
    assert np.abs(user.decrypt(server.dump(poly)) - np.polynomial.polynomial.polyval(x, coeffs)).max() < 1e-3


def test_the_server_gets_no_secret_key():
    user = ckks.User(ckks.PARAMS[0], {1})
    parts = ckks._unpack(user.public_keys())
    assert len(parts) == 3  # the public, relinearisation and Galois keys
    secret = ckks._dump(user._secret)
    assert all(secret[64:4096] not in part for part in parts)


@pytest.mark.slow
def test_encrypted_vit_logits_equal_the_plaintext_polynomial_model_at_16_tokens():
    torch.manual_seed(0)
    train, test = data.load("digits")
    model = pf.PolyViT(replace(pf.PRESETS["tiny"], patch=2)).eval()  # 2×2 patches: 16 tokens
    pf.to_polynomial(model, train.images[:256], degree=4)
    plan = pf.he_plan(model)
    patches = model.patches(test.images[:40]).numpy()
    assert patches.shape[1] == 16
    report, logits = runner.run(plan, patches)
    with torch.no_grad():
        ref = model(test.images[:40]).numpy()
    assert np.abs(logits - ref).max() < 1e-2
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and report.argmax_agreement == 1.0
    assert report.ciphertexts == 2  # 32 images of 16 tokens × 16 slots a ciphertext
    assert report.bytes_up > 0 and report.bytes_down > 0 and report.rotations > 0 and report.peak_memory_bytes > 0
    assert report.params["security_bits"] == 128 and report.params["log_q"] <= ckks.MAX_LOG_Q_128[report.params["poly_modulus_degree"]]


@pytest.mark.slow
def test_encrypted_next_token_logits_equal_the_plaintext_polynomial_lm_at_32_tokens():
    """The LM form: the user encrypts its prompts' embeddings; the server applies the causal
    mask and 1/S(i + 1) on v's rows and returns each prompt's last-position logits."""
    torch.manual_seed(0)
    cfg = replace(pf.PRESETS["lm-tiny"], context=32, layers=2)
    model, ids = pf.PolyLM(cfg).eval(), torch.randint(0, cfg.vocab, (64, cfg.context))
    pf.to_polynomial(model, ids, degree=4)
    report, logits = runner.run(pf.he_plan(model), ids[:6].numpy())
    with torch.no_grad():
        ref = model(ids[:6])[:, -1].numpy()
    assert logits.shape == (6, cfg.vocab) and np.abs(logits - ref).max() < 1e-2
    assert (logits.argmax(-1) == ref.argmax(-1)).all() and report.argmax_agreement == 1.0 and report.inputs == 6
    assert report.refresh_rounds >= 2 * cfg.layers - 1  # the chain runs out within each layer


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
    assert {"seconds", "bytes_up", "bytes_down", "refresh_rounds", "max_abs_error", "peak_memory_bytes"} <= report.keys()
    assert report["max_abs_error"] < 1e-2
    missing = subprocess.run(stip + ["he", "run", "--model", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "stip train polyformer" in missing.stderr
