"""TLS 1.3 on stip's links: `stip serve` and `stip proxy` over HTTPS, P3 pinning or checking a
CA, shares mode with a pin per party; nothing (no token) sent to a peer that is not verified."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading

import httpx
import pytest
import torch
from typer.testing import CliRunner

import harness
from stip import tls
from stip.cli import app
from stip.client.api import Client
from stip.client.proxy import Upstream
from stip.models import default
from stip.seal import load_source, seal_folder
from stip.serve.process import ServerProcess

TOKEN = "tls-test-token-77c1"
TEXTS = ["Pinned certificates keep the cloud honest.", "Hi"]


def stip(*args, timeout: float = 300):
    """A real `stip` process: the flows that must work end to end."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "stip.cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def refused(*args) -> str:
    """`stip` in-process for a refusal: exit 1, one clear error, no traceback; its output."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert "Traceback" not in r.output and "error:" in r.output
    return r.output


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two self-signed pairs for 127.0.0.1: the server's, and another the server does not hold."""
    d = tmp_path_factory.mktemp("certs")
    pins = {name: tls.self_signed(d / f"{name}.crt", d / f"{name}.key") for name in ("srv", "other", "proxy")}
    return d, pins


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tok") / "token"
    f.write_text(TOKEN + "\n")
    return f


@pytest.fixture(scope="module")
def tls_server(minilm_sealed_dir, certs, token_file):
    d, _ = certs
    with ServerProcess(minilm_sealed_dir / "server", token_file=token_file, tls=(d / "srv.crt", d / "srv.key")) as srv:
        yield srv


def _plain_embedding(texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    path = default.path()
    batch = AutoTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = load_source(path)(**batch).last_hidden_state
    return torch.nn.functional.normalize(default.mean_pool(h, batch["attention_mask"]), dim=-1)


class Recorder:
    """A TLS 1.3 server that keeps every byte clients send after their handshakes."""

    def __init__(self, cert, key):
        self.ctx = tls.server_context(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.handshakes = 0
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as t:
                self.handshakes += 1
                t.settimeout(10)
                while data := t.recv(4096):
                    self.received += data
        except (ssl.SSLError, OSError):
            pass

    def close(self):
        """Stop accepting; wait until every client has hung up."""
        self.sock.close()
        for t in list(self.threads):
            t.join(15)


# --- stip tls-cert --------------------------------------------------------------------------------


def test_tls_cert_prints_the_certificates_pin(tmp_path):
    r = stip("tls-cert", tmp_path / "s1", "--host", "127.0.0.1", "--host", "s1.example")
    assert r.returncode == 0, r.stderr
    pin = r.stdout.strip()
    assert len(r.stdout.splitlines()) == 1 and pin == tls.fingerprint(tmp_path / "s1.crt")
    assert stat.S_IMODE((tmp_path / "s1.key").stat().st_mode) == 0o600
    again = stip("tls-cert", tmp_path / "s1")
    assert again.returncode == 1 and "--force" in again.stderr and tls.fingerprint(tmp_path / "s1.crt") == pin
    (tmp_path / "s1.key").chmod(0o644)
    r = stip("tls-cert", tmp_path / "s1", "--force", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pin"] == tls.fingerprint(tmp_path / "s1.crt") != pin
    assert stat.S_IMODE((tmp_path / "s1.key").stat().st_mode) == 0o600  # a key file that existed too


# --- stip serve over TLS ----------------------------------------------------------------------------


def test_serve_over_tls_with_a_pin_gives_the_plaintext_embeddings(tls_server, minilm_sealed_dir, certs, token_file):
    assert tls_server.url.startswith("https://127.0.0.1:") and tls_server.pin == certs[1]["srv"]
    with Client(minilm_sealed_dir / "client", tls_server.url, token=TOKEN, trust=tls.Trust(pin=tls_server.pin)) as c:
        got = c.encode(TEXTS)
    assert float((got.embedding * _plain_embedding(TEXTS)).sum(-1).min()) >= 0.99999
    r = stip("query", minilm_sealed_dir / "client", *TEXTS, "--server", tls_server.url, "--pin", tls_server.pin,
             "--token-file", token_file, "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert torch.allclose(torch.tensor(json.loads(r.stdout)["embedding"]), got.embedding, atol=1e-6)


def test_a_ca_file_verifies_the_server(tls_server, minilm_sealed_dir, certs, token_file):
    d, _ = certs
    with Client(minilm_sealed_dir / "client", tls_server.url, token=TOKEN, trust=tls.Trust(ca=d / "srv.crt")) as c:
        assert c.info()["architecture"]
    r = stip("query", minilm_sealed_dir / "client", "Hi", "--server", tls_server.url, "--ca", d / "srv.crt",
             "--token-file", token_file)  # fmt: skip
    assert r.returncode == 0, r.stderr
    named = tls_server.url.replace("127.0.0.1", "localhost")  # in the certificate's names too
    with Client(minilm_sealed_dir / "client", named, token=TOKEN, trust=tls.Trust(ca=d / "srv.crt")) as c:
        assert c.info()["architecture"]


def test_a_wrong_pin_or_ca_is_refused_before_anything_is_sent(tls_server, minilm_sealed_dir, certs, token_file):
    d, pins = certs
    rec = Recorder(d / "srv.crt", d / "srv.key")
    try:
        url = f"https://127.0.0.1:{rec.port}"
        with pytest.raises(tls.TrustError, match="not the pinned"):
            Client(minilm_sealed_dir / "client", url, token=TOKEN, trust=tls.Trust(pin=pins["other"]))
        with pytest.raises(tls.TrustError, match="not trusted"):
            Client(minilm_sealed_dir / "client", url, token=TOKEN, trust=tls.Trust(ca=d / "other.crt"))
        with pytest.raises(tls.TrustError):
            Upstream(url, token=TOKEN, trust=tls.Trust(pin=pins["other"]))
        assert "not the pinned" in refused("query", minilm_sealed_dir / "client", "Hi", "--server", url, "--pin", pins["other"], "--token-file", token_file)
    finally:
        rec.close()
    assert rec.handshakes == 3 and rec.received == b""  # the pinned clients shook hands, then sent not one byte
    r = stip("query", minilm_sealed_dir / "client", "Hi", "--server", tls_server.url, "--pin", pins["other"], "--token-file", token_file)
    assert r.returncode == 1 and "not the pinned" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and TOKEN not in r.stderr + r.stdout
    assert "not trusted" in refused("query", minilm_sealed_dir / "client", "Hi", "--server", tls_server.url, "--ca", d / "other.crt")


def test_the_tls_server_refuses_plaintext_and_tls_1_2(tls_server, minilm_sealed_dir):
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(plain + "/v1/health", timeout=5)
    with Client(minilm_sealed_dir / "client", plain, token=TOKEN) as c, pytest.raises(httpx.TransportError):
        c.info()
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/v1/health", verify=old, timeout=5)


def test_plain_http_off_loopback_needs_insecure(minilm_sealed_dir, certs):
    with pytest.raises(ValueError, match="without TLS"):
        Client(minilm_sealed_dir / "client", "http://10.0.0.5:8000", token=TOKEN)
    with pytest.raises(ValueError, match="without TLS"):
        Upstream("http://10.0.0.5:8000", token=TOKEN)
    with pytest.raises(ValueError, match="https://"):
        Client(minilm_sealed_dir / "client", "http://127.0.0.1:8000", trust=tls.Trust(pin=certs[1]["srv"]))
    Client(minilm_sealed_dir / "client", "http://10.0.0.5:8000", insecure=True).close()  # allowed, nothing sent yet
    out = refused("query", minilm_sealed_dir / "client", "Hi", "--server", "http://10.0.0.5:8000")
    assert "without TLS" in out and "--insecure" in out
    out = refused("serve", minilm_sealed_dir / "server", "--host", "0.0.0.0", "--port", "0")
    assert "without TLS" in out and "--tls-cert" in out
    assert "together" in refused("serve", minilm_sealed_dir / "server", "--tls-cert", certs[0] / "srv.crt")


# --- stip proxy: its own HTTPS, a pinned upstream ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokens_client(tmp_path_factory):
    """A 1-layer Llama sealed in token mode, with a word-level tokenizer made here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=32, batch=1, seq=2, lengths=[2], seed=3))
    src = tmp_path_factory.mktemp("tiny-src")
    case.model.save_pretrained(src)
    vocab = {w: i for i, w in enumerate(["</s>", "[UNK]", *(f"w{i}" for i in range(30))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(src)
    out = tmp_path_factory.mktemp("tiny-tokens")
    seal_folder(src, out, mode="tokens")
    return out / "client"


def test_proxy_over_tls_with_a_pinned_upstream(tiny_tokens_client, tls_server, certs):
    d, pins = certs
    up = ("--upstream", tls_server.url, "--upstream-model", "x")
    with ServerProcess(tiny_tokens_client, *up, "--pin", tls_server.pin, command="proxy", tls=(d / "proxy.crt", d / "proxy.key")) as p:
        assert p.url.startswith("https://") and p.pin == pins["proxy"]
        r = httpx.get(p.url + "/v1/models", verify=tls.httpx_verify(p.url, tls.Trust(pin=p.pin)), timeout=10)
        assert r.status_code == 200 and r.json()["data"]
        with pytest.raises(httpx.TransportError):
            httpx.get(p.url.replace("https://", "http://") + "/v1/models", timeout=5)
    assert "not the pinned" in refused("proxy", tiny_tokens_client, *up, "--pin", pins["other"], "--port", "0")
    assert "without TLS" in refused("proxy", tiny_tokens_client, "--upstream", "http://10.0.0.5:8000", "--port", "0")
    out = refused("proxy", tiny_tokens_client, *up, "--host", "0.0.0.0", "--port", "0")
    assert "without TLS" in out and "--tls-cert" in out


def test_proxy_insecure_warns(tiny_tokens_client):
    cmd = [sys.executable, "-m", "stip.cli", "proxy", str(tiny_tokens_client), "--upstream", "http://192.0.2.1:9",
           "--insecure", "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        assert proc.stdout.readline().startswith("stip proxy: listening on http://127.0.0.1:")
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert "--insecure" in stderr and "192.0.2.1" in stderr


# --- shares mode: one pin per party ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_causal(tmp_path_factory):
    case = harness.llama_case(dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=32, batch=1, seq=2, lengths=[2], seed=5))
    src = tmp_path_factory.mktemp("tiny-causal")
    case.model.config.eos_token_id = None  # a fixed number of new tokens
    case.model.save_pretrained(src)
    return src, case.model


def test_shares_mode_pins_each_party(tiny_causal, certs):
    from stip.shares import ShareServer

    src, model = tiny_causal
    d, pins = certs
    s1 = ShareServer.from_model(model).listen(tls=tls.server_context(d / "srv.crt", d / "srv.key"))
    s2 = ShareServer.from_model(model).listen(tls=tls.server_context(d / "other.crt", d / "other.key"))
    ids = [3, 7, 11]
    with torch.no_grad():  # plaintext greedy
        seq = list(ids)
        for _ in range(3):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    with s1, s2:
        shares = f"{s1.address},{s2.address}"
        gen = ("generate", src, "--ids", "3,7,11", "--max-new-tokens", "3", "--shares", shares, "--json")
        r = stip(*gen, "--pin", f"{pins['srv']},{pins['other']}", timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["token_ids"] == seq[len(ids):]
        assert "not the pinned" in refused(*gen, "--pin", f"{pins['other']},{pins['srv']}")  # the pins swapped
        out = refused(*gen, "--pin", pins["srv"])
        assert "one pin per server" in out and "2 expected, 1 given" in out
        assert "not both" in refused(*gen, "--pin", pins["srv"] + "," + pins["other"], "--ca", d / "srv.crt")


# --- vLLM's TLS (the command line only: starting vLLM is the LLM tests' cost) -----------------------------


def test_vllm_gets_its_ssl_options_and_tls_1_3_only(monkeypatch, tmp_path, certs):
    from stip.serve import vllm

    d, _ = certs
    monkeypatch.setenv(vllm.PYTHON_ENV, sys.executable)
    cmd = vllm.command(tmp_path, "stip-abc", 8123, tls=(d / "srv.crt", d / "srv.key"))
    i = cmd.index("--ssl-certfile")
    assert cmd[i : i + 4] == ["--ssl-certfile", str(d / "srv.crt"), "--ssl-keyfile", str(d / "srv.key")]
    assert "--ssl-certfile" not in vllm.command(tmp_path, "stip-abc", 8123)
    # what the configuration does to a server that, like uvicorn's, asks Python for its defaults
    conf = tmp_path / "tls13.cnf"
    conf.write_text(vllm.TLS13_ONLY)
    script = (
        "import socket, ssl, sys\n"
        "ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[1], sys.argv[2])\n"
        "s = socket.create_server(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True)\n"
        "for _ in range(2):\n"
        "    c, _ = s.accept()\n"
        "    try:\n"
        "        with ctx.wrap_socket(c, server_side=True) as t: t.sendall(t.version().encode())\n"
        "    except (ssl.SSLError, OSError): pass\n"
    )
    env = dict(os.environ, OPENSSL_CONF=str(conf))
    proc = subprocess.Popen([sys.executable, "-c", script, str(d / "srv.crt"), str(d / "srv.key")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        for top, ok in ((ssl.TLSVersion.TLSv1_2, False), (ssl.TLSVersion.TLSv1_3, True)):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname, ctx.verify_mode, ctx.maximum_version = False, ssl.CERT_NONE, top
            try:
                with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as t:
                    got = t.recv(16)
            except (ssl.SSLError, OSError):
                got = None
            assert (got == b"TLSv1.3") if ok else not got, (top, got)
    finally:
        proc.kill()
        proc.wait()
