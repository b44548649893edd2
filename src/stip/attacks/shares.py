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
ALPHA = 1e-4  # a chi-square test passes above this p-value: 9 tests on uniform bytes all pass 99.9 % of the time


@dataclass
class Views:
    """What S1 and S2 received: per request, the rows of the layer inputs the attacks read
    (``rows[server][request][k]``: the share of layer k's residual as P3 sent it: on the
    4-round schedule the normalised input of its QKV matmul; on the 2-round one, for k ≥ 1,
    the h̃ = h∘γ of [o | h̃] in layer k's first block, γ its second norm's gain; layer 0 is
    the input of its QKV matmul in both), and a sample of every byte."""

    rows: list[list[dict[int, np.ndarray]]] = field(default_factory=lambda: [[], []])
    bytes: list[list[np.ndarray]] = field(default_factory=lambda: [[], []])
    plain: list[np.ndarray] = field(default_factory=list)  # the control: S1's + S2's share, unmasked
    rounds: int = 0
    schedule: int = 2  # rounds per layer


def observe(model, prompts: list[list[int]], layers=(0,), new_tokens: int = 1, rounds: int = 2, adapter=None) -> Views:
    """Run P3 on ``prompts`` (causal models: prefill and ``new_tokens`` greedy steps) on the
    ``rounds``-per-layer schedule against two share servers that record their view; the
    servers run in this process, on sockets. ``adapter``: a PEFT LoRA folder P3 applies."""
    from ..shares import Servers, ShareServer, SharesModel

    views, kept, current = Views(schedule=rounds), [0, 0], [{}, {}]
    hidden = model.config.hidden_size

    def recorder(i: int):
        def see(op: str, x: np.ndarray) -> None:
            layer, _, name = op.partition(".")
            k = int(layer) if layer.isdigit() else -1
            if k in layers and k not in current[i]:  # the prefill's rows (decode steps come later)
                if name == "qkv" and (rounds == 4 or k == 0):
                    current[i][k] = x.copy()
                elif name == "o+up" and rounds == 2 and k > 0:
                    current[i][k] = x[:, -hidden:].copy()
            if kept[i] < SAMPLE_BYTES:
                views.bytes[i].append(x.copy())
                kept[i] += x.nbytes
        return see

    servers = [ShareServer.from_model(model, observe=recorder(i)) for i in range(2)]
    with servers[0].listen() as a, servers[1].listen() as b, Servers([a.address, b.address]) as conn:
        p3 = SharesModel(model, conn, rounds, adapter)
        for p in prompts:
            current[0], current[1] = {}, {}
            if p3.cfg.causal:
                p3.generate(p, new_tokens, stop_at_eos=False)
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
                 [[fresh(x) for x in server] for server in views.bytes], [], views.rounds, views.schedule)


def as_float(x: np.ndarray) -> torch.Tensor:
    """A share read as activations: the server does not know P3's per-row scales, so it reads
    the ring element as a fraction of the whole ring (any fixed scale ranks candidates alike)."""
    return torch.from_numpy(x.astype(np.float64) / 2.0**63).float()


def uniformity(chunks: list[np.ndarray]) -> dict:
    """Chi-square tests that the bytes are uniform: all bytes pooled (255 degrees of freedom),
    and each of the 8 byte positions of a ring element alone (a fixed-point encoding fails
    there first: its high bytes are 0x00 or 0xFF). Returns the statistics, p-values, and the
    share of the 9 tests passed at ``ALPHA``."""
    data = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.int64)
    octets = np.ascontiguousarray(data).view(np.uint8).reshape(-1, 8)
    return uniformity_of_counts(np.stack([np.bincount(octets[:, j], minlength=256) for j in range(8)]))


def uniformity_of_counts(counts: np.ndarray) -> dict:
    """`uniformity` from the (8 byte positions, 256 values) counts alone, as a share server
    keeps them of everything it receives (`stip share-server --byte-counts`)."""
    from scipy.stats import chi2

    counts = np.asarray(counts, np.float64)
    pooled, total = counts.sum(0), counts.sum()
    stat = float(((pooled - total / 256) ** 2 / (total / 256)).sum())
    by_position = [float(((c - c.sum() / 256) ** 2 / (c.sum() / 256)).sum()) for c in counts]
    p_positions = [float(chi2.sf(s, 255)) for s in by_position]
    p = float(chi2.sf(stat, 255))
    return {"bytes": int(total), "chi2": stat, "p": p, "p_min_position": min(p_positions), "p_positions": p_positions,
            "passed": sum(x > ALPHA for x in [p, *p_positions]) / 9}  # fmt: skip


class _Reached(Exception):
    pass


def first_inputs(public, positions, blocks=None) -> dict[int, torch.Tensor]:
    """Every token's row as the first matmul would receive it, alone at each position: what the
    server's layer-0 rows would be in the clear (the embedding, normalised as the model does;
    the same on both schedules). ``blocks``: ``from_hf(public)``, when the caller has it."""
    from ..models.blocks import embed, from_hf
    from ..shares.walk import Walk

    cfg, params = blocks or from_hf(public)

    def stop(_name, x):
        raise _Reached(x)

    ids, out = torch.arange(public.get_input_embeddings().num_embeddings)[:, None], {}
    for t in positions:
        try:
            Walk(cfg, params, stop).forward(torch.from_numpy(embed(public, position_offset=t, input_ids=ids)))
        except _Reached as r:
            out[t] = r.args[0]
    return out


def _nearest_tokens(views: Views, server: int, public) -> list[list[int]]:
    """Each layer-0 row's nearest token by cosine (blind to P3's per-row scales), among every
    token's layer-0 row at that position."""
    from ..models.blocks import from_hf

    blocks = from_hf(public)
    position_free = blocks[0].rope_theta is not None  # RoPE comes after the first matmul: its rows ignore the position
    reqs = views.rows[server]
    needed = {0} if position_free else set(range(max((len(r[0]) for r in reqs), default=0)))
    cands = {t: torch.nn.functional.normalize(c, dim=-1) for t, c in first_inputs(public, sorted(needed), blocks).items()}
    found = []
    for req in reqs:
        rows = torch.nn.functional.normalize(as_float(req[0]), dim=-1)
        found.append([int((cands[0 if position_free else t] @ row).argmax()) for t, row in enumerate(rows)])
    return found


def vocab_input(views: Views, server: int, public, truth: list[list[int]]) -> dict:
    """Vocabulary matching on the rows the server received for layer 0 (``_nearest_tokens``).
    On the unmasked rows (``unmasked``) this recovers every token."""
    found = _nearest_tokens(views, server, public)
    hits = sum(a == b for f, t in zip(found, truth) for a, b in zip(f, t))
    total = sum(map(len, truth))
    return {"rate": hits / total, "n": total, "chance": 1 / public.get_input_embeddings().num_embeddings}


def unmasked(views: Views) -> Views:
    """The positive control: S1's and S2's rows added up — the activations in fixed point, as
    a single server would see them if P3 sent them unshared."""
    rows = [{k: a[k] + b[k] for k in a} for a, b in zip(*views.rows)]
    return Views([rows, rows], [views.plain, views.plain], [], views.rounds, views.schedule)


def vocab_causal(views: Views, server: int, public, truth: list[list[int]], k: int, start=(), proposals: int = 64) -> dict:
    """The causal matching of a chat model (``vocab.match_causal``) on the rows the server
    received for layer k, divided by the public gain of the RMSNorm it went through (layer k's
    first on the 4-round schedule, its second on the 2-round one) and compared free of scale:
    the view is the residual stream at P3's per-row scale. A uniform view
    is never within the match tolerance, so the whole vocabulary would be searched at every
    position; the nearest of the public model's ``proposals`` likeliest next tokens is taken
    instead (that only raises the chance level)."""
    from ..models.blocks import from_hf

    cfg, params = from_hf(public)
    if cfg.norm != "rms" or not cfg.prenorm:
        raise ValueError("the causal attack on shares reads pre-RMSNorm decoders (LLaMA/Qwen2/Mistral)")
    norm = "ln2" if views.schedule == 2 and k > 0 else "ln1"
    gain = torch.as_tensor(params["layers"][k][norm]["g"]) if k < cfg.layers else torch.ones(cfg.hidden)
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
    observed = _nearest_tokens(views, server, public)
    mapping = frequency_.solve(observed, reference)
    return {"rate": frequency_.recovered(mapping, observed, truth), "n": sum(map(len, truth)), "requests": len(truth)}


def suite(public_src, texts, layers=(1, 2), requests: int = 100, proposals: int = 64, reference: int = 1000,
          log=lambda _msg: None, rounds: int = 2, adapter=None) -> dict:
    """Every attack on S1's view, S2's view, fresh noise (the control at chance) and the
    unmasked activations (the control that shows the attack reads the view right), plus the
    uniformity of every byte each server received. Chat models get the causal matching after
    each of ``layers`` and frequency analysis over ``requests`` chat requests (real sentences,
    prompts only: `scenario.chat_prompts`). ``rounds``: P3's schedule, 2 or 4 per layer;
    ``adapter``: a PEFT LoRA folder P3 applies (the servers hold the base either way)."""
    from ..models.source import load_source
    from .scenario import _causal, chat_prompts, prompt_ids

    public = load_source(public_src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(public_src, local_files_only=True)
    causal = _causal(public)
    ids = [prompt_ids(tok, t)[0] for t in texts]
    log(f"P3 sends {len(ids)} prompts through two recording share servers")
    views = observe(public, ids, layers=(0, *layers) if causal else (0,), rounds=rounds, adapter=adapter)
    controls = {"s1": (views, 0), "s2": (views, 1), "noise": (noise_like(views), 0), "unmasked": (unmasked(views), 0)}
    out = {"tokens": sum(map(len, ids)), "rounds": views.rounds, "schedule": rounds, "adapter": str(adapter) if adapter else None}
    for name, chunks in (("s1", views.bytes[0]), ("s2", views.bytes[1]), ("unmasked", views.plain)):
        u = uniformity(chunks)
        out[f"uniform.{name}"], out[f"uniform.{name}.p"], out[f"uniform.{name}.p_min_position"] = u["passed"], u["p"], u["p_min_position"]
        out["uniform.bytes"] = u["bytes"]
    for name, (v, s) in controls.items():
        log(f"vocabulary matching at the input: {name}")
        out[f"vocab.input.{name}"] = vocab_input(v, s, public, ids)["rate"]
        for k in layers if causal else ():
            log(f"causal matching after {k} layer(s): {name}")
            out[f"vocab.layers{k}.{name}"] = vocab_causal(v, s, public, ids, k, start=tok.all_special_ids, proposals=proposals)["rate"]
    out["chance.input"] = 1 / public.get_input_embeddings().num_embeddings
    if causal and requests:
        chats = [p for p, _ in chat_prompts(tok, 0, requests)]
        log(f"{requests} chat requests for frequency analysis")
        fv = observe(public, chats, layers=(0,), rounds=rounds, adapter=adapter)
        ref = [p for p, _ in chat_prompts(tok, requests, reference)]
        for name, (v, s) in {"s1": (fv, 0), "s2": (fv, 1), "noise": (noise_like(fv), 0), "unmasked": (unmasked(fv), 0)}.items():
            log(f"frequency analysis: {name}")
            out[f"frequency.{name}"] = frequency(v, s, public, chats, ref)["rate"]
        out["frequency.requests"], out["frequency.reference"] = requests, reference
        out["frequency.tokens"] = sum(map(len, chats))
    attacked = [v for k, v in out.items() if k.startswith(("vocab.", "frequency.")) and k.endswith((".s1", ".s2"))]
    out["best_on_a_share"] = max(attacked)
    return out
