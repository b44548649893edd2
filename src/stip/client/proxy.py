"""P3 as a local OpenAI-compatible proxy: ``stip proxy OUT/client --upstream URL``.

Applications speak OpenAI to the proxy on loopback, unchanged. For each request the proxy

    applies the chat template and tokenizes (locally)      text → ids
    renames the ids by π_c                                 ids → the names P2 knows
    asks the engine for ids (vLLM /v1/completions, a token-id prompt, token ids back)
    restores the returned ids, detokenizes, applies stop strings, answers in OpenAI's format.

No text crosses the wire, only renamed ids. Sampling (temperature, top-p, seed) runs in the
engine on the permuted logits: softmax and nucleus sampling do not depend on the order of
the vocabulary. Stop strings are matched here, on the text, since the engine never sees it.

In shares mode (``stip proxy SRC --shares S1,S2``) the engine is `stip.shares.engine`: P3's
own loop over the public model with two share servers, on real ids; everything above the
engine is the same.

    GET  /v1/models               the one model this client folder belongs to
    POST /v1/completions          prompt: a string or a list of token ids
    POST /v1/chat/completions     messages → the model's own chat template
Both POSTs stream as server-sent events with ``"stream": true``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Literal, Union

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import tls
from .api import link_verify
from .bundle import TOKENS, ClientBundle

log = logging.getLogger("stip.proxy")
SERVED_PREFIX = "stip-"  # as stip.serve.vllm names a sealing (the core never imports serve)
DEFAULT_MAX_TOKENS = 4096  # a chat request that names no max_tokens stops here at the latest


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
    n: Literal[1] = Field(1, description="Only 1 is supported.")
    frequency_penalty: Literal[0, 0.0] | None = Field(None, description="Only 0 is supported.")
    presence_penalty: Literal[0, 0.0] | None = Field(None, description="Only 0 is supported.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-text token.")
    min_tokens: int = Field(0, ge=0, description="vLLM extension: generate at least this many tokens.")
    return_token_ids: bool = Field(False, description="vLLM extension: also return the generated token ids (real ids; they stay local).")


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]] = Field(description="Text, a list of token ids, or a list of one text.")
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] = False
    logprobs: None = None
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
    logprobs: Literal[False] | None = None


# --- errors in OpenAI's shape -----------------------------------------------------------------------


class ProxyError(Exception):
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
    504: "the upstream engine timed out",
}.items()}


# --- the upstream engine ---------------------------------------------------------------------------


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

    def __post_init__(self):
        verify = link_verify(self.url, self.trust, self.insecure, "the upstream engine")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.http = httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=headers, timeout=self.timeout, limits=limits, verify=verify)

    async def served_model(self, fingerprint: str) -> str:
        if self.model is None:
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
        """Transport failures as the statuses the client gets: 504 for a timeout, else 502."""
        try:
            yield
        except httpx.TimeoutException:
            raise ProxyError(504, f"the upstream engine at {self.url} timed out", "upstream_timeout") from None
        except httpx.TransportError as e:
            raise ProxyError(502, f"the upstream engine at {self.url} is unreachable or failed ({type(e).__name__})", "upstream_error") from None

    async def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        with self._transport():
            r = await self.http.request(method, path, **kwargs)
        _raise_upstream(r)
        return r

    async def generate(self, body: dict) -> AsyncIterator[tuple[list[int], str | None]]:
        """Stream (new ids, finish reason) from /v1/completions. Leaving the loop early closes
        the connection, which aborts the request in the engine."""
        with self._transport():
            async with self.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
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
                    for choice in chunk.get("choices", []):
                        yield list(choice.get("token_ids") or []), choice.get("finish_reason")

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
    if 400 <= r.status_code < 500 and r.status_code not in (401, 403):
        raise ProxyError(400, f"the engine refused the request: {message}")  # e.g. prompt too long
    raise ProxyError(502, f"upstream answered {r.status_code}: {message}", "upstream_error")


# --- text in, text out -------------------------------------------------------------------------------


class Detokenizer:
    """Incremental detokenization: text grows as ids arrive; a trailing partial UTF-8
    character is held back until its next byte's token comes."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already handed out
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        """The newly final text after ``ids``; sets ``stopped`` when a stop string appears."""
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            text = text[:-1]
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(cut)
        hold = max((len(s) - 1 for s in self.stops), default=0)  # a stop string may be starting
        return self._take(max(self.sent, len(text) - hold))

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


# --- the app -----------------------------------------------------------------------------------------


@dataclass
class Local:
    """What the proxy reads from the user's folder: tokenizer and config, and how token ids
    are named towards the engine (π_c for a token-mode sealing; unchanged in shares mode,
    where the engine is P3's own loop)."""

    folder: Path
    config: object
    fingerprint: str
    vocab: int
    rename_ids: Callable[[list[int]], list[int]] = list
    restore_ids: Callable[[list[int]], list[int]] = list

    @classmethod
    def sealed(cls, client_dir: str | Path) -> "Local":
        bundle = ClientBundle.load(client_dir)
        if bundle.mode != TOKENS:
            raise ValueError(f"{client_dir} was sealed in {bundle.mode} mode; the proxy serves token-mode sealings (stip seal --mode tokens)")
        return cls(Path(client_dir), bundle.config, bundle.fingerprint, len(bundle.key.pi_c), bundle.rename_ids, bundle.restore_ids)


def create_app(
    local: Local | str | Path, upstream: Upstream, *, model_name: str | None = None, max_tokens_limit: int | None = None
) -> FastAPI:
    """The proxy for one token-mode client folder (or a `Local` with any engine that has
    Upstream's ``served_model``, ``generate`` and ``close``). ``max_tokens_limit`` caps what a
    request may ask for (default: the model's context)."""
    from transformers import AutoTokenizer

    local = local if isinstance(local, Local) else Local.sealed(local)
    tokenizer = AutoTokenizer.from_pretrained(local.folder, local_files_only=True)
    vocab = local.vocab
    name = model_name or local.config.model_type + "-" + local.fingerprint[:8]
    eos = getattr(local.config, "eos_token_id", None)
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    max_positions = getattr(local.config, "max_position_embeddings", None) or getattr(local.config, "n_positions", None)
    created = int(time.time())

    app = FastAPI(
        title="stip proxy (P3)",
        version="1",
        description="An OpenAI-compatible endpoint on the user's machine. Prompts are tokenized here; only "
        "token ids renamed by the user's secret π_c reach the cloud's engine.",
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

    def check_model(requested: str) -> None:
        if requested != name:
            raise ProxyError(404, f"the model {requested!r} does not exist; this proxy serves {name!r}", "not_found_error", "model")

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

    def completion_ids(req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(t, str) for t in p):
            if len(p) != 1:
                raise ProxyError(400, "one prompt per request (n and batched prompts are not supported)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            return tokenizer(p)["input_ids"]
        if any(not 0 <= t < vocab for t in p):
            raise ProxyError(400, f"token ids must lie in 0..{vocab - 1}", param="prompt")
        return list(p)

    def upstream_body(req: _Sampling, ids: list[int], max_tokens: int | None) -> dict:
        if not ids:
            raise ProxyError(400, "the prompt is empty", param="prompt")
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
        body = {
            "prompt": local.rename_ids(ids),
            "max_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "return_token_ids": True,
            "ignore_eos": req.ignore_eos,
            "min_tokens": req.min_tokens,
            "skip_special_tokens": False,
        }
        if eos_ids and not req.ignore_eos:
            body["stop_token_ids"] = local.rename_ids(eos_ids)
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    async def run(req: _Sampling, ids: list[int], max_tokens: int | None) -> AsyncIterator[tuple[str, str | None, list[int]]]:
        """(text delta, finish reason or None, the new real ids) as the engine goes."""
        body = upstream_body(req, ids, max_tokens)
        body["model"] = await upstream.served_model(local.fingerprint)
        detok = Detokenizer(tokenizer, _stops(req.stop))
        finish = None
        gen = upstream.generate(body)
        try:
            async for new, reason in gen:
                real = local.restore_ids(new)
                delta = detok.add(real)
                if detok.stopped:
                    finish = "stop"
                    yield delta, None, real
                    break
                finish = reason or finish
                if delta or real:
                    yield delta, None, real
        finally:
            await gen.aclose()  # closes the upstream stream: the engine aborts the request
        yield detok.finish(), finish or "length", []

    def usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

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
        first = await gen.__anext__()

        async def rest():
            yield first
            async for item in gen:
                yield item

        return rest()

    async def collect(parts) -> tuple[str, str | None, list[int]]:
        text, finish, got = [], None, []
        async for delta, finish, new in parts:
            text.append(delta)
            got += new
        return "".join(text), finish, got

    def with_ids(choice: dict, new: list[int], req: _Sampling) -> dict:
        return {**choice, "token_ids": new} if req.return_token_ids else choice

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "stip"}]}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(req: CompletionRequest):
        check_model(req.model)
        ids = completion_ids(req)
        rid, t = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        parts = await first_then_rest(run(req, ids, req.max_tokens))
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def chunks():
                n = 0
                async for delta, finish, new in parts:
                    n += len(new)
                    if delta or finish or (new and req.return_token_ids):
                        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
                        yield {"id": rid, "object": "text_completion", "created": t, "model": name,
                               "choices": [with_ids(choice, new, req)]}  # fmt: skip
                if include_usage:
                    yield {"id": rid, "object": "text_completion", "created": t, "model": name, "choices": [], "usage": usage(len(ids), n)}

            return sse(chunks())
        text, finish, got = await collect(parts)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "text_completion", "created": t, "model": name,
                "choices": [with_ids(choice, got, req)], "usage": usage(len(ids), len(got))}  # fmt: skip

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(req: ChatRequest):
        check_model(req.model)
        ids = chat_ids(req)
        rid, t = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        parts = await first_then_rest(run(req, ids, req.max_completion_tokens or req.max_tokens))
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def chunks():
                base = {"id": rid, "object": "chat.completion.chunk", "created": t, "model": name}
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                n = 0
                async for delta, finish, new in parts:
                    n += len(new)
                    if delta or finish or (new and req.return_token_ids):
                        choice = {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}
                        yield {**base, "choices": [with_ids(choice, new, req)]}
                if include_usage:
                    yield {**base, "choices": [], "usage": usage(len(ids), n)}

            return sse(chunks())
        text, finish, got = await collect(parts)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": t, "model": name,
                "choices": [with_ids(choice, got, req)], "usage": usage(len(ids), len(got))}  # fmt: skip

    @app.on_event("shutdown")
    async def _close():
        await upstream.close()

    app.state.model_name = name
    return app
