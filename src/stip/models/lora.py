"""LoRA adapters (PEFT folders) as P3 holds them in shares mode, and training one here.

A standard PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) is read with
the ``peft`` library itself, so ranks, ``lora_alpha``, rsLoRA, rank and alpha patterns and
``fan_in_fan_out`` mean what they mean to PEFT. What comes out is, per layer and per adapted
weight of `blocks`' layout (``wq wk wv wo w_gate w1 w2``, each ``x @ W`` with W (in, out)), the
two factors of ΔW = A·B·(α/r), the scale folded into B:

    adapter = load(model, "my-adapter")      # model: the public base, a transformers model
    adapter.layers[3]["wq"].a                # (in, r)
    merge(model, "my-adapter")               # the plaintext reference: PEFT's merged model
    train(base_dir, "out", steps=300)        # a LoRA on CPython's docs, resumable

Only plain LoRA on the seven LLaMA projections, BERT's ``query key value dense`` and GPT-2's
``c_attn c_proj c_fc`` is taken: anything that changes more than x·A·B (DoRA and the other
variants, trained biases, embedding or head adapters, whole modules saved beside the adapter)
is refused by name.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import StipError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# family → {module path inside a layer: the blocks weights it adapts (several: split by columns)}
_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"self_attn.q_proj": ("wq",), "self_attn.k_proj": ("wk",), "self_attn.v_proj": ("wv",),
              "self_attn.o_proj": ("wo",), "mlp.gate_proj": ("w_gate",), "mlp.up_proj": ("w1",), "mlp.down_proj": ("w2",)},
    "bert": {"attention.self.query": ("wq",), "attention.self.key": ("wk",), "attention.self.value": ("wv",),
             "attention.output.dense": ("wo",), "intermediate.dense": ("w1",), "output.dense": ("w2",)},
    "gpt2": {"attn.c_attn": ("wq", "wk", "wv"), "attn.c_proj": ("wo",), "mlp.c_fc": ("w1",), "mlp.c_proj": ("w2",)},
}  # fmt: skip
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h)\.(\d+)\.(.+)$")
# Outside what shares mode computes: BERT's pooler (P3 mean-pools the hidden states), which a
# LoRA on "dense" also matches. Its delta is left out, and the Adapter says so.
_UNUSED = re.compile(r"(?:^|\.)pooler\.dense$")


class UnsupportedAdapter(StipError, ValueError):
    """An adapter that is not plain LoRA on the supported projections."""


@dataclass(frozen=True)
class Factors:
    """ΔW = a @ b for one weight: a (in, r), b (r, out) with the scale α/r folded in."""

    a: np.ndarray
    b: np.ndarray

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    def delta(self) -> np.ndarray:
        return self.a.astype(np.float64) @ self.b.astype(np.float64)


@dataclass(frozen=True)
class Adapter:
    layers: tuple[dict[str, Factors], ...]  # one dict per transformer layer (empty: not adapted)
    source: str = ""
    unused: tuple[str, ...] = ()  # adapted modules outside what shares mode computes (BERT's pooler)

    @property
    def targets(self) -> list[str]:
        return sorted({k for layer in self.layers for k in layer})

    @property
    def parameters(self) -> int:
        return sum(f.a.size + f.b.size for layer in self.layers for f in layer.values())

    def merged(self, params: dict) -> dict:
        """`blocks` params with W + ΔW: the adapted model as a walk reads it."""
        layers = []
        for p, deltas in zip(params["layers"], self.layers):
            p = dict(p)
            for key, f in deltas.items():
                p[key] = (np.asarray(p[key], np.float64) + f.delta()).astype(np.float32)
            layers.append(p)
        return {**params, "layers": layers}


def _family(model) -> str:
    from .source import family

    name = family(model)
    if name not in _MODULES:
        raise UnsupportedAdapter(f"adapters are supported on {', '.join(_MODULES)} models, not {name}")
    return name


def _config(folder: Path):
    from peft import PeftConfig

    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no {CONFIG})")
    if not (folder / WEIGHTS).is_file() and not (folder / "adapter_model.bin").is_file():
        raise FileNotFoundError(f"{folder} holds {CONFIG} but no {WEIGHTS}")
    cfg = PeftConfig.from_pretrained(str(folder))
    kind = str(getattr(cfg, "peft_type", ""))
    if not kind.endswith("LORA") or kind.endswith("ADALORA"):
        raise UnsupportedAdapter(f"{folder}: a {kind.rsplit('.', 1)[-1]} adapter; only LoRA is supported")
    refused = [
        (getattr(cfg, "use_dora", False), "DoRA (use_dora)"),
        (getattr(cfg, "bias", "none") != "none", f"trained biases (bias={getattr(cfg, 'bias', None)!r})"),
        (getattr(cfg, "lora_bias", False), "a trained bias on lora_B (lora_bias)"),
        (getattr(cfg, "modules_to_save", None), f"whole modules saved beside the adapter (modules_to_save={getattr(cfg, 'modules_to_save', None)})"),
        (getattr(cfg, "trainable_token_indices", None), "trained embedding rows (trainable_token_indices)"),
        (getattr(cfg, "alora_invocation_tokens", None), "activated LoRA (alora_invocation_tokens)"),
        (getattr(cfg, "layer_replication", None), "layer replication"),
        (getattr(cfg, "target_parameters", None), "adapters on parameters (target_parameters)"),
        (getattr(cfg, "use_qalora", False), "QA-LoRA (use_qalora)"),
    ]  # fmt: skip
    for bad, what in refused:
        if bad:
            raise UnsupportedAdapter(f"{folder}: {what} is not supported in shares mode: only plain LoRA (x·A·B) on the base projections")
    return cfg


def load(model, folder: str | Path) -> Adapter:
    """The adapter in ``folder`` for ``model`` (the public base, a loaded transformers model),
    read with PEFT. The model is left as it was."""
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear, LoraLayer

    folder = Path(folder)
    _config(folder)
    family, n = _family(model), model.config.num_hidden_layers
    layers: list[dict[str, Factors]] = [{} for _ in range(n)]
    unused: list[str] = []
    try:
        wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, KeyError, ValueError) as e:  # e.g. shapes of another base
        _restore(model)
        raise UnsupportedAdapter(f"{folder} does not fit this model: {str(e).splitlines()[0][:300]}") from None
    try:
        name = wrapped.active_adapter
        for path, mod in wrapped.base_model.model.named_modules():
            if not isinstance(mod, LoraLayer) or name not in getattr(mod, "r", {}):  # every kind of LoRA layer lists its ranks
                continue
            if family == "bert" and _UNUSED.search(path):
                unused.append(path)
                continue
            found = _LAYER.search(path)
            keys = _MODULES[family].get(found.group(2)) if found else None
            if keys is None:
                what = "an embedding adapter" if "embed" in path or "wte" in path or "word_embeddings" in path else (
                    "a head adapter" if "lm_head" in path or "classifier" in path else "an adapter on a module shares mode does not adapt")  # fmt: skip
                raise UnsupportedAdapter(f"{folder}: {what} ({path}); supported: {', '.join(_MODULES[family])}")
            if type(mod) is not Linear or name in getattr(mod, "lora_variant", {}) or mod.lora_bias.get(name):
                raise UnsupportedAdapter(f"{folder}: {path} is a LoRA variant ({type(mod).__name__}); only plain LoRA is supported")
            a = mod.lora_A[name].weight.detach().double().T.numpy()  # (in, r); fan_in_fan_out only changes merging
            b = (mod.lora_B[name].weight.detach().double().T * mod.scaling[name]).numpy()  # (r, out)
            for key, cols in zip(keys, np.array_split(np.arange(b.shape[1]), len(keys))):
                layers[int(found.group(1))][key] = Factors(a.astype(np.float32), b[:, cols].astype(np.float32))
    finally:
        wrapped.unload()
    if not any(layers):
        raise UnsupportedAdapter(f"{folder}: the adapter adapts none of {', '.join(_MODULES[family])}")
    return Adapter(tuple(layers), str(folder), tuple(unused))


def _restore(model) -> None:
    """Put back every base layer a failed PEFT load left wrapped, so the model is as it was."""
    from peft.tuners.lora.layer import LoraLayer

    for path, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer) and path:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, mod.get_base_layer())


def merge(model, folder: str | Path):
    """PEFT's own merged model (base + ΔW), the plaintext reference; in place."""
    from peft import PeftModel

    _config(Path(folder))
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().eval()


# --- training one here ---------------------------------------------------------------------------

Tick = Callable[[int, int, str], None]  # (step, total, info)


def _stream(tok, docs: list[str]) -> torch.Tensor:
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok(docs, add_special_tokens=False)["input_ids"]:
        ids += enc + [eos]
    return torch.tensor(ids)


def _windows(stream: torch.Tensor, length: int, count: int | None = None) -> torch.Tensor:
    n = (len(stream) - 1) // length
    w = stream[: n * length].view(n, length)
    return w if count is None else w[:count]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 8) -> float:
    """exp of the mean next-token cross-entropy over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / count)


def train(base: str | Path, out: str | Path, *, steps: int = 300, rank: int = 16, alpha: int = 32, lr: float = 5e-4,
          batch: int = 4, length: int = 128, eval_windows: int = 64, targets: tuple[str, ...] = LLAMA_TARGETS,
          seed: int = 0, checkpoint_every: int = 25, force: bool = False, tick: Tick | None = None) -> dict:  # fmt: skip
    """Train a LoRA on a causal LM (a local HF folder) over CPython's docs (`text.corpus`'s
    train split), AdamW with a cosine schedule; OUT becomes a PEFT adapter folder with a
    ``summary.json`` (held-out perplexity on the test split before and after). A checkpoint
    every ``checkpoint_every`` steps: run the same call again and it resumes."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoTokenizer

    from .source import load_source
    from .text import corpus
    from .train import _atomic_write, _save, open_run

    out = Path(out)
    settings = {"base": str(base), "steps": steps, "rank": rank, "alpha": alpha, "lr": lr, "batch": batch, "length": length,
                "eval_windows": eval_windows, "targets": list(targets), "seed": seed, "corpus": "cpython-docs"}  # fmt: skip
    open_run(out, settings, force)
    summary_file, ck_file = out / "summary.json", out / "checkpoint.pt"
    if summary_file.is_file() and (out / WEIGHTS).is_file() and not force:
        return json.loads(summary_file.read_text())
    model = load_source(base)
    if not getattr(model.config, "is_decoder", False) and model.config.model_type not in ("llama", "qwen2", "mistral", "gpt2"):
        raise ValueError("stip train lora trains a causal language model (LLaMA family or GPT-2)")
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    docs = corpus()
    train_stream = _stream(tok, docs["train"])
    held_out = _windows(_stream(tok, docs["test"]), length, eval_windows)

    torch.manual_seed(seed)
    peft_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, peft_cfg)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    step, losses, seconds, base_ppl = 0, [], 0.0, None
    if ck_file.is_file() and not force:
        ck = torch.load(ck_file, weights_only=True)
        set_peft_model_state_dict(wrapped, ck["adapter"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        gen.set_state(ck["gen"])
        step, losses, seconds, base_ppl = ck["step"], ck["losses"], ck["seconds"], ck["base_ppl"]
    if base_ppl is None:
        if tick:
            tick(0, steps, f"held-out perplexity of the base ({len(held_out)} × {length} tokens)")
        with wrapped.disable_adapter():
            base_ppl = perplexity(wrapped, held_out)

    def checkpoint():
        from peft import get_peft_model_state_dict

        _save({"adapter": get_peft_model_state_dict(wrapped), "opt": opt.state_dict(), "sched": sched.state_dict(),
               "gen": gen.get_state(), "step": step, "losses": losses, "seconds": seconds, "base_ppl": base_ppl}, ck_file)  # fmt: skip

    top = len(train_stream) - length - 1
    while step < steps:
        wrapped.train()
        t = time.perf_counter()
        starts = torch.randint(0, top, (batch,), generator=gen)
        x = torch.stack([train_stream[s : s + length] for s in starts.tolist()])
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step, seconds = step + 1, seconds + time.perf_counter() - t
        losses.append(float(loss.detach()))
        if tick:
            tick(step, steps, f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if step % checkpoint_every == 0 or step == steps:
            checkpoint()
    if tick:
        tick(steps, steps, "held-out perplexity of the adapted model")
    adapted_ppl = perplexity(wrapped, held_out)
    wrapped.save_pretrained(str(out))
    summary = {
        "base": str(base), "steps": steps, "rank": rank, "alpha": alpha, "targets": list(targets),
        "trainable_parameters": sum(p.numel() for p in trainable), "tokens_per_step": batch * length,
        "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / max(steps, 1), 3),
        "loss_first20": sum(losses[:20]) / max(len(losses[:20]), 1), "loss_last20": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "held_out": {"split": "test", "windows": len(held_out), "tokens": int(held_out.numel()),
                     "perplexity_base": base_ppl, "perplexity_adapted": adapted_ppl,
                     "change": adapted_ppl / base_ppl - 1},
    }  # fmt: skip
    _atomic_write(summary_file, json.dumps(summary, indent=2).encode())
    ck_file.unlink(missing_ok=True)
    return summary
