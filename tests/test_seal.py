"""Sealed == original, per family, on random small configs (random γ/β on every norm)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers as T
from hypothesis import given, settings

import harness
from stip import keys
from stip.seal import UnsupportedModel, llama, rules, seal, supported

EXAMPLES = settings(max_examples=30)


@EXAMPLES
@given(harness.text_shape())
def test_bert_base(s):
    harness.assert_equivalent(harness.bert_case(s, "BertModel"))


@EXAMPLES
@given(harness.text_shape())
def test_bert_sequence_classification(s):
    harness.assert_equivalent(harness.bert_case(s, "BertForSequenceClassification"))


@settings(max_examples=5)
@given(harness.text_shape())
def test_bert_token_classification(s):
    harness.assert_equivalent(harness.bert_case(s, "BertForTokenClassification"))


@EXAMPLES
@given(harness.text_shape())
def test_gpt2(s):
    harness.assert_equivalent(harness.gpt2_case(s))


@EXAMPLES
@given(harness.text_shape(gqa=True))
def test_llama_gqa(s):
    harness.assert_equivalent(harness.llama_case(s, "llama"))


@EXAMPLES
@given(harness.text_shape(gqa=True))
def test_qwen2_gqa_biases(s):
    harness.assert_equivalent(harness.llama_case(s, "qwen2"))


@settings(max_examples=10)
@given(harness.text_shape(gqa=True))
def test_mistral_gqa(s):
    harness.assert_equivalent(harness.llama_case(s, "mistral"))


@settings(max_examples=5)
@given(harness.text_shape(gqa=True))
def test_llama_tied_embeddings_are_untied(s):
    case = harness.llama_case(s, "llama", tie=True)
    sealed = seal(case.model)
    assert sealed.server.lm_head.weight is not sealed.server.get_input_embeddings().weight
    assert sealed.server.config.tie_word_embeddings is False
    harness.assert_equivalent(case, sealed)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@settings(max_examples=15)
@given(s=harness.text_shape(gqa=True))
def test_token_mode(family, s):
    case = harness.gpt2_case(s) if family == "gpt2" else harness.llama_case(s, family, tie=s["seed"] % 2 == 0)
    sealed = seal(case.model, mode="tokens")
    assert sealed.client.tensors == {} and sealed.client.key.tokens_only
    harness.assert_equivalent(case, sealed)
    # the engine feeds its own sampled id back: greedy decoding on renamed ids, restored, is plaintext's
    prompt = case.inputs["input_ids"][:1, : s["lengths"][0]]
    with torch.no_grad():
        ones = torch.ones_like(prompt)  # else generate infers a mask from the pad id
        plain = case.model.generate(prompt, attention_mask=ones, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        renamed = torch.tensor([sealed.client.rename_ids(prompt[0].tolist())])
        got = sealed.server.generate(renamed, attention_mask=ones, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert sealed.client.restore_ids(got[0, prompt.shape[1]:].tolist()) == plain[0, prompt.shape[1]:].tolist()


def test_token_mode_retied_head_and_renamed_special_ids():
    s = dict(heads=2, kv_heads=1, head_dim=4, layers=1, ffn=8, vocab=40, batch=1, seq=3, lengths=[3], seed=3)
    case = harness.llama_case(s, "llama", tie=True)
    case.model.config.eos_token_id, case.model.generation_config.eos_token_id = 7, [7, 9]
    case.model.config._model_name_or_path = "SmolLM2 135M"  # what a GGUF names its model
    sealed = seal(case.model, mode="tokens")
    server = sealed.server
    assert "_model_name_or_path" not in server.config.to_dict()
    assert server.lm_head.weight is server.get_input_embeddings().weight and server.config.tie_word_embeddings
    assert sealed.client.restore_ids([server.config.eos_token_id]) == [7]
    assert sealed.client.restore_ids(server.generation_config.eos_token_id) == [7, 9]
    assert case.model.config.eos_token_id == 7  # the original is untouched


def test_token_mode_is_for_causal_models_only():
    s = dict(heads=2, kv_heads=2, head_dim=4, layers=1, ffn=8, vocab=40, batch=1, seq=3, lengths=[3], seed=3)
    with pytest.raises(UnsupportedModel, match="token mode"):
        seal(harness.bert_case(s, "BertModel").model, mode="tokens")
    with pytest.raises(ValueError, match="unknown mode"):
        seal(harness.bert_case(s, "BertModel").model, mode="rows")


@EXAMPLES
@given(harness.vision_shape())
def test_vit(s):
    harness.assert_equivalent(harness.vit_case(s))


@EXAMPLES
@given(harness.swin_shape())
def test_swin(s):
    harness.assert_equivalent(harness.swin_case(s))


def test_original_model_is_untouched():
    case = harness.bert_case(_fixed_shape(), "BertForSequenceClassification")
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    seal(case.model)
    after = case.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_server_holds_no_client_table():
    case = harness.gpt2_case(_fixed_shape())
    server = seal(case.model).server
    assert not server.transformer.wte.weight.any()
    assert not server.transformer.wpe.weight.any()


# --- the harness can fail: each rule is load-bearing ------------------------------------------------


def _fixed_shape(**over):
    s = dict(heads=4, kv_heads=2, head_dim=4, layers=2, ffn=24, vocab=40, batch=2, seq=6, lengths=[6, 3], seed=7)
    s.update(over)
    return s


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit", "swin"])
def test_forgotten_norm_permutation_is_caught(family, monkeypatch):
    case = {
        "bert": lambda: harness.bert_case(_fixed_shape(kv_heads=4), "BertModel"),
        "gpt2": lambda: harness.gpt2_case(_fixed_shape(kv_heads=4)),
        "llama": lambda: harness.llama_case(_fixed_shape()),
        "vit": lambda: harness.vit_case(dict(heads=2, head_dim=4, layers=1, ffn=16, patch=2, grid=2, batch=2, labels=5, seed=3)),
        "swin": lambda: harness.swin_case(dict(embed=8, depths=[1, 1], heads=[2, 2], window=2, patch=1, batch=2, labels=5, seed=3)),
    }[family]()
    real_norm, calls = rules.norm, []

    def forgetful(mod, p):
        calls.append(mod)
        if len(calls) > 1:  # skip the first norm only
            real_norm(mod, p)

    monkeypatch.setattr(rules, "norm", forgetful)
    with pytest.raises(AssertionError):
        harness.assert_equivalent(case)


def test_rope_forbids_shuffles_inside_heads(monkeypatch):
    """Shuffling inside Q/K heads, which is fine without RoPE, breaks LLaMA."""
    real = llama.layout

    def no_rope(model):
        return {n: replace(s, rope=False) if isinstance(s, keys.Attention) else s for n, s in real(model).items()}

    monkeypatch.setattr(llama, "layout", no_rope)
    with pytest.raises(AssertionError):
        harness.assert_equivalent(harness.llama_case(_fixed_shape()))


def test_unsupported_architecture_lists_the_supported_ones():
    model = T.DistilBertModel(T.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=30))
    with pytest.raises(UnsupportedModel) as e:
        seal(model)
    for arch in ("BertModel", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "ViTForImageClassification", "SwinForImageClassification"):
        assert arch in str(e.value)


def test_unsupported_head_of_a_supported_family():
    model = T.BertForMaskedLM(T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=30))
    with pytest.raises(UnsupportedModel, match="BertForMaskedLM is not supported"):
        seal(model)


def test_supported_lists_every_family():
    assert set(supported()) >= {"bert", "gpt2", "llama", "qwen2", "vit", "swin"}


def test_key_of_another_model_is_refused():
    a = harness.bert_case(_fixed_shape(kv_heads=4, seed=1), "BertModel").model
    b = harness.bert_case(_fixed_shape(kv_heads=4, seed=2), "BertModel").model
    with pytest.raises(keys.InvalidKey, match="belongs to model"):
        seal(b, seal(a).key)


def test_permutations_are_applied_by_gather_not_dense_matrices():
    """A sealed weight is a re-indexing of the original: same multiset of values."""
    case = harness.gpt2_case(_fixed_shape(kv_heads=4))
    sealed = seal(case.model).server
    w0 = case.model.transformer.h[0].mlp.c_fc.weight.detach().flatten().sort().values
    w1 = sealed.transformer.h[0].mlp.c_fc.weight.detach().flatten().sort().values
    assert torch.equal(w0, w1)
    assert not torch.equal(case.model.transformer.h[0].mlp.c_fc.weight, sealed.transformer.h[0].mlp.c_fc.weight)
    assert np.array_equal(np.sort(seal(case.model).key.pi), np.arange(case.model.config.n_embd))


# --- on disk: what P2 and P3 load from their folders ---------------------------------------------


@pytest.mark.parametrize("family", ["bert", "bert-cls", "gpt2", "llama", "qwen2", "vit", "swin"])
def test_disk_round_trip(family, tmp_path):
    """seal_folder, then P2 loads server/ with from_pretrained and P3 loads client/:
    the outputs still equal the original's."""
    from stip.client import ClientBundle
    from stip.seal import Sealed, seal_folder
    from stip.serve import engine

    case = {
        "bert": lambda: harness.bert_case(_fixed_shape(kv_heads=4), "BertModel"),
        "bert-cls": lambda: harness.bert_case(_fixed_shape(kv_heads=4), "BertForSequenceClassification"),
        "gpt2": lambda: harness.gpt2_case(_fixed_shape(kv_heads=4)),
        "llama": lambda: harness.llama_case(_fixed_shape(), "llama", tie=True),
        "qwen2": lambda: harness.llama_case(_fixed_shape(), "qwen2"),
        "vit": lambda: harness.vit_case(dict(heads=2, head_dim=4, layers=2, ffn=16, patch=2, grid=3, batch=2, labels=5, seed=3)),
        "swin": lambda: harness.swin_case(dict(embed=8, depths=[2, 1], heads=[2, 4], window=2, patch=1, batch=2, labels=5, seed=3)),
    }[family]()
    src, out = tmp_path / "src", tmp_path / "out"
    case.model.save_pretrained(src)
    key = seal_folder(src, out).key
    loaded = Sealed(server=engine.load(out / "server"), client=ClientBundle.load(out / "client"), key=key)
    assert engine.fingerprint(loaded.server) == key.fingerprint == loaded.client.fingerprint
    harness.assert_equivalent(case, loaded)


def test_label_names_stay_with_the_client(tmp_path):
    from stip.seal import seal_folder

    case = harness.bert_case(_fixed_shape(kv_heads=4), "BertForSequenceClassification")
    n = case.model.config.num_labels
    case.model.config.id2label = {i: f"secret-{i}" for i in range(n)}
    case.model.config.label2id = {v: k for k, v in case.model.config.id2label.items()}
    case.model.save_pretrained(tmp_path / "src")
    seal_folder(tmp_path / "src", tmp_path / "out")
    assert "secret-" not in (tmp_path / "out/server/config.json").read_text()
    assert "secret-0" in (tmp_path / "out/client/config.json").read_text()
    assert '"stip"' not in (tmp_path / "out/client/config.json").read_text()


def _poly_vit():
    from stip.models import polyformer as pf

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = pf.PolyViT(pf.PRESETS["digits"]).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a forgotten one shows
        for m in model.modules():
            if isinstance(m, pf.Norm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    images = torch.rand(6, 1, 8, 8, generator=gen) * 16
    pf.to_polynomial(model, images, degree=4)
    return model, images


def _poly_sealed_error(model, images):
    from stip.seal import polyformer as seal_polyformer

    sealed = seal_polyformer.seal(model)
    with torch.no_grad():
        got, ref = sealed.client.decode(sealed.server.body(sealed.client.embed(images))), model(images)
    return float((got - ref).abs().max() / ref.abs().max()), sealed  # relative: untrained logits are large


def test_polynomial_vit_seals_losslessly():
    model, images = _poly_vit()
    err, sealed = _poly_sealed_error(model, images)
    assert err < 1e-5
    assert not sealed.server.patch.weight.any() and not sealed.server.pos.any()  # P3's part
    assert not torch.equal(sealed.server.blocks[0].fc1.weight, model.blocks[0].fc1.weight)
    assert not hasattr(sealed.client, "blocks")  # P3 holds the embedding only


def test_forgotten_batch_norm_permutation_is_caught(monkeypatch):
    model, images = _poly_vit()
    real, calls = rules.batch_norm, []

    def forgetful(mod, p):
        calls.append(mod)
        if len(calls) > 1:
            real(mod, p)

    monkeypatch.setattr(rules, "batch_norm", forgetful)
    assert _poly_sealed_error(model, images)[0] > 1e-2
