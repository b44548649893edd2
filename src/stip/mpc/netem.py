"""Network emulation for real-party runs: two network namespaces joined by a veth pair.

Each party runs in its own namespace; the link is shaped with ``tc``: ``tbf`` for the
bandwidth and ``netem`` for the one-way delay. Kernels without the netem module (this
development machine, for one) get the bandwidth only; the report says so and the analytic
estimate adds the delay. Where namespaces cannot be made at all, ``Unavailable`` says why.

    with two_hosts(PROFILES["wan"]) as (hosts, wrap, applied):
        run_parties(..., hosts=hosts, wrap=wrap)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import StipError

SUBNET = ("10.231.7.1", "10.231.7.2")  # inside our own namespaces only


@dataclass(frozen=True)
class Profile:
    name: str
    mbit_per_s: float
    one_way_ms: float

    @property
    def rtt_s(self) -> float:
        return 2 * self.one_way_ms / 1e3

    def transfer_s(self, nbytes: float) -> float:
        return nbytes * 8 / (self.mbit_per_s * 1e6)


PROFILES = {
    "lan": Profile("lan", 1000.0, 0.1),
    "wan": Profile("wan", 100.0, 40.0),
}


class Unavailable(StipError, RuntimeError):
    pass


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def check() -> None:
    """Raise ``Unavailable`` with the reason when namespaces and tc cannot be used here."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise Unavailable(f"'{tool}' is not installed (Debian package iproute2)")
    probe = f"stip-probe-{os.getpid()}"
    r = _run("ip", "netns", "add", probe)
    if r.returncode != 0:
        raise Unavailable(f"cannot create a network namespace: {r.stderr.strip() or 'not permitted'}")
    _run("ip", "netns", "del", probe)


@contextmanager
def two_hosts(profile: Profile):
    """Yields ((host0, host1), (wrap0, wrap1), applied) where ``applied`` lists what shaping
    took effect."""
    check()
    tag = f"{os.getpid() % 100000}"
    ns = (f"stip{tag}a", f"stip{tag}b")
    dev = (f"stv{tag}a", f"stv{tag}b")
    applied: list[str] = []
    try:
        for n in ns:
            _checked("ip", "netns", "add", n)
        _checked("ip", "link", "add", dev[0], "netns", ns[0], "type", "veth", "peer", "name", dev[1], "netns", ns[1])
        for n, d, addr in zip(ns, dev, SUBNET):
            _checked("ip", "-n", n, "addr", "add", f"{addr}/30", "dev", d)
            _checked("ip", "-n", n, "link", "set", d, "up")
            _checked("ip", "-n", n, "link", "set", "lo", "up")
        delay = _shape(ns, dev, profile, "netem")
        if delay:
            applied.append(f"netem delay {profile.one_way_ms} ms + rate {profile.mbit_per_s:g} Mbit/s each way")
        else:
            _shape(ns, dev, profile, "tbf")
            applied.append(f"tbf rate {profile.mbit_per_s:g} Mbit/s each way; netem unavailable: the {profile.one_way_ms} ms delay is NOT in the measured time")
        yield SUBNET, tuple(["ip", "netns", "exec", n] for n in ns), applied
    finally:
        for n in ns:
            _run("ip", "netns", "del", n)


def _shape(ns, dev, profile: Profile, kind: str) -> bool:
    rate = f"{profile.mbit_per_s:g}mbit"
    for n, d in zip(ns, dev):
        if kind == "netem":
            cmd = ("tc", "qdisc", "add", "dev", d, "root", "netem", "delay", f"{profile.one_way_ms}ms", "rate", rate, "limit", "100000")
        else:
            burst = max(32_000, int(profile.mbit_per_s * 1e6 / 8 / 250))  # about 4 ms of traffic
            cmd = ("tc", "qdisc", "add", "dev", d, "root", "tbf", "rate", rate, "burst", str(burst), "latency", "1s")
        r = _run("ip", "netns", "exec", n, *cmd)
        if r.returncode != 0:
            if kind == "netem":
                return False
            raise Unavailable(f"tc refused to shape the link: {r.stderr.strip()}")
    return True


def _checked(*cmd: str) -> None:
    r = _run(*cmd)
    if r.returncode != 0:
        raise Unavailable(f"{' '.join(cmd)}: {r.stderr.strip()}")


def estimate(compute_s: float, bytes_sent: list[int], rounds: int, profile: Profile) -> float:
    """Analytic time: compute + bytes / bandwidth + rounds × RTT (the slower party's bytes)."""
    return compute_s + profile.transfer_s(max(b for b in bytes_sent if b is not None)) + rounds * profile.rtt_s
