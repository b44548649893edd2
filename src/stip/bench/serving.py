"""Serving measurements: a share server's capacity under many users, and streamed loads.

    step = decode_step(chat.path())                      # [(op, rows)] of one decode step
    r = replay("127.0.0.1:7001", step, streams=16, seconds=10, pid=server_pid)
    r.tok_s, r.step_p50_ms, r.server_cpu_s_per_token, r.bytes_per_token

`replay` is many users at one server: each stream is its own connection, sending a decode
step's exact sequence of (op, rows) again and again, each request a fresh uniform share (the
keystream of `ring.uniform`), as a real P3's would be. The server cannot tell it from users;
what it measures is the server alone, without 16 users' P3 work on the same cores.

`sse_stream`, `load` and `summary`: N concurrent streamed completions against an OpenAI-style
server (vLLM, `stip proxy`), with TTFT and inter-token latency from the client's side.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# One chat prompt per stream, the same in every serving benchmark.
PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how photosynthesis works.",
    "List ideas for a rainy afternoon.", "What are the pros and cons of electric cars?",
    "Describe the water cycle.", "How do vaccines work?", "Tell me about the history of Rome.",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Explain recursion to a child.",
    "What is machine learning?", "Describe a walk in a forest.", "How does a bicycle stay upright?",
    "Write a letter to a friend.", "What makes a good teacher?", "Summarise the plot of Hamlet.",
]  # fmt: skip



def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and every live descendant (vLLM's engine runs in a child)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def decode_step(src, rounds: int = 2) -> list[tuple[str, int]]:
    """The matmuls (op, rows) one decode step of ``src`` asks a share server for, in order."""
    from ..models.blocks import from_hf
    from ..models.source import load_source
    from ..shares.walk import Walk

    cfg, params = from_hf(load_source(src))
    return [(op, 1) for op in Walk(cfg, params, None, rounds).ops()]


@dataclass
class Replay:
    streams: int
    seconds: float  # measured wall time
    steps: float  # decode steps all streams completed in the window (requests answered / requests a step): tokens
    tok_s: float
    step_p50_ms: float  # whole steps that began and ended in the window
    step_p95_ms: float
    bytes_per_token: float  # up + down, frames included, per stream-token
    server_cpu_s_per_token: float | None  # when the server's pid was given
    server_cpu_s: float | None
    generator_cpu_s: float  # this process: the users' side of the load, on the same cores

    def as_dict(self) -> dict:
        return asdict(self)


def _template(op: str, rows: int, width: int) -> tuple[bytes, int]:
    """A request frame for (op, rows) whose share bytes sit last: (frame, their length)."""
    from .. import wire

    blob = wire.encode({"x": torch.zeros(rows, width, dtype=torch.int64)}, {"op": op})
    return blob, rows * width * 8


def replay(address: str, step: list[tuple[str, int]], streams: int, seconds: float, *, warmup: float = 1.0,
           pid: int | None = None, trust=None, token: str | None = None, observe=None) -> Replay:  # fmt: skip
    """``streams`` connections replaying ``step`` for ``seconds`` after ``warmup`` seconds.
    ``observe(op, share)``: sees every share sent (the privacy test reads them)."""
    from .. import tls, wire
    from ..shares import protocol, ring

    host, port = protocol.parse_address(address)
    hello = wire.encode({}, {"op": protocol.HELLO, **({"token": token} if token else {})})

    def connect():
        sock = protocol.nodelay(tls.connect(host, port, trust, 60.0))
        protocol.send(sock, hello)
        _, meta = wire.decode(protocol.recv(sock))
        if "error" in meta:
            raise ConnectionError(f"the share server refused: {meta['error']}")
        return sock, {k: tuple(v) for k, v in json.loads(meta["ops"]).items()}

    first, ops = connect()
    missing = [op for op, _ in step if op not in ops]
    if missing:
        raise ValueError(f"the share server does not hold {missing[0]} (another model or schedule?)")
    frames = [(op, *_template(op, n, ops[op][0]), n * ops[op][1] * 8) for op, n in step]
    start, stop = threading.Event(), threading.Event()
    done, stamps, moved, errors = [0] * streams, [[] for _ in range(streams)], [0] * streams, []
    lock = threading.Lock()

    def user(i: int, sock) -> None:
        try:
            start.wait()
            while not stop.is_set():
                t0, counted = time.perf_counter(), measuring.is_set()
                for op, blob, n, out in frames:
                    share = ring.uniform(n // 8)
                    if observe is not None:
                        with lock:
                            observe(op, share)
                    sent = protocol.send(sock, blob[:-n] + share.tobytes())
                    reply = protocol.recv(sock)
                    if len(reply) < out:
                        raise RuntimeError(wire.decode(reply)[1].get("error", "a short answer"))
                    if measuring.is_set():  # requests answered in the window: steps to the fraction
                        done[i] += 1
                        moved[i] += sent + len(reply) + 8
                if counted and measuring.is_set():
                    stamps[i].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 — reported, and the run fails
            with lock:
                errors.append(f"stream {i}: {type(e).__name__}: {e}")
            stop.set()
        finally:
            sock.close()

    measuring = threading.Event()
    socks = [first] + [connect()[0] for _ in range(streams - 1)]
    threads = [threading.Thread(target=user, args=(i, s), daemon=True) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    start.set()
    time.sleep(warmup)
    cpu0, srv0, t0 = time.process_time(), cpu_seconds(pid) if pid else None, time.perf_counter()
    measuring.set()
    stop.wait(seconds)
    measuring.clear()
    wall, cpu1, srv1 = time.perf_counter() - t0, time.process_time(), cpu_seconds(pid) if pid else None
    stop.set()
    for t in threads:
        t.join(60.0)
    if errors:
        raise RuntimeError(f"the load failed: {errors[0]}")
    total = sum(done) / len(frames)  # decode steps, a step's requests being equal shares of it
    lat = [s for xs in stamps for s in xs]
    server = srv1 - srv0 if pid else None
    return Replay(streams, wall, total, total / wall, pct(lat, 50) * 1e3, pct(lat, 95) * 1e3,
                  sum(moved) / max(total, 1e-9), server / max(total, 1e-9) if pid else None, server, cpu1 - cpu0)  # fmt: skip


# Streamed completions (OpenAI-style servers) ------------------------------------------------


def summary(streams: list[dict], wall: float) -> dict:
    ttft = [s["ttft"] for s in streams]
    itl = [d for s in streams for d in s["itl"]]
    tokens = sum(s["tokens"] for s in streams)
    return {"streams": len(streams), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p95_ms": pct(ttft, 95) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p95_ms": pct(itl, 95) * 1e3,
            "bytes_per_token": sum(s.get("bytes", 0) for s in streams) / max(tokens, 1)}  # fmt: skip


async def sse_stream(http, url: str, body: dict, count) -> dict:
    """One streamed request; arrival times of its tokens (count(chunk) says how many a chunk
    holds), the ids when chunks carry them (vLLM's ``return_token_ids``), and bytes moved."""
    t0 = time.perf_counter()
    stamps, tokens, ids, size = [], 0, [], len(json.dumps(body))
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            size += len(line) + 1
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            n = count(chunk)
            for c in chunk.get("choices", []):
                ids += c.get("token_ids") or []
            if n:
                stamps.append(time.perf_counter())
                tokens += n
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": tokens, "ids": ids, "bytes": size}


async def load(url: str, bodies: list[dict], count) -> dict:
    """All ``bodies`` streamed at once: the summary, and each stream's result."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=max(64, len(bodies)))) as http:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(sse_stream(http, url, b, count) for b in bodies))
        return {**summary(list(streams), time.perf_counter() - t0), "each": list(streams)}

