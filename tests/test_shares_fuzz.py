"""Shares mode: a live `stip share-server` process (token set) under a frame fuzz.

One real server process takes STIP_FUZZ_FRAMES frames (default 2,000) from a seeded RNG:
garbage bytes, truncated frames, framed non-safetensors payloads, safetensors with the wrong
dtype / rank / width / rows, unknown ops, absurd metadata, absurd length prefixes (up to
2^64 − 1) before and after the hello, megabytes before a hello, bad tokens, slow drips, and
300 idle connections at once over --max-connections 200. Meanwhile a good client (raw frames
on one long-lived connection, and `Servers` + `SharesModel` over two names of the server) is
answered exactly. Checked: the process never exits, every refusal is an error frame or a
closed socket, its threads come back to their baseline once the fuzz connections end, and its
resident memory grows by at most 50 MB."""

from __future__ import annotations

import json
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from stip import wire
from stip.models.source import load_source
from stip.serve.process import ServerProcess
from stip.shares import Servers, SharesModel, ShareServer, protocol, ring

import harness

FRAMES = int(os.environ.get("STIP_FUZZ_FRAMES", "2000"))  # frames sent in all; make test: 2,000
TOKEN = "s3cret"
HELLO_SECONDS = 1.0  # the server's --hello-seconds: idle strangers are cut after this
MAX_CONNECTIONS = 200
MAX_ROWS = 64
IDLE = 300  # idle connections open at once, over MAX_CONNECTIONS
WORKERS = 16  # fuzz connections in flight at once
RSS_MB = 50
TINY = dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=16, batch=1, seq=2, lengths=[2], seed=0)
ALOUD = {"length", "framed-not-safetensors", "request-before-hello", "bad-token"}  # refused with an error frame
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int16, torch.int8,
          torch.uint8, torch.bool]  # fmt: skip


# --- the server, its vital signs, a good client ----------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = tmp_path_factory.mktemp("shares-fuzz")
    harness.llama_case(TINY).model.save_pretrained(d / "model")
    (d / "token").write_text(TOKEN + "\n")
    args = ("--threads", "1", "--max-connections", str(MAX_CONNECTIONS), "--max-rows", str(MAX_ROWS),
            "--hello-seconds", str(HELLO_SECONDS))  # fmt: skip
    with ServerProcess(d / "model", *args, command="share-server", token_file=d / "token", timeout=300) as srv:
        yield srv, d / "model"


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _threads(pid: int) -> int:
    return _status(pid, "Threads")


def _rss_mb(pid: int) -> float:
    return _status(pid, "VmRSS") / 1024


def _settle(pid: int, at_most: int | None = None, seconds: float = 15.0) -> int:
    """The server's thread count once it stops falling (or is ≤ ``at_most``)."""
    deadline, last, since = time.monotonic() + seconds, _threads(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        n = _threads(pid)
        if at_most is not None and n <= at_most:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif at_most is None and time.monotonic() - since > 1.0:
            return n
    return _threads(pid)


def _log(srv) -> str:
    for _ in range(10):
        try:
            return srv.stderr
        except RuntimeError:  # the pump appended while we read
            time.sleep(0.01)
    return srv.stderr


def _alive(srv) -> None:
    assert srv.proc.poll() is None, f"the share server exited with {srv.proc.returncode}: {_log(srv)[-3000:]}"
    log = _log(srv)
    assert "Traceback" not in log and "Exception in thread" not in log, log[-3000:]


def _off_by(got: np.ndarray, want: np.ndarray) -> int:
    d = (got.view(np.uint64) - want.view(np.uint64)).astype(np.uint64)  # mod 2^64
    return int(np.minimum(d, -d).max(initial=0))


class Reference:
    """The server's matmuls, computed here from the same folder."""

    def __init__(self, folder):
        self.model = load_source(folder)
        self.ops = ShareServer.from_model(self.model).ops
        self.names = sorted(self.ops)

    def check(self, name: str, x: np.ndarray, tensors: dict, meta: dict) -> None:
        assert "error" not in meta, meta
        w = self.ops[name]
        y = tensors["y"].numpy()
        assert y.shape == (x.shape[0], w.shape[1]) and y.dtype == np.int64
        assert _off_by(y, ring.matmul(x, w)) <= ring.error_bound(w)


class Good:
    """One long-lived authenticated connection, asked a correct matmul between fuzz batches."""

    def __init__(self, address: tuple[str, int], ref: Reference, rng: np.random.Generator):
        self.ref, self.rng, self.answered = ref, rng, 0
        self.sock = protocol.nodelay(socket.create_connection(address, timeout=30))
        protocol.send(self.sock, _hello())
        _, meta = wire.decode(protocol.recv(self.sock))
        assert "error" not in meta and json.loads(meta["ops"]) == {k: list(w.shape) for k, w in ref.ops.items()}
        assert int(meta["max_rows"]) == MAX_ROWS

    def check(self, times: int = 1) -> None:
        for _ in range(times):
            name = self.ref.names[self.rng.integers(len(self.ref.names))]
            x = _ints(self.rng, (int(self.rng.integers(1, MAX_ROWS + 1)), self.ref.ops[name].shape[0]))
            protocol.send(self.sock, wire.encode({"x": torch.from_numpy(x)}, {"op": name}))
            self.ref.check(name, x, *wire.decode(protocol.recv(self.sock)))
            self.answered += 1


def _ints(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(-(2**63), 2**63, shape, dtype=np.int64, endpoint=False)


# --- what the fuzz sends ----------------------------------------------------------------------------------


def _hello(token: str | None = TOKEN, **meta) -> bytes:
    return wire.encode({}, {"op": "hello", **({} if token is None else {"token": token}), **meta})


def _frame(blob: bytes) -> bytes:
    return struct.pack("<Q", len(blob)) + blob


def _st(header, data: bytes = b"") -> bytes:
    """A hand-made safetensors message: ``header`` a dict, or raw header bytes."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def _text(rng: np.random.Generator, n: int) -> str:
    pools = ["abcdefghijklmnopqrstuvwxyz0123456789._-", "ĥéłłø wörld ✓ 秘密 🔑 \u202e\u200b", "\x00\x01\x7f\n\t\"\\{}[]"]
    pool = pools[rng.integers(len(pools))]
    return "".join(pool[i] for i in rng.integers(0, len(pool), n))


def _not_safetensors(rng: np.random.Generator, small: bool) -> tuple[str, bytes]:
    """A payload that is not a well-formed request message."""
    cap = 3000 if small else 60000
    kind = [
        "random", "empty", "short", "json", "header-too-long", "header-not-json", "header-list", "deep-nesting",
        "bad-dtype", "offsets", "overflow-shape", "negative-shape", "metadata-not-strings", "huge-header", "utf8",
    ][rng.integers(15)]  # fmt: skip
    if kind == "random":
        return kind, rng.bytes(int(rng.integers(1, cap)))
    if kind == "empty":
        return kind, b""
    if kind == "short":
        return kind, rng.bytes(int(rng.integers(1, 8)))
    if kind == "json":
        return kind, json.dumps({"op": "0.qkv", "x": [[1, 2, 3]]}).encode()
    if kind == "header-too-long":
        return kind, struct.pack("<Q", int(rng.integers(2**16, 2**63))) + rng.bytes(int(rng.integers(0, 64)))
    if kind == "header-not-json":
        return kind, _st(b"{not json" + rng.bytes(int(rng.integers(0, 100))))
    if kind == "header-list":
        return kind, _st([1, 2, {"x": 3}])
    if kind == "deep-nesting":
        depth = int(rng.integers(500, 1400 if small else 20000))
        return kind, _st(b"[" * depth + b"]" * depth)
    if kind == "bad-dtype":
        dt = ["I65", "F8_E4M3", "C64", "", "i64", "STRING", "U64", "BF16"][rng.integers(8)]
        return kind, _st({"x": {"dtype": dt, "shape": [1, 8], "data_offsets": [0, 64]}}, bytes(64))
    if kind == "offsets":
        a, b = (int(v) for v in rng.integers(-(2**40), 2**40, 2))
        return kind, _st({"x": {"dtype": "I64", "shape": [1, 8], "data_offsets": [a, b]}}, bytes(64))
    if kind == "overflow-shape":
        shape = [2**62, 2**62] if rng.integers(2) else [2**32, 2**32, 2**32]
        return kind, _st({"x": {"dtype": "I64", "shape": shape, "data_offsets": [0, 64]}}, bytes(64))
    if kind == "negative-shape":
        return kind, _st({"x": {"dtype": "I64", "shape": [-1, 8], "data_offsets": [0, 64]}}, bytes(64))
    if kind == "metadata-not-strings":
        return kind, _st({"__metadata__": {"op": [1, {"a": None}], "token": 5}})
    if kind == "huge-header":  # before hello: over HELLO_FRAME; after: over wire.MAX_HEADER, under the frame limit
        return kind, _st({"__metadata__": {"op": "0.qkv", "pad": "z" * (cap if small else wire.MAX_HEADER + 100)}})
    return kind, b"\xff\xfe" + _text(rng, int(rng.integers(1, 200))).encode("utf-8", "surrogatepass")


def _bad_request(rng: np.random.Generator, ref: Reference, small: bool) -> tuple[str, bytes, tuple | None]:
    """(kind, message, expect): ``expect`` is None when the server must answer an error, else
    (op, x) when the message is a correct matmul in absurd clothing and must be answered so."""
    name = ref.names[rng.integers(len(ref.names))]
    width = ref.ops[name].shape[0]
    rows = int(rng.integers(1, 4 if small else MAX_ROWS + 1))
    kind = ["dtype", "rank", "width", "zero-rows", "too-many-rows", "unknown-op", "no-op", "no-x", "extra-tensor",
            "metadata", "not-safetensors", "bad-hello"][rng.integers(12)]  # fmt: skip
    x = torch.from_numpy(_ints(rng, (rows, width)))
    if kind == "dtype":
        dt = DTYPES[rng.integers(len(DTYPES))]
        t = torch.randn(rows, width).to(dt) if dt.is_floating_point else torch.randint(0, 2, (rows, width)).to(dt)
        return kind, wire.encode({"x": t}, {"op": name}), None
    if kind == "rank":
        shape = [(), (width,), (1, rows, width), (1, 1, rows, width)][rng.integers(4)]
        return kind, wire.encode({"x": torch.zeros(shape, dtype=torch.int64)}, {"op": name}), None
    if kind == "width":
        w = int(rng.choice([0, 1, width - 1, width + 1, 3 * width]))
        return kind, wire.encode({"x": torch.zeros(rows, w, dtype=torch.int64)}, {"op": name}), None
    if kind == "zero-rows":
        return kind, wire.encode({"x": torch.zeros(0, width, dtype=torch.int64)}, {"op": name}), None
    if kind == "too-many-rows":
        n = MAX_ROWS + int(rng.integers(1, 3 if small else 200))
        return kind, wire.encode({"x": torch.zeros(n, width, dtype=torch.int64)}, {"op": name}), None
    if kind == "unknown-op":
        op = [_text(rng, int(rng.integers(0, 40))), name.upper(), name + " ", f"{name}\x00", "9.qkv", "HELLO",
              "__proto__", _text(rng, 500 if small else 9000)][rng.integers(8)]  # fmt: skip
        return kind, wire.encode({"x": x}, {"op": op}), None
    if kind == "no-op":
        return kind, wire.encode({"x": x}, {"opp": name}), None
    if kind == "no-x":
        return kind, wire.encode({}, {"op": name}), None
    if kind == "extra-tensor":
        return kind, wire.encode({"x": x, "w": torch.zeros(width, 2, dtype=torch.int64)}, {"op": name}), None
    if kind == "metadata":  # a correct request, absurdly dressed: it must be answered
        n = int(rng.integers(1, 20 if small else 400))
        junk = {_text(rng, 12) + str(i): _text(rng, int(rng.integers(0, 40 if small else 120))) for i in range(n)}
        junk.pop("op", None)
        while len(json.dumps(junk)) > wire.MAX_HEADER - 4096:  # absurd, yet a message the server must read
            junk.popitem()
        return kind, wire.encode({"x": x}, {**junk, "op": name}), (name, x.numpy())
    if kind == "not-safetensors":
        return (*_not_safetensors(rng, small), None)
    token = [TOKEN + "x", TOKEN[:-1], TOKEN.upper(), "", "s3crét", "秘密", TOKEN + "\x00", " " + TOKEN][rng.integers(8)]
    return kind, _hello(token), None  # a bad hello on an authenticated connection: an error, then closed


def _prehello_case(rng: np.random.Generator, ref: Reference) -> tuple[str, list[bytes], str]:
    """One stranger's connection: (category, what it sends, how it ends: "shut" half-closes,
    "abort" resets, "open" waits for the server to hang up)."""
    mode = ["shut"] * 18 + ["abort", "open"]
    mode = mode[rng.integers(len(mode))]
    cat = ["garbage", "truncated", "framed-not-safetensors", "request-before-hello", "bad-token", "length",
           "length"][rng.integers(7)]  # fmt: skip
    if cat == "garbage":
        return cat, [rng.bytes(int(rng.integers(1, 6000)))], mode
    if cat == "truncated":
        blob = _frame(_hello() if rng.integers(2) else _bad_request(rng, ref, True)[1])
        return cat, [blob[: int(rng.integers(1, len(blob)))]], "open" if mode == "open" else ["shut", "abort"][rng.integers(2)]
    if cat == "framed-not-safetensors":
        return cat, [_frame(_not_safetensors(rng, True)[1])], mode
    if cat == "request-before-hello":
        return cat, [_frame(_bad_request(rng, ref, True)[1])], mode
    if cat == "bad-token":
        token = [None, "", TOKEN + "!", TOKEN[1:], TOKEN.upper(), "s3crét", "🔑" * 20, TOKEN + "\x00", "\u202e" + TOKEN,
                 _text(rng, 3000), "null", json.dumps([TOKEN]), json.dumps({"token": TOKEN})][rng.integers(13)]  # fmt: skip
        return cat, [_frame(_hello(token))], mode
    mode = "open" if mode == "open" else "shut"  # an absurd length is refused aloud: read it
    n = [protocol.HELLO_FRAME + 1, 2**16, 2**32, 2**63, 2**64 - 1, int(rng.integers(protocol.HELLO_FRAME + 1, 2**63))][rng.integers(6)]
    return "length", [struct.pack("<Q", n) + rng.bytes(int(rng.integers(0, 64)))], mode


# --- one fuzz connection, and what may come back -----------------------------------------------------------


def _errors_only(data: bytes, how: str) -> int:
    """``data`` must be whole frames, each an error message; the number of frames."""
    frames, at = 0, 0
    while at < len(data):
        assert len(data) - at >= 8, f"a partial frame came back ({how}): {data[at:at + 64]!r}"
        (n,) = struct.unpack("<Q", data[at : at + 8])
        blob = data[at + 8 : at + 8 + n]
        assert len(blob) == n, f"a partial frame came back ({how}): {len(blob)} of {n} bytes"
        _, meta = wire.decode(blob)
        assert "error" in meta, f"a refusal answered without an error: {meta}"
        frames, at = frames + 1, at + 8 + n
    return frames


def _drain(sock: socket.socket, seconds: float) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (bytes, "eof" | "reset" | "timeout")."""
    sock.settimeout(seconds)
    chunks = []
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return b"".join(chunks), "eof"
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    except (TimeoutError, socket.timeout):
        return b"".join(chunks), "timeout"


def _abort(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
    sock.close()


def _stranger(address, chunks: list[bytes], mode: str) -> int:
    """One fuzz connection that never says a good hello: the error frames it got back."""
    sock = socket.create_connection(address, timeout=10)
    try:
        try:
            for c in chunks:
                sock.sendall(c)
        except (BrokenPipeError, ConnectionResetError):  # the server refused and hung up mid-send
            pass
        if mode == "abort":
            _abort(sock)
            return 0
        if mode == "shut":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        data, how = _drain(sock, HELLO_SECONDS + 10)
        assert how != "timeout", f"the server neither answered nor hung up ({len(data)} bytes back)"
        return _errors_only(data, how)
    finally:
        sock.close()


# --- the run -----------------------------------------------------------------------------------------------


def test_a_live_share_server_survives_the_frame_fuzz_and_keeps_answering(live):
    srv, folder = live
    t_start = time.monotonic()
    pid, address = srv.proc.pid, protocol.parse_address(srv.url)
    rng = np.random.default_rng(22)
    ref = Reference(folder)
    good = Good(address, ref, np.random.default_rng(7))
    urls = [srv.url, srv.url.replace("127.0.0.1", "localhost")]
    conn = Servers(urls, token=TOKEN)
    p3 = SharesModel(ref.model, conn)
    prompt = [1, 2, 3]
    with torch.no_grad():  # the plain model's greedy continuation: what P3 must get every time
        ids = list(prompt)
        for _ in range(3):
            ids.append(int(ref.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    want = ids[len(prompt) :]

    def good_checks(times: int = 2) -> None:
        good.check(times)
        assert p3.generate(prompt, 3, stop_at_eos=False).token_ids == want
        _alive(srv)

    sent: Counter[str] = Counter()  # frames sent, by category
    got: Counter[str] = Counter()  # error frames back, by category
    kinds: Counter[str] = Counter()  # the authenticated bad requests, by kind
    conns: Counter[str] = Counter()  # connections that send no whole frame
    pool = ThreadPoolExecutor(WORKERS)

    def strangers(n: int, tag: str = "") -> None:
        cases = [_prehello_case(rng, ref) for _ in range(n)]
        for start in range(0, n, 120):  # < 200 connections a batch: the server's log tail holds them all
            batch = cases[start : start + 120]
            for (cat, _, mode), errors in zip(batch, pool.map(lambda c: _stranger(address, c[1], c[2]), batch)):
                sent[tag + cat] += 1
                got[tag + cat] += errors
                if cat in ALOUD and mode != "abort":  # a whole frame before hello: one error, then closed
                    assert errors == 1, cat
                assert errors <= 1, cat  # one frame before a hello, one answer at most
            good_checks()

    def bulk(n: int) -> None:  # a frame claiming 256 MiB before any hello, a few MB of it sent
        for _ in range(n):
            errors = _stranger(address, [struct.pack("<Q", 256 << 20)] + [rng.bytes(1 << 20)] * 3, "shut")
            sent["bulk-before-hello"] += 1
            got["bulk-before-hello"] += errors
        good_checks()

    # warm-up: a little of everything, then the baseline
    strangers(60, "warm-up ")
    bulk(1)
    authed(address, ref, rng, 40, sent, got, kinds, good_checks, tag="warm-up ")
    good_checks()
    base_threads = _settle(pid)
    base_rss = _rss_mb(pid)

    # the unauthenticated part: strangers, megabytes before hello, idle hordes, slow drips
    n_strangers = max(FRAMES * 2 // 5, 100)
    strangers(n_strangers)
    bulk(4)
    peak = idle_horde(address, pid, good, conns)
    drips(address, sent)
    good_checks()
    assert _settle(pid, base_threads + 3) <= base_threads + 3
    unauth_rss = _rss_mb(pid)

    # the authenticated part: bad requests on kept connections, then the frames that end one
    left = FRAMES - sum(v for k, v in sent.items() if not k.startswith("warm-up "))
    authed(address, ref, rng, max(left, 100), sent, got, kinds, good_checks)
    good_checks()
    end_threads = _settle(pid, base_threads + 3)
    end_rss = _rss_mb(pid)
    pool.shutdown()
    conn.close()
    good.sock.close()
    seconds = time.monotonic() - t_start

    report = {
        "frames": sum(v for k, v in sent.items() if not k.startswith("warm-up ")), "sent": dict(sent),
        "error frames back": dict(got), "authed kinds": dict(kinds), "idle connections": dict(conns),
        "threads": [base_threads, peak, end_threads], "good answers": good.answered, "seconds": round(seconds, 1),
        "rss MB": [round(base_rss, 1), round(unauth_rss, 1), round(end_rss, 1)],  # baseline, unauthenticated, end
    }  # fmt: skip
    print("share-server fuzz:", json.dumps(report, indent=1))
    _alive(srv)
    assert report["frames"] >= FRAMES
    assert got["bulk-before-hello"] == sent["bulk-before-hello"]  # refused aloud, unread
    assert end_threads <= base_threads + 3, report
    assert unauth_rss - base_rss <= RSS_MB and end_rss - base_rss <= RSS_MB, report


def authed(address, ref: Reference, rng, n: int, sent: Counter, got: Counter, kinds: Counter, between, tag: str = "") -> None:
    """``n`` frames from authenticated fuzzers: bad requests, each answered with an error on a
    kept connection (a correct one in absurd metadata answered correctly), and, one per
    connection, what ends a connection: a bad hello, an absurd length, a cut frame, raw garbage.
    ``between()`` after each fuzz connection."""
    while n > 0:
        between()
        sock = protocol.nodelay(socket.create_connection(address, timeout=10))
        protocol.send(sock, _hello())
        assert "error" not in wire.decode(protocol.recv(sock))[1]
        try:
            for _ in range(min(int(rng.integers(20, 200)), n)):
                kind, blob, expect = _bad_request(rng, ref, small=False)
                if kind == "bad-hello":
                    continue  # it ends the connection: below
                protocol.send(sock, blob)
                tensors, meta = wire.decode(protocol.recv(sock))
                if expect is None:
                    assert "error" in meta and "over the limit" not in meta["error"], (kind, meta)
                    got[tag + "authed-bad-request"] += 1
                else:
                    ref.check(*expect, tensors, meta)
                sent[tag + "authed-bad-request"] += 1
                kinds[kind] += 1
                n -= 1
            end = ["bad-hello", "length", "truncated", "garbage"][rng.integers(4)]
            if end == "bad-hello":
                protocol.send(sock, _hello(TOKEN + "?"))
                assert "unauthorised" in wire.decode(protocol.recv(sock))[1]["error"]
                data, how = _drain(sock, HELLO_SECONDS + 10)  # a failed hello ends the connection
                assert how != "timeout" and _errors_only(data, how) == 0
            elif end == "length":
                limit = MAX_ROWS * max(w.shape[0] for w in ref.ops.values()) * 8 + wire.MAX_HEADER + 8
                claim = [limit + 1, 2**32, 2**48, 2**63, 2**64 - 1][rng.integers(5)]
                sock.sendall(struct.pack("<Q", claim) + rng.bytes(int(rng.integers(0, 1000))))
                data, how = _drain(sock, 10)
                assert how != "timeout" and _errors_only(data, how) == 1 and b"over the limit" in data
                got[tag + "authed-length"] += 1
            else:
                blob = _frame(_bad_request(rng, ref, False)[1]) if end == "truncated" else rng.bytes(int(rng.integers(1, 20000)))
                sock.sendall(blob[: int(rng.integers(1, len(blob)))] if end == "truncated" else blob)
                sock.shutdown(socket.SHUT_WR)
                data, how = _drain(sock, 10)
                assert how != "timeout"
                got[tag + f"authed-{end}"] += _errors_only(data, how)
            sent[tag + f"authed-{end}"] += 1
            n -= 1
        finally:
            sock.close()


def idle_horde(address, pid: int, good: Good, conns: Counter) -> int:
    """IDLE connections at once, half sending nothing and half half a length: the server holds
    at most MAX_CONNECTIONS, closes the rest on accept, and hangs up on every one it held once
    HELLO_SECONDS pass, with nothing sent back. The good connection is answered meanwhile.
    The server's peak thread count."""
    sel = selectors.DefaultSelector()
    socks, opened, ended = [], [], {}
    for i in range(IDLE):
        s = socket.create_connection(address, timeout=10)
        if i % 2:
            s.sendall(b"\x10\x00\x00\x00")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        socks.append(s)
        opened.append(time.monotonic())
    conns["idle, half a length"] += IDLE // 2
    conns["idle, nothing"] += IDLE - IDLE // 2
    base, peak, checked = _threads(pid), _threads(pid), False
    deadline = time.monotonic() + HELLO_SECONDS + 15
    while len(ended) < IDLE and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            i = key.data
            try:
                data = socks[i].recv(1 << 16)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            assert data == b"", f"an idle connection got {data[:64]!r}"
            ended[i] = time.monotonic() - opened[i]
            sel.unregister(socks[i])
        peak = max(peak, _threads(pid))
        if not checked:  # while the server is full
            good.check(3)
            checked = True
    sel.close()
    for s in socks:
        s.close()
    assert len(ended) == IDLE, f"{IDLE - len(ended)} idle connections still open {HELLO_SECONDS + 15} s on"
    refused = sum(t < HELLO_SECONDS * 0.9 for t in ended.values())  # one the server held lives ≥ HELLO_SECONDS
    assert refused >= IDLE - MAX_CONNECTIONS, (refused, sorted(ended.values())[:: IDLE // 10])
    assert max(ended.values()) <= HELLO_SECONDS + 2  # hung up on time, 200 at once
    assert peak <= base + MAX_CONNECTIONS + 3  # a thread per connection held, never more
    conns["idle, closed on accept"] += refused
    return peak


def drips(address, sent: Counter) -> None:
    """Slow drips: a hello, or just its length, a byte at a time is cut HELLO_SECONDS after
    accept however the bytes are spaced; a hello dripped faster than that is answered."""
    hello = _frame(_hello())
    fast = HELLO_SECONDS * 0.3 / len(hello)
    plans = [("drip-hello", hello, 0.15), ("drip-length", hello[:8], HELLO_SECONDS * 0.6),
             ("drip-length", hello[:8], HELLO_SECONDS * 0.9), ("drip-in-time", hello, fast)] * 2  # fmt: skip
    results: dict[int, tuple] = {}

    def drip(i: int, data: bytes, gap: float) -> None:
        try:
            t0 = time.monotonic()
            dripped(i, data, gap, t0, socket.create_connection(address, timeout=10))
        except Exception as e:  # reported below, on the test's thread
            results[i] = ("failed", repr(e))

    def dripped(i: int, data: bytes, gap: float, t0: float, sock: socket.socket) -> None:
        with sock:
            for b in data:
                try:
                    sock.sendall(bytes([b]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([sock], [], [], gap)[0]:  # the server spoke or hung up
                    break
            if data is hello and gap == fast:
                results[i] = ("answered", time.monotonic() - t0, wire.decode(protocol.recv(sock))[1])
                return
            back, how = _drain(sock, HELLO_SECONDS + 10)
            results[i] = ("cut", time.monotonic() - t0, how, back)

    threads = [threading.Thread(target=drip, args=(i, d, g)) for i, (_, d, g) in enumerate(plans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (cat, _, _) in enumerate(plans):
        r = results.get(i, ("failed", "no result"))
        sent[cat] += 1
        if cat == "drip-in-time":
            assert r[0] == "answered" and "error" not in r[2], r
        else:
            assert r[0] == "cut" and r[2] != "timeout" and _errors_only(r[3], r[2]) == 0, r
            assert r[1] <= HELLO_SECONDS + 0.5, f"{cat}: a stranger dripping bytes held a connection {r[1]:.1f} s"
