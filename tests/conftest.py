import os

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# CI replays the same examples every run; locally hypothesis explores.
settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def minilm_path():
    from stip.models import default

    return default.path()


@pytest.fixture(scope="session")
def minilm_sealed_dir(tmp_path_factory, minilm_path):
    """One on-disk sealing of the real MiniLM, shared by the tests that only read it."""
    from stip.seal import seal_folder

    out = tmp_path_factory.mktemp("minilm-sealed")
    seal_folder(minilm_path, out)
    return out


# --- SmolLM2 on vLLM, shared by every module ------------------------------------------------------
# Each engine is a session fixture: started once, on the first test that asks for it, by whichever
# module that is, and stopped right after the last selected test that uses it (an idle vLLM keeps
# polling, ~7 % of a core, which the modules after it would pay for). One engine starts in ~60 s on
# 2 cores; two started side by side were slower than one after the other (the starts are CPU
# bound: 182 s against 140 s, sealing included), so each starts when first asked for.

VLLM_ARGS = ("--enforce-eager",)  # no torch.compile warm-up (~2.5 min a start on 2 cores)
_ENGINE_FIXTURES = ("sealed_engine", "unsealed_engine")
_last_use: dict[str, int] = {}  # engine fixture → position of the last selected test using it
_position: dict[str, int] = {}  # test id → its position in the run
_running: dict[str, object] = {}  # engine fixture → its VLLMProcess, while it runs


def pytest_collection_finish(session):
    _last_use.clear()
    _position.clear()
    for i, item in enumerate(session.items):
        _position[item.nodeid] = i
        for name in _ENGINE_FIXTURES:
            if name in getattr(item, "fixturenames", ()):  # the closure: through proxy fixtures too
                _last_use[name] = i


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        i = _position.get(item.nodeid)
        for name in [n for n in _running if i is not None and _last_use.get(n, -1) <= i]:
            _running.pop(name).stop()


def _engine(fixture: str, model_dir, **kw):
    from stip.serve.vllm import VLLMProcess

    _running[fixture] = engine = VLLMProcess(model_dir, args=VLLM_ARGS, **kw)
    return engine


@pytest.fixture(scope="session")
def vllm_python():
    from stip.serve.vllm import EngineUnavailable, python

    try:
        return python()
    except EngineUnavailable as e:
        pytest.fail(f"{e} — make test creates it")  # never skipped: make test installs vLLM


@pytest.fixture(scope="session")
def smollm2_path():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (converted once, ~40 s)."""
    from stip.models import chat

    return chat.path()


@pytest.fixture(scope="session")
def smollm2_tokens_dir(tmp_path_factory, smollm2_path):
    """SmolLM2 sealed in token mode, once per session: ``/server`` is what the sealed engine
    serves, ``/client`` what ``stip proxy`` holds."""
    from stip.seal import seal_folder

    out = tmp_path_factory.mktemp("smollm2-tokens")
    seal_folder(smollm2_path, out, mode="tokens")
    return out


@pytest.fixture(scope="session")
def sealed_engine(vllm_python, smollm2_tokens_dir):
    """An unmodified vLLM serving ``smollm2_tokens_dir/server`` under its sealing's name."""
    from stip.seal import SERVER

    yield _engine("sealed_engine", smollm2_tokens_dir / SERVER)
    if "sealed_engine" in _running:
        _running.pop("sealed_engine").stop()


@pytest.fixture(scope="session")
def unsealed_engine(vllm_python, smollm2_path):
    """The same vLLM serving the unsealed SmolLM2, under a stip- name that is not
    ``smollm2_tokens_dir``'s sealing (a proxy for that sealing must refuse it)."""
    yield _engine("unsealed_engine", smollm2_path, name="stip-unsealed")
    if "unsealed_engine" in _running:
        _running.pop("unsealed_engine").stop()


# --- SmolLM2's share servers over TLS, shared by the shares modules -------------------------------


class ShareServerProcess:
    """`stip share-server` on a fixed loopback port over TLS, so that it can die and come back on it."""

    def __init__(self, src, cert, port: int | None = None, *args: str):
        from stip.serve.vllm import free_port

        self.src, self.cert, self.port, self.args = src, cert, port or free_port(), args
        self.address = f"127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        import subprocess
        import sys
        import tempfile
        import threading

        cmd = [sys.executable, "-m", "stip.cli", "share-server", str(self.src), "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", "--tls-cert", str(self.cert[0]), "--tls-key", str(self.cert[1]), *self.args]  # fmt: skip
        self.log = tempfile.TemporaryFile("w+")  # its per-connection log lines, for the tests that read them
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"the share server did not start: {line!r}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def logged(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no drain, no goodbye
        self.proc.wait()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def share_certs(tmp_path_factory):
    """S1's and S2's certificates, and a third that no one pins: (cert, key, pin) each."""
    from stip import tls

    d = tmp_path_factory.mktemp("certs")
    return {n: (d / f"{n}.crt", d / f"{n}.key", tls.self_signed(d / f"{n}.crt", d / f"{n}.key")) for n in ("s1", "s2", "other")}


@pytest.fixture(scope="session")
def smollm2_shares(smollm2_path, share_certs):
    """SmolLM2's S1 and S2 as processes over TLS; S2 on a port it can be restarted on. Started
    side by side: 20 s here against 29 s one after the other."""
    from stip.serve.process import side_by_side

    with side_by_side(*(lambda n=n: ShareServerProcess(smollm2_path, share_certs[n]) for n in ("s1", "s2"))) as (s1, s2):
        yield smollm2_path, s1, s2
