"""Start ``stip serve`` (or ``stip proxy``, ``stip share-server``) as a real subprocess on a
free loopback port (demo, tests, benchmarks).

    with ServerProcess(out / "server", token_file=f) as srv:
        Client(out / "client", srv.url, token=token)
    with ServerProcess(out / "client", "--upstream", engine.url, command="proxy") as proxy:
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="-")
    with ServerProcess("minilm", command="share-server") as s1:   # s1.url: tcp://127.0.0.1:PORT
    with ServerProcess(out / "server", tls=("s.crt", "s.key")) as srv:   # srv.url: https://…, srv.pin
    with side_by_side(lambda: ServerProcess(a, command="share-server"), lambda: ServerProcess(b, …)) as (s1, s2):
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import httpx

from ..tls import Trust, TrustError, fingerprint, httpx_verify

READY_PREFIX = "stip serve: listening on "
HEALTH = {"serve": "/v1/health", "proxy": "/v1/models"}


T = TypeVar("T")


@contextlib.contextmanager
def side_by_side(*starts: Callable[[], T]) -> Iterator[list[T]]:
    """The servers that ``starts`` start (each returns once its server is ready), started at
    once: a start is seconds of mostly single-threaded loading. Each is stopped on exit; when one
    fails to start, those that did are stopped and its error is raised."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = [pool.submit(start) for start in starts]
    try:
        yield [f.result() for f in futures]
    finally:
        for f in futures:
            if f.exception() is None:
                f.result().stop()


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
        tls: tuple[str | Path, str | Path] | None = None,
    ):
        """``tls``: (certificate, key) for ``--tls-cert/--tls-key``; the health check then pins
        that certificate, and ``pin`` is what clients give as ``--pin``."""
        self.command = command
        cmd = [sys.executable, "-m", "stip.cli", command, str(folder), "--host", "127.0.0.1", "--port", "0", *args]
        if token_file is not None:
            cmd += ["--token-file", str(token_file)]
        if tls is not None:
            cmd += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        cert = tls[0] if tls is not None else (args[args.index("--tls-cert") + 1] if "--tls-cert" in args[:-1] else None)
        self.pin = fingerprint(Path(cert)) if cert is not None else None
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._stderr: collections.deque[str] = collections.deque(maxlen=200)  # drained: a full pipe would stall the server
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        self.url = self._wait_ready(timeout)

    @property
    def stderr(self) -> str:
        """The last 200 lines the process wrote to stderr (a share server logs each connection)."""
        return "".join(self._stderr)

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
                code = self.proc.wait()
                time.sleep(0.1)  # the stderr pump's last lines
                raise RuntimeError(f"stip {self.command} exited with {code}: {self.stderr[-2000:]}")
            prefix = ready_line(self.command)
            if line.startswith(prefix):
                url = line[len(prefix):].split()[0]
                if self.command not in HEALTH:  # a raw TCP server: listening is ready
                    return url
                verify = None
                while time.monotonic() < deadline:  # listening; wait until it answers
                    try:
                        verify = verify or self._verify(url)
                        if httpx.get(f"{url}{HEALTH[self.command]}", timeout=2, verify=verify).status_code == 200:
                            return url
                    except TrustError:
                        self.stop()
                        raise
                    except (httpx.TransportError, OSError):  # not accepting yet
                        time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"stip {self.command} did not become ready within {timeout:.0f} s")

    def _verify(self, url: str):
        """Plain http, or https verified by the pinned certificate."""
        if not url.startswith("https://"):
            return True
        if self.pin is None:
            raise TrustError(f"stip {self.command} serves {url}, but no --tls-cert was given to check it by")
        return httpx_verify(url, Trust(pin=self.pin))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # stderr: its pump closes with the process

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
