"""The one equivalence harness: build a model from a config, give every norm random γ/β,
seal, run the plaintext model and the sealed path (P3 embeds and permutes — or, in token
mode, renames the ids —, P2 runs the sealed checkpoint, P3 un-permutes), compare. Shares
mode goes through the same comparison (``run=run_shares``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as T
from hypothesis import strategies as st

from stip.seal import Sealed, seal
from stip.serve import engine

ATOL = 1e-4


def randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial γ and β everywhere, so that a forgotten norm permutation shows."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.5)


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict  # what the plaintext model takes
    mask: torch.Tensor | None  # which token positions are real

    @property
    def modality(self) -> str:
        return "image" if "pixel_values" in self.inputs else "text"


def text_inputs(vocab: int, batch: int, seq: int, lengths: list[int], gen: torch.Generator):
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}, mask


def run_plain(case: Case) -> dict:
    with torch.no_grad():
        out = case.model(**case.inputs)
    return {k: out[k] for k in ("last_hidden_state", "pooler_output", "logits") if out.get(k) is not None}


def run_sealed(sealed: Sealed, case: Case) -> dict:
    client = sealed.client
    if client.mode == "tokens":  # P2 runs its checkpoint's own forward on renamed ids
        ids = torch.tensor([client.rename_ids(row) for row in case.inputs["input_ids"].tolist()])
        with torch.no_grad():
            logits = sealed.server(input_ids=ids, attention_mask=case.inputs["attention_mask"]).logits
        return client.unpermute_outputs({"logits": logits})
    if case.modality == "image":
        x = client.permuted_embeddings(case.inputs["pixel_values"])
        out = engine.forward(sealed.server, x)
    else:
        x = client.permuted_embeddings(case.inputs["input_ids"])
        out = engine.forward(sealed.server, x, attention_mask=case.inputs["attention_mask"])
    return client.unpermute_outputs(out)


def run_shares(case: Case, rounds: int = 2, base: torch.nn.Module | None = None, adapter=None) -> dict:
    """Shares mode: two share servers (threads, real sockets) do the weight matmuls on
    additive shares; P3 walks the model on the ``rounds``-per-layer schedule. The servers cut
    shares into 2 and 3 limbs: each may choose its own. With an ``adapter`` (a PEFT folder),
    the servers and P3 hold ``base`` and P3 applies the adapter: ``case.model`` is then the
    merged model, the reference."""
    from stip.shares import Servers, ShareServer, SharesModel

    model = case.model if base is None else base
    s1, s2 = ShareServer.from_model(model, limbs=2), ShareServer.from_model(model, limbs=3)
    with s1.listen() as a, s2.listen() as b, Servers([a.address, b.address]) as servers:
        return SharesModel(model, servers, rounds, adapter).forward(case.inputs["input_ids"], case.inputs["attention_mask"])


def run_shares_4(case: Case) -> dict:
    return run_shares(case, rounds=4)


def assert_equivalent(case: Case, sealed: Sealed | None = None, atol: float = ATOL, run=None) -> float:
    """Sealed path (or ``run(case)``, another private path) == plaintext within ``atol`` on
    real positions, same argmax wherever plaintext's top two differ by more than ``atol``.
    Returns max error."""
    plain = run_plain(case)
    got = run(case) if run is not None else run_sealed(sealed or seal(case.model), case)
    assert got, "the private path returned no outputs"
    worst = 0.0
    for name, value in got.items():
        ref = plain[name]
        assert value.shape == ref.shape, name
        if value.dim() == 3 and case.mask is not None:  # per-token outputs: real tokens only
            keep = case.mask.bool()
            value, ref = value[keep], ref[keep]
        err = float((value - ref).abs().max())
        worst = max(worst, err)
        assert err <= atol, f"{name}: max abs error {err:.2e} > {atol:.0e}"
        if name == "logits":  # where the reference ties within atol there is no argmax to keep
            top = ref.topk(2, dim=-1).values
            clear = top[..., 0] - top[..., 1] > atol
            assert torch.equal(value.argmax(-1)[clear], ref.argmax(-1)[clear]), f"{name}: argmax differs"
    return worst


# --- configs drawn by hypothesis --------------------------------------------------------------------


@st.composite
def text_shape(draw, gqa: bool = False):
    kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3)) if gqa else 1
    heads = kv * group if gqa else draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(1, 9))
    lengths = [seq] + [draw(st.integers(1, seq)) for _ in range(batch - 1)]  # padding in the batch
    return dict(
        heads=heads,
        kv_heads=kv if gqa else heads,
        head_dim=head_dim,
        layers=draw(st.integers(1, 2)),
        ffn=draw(st.integers(4, 48)),
        vocab=draw(st.integers(8, 64)),
        batch=batch,
        seq=seq,
        lengths=lengths,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _seeded(seed: int) -> torch.Generator:
    """Seed torch's global generator (weight init) and return one for the inputs."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _finish(model, gen) -> torch.nn.Module:
    randomize_norms(model, gen)
    return model.eval()


def bert_case(s: dict, head: str) -> Case:
    gen = _seeded(s["seed"])
    cfg = T.BertConfig(
        hidden_size=s["heads"] * s["head_dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        vocab_size=s["vocab"],
        max_position_embeddings=16,
        num_labels=3 + s["seed"] % 5,
        initializer_range=0.1,
    )
    model = _finish(getattr(T, head)(cfg), gen)
    inputs, mask = text_inputs(s["vocab"], s["batch"], s["seq"], s["lengths"], gen)
    return Case(model, inputs, mask)


def gpt2_case(s: dict) -> Case:
    gen = _seeded(s["seed"])
    cfg = T.GPT2Config(
        n_embd=s["heads"] * s["head_dim"],
        n_layer=s["layers"],
        n_head=s["heads"],
        n_inner=s["ffn"],
        vocab_size=s["vocab"],
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.1,
    )
    model = _finish(T.GPT2LMHeadModel(cfg), gen)
    inputs, mask = text_inputs(s["vocab"], s["batch"], s["seq"], s["lengths"], gen)
    return Case(model, inputs, mask)


def llama_case(s: dict, arch: str = "llama", tie: bool = False) -> Case:
    gen = _seeded(s["seed"])
    cfg_cls, model_cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
    }[arch]
    cfg = cfg_cls(
        hidden_size=s["heads"] * s["head_dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        intermediate_size=s["ffn"],
        vocab_size=s["vocab"],
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = model_cls(cfg)
    if arch == "qwen2":  # Qwen2's QKV biases start at zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    model = _finish(model, gen)
    inputs, mask = text_inputs(s["vocab"], s["batch"], s["seq"], s["lengths"], gen)
    return Case(model, inputs, mask)


@st.composite
def vision_shape(draw):
    heads = draw(st.integers(1, 4))
    return dict(
        heads=heads,
        head_dim=draw(st.sampled_from([2, 4, 8])),
        layers=draw(st.integers(1, 2)),
        ffn=draw(st.integers(4, 48)),
        patch=draw(st.sampled_from([2, 4])),
        grid=draw(st.integers(1, 4)),
        batch=draw(st.integers(1, 3)),
        labels=draw(st.integers(2, 10)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def vit_case(s: dict) -> Case:
    gen = _seeded(s["seed"])
    size = s["patch"] * s["grid"]
    cfg = T.ViTConfig(
        hidden_size=s["heads"] * s["head_dim"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        image_size=size,
        patch_size=s["patch"],
        num_labels=s["labels"],
        initializer_range=0.1,
    )
    model = _finish(T.ViTForImageClassification(cfg), gen)
    return Case(model, {"pixel_values": torch.randn(s["batch"], 3, size, size, generator=gen)}, None)


@st.composite
def swin_shape(draw):
    stages = draw(st.integers(1, 3))
    window = draw(st.sampled_from([2, 4]))
    return dict(
        embed=draw(st.sampled_from([4, 8, 12])),
        depths=[draw(st.integers(1, 2)) for _ in range(stages)],
        heads=[draw(st.sampled_from([1, 2, 4])) for _ in range(stages)],
        window=window,
        patch=draw(st.sampled_from([1, 2])),
        batch=draw(st.integers(1, 2)),
        labels=draw(st.integers(2, 10)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def swin_case(s: dict) -> Case:
    gen = _seeded(s["seed"])
    stages = len(s["depths"])
    # Each stage halves the grid; the last stage's grid must still hold one window.
    size = s["patch"] * s["window"] * 2 ** (stages - 1)
    heads = [h for h in s["heads"]]
    embed = s["embed"]
    heads = [h if (embed * 2**i) % h == 0 else 1 for i, h in enumerate(heads)]
    cfg = T.SwinConfig(
        image_size=size,
        patch_size=s["patch"],
        embed_dim=embed,
        depths=s["depths"],
        num_heads=heads,
        window_size=s["window"],
        mlp_ratio=2.0,
        num_labels=s["labels"],
        initializer_range=0.1,
    )
    model = T.SwinForImageClassification(cfg)
    with torch.no_grad():  # relative-position tables start at zero: make the head order count
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=gen))
    model = _finish(model, gen)
    return Case(model, {"pixel_values": torch.randn(s["batch"], 3, size, size, generator=gen)}, None)
