"""Encrypted inference of a polynomial transformer (``stip.models.polyformer``) under CKKS.

    report, logits = run(plan, patches)     # ViT: (batch, tokens, patch_dim), the user's pixels
    report, logits = run(plan, ids)         # LM: (batch, n) prompts → next-token logits

The user (P3) encrypts its image patches, or its prompts' token and position embeddings,
packed token-major in the slots (``stip.he.packing``), and sends them with its public,
relinearisation and Galois keys; the server (P2) runs ``polyformer.plan_forward`` step for step
on ciphertexts with its plaintext weights, refreshing through the user when depth runs out;
the user decrypts the logits. Both sides live in this process but exchange only serialized
bytes, and the server never holds the secret key.
"""

from __future__ import annotations

import threading
import time
import os
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from . import ckks, packing


@dataclass
class CostReport:
    inputs: int  # images or prompts
    seconds: float  # wall time of the whole protocol, key generation to decryption
    server_seconds: float
    client_seconds: float
    bytes_up: int  # user → server: the input and every refreshed ciphertext
    bytes_down: int  # server → user: masked ciphertexts and the encrypted logits
    key_bytes: int  # public, relinearisation and Galois keys, sent once (not in bytes_up)
    refresh_rounds: int
    refreshed_ciphertexts: int
    max_abs_error: float  # against the plaintext polynomial model
    argmax_agreement: float
    ciphertexts: int = 0  # of inputs, each run through the walk on its own
    rotations: int = 0
    rotation_keys: int = 0  # Galois keys, in key_bytes
    peak_memory_bytes: int = 0  # resident, of this process (both parties) during the run
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_input(self) -> float:
        return self.seconds / self.inputs

    def to_json(self) -> dict:
        return {**asdict(self), "seconds_per_input": self.seconds_per_input}


class _PeakMemory:
    """The process's peak resident memory while the block runs, sampled every 20 ms (the
    kernel's lifetime peak, ru_maxrss, would count whatever ran in this process before)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # no procfs: the lifetime peak is the best there is
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def depth_needed(plan: dict) -> int:
    """Levels of the deepest chain the walk keeps between two refreshes: a layer's q, its
    product with a shifted k, a head's dot (a masked rotate-and-sum), σ and the product with v;
    or the MLP's w1, σ and w2."""
    return max(max(4 + ckks.poly_depth(len(layer["attn_poly"]) - 1), 2 + ckks.poly_depth(len(layer["mlp_poly"]) - 1))
               for layer in plan["layers"])


def encrypted_forward(s: ckks.Server, prog: packing.Program, x: ckks.Enc, inputs: int) -> list[ckks.Enc]:
    """``plan_forward`` on one ciphertext of ``inputs`` packed inputs: the ViT's class logits
    (one ciphertext), or each prompt's next-token logits (one ciphertext a prompt)."""
    L, dh = prog.layout, prog.head_dim
    if prog.patch is not None:  # the ViT's patch embedding is the server's; the LM's embedding the user's
        (x,) = s.ensure([x], 1)
        x = s.add_plain(s.linear(x, [prog.patch])[0], prog.pos)
    order = [d for d in prog.shifts if d >= 0] + sorted((d for d in prog.shifts if d < 0), reverse=True)
    for layer in prog.layers:
        depth = ckks.poly_depth(len(layer.attn_poly) - 1)
        (x,) = s.ensure([x], min(s.params.levels, 4 + depth))
        q, k, v = (s.add_plain(y, b) for y, b in zip(s.linear(x, [layer.q, layer.k, layer.v]), (layer.bq, layer.bk, layer.bv)))
        attn, k_d, v_d, at = None, k, v, 0
        for delta in order:  # query row i meets key row i - δ: k and v shifted by δ tokens, one at a time
            if delta == -1:
                k_d, v_d, at = k, v, 0
            while at != delta:
                step = -L.width if delta > at else L.width
                k_d, v_d, at = s.rotate(k_d, step), s.rotate(v_d, step), at + (1 if delta > at else -1)
            q, k_d = s.ensure([q, k_d], 2)
            dots = s.rotate_sum(s.multiply(q, k_d), 1, dh)  # a head's dot product, at its first feature
            (dots,) = s.ensure([dots], 1)
            scores = s.rotate_sum(s.multiply_plain(dots, prog.head_starts), -1, dh)  # ... and on all its features
            (scores,) = s.ensure([scores], depth + 1)
            weights = s.poly(scores, layer.attn_poly)
            (v_d,) = s.ensure([v_d], 2)
            v_m = s.multiply_plain(v_d, prog.value_masks[delta])  # the causal mask and 1/S(i + 1), on v's rows
            term = s.multiply(weights, v_m)
            attn = term if attn is None else s.add(attn, term)
        (attn,) = s.ensure([attn], 1)
        x = s.add_plain(s.add(x, s.linear(attn, [layer.o])[0]), layer.bo)
        depth = ckks.poly_depth(len(layer.mlp_poly) - 1)
        (x,) = s.ensure([x], min(s.params.levels, depth + 2))
        hidden = s.ensure([s.add_plain(u, b) for u, b in zip(s.linear(x, layer.w1), layer.b1)], depth)
        hidden = s.ensure([s.poly(u, layer.mlp_poly) for u in hidden], 1)
        out = None
        for u, w2 in zip(hidden, layer.w2):
            part = s.linear(u, [w2])[0]
            out = part if out is None else s.add(out, part)
        x = s.add_plain(s.add(x, out), layer.b2)
    if not prog.causal:  # mean pool (folded into the head) by a rotate-and-sum over the tokens
        (x,) = s.ensure([x], 1)
        return [s.add_plain(s.linear(s.rotate_sum(x, L.width, L.tokens), [prog.head])[0], prog.head_bias)]
    (x,) = s.ensure([x], 2)
    outs = []
    for select in prog.select[:inputs]:  # prompt p's last token, in every block, then the head
        last = s.rotate_sum(s.multiply_plain(x, select), L.width, L.slots // L.width)
        outs.append(s.add_plain(s.linear(last, [prog.head])[0], prog.head_bias))
    return outs


def run(plan: dict, inputs: np.ndarray, params: ckks.Params | None = None) -> tuple[CostReport, np.ndarray]:
    """``inputs``: a ViT's patches (batch, tokens, patch_dim), or an LM's token ids (batch, n),
    all prompts of one length."""
    from ..models.polyformer import embed_plan, plan_config, plan_forward

    causal = plan_config(plan).causal
    params = params or ckks.params_for(depth_needed(plan))
    x = embed_plan(plan, inputs, np.float64) if causal else np.asarray(inputs, np.float64)
    layout = packing.layout_for(plan, x.shape[1], params.slots)
    link = ckks.Link()

    def client(f, *args):
        c0 = time.perf_counter()
        out = f(*args)
        link.client_seconds += time.perf_counter() - c0
        return out

    with _PeakMemory() as memory:
        t0 = time.perf_counter()
        program = packing.compile_plan(plan, layout, x.shape[1])  # the server's; its rotations are public
        steps = program.steps()
        user = client(ckks.User, params, steps)
        public = client(user.public_keys)
        link.key_bytes = len(public)
        blobs = client(lambda: [user.encrypt(v) for v in layout.pack(x)])
        link.bytes_up += sum(map(len, blobs))
        s0, client_before = time.perf_counter(), link.client_seconds
        server = ckks.Server(public, params, lambda b: client(user.refresh, b), link)
        del public
        outs = []
        for i, blob in enumerate(blobs):
            count = min(layout.per_ciphertext, len(x) - i * layout.per_ciphertext)
            outs.append([server.dump(server.lower(e, 0)) for e in encrypted_forward(server, program, server.load(blob), count)])
        server_seconds = time.perf_counter() - s0 - (link.client_seconds - client_before)
        link.bytes_down += sum(len(b) for row in outs for b in row)
        classes = plan["head"].shape[1]
        if causal:
            logits = client(lambda: np.stack([user.decrypt(b)[:classes] for row in outs for b in row]))
        else:
            at = [layout.slot(p, 0, c) for p in range(layout.per_ciphertext) for c in range(classes)]
            logits = client(lambda: np.concatenate([user.decrypt(row[0])[at].reshape(-1, classes) for row in outs])[: len(x)])
        seconds = time.perf_counter() - t0
    ref = plan_forward(plan, inputs if causal else x)
    report = CostReport(
        inputs=len(x), seconds=seconds, server_seconds=server_seconds, client_seconds=link.client_seconds,
        bytes_up=link.bytes_up, bytes_down=link.bytes_down, key_bytes=link.key_bytes, refresh_rounds=link.refresh_rounds,
        refreshed_ciphertexts=link.refreshed_ciphertexts, max_abs_error=float(np.abs(logits - ref).max()),
        argmax_agreement=float((logits.argmax(-1) == ref.argmax(-1)).mean()), ciphertexts=len(blobs),
        rotations=server.rotations, rotation_keys=len(steps), peak_memory_bytes=memory.peak, params=params.describe(),
        notes=[f"{layout.per_ciphertext} {'prompts' if causal else 'images'} of {layout.tokens} tokens × {layout.width} slots a "
               f"ciphertext; {len(blobs)} ciphertext(s), each through the walk in turn: seconds are for all {len(x)}",
               f"client-aided refresh: masks uniform in ±{ckks.MASK_BOUND:g}, one round trip per refresh"],
    )
    return report, logits
