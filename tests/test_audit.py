"""`stip audit` passes on a fresh seal and names each deliberately planted violation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness
from stip import keys
from stip.audit import audit
from stip.seal import seal_folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    case = harness.bert_case(
        dict(heads=2, kv_heads=2, head_dim=8, layers=2, ffn=32, vocab=40, batch=1, seq=4, lengths=[4], seed=5),
        "BertForSequenceClassification",
    )
    path = tmp_path_factory.mktemp("src")
    case.model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pristine(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("sealed")
    seal_folder(src, out)
    return out


@pytest.fixture
def out(pristine, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(pristine, dst)
    return dst


def findings(out, src=None) -> str:
    return "\n".join(str(v) for v in audit(out, src))


def _edit_safetensors(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_fresh_seal_passes(out, src):
    assert audit(out) == []
    assert audit(out, src) == []


def test_key_file_in_server(out):
    shutil.copy(out / "provider/key.stip", out / "server/key.stip")
    assert "server/key.stip: unexpected file" in findings(out)


def test_permutation_tensor_in_server(out):
    pi = keys.load(out / "provider/key.stip").pi
    _edit_safetensors(out / "server/model.safetensors", lambda t: t.update(pi=torch.tensor(pi)))
    assert "server/pi: is a permutation" in findings(out)


def test_permutation_list_in_server_config(out):
    cfg = json.loads((out / "server/config.json").read_text())
    cfg["secret"] = keys.load(out / "provider/key.stip").pi.tolist()
    (out / "server/config.json").write_text(json.dumps(cfg))
    assert "config.secret is a permutation" in findings(out)


def test_embedding_table_in_server(out, src):
    word = load_file(src / "model.safetensors")["bert.embeddings.word_embeddings.weight"]
    _edit_safetensors(out / "server/model.safetensors", lambda t: t.update({"bert.embeddings.word_embeddings.weight": word}))
    assert "server/bert.embeddings.word_embeddings.weight: holds P3's embedding table" in findings(out)


def test_nonzero_position_table_in_server(out):
    def edit(t):
        t["bert.embeddings.position_embeddings.weight"] += 1.0

    _edit_safetensors(out / "server/model.safetensors", edit)
    assert "server/bert.embeddings.position_embeddings.weight: holds P3's embedding table" in findings(out)


def test_layer_weight_in_client(out):
    name = "encoder.layer.0.intermediate.dense.weight"
    w = load_file(out / "server/model.safetensors")["bert." + name]
    _edit_safetensors(out / "client/embeddings.safetensors", lambda t: t.update({name: w}))
    manifest = json.loads((out / "client/manifest.json").read_text())
    manifest["embedding_tensors"][name] = list(w.shape)
    (out / "client/manifest.json").write_text(json.dumps(manifest))
    assert f"client/embeddings.safetensors: holds {name!r}, which is not an embedding weight" in findings(out)


def test_weights_file_in_client(out):
    shutil.copy(out / "server/model.safetensors", out / "client/model.safetensors")
    assert "client/model.safetensors: unexpected weights" in findings(out)


def test_provider_key_in_client(out):
    shutil.copy(out / "provider/key.stip", out / "client/key.stip")
    assert "is a provider key" in findings(out)


def test_unsealed_tensor_equal_to_original(out, src):
    name = "bert.encoder.layer.1.output.dense.weight"
    original = load_file(src / "model.safetensors")[name]
    _edit_safetensors(out / "server/model.safetensors", lambda t: t.update({name: original}))
    assert audit(out) == []  # only visible against the original
    assert f"server/{name}: equals the original tensor" in findings(out, src)


def test_unsealed_norm_equal_to_original(out, src):
    name = "bert.encoder.layer.0.attention.output.LayerNorm.weight"
    original = load_file(src / "model.safetensors")[name]
    _edit_safetensors(out / "server/model.safetensors", lambda t: t.update({name: original}))
    assert f"server/{name}: equals the original tensor" in findings(out, src)


def test_fingerprints_must_agree(out, pristine, src, tmp_path):
    other = tmp_path / "other"
    seal_folder(src, other)
    shutil.copy(other / "provider/key.stip", out / "provider/key.stip")
    assert "different key fingerprints" in findings(out)


@pytest.mark.parametrize("which", ["provider/key.stip", "client/key.stip"])
def test_key_readable_by_others(out, which):
    (out / which).chmod(0o644)
    assert f"{which}: mode 0o644: readable by others" in findings(out)


def test_corrupted_provider_key(out):
    blob = (out / "provider/key.stip").read_bytes()
    (out / "provider/key.stip").write_bytes(blob[:100])
    assert "provider/key.stip: key file" in findings(out)


def test_missing_folder(out):
    shutil.rmtree(out / "provider")
    assert "provider/: folder is missing" in findings(out)


def test_every_family_passes_a_fresh_audit(tmp_path):
    """Per-family client/server splits are what the audit expects (heads ≥ 2 so that every
    per-head table moves)."""
    models = [
        harness.gpt2_case(dict(heads=2, kv_heads=2, head_dim=4, layers=1, ffn=16, vocab=30, batch=1, seq=3, lengths=[3], seed=1)).model,
        harness.llama_case(dict(heads=4, kv_heads=2, head_dim=4, layers=1, ffn=16, vocab=30, batch=1, seq=3, lengths=[3], seed=1), "qwen2").model,
        harness.vit_case(dict(heads=2, head_dim=4, layers=1, ffn=16, patch=2, grid=2, batch=1, labels=10, seed=1)).model,
        harness.swin_case(dict(embed=8, depths=[1, 1], heads=[2, 4], window=2, patch=1, batch=1, labels=10, seed=1)).model,
    ]
    for i, model in enumerate(models):
        src, out = tmp_path / f"src{i}", tmp_path / f"out{i}"
        model.save_pretrained(src)
        seal_folder(src, out)
        assert audit(out, src) == [], type(model).__name__
