"""Each attack end to end on a sealed folder (what `stip attack` runs).

P3's side is simulated from OUT/client (it tokenises and embeds the texts, as it would when
querying); P2's view is what P2 holds (OUT/server and the traffic); the attacker's side
knowledge is a public model folder. P1's key (OUT/provider) is read only to score the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.hf import greedy, hidden
from . import Result, attention as attention_, frequency as frequency_, plaintext, vocab as vocab_, weights as weights_

TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "My password is hunter2 and my bank is in Zurich.",
    "Patient John Smith was diagnosed with diabetes in 2019.",
    "I said no, no and no: the answer is still no, John.",
)


@dataclass
class Traffic:
    """What P3 sends for ``texts``: the permuted embeddings, with the truth kept for scoring."""

    ids: torch.Tensor
    mask: torch.Tensor
    plain: torch.Tensor  # P3's embeddings before π (never sent)
    sent: torch.Tensor  # what P2 receives
    tokenizer: object  # P3's, to show recovered tokens as text


def _client(sealed: str | Path):
    """P3's bundle and tokenizer, from OUT/client."""
    from transformers import AutoTokenizer

    from ..client.bundle import ClientBundle

    client = Path(sealed) / "client"
    return ClientBundle.load(client), AutoTokenizer.from_pretrained(client, local_files_only=True)


def capture(sealed: str | Path, texts=TEXTS) -> Traffic:
    bundle, tok = _client(sealed)
    if bundle.mode == "tokens":
        raise ValueError(f"{sealed} is a token-mode sealing: P2 receives renamed ids, not rows "
                         "(attack them with `stip attack frequency`, or the hidden states with `stip attack vocab --layers K`)")
    enc = tok(list(texts), padding=True, return_tensors="pt")
    plain = bundle.embedder(enc["input_ids"])
    return Traffic(enc["input_ids"], enc["attention_mask"], plain, bundle.permuted_embeddings(enc["input_ids"]), tok)


def _mode(sealed: Path) -> str:
    from ..client.bundle import ClientBundle

    return ClientBundle.load(Path(sealed) / "client").mode


def _server(sealed: Path):
    from ..serve import engine

    return engine.load(sealed / "server")


def _true_key(sealed: Path):
    from .. import keys

    return keys.load(sealed / "provider" / "key.stip")


def _public(src: str | Path):
    from ..models.source import load_source

    return load_source(src)


def offsets(public, n: int) -> torch.Tensor | None:
    """What the public model adds to a token's row at positions 0..n-1 (None: nothing)."""
    emb = getattr(public.base_model, "embeddings", None)
    if emb is not None and hasattr(emb, "position_embeddings"):
        out = emb.position_embeddings.weight[:n]
        if getattr(emb, "token_type_embeddings", None) is not None:
            out = out + emb.token_type_embeddings.weight[0]
        return out.detach()
    wpe = getattr(public.base_model, "wpe", None)
    return None if wpe is None else wpe.weight[:n].detach()


def _token_rate(found: torch.Tensor, t: Traffic) -> float:
    keep = t.mask.bool()
    return float((found == t.ids)[keep].float().mean())


def vocab(sealed: str | Path, public: str | Path, texts=TEXTS, layers: int = 0, proposals: int = 1024) -> Result:
    """Tokens from what P2 sees: the input rows (layers=0), or its hidden states after k layers.
    On a causal model, position by position over the whole vocabulary (``vocab.match_causal``;
    ``proposals``: how many of the public model's likeliest next tokens are tried first)."""
    sealed, pub = Path(sealed), _public(public)
    if _causal(pub):
        return _vocab_causal(sealed, pub, texts, layers, proposals)
    t = capture(sealed, texts)
    if layers == 0:
        found = vocab_.match(t.sent, pub.get_input_embeddings().weight.detach(), offsets(pub, t.ids.shape[1]))
    else:
        observed = hidden(_server(sealed), layers, inputs_embeds=t.sent, attention_mask=t.mask)
        found = vocab_.match_hidden(observed, t.mask, pub, layers)
    recovered = [t.tokenizer.decode(row[m.bool() & (row >= 0)], skip_special_tokens=True) for row, m in zip(found, t.mask)]
    return Result(_token_rate(found, t), int(t.mask.sum()), {"attack": "vocab", "layers": layers, "recovered": recovered})


def _causal(model) -> bool:
    return bool(getattr(model, "can_generate", lambda: False)()) and not model.config.is_encoder_decoder


def prompt_ids(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """The ids P3 sends for one user message (through the chat template when the tokenizer has
    one, as `stip proxy` does), and which of them are the user's own text rather than template."""
    if not getattr(tokenizer, "chat_template", None):
        ids = tokenizer(text)["input_ids"]
        return ids, [True] * len(ids)
    ids, empty = (list(tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]) for m in (text, ""))
    head = _common(ids, empty)
    tail = min(_common(ids[::-1], empty[::-1]), len(empty) - head)
    return ids, [head <= i < len(ids) - tail for i in range(len(ids))]


def _common(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _p2_inputs(bundle, ids: torch.Tensor) -> dict:
    """What P2 receives for a batch of real ids: renamed ids (token mode) or permuted rows."""
    if bundle.mode == "tokens":
        return {"input_ids": torch.as_tensor([bundle.rename_ids(r) for r in ids.tolist()])}
    return {"inputs_embeds": bundle.permuted_embeddings(ids)}


def _vocab_causal(sealed: Path, pub, texts, layers: int, proposals: int) -> Result:
    bundle, tok = _client(sealed)
    server = _server(sealed)
    hits = user_hits = total = user_total = full = 0
    seconds, recovered = 0.0, []
    for text in texts:
        ids, user = prompt_ids(tok, text)
        x = torch.tensor([ids])
        observed = hidden(server, layers, **_p2_inputs(bundle, x), attention_mask=torch.ones_like(x))[0]
        m = vocab_.match_causal(observed, pub, layers, proposals=proposals, start=tok.all_special_ids)
        right = [a == b for a, b in zip(m.ids, ids)]
        hits, total = hits + sum(right), total + len(ids)
        user_hits += sum(r for r, u in zip(right, user) if u)
        user_total += sum(user)
        full, seconds = full + m.full_searches, seconds + m.seconds
        recovered.append(tok.decode([t for t, u in zip(m.ids, user) if u]))
    return Result(user_hits / user_total, user_total, {
        "attack": "vocab (causal)", "layers": layers, "all_tokens": total, "all_tokens_rate": hits / total,
        "proposals": proposals, "full_vocabulary_searches": full, "seconds": round(seconds, 1), "recovered": recovered})


def weights(sealed: str | Path, public: str | Path, texts=TEXTS) -> Result:
    """π and the per-layer permutations from the sealed checkpoint and a public base, then the
    captured traffic decrypted with the recovered π."""
    sealed = Path(sealed)
    server, pub = _server(sealed), _public(public)
    width = server.config.hidden_size  # P2 knows its model's width; the key is read only to score
    m = weights_.match(server.state_dict(), pub.state_dict(), width)
    truth = _true_key(sealed).pi
    layers = _per_layer(m.unsealed)
    out = {"attack": "weights", "tensors_unsealed": int(sum(m.unsealed.values())), "tensors": len(m.unsealed),
           "tensors_unsealed_rate": sum(m.unsealed.values()) / len(m.unsealed),
           "layers_unsealed": sum(layers.values()), "layers": len(layers), "voters": m.votes, "vote_agreement": m.agreement}
    if _mode(sealed) == "tokens":
        return Result(float((m.pi == truth).mean()), width, out)  # no rows in the traffic to decrypt
    t = capture(sealed, texts)
    opened = weights_.decrypt(t.sent, m.pi)
    keep = t.mask.bool()
    rows = torch.isclose(opened, t.plain, atol=1e-6).all(-1)[keep]
    table = pub.get_input_embeddings().weight.detach().double()
    off = offsets(pub, t.ids.shape[1])
    found = torch.stack([torch.cdist(opened[:, i].double(), table if off is None else table + off[i].double()).argmin(-1)
                         for i in range(t.ids.shape[1])], 1)  # opened rows are in the clear: plain nearest row
    return Result(float((m.pi == truth).mean()), width, {
        **out, "traffic_rows_decrypted": float(rows.float().mean()), "tokens_decrypted": _token_rate(found, t)})


def _per_layer(unsealed: dict[str, bool]) -> dict[int, bool]:
    """Layer index → every tensor of that layer un-permuted to the public one."""
    import re

    layers: dict[int, bool] = {}
    for name, ok in unsealed.items():
        m = re.search(r"\.(?:layers?|h)\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), True) and ok
    return layers


def _leaked_pi(t: Traffic):
    """π recovered from the first text's pair (its embeddings in the clear, and as sent)."""
    n0 = int(t.mask[0].sum())
    return plaintext.known_plaintext(t.plain[0, :n0].numpy(), t.sent[0, :n0].numpy()), n0


def known_plaintext(sealed: str | Path, texts=TEXTS) -> Result:
    """π from one leaked pair (the first text's embeddings, in the clear and as sent); then the
    other texts' traffic decrypted with it."""
    sealed = Path(sealed)
    t = capture(sealed, texts)
    pi, n0 = _leaked_pi(t)
    truth = _true_key(sealed).pi
    rest = t.mask[1:].bool()
    opened = weights_.decrypt(t.sent[1:], pi)
    rows = torch.isclose(opened, t.plain[1:], atol=1e-6).all(-1)[rest]
    decrypted = float(rows.float().mean()) if rows.numel() else None  # None: no other text to decrypt
    return Result(float((pi == truth).mean()), len(truth), {"attack": "known-plaintext", "pair_tokens": n0,
                                                            "traffic_rows_decrypted": decrypted})


def attention(sealed: str | Path, texts=TEXTS) -> Result:
    """Which positions hold the same token, from the attention maps P2 computes."""
    sealed = Path(sealed)
    t = capture(sealed, texts)
    r = attention_.repeats(attention_.maps(_server(sealed), t.mask, inputs_embeds=t.sent), t.ids, t.mask)
    return Result(r.pop("precision_at_m"), r["repeated_pairs"], {"attack": "attention", **r})


def cross_key(leaked_from: str | Path, victim: str | Path, texts=TEXTS) -> Result:
    """Per-user keys: π recovered by known plaintext from one user's sealing, used on another
    user's traffic (same model, its own key)."""
    a, b = capture(leaked_from, texts), capture(victim, texts)
    pi, _ = _leaked_pi(a)
    keep = b.mask.bool()
    rows = torch.isclose(weights_.decrypt(b.sent, pi), b.plain, atol=1e-6).all(-1)[keep]
    coords = (weights_.decrypt(b.sent, pi) == b.plain)[keep].float().mean()
    truth = _true_key(Path(victim)).pi
    return Result(float((pi == truth).mean()), len(truth), {"attack": "known-plaintext, other user's key",
                                                            "traffic_rows_decrypted": float(rows.float().mean()),
                                                            "traffic_coordinates_correct": float(coords)})


def _log_requests(model, bundle, prompts: list[list[int]], new_tokens: int, stop: int) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy answers as P2 computes them: (the ids P2 sees, the real ids). P2 is fed renamed
    ids (token mode) or permuted rows (embedding mode), and in both modes sees the argmax of
    its permuted logits at each step. ``bundle`` None: the public model, ids in the clear."""
    if bundle is None:
        out = greedy(model, prompts, new_tokens, stop={stop})
        return out, out
    renamed_stop = bundle.rename_ids([stop])[0]
    if bundle.mode == "tokens":
        seen = greedy(model, [bundle.rename_ids(p) for p in prompts], new_tokens, stop={renamed_stop})
    else:
        restore = lambda j: torch.as_tensor([bundle.restore_ids(r) for r in j.tolist()])  # noqa: E731
        seen = greedy(model, prompts, new_tokens, stop={renamed_stop}, embed=bundle.permuted_embeddings, restore=restore)
    return seen, [bundle.restore_ids(s) for s in seen]


PROMPT_POOL = 4000  # sentences 0..3999 may become prompts; the rest is fine-tuning text


def chat_prompts(tokenizer, first: int, count: int) -> list[tuple[list[int], list[bool]]]:
    """``count`` chat requests from real sentences (CPython's docs, ``stip.models.text``), from
    the ``first``-th on: the ids and which of them are the user's text."""
    from ..models.text import sentences

    pool = sentences(seed=0)[:PROMPT_POOL]
    if first + count > len(pool):
        raise ValueError(f"only {len(pool)} sentences for prompts; asked for {first + count}")
    return [prompt_ids(tokenizer, s) for s in pool[first : first + count]]


_REFERENCES: dict[tuple, list[list[int]]] = {}


def self_generated(server, mode: str, count: int, length: int = 64, seed: int = 0, batch: int = 64, temperature: float = 1.0,
                   log=lambda _done, _total: None) -> list[list[int]]:  # fmt: skip
    """P2's own corpus, with no user request, no key and no public weights: ``count``
    sequences sampled from the sealed checkpoint ``server`` alone, each a start id drawn at
    random from its vocabulary and ``length`` renamed ids after it. Token mode: the checkpoint
    reads renamed ids. Embedding mode: it reads permuted rows, and with a tied head P2 holds
    them: the sealed head's row for renamed id a is the permuted row P3 would send for it."""
    head = server.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, head.shape[0], (count,), generator=gen).tolist()
    embed = None if mode == "tokens" else (lambda ids: head[ids])
    out = greedy(server, [[a] for a in starts], length, embed=embed, temperature=temperature, generator=gen, batch=batch, log=log)
    return [[a] + s for a, s in zip(starts, out)]


def text_reference(tokenizer) -> list[list[int]]:
    """A public reference that no model wrote: CPython's sentences the attacks never use as
    prompts, each tokenized alone."""
    from ..models.text import sentences

    pool = sentences(seed=0)[PROMPT_POOL:]
    return [ids for ids in tokenizer(pool, add_special_tokens=False)["input_ids"] if ids]


def frequency(sealed: str | Path, public: str | Path, requests=(10, 100, 1000), new_tokens: int = 32,
              reference_requests: int = 1000, self_generate=(), length: int = 64, log=lambda _msg: None) -> Result:
    """P2's log of ``max(requests)`` chat requests (real sentences, answered greedily by the
    sealed model in the sealing's own mode), decoded by frequency analysis against the public
    model's answers to ``reference_requests`` other prompts. Token mode logs every prompt's and
    answer's ids; embedding mode logs the argmax ids of the answers. Recovery: the share of the
    logged user text and answer tokens (not the chat template) mapped to their real token.

    ``self_generate`` (counts N): the attacker instead samples N renamed sequences of
    ``length`` ids from its own checkpoint (`self_generated`) and solves the substitution on
    them alone against public text (`text_reference`); the mapping is scored on the same
    logged requests, which it never solves on (also with the unigram stage alone).
    ``reference_requests=0`` leaves the logged-request decoding out: the log is then only
    the held-out traffic the self-generated mapping is scored on."""
    if not reference_requests and not self_generate:
        raise ValueError("nothing to decode from: give reference requests or self-generated sequences")
    sealed, pub = Path(sealed), _public(public)
    if not _causal(pub):
        raise ValueError("frequency analysis reads generated ids: it needs a causal language model")
    bundle, tok = _client(sealed)
    tokens_mode = bundle.mode == "tokens"
    stop = tok.eos_token_id
    n = max(requests)
    users = chat_prompts(tok, 0, n)
    log(f"P2 answers {n} requests ({bundle.mode} mode)")
    seen, real = _log_requests(_server(sealed), bundle, [p for p, _ in users], new_tokens, stop)
    refs = chat_prompts(tok, n, reference_requests) if reference_requests else []
    if reference_requests:
        log(f"the public model answers {reference_requests} other prompts (the attacker's reference)")
        key = (str(public), n, reference_requests, new_tokens)
        if key not in _REFERENCES:  # the same for both modes: answer once per process
            _REFERENCES[key] = _log_requests(pub, None, [p for p, _ in refs], new_tokens, stop)[0]
    answers = _REFERENCES[key] if reference_requests else []
    if tokens_mode:
        observed = [bundle.rename_ids(p) + s for (p, _), s in zip(users, seen)]
        truth = [p + r for (p, _), r in zip(users, real)]
        content = [u + [True] * len(s) for (_, u), s in zip(users, seen)]
        reference = [p + a for (p, _), a in zip(refs, answers)]
    else:
        observed, truth, content, reference = seen, real, [[True] * len(s) for s in seen], answers
    curve, whole = {}, {}
    for k in sorted(requests) if reference_requests else ():  # 0: the log is only scored, never decoded
        mapping = frequency_.solve(observed[:k], reference)
        curve[k] = frequency_.recovered(mapping, observed[:k], truth[:k], content[:k])
        whole[k] = frequency_.recovered(mapping, observed[:k], truth[:k])
        log(f"{k} requests: {100 * curve[k]:.1f} % of user and answer tokens")
    extra = {}
    if self_generate:
        t0 = time.perf_counter()
        most = max(self_generate)
        log(f"P2 samples {most:,} sequences of {length} ids from its own checkpoint")
        sampled = self_generated(_server(sealed), bundle.mode, most, length, log=lambda done, total: log(f"  {done:,}/{total:,} sequences"))
        corpus = [s[1:] for s in sampled]  # the random start ids are not the model's
        extra["self_generate_seconds"] = time.perf_counter() - t0
        text = text_reference(tok)
        extra["self_reference_tokens"] = sum(map(len, text))
        for k in sorted(self_generate):
            for stage, kw in (("", {}), (".unigram", {"iterations": 0})):
                t1 = time.perf_counter()
                mapping = frequency_.solve(corpus[:k], text, **kw)
                extra[f"self{k}{stage}"] = frequency_.recovered(mapping, observed, truth, content)
                extra[f"self{k}{stage}.solve_seconds"] = time.perf_counter() - t1
            log(f"{k:,} self-generated sequences: {100 * extra[f'self{k}']:.1f} % of the logged user and answer tokens "
                f"(unigram stage alone: {100 * extra[f'self{k}.unigram']:.1f} %)")
        extra["self_length"] = length
    value = curve[n] if curve else extra[f"self{max(self_generate)}"]
    return Result(value, sum(map(sum, content)), {
        "attack": "frequency", "mode": bundle.mode, "new_tokens": new_tokens, "reference_requests": reference_requests,
        "by_requests": {str(k): v for k, v in curve.items()},
        "whole_log_by_requests": {str(k): v for k, v in whole.items()},
        **{f"requests{k}": v for k, v in curve.items()}, **extra})


def shares(public: str | Path, texts=TEXTS, layers=(1, 2), requests: int = 100, proposals: int = 64, log=lambda _msg: None,
           rounds: int = 2, adapter=None) -> Result:
    """The attack suite against shares mode (`stip.attacks.shares.suite`) on P3's ``rounds``
    per layer schedule, with P3 applying ``adapter`` (a PEFT LoRA folder) if given: recovery
    rate is the best any attack reaches on either server's view."""
    from . import shares as shares_

    r = shares_.suite(public, texts, layers, requests, proposals, log=log, rounds=rounds, adapter=adapter)
    return Result(r["best_on_a_share"], r["tokens"], {"attack": "shares", **r})


ATTACKS = {"vocab": vocab, "weights": weights, "known-plaintext": known_plaintext, "attention": attention, "frequency": frequency,
           "shares": shares}


VARIANTS = ("reinit-embeddings", "reinit-all", "drift", "finetune")


@torch.no_grad()
def private_variant(src: str | Path, dst: str | Path, kind: str, scale: float = 1.0, seed: int = 0, steps: int = 200) -> Path:
    """A model whose weights are private, written as a Hugging Face folder (with src's tokenizer)
    for sealing: its word table re-initialised ("reinit-embeddings"), every weight re-initialised
    ("reinit-all"), every tensor moved by Gaussian noise of ``scale`` × its own standard
    deviation ("drift", standing in for fine-tuning far from the base), or, for a causal LM,
    really fine-tuned for ``steps`` steps on local text ("finetune": see ``finetune``)."""
    from ..seal import copy_preprocessing

    if kind not in VARIANTS:
        raise ValueError(f"kind must be one of {VARIANTS}")
    model = _public(src)
    gen = torch.Generator().manual_seed(seed)
    if kind == "reinit-embeddings":
        table = model.get_input_embeddings().weight
        table.copy_(torch.randn(table.shape, generator=gen) * table.std())
    elif kind == "reinit-all":
        torch.manual_seed(seed)
        model = type(model)(model.config).eval()
    elif kind == "finetune":
        finetune(model, src, steps, seed=seed)
    else:
        for t in model.state_dict().values():
            if t.is_floating_point() and t.numel() > 1:
                t.add_(torch.randn(t.shape, generator=gen) * t.std() * scale)
    dst = Path(dst)
    model.save_pretrained(dst)
    copy_preprocessing(src, dst)
    return dst


@torch.enable_grad()
def finetune(model, src: str | Path, steps: int, *, batch: int = 4, length: int = 64, lr: float = 5e-5, seed: int = 0,
             log=lambda _step, _loss: None):
    """A plain full fine-tune of a causal LM, the size a user would run on a small corpus:
    AdamW at the common 5e-5, no schedule, ``batch`` × ``length`` tokens a step, on sentences
    of CPython's docs that no prompt of the attacks uses. In place; returns the model."""
    from transformers import AutoTokenizer

    from ..models.text import sentences

    if not _causal(model):
        raise ValueError("finetune trains a causal language model")
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    corpus = sentences(seed=0)[PROMPT_POOL:]  # the attacks' prompts come from the first PROMPT_POOL
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        i = (step * batch) % max(len(corpus) - batch, 1)
        enc = tok(corpus[i : i + batch], return_tensors="pt", padding=True, truncation=True, max_length=length)
        loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        log(step + 1, float(loss))
    return model.eval()


def drift(model_dir: str | Path, public: str | Path) -> Result:
    """How far a model's weights are from the public ones, in the unit of the "drift" variants:
    each tensor's RMS change over its own standard deviation; the median over tensors."""
    a, b = _public(model_dir).state_dict(), _public(public).state_dict()
    ratios = [float((a[n] - b[n]).pow(2).mean().sqrt() / b[n].std()) for n in b
              if n in a and b[n].is_floating_point() and b[n].numel() > 1 and b[n].std() > 0]
    ratios.sort()
    return Result(ratios[len(ratios) // 2], len(ratios), {"attack": "drift", "drift": ratios[len(ratios) // 2],
                                                            "max": ratios[-1], "min": ratios[0]})
