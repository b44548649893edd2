"""The command line: the main flow as a real process, error paths in-process."""

from __future__ import annotations

import os
import subprocess
import sys

import transformers as T
from typer.testing import CliRunner

from stip.cli import app

runner = CliRunner()


def stip(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "stip.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_seal_default_then_audit(tmp_path, minilm_path):
    out = tmp_path / "out"
    r = stip("seal", "--default", out)
    assert r.returncode == 0, r.stderr
    fp = r.stdout.strip().splitlines()[-1].split()[-1]
    assert len(fp) == 64 and fp in (out / "client/manifest.json").read_text()
    for part in ("server/config.json", "server/model.safetensors", "client/key.stip", "client/tokenizer.json", "provider/key.stip"):
        assert (out / part).is_file(), part

    r = stip("audit", out, "--original", minilm_path)
    assert r.returncode == 0, r.stderr
    assert "audit passed" in r.stdout

    (out / "provider/key.stip").chmod(0o644)
    r = stip("audit", out)
    assert r.returncode == 1
    assert "VIOLATION provider/key.stip: mode 0o644" in r.stderr
    assert "Traceback" not in r.stderr


def test_help_explains_every_command():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("seal", "audit", "serve", "proxy", "demo"):
        assert cmd in r.output
    r = runner.invoke(app, ["seal", "--help"])
    assert r.exit_code == 0 and "--default" in r.output and "fingerprint" in r.output.lower()


def test_seal_needs_arguments():
    r = runner.invoke(app, ["seal"])
    assert r.exit_code == 1
    assert "usage: stip seal SRC OUT" in r.output


def test_seal_refuses_a_missing_folder(tmp_path):
    r = runner.invoke(app, ["seal", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "not a local Hugging Face model folder" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_seal_refuses_an_unsupported_model(tmp_path):
    src = tmp_path / "distil"
    T.DistilBertModel(T.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=30)).save_pretrained(src)
    r = runner.invoke(app, ["seal", str(src), str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "'distilbert' is not supported" in r.output
    assert "LlamaForCausalLM" in r.output


def test_seal_refuses_to_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("precious")
    r = runner.invoke(app, ["seal", "--default", str(out)])
    assert r.exit_code == 1
    assert "--force" in r.output
    assert (out / "something").read_text() == "precious"


def test_audit_of_a_missing_folder(tmp_path):
    r = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "is not a folder" in r.output


def test_chat_model_by_name_seals_in_token_mode_and_benches(tmp_path):
    """`smollm2` names the embedded chat model wherever a model folder is taken."""
    import json

    r = stip("seal", "--chat", tmp_path / "tok")
    assert r.returncode == 0 and "tokens mode" in r.stdout, r.stderr
    assert json.loads((tmp_path / "tok" / "client" / "manifest.json").read_text())["mode"] == "tokens"
    r = stip("seal", "smollm2", tmp_path / "tok", "--mode", "tokens")
    assert r.returncode == 1 and "not empty" in r.stderr
    r = stip("bench", "--model", "smollm2", "--modes", "plain,stip", "--repeats", "1", "--tokens", "8", "--out", tmp_path / "b", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["mode"]: row for row in json.loads(r.stdout)["rows"]}
    assert rows["stip"]["top1_agreement"] == 1.0 and rows["stip"]["max_abs_error"] < 1e-3  # causal LM: logits compared
