"""Running `stip.mpc.model.forward` under SecretFlow SPU, with a cost report.

    report, logits = simulate(cfg, params, x, protocol="semi2k")   # all parties in one process

Costs come from SPU's own link profile (``enable_pphlo_profile``), which SPU prints through
its logger; we capture the process's output around the run and parse the link totals. In
two-party runs, rank 0's "recv" totals are rank 1's "send" totals, so one profiled party
gives both parties' numbers.

Fixed point: ring FM64 with 18 fraction bits unless told otherwise. SEMI2K here uses SPU's
default trusted-first-party Beaver triples, so its numbers count no offline cost; CHEETAH's
include its one-time setup.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import jax
import numpy as np

from .model import Config, forward

PROTOCOLS = ("semi2k", "cheetah", "aby3")
FIELD_BITS = 64
FRACTION_BITS = 18
LINK_RE = re.compile(r"Link details: total send bytes (\d+), recv bytes (\d+), send actions (\d+), recv actions (\d+)")


@dataclass
class CostReport:
    protocol: str
    parties: int
    mode: str  # "sim" | "procs"
    seconds: float
    bytes_sent: list[int]  # per party, by rank
    send_actions: list[int]  # per party: the rounds proxy
    max_abs_error: float
    field_bits: int = FIELD_BITS
    fraction_bits: int = FRACTION_BITS
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _libspu():
    import spu.libspu as libspu

    return libspu


def runtime_config(protocol: str, fraction_bits: int = FRACTION_BITS, profile: bool = True):
    libspu = _libspu()
    kinds = {"semi2k": libspu.ProtocolKind.SEMI2K, "cheetah": libspu.ProtocolKind.CHEETAH, "aby3": libspu.ProtocolKind.ABY3}
    if protocol not in kinds:
        raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
    cfg = libspu.RuntimeConfig(protocol=kinds[protocol], field=libspu.FieldType.FM64, fxp_fraction_bits=fraction_bits)
    cfg.enable_pphlo_profile = profile
    return cfg


def world_size(protocol: str) -> int:
    return 3 if protocol == "aby3" else 2


def compile_forward(cfg: Config, params: dict, x: np.ndarray):
    """SPU executable for ``forward(cfg, params, x)``; every input is secret."""
    import spu.utils.frontend as spu_fe

    libspu = _libspu()
    fn = lambda params, x: forward(cfg, params, x)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten((params, x))
    names = [f"in{i}" for i in range(len(flat))]
    executable, out_tree = spu_fe.compile(
        spu_fe.Kind.JAX, fn, (params, x), {}, names, [libspu.Visibility.VIS_SECRET] * len(flat),
        lambda outs: [f"out{i}" for i in range(len(outs))],
    )
    return executable, flat


@contextmanager
def captured_output():
    """Everything written to fds 1 and 2 (SPU logs from C++) while inside; yields a list that
    receives the captured text on exit."""
    sink: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield sink
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            sink.append(tmp.read().decode(errors="replace"))


def link_totals(log: str) -> tuple[int, int, int, int]:
    """(send bytes, recv bytes, send actions, recv actions) from SPU's profile log."""
    found = LINK_RE.findall(log)
    if not found:
        raise RuntimeError("SPU printed no link profile; was enable_pphlo_profile set?")
    return tuple(int(v) for v in found[-1])  # type: ignore[return-value]


def simulate(cfg: Config, params: dict, x: np.ndarray, protocol: str = "semi2k", fraction_bits: int = FRACTION_BITS):
    """All parties as threads of this process over SPU's in-memory link."""
    from spu import api as spu_api

    libspu = _libspu()
    n = world_size(protocol)
    rt_cfg = runtime_config(protocol, fraction_bits)
    with captured_output():  # SPU logs to stdout from C++; keep stdout for results
        executable, flat = compile_forward(cfg, params, x)
        io = spu_api.Io(n, rt_cfg)
        shares = [io.make_shares(np.asarray(v), libspu.Visibility.VIS_SECRET) for v in flat]
    desc = libspu.link.Desc()
    for rank in range(n):
        desc.add_party(f"party{rank}", f"thread{rank}")
    results: list = [None] * n
    errors: list = []

    def party(rank: int):
        try:
            conf = libspu.RuntimeConfig(rt_cfg)
            conf.enable_pphlo_profile = rank == 0
            rt = spu_api.Runtime(libspu.link.create_mem(desc, rank), conf)
            for name, share in zip(executable.input_names, shares):
                rt.set_var(name, share[rank])
            rt.run(executable)
            results[rank] = [rt.get_var(name) for name in executable.output_names]
        except BaseException as e:  # surfaced in the caller
            errors.append(e)

    with captured_output() as log:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=party, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    out = io.reconstruct([results[r][0] for r in range(n)])
    sent, recv, acts, racts = link_totals(log[0])
    notes = []
    if n == 2:
        bytes_sent, send_actions = [sent, recv], [acts, racts]
    else:
        bytes_sent, send_actions = [sent] + [None] * (n - 1), [acts] + [None] * (n - 1)
        notes.append("three-party simulation: only rank 0's link is profiled")
    if protocol == "semi2k":
        notes.append("SEMI2K with trusted-first-party Beaver triples: no offline cost counted")
    ref = np.asarray(forward(cfg, params, x))
    report = CostReport(
        protocol=protocol, parties=n, mode="sim", seconds=seconds, bytes_sent=bytes_sent,
        send_actions=send_actions, max_abs_error=float(np.abs(np.asarray(out) - ref).max()),
        fraction_bits=fraction_bits, notes=notes,
    )
    return report, np.asarray(out)


def head_costs(tokens: int, head_dim: int, protocol: str = "semi2k", kinds=("softmax", "relu_softmax", "scaling"), seed: int = 0) -> dict:
    """Measured cost of one attention head of each kind under SPU simulation, on (tokens,
    head_dim) inputs: {kind: {"seconds", "bytes", "send_actions"}} (bytes and actions of rank
    0). One block with one head and random weights; the projections and MLP are
    the same for every kind, so differences between kinds are the heads' own costs."""
    rng = np.random.default_rng(seed)
    d = head_dim
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    ln = {"g": np.ones(d, np.float32), "b": np.zeros(d, np.float32)}
    layer = {"ln1": ln, "ln2": ln, "w1": w(d, d), "b1": np.zeros(d, np.float32), "w2": w(d, d), "b2": np.zeros(d, np.float32)}
    for name in "qkvo":
        layer["w" + name], layer["b" + name] = w(d, d), np.zeros(d, np.float32)
    params = {"layers": [layer], "final_norm": ln}
    x = rng.standard_normal((1, tokens, d)).astype(np.float32)
    out = {}
    for kind in kinds:
        cfg = Config(hidden=d, layers=1, heads=1, head_dim=d, ffn=d, attention=kind)
        report, _ = simulate(cfg, params, x, protocol)
        out[kind] = {"seconds": report.seconds, "bytes": report.bytes_sent[0], "send_actions": report.send_actions[0]}
    return out
