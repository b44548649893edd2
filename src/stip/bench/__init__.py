"""`stip bench`: every protection mode on one model and one input, measured in one run.

    results = run(Settings(model=..., tokens=32, out=Path("bench-out")), progress=print)

Modes: ``plain`` (the plaintext model in process), ``stip`` (P3 embeds and permutes, P2 runs
the sealed model, P3 un-permutes; in process, bytes of the wire messages), ``shares`` (two
`stip share-server` processes on loopback do the weight matmuls on additive shares; P3, this
process, does the rest; bytes and rounds as sent; a second row with the masks prepared
offline, the online pass asking one server), ``mpc-semi2k`` and
``mpc-cheetah`` (two parties on SPU, simulation; bytes and send actions from SPU's link
profile), ``he`` (CKKS; polynomial ViT models only). The fast modes (plain, stip) alternate,
``repeats`` times each after a warm-up; MPC and HE run once. Every mode's output is compared
with the plaintext model's at the same depth. A mode that cannot run is reported as skipped
with the reason. ``report.write`` turns the result into results.json, report.md and plots.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .subjects import Skip, compare, load

MODES = ("plain", "stip", "shares", "mpc-semi2k", "mpc-cheetah", "he")
# Layers MPC runs on a Hugging Face model by default, so that the default bench of MiniLM ends
# in under 10 minutes on 2 cores (CHEETAH: ~90 s per MiniLM layer at 32 tokens there); --full
# runs every layer. The polynomial ViTs are small and always run whole.
DEFAULT_MPC_LAYERS = {"semi2k": None, "cheetah": 1}


@dataclass
class Settings:
    model: Path | None = None  # None: the embedded MiniLM
    out: Path = Path("bench-out")
    tokens: int = 32
    modes: tuple[str, ...] = MODES
    network: str = "none"  # "none" | "lan" | "wan": add the network time, estimated and measured through a relay
    full: bool = False
    repeats: int = 5
    batch: int = 1
    mpc_layers: int | None = None
    seed: int = 0
    shares_limbs: int = 2
    shares_rounds: int = 2  # round trips per layer: 2 (folded) or 4

    def __post_init__(self):
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
        if self.network not in ("none", "lan", "wan"):
            raise ValueError("--network must be none, lan or wan")
        if self.shares_limbs not in (2, 3):
            raise ValueError("--shares-limbs must be 2 or 3")
        if self.shares_rounds not in (2, 4):
            raise ValueError("--shares-rounds must be 2 or 4")
        if self.repeats < 1 or self.tokens < 1 or self.batch < 1:
            raise ValueError("--repeats, --tokens and --batch must be at least 1")


@dataclass
class Row:
    mode: str
    layers: int
    runs: int
    latency_s: float  # median over runs
    bytes_up: int | None  # user → cloud (MPC: party 0's sent bytes)
    bytes_down: int | None
    rounds: int | None  # round trips (MPC: send actions, an upper bound on rounds)
    max_abs_error: float
    top1_agreement: float
    plain_latency_s: float = 0.0  # the plaintext model at the same depth, same run
    ratio: float = 0.0  # latency_s / plain_latency_s
    network_latency_s: float | None = None  # latency + estimated transfer and round trips
    network_measured_s: float | None = None  # through `stip.relay` processes emulating the network
    peak_memory_bytes: int | None = None  # resident, where the mode measures it (HE)
    notes: list[str] = field(default_factory=list)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _mpc_layers(s: Settings, protocol: str, subject) -> int:
    full_depth = subject.layers
    if s.mpc_layers is not None:
        if not 1 <= s.mpc_layers <= full_depth:
            raise ValueError(f"--mpc-layers must lie in 1..{full_depth}")
        return s.mpc_layers
    if s.full or subject.kind != "hf" or DEFAULT_MPC_LAYERS[protocol] is None:
        return full_depth
    return min(DEFAULT_MPC_LAYERS[protocol], full_depth)


def run(s: Settings, progress: Callable[[str], None] = lambda _: None) -> dict:
    from .. import relay
    from ..mpc import netem

    progress("loading and sealing the model")
    subject = load(s.model, s.tokens, s.batch, s.seed)
    rows: list[Row] = []
    skipped: list[dict] = []
    notes: list[str] = []

    mpc_modes = [m for m in s.modes if m.startswith("mpc-")]
    wanted_mpc = {m: _mpc_layers(s, m[4:], subject) for m in mpc_modes}
    base, plain_out, stip_row = _plain_and_stip(subject, s, {subject.layers, *wanted_mpc.values()}, progress)
    if "plain" in s.modes:
        rows.append(Row("plain", subject.layers, s.repeats, base[subject.layers], None, None, 0, 0.0, 1.0))
    if stip_row is not None:
        rows.append(stip_row)

    if "shares" in s.modes:
        try:
            rows += _shares(subject, s, plain_out[subject.layers], progress)
        except Skip as e:
            skipped.append({"mode": "shares", "reason": str(e)})

    for m in mpc_modes:
        protocol, layers = m[4:], wanted_mpc[m]
        try:
            if isinstance(plain_out[layers], Skip):
                raise plain_out[layers]
            row = _mpc(subject, protocol, layers, plain_out[layers], progress)
            rows.append(row)
        except Skip as e:
            skipped.append({"mode": m, "reason": str(e)})
        except ImportError as e:
            skipped.append({"mode": m, "reason": f"SPU is not installed here ({e})"})
    if "he" in s.modes:
        try:
            rows.append(_he(subject, plain_out[subject.layers], progress))
        except Skip as e:
            skipped.append({"mode": "he", "reason": str(e)})
        except ImportError as e:
            skipped.append({"mode": "he", "reason": f"TenSEAL (whose SEAL binding HE runs on) is not installed here ({e})"})

    for row in rows:
        row.plain_latency_s = base[row.layers]
        row.ratio = row.latency_s / row.plain_latency_s
        if s.network != "none" and row.mode != "plain":
            profile = netem.PROFILES[s.network]
            up, down = row.bytes_up or 0, row.bytes_down or 0
            # a request and its answer cross one after the other; MPC's parties send at once
            both = [up, down] if row.mode.startswith("mpc-") else [up + down]
            row.network_latency_s = netem.estimate(row.latency_s, both, row.rounds or 0, profile)
            if row.mode == "stip":  # its one request and answer, as bytes through the emulated link
                progress(f"STIP's round trip through a relay ({s.network})")
                row.network_measured_s = row.latency_s + relay.round_trip(profile.rtt_s, profile.mbit_per_s * 1e6,
                                                                          row.bytes_up, row.bytes_down)  # fmt: skip
    if any(r.layers != subject.layers for r in rows):
        notes.append("rows with fewer layers than the model compare with, and divide by, the plaintext model "
                     "truncated to the same layers, measured in the same run")
    if s.network != "none":
        p = netem.PROFILES[s.network]
        notes.append(f"network estimate: latency + bytes up and down (MPC: the larger of the two parties') at {p.mbit_per_s:g} Mbit/s + rounds × "
                     f"{1e3 * p.rtt_s:g} ms RTT. Measured: through `stip.relay` processes that delay each direction by "
                     f"RTT/2 and pace it at {p.mbit_per_s:g} Mbit/s (no loss, no congestion window): shares mode runs "
                     "whole through one relay per server; STIP (in process) adds one round trip of its bytes through one")
    return {"settings": {**asdict(s), "model": str(s.model) if s.model else None, "out": str(s.out)},
            "subject": {"name": subject.name, "kind": subject.kind, "description": subject.describe(),
                        "layers": subject.layers, "tokens": subject.tokens, "batch": subject.batch},
            "rows": [asdict(r) for r in rows], "skipped": skipped, "notes": notes}


def _plain_and_stip(subject, s: Settings, depths: set[int], progress):
    """The plaintext model at every depth some mode needs, alternating with STIP, ``repeats``
    times after a warm-up. Returns (median plaintext seconds by depth, plaintext outputs by
    depth (or the Skip), STIP's row or None)."""
    plain_out: dict[int, object] = {}
    for d in sorted(depths):
        try:
            plain_out[d] = subject.plain(d)  # warm-up, and the reference output
        except Skip as e:
            plain_out[d] = e
    runnable = [d for d in sorted(depths) if not isinstance(plain_out[d], Skip)]
    plain_times: dict[int, list[float]] = {d: [] for d in runnable}
    stip_times, stip_run = [], subject.stip() if "stip" in s.modes else None  # warm-up
    for r in range(s.repeats):
        progress(f"plaintext and STIP, round {r + 1}/{s.repeats}")
        for d in runnable:
            plain_times[d].append(_timed(lambda d=d: subject.plain(d))[0])
        if stip_run is not None:
            t, stip_run = _timed(subject.stip)
            stip_times.append(t)
    base = {d: statistics.median(v) for d, v in plain_times.items()}
    if stip_run is None:
        return base, plain_out, None
    err, top1 = compare(stip_run.output, plain_out[subject.layers])
    row = Row("stip", subject.layers, s.repeats, statistics.median(stip_times), stip_run.bytes_up, stip_run.bytes_down, 1, err,
              top1, notes=["STIP: in process; bytes are the wire messages of one request and its answer"])
    return base, plain_out, row


def _shares(subject, s: Settings, reference, progress) -> list[Row]:
    """Two rows, each in its best set-up on one machine. Both servers online: one BLAS thread
    each, as they compute at the same time. Masks prepared offline (``Servers.prepare``): the
    online pass asks S2 alone, so the servers get every core; the offline cost is in the notes.
    With a network, each row is timed again through relays that emulate it."""
    from ..mpc import netem

    rows, profile = [], netem.PROFILES.get(s.network)
    for prepared, mode, threads in ((False, "shares", 1), (True, "shares-prepared", None)):
        progress(f"{mode}: starting two share servers ({threads or 'all'} BLAS thread(s) each) …")
        timed, last = {False: [], True: []}, None
        with subject.shares(threads, s.shares_limbs, s.shares_rounds, profile) as run:
            for far in (False, True) if profile is not None else (False,):
                run(prepared, far=far)  # warm-up
                for r in range(s.repeats):
                    progress(f"{mode}{f' through the emulated {s.network}' if far else ''}, round {r + 1}/{s.repeats}")
                    t0 = time.perf_counter()
                    got = run(prepared, far=far)
                    timed[far].append(time.perf_counter() - t0 - got[3])  # online only
                    last = got if not far else last
        times = timed[False]
        out, st, off, off_s = last
        err, top1 = compare(out, reference)
        seconds = statistics.median(times)
        server = 1 if prepared else 0
        note = (f"{mode}: {s.shares_rounds} rounds per layer; two share servers as processes on loopback ({s.shares_limbs} limbs, {threads or 'all'} BLAS thread(s) "
                f"each), P3 in this process on one thread, all on this machine's cores; of the {seconds * 1e3:.0f} ms, P3 waited "
                f"{st.wait_seconds * 1e3:.0f} ms for the servers (their matmuls: S1 {st.server_seconds[0] * 1e3:.0f} ms, "
                f"S2 {st.server_seconds[1] * 1e3:.0f} ms); bytes are S{server + 1}'s")
        if prepared:
            note += (f" (S1: none online); offline, before the input exists, S1 alone: {off_s * 1e3:.0f} ms, {off.rounds} rounds, "
                     f"{off.bytes_up[0]:,} B up, {off.bytes_down[0]:,} B down")
        else:
            note += " (S2's are the same)"
        rows.append(Row(mode, subject.layers, s.repeats, seconds, st.bytes_up[server], st.bytes_down[server], st.rounds, err,
                        top1, network_measured_s=statistics.median(timed[True]) if timed[True] else None, notes=[note]))  # fmt: skip
    return rows


def _mpc(subject, protocol: str, layers: int, reference, progress) -> Row:
    from ..mpc.runner import simulate

    cfg, params, x = subject.mpc(layers)
    slow = " (CHEETAH: about 90 s per MiniLM layer at 32 tokens on 2 cores)" if protocol == "cheetah" else ""
    progress(f"MPC {protocol.upper()} on SPU (simulation), {layers} layer(s) …{slow}")
    report, out = simulate(cfg, params, x, protocol)
    err, top1 = compare(out, reference)
    sent = [b for b in report.bytes_sent if b is not None]
    notes = list(report.notes) + ["MPC: two parties as threads of one process (SPU simulation): compute time, no network; "
                                  "rounds are the send actions of the busier party (an upper bound on rounds)"]
    return Row(f"mpc-{protocol}", layers, 1, report.seconds, sent[0], sent[1] if len(sent) > 1 else None,
               max(a for a in report.send_actions if a is not None), err, top1, notes=notes)


def _he(subject, reference, progress) -> Row:
    from ..he.runner import run as he_run

    plan, inputs = subject.he()
    progress(f"HE (CKKS) on {len(inputs)} input(s), packed in the slots …")
    report, logits = he_run(plan, inputs)
    err, top1 = compare(logits, reference)
    p = report.params
    notes = [f"HE: CKKS N={p['poly_modulus_degree']}, log q={p['log_q']}, 128-bit; {report.notes[0]}; {report.refresh_rounds} "
             f"client-aided refresh rounds, {report.rotations:,} rotations; public keys ({report.key_bytes:,} B with "
             f"{report.rotation_keys} rotation keys, once) not counted in bytes up; peak memory is the process's, both parties"]
    decrypted = subject.perplexity(logits)  # only polynomial subjects reach here: HF ones skip HE
    if decrypted is not None:
        notes.append(f"HE: next-token perplexity on the {len(inputs)} prompts {decrypted:,.2f} from the decrypted logits, "
                     f"{subject.perplexity(reference):,.2f} from plaintext")
    return Row("he", subject.layers, 1, report.seconds, report.bytes_up, report.bytes_down, 1 + report.refresh_rounds, err, top1,
               peak_memory_bytes=report.peak_memory_bytes, notes=notes)
