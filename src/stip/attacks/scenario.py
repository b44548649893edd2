"""Each attack end to end on a sealed folder (what `stip attack` runs).

P3's side is simulated from OUT/client (it tokenises and embeds the texts, as it would when
querying); P2's view is what P2 holds (OUT/server and the traffic); the attacker's side
knowledge is a public model folder. P1's key (OUT/provider) is read only to score the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.hf import hidden
from . import Result, attention as attention_, plaintext, vocab as vocab_, weights as weights_

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


def capture(sealed: str | Path, texts=TEXTS) -> Traffic:
    from transformers import AutoTokenizer

    from ..client.bundle import ClientBundle

    client = Path(sealed) / "client"
    bundle, tok = ClientBundle.load(client), AutoTokenizer.from_pretrained(client, local_files_only=True)
    enc = tok(list(texts), padding=True, return_tensors="pt")
    plain = bundle.embedder(enc["input_ids"])
    return Traffic(enc["input_ids"], enc["attention_mask"], plain, bundle.permuted_embeddings(enc["input_ids"]), tok)


def _server(sealed: Path):
    from ..serve import engine

    return engine.load(sealed / "server")


def _true_key(sealed: Path):
    from .. import keys

    return keys.load(sealed / "provider" / "key.stip")


def _public(src: str | Path):
    from ..seal import load_source

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


def vocab(sealed: str | Path, public: str | Path, texts=TEXTS, layers: int = 0) -> Result:
    """Tokens from what P2 sees: the input rows (layers=0), or its hidden states after k layers."""
    sealed = Path(sealed)
    t, pub = capture(sealed, texts), _public(public)
    if layers == 0:
        found = vocab_.match(t.sent, pub.get_input_embeddings().weight.detach(), offsets(pub, t.ids.shape[1]))
    else:
        observed = hidden(_server(sealed), layers, inputs_embeds=t.sent, attention_mask=t.mask)
        found = vocab_.match_hidden(observed, t.mask, pub, layers)
    recovered = [t.tokenizer.decode(row[m.bool() & (row >= 0)], skip_special_tokens=True) for row, m in zip(found, t.mask)]
    return Result(_token_rate(found, t), int(t.mask.sum()), {"attack": "vocab", "layers": layers, "recovered": recovered})


def weights(sealed: str | Path, public: str | Path, texts=TEXTS) -> Result:
    """π and the per-layer permutations from the sealed checkpoint and a public base, then the
    captured traffic decrypted with the recovered π."""
    sealed = Path(sealed)
    server, pub = _server(sealed), _public(public)
    width = server.config.hidden_size  # P2 knows its model's width; the key is read only to score
    m = weights_.match(server.state_dict(), pub.state_dict(), width)
    truth = _true_key(sealed).pi
    t = capture(sealed, texts)
    opened = weights_.decrypt(t.sent, m.pi)
    keep = t.mask.bool()
    rows = torch.isclose(opened, t.plain, atol=1e-6).all(-1)[keep]
    table = pub.get_input_embeddings().weight.detach().double()
    off = offsets(pub, t.ids.shape[1])
    found = torch.stack([torch.cdist(opened[:, i].double(), table if off is None else table + off[i].double()).argmin(-1)
                         for i in range(t.ids.shape[1])], 1)  # opened rows are in the clear: plain nearest row
    return Result(float((m.pi == truth).mean()), width, {
        "attack": "weights", "tensors_unsealed": int(sum(m.unsealed.values())), "tensors": len(m.unsealed),
        "voters": m.votes, "vote_agreement": m.agreement, "traffic_rows_decrypted": float(rows.float().mean()),
        "tokens_decrypted": _token_rate(found, t)})


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


ATTACKS = {"vocab": vocab, "weights": weights, "known-plaintext": known_plaintext, "attention": attention}


VARIANTS = ("reinit-embeddings", "reinit-all", "drift")


@torch.no_grad()
def private_variant(src: str | Path, dst: str | Path, kind: str, scale: float = 1.0, seed: int = 0) -> Path:
    """A model whose weights are private, written as a Hugging Face folder (with src's tokenizer)
    for sealing: its word table re-initialised ("reinit-embeddings"), every weight re-initialised
    ("reinit-all"), or every tensor moved by Gaussian noise of ``scale`` × its own standard
    deviation ("drift", standing in for fine-tuning far from the base)."""
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
    else:
        for t in model.state_dict().values():
            if t.is_floating_point() and t.numel() > 1:
                t.add_(torch.randn(t.shape, generator=gen) * t.std() * scale)
    dst = Path(dst)
    model.save_pretrained(dst)
    copy_preprocessing(src, dst)
    return dst
