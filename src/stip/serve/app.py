"""P2's HTTP service: permuted embeddings in, permuted outputs out.

    GET    /v1/health                   liveness (no auth)
    GET    /v1/info                     architecture and shapes, no secrets
    POST   /v1/forward                  {embeddings, attention_mask?, position_ids?} → outputs
    POST   /v1/sessions                 open a generation session with the prompt's embeddings
    POST   /v1/sessions/{id}/step       the next token(s)' embeddings → last-position logits
    DELETE /v1/sessions/{id}            close

Bodies are ``stip.wire`` messages (safetensors). Every refusal is a 4xx JSON
``{"error": {"status", "message"}}``; the model runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import wire
from ..wire import FLOATS, INTS, MEDIA_TYPE, Spec, WireError
from . import engine
from .sessions import SessionStore

log = logging.getLogger("stip.serve")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 20
    max_batch: int = 32
    max_tokens: int | None = None  # default: the model's own position limit
    max_sessions: int = 64
    session_idle_seconds: float = 300.0


class ErrorDetail(BaseModel):
    status: int
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else headers
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


BINARY_BODY = {
    "requestBody": {
        "required": True,
        "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        "description": "A stip.wire message (safetensors): float32/float16 `embeddings` (batch, tokens, dim) "
        "permuted by π; optional integer `attention_mask` (batch, tokens) and, for causal models, `position_ids`.",
    }
}
ERRORS = {s: {"model": ErrorBody, "description": d} for s, d in {
    400: "malformed body",
    401: "missing or wrong bearer token",
    404: "unknown session",
    409: "session busy",
    410: "session expired",
    413: "body, batch or sequence too large",
    422: "wrong tensor names, dtype, shape, or NaN/Inf",
    429: "too many open sessions",
}.items()}


def _binary_response(description: str) -> dict:
    return {200: {"description": description, "content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}}


def create_app(server_dir: str | Path, token: str | None = None, limits: Limits = Limits()) -> FastAPI:
    model = engine.load(server_dir)
    if getattr(model.config, engine.META).get("mode") == "tokens":
        raise engine.NotSealed(f"{server_dir} is a token-mode sealing: serve it with vLLM and query it through `stip proxy` (docs/deploy.md)")
    info = engine.describe(model)
    dim, fixed, causal = info["input_dim"], info["fixed_tokens"], info["causal"]
    caps = [n for n in (limits.max_tokens, info["max_positions"]) if n]
    max_tokens = min(caps) if caps else None
    sessions = SessionStore(limits.max_sessions, limits.session_idle_seconds)
    expected_token = token.encode() if token else None

    @asynccontextmanager
    async def lifespan(_app):
        async def sweeper():
            while True:
                await asyncio.sleep(max(0.5, min(30.0, limits.session_idle_seconds / 2)))
                sessions.sweep()

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()

    app = FastAPI(
        lifespan=lifespan,
        title="stip cloud (P2)",
        version="1",
        description="Serves a sealed checkpoint: permuted embeddings in, permuted outputs out. "
        "Binary bodies are stip.wire (safetensors) messages.",
    )

    @app.exception_handler(WireError)
    async def _wire_error(_, exc: WireError):
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return _error(422, "; ".join(e.get("msg", "invalid request") for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), exc.headers)  # 405 keeps its Allow header (RFC 9110)

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):  # a bug, never a reaction to input
        log.exception("internal error")
        return _error(500, "internal server error")

    def auth(request: Request) -> None:
        if expected_token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise WireError("missing bearer token (Authorization: Bearer …)", 401)
        if not hmac.compare_digest(given.strip().encode(), expected_token):
            raise WireError("wrong bearer token", 401)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise WireError("bad Content-Length", 400)
            if int(declared) > limits.max_body_bytes:
                raise WireError(f"body of {declared} bytes exceeds the limit of {limits.max_body_bytes}", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise WireError(f"body exceeds the limit of {limits.max_body_bytes} bytes", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    def check_embeddings(x: torch.Tensor, *, batch_one: bool = False, past: int = 0) -> torch.Tensor:
        b, n, d = x.shape
        if d != dim:
            raise WireError(f"'embeddings' has width {d}; this model takes {dim}")
        if b < 1 or n < 1:
            raise WireError("'embeddings' is empty")
        if batch_one and b != 1:
            raise WireError("a generation session takes batch 1")
        if b > limits.max_batch:
            raise WireError(f"batch of {b} exceeds the limit of {limits.max_batch}", 413)
        if fixed is not None and n != fixed:
            raise WireError(f"this model takes exactly {fixed} tokens, got {n}")
        if max_tokens is not None and past + n > max_tokens:
            raise WireError(f"sequence of {past + n} tokens exceeds the limit of {max_tokens}", 413)
        return x.to(torch.float32)

    def per_token(m: torch.Tensor | None, x: torch.Tensor, name: str, low: int, high: int | None) -> torch.Tensor | None:
        """An optional (batch, tokens) integer tensor with values in low..high-1."""
        if m is None:
            return None
        if tuple(m.shape) != tuple(x.shape[:2]):
            raise WireError(f"{name!r} has shape {list(m.shape)}; expected {list(x.shape[:2])}")
        m = m.to(torch.long)
        if (m < low).any() or (high is not None and (m >= high).any()):
            raise WireError(f"{name!r} must hold values in {low}..{high - 1 if high is not None else '∞'}")
        return m

    async def compute(x: torch.Tensor, **kwargs) -> tuple[dict, float]:
        """The sealed forward in a worker thread (off the event loop), timed."""

        def run():
            t0 = time.perf_counter()
            out = engine.forward(model, x, **kwargs)
            return out, time.perf_counter() - t0

        return await run_in_threadpool(run)

    def timed_response(outputs: dict[str, torch.Tensor], seconds: float, meta: dict | None = None, headers=None) -> Response:
        blob = wire.encode(outputs, meta)
        h = {"X-Stip-Compute-Ms": f"{seconds * 1e3:.3f}", **(headers or {})}
        return Response(content=blob, media_type=MEDIA_TYPE, headers=h)

    @app.get("/v1/health", responses={200: {"description": "the server is up"}})
    async def health() -> dict:
        return {"status": "ok", "open_sessions": len(sessions)}

    @app.get("/v1/info", dependencies=[Depends(auth)], responses={401: ERRORS[401]})
    async def model_info() -> dict:
        return {
            **info,
            "limits": {
                "max_body_bytes": limits.max_body_bytes,
                "max_batch": limits.max_batch,
                "max_tokens": max_tokens,
                "max_sessions": limits.max_sessions,
                "session_idle_seconds": limits.session_idle_seconds,
            },
        }

    forward_spec = {"embeddings": Spec(FLOATS, 3), "attention_mask": Spec(INTS, 2, required=False)}
    if causal:
        forward_spec["position_ids"] = Spec(INTS, 2, required=False)

    @app.post(
        "/v1/forward",
        dependencies=[Depends(auth)],
        openapi_extra=BINARY_BODY,
        responses={**_binary_response(f"stip.wire message with {', '.join(info['outputs'])} (permuted)"), **ERRORS},
        response_class=Response,
    )
    async def forward(request: Request):
        tensors, _ = wire.decode(await read_body(request), forward_spec)
        x = check_embeddings(tensors["embeddings"])
        mask = per_token(tensors.get("attention_mask"), x, "attention_mask", 0, 2)
        if mask is not None and fixed is not None:
            raise WireError("vision models take no 'attention_mask'")
        pos = per_token(tensors.get("position_ids"), x, "position_ids", 0, max_tokens)
        out, seconds = await compute(x, attention_mask=mask, position_ids=pos)
        return timed_response({k: v for k, v in out.items() if isinstance(v, torch.Tensor)}, seconds)

    session_spec = {"embeddings": Spec(FLOATS, 3)}

    def need_causal():
        if not causal:
            raise WireError("generation sessions exist only for causal language models", 404)

    @app.post(
        "/v1/sessions",
        dependencies=[Depends(auth)],
        openapi_extra=BINARY_BODY,
        responses={**_binary_response("last-position logits (1, vocab), permuted by π_c; metadata and header X-Stip-Session carry the session id"), **ERRORS},
        response_class=Response,
    )
    async def open_session(request: Request):
        need_causal()
        tensors, _ = wire.decode(await read_body(request), session_spec)
        x = check_embeddings(tensors["embeddings"], batch_one=True)
        sessions.reserve()
        out, seconds = await compute(x, use_cache=True)
        s = sessions.add(out["past_key_values"], x.shape[1])
        meta = {"session": s.id, "length": str(s.length)}
        return timed_response({"logits": out["logits"][:, -1, :]}, seconds, meta, {"X-Stip-Session": s.id})

    @app.post(
        "/v1/sessions/{session_id}/step",
        dependencies=[Depends(auth)],
        openapi_extra=BINARY_BODY,
        responses={**_binary_response("last-position logits (1, vocab), permuted by π_c"), **ERRORS},
        response_class=Response,
    )
    async def step(session_id: str, request: Request):
        need_causal()
        tensors, _ = wire.decode(await read_body(request), session_spec)
        s = sessions.acquire(session_id)
        try:
            x = check_embeddings(tensors["embeddings"], batch_one=True, past=s.length)
            out, seconds = await compute(x, past_key_values=s.cache, use_cache=True)
            s.cache, s.length = out["past_key_values"], s.length + x.shape[1]
        finally:
            sessions.release(s)
        return timed_response({"logits": out["logits"][:, -1, :]}, seconds, {"session": s.id, "length": str(s.length)})

    @app.delete("/v1/sessions/{session_id}", dependencies=[Depends(auth)], responses={404: ERRORS[404], 410: ERRORS[410], 401: ERRORS[401]})
    async def close_session(session_id: str) -> dict:
        need_causal()
        sessions.close(session_id)
        return {"closed": session_id}

    app.state.model = model
    app.state.sessions = sessions
    return app
