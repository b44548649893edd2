"""Start ``stip serve`` (or ``stip proxy``, ``stip share-server``) as a real subprocess on a
free loopback port (demo, tests, benchmarks).

    with ServerProcess(out / "server", token_file=f) as srv:
        Client(out / "client", srv.url, token=token)
    with ServerProcess(out / "client", "--upstream", engine.url, command="proxy") as proxy:
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="-")
    with ServerProcess("minilm", command="share-server") as s1:   # s1.url: tcp://127.0.0.1:PORT
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

READY_PREFIX = "stip serve: listening on "
HEALTH = {"serve": "/v1/health", "proxy": "/v1/models"}


def ready_line(command: str) -> str:
    """What ``stip serve`` / ``stip proxy`` print once bound, followed by their URL."""
    return READY_PREFIX.replace("serve", command)


class ServerProcess:
    def __init__(
        self,
        folder: str | Path,
        *args: str,
        token_file: str | Path | None = None,
        timeout: float = 120.0,
        command: str = "serve",
    ):
        self.command = command
        cmd = [sys.executable, "-m", "stip.cli", command, str(folder), "--host", "127.0.0.1", "--port", "0", *args]
        if token_file is not None:
            cmd += ["--token-file", str(token_file)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.url = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> str:
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"stip {self.command} exited with {self.proc.wait()}: {self.proc.stderr.read()[-2000:]}")
            prefix = ready_line(self.command)
            if line.startswith(prefix):
                url = line[len(prefix):].split()[0]
                if self.command not in HEALTH:  # a raw TCP server: listening is ready
                    return url
                while time.monotonic() < deadline:  # listening; wait until it answers
                    try:
                        if httpx.get(f"{url}{HEALTH[self.command]}", timeout=2).status_code == 200:
                            return url
                    except httpx.TransportError:
                        time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"stip {self.command} did not become ready within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
