"""MPCViT: heterogeneous heads, search, binarisation, distillation, export to SPU."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from stip.models import data
from stip.mpc import mpcvit
from stip.mpc.mpcvit import Recipe, binarize, to_mpc, train_mpcvit
from stip.mpc.model import forward
from stip.mpc.parties import config_from_json, config_to_json
from stip.mpc.runner import simulate

TINY = replace(mpcvit.PRESETS["digits"], layers=2)


def _searched(granularity: str, linear_gelu: bool, mu: float, seed: int = 0) -> mpcvit.MPCViT:
    torch.manual_seed(seed)
    model = mpcvit.MPCViT(replace(TINY, linear_gelu=linear_gelu)).eval()
    model.start_search(granularity)
    with torch.no_grad():
        for p in model.search_parameters():
            p.uniform_(0, 1)
    binarize(model, mu)
    return model


@pytest.mark.parametrize("granularity,linear_gelu", [("head", False), ("layer", False), ("row", True)])
def test_export_runs_the_same_heads(granularity, linear_gelu):
    model = _searched(granularity, linear_gelu, mu=0.4)
    counts = model.kind_counts()
    assert counts["relu_softmax"] and counts["scaling"] and not counts["softmax"]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    cfg, params = to_mpc(model)
    got = np.asarray(forward(cfg, params, mpcvit.embed(model, x)))
    assert float(np.abs(got - ref).max()) <= 1e-4
    # the config crosses to the party processes as JSON (stip mpc run --parties procs)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg


def test_binarize_keeps_the_top_fraction():
    model = mpcvit.MPCViT(TINY)
    model.start_search("head")
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.alpha.copy_(torch.tensor([[0.1], [0.9], [0.2], [0.8]]) + 0.01 * i)
    summary = binarize(model, 0.25)  # 8 heads → the 2 largest α (0.91, 0.9): head 1 of each layer
    assert summary["relu_softmax_units"] == 2
    assert model.head_kinds() == [["scaling", "relu_softmax", "scaling", "scaling"]] * 2
    with pytest.raises(ValueError, match="not in search mode"):
        binarize(model, 0.3)
    with pytest.raises(ValueError, match="binarize"):
        m = mpcvit.MPCViT(TINY)
        m.start_search("head")
        to_mpc(m)


def test_spu_runs_heterogeneous_heads_and_they_cost_less():
    """The exported model under SEMI2K equals torch within fixed-point error, and a model of
    scaling heads sends fewer bytes in fewer rounds than the softmax one."""
    model = _searched("row", True, mu=0.5)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    cfg, params = to_mpc(model)
    report, out = simulate(cfg, params, mpcvit.embed(model, x), "semi2k")
    assert float(np.abs(out - ref).max()) <= 0.05
    costs = {}
    for kind in ("softmax", "scaling"):
        cfg, params = to_mpc(mpcvit.set_kinds(mpcvit.MPCViT(TINY).eval(), kind))
        costs[kind] = simulate(cfg, params, mpcvit.embed(model, x), "semi2k")[0]
    assert costs["scaling"].bytes_sent[0] < costs["softmax"].bytes_sent[0]
    assert costs["scaling"].send_actions[0] < costs["softmax"].send_actions[0]


@pytest.mark.slow
def test_digits_recipe(tmp_path):
    """Teacher ≥ 95 %; searched + distilled at μ=0.3 within 2 points; distillation does at
    least as well as retraining with CE alone from the same searched model."""
    recipe = Recipe(mu=0.3, distill_epochs=5)  # measured latency weights: runs SPU once
    kd = train_mpcvit(recipe, tmp_path / "kd")
    assert kd["teacher_accuracy"] >= 0.95
    assert kd["accuracy"] >= kd["teacher_accuracy"] - 0.02
    assert kd["latency_weights"]["measured"]["relu_softmax"]["bytes"] > kd["latency_weights"]["measured"]["scaling"]["bytes"]
    assert kd["binarize"]["relu_softmax_units"] == round(0.3 * TINY.heads * mpcvit.PRESETS["digits"].layers)

    # the same teacher and search (their finished stages), retrained without distillation
    (tmp_path / "ce" / "stages").mkdir(parents=True)
    for name in ("teacher.pt", "search.pt"):
        shutil.copy(tmp_path / "kd" / "stages" / name, tmp_path / "ce" / "stages" / name)
    shutil.copy(tmp_path / "kd" / "head_costs.json", tmp_path / "ce")
    ce = train_mpcvit(replace(recipe, distill=False), tmp_path / "ce")
    assert ce["teacher_accuracy"] == kd["teacher_accuracy"] and ce["binarized_accuracy"] == kd["binarized_accuracy"]
    # On 359 test digits the two differ by a few images at most, and by machine (KD 4 images
    # ahead on one, a tie on another: docs/mpcvit.md); so the test asks only that KD lose nothing.
    assert kd["accuracy"] >= ce["accuracy"]


def test_interrupted_run_resumes_to_the_same_model(tmp_path):
    recipe = Recipe(teacher_epochs=3, search_epochs=2, distill_epochs=2, latency_weights="uniform")
    straight = train_mpcvit(recipe, tmp_path / "straight")

    class Interrupt(Exception):
        pass

    def stop_in_search(stage, step, total, info):
        if stage == "search" and step == total - 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_mpcvit(recipe, tmp_path / "resumed", stop_in_search)
    seen = []
    resumed = train_mpcvit(recipe, tmp_path / "resumed", lambda stage, *a: seen.append(stage))
    assert "teacher" not in seen and "search" in seen  # the finished stage is loaded, not redone
    for key in ("teacher_accuracy", "search_accuracy", "binarized_accuracy", "accuracy"):
        assert resumed[key] == straight[key]
    a = mpcvit.load(tmp_path / "straight")[0].state_dict()
    b = mpcvit.load(tmp_path / "resumed")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_then_runs_under_spu(tmp_path):
    run = tmp_path / "run"
    stip = [sys.executable, "-m", "stip.cli"]
    args = ["train", "mpcvit", str(run), "--teacher-epochs", "1", "--search-epochs", "1", "--distill-epochs", "1",
            "--latency-weights", "uniform", "--granularity", "row", "--json"]
    done = subprocess.run(stip + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert set(summary["head_kinds"]) == {"softmax", "relu_softmax", "scaling"}
    changed = subprocess.run(stip + args[:-1] + ["--mu", "0.5"], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 1 and "other settings (mu)" in changed.stderr
    mpc = subprocess.run(stip + ["mpc", "run", "--model", str(run), "--json"], capture_output=True, text=True, timeout=300)
    assert mpc.returncode == 0, mpc.stderr
    report = json.loads(mpc.stdout)
    assert report["model_type"] == "mpcvit" and report["tokens"] == TINY.tokens and report["max_abs_error"] < 0.05
    missing = subprocess.run(stip + ["train", "mpcvit", str(tmp_path / "c"), "--dataset", "cifar10", "--data-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "cifar-10-batches-py" in missing.stderr and "Traceback" not in missing.stderr


def test_cifar10_loader_reads_the_standard_layout(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        (base / name).write_bytes(pickle.dumps(batch))
    train, test = data.load("cifar10", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32) and train.classes == 10
    assert abs(float(train.images.mean())) < 1e-5  # normalised with the training statistics
    (base / "test_batch").unlink()
    with pytest.raises(data.DatasetMissing, match="test_batch"):
        data.load("cifar10", tmp_path)
    with pytest.raises(data.DatasetMissing, match="--data-dir"):
        data.load("cifar100")
