"""P3's client: tokenize or preprocess, embed, permute, send; un-permute, pool or sample.

    with Client("out/client", "https://10.0.0.5:8000", token=token, trust=tls.Trust(pin=pin)) as c:
        c.encode(["a sentence"]).embedding          # encoders: mean-pooled sentence embedding
        c.classify(["great film"]).labels            # classifiers (text, or image paths)
        c.generate("Once upon a time", max_new_tokens=32).text   # causal LMs

Nothing but permuted embeddings leaves this process; the key and the embedding tables stay.
An ``https://`` server is verified (by ``trust``: a pin or a CA; else the system's CAs) before
the token or anything else is sent; plain ``http://`` only to loopback, or with ``insecure``.
"""

from __future__ import annotations

import ssl
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import httpx
import torch

from ..errors import StipError
from .. import tls, wire
from ..wire import MEDIA_TYPE
from .bundle import ClientBundle
from .embed import IMAGE
from .generation import Generation, Sampling, eos_ids, generate


class ServerError(StipError, RuntimeError):
    """The server refused a request (4xx) or failed (5xx)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.message = message


class KeyMismatch(StipError, RuntimeError):
    """The server serves a different sealing than this client folder belongs to."""


@dataclass
class Stats:
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    server_seconds: float = 0.0  # model compute reported by P2
    round_trip_seconds: float = 0.0  # wall time of the HTTP calls
    client_seconds: float = 0.0  # local embed, permute, un-permute, pool, sample


@dataclass
class Encoding:
    last_hidden_state: torch.Tensor  # (batch, tokens, hidden), padded positions included
    attention_mask: torch.Tensor
    embedding: torch.Tensor  # (batch, hidden): mean over real tokens, L2-normalised
    pooler_output: torch.Tensor | None = None


@dataclass
class Classification:
    logits: torch.Tensor  # (batch, labels) or (batch, tokens, labels) for token classification
    labels: list


class Client:
    def __init__(
        self,
        client_dir: str | Path,
        server_url: str,
        *,
        token: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        trust: tls.Trust | None = None,
        insecure: bool = False,
    ):
        self.bundle = ClientBundle.load(client_dir)
        self.folder = Path(client_dir)
        verify = link_verify(server_url, trust, insecure, "the server") if transport is None else True
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=server_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport, verify=verify)
        self.stats = Stats()
        self._info: dict | None = None
        self._tokenizer = None
        self._processor = None

    # --- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        """The server's model description; checked once against this folder's fingerprint."""
        if self._info is None:
            r = self.http.get("/v1/info")
            _raise_for(r)
            info = r.json()
            if info.get("fingerprint") != self.bundle.fingerprint:
                raise KeyMismatch(
                    f"the server serves sealing {str(info.get('fingerprint'))[:16]}…, "
                    f"but {self.folder} belongs to {self.bundle.fingerprint[:16]}…"
                )
            self._info = info
        return self._info

    def _post(self, path: str, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        self.info()
        body = wire.encode(tensors)
        t0 = time.perf_counter()
        r = self.http.post(path, content=body, headers={"Content-Type": MEDIA_TYPE})
        self.stats.round_trip_seconds += time.perf_counter() - t0
        self.stats.requests += 1
        self.stats.bytes_up += len(body)
        self.stats.bytes_down += len(r.content)
        _raise_for(r)
        self.stats.server_seconds += float(r.headers.get("X-Stip-Compute-Ms", 0)) / 1e3
        return wire.decode(r.content)

    def _local(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stats.client_seconds += time.perf_counter() - t0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            if not any((self.folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
                raise ValueError(f"{self.folder} has no tokenizer; pass token ids instead of text")
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        return self._tokenizer

    @property
    def image_processor(self):
        if self._processor is None:
            from transformers import AutoImageProcessor

            if not (self.folder / "preprocessor_config.json").is_file():
                raise ValueError(f"{self.folder} has no image processor (preprocessor_config.json)")
            self._processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        return self._processor

    # --- the protocol step: embed, permute, send, un-permute -----------------------------------

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One sealed forward. ``inputs``: ``input_ids`` (+ ``attention_mask``,
        ``token_type_ids``) for text, ``pixel_values`` for images. Returns un-permuted outputs."""
        b = self.bundle
        if "pixel_values" in inputs:
            message = {"embeddings": self._local(b.permuted_embeddings, inputs["pixel_values"])}
        else:
            x = self._local(b.permuted_embeddings, inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
            message = {"embeddings": x}
            if inputs.get("attention_mask") is not None:
                message["attention_mask"] = inputs["attention_mask"]
        out, _ = self._post("/v1/forward", message)
        return self._local(b.unpermute_outputs, out)

    def _text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        limit = self.info().get("max_positions")
        return self._local(self.tokenizer, list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")

    def _images(self, paths: list[str | Path]) -> dict[str, torch.Tensor]:
        from PIL import Image

        def load():
            images = []
            for p in paths:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            return {"pixel_values": self.image_processor(images, return_tensors="pt")["pixel_values"]}

        return self._local(load)

    def inputs_for(self, items: list) -> dict[str, torch.Tensor]:
        """Tokenized texts, or preprocessed images (file paths) for vision models."""
        if self.bundle.embedder.modality == IMAGE:
            return self._images(items)
        return self._text(items)

    # --- what users call ------------------------------------------------------------------------

    def encode(self, texts: list[str]) -> Encoding:
        """Hidden states and a sentence embedding (mean pooling, L2-normalised)."""
        return self.encode_inputs(self._text(texts))

    def encode_inputs(self, inputs: dict[str, torch.Tensor]) -> Encoding:
        """`encode` on ids already tokenized: ``input_ids``, ``attention_mask`` (+ ``token_type_ids``)."""
        from ..models.default import mean_pool

        out = self.forward(inputs)
        if "last_hidden_state" not in out:
            raise ValueError(f"{self.info()['architecture']} returns {sorted(out)}, not hidden states; use classify()")
        mask = inputs["attention_mask"]
        emb = self._local(lambda: torch.nn.functional.normalize(mean_pool(out["last_hidden_state"], mask), dim=-1))
        return Encoding(out["last_hidden_state"], mask, emb, out.get("pooler_output"))

    def classify(self, items: list) -> Classification:
        """Texts, or image file paths for ViT/Swin. Label names come from the client config."""
        out = self.forward(self.inputs_for(items))
        if "logits" not in out:
            raise ValueError(f"{self.info()['architecture']} has no classification head; use encode()")
        logits = out["logits"]
        id2label = getattr(self.bundle.config, "id2label", None) or {}
        ids = logits.argmax(-1)
        labels = [id2label.get(int(i), str(int(i))) for i in ids.flatten()]
        if logits.dim() == 3:
            labels = [labels[i * ids.shape[1] : (i + 1) * ids.shape[1]] for i in range(ids.shape[0])]
        return Classification(logits, labels)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 32,
        sampling: Sampling = Sampling(),
        *,
        stop_at_eos: bool = True,
        min_tokens: int = 0,
        on_token: Callable[[int], None] | None = None,
    ) -> Generation:
        """Sample locally (`generation.generate`: greedy unless ``sampling`` says otherwise),
        one round trip per new token; the KV cache stays on the server. ``on_token`` is called
        with each new token id as it arrives (streaming, timing)."""
        info = self.info()
        if not info["causal"]:
            raise ValueError(f"{info['architecture']} is not a causal language model")
        ids = list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]
        limit = info.get("max_positions")
        if limit and len(ids) + max_new_tokens > limit:
            raise ValueError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions")
        with self.engine() as step:
            g = generate(step, ids, max_new_tokens, sampling, vocab=self.vocab, stop=eos_ids(self.bundle.config) if stop_at_eos else frozenset(),
                         min_tokens=min_tokens, on_token=on_token)  # fmt: skip
        g.text = self.tokenizer.decode(g.token_ids, skip_special_tokens=True) if self._has_tokenizer() else None
        return g

    @property
    def vocab(self) -> int:
        return len(self.bundle.key.pi_c)

    @contextmanager
    def engine(self) -> Iterator[Callable[[list[int], int, bool], torch.Tensor]]:
        """One generation's `generation.Engine`: a session on the server, which holds its KV
        cache, closed on exit. Each step sends permuted rows and un-permutes the logits here."""
        b, session = self.bundle, []

        def step(tokens: list[int], offset: int, every: bool) -> torch.Tensor:
            x = {"embeddings": self._local(b.permuted_embeddings, torch.tensor([tokens]), position_offset=offset)}
            if session:
                out, _ = self._post(f"/v1/sessions/{session[0]}/step", x)
            else:
                out, meta = self._post("/v1/sessions", x)
                session.append(meta["session"])
            if every:  # a session answers the last position only: one more pass for the prompt's logits
                return self.forward({"input_ids": torch.tensor([tokens])})["logits"][0]
            return self._local(lambda: b.unpermute_outputs({"logits": out["logits"]})["logits"])  # (1, vocab): the last position

        try:
            yield step
        finally:
            if session:
                self.http.delete(f"/v1/sessions/{session[0]}")

    def _has_tokenizer(self) -> bool:
        try:
            self.tokenizer
            return True
        except ValueError:
            return False


def link_verify(url: str, trust: tls.Trust | None, insecure: bool, what: str) -> ssl.SSLContext | bool:
    """httpx's ``verify`` for a link to ``url``: TLS 1.3, the peer checked now when ``trust``
    is a pin, by its CA file or else the usual CAs (certifi) at the handshake. Plain
    ``http://`` only to loopback or with ``insecure``. ValueError, or ConnectionError
    (`tls.TrustError`: not the trusted peer), otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what}: give an http:// or https:// URL")
    where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"  # no userinfo in messages
    if parts.scheme == "http":
        if trust is not None:
            raise ValueError(f"{what} at {where}: a pin or a CA needs an https:// URL")
        tls.plain_allowed(parts.hostname, insecure, what)
        return True
    if trust is None:
        import certifi

        ctx = ssl.create_default_context(cafile=certifi.where())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx
    try:
        if trust.ca is not None:  # the handshake httpx would do, now: an unknown CA fails here
            tls.connect(parts.hostname, parts.port or 443, trust, timeout=10.0).close()
        return tls.httpx_verify(url, trust)
    except tls.TrustError:
        raise
    except OSError as e:  # refused, unreachable, not TLS 1.3, …
        raise ConnectionError(f"cannot reach {what} at {where} over TLS 1.3: {e.strerror or e}") from None


def _raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:200]
    raise ServerError(r.status_code, message)

