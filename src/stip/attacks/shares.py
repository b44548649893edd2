"""The attack suite against shares mode, from one share server's point of view.

A share server holds the public model and the share it receives of every weight-matmul input.
The attacks P2 runs against STIP run here on that view — read as fixed-point activations,
which is all a server can do with them — and, as the control, on fresh uniform noise of the
same shapes: a view that hides nothing scores the same on both.

    v = observe(model, prompts, layers=(0, 1))          # both servers' views of real traffic
    uniformity(v.bytes[0])                              # chi-square on every byte S1 received
    vocab_input(v, 0, public=model, truth=prompts)      # token ids from S1's layer-0 rows
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import frequency as frequency_, vocab as vocab_

SAMPLE_BYTES = 1 << 25  # per server, the bytes kept for the uniformity test (32 MiB)


@dataclass
class Views:
    """What S1 and S2 received: per request, the rows of the layer inputs the attacks read
    (``rows[server][request][k]``: the share of the input to layer k's QKV matmul), and a
    sample of every byte."""

    rows: list[list[dict[int, np.ndarray]]] = field(default_factory=lambda: [[], []])
    bytes: list[list[np.ndarray]] = field(default_factory=lambda: [[], []])
    plain: list[np.ndarray] = field(default_factory=list)  # the control: S1's + S2's share, unmasked
    rounds: int = 0


def observe(model, prompts: list[list[int]], layers=(0,), new_tokens: int = 1) -> Views:
    """Run P3 on ``prompts`` (causal models: prefill and ``new_tokens`` greedy steps) against
    two share servers that record their view; the servers run in this process, on sockets."""
    from ..shares import Servers, ShareServer, SharesModel

    views, kept, current = Views(), [0, 0], [{}, {}]

    def recorder(i: int):
        def see(op: str, x: np.ndarray) -> None:
            layer, _, name = op.partition(".")
            if name == "qkv" and int(layer) in layers and int(layer) not in current[i]:
                current[i][int(layer)] = x.copy()  # the prefill's rows (decode steps come later)
            if kept[i] < SAMPLE_BYTES:
                views.bytes[i].append(x.copy())
                kept[i] += x.nbytes
        return see

    servers = [ShareServer.from_model(model, observe=recorder(i)) for i in range(2)]
    with servers[0].listen() as a, servers[1].listen() as b, Servers([a.address, b.address]) as conn:
        p3 = SharesModel(model, conn)
        for p in prompts:
            current[0], current[1] = {}, {}
            if p3.cfg.causal:
                p3.generate(p, new_tokens)
            else:
                p3.forward(torch.tensor([p]))
            for i in range(2):
                views.rows[i].append(current[i])
        views.rounds = conn.stats.rounds
    n = min(len(views.bytes[0]), len(views.bytes[1]))
    views.plain = [x + y for x, y in zip(views.bytes[0][:n], views.bytes[1][:n])]  # wraps: the encodings
    return views


def noise_like(views: Views) -> Views:
    """The control: the same shapes, fresh uniform ring elements."""
    from ..shares import ring

    fresh = lambda x: ring.uniform(x.size).reshape(x.shape)  # noqa: E731
    return Views([[{k: fresh(x) for k, x in req.items()} for req in server] for server in views.rows],
                 [[fresh(x) for x in server] for server in views.bytes], [], views.rounds)


def as_float(x: np.ndarray) -> torch.Tensor:
    """A share read as activations: the server does not know P3's per-row scales, so it reads
    the ring element as a fraction of the whole ring (any fixed scale ranks candidates alike)."""
    return torch.from_numpy(x.astype(np.float64) / 2.0**63).float()


def uniformity(chunks: list[np.ndarray]) -> dict:
    """Chi-square tests that the bytes are uniform: all bytes pooled (255 degrees of freedom),
    and each of the 8 byte positions of a ring element alone (a fixed-point encoding fails
    there first: its high bytes are 0x00 or 0xFF). Returns the statistics and p-values."""
    from scipy.stats import chi2

    data = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.int64)
    octets = data.view(np.uint8).reshape(-1, 8)
    expected_all = octets.size / 256
    counts = np.bincount(octets.reshape(-1), minlength=256)
    stat = float(((counts - expected_all) ** 2 / expected_all).sum())
    by_position = []
    for j in range(8):
        c = np.bincount(octets[:, j], minlength=256)
        e = len(octets) / 256
        by_position.append(float(((c - e) ** 2 / e).sum()))
    p_positions = [float(chi2.sf(s, 255)) for s in by_position]
    return {"bytes": int(octets.size), "chi2": stat, "p": float(chi2.sf(stat, 255)),
            "p_min_position": min(p_positions), "p_positions": p_positions}  # fmt: skip


class _Reached(Exception):
    pass


def first_inputs(public, position: int) -> torch.Tensor:
    """Every token's row as the first matmul would receive it, alone at ``position``: what the
    server's layer-0 rows would be in the clear (the embedding, normalised as the model does)."""
    from ..models.blocks import embed, from_hf
    from ..shares.walk import Walk

    cfg, params = from_hf(public)

    def stop(_name, x):
        raise _Reached(x)

    ids = torch.arange(public.get_input_embeddings().num_embeddings)[:, None]
    try:
        Walk(cfg, params, stop).forward(torch.from_numpy(embed(public, position_offset=position, input_ids=ids)))
    except _Reached as r:
        return r.args[0]
    raise AssertionError("the walk made no matmul")


def vocab_input(views: Views, server: int, public, truth: list[list[int]]) -> dict:
    """Vocabulary matching on the rows the server received for layer 0: each row's nearest
    candidate, by cosine (blind to P3's per-row scales), among every token's layer-0 row at that
    position. On the unmasked rows (``unmasked``) this recovers every token."""
    cands: dict[int, torch.Tensor] = {}
    position_free = public.config.model_type in ("llama", "qwen2", "mistral")  # RoPE: the rows ignore the position
    hits = total = 0
    for req, ids in zip(views.rows[server], truth):
        rows = torch.nn.functional.normalize(as_float(req[0]), dim=-1)
        for t, (row, want) in enumerate(zip(rows, ids)):
            key = 0 if position_free else t
            if key not in cands:
                cands[key] = torch.nn.functional.normalize(first_inputs(public, key), dim=-1)
            hits += int(int((cands[key] @ row).argmax()) == want)
            total += 1
    return {"rate": hits / total, "n": total, "chance": 1 / public.get_input_embeddings().num_embeddings}


def unmasked(views: Views) -> Views:
    """The positive control: S1's and S2's rows added up — the activations in fixed point, as
    a single server would see them if P3 sent them unshared."""
    rows = [{k: a[k] + b[k] for k in a} for a, b in zip(*views.rows)]
    return Views([rows, rows], [views.plain, views.plain], [], views.rounds)


def vocab_causal(views: Views, server: int, public, truth: list[list[int]], k: int, start=(), proposals: int = 64) -> dict:
    """The causal matching of a chat model (``vocab.match_causal``) on the rows the server
    received for layer k, divided by the public gain of layer k's RMSNorm and compared free of
    scale (the view is the normalised residual stream, at P3's per-row scale). A uniform view
    is never within the match tolerance, so the whole vocabulary would be searched at every
    position; the nearest of the public model's ``proposals`` likeliest next tokens is taken
    instead (that only raises the chance level)."""
    from ..models.blocks import from_hf

    cfg, params = from_hf(public)
    if cfg.norm != "rms" or not cfg.prenorm:
        raise ValueError("the causal attack on shares reads pre-RMSNorm decoders (LLaMA/Qwen2/Mistral)")
    gain = torch.as_tensor(params["layers"][k]["ln1"]["g"]) if k < cfg.layers else torch.ones(cfg.hidden)
    hits = total = 0
    for req, ids in zip(views.rows[server], truth):
        m = vocab_.match_causal(as_float(req[k]) / gain, public, k, proposals=proposals, start=start, full=False,
                                scale_free=True)  # fmt: skip
        hits += sum(a == b for a, b in zip(m.ids, ids))
        total += len(ids)
    return {"rate": hits / total, "n": total, "layers": k, "proposals": proposals}


def frequency(views: Views, server: int, public, truth: list[list[int]], reference: list[list[int]]) -> dict:
    """Frequency analysis: the server has no ids, so it makes its own — each layer-0 row's
    nearest token, as ``vocab_input`` finds it — and maps those symbols to tokens by unigram
    and bigram statistics against the attacker's own reference text."""
    position_free = public.config.model_type in ("llama", "qwen2", "mistral")
    cands: dict[int, torch.Tensor] = {}
    observed = []
    for req in views.rows[server]:
        rows, symbols = torch.nn.functional.normalize(as_float(req[0]), dim=-1), []
        for t, row in enumerate(rows):
            key = 0 if position_free else t
            if key not in cands:
                cands[key] = torch.nn.functional.normalize(first_inputs(public, key), dim=-1)
            symbols.append(int((cands[key] @ row).argmax()))
        observed.append(symbols)
    mapping = frequency_.solve(observed, reference)
    return {"rate": frequency_.recovered(mapping, observed, truth), "n": sum(map(len, truth)), "requests": len(truth)}
