"""Encrypted inference of a polynomial transformer (``stip.models.polyformer``) under CKKS.

    report, logits = run(plan, patches)     # ViT: (batch, tokens, patch_dim), the user's pixels
    report, logits = run(plan, ids)         # LM: (batch, n) prompts → next-token logits

The user (P3) encrypts its image patches, or its prompts' token and position embeddings, and
sends them with its public context; the server (P2) runs ``polyformer.plan_forward`` op for op
on ciphertexts with its plaintext weights, refreshing through the user when depth runs out;
the user decrypts the logits. Both sides live in this process but exchange only serialized
bytes, and the server's context has no secret key.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import ckks


@dataclass
class CostReport:
    inputs: int  # images or prompts, packed in the slots of one batch
    seconds: float  # wall time of the whole protocol, encryption to decryption
    server_seconds: float
    client_seconds: float
    bytes_up: int  # user → server: the input and every refreshed ciphertext
    bytes_down: int  # server → user: masked ciphertexts and the encrypted logits
    key_bytes: int  # public context, sent once (not in bytes_up)
    refresh_rounds: int
    refreshed_ciphertexts: int
    max_abs_error: float  # against the plaintext polynomial model
    argmax_agreement: float
    params: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds_per_input(self) -> float:
        return self.seconds / self.inputs

    def to_json(self) -> dict:
        return {**asdict(self), "seconds_per_input": self.seconds_per_input}


def depth_needed(plan: dict) -> int:
    """The deepest single step: a polynomial, or one product."""
    degrees = [len(layer[k]) - 1 for layer in plan["layers"] for k in ("attn_poly", "mlp_poly")]
    return max([ckks.poly_depth(d) for d in degrees] + [2])


def encrypted_forward(server: ckks.Server, plan: dict, x: ckks.Enc) -> ckks.Enc:
    from ..models.polyformer import attention_mask, plan_config

    s, cfg = server, plan_config(plan)
    if not cfg.causal:  # the ViT's patch embedding is the server's; the LM's embedding the user's
        x = s.add_plain(s.linear(x, plan["patch"]), plan["pos"])
    n = x.t.shape[0]
    mask = s.encrypt(attention_mask(cfg, n)) if cfg.causal else None
    for layer in plan["layers"]:
        heads = layer["heads"]
        (x,) = s.ensure([x], 2)  # q, k, v, then one product
        q = [s.linear(x, h["wq"], h["bq"]) for h in heads]
        k = [s.transpose(s.linear(x, h["wk"], h["bk"])) for h in heads]
        v = [s.linear(x, h["wv"], h["bv"]) for h in heads]
        scores = [s.product(a, b) for a, b in zip(q, k)]
        depth = ckks.poly_depth(len(layer["attn_poly"]) - 1)
        scores = s.ensure(scores, depth)
        weights = [s.poly(e, layer["attn_poly"]) for e in scores]
        if mask is not None:  # the causal mask and each row's 1/S(i + 1), elementwise
            weights = [s.multiply(w, mask) for w in s.ensure(weights, 1)]
        both = s.ensure(weights + v, 1)
        outs = [s.product(w, vv) for w, vv in zip(both[: len(heads)], both[len(heads):])]
        outs = s.ensure(outs, 1)
        attn = None
        for o, h in zip(outs, heads):
            c = s.linear(o, h["wo"])
            attn = c if attn is None else s.add(attn, c)
        x = s.add_plain(s.add(x, attn), layer["bo"])
        (x,) = s.ensure([x], 1)
        (u,) = s.ensure([s.linear(x, layer["w1"], layer["b1"])], ckks.poly_depth(len(layer["mlp_poly"]) - 1))
        (u,) = s.ensure([s.poly(u, layer["mlp_poly"])], 1)
        x = s.add(x, s.linear(u, layer["w2"], layer["b2"]))
    (x,) = s.ensure([x], 1)
    if cfg.causal:  # the next token's logits: the last position only, on the fewest primes
        return s.linear(s.lower(s.rows(x, n - 1, n), 1), plan["head"], plan["head_bias"])
    tokens, dim = x.t.shape
    # mean pool + head in one product: (1, tokens·dim) · (the head tiled per token)
    return s.linear(s.reshape(x, [1, tokens * dim]), np.tile(plan["head"], (tokens, 1)), plan["head_bias"])


def run(plan: dict, inputs: np.ndarray, params: ckks.Params | None = None, threads: int | None = None) -> tuple[CostReport, np.ndarray]:
    """``inputs``: a ViT's patches, or an LM's token ids (batch, n), all prompts of one length."""
    from ..models.polyformer import embed_plan, plan_config, plan_forward

    params = params or ckks.params_for(depth_needed(plan))
    link = ckks.Link()
    t0 = time.perf_counter()
    user = ckks.User(params, threads)
    public = user.public_context()
    link.key_bytes = len(public)

    def round_trip(blobs: list[bytes]) -> list[bytes]:
        c0 = time.perf_counter()
        out = user.refresh(blobs)
        link.client_seconds += time.perf_counter() - c0
        return out

    c0 = time.perf_counter()
    blob = user.encrypt(embed_plan(plan, inputs, np.float64) if plan_config(plan).causal else inputs)
    link.client_seconds += time.perf_counter() - c0
    link.bytes_up += len(blob)
    s0, client_before = time.perf_counter(), link.client_seconds
    server = ckks.Server(public, params, len(inputs), round_trip, link)
    out = encrypted_forward(server, plan, server.load(blob)).t.serialize()
    server_seconds = time.perf_counter() - s0 - (link.client_seconds - client_before)
    link.bytes_down += len(out)
    c0 = time.perf_counter()
    logits = user.decrypt(out).reshape(len(inputs), -1)
    link.client_seconds += time.perf_counter() - c0
    seconds = time.perf_counter() - t0
    ref = plan_forward(plan, inputs if plan_config(plan).causal else inputs.astype(np.float64))
    report = CostReport(
        inputs=len(inputs), seconds=seconds, server_seconds=server_seconds, client_seconds=link.client_seconds,
        bytes_up=link.bytes_up, bytes_down=link.bytes_down, key_bytes=link.key_bytes, refresh_rounds=link.refresh_rounds,
        refreshed_ciphertexts=link.refreshed_ciphertexts, max_abs_error=float(np.abs(logits - ref).max()),
        argmax_agreement=float((logits.argmax(-1) == ref.argmax(-1)).mean()), params=params.describe(),
        notes=[f"{len(inputs)} {'prompts' if plan_config(plan).causal else 'images'} packed in the slots of one batch: seconds are for the whole batch",
               f"client-aided refresh: masks uniform in ±{ckks.MASK_BOUND:g}, one round trip per refresh"],
    )
    return report, logits
