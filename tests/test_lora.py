"""Private LoRA adapters in shares mode: P3 applies them, the servers hold the public base.

Every family through the one harness against PEFT's merged model; the refusals; and the
servers' view, the same with and without an adapter."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import harness
from stip.attacks import shares as attacks
from stip.models import lora
from stip.shares import Servers, ShareServer, SharesModel

TARGETS = {"llama": lora.LLAMA_TARGETS, "bert": ["query", "key", "value", "dense"], "gpt2": ["c_attn", "c_proj", "c_fc"]}


def make_adapter(model, folder, family: str, seed: int, r: int = 4, scale: float = 0.5, **extra) -> None:
    """A random PEFT LoRA on every supported projection, saved as PEFT saves one. B starts at
    zero in a fresh LoRA; here both factors are random, so every delta counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS[family]), init_lora_weights=False,
                     fan_in_fan_out=family == "gpt2", **extra)  # fmt: skip
    wrapped = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    wrapped.save_pretrained(str(folder))


def _check(case: harness.Case, family: str, rounds: int, folder, seed: int) -> None:
    make_adapter(case.model, folder, family, seed)
    merged = lora.merge(copy.deepcopy(case.model), folder)
    reference = harness.Case(merged, case.inputs, case.mask)
    harness.assert_equivalent(reference, run=lambda c: harness.run_shares(c, rounds, base=case.model, adapter=folder))


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=3)
@given(s=harness.text_shape(gqa=True), arch=st.sampled_from(["llama", "qwen2", "mistral"]))
def test_llama_family_with_an_adapter_equals_peft_merged(rounds, s, arch, tmp_path_factory):
    _check(harness.llama_case(s, arch), "llama", rounds, tmp_path_factory.mktemp("lora"), s["seed"])


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=2)
@given(s=harness.text_shape())
def test_bert_with_an_adapter_equals_peft_merged(rounds, s, tmp_path_factory):
    _check(harness.bert_case(s, "BertModel"), "bert", rounds, tmp_path_factory.mktemp("lora"), s["seed"])


@pytest.mark.parametrize("rounds", [2, 4])
@settings(max_examples=2)
@given(s=harness.text_shape())
def test_gpt2_with_an_adapter_equals_peft_merged(rounds, s, tmp_path_factory):
    """GPT-2's Conv1D: PEFT's fan_in_fan_out."""
    _check(harness.gpt2_case(s), "gpt2", rounds, tmp_path_factory.mktemp("lora"), s["seed"])


def _tiny():
    return harness.llama_case(dict(heads=4, kv_heads=2, head_dim=8, layers=2, ffn=24, vocab=40, batch=1, seq=6, lengths=[6], seed=5))


def test_the_adapter_is_read_as_peft_scales_it(tmp_path):
    """rsLoRA and a per-module rank: ΔW equals PEFT's own merge, module by module."""
    case = _tiny()
    make_adapter(case.model, tmp_path, "llama", 1, r=4, use_rslora=True, rank_pattern={"o_proj": 2})
    adapter = lora.load(case.model, tmp_path)
    assert adapter.layers[0]["wo"].rank == 2 and adapter.layers[1]["wq"].rank == 4
    assert adapter.targets == sorted(["wq", "wk", "wv", "wo", "w_gate", "w1", "w2"])
    merged = lora.merge(copy.deepcopy(case.model), tmp_path)
    for i, layer in enumerate(adapter.layers):
        for key, mod in (("wq", "self_attn.q_proj"), ("wo", "self_attn.o_proj"), ("w_gate", "mlp.gate_proj")):
            got = case.model.get_submodule(f"model.layers.{i}.{mod}").weight.T.double() + torch.from_numpy(layer[key].delta())
            want = merged.get_submodule(f"model.layers.{i}.{mod}").weight.T.double()
            assert torch.allclose(got, want, atol=1e-6), (i, key)
    assert not any("lora" in n for n, _ in case.model.named_modules())  # the base is left as it was


@pytest.mark.parametrize("extra, message", [
    ({"use_dora": True}, "DoRA"),
    ({"bias": "lora_only"}, "trained biases"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["embed_tokens", "q_proj"]}, "an embedding adapter"),
    ({"target_modules": ["lm_head"]}, "a head adapter"),
])  # fmt: skip
def test_what_is_not_plain_lora_on_the_projections_is_refused_by_name(tmp_path, extra, message):
    from peft import LoraConfig, get_peft_model

    case = _tiny()
    cfg = {"r": 2, "target_modules": ["q_proj"], **extra}
    get_peft_model(copy.deepcopy(case.model), LoraConfig(**cfg)).save_pretrained(str(tmp_path))
    with pytest.raises(lora.UnsupportedAdapter, match=message):
        lora.load(case.model, tmp_path)
    assert not any("lora" in n for n, _ in case.model.named_modules())


def test_an_adapter_for_another_base_is_refused(tmp_path):
    other = harness.llama_case(dict(heads=2, kv_heads=2, head_dim=4, layers=2, ffn=24, vocab=40, batch=1, seq=6, lengths=[6], seed=5))
    make_adapter(other.model, tmp_path, "llama", 1)
    model = _tiny().model
    with pytest.raises(lora.UnsupportedAdapter, match="does not fit this model"):
        lora.load(model, tmp_path)
    assert not any("lora" in n for n, _ in model.named_modules())  # the failed load is undone


def test_a_folder_that_is_no_adapter_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        lora.load(_tiny().model, tmp_path)
    (tmp_path / lora.CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        lora.load(_tiny().model, tmp_path)


@pytest.mark.parametrize("rounds", [2, 4])
def test_a_server_receives_the_same_ops_and_shapes_with_and_without_the_adapter(rounds, tmp_path):
    case = _tiny()
    make_adapter(case.model, tmp_path, "llama", 2, scale=2.0)
    seen: dict[str, list] = {"base": [], "adapted": []}
    outputs = {}
    for run, adapter in (("base", None), ("adapted", tmp_path)):
        server = ShareServer.from_model(case.model, observe=lambda op, x, run=run: seen[run].append((op, x.shape, x.dtype)))
        other = ShareServer.from_model(case.model)
        with server.listen() as a, other.listen() as b, Servers([a.address, b.address]) as conn:
            p3 = SharesModel(case.model, conn, rounds, adapter)
            assert conn.hellos[0]["fingerprint"] == ShareServer.from_model(case.model).fingerprint  # the base's
            outputs[run] = p3.generate([1, 2, 3, 4], 6, keep_logits=True, stop_at_eos=False)
    assert seen["base"] == seen["adapted"] and len(seen["base"]) > 0
    assert not torch.allclose(torch.stack(outputs["base"].logits), torch.stack(outputs["adapted"].logits), atol=1e-2)


def test_with_an_adapter_a_servers_view_is_uniform_and_vocabulary_matching_at_chance(minilm_path, tmp_path):
    """The attack suite's input matching and the byte test on MiniLM with a BERT adapter in use."""
    from transformers import AutoTokenizer

    from stip.seal import load_source

    model, tok = load_source(minilm_path), AutoTokenizer.from_pretrained(minilm_path)
    make_adapter(model, tmp_path, "bert", 3, r=8)
    assert lora.load(model, tmp_path).unused == ("pooler.dense",)  # "dense" matches the pooler, which P3 never computes
    ids = [tok(t)["input_ids"] for t in ("My password is hunter2.", "John has diabetes.")]
    views = attacks.observe(model, ids, adapter=tmp_path)
    for server in (0, 1):
        assert attacks.uniformity(views.bytes[server])["passed"] == 1.0
        assert attacks.vocab_input(views, server, model, ids)["rate"] <= 1 / 14
    assert attacks.vocab_input(attacks.unmasked(views), 0, model, ids)["rate"] == 1.0  # the control reads the view right
