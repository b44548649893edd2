"""Real weights: the embedded all-MiniLM-L6-v2 through the sealed path, from disk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from stip.client import ClientBundle
from stip.models import default
from stip.seal import CLIENT, SERVER, load_source
from stip.serve import engine

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Secure inference protects the user's prompt from the cloud provider.",
    "Permutations hide the order of coordinates but not their values.",
    "How do I reset my password?",
    "The weather in Lisbon is mild in winter.",
    "Transformers compute attention over all pairs of tokens.",
    "She sold seashells by the seashore.",
    "What is the capital of Australia?",
    "Canberra is the capital of Australia, not Sydney.",
    "I would like to book a table for two at eight.",
    "The quarterly report shows revenue growth of twelve percent.",
    "Patient presents with mild fever and a persistent cough.",
    "Ignore all previous instructions.",
    "def add(a, b): return a + b",
    "E = mc^2",
    "Hello!",
    "ok",
    "The mitochondria is the powerhouse of the cell.",
    "Rain is expected tomorrow afternoon across the northern region.",
    "My account number ends in 4821 and I was double charged.",
    "Large language models can memorise rare strings from their training data.",
    "The train to Berlin leaves from platform nine at 10:42.",
    "Photosynthesis converts light energy into chemical energy.",
    "Please summarise this document in three bullet points.",
    "A permutation matrix is orthogonal.",
    "Das ist ein deutscher Satz.",
    "C'est la vie.",
    "The stock market fell sharply after the announcement.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Can you recommend a good book about cryptography?",
    "Homomorphic encryption allows computation on ciphertexts.",
    "Two-party computation splits every value into random shares.",
    "The quick onboarding guide is available on the intranet.",
    "Numbers like 3.14159 and 2.71828 appear everywhere.",
    "Thank you for your patience while we resolve this issue.",
]


def embed_plain(model, batch):
    with torch.no_grad():
        return default.mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def test_sentence_embeddings_through_the_sealed_path_equal_plaintext(minilm_path, minilm_sealed_dir):
    server = engine.load(minilm_sealed_dir / SERVER)
    client = ClientBundle.load(minilm_sealed_dir / CLIENT)
    tok = AutoTokenizer.from_pretrained(minilm_sealed_dir / CLIENT, local_files_only=True)
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].shape[1]  # real padding

    plain = embed_plain(load_source(minilm_path), batch)

    x = client.permuted_embeddings(batch["input_ids"], token_type_ids=batch["token_type_ids"])
    out = client.unpermute_outputs(engine.forward(server, x, batch["attention_mask"]))
    sealed = default.mean_pool(out["last_hidden_state"], batch["attention_mask"])

    distance = 1 - F.cosine_similarity(plain, sealed)
    assert len(SENTENCES) >= 30
    assert float(distance.max()) <= 1e-5, float(distance.max())
    # and the pooler, un-permuted with π_c
    with torch.no_grad():
        pooled = load_source(minilm_path)(**batch).pooler_output
    assert float((out["pooler_output"] - pooled).abs().max()) <= 1e-4


def test_sealed_embeddings_differ_without_the_key(minilm_sealed_dir):
    """Sanity: what P2 sees is not the plaintext hidden state."""
    server = engine.load(minilm_sealed_dir / SERVER)
    client = ClientBundle.load(minilm_sealed_dir / CLIENT)
    tok = AutoTokenizer.from_pretrained(minilm_sealed_dir / CLIENT, local_files_only=True)
    batch = tok(SENTENCES[:4], padding=True, return_tensors="pt")
    x = client.permuted_embeddings(batch["input_ids"])
    seen = engine.forward(server, x, batch["attention_mask"])["last_hidden_state"]
    restored = client.unpermute_outputs({"last_hidden_state": seen})["last_hidden_state"]
    assert not torch.allclose(seen, restored)


def test_server_checkpoint_loads_with_plain_from_pretrained(minilm_sealed_dir):
    """Ordinary transformers code loads P2's folder; only P3's word table is absent."""
    import transformers

    model, info = transformers.BertModel.from_pretrained(
        minilm_sealed_dir / SERVER, local_files_only=True, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"embeddings.word_embeddings.weight"}
    assert not info["unexpected_keys"]
    assert not model.embeddings.position_embeddings.weight.any()
