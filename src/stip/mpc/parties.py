"""Real parties: one OS process per party, talking over TCP through SPU's own link layer.

Rank 0 is the model owner: its secret input is the weights. Rank 1 is the user: its secret
input is its embeddings, and it alone learns the output. Each party secret-shares its own
input locally and sends the other party that party's share over the link; at the end the
owner sends its share of the output to the user, who reconstructs it. Nothing but shares
crosses the link.

    report, out = run_parties(cfg, params, x, "semi2k")              # loopback
    python -m stip.mpc.parties --rank R --addresses A0,A1 --job J --secret F --out O
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import jax
import numpy as np

from .model import Config, forward
from .runner import FRACTION_BITS, CostReport, captured_output, compile_forward, link_totals, runtime_config

OWNER, USER = 0, 1


# --- what goes into the job files ------------------------------------------------------------------


def config_to_json(cfg: Config) -> dict:
    return asdict(cfg)


def config_from_json(d: dict) -> Config:
    d = dict(d)
    if not isinstance(d["attention"], str):
        # per head one kind, or (MPCViT rows) one kind per query row
        d["attention"] = tuple(tuple(h if isinstance(h, str) else tuple(h) for h in layer) for layer in d["attention"])
    if d.get("act_rows") is not None:
        d["act_rows"] = tuple(tuple(rows) for rows in d["act_rows"])
    # one tuple of coefficients, or one per layer
    d["poly_act"], d["poly_attn"] = (tuple(tuple(c) if isinstance(c, list) else c for c in d[k]) for k in ("poly_act", "poly_attn"))
    return Config(**d)


def _leaves(params: dict) -> list[np.ndarray]:
    return [np.asarray(v, np.float32) for v in jax.tree_util.tree_leaves(params)]


def _zeros_like_shapes(shapes: list[list[int]]) -> list[np.ndarray]:
    return [np.zeros(s, np.float32) for s in shapes]


# --- shares on the wire: a small framing, never pickle ----------------------------------------------


def pack_shares(shares) -> bytes:
    out = [struct.pack("<I", len(shares))]
    for s in shares:
        out.append(struct.pack("<I", len(s.meta)) + s.meta)
        out.append(struct.pack("<I", len(s.share_chunks)))
        out.extend(struct.pack("<Q", len(c)) + c for c in s.share_chunks)
    return b"".join(out)


def unpack_shares(blob: bytes):
    import spu.libspu as libspu

    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, blob, pos)
        pos += struct.calcsize(fmt)
        return v

    def raw(n):
        nonlocal pos
        if pos + n > len(blob):
            raise ValueError("truncated share message")
        pos += n
        return blob[pos - n : pos]

    shares = []
    for _ in range(take("<I")):
        s = libspu.Share()
        s.meta = raw(take("<I"))
        s.share_chunks = [raw(take("<Q")) for _ in range(take("<I"))]
        shares.append(s)
    return shares


# --- one party ---------------------------------------------------------------------------------------


def party_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="One SPU party of `stip mpc run --parties procs`.")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--addresses", required=True, help="comma-separated host:port of every party, by rank")
    ap.add_argument("--job", required=True, help="public job description (config, shapes, protocol)")
    ap.add_argument("--secret", required=True, help="this party's own secret input (.npz)")
    ap.add_argument("--out", required=True, help="where to write this party's result (.json, and .npy for the user)")
    args = ap.parse_args(argv)

    import spu.libspu as libspu
    from spu import api as spu_api

    job = json.loads(Path(args.job).read_text())
    cfg = config_from_json(job["config"])
    protocol, rank = job["protocol"], args.rank
    secret = np.load(args.secret)
    structure = jax.tree_util.tree_structure(json_to_tree(job["param_tree"]))  # the tree shape is public
    owner_leaves = [secret[f"w{i}"] for i in range(len(job["param_shapes"]))] if rank == OWNER else _zeros_like_shapes(job["param_shapes"])
    x = secret["x"] if rank == USER else np.zeros(job["x_shape"], np.float32)
    params = jax.tree_util.tree_unflatten(structure, owner_leaves)

    rt_cfg = runtime_config(protocol, job["fraction_bits"])
    executable, _ = compile_forward(cfg, params, x)
    io = spu_api.Io(2, rt_cfg)
    desc = libspu.link.Desc()
    for r, addr in enumerate(args.addresses.split(",")):
        desc.add_party(f"party{r}", addr)

    with captured_output() as log:
        link = libspu.link.create_brpc(desc, rank)
        peer = 1 - rank
        link.send(peer, b"ready")  # both processes up: start the clock together
        link.recv(peer)
        t0 = time.perf_counter()
        # Input sharing: each party shares its own input and sends the peer its part.
        mine = _leaves(params) if rank == OWNER else [x]
        shared = [io.make_shares(v, libspu.Visibility.VIS_SECRET) for v in mine]
        outgoing = pack_shares([s[1 - rank] for s in shared])
        if rank == OWNER:
            link.send(peer, outgoing)
            theirs = unpack_shares(link.recv(peer))
            inputs = [s[rank] for s in shared] + theirs
        else:
            theirs = unpack_shares(link.recv(peer))
            link.send(peer, outgoing)
            inputs = theirs + [s[rank] for s in shared]
        t_inputs = time.perf_counter() - t0
        rt = spu_api.Runtime(link, rt_cfg)
        for name, share in zip(executable.input_names, inputs):
            rt.set_var(name, share)
        rt.run(executable)
        out_share = rt.get_var(executable.output_names[0])
        # Only the user learns the output.
        if rank == OWNER:
            result_msg = pack_shares([out_share])
            link.send(peer, result_msg)
            out_bytes = len(result_msg)
        else:
            owner_share = unpack_shares(link.recv(peer))[0]
            out = io.reconstruct([owner_share, out_share])
            out_bytes = 0
        seconds = time.perf_counter() - t0
        link.stop_link()
    sent, _, actions, _ = link_totals(log[0])
    result = {
        "rank": rank,
        "seconds": seconds,
        "input_sharing_seconds": t_inputs,
        "run_bytes_sent": sent,
        "run_send_actions": actions,
        "io_bytes_sent": len(outgoing) + out_bytes,
        "io_send_actions": 1 + (rank == OWNER),  # the ready message is not counted
    }
    Path(args.out).write_text(json.dumps(result))
    if rank == USER:
        np.save(Path(args.out).with_suffix(".npy"), np.asarray(out))
    return 0


def tree_to_json(params: dict):
    if isinstance(params, dict):
        return {k: tree_to_json(v) for k, v in params.items()}
    if isinstance(params, list):
        return [tree_to_json(v) for v in params]
    return None  # a leaf


def json_to_tree(t):
    if isinstance(t, dict):
        return {k: json_to_tree(v) for k, v in t.items()}
    if isinstance(t, list):
        return [json_to_tree(v) for v in t]
    return np.zeros(0, np.float32)


# --- the orchestrator (tests, CLI, benchmarks) ---------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def run_parties(
    cfg: Config,
    params: dict,
    x: np.ndarray,
    protocol: str = "semi2k",
    *,
    fraction_bits: int = FRACTION_BITS,
    hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.1"),
    wrap: tuple[list[str], list[str]] = ([], []),
    timeout: float = 1800,
) -> tuple[CostReport, np.ndarray]:
    """Two party processes on ``hosts``; ``wrap`` prefixes each party's command (for
    example ``ip netns exec NS``)."""
    if protocol not in ("semi2k", "cheetah"):
        raise ValueError("real-party runs are two-party: semi2k or cheetah")
    leaves = _leaves(params)
    ports = free_ports(2)
    addresses = ",".join(f"{h}:{p}" for h, p in zip(hosts, ports))
    with tempfile.TemporaryDirectory(prefix="stip-mpc-") as tmp:
        tmp = Path(tmp)
        job = {
            "config": config_to_json(cfg),
            "protocol": protocol,
            "fraction_bits": fraction_bits,
            "param_shapes": [list(v.shape) for v in leaves],
            "param_tree": tree_to_json(params),
            "x_shape": list(x.shape),
        }
        (tmp / "job.json").write_text(json.dumps(job))
        np.savez(tmp / "owner.npz", **{f"w{i}": v for i, v in enumerate(leaves)})
        np.savez(tmp / "user.npz", x=np.asarray(x, np.float32))
        procs = []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for rank, secret in ((OWNER, "owner.npz"), (USER, "user.npz")):
            cmd = [*wrap[rank], sys.executable, "-m", "stip.mpc.parties", "--rank", str(rank), "--addresses", addresses,
                   "--job", str(tmp / "job.json"), "--secret", str(tmp / secret), "--out", str(tmp / f"party{rank}.json")]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env))
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise TimeoutError(f"MPC parties did not finish within {timeout:.0f} s")
        for rank, p in enumerate(procs):
            if p.returncode != 0:
                raise RuntimeError(f"party {rank} exited with {p.returncode}:\n{logs[rank][-3000:]}")
        results = [json.loads((tmp / f"party{r}.json").read_text()) for r in (OWNER, USER)]
        out = np.load(tmp / "party1.npy")
    ref = np.asarray(forward(cfg, params, x))
    notes = [f"input sharing and output delivery: {sum(r['io_bytes_sent'] for r in results):,} bytes, included"]
    if protocol == "semi2k":
        notes.append("SEMI2K with trusted-first-party Beaver triples: no offline cost counted")
    report = CostReport(
        protocol=protocol,
        parties=2,
        mode="procs",
        seconds=max(r["seconds"] for r in results),
        bytes_sent=[r["run_bytes_sent"] + r["io_bytes_sent"] for r in results],
        send_actions=[r["run_send_actions"] + r["io_send_actions"] for r in results],
        max_abs_error=float(np.abs(out - ref).max()),
        fraction_bits=fraction_bits,
        notes=notes,
    )
    return report, out


if __name__ == "__main__":
    sys.exit(party_main())
