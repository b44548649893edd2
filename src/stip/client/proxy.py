"""P3 as a local OpenAI-compatible proxy: ``stip proxy OUT/client --upstream URL``.

Applications speak OpenAI to the proxy on loopback, unchanged. For each request the proxy

    applies the chat template and tokenizes (locally)      text → ids
    names the ids as the engine knows them (`Local`)      π_c in token mode; as they are otherwise
    asks its `Engine` for an `Ask`, reads `Piece`s back    ids, logprobs, finish reasons
    restores every id, detokenizes, applies stop strings, answers in OpenAI's format.

Three engines, one interface:
    `Upstream`     vLLM on a token-mode sealing: token-id prompts, ids back (logprobs by id);
                   sampling, penalties and logit_bias run in the engine on the renamed logits
                   (softmax, nucleus sampling and id counts do not depend on the ids' names)
    `Sealed`       `stip serve` on an embedding-mode sealing: P3's loop (`generation.walk`)
                   here, one STIP session per choice; encoders answer /v1/embeddings
    `stip.shares.engine.SharesEngine`   P3's loop over the public model with two share servers

    GET  /v1/models               the one model this client folder belongs to
    POST /v1/completions          prompt: text, token ids, or a list of either; n, logprobs, echo
    POST /v1/chat/completions     messages → the model's own chat template; n, logprobs, top_logprobs
    POST /v1/embeddings           an encoder's sentence embeddings (float or base64)
Completions and chat share one path (`_Job` → `events` → `answer`); both stream as
server-sent events with ``"stream": true``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Literal, Protocol, Union

import httpx
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import StipError
from .. import tls
from .api import link_verify
from .bundle import TOKENS, ClientBundle
from .generation import MAX_LOGPROBS, Ask, Piece, Sampling, TokenLogprob, eos_ids

log = logging.getLogger("stip.proxy")
SERVED_PREFIX = "stip-"  # as stip.serve.vllm names a sealing (the core never imports serve)
DEFAULT_MAX_TOKENS = 4096  # a chat request that names no max_tokens stops here at the latest
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts per completions or embeddings request


# --- OpenAI request bodies ------------------------------------------------------------------------


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, …)

    model: str = Field(description="The id listed by /v1/models.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: Union[str, list[str], None] = Field(None, description="Up to 4 strings; matched on the text by the proxy.")
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="Token id → bias in -100…100; renamed by π_c here.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-text token.")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: generate at least this many tokens.")
    return_token_ids: bool = Field(False, description="vLLM extension: also return the generated token ids (real ids; they stay local).")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]] = Field(description="Text, token ids, or a list of either.")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = Field(False, description="Return the prompt before the completion (and, with logprobs, its logprobs).")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="The chosen token's logprob and the k likeliest.")
    suffix: None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: Union[str, list[str], list[int], list[list[int]]] = Field(description="Text, token ids, or a list of either.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None


# --- errors in OpenAI's shape -----------------------------------------------------------------------


class ProxyError(StipError):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(_error_body(message, kind, param), status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {s: {"model": ErrorBody, "description": d} for s, d in {
    400: "invalid request",
    404: "unknown model",
    502: "the upstream engine is unreachable or failed",
    503: "shares mode: a share server stayed unreachable through P3's retries",
    504: "the upstream engine timed out",
}.items()}


# --- the engines ------------------------------------------------------------------------------------


class Engine(Protocol):
    """What the proxy holds. Each speaks in the ids it knows (`Local` renames them):
    `Upstream` (vLLM on a token-mode sealing), `Sealed` (`stip serve` on an embedding-mode
    one, this process driving the generation loop) and `stip.shares.engine.SharesEngine`."""

    async def check(self, local: "Local") -> None:
        """Refuse (ProxyError) an engine that serves another model than ``local``'s."""

    def generate(self, ask: Ask) -> AsyncIterator[Piece]: ...

    async def embed(self, inputs: dict) -> torch.Tensor:
        """Sentence embeddings (batch, hidden) of tokenized text, for an encoder."""

    async def close(self) -> None: ...


def threaded(pool: ThreadPoolExecutor, run: Callable[[Callable[[Piece], None]], None]) -> AsyncIterator[Piece]:
    """Stream the pieces ``run(emit)`` emits from a worker thread. When the consumer leaves
    early, the next ``emit`` raises, which ends ``run`` (and its generation)."""

    async def pieces():
        loop, queue, gone = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def emit(piece: Piece) -> None:
            if gone.is_set():
                raise _Gone
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work():
            try:
                run(emit)
            except _Gone:
                pass
            except BaseException as e:  # noqa: BLE001 — handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
                return
            loop.call_soon_threadsafe(queue.put_nowait, None)

        task = loop.run_in_executor(pool, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gone.set()
            await task

    return pieces()


class _Gone(Exception):
    pass


@dataclass
class Upstream:
    """vLLM's OpenAI server holding the token-mode sealed checkpoint. An ``https://`` engine
    is verified by ``trust`` (a pin: checked here, before anything is sent; a CA) or else the
    usual CAs; plain ``http://`` only on loopback or with ``insecure``."""

    url: str
    token: str | None = None
    timeout: float = 300.0
    model: str | None = None  # the served name; found at /v1/models when not given
    trust: tls.Trust | None = None
    insecure: bool = False
    http: httpx.AsyncClient = field(init=False)
    fingerprint: str = field(init=False, default="")  # the sealing this proxy's client folder belongs to

    def __post_init__(self):
        verify = link_verify(self.url, self.trust, self.insecure, "the upstream engine")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout, limits=limits, verify=verify)

    async def check(self, local: "Local") -> None:
        self.fingerprint = local.fingerprint
        await self.served_model()

    async def embed(self, inputs: dict) -> torch.Tensor:
        raise ProxyError(400, "a token-mode sealing is a language model: it has no embeddings endpoint", param="model")

    async def served_model(self) -> str:
        if self.model is None:
            fingerprint = self.fingerprint
            r = await self._send("GET", "/v1/models")
            names = [m.get("id") for m in r.json().get("data", [])]
            ours = f"{SERVED_PREFIX}{fingerprint[:16]}"
            if ours in names:
                self.model = ours
            elif any(str(n).startswith(SERVED_PREFIX) for n in names) or not names:
                raise ProxyError(502, f"the upstream serves {names}, not this client's sealing {ours}", "upstream_error")
            else:
                self.model = names[0]  # named by its operator; the fingerprint cannot be checked
        return self.model

    @contextmanager
    def _transport(self):
        """Transport failures as the statuses the client gets (`upstream_failure`): 504 for a
        timeout, else 502."""
        try:
            yield
        except httpx.TransportError as e:  # timeouts included
            raise upstream_failure(e, f"the upstream engine at {self.url}") from None

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        with self._transport():
            r = await self.http.request(method, path, **kwargs)
        _raise_upstream(r)
        return r

    async def generate(self, ask: Ask) -> AsyncIterator[Piece]:
        """``ask`` as one streamed /v1/completions call on token ids. Logprobs come keyed by
        id (``return_tokens_as_token_ids``), so the engine needs no tokenizer; with prompt
        logprobs, the engine echoes the prompt's. Leaving the loop early closes the
        connection, which aborts the request in the engine."""
        body = _vllm_body(ask)
        body["model"] = await self.served_model()
        echoed: set[int] = set()
        with self._transport():
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    _raise_upstream(r)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ProxyError(502, f"upstream error: {chunk['error'].get('message', chunk['error'])}", "upstream_error")
                    for c in chunk.get("choices", []):
                        i, ids = int(c.get("index", 0)), list(c.get("token_ids") or [])
                        logprobs, prompt = _vllm_logprobs(c.get("logprobs")), None
                        if ask.sampling.prompt_logprobs is not None and i not in echoed:
                            echoed.add(i)
                            cut = len(logprobs) - len(ids)
                            prompt, logprobs = [None, *logprobs[1:cut]], logprobs[cut:]
                        yield Piece(i, ids, logprobs, c.get("finish_reason"), prompt)

    async def close(self) -> None:
        await self.http.aclose()


def _raise_upstream(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json().get("error") or r.json()
        message = err.get("message") if isinstance(err, dict) else str(err)
    except ValueError:
        message = r.text[:300]
    raise _refusal(r.status_code, message, "the engine")  # a 400: e.g. the prompt is too long


def _refusal(status: int, message: str, who: str) -> ProxyError:
    """An upstream's error status as the proxy's: its refusal of the request (4xx, but not
    401/403, which are this proxy's credentials) is the caller's 400; anything else a 502."""
    if 400 <= status < 500 and status not in (401, 403):
        return ProxyError(400, f"{who} refused the request: {message}")
    return ProxyError(502, f"upstream answered {status}: {message}", "upstream_error")


def _vllm_body(ask: Ask) -> dict:
    s = ask.sampling
    body = {"prompt": ask.prompt, "max_tokens": ask.max_tokens, "n": ask.n, "stream": True, "temperature": s.temperature,
            "top_p": s.top_p, "return_token_ids": True, "min_tokens": ask.min_tokens, "skip_special_tokens": False,
            "ignore_eos": not ask.stop}  # fmt: skip
    if ask.stop:
        body["stop_token_ids"] = sorted(ask.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias:
        body["logit_bias"] = {str(t): b for t, b in s.logit_bias.items()}
    if s.logprobs is not None or s.prompt_logprobs is not None:
        body["logprobs"] = max(s.logprobs or 0, s.prompt_logprobs or 0)
        body["return_tokens_as_token_ids"] = True
    if s.prompt_logprobs is not None:
        body["echo"] = True  # the prompt's logprobs come first in each choice's first chunk
    return body


def _token_id(name: str) -> int:
    return int(name.rsplit(":", 1)[1])  # "token_id:123"


def _vllm_logprobs(lp: dict | None) -> list[TokenLogprob | None]:
    if not lp:
        return []
    out = []
    for name, value, top in zip(lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or [None] * len(lp["tokens"])):
        ranked = sorted(((_token_id(k), v) for k, v in (top or {}).items()), key=lambda kv: -kv[1])
        out.append(None if value is None else TokenLogprob(_token_id(name), value, ranked))
    return out


# --- text in, text out -------------------------------------------------------------------------------


class Detokenizer:
    """Incremental detokenization, O(1) per token: each new id is decoded in a short window
    after the text already final (decoding the whole output each time is O(n²) per stream).
    A trailing partial UTF-8 character is held back until its next byte's token comes."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""
        self.start = self.read = 0  # the window: ids[start:read] decode to text already final
        self.sent = 0  # characters already handed out
        self.stopped = False
        self.hold = max((len(s) - 1 for s in stops), default=0)  # a stop string may be starting

    def add(self, ids: list[int]) -> str:
        """The newly final text after ``ids``; sets ``stopped`` when a stop string appears."""
        before = len(self.text)
        self.ids += ids
        done = self.tok.decode(self.ids[self.start : self.read], skip_special_tokens=True)
        window = self.tok.decode(self.ids[self.start :], skip_special_tokens=True)
        if len(window) > len(done) and not window.endswith("\ufffd"):
            self.text += window[len(done) :]
            self.start, self.read = self.read, len(self.ids)
        look = max(0, before - self.hold)  # only where a stop string could newly end
        cut = min((i for i in (self.text.find(s, look) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(cut)
        return self._take(max(self.sent, len(self.text) - self.hold))

    def finish(self) -> str:
        return "" if self.stopped else self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return out


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise ProxyError(400, "at most 4 stop sequences", param="stop")
    if any(not s for s in stops):
        raise ProxyError(400, "stop sequences must not be empty", param="stop")
    return stops


# --- the engine for `stip serve` ----------------------------------------------------------------------


class Sealed:
    """`stip serve` on an embedding-mode sealing, reached through P3's `api.Client`: the
    generation loop (`generation.walk`) runs here, one STIP session per choice, and encoders
    answer /v1/embeddings. Up to ``streams`` requests run at once."""

    def __init__(self, client, streams: int = 8):
        self.client = client
        self.pool = ThreadPoolExecutor(streams, thread_name_prefix="stip-proxy")

    async def _call(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except Exception as e:
            raise upstream_failure(e, "the upstream server") from None

    async def check(self, local: "Local") -> None:
        await self._call(self.client.info)

    def generate(self, ask: Ask) -> AsyncIterator[Piece]:
        from .generation import walk

        def run(emit):
            try:
                walk(self.client.engine, ask, self.client.vocab, emit)
            except _Gone:
                raise
            except Exception as e:
                raise upstream_failure(e, "the upstream server") from None

        return threaded(self.pool, run)

    async def embed(self, inputs: dict) -> torch.Tensor:
        return (await self._call(self.client.encode_inputs, inputs)).embedding

    async def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()


def upstream_failure(e: BaseException, what: str, down: int = 502) -> BaseException:
    """An engine's failure as the status the proxy's caller gets; every engine maps through
    here. A ProxyError stays as it is; the server's own refusal (4xx) and a bad argument
    (ValueError) are the request's fault, 400; a timeout is 504; a link that is down is
    ``down`` (503 where P3 has already retried, as shares mode does); any other `StipError`
    (a refusal, a key or sealing mismatch) is 502. Anything else is a bug and stays itself."""
    from .api import ServerError

    if isinstance(e, ProxyError):
        return e
    if isinstance(e, ServerError):
        return _refusal(e.status, e.message, "the server")
    if isinstance(e, httpx.TimeoutException):
        return ProxyError(504, f"{what} timed out", "upstream_timeout")
    if isinstance(e, httpx.TransportError):
        return ProxyError(down, f"{what} is unreachable or failed ({type(e).__name__})", "upstream_unavailable" if down == 503 else "upstream_error")
    if isinstance(e, (ConnectionError, OSError)):
        return ProxyError(down, f"{what}: {e}", "upstream_unavailable" if down == 503 else "upstream_error")
    if isinstance(e, StipError):
        return ProxyError(502, f"{what}: {e}", "upstream_error")
    if isinstance(e, ValueError):
        return ProxyError(400, str(e))
    return e


# --- the app -----------------------------------------------------------------------------------------


@dataclass
class Local:
    """What the proxy reads from the user's folder: tokenizer and config, and how token ids
    are named towards the engine (π_c for a token-mode sealing; unchanged otherwise: an
    embedding-mode engine gets permuted rows, and shares mode runs P3's own loop)."""

    folder: Path
    config: object
    fingerprint: str
    vocab: int
    rename_ids: Callable[[list[int]], list[int]] = list
    restore_ids: Callable[[list[int]], list[int]] = list
    mode: str = "shares"  # or the sealing's: "tokens", "embeddings"

    @classmethod
    def sealed(cls, client_dir: str | Path) -> "Local":
        bundle = ClientBundle.load(client_dir)
        if bundle.mode != TOKENS:
            return cls(Path(client_dir), bundle.config, bundle.fingerprint, bundle.config.vocab_size, mode=bundle.mode)
        return cls(Path(client_dir), bundle.config, bundle.fingerprint, len(bundle.key.pi_c), bundle.rename_ids, bundle.restore_ids, TOKENS)

    @property
    def causal(self) -> bool:
        from ..models.blocks import CAUSAL_TYPES

        return self.config.model_type in CAUSAL_TYPES


@dataclass
class _Job:
    """One request, parsed: the prompts (real ids), what to ask for each, and how to answer."""

    chat: bool
    prompts: list[list[int]]
    asks: list[Ask]
    stops: list[str]
    echo: bool = False
    logprobs: int | None = None  # completions: k; chat: top_logprobs (0 when only logprobs)


def create_app(local: Local | str | Path, engine: Engine, *, model_name: str | None = None, max_tokens_limit: int | None = None) -> FastAPI:
    """The proxy for one client folder, in front of ``engine`` (see `Engine`). ``max_tokens_limit``
    caps what a request may ask for (default: the model's context)."""
    from transformers import AutoTokenizer

    local = local if isinstance(local, Local) else Local.sealed(local)
    tokenizer = AutoTokenizer.from_pretrained(local.folder, local_files_only=True)
    vocab = local.vocab
    name = model_name or local.config.model_type + "-" + local.fingerprint[:8]
    eos = eos_ids(local.config)
    max_positions = getattr(local.config, "max_position_embeddings", None) or getattr(local.config, "n_positions", None)
    created = int(time.time())
    checked = asyncio.Lock()
    state = {"checked": False}

    app = FastAPI(
        title="stip proxy (P3)",
        version="1",
        description="An OpenAI-compatible endpoint on the user's machine. Prompts are tokenized here; only "
        "token ids renamed by the user's secret π_c, permuted rows, or additive shares reach the cloud.",
    )

    @app.exception_handler(ProxyError)
    async def _proxy_error(_, exc: ProxyError):
        return _error(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5])
        return _error(400, msg or "invalid request", param=where)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, headers=exc.headers)  # keeps 405's Allow

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):  # a bug, never a reaction to input
        log.exception("internal error")
        return _error(500, "internal proxy error", "server_error")

    # --- requests → jobs -------------------------------------------------------------------------

    def check_model(requested: str) -> None:
        if requested != name:
            raise ProxyError(404, f"the model {requested!r} does not exist; this proxy serves {name!r}", "not_found_error", "model")

    async def ready() -> None:
        if not state["checked"]:
            async with checked:
                if not state["checked"]:
                    await engine.check(local)
                    state["checked"] = True

    def chat_ids(req: ChatRequest) -> list[int]:
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]  # fmt: skip
        if not getattr(tokenizer, "chat_template", None):
            raise ProxyError(400, f"{name} has no chat template; use /v1/completions", param="messages")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # the template rejects this conversation (e.g. roles out of order)
            raise ProxyError(400, f"the chat template rejects these messages: {e}", param="messages") from None
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def id_lists(p, what: str) -> list[list[int]]:
        """A string, token ids, or a list of either, as lists of ids."""
        items = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
        if len(items) > MAX_PROMPTS:
            raise ProxyError(400, f"at most {MAX_PROMPTS} inputs per request", param=what)
        out = []
        for item in items:
            ids = tokenizer(item)["input_ids"] if isinstance(item, str) else list(item)
            if not ids:
                raise ProxyError(400, f"the {what} is empty", param=what)
            if any(not 0 <= t < vocab for t in ids):
                raise ProxyError(400, f"token ids must lie in 0..{vocab - 1}", param=what)
            out.append(ids)
        return out

    def sampling(req: _Sampling, logprobs: int | None, prompt_logprobs: int | None) -> Sampling:
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            try:
                t = int(key)
            except ValueError:
                raise ProxyError(400, f"logit_bias keys are token ids, not {key[:20]!r}", param="logit_bias") from None
            if not 0 <= t < vocab:
                raise ProxyError(400, f"logit_bias names token {t}; ids lie in 0..{vocab - 1}", param="logit_bias")
            bias[local.rename_ids([t])[0]] = value
        try:
            return Sampling(req.temperature, req.top_p, req.seed, req.presence_penalty or 0.0, req.frequency_penalty or 0.0, bias,
                            logprobs, prompt_logprobs)  # fmt: skip
        except ValueError as e:
            raise ProxyError(400, str(e), param="logit_bias" if "logit_bias" in str(e) else None) from None

    def ask(req: _Sampling, ids: list[int], max_tokens: int | None, s: Sampling) -> Ask:
        room = max_positions - len(ids) if max_positions else None
        if room is not None and room < 1:
            raise ProxyError(400, f"the prompt has {len(ids)} tokens; the model takes at most {max_positions}", param="prompt")
        if max_tokens is None:
            max_tokens = min(x for x in (room, max_tokens_limit, DEFAULT_MAX_TOKENS) if x)
        elif room is not None and max_tokens > room:
            raise ProxyError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's {max_positions}", param="max_tokens")
        if max_tokens_limit and max_tokens > max_tokens_limit:
            raise ProxyError(400, f"max_tokens ({max_tokens}) exceeds this proxy's limit of {max_tokens_limit}", param="max_tokens")
        if req.min_tokens > max_tokens:
            raise ProxyError(400, "min_tokens exceeds max_tokens", param="min_tokens")
        stop = frozenset() if req.ignore_eos else frozenset(local.rename_ids(sorted(eos)))
        return Ask(local.rename_ids(ids), max_tokens, s, req.n, stop, req.min_tokens)

    def generative() -> None:
        if not local.causal:
            raise ProxyError(400, f"{name} is an encoder: use /v1/embeddings", param="model")

    def completion_job(req: CompletionRequest) -> _Job:
        check_model(req.model)
        generative()
        prompts = id_lists(req.prompt, "prompt")
        s = sampling(req, req.logprobs, req.logprobs if req.echo and req.logprobs is not None else None)
        return _Job(False, prompts, [ask(req, ids, req.max_tokens, s) for ids in prompts], _stops(req.stop), req.echo, req.logprobs)

    def chat_job(req: ChatRequest) -> _Job:
        check_model(req.model)
        generative()
        if req.top_logprobs is not None and not req.logprobs:
            raise ProxyError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        ids = chat_ids(req)
        return _Job(True, [ids], [ask(req, ids, req.max_completion_tokens or req.max_tokens, sampling(req, k, None))], _stops(req.stop), logprobs=k)

    # --- jobs → OpenAI's answers -----------------------------------------------------------------

    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    def completion_logprobs(entries: list[TokenLogprob | None], offset: int, ids: list[int] | None = None) -> dict:
        """OpenAI's completions block; an entry of None (the first prompt id, ``ids[i]``) has no logprob."""
        tokens, values, tops, offsets = [], [], [], []
        for i, e in enumerate(entries):
            text = token_text(e.token if e is not None else ids[i])
            tokens.append(text)
            values.append(None if e is None else e.logprob)
            tops.append(None if e is None else {token_text(t): v for t, v in [*e.top, (e.token, e.logprob)]})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(entries: list[TokenLogprob]) -> dict:
        def one(t, v):
            text = token_text(t)
            return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]}

    def restore(piece: Piece) -> Piece:
        def back(entries):
            return [None if e is None else TokenLogprob(local.restore_ids([e.token])[0], e.logprob,
                                                        list(zip(local.restore_ids([t for t, _ in e.top]), (v for _, v in e.top))))
                    for e in entries]  # fmt: skip

        return Piece(piece.choice, local.restore_ids(piece.ids), back(piece.logprobs), piece.finish,
                     None if piece.prompt_logprobs is None else back(piece.prompt_logprobs))  # fmt: skip

    async def pieces(job: _Job) -> AsyncIterator[tuple[int, Piece]]:
        """Every prompt's pieces as they come, with the choice's index in the answer (prompt
        p, choice c → p·n + c, as OpenAI numbers them). Leaving early stops every engine call."""
        queue: asyncio.Queue = asyncio.Queue()

        async def one(p: int, a: Ask):
            # aclosing: a cancelled call closes the engine's generator now, not at the GC (its
            # finally hands a shares walker back, stops a worker thread's emit). CancelledError
            # is not caught: the task ends cancelled.
            try:
                async with aclosing(engine.generate(a)) as gen:
                    async for piece in gen:
                        await queue.put((p * a.n + piece.choice, restore(piece)))
            except Exception as e:  # noqa: BLE001 — handed to the consumer
                await queue.put(e)
                return
            await queue.put(None)

        await ready()
        tasks = [asyncio.ensure_future(one(p, a)) for p, a in enumerate(job.asks)]
        try:
            left = len(tasks)
            while left:
                item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def events(job: _Job) -> AsyncIterator[dict]:
        """The answer as OpenAI's choice deltas, one dict per change of one choice: text
        (stop strings applied), real ids, logprobs, and at the end its finish reason."""
        n = job.asks[0].n
        detoks = [Detokenizer(tokenizer, job.stops) for _ in range(len(job.prompts) * n)]
        done = [False] * len(detoks)
        counts = [0] * len(detoks)
        offsets = [0] * len(detoks)
        echoed = [not job.echo] * len(detoks)
        ended = [False] * len(detoks)  # the engine said so (else the proxy stopped it: a stop string)
        stream = pieces(job)
        try:
            async for i, piece in stream:
                if done[i]:
                    continue
                out: dict = {"index": i, "text": "", "ids": [], "finish": None}
                if not echoed[i]:
                    echoed[i] = True
                    prompt = job.prompts[i // n]
                    out["text"] = tokenizer.decode(prompt, skip_special_tokens=False)
                    offsets[i] = len(out["text"])
                    if job.logprobs is not None and piece.prompt_logprobs is not None:
                        out["logprobs"] = completion_logprobs(piece.prompt_logprobs, 0, prompt)
                d = detoks[i]
                if piece.ids:
                    counts[i] += len(piece.ids)
                    out["text"] += d.add(piece.ids)
                    out["ids"] = piece.ids
                    if job.logprobs is not None:
                        lp = piece.logprobs
                        if job.chat:
                            out["logprobs"] = chat_logprobs(lp)
                        else:
                            more = completion_logprobs(lp, offsets[i])
                            offsets[i] = more["text_offset"][-1] + len(more["tokens"][-1]) if more["tokens"] else offsets[i]
                            out["logprobs"] = _join(out.get("logprobs"), more)
                    if d.stopped:
                        done[i], out["finish"] = True, "stop"
                ended[i] = ended[i] or bool(piece.finish)
                if piece.finish and not done[i]:
                    out["text"] += d.finish()
                    done[i], out["finish"] = True, "stop" if piece.finish == "stop" else "length"
                out["completion_tokens"] = counts[i]
                yield out
                if all(done) and not all(ended):
                    return  # the proxy stopped a choice (a stop string): cancel the engine's calls
                # else read on to the engine's own end: cancelling an httpx stream in mid-read can
                # leave its connection checked out of the pool (httpcore), and 256 of them fill it
        finally:
            await stream.aclose()
        for i in range(len(detoks)):  # an engine that ended a choice without saying why
            if not done[i]:
                yield {"index": i, "text": detoks[i].finish(), "ids": [], "finish": "length", "completion_tokens": counts[i]}

    def usage(job: _Job, completion: int) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def choice(job: _Job, i: int, text: str, finish, ids, logprobs, stream: bool, return_ids: bool) -> dict:
        if job.chat:
            body = {"delta": {"content": text} if text else {}} if stream else {"message": {"role": "assistant", "content": text}}
            c = {"index": i, **body, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**c, "token_ids": ids} if return_ids else c

    async def answer(req: _Sampling, job: _Job):
        rid = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion" if job.chat else "text_completion", "created": int(time.time()), "model": name}
        stream = await first_then_rest(events(job))
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            head["object"] = "chat.completion.chunk" if job.chat else "text_completion"

            async def chunks():
                if job.chat:
                    for i in range(len(job.prompts) * job.asks[0].n):
                        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                counts = {}
                async for e in stream:
                    counts[e["index"]] = e["completion_tokens"]
                    if e["text"] or e["finish"] or (e["ids"] and req.return_token_ids) or e.get("logprobs"):
                        yield {**head, "choices": [choice(job, e["index"], e["text"], e["finish"], e["ids"], e.get("logprobs"), True, req.return_token_ids)]}
                if include_usage:
                    yield {**head, "choices": [], "usage": usage(job, sum(counts.values()))}

            return sse(chunks())
        acc: dict[int, dict] = {}
        async for e in stream:
            a = acc.setdefault(e["index"], {"text": [], "ids": [], "logprobs": None, "finish": None, "n": 0})
            a["text"].append(e["text"])
            a["ids"] += e["ids"]
            a["finish"] = e["finish"] or a["finish"]
            a["n"] = e["completion_tokens"]
            if e.get("logprobs"):
                a["logprobs"] = _join(a["logprobs"], e["logprobs"])
        choices = [choice(job, i, "".join(a["text"]), a["finish"], a["ids"],
                          a["logprobs"] if job.logprobs is not None else None, False, req.return_token_ids)
                   for i, a in sorted(acc.items())]  # fmt: skip
        return {**head, "choices": choices, "usage": usage(job, sum(a["n"] for a in acc.values()))}

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def events():
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c)}\n\n"
            except ProxyError as e:  # headers are sent: the error goes in the stream
                yield f"data: {json.dumps(_error_body(e.message, e.kind, e.param))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def first_then_rest(gen: AsyncIterator) -> AsyncIterator:
        """Start the generator before answering, so that refusals (bad request, engine down)
        still get a proper status code rather than an error inside a 200 stream."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            first = None

        async def rest():
            if first is None:
                return
            yield first
            async for item in gen:
                yield item

        return rest()

    # --- routes ----------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "stip"}]}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(req: CompletionRequest):
        return await answer(req, completion_job(req))

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(req: ChatRequest):
        return await answer(req, chat_job(req))

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(req: EmbeddingRequest):
        check_model(req.model)
        if local.causal:
            raise ProxyError(400, f"{name} is a causal language model: use /v1/completions", param="model")
        ids = id_lists(req.input, "input")
        width = max(map(len, ids))
        if max_positions and width > max_positions:
            raise ProxyError(400, f"an input has {width} tokens; the model takes at most {max_positions}", param="input")
        batch = {"input_ids": torch.zeros(len(ids), width, dtype=torch.long), "attention_mask": torch.zeros(len(ids), width, dtype=torch.long)}
        for r, row in enumerate(ids):
            batch["input_ids"][r, : len(row)], batch["attention_mask"][r, : len(row)] = torch.tensor(row), 1
        await ready()
        vectors = await engine.embed(batch)
        data = [{"object": "embedding", "index": i, "embedding": _vector(v, req.encoding_format)} for i, v in enumerate(vectors)]
        total = sum(map(len, ids))
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": total, "total_tokens": total}}

    @app.on_event("shutdown")
    async def _close():
        await engine.close()

    app.state.model_name = name
    return app


def _join(a: dict | None, b: dict) -> dict:
    """Two logprobs blocks of one choice, in order (completions: lists; chat: content)."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in b}


def _vector(v: torch.Tensor, fmt: str):
    if fmt == "base64":
        import base64

        return base64.b64encode(v.float().numpy().astype("<f4").tobytes()).decode()
    return v.float().tolist()
