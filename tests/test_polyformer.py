"""The polynomial transformer: training with its regularisers, the polynomial swap, the folded
plan that the HE server evaluates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stip.models import data, polyformer as pf
from stip.models.train import Schedule, accuracy, fit


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
    info = pf.to_polynomial(model, train.images, degree=4)
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
    """`polyformer.to_mpc`: the JAX forward equals torch, the config survives the parties' JSON
    job file (per-layer polynomials included), and SEMI2K between two OS processes agrees."""
    import json

    from stip.mpc.model import forward
    from stip.mpc.parties import config_from_json, config_to_json, run_parties

    torch.manual_seed(0)
    train, test = data.load("digits")
    model = pf.PolyViT(pf.PRESETS["tiny"]).eval()
    pf.to_polynomial(model, train.images[:256], degree=2)
    cfg, params = pf.to_mpc(model)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    x = pf.embed_plan(pf.he_plan(model), model.patches(test.images[:2]).numpy())
    with torch.no_grad():
        ref = model(test.images[:2]).numpy()
    assert np.abs(np.asarray(forward(cfg, params, x)) - ref).max() < 1e-4
    report, out = run_parties(cfg, params, x, "semi2k")
    assert report.mode == "procs" and np.abs(out - ref).max() < 1e-2 and (out.argmax(-1) == ref.argmax(-1)).all()
