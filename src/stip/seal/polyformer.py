"""The polynomial transformers of stip.models.polyformer (the CKKS baseline's models), the ViT
and the LM, so that STIP runs on the very model HE runs on.

    patch or token embedding, position       P3's (the client embeds the patches or tokens)
    norm1 / norm2 / norm (BatchNorm)         γ, β, running mean and variance [π]
    attn q, k / v, o                         as BERT: π_{i,1} / π_{i,2} head-structured
    fc1 / norm_mlp / fc2                     in π, out π_{i,3} / [π_{i,3}] / in π_{i,3}, out π
    head (after the mean pool, or per token) in π, out π_c (the classes, or the vocabulary)

The attention activation is pointwise on QKᵀ, which head-structured permutations leave
unchanged up to the head order, so the rule is BERT's. Not behind ``stip.seal.seal``'s
dispatch: that one reads a Hugging Face config; this model has none.

    sealed = seal(model)                     # Sealed(server, client, key), model untouched
    logits = sealed.client.decode(sealed.server.body(sealed.client.embed(images or ids)))
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import torch

from . import rules
from .. import keys as keys_
from ..client.bundle import permute, unpermute
from ..models import polyformer
from ..keys import PI, PI_C, Attention, Free, Key

MODEL_TYPES = ("stip-polyformer",)
ARCHITECTURES = ("PolyViT", "PolyLM")


def layout(model) -> dict:
    c = model.cfg
    out = {PI: Free(c.dim), PI_C: Free(c.vocab if c.causal else c.classes)}
    for i, blk in enumerate(model.blocks):
        out[f"layer.{i}.attn"] = Attention(c.heads, c.heads, c.dim // c.heads, rope=False)
        out[f"layer.{i}.ffn"] = Free(blk.fc1.out_features)
    return out


def identity(model) -> dict:
    h = hashlib.sha256(json.dumps(model.cfg.to_json(), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return {"model_type": MODEL_TYPES[0], "architecture": type(model).__name__, "digest": h.hexdigest()}


def seal_(model, key: Key, step=lambda _: None) -> None:
    pi = key.pi
    for i, blk in enumerate(model.blocks):
        q, k, v, o = key.attention(f"layer.{i}.attn")
        ffn = key[f"layer.{i}.ffn"]
        rules.batch_norm(blk.norm1, pi)
        rules.linear(blk.attn.q, pi, q)
        rules.linear(blk.attn.k, pi, k)
        rules.linear(blk.attn.v, pi, v)
        rules.linear(blk.attn.o, o, pi)
        rules.batch_norm(blk.norm2, pi)
        rules.linear(blk.fc1, pi, ffn)
        rules.batch_norm(blk.norm_mlp, ffn)
        rules.linear(blk.fc2, ffn, pi)
        step(f"layer.{i}")
    rules.batch_norm(model.norm, pi)
    rules.linear(model.head, pi, key.pi_c)
    step("head")


def _embedding(model) -> list[torch.Tensor]:
    """The weights of the user's side: what P2 never holds."""
    first = (model.tokens.weight,) if model.cfg.causal else (model.patch.weight, model.patch.bias)
    return [*first, model.pos]


class Client:
    """P3: the patch (ViT) or token (LM) and position embedding and the client key (π, π_c);
    no other weight."""

    def __init__(self, model, key: keys_.ClientKey):
        self.cfg = model.cfg
        self.embedding = copy.deepcopy(model.tokens if model.cfg.causal else model.patch).eval()
        self.pos = model.pos.detach().clone()
        self.key = key

    @torch.no_grad()
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Images (batch, C, H, W), or token ids (batch, n) → permuted embeddings."""
        if self.cfg.causal:
            x = self.embedding(inputs) + self.pos[:, : inputs.shape[1]]
        else:
            x = self.embedding(polyformer.patches(inputs, self.cfg.patch)) + self.pos
        return permute(x, self.key.pi)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        return unpermute(logits, self.key.pi_c)


@dataclass
class Sealed:
    server: torch.nn.Module  # P2's PolyViT or PolyLM: sealed blocks and head, embedding weights zeroed
    client: Client
    key: Key


def seal(model, key: Key | None = None) -> Sealed:
    spec, ident = layout(model), identity(model)
    if key is None:
        key = keys_.generate(spec, ident)
    else:
        key.matches(spec, ident)
    server = copy.deepcopy(model).eval()
    seal_(server, key)
    with torch.no_grad():  # P2 never holds P3's embedding
        for t in _embedding(server):
            t.zero_()
    return Sealed(server=server, client=Client(model, key.client_key()), key=key)
