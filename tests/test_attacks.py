"""Attacks from P2's side on the real MiniLM: the documented limitations are real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from stip.attacks import known_plaintext, vocab_match
from stip.seal import load_source, seal

TEXTS = ["The quick brown fox jumps over the lazy dog.", "My password is hunter2 and my bank is in Zurich.",
         "Patient John Smith was diagnosed with diabetes in 2019."]


@pytest.fixture(scope="module")
def public(minilm_path):
    model = load_source(minilm_path)
    enc = AutoTokenizer.from_pretrained(minilm_path)(TEXTS, padding=True, return_tensors="pt")
    e = model.embeddings
    offsets = e.position_embeddings.weight[: enc["input_ids"].shape[1]] + e.token_type_embeddings.weight[0]
    return model, enc, offsets


def _rate(model_for_user, public_model, enc, offsets) -> float:
    """Seal ``model_for_user``; P2 matches what it receives against the *public* tables."""
    sealed = seal(model_for_user)
    x = sealed.client.permuted_embeddings(enc["input_ids"])
    ids = vocab_match(x, public_model.embeddings.word_embeddings.weight, offsets)
    mask = enc["attention_mask"].bool()
    return float((ids == enc["input_ids"])[mask].float().mean())


@pytest.mark.slow
def test_vocab_matching_recovers_tokens_of_a_public_model(public):
    model, enc, offsets = public
    assert _rate(model, model, enc, offsets) >= 0.9  # measured: 1.0 (38 of 38 tokens)


@pytest.mark.slow
def test_vocab_matching_fails_on_private_embeddings(public, minilm_path):
    model, enc, offsets = public
    private = load_source(minilm_path)
    torch.manual_seed(1)
    torch.nn.init.normal_(private.embeddings.word_embeddings.weight, std=0.05)
    assert _rate(private, model, enc, offsets) <= 0.1


def test_known_plaintext_recovers_pi_exactly(public):
    model, enc, offsets = public
    sealed = seal(model)
    x_perm = sealed.client.permuted_embeddings(enc["input_ids"][:1])
    with torch.no_grad():
        x = model.embeddings.word_embeddings(enc["input_ids"][:1]) + offsets
    assert np.array_equal(known_plaintext(x[0].numpy(), x_perm[0].numpy()), sealed.key.pi)
