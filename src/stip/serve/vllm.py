"""P2 on an engine people already run: vLLM serving a token-mode sealed checkpoint.

The sealed ``server/`` folder is an ordinary Hugging Face checkpoint, so nothing here patches
vLLM; this only starts it as a subprocess (demo, tests, benchmarks), the way a cloud would:

    python -m vllm.entrypoints.openai.api_server --model OUT/server --dtype float32 \\
        --skip-tokenizer-init --served-model-name stip-<fingerprint[:16]>

``--skip-tokenizer-init``: P2 gets token ids and returns token ids; it has no use for a
tokenizer (and the sealed folder ships none). vLLM lives in its own virtual environment (it
pins transformers and fastapi below stip's); ``STIP_VLLM_PYTHON`` names its interpreter,
``make vllm`` creates ``.venv-vllm``.

With ``tls=(cert, key)`` vLLM serves HTTPS (its ``--ssl-certfile/--ssl-keyfile``). vLLM has no
option for the lowest TLS version, so the process gets an OpenSSL configuration
(``OPENSSL_CONF``, `TLS13_ONLY`) that disables everything below TLS 1.3; an operator starting
vLLM by hand does the same (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from ..errors import StipError
from ..tls import Trust, TrustError, fingerprint, httpx_verify

PYTHON_ENV = "STIP_VLLM_PYTHON"
DEFAULT_VENV = ".venv-vllm"
SERVED_PREFIX = "stip-"
# Python's ssl sets a minimum of TLS 1.2 itself, over a MinProtocol here; the protocol list
# (SSL_OP_NO_TLSv1_2 and below) is what it keeps.
TLS13_ONLY = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Protocol = -ALL, TLSv1.3
"""


class EngineUnavailable(StipError, RuntimeError):
    """vLLM is not installed where we look, or it did not come up."""


def python() -> Path:
    """The interpreter of the vLLM environment: $STIP_VLLM_PYTHON, else ./.venv-vllm."""
    given = os.environ.get(PYTHON_ENV)
    p = Path(given) if given else Path(DEFAULT_VENV) / "bin" / "python"
    if not p.is_file():
        raise EngineUnavailable(
            f"no vLLM environment at {p}: run `make vllm` (creates {DEFAULT_VENV}) or set {PYTHON_ENV}"
        )
    return p


def served_name(server_dir: str | Path) -> str:
    """The model name vLLM serves a sealing under: its fingerprint prefix, which the proxy
    checks against its own client folder (the fingerprint reveals nothing about the key)."""
    meta = json.loads((Path(server_dir) / "config.json").read_text()).get("stip") or {}
    fp = meta.get("fingerprint")
    return f"{SERVED_PREFIX}{fp[:16]}" if fp else Path(server_dir).name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(model_dir: str | Path, name: str, port: int, *, max_model_len: int | None = 4096,
            tls: tuple[str | Path, str | Path] | None = None, args: tuple[str, ...] = (),
            tokenizer: bool = False) -> list[str]:  # fmt: skip
    """vLLM's OpenAI server for a sealed folder on 127.0.0.1:``port``; HTTPS with ``tls``.
    ``tokenizer``: load the folder's tokenizer (an unsealed baseline asked with text, as by an
    evaluation harness); a sealing ships none."""
    return [
        str(python()), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--dtype", "float32", *(() if tokenizer else ("--skip-tokenizer-init",)),
        "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
        *(("--max-model-len", str(max_model_len)) if max_model_len else ()),
        *(("--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])) if tls else ()),
        *args,
    ]  # fmt: skip


class VLLMProcess:
    """``with VLLMProcess(out / "server") as engine: engine.url`` — vLLM's OpenAI server on a
    free loopback port, stopped on exit. Its log goes to a file whose tail any failure shows."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str | None = None,
        kv_cache_gib: int = 1,
        max_model_len: int | None = 4096,
        args: tuple[str, ...] = (),
        timeout: float = 600.0,
        tls: tuple[str | Path, str | Path] | None = None,
        tokenizer: bool = False,
    ):
        """``tls``: (certificate, key): HTTPS, TLS 1.3 only; ``pin`` is the certificate's.
        ``tokenizer``: see `command`."""
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a model folder (no config.json)")
        self.name = name or served_name(self.model_dir)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.pin = fingerprint(Path(tls[0])) if tls else None
        self._verify = None if tls else True
        self.cmd = command(self.model_dir, self.name, self.port, max_model_len=max_model_len, tls=tls, args=args, tokenizer=tokenizer)
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        env.pop("PYTHONPATH", None)  # never let stip's environment leak into vLLM's
        self._conf = None
        if tls:
            with tempfile.NamedTemporaryFile("w", prefix="stip-tls13-", suffix=".cnf", delete=False) as f:
                f.write(TLS13_ONLY)
            self._conf = Path(f.name)
            env["OPENSSL_CONF"] = str(self._conf)
        self._log = tempfile.NamedTemporaryFile(prefix="stip-vllm-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started = time.monotonic()
        self._wait_ready(timeout)
        self.ready_seconds = time.monotonic() - started

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self._verify is None:  # the pinned certificate, once it answers
                    self._verify = httpx_verify(self.url, Trust(pin=self.pin))
                if httpx.get(f"{self.url}/health", timeout=2, verify=self._verify).status_code == 200:
                    return
            except TrustError as e:
                self.stop()
                raise EngineUnavailable(str(e)) from None
            except (httpx.TransportError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise EngineUnavailable(f"vLLM did not become ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # the engine core runs in child processes: signal the whole group
                os.killpg(self.proc.pid, 15)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()
        if self._conf is not None:
            self._conf.unlink(missing_ok=True)

    def __enter__(self) -> "VLLMProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
