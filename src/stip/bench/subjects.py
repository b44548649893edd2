"""The model under test, seen the same way by every mode.

A subject gives each mode what it needs on the same input: the plaintext forward (at full
depth, or at the depth MPC runs), STIP's three-party path, the MPC Config/params and the
user's embedding, and — for polynomial models only — the HE plan.

    subject = load(path, tokens=32, batch=1, seed=0)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import wire


class Skip(Exception):
    """A mode that cannot run on this subject or machine; the message says why."""


def _top1(out: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    a, b = np.asarray(out), np.asarray(ref)
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def compare(out, ref) -> tuple[float, float]:
    """(max abs error, top-1 agreement: the same argmax over the last axis, per row)."""
    a, b = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - b).max()), _top1(a, b)


@dataclass
class StipRun:
    output: torch.Tensor
    bytes_up: int
    bytes_down: int


class HFSubject:
    """A local Hugging Face folder (the embedded MiniLM by default): random in-vocabulary
    tokens, or random pixels for ViT."""

    kind = "hf"

    def __init__(self, path: Path, tokens: int, batch: int, seed: int):
        from ..seal import load_source, seal

        self.path = path
        self.model = load_source(path)
        self.name = path.name if path.name != "model" else path.parent.name  # the embedded package's folder is "model"
        c = self.model.config
        self.layers = c.num_hidden_layers
        gen = torch.Generator().manual_seed(seed)
        self.image = c.model_type == "vit"
        if self.image:
            self.inputs = {"pixel_values": torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=gen)}
        else:
            low = min(1000, c.vocab_size // 2)
            ids = torch.randint(low, c.vocab_size, (batch, tokens), generator=gen)
            self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.sealed = seal(self.model)
        head = hasattr(self.model, "classifier") or getattr(self.model, "lm_head", None) is not None  # classifiers, causal LMs
        self.output_name = "logits" if head else "last_hidden_state"
        self.tokens = tokens if not self.image else None
        self.batch = batch

    def describe(self) -> str:
        c = self.model.config
        shape = "image" if self.image else f"{self.tokens} tokens"
        return f"{type(self.model).__name__} ({c.model_type}), {self.layers} layers, width {c.hidden_size}; batch {self.batch}, {shape}"

    @torch.no_grad()
    def plain(self, layers: int | None = None) -> torch.Tensor:
        if layers is None or layers == self.layers:
            return self.model(**self.inputs)[self.output_name]
        from ..models.hf import hidden

        if self.image:
            raise Skip("fewer layers than the model has is supported for text models only")
        return hidden(self.model, layers, input_ids=self.inputs["input_ids"], attention_mask=self.inputs["attention_mask"])

    @torch.no_grad()
    def stip(self) -> StipRun:
        from ..serve import engine

        client, server = self.sealed.client, self.sealed.server
        if self.image:
            x, mask = client.permuted_embeddings(self.inputs["pixel_values"]), None
        else:
            x, mask = client.permuted_embeddings(self.inputs["input_ids"]), self.inputs["attention_mask"]
        out = engine.forward(server, x, mask)
        up = {"embeddings": x} if mask is None else {"embeddings": x, "attention_mask": mask}
        down = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        return StipRun(client.unpermute_outputs(out)[self.output_name], len(wire.encode(up)), len(wire.encode(down)))

    @contextmanager
    def shares(self, threads: int | None = 1, limbs: int = 2, rounds: int = 2, network=None):
        """Shares mode: two share servers as subprocesses (``threads`` BLAS threads each; None:
        all cores), and a run(prepared, far=False) for one pass on the ``rounds`` schedule;
        with a ``network`` (`netem.Profile`), ``far=True`` runs it through one relay process
        per server that emulates it."""
        from contextlib import ExitStack

        from .. import relay
        from ..serve.process import ServerProcess
        from ..shares import Servers, SharesModel, one_thread

        if self.image:
            raise Skip("shares mode walks text models (ViT's patch embedding is not in its walk)")
        args = ("--limbs", str(limbs)) + (("--threads", str(threads)) if threads else ())
        spawn = lambda: ServerProcess(self.path, *args, command="share-server", timeout=600)  # noqa: E731
        with ExitStack() as stack:
            a, b = stack.enter_context(spawn()), stack.enter_context(spawn())
            near = stack.enter_context(Servers([a.url, b.url]))
            p3s = {False: (SharesModel(self.model, near, rounds), near)}
            if network is not None:
                link = dict(rtt=network.rtt_s, bandwidth=network.mbit_per_s * 1e6)
                via = [stack.enter_context(relay.emulated(x.url, **link)) for x in (a, b)]
                far = stack.enter_context(Servers(via))
                p3s[True] = (SharesModel(self.model, far, rounds), far)
            stack.enter_context(one_thread())

            def run(prepared: bool = False, far: bool = False):
                """(output, this pass's online traffic, offline traffic, offline seconds)."""
                p3, conn = p3s[far]
                offline, t0 = conn.offline.copy(), time.perf_counter()
                if prepared:
                    conn.prepare(p3.plan(self.inputs["input_ids"].shape[1]))
                t1, before = time.perf_counter(), conn.stats.copy()
                out = p3.forward(self.inputs["input_ids"], self.inputs["attention_mask"])
                return out[self.output_name], conn.stats.since(before), conn.offline.since(offline), t1 - t0

            yield run

    def mpc(self, layers: int):
        """(Config, params, user's embedding) with the first ``layers`` layers."""
        from ..mpc.model import truncate
        from ..models.blocks import embed, from_hf

        cfg, params = from_hf(self.model)
        if layers < cfg.layers:
            if self.output_name != "last_hidden_state":
                raise Skip("a truncated MPC run compares hidden states; this model ends in a classifier or LM head (use --full)")
            cfg, params = truncate(cfg, params, layers)
        inputs = {k: v for k, v in self.inputs.items() if k != "attention_mask"}
        return cfg, params, embed(self.model, **inputs)

    def he(self):
        raise Skip("HE runs polynomial transformers only: train one with `stip train polyformer OUT` and bench that folder")


class PolySubject:
    """A `stip train polyformer` folder: the polynomial ViT or LM that every mode, HE included,
    runs. The LM's inputs are held-out prompts of ``tokens`` ids; every mode's output is the
    next-token logits."""

    def __init__(self, path: Path, tokens: int, batch: int, seed: int):
        from ..models import data, polyformer
        from ..seal import polyformer as sealing

        self.model, info = polyformer.load(path)
        self.name = path.name
        self.layers = self.model.cfg.layers
        self.lm = self.model.cfg.causal
        self.kind = "polylm" if self.lm else "polyvit"
        if self.lm:
            self.tokens = min(tokens, self.model.cfg.context)
            ids, self.targets = polyformer.held_out(path, batch, self.tokens)
            self.inputs, self.he_inputs = torch.from_numpy(ids), ids
        else:
            _, test = data.load(info.get("dataset", "digits"), info.get("data_dir"), seed=info.get("seed", 0))
            self.inputs = test.images[:batch]
            self.tokens = self.model.cfg.tokens
            self.he_inputs = self.model.patches(self.inputs).numpy()
        self.batch = len(self.inputs)
        self.plan = polyformer.he_plan(self.model)
        self.sealed = sealing.seal(self.model)

    def describe(self) -> str:
        c = self.model.cfg
        if self.lm:
            return (f"polynomial LM, {c.layers} layers, {c.heads} heads, width {c.dim}, vocabulary {c.vocab:,}; batch {self.batch} "
                    f"held-out prompts of {self.tokens} tokens, next-token logits")
        return (f"polynomial ViT, {c.layers} layers, {c.heads} heads, width {c.dim}; batch {self.batch} images, "
                f"{c.tokens} tokens of {c.patch}×{c.patch} patches")

    def perplexity(self, logits) -> float | None:
        """The LM's next-token perplexity on its prompts from these logits; None for the ViT."""
        from ..models.polyformer import next_token_perplexity

        return next_token_perplexity(np.asarray(logits), self.targets) if self.lm else None

    def _next(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1] if self.lm else logits

    @torch.no_grad()
    def plain(self, layers: int | None = None) -> torch.Tensor:
        if layers not in (None, self.layers):
            raise Skip("the polynomial models run at full depth only")
        return self._next(self.model(self.inputs))

    @torch.no_grad()
    def stip(self) -> StipRun:
        client, server = self.sealed.client, self.sealed.server
        x = client.embed(self.inputs)
        y = self._next(server.body(x))
        return StipRun(client.decode(y), len(wire.encode({"embeddings": x})), len(wire.encode({"logits": y})))

    def mpc(self, layers: int):
        from ..models import polyformer
        from ..mpc.polyformer import to_mpc

        if layers != self.layers:
            raise Skip("the polynomial models run at full depth only")
        cfg, params = to_mpc(self.model)
        return cfg, params, polyformer.embed_plan(self.plan, self.he_inputs)

    def he(self):
        return self.plan, self.he_inputs

    def shares(self, threads: int | None = 1, limbs: int = 2, rounds: int = 2, network=None):
        raise Skip("shares mode walks Hugging Face transformers; the polynomial models are not")


def load(path: str | Path | None, tokens: int = 32, batch: int = 1, seed: int = 0):
    from ..models import default, polyformer

    path = Path(path) if path is not None else default.path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if polyformer.is_checkpoint(path):
        return PolySubject(path, tokens, batch, seed)
    return HFSubject(path, tokens, batch, seed)
