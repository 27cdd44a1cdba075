"""FastAPI app factory: routes, validation against the server's limits, content negotiation, one error format.

`create_app(settings, engine=None)`: the lifespan starts the engine (built from settings when none is
given), so tests can wrap any engine. Every error, ours or FastAPI's, leaves as the `ErrorEnvelope` JSON.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from protocol import codec
from protocol.schema import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    PROTOCOL_VERSION,
    ErrorEnvelope,
    GenerateRequestJSON,
    GenerateResponseJSON,
    InfoResponse,
    ProtocolError,
    ScoreBatch,
    ScoreRequestJSON,
    ScoreResponseJSON,
    cap_message,
)
from teacher_server.engines import ScoringEngine, build_engine
from teacher_server.engines.base import score_timings
from teacher_server.metrics import Metrics
from teacher_server.peer_routes import add_peer_routes
from teacher_server.settings import Settings
from teacher_server.tenants import (
    FairGate,
    GatedEngine,
    Tenants,
    TenantState,
    current_tenant,
    install_sighup,
    watch_keys_file,
)

logger = logging.getLogger(__name__)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": desc}
    for code, desc in {
        400: "Invalid request (bad top_k, score_from, token id, protocol version, body)",
        401: "Missing, wrong or revoked API key",
        406: "Accept-Encoding excludes identity and every coding the server offers (zstd, lz4)",
        413: "Request or body over the server's limits",
        415: "Unsupported Content-Type or Content-Encoding",
        422: "Schema violation",
        429: "At capacity, or over the tenant's own limit (Retry-After says when to retry)",
        503: "Engine not ready or failed",
    }.items()
}


def error_response(status: int, error_type: str, message: str, metrics: Metrics | None = None) -> JSONResponse:
    if metrics is not None:
        metrics.errors.labels(type=error_type).inc()
    return JSONResponse(
        status_code=status, content={"error": {"type": error_type, "message": cap_message(str(message))}}
    )


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def _response_media_type(request: Request, request_media: str) -> str:
    accept = (request.headers.get("accept") or "").lower()
    if MSGPACK_MEDIA_TYPE in accept:
        return MSGPACK_MEDIA_TYPE
    if JSON_MEDIA_TYPE in accept:
        return JSON_MEDIA_TYPE
    return request_media  # no preference (or */*): answer in the request's encoding


async def _read_body(request: Request, limit: int) -> bytes:
    """Read the body, refusing it (413) as soon as it exceeds `limit` bytes - before anything is parsed."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(f"body of {declared} bytes exceeds max_body_bytes={limit}", error_type="body_too_large", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(f"body exceeds max_body_bytes={limit}", error_type="body_too_large", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def server_timing(timings: dict[str, float]) -> str:
    """`Server-Timing: gate;dur=0.1, queue;dur=12.5, forward;dur=40.2, total;dur=55.0` (milliseconds)."""
    return ", ".join(f"{stage};dur={1000 * s:.1f}" for stage, s in timings.items())


def validate_batch(batch: ScoreBatch, settings: Settings, info) -> None:
    """The server's limits and the model's vocabulary, checked vectorised (no per-position Python)."""
    codec.check_protocol_version(batch.protocol_version)
    max_k = min(settings.max_top_k, info.vocab_size)
    if not 1 <= batch.top_k <= max_k:
        raise ProtocolError(
            f"top_k={batch.top_k} is out of range: it must be in [1, {max_k}] (the server's max_top_k; start the "
            "teacher with a larger --max-top-k to raise it)",
            error_type="invalid_top_k",
        )
    b = batch.num_sequences
    if b == 0:
        raise ProtocolError("sequences is empty: send at least one sequence", error_type="empty_request")
    if b > settings.max_sequences_per_request:
        raise ProtocolError(
            f"{b} sequences exceed max_sequences_per_request={settings.max_sequences_per_request}; split the request",
            error_type="too_many_sequences",
            status=413,
        )
    if batch.num_tokens > settings.max_tokens_per_request:
        raise ProtocolError(
            f"{batch.num_tokens} tokens exceed max_tokens_per_request={settings.max_tokens_per_request}; split the request",
            error_type="request_too_large",
            status=413,
        )
    too_long = np.flatnonzero(batch.lengths_B > info.max_seq_len)
    if too_long.size:
        i = int(too_long[0])
        raise ProtocolError(
            f"sequence {i} has {int(batch.lengths_B[i])} tokens, more than max_seq_len={info.max_seq_len}",
            error_type="sequence_too_long",
        )
    bad_start = np.flatnonzero((batch.score_from_B < 1) | (batch.score_from_B >= batch.lengths_B))
    if bad_start.size:
        i = int(bad_start[0])
        raise ProtocolError(
            f"sequence {i}: score_from={int(batch.score_from_B[i])} must satisfy 1 <= score_from < len(token_ids)="
            f"{int(batch.lengths_B[i])}",
            error_type="invalid_score_from",
        )
    bad_ids = np.flatnonzero((batch.token_ids_T < 0) | (batch.token_ids_T >= info.vocab_size))
    if bad_ids.size:
        pos = int(bad_ids[0])
        seq = int(np.searchsorted(batch.offsets_B1, pos, side="right") - 1)
        raise ProtocolError(
            f"sequence {seq}: token id {int(batch.token_ids_T[pos])} is outside the vocabulary [0, {info.vocab_size})",
            error_type="invalid_token_id",
        )


async def _watch_engine(app: FastAPI, eng: ScoringEngine, period_s: float = 1.0) -> None:
    """If the engine dies, /health and every request answer 503 (ready_engine checks healthy()), and the process
    is asked to stop so that its orchestrator restarts it (`python -m teacher_server` then exits non-zero)."""
    while True:
        await asyncio.sleep(period_s)
        if not eng.healthy():
            logger.error("the %s engine is no longer healthy: answering 503 and shutting down", eng.info.engine)
            app.state.engine_failed = True
            if app.state.server is not None:
                app.state.server.should_exit = True
            return


def create_app(settings: Settings, engine: ScoringEngine | None = None) -> FastAPI:
    metrics = Metrics()
    tenants = Tenants(settings.api_keys_file, settings.api_key.get_secret_value() if settings.api_key else None)
    gate = FairGate(settings.engine_tokens_in_flight or 2 * settings.max_tokens_per_batch, settings.scheduling == "fair")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng = engine if engine is not None else build_engine(settings)
        eng.observe_forward = metrics.observe_forward
        await eng.start()
        app.state.engine = GatedEngine(eng, tenants, gate, metrics)
        logger.info("teacher ready: %s", eng.info)
        watchdog = asyncio.create_task(_watch_engine(app, eng))
        keys_watch = None
        if tenants.keys_file is not None:
            keys_watch = asyncio.create_task(watch_keys_file(tenants, settings.api_keys_reload_s))
            install_sighup(tenants)
        try:
            yield
        finally:
            watchdog.cancel()
            if keys_watch is not None:
                keys_watch.cancel()
            app.state.engine = None
            await eng.close()

    app = FastAPI(
        title="aopd teacher",
        version=str(PROTOCOL_VERSION),
        description="Scores token sequences with a teacher model: per position the actual token's logprob and "
        "the teacher's top-K. Bodies are JSON (application/json) or msgpack with raw little-endian arrays "
        "(application/msgpack, see protocol/codec.py). Scoring responses are compressed when the request's "
        "Accept-Encoding asks for zstd or lz4 (Content-Encoding says which), and requests may be sent so too.",
        lifespan=lifespan,
    )
    app.state.engine = None
    app.state.engine_failed = False
    app.state.admitted = 0
    app.state.server = None  # set by __main__ to the uvicorn.Server, so a dead engine can stop the process
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.tenants = tenants
    app.state.gate = gate

    def admit(request: Request) -> TenantState:
        """Auth (which tenant), then the bounded queue: beyond max_queued_requests a request is refused (429), not
        buffered; then the tenant's own request limit."""
        st = tenants.authenticate(request.headers.get("authorization", ""))
        if app.state.admitted >= settings.max_queued_requests:
            raise ProtocolError(
                f"the teacher is at capacity ({settings.max_queued_requests} requests admitted); retry later",
                error_type="overloaded",
                status=429,
            )
        tenants.admit_request(st)
        return st

    @asynccontextmanager
    async def served(request: Request, route: str):
        """Around a work route: auth and bounded admission first, then the in-flight gauge and the per-route
        request/latency metrics, whatever the handler's outcome."""
        t0 = time.perf_counter()
        status, st, token = 500, None, None
        try:
            st = admit(request)
            app.state.admitted += 1
            token = current_tenant.set(st)
            metrics.in_flight.inc()
            yield
            status = 200
        except ProtocolError as exc:
            status = exc.status
            raise
        finally:
            if token is not None:
                current_tenant.reset(token)
                app.state.admitted -= 1
                tenants.release_request(st)
                metrics.in_flight.dec()
            if st is not None:
                metrics.tenant_requests.labels(tenant=st.tenant.name, status=str(status)).inc()
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.latency.labels(route=route).observe(time.perf_counter() - t0)

    def ready_engine(request: Request) -> ScoringEngine:
        eng = request.app.state.engine
        if eng is None or not eng.healthy():
            raise ProtocolError("the teacher engine is not ready", error_type="engine_unavailable", status=503)
        return eng

    # ---------------------------------------------------------------------------------------------------
    # errors: one envelope for everything
    # ---------------------------------------------------------------------------------------------------

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError):
        resp = error_response(exc.status, exc.error_type, str(exc), metrics)
        if exc.status in (429, 503):
            resp.headers["Retry-After"] = str(getattr(exc, "retry_after_s", 1 if exc.status == 429 else 5))
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, "validation_error", f"{where}: {first.get('msg', 'invalid')}", metrics)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail), metrics)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}", metrics)

    # ---------------------------------------------------------------------------------------------------
    # routes
    # ---------------------------------------------------------------------------------------------------

    @app.get("/health", responses={503: _ERROR_RESPONSES[503]})
    async def health(request: Request) -> dict[str, str]:
        ready_engine(request)
        return {"status": "ok"}

    @app.get("/v1/info", response_model=InfoResponse, responses={503: _ERROR_RESPONSES[503]})
    async def info(request: Request) -> InfoResponse:
        eng = ready_engine(request)
        i = eng.info
        return InfoResponse(
            protocol_version=PROTOCOL_VERSION,
            model=i.model,
            engine=i.engine,
            vocab_size=i.vocab_size,
            tokenizer_fingerprint=i.tokenizer_fingerprint,
            max_top_k=min(settings.max_top_k, i.vocab_size),
            max_tokens_per_request=settings.max_tokens_per_request,
            max_sequences_per_request=settings.max_sequences_per_request,
            max_seq_len=i.max_seq_len,
            max_body_bytes=settings.max_body_bytes,
        )

    @app.get("/v1/usage", responses={401: _ERROR_RESPONSES[401]})
    async def usage(request: Request) -> dict:
        """The calling tenant's own figures (requests, 429s, tokens scored, in flight, queue wait), nobody else's."""
        return tenants.authenticate(request.headers.get("authorization", "")).usage()

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/score",
        response_model=ScoreResponseJSON,
        responses={
            200: {"content": {MSGPACK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
            **_ERROR_RESPONSES,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    JSON_MEDIA_TYPE: {"schema": ScoreRequestJSON.model_json_schema(ref_template="#/components/schemas/{model}")},
                    MSGPACK_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def score(request: Request) -> Response:
        t_handler = time.perf_counter()
        async with served(request, "/v1/score"):
            eng = ready_engine(request)
            media = _media_type(request.headers.get("content-type"))
            if media not in (JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE):
                raise ProtocolError(
                    f"Content-Type must be {JSON_MEDIA_TYPE} or {MSGPACK_MEDIA_TYPE}, got {media[:60]!r}",
                    error_type="unsupported_media_type",
                    status=415,
                )
            coding = codec.negotiate_coding(request.headers.get("accept-encoding"))  # refused before the forward
            body = await _read_body(request, settings.max_body_bytes)
            body = codec.decompress(body, request.headers.get("content-encoding", ""), settings.max_body_bytes)
            batch = codec.decode_request_msgpack(body) if media == MSGPACK_MEDIA_TYPE else codec.decode_request_json(body)
            validate_batch(batch, settings, eng.info)
            timings = {}
            timing_token = score_timings.set(timings)
            try:
                result = await eng.score(batch)
            finally:
                score_timings.reset(timing_token)
            metrics.sequences.inc(batch.num_sequences)
            metrics.tokens.inc(int(result.token_logprobs_N.size))
            metrics.request_sequences.observe(batch.num_sequences)
            out_media = _response_media_type(request, media)
            encode = codec.encode_response_msgpack if out_media == MSGPACK_MEDIA_TYPE else codec.encode_response_json
            payload = encode(result)
            # Where this request's time went, as the standard header (browsers' and tracing tools' format): the
            # stages the gate and engine recorded, and "total" from the handler's start to the response body.
            timings["total"] = time.perf_counter() - t_handler
            headers = {"Vary": "Accept-Encoding", "Server-Timing": server_timing(timings)}
            if coding != codec.IDENTITY:
                # Off the event loop (zstd and lz4 release the GIL): 25-40 ms for a 17 MB response, during which
                # the loop keeps reading and admitting other requests.
                payload = await asyncio.to_thread(codec.compress, payload, coding)
                headers["Content-Encoding"] = coding
            return Response(payload, media_type=out_media, headers=headers)

    @app.post("/v1/generate", response_model=GenerateResponseJSON, responses={**_ERROR_RESPONSES, 501: {"model": ErrorEnvelope}})
    async def generate(request: Request) -> Response:
        async with served(request, "/v1/generate"):
            eng = ready_engine(request)
            if _media_type(request.headers.get("content-type")) != JSON_MEDIA_TYPE:
                raise ProtocolError(f"Content-Type must be {JSON_MEDIA_TYPE}", error_type="unsupported_media_type", status=415)
            body = await _read_body(request, settings.max_body_bytes)
            try:
                req = GenerateRequestJSON.model_validate_json(body)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise ProtocolError(
                    f"invalid JSON request at '{where}': {first.get('msg')}", error_type="malformed_body"
                ) from None
            validate_generate(req, settings, eng.info)
            try:
                completions = await eng.generate(req.prompts, req.n, req.max_new_tokens, req.temperature, req.top_p, req.seed)
            except NotImplementedError as exc:
                raise ProtocolError(str(exc), error_type="not_implemented", status=501) from None
            return JSONResponse(
                GenerateResponseJSON(
                    protocol_version=PROTOCOL_VERSION, model=eng.info.model, completions=completions
                ).model_dump()
            )

    add_peer_routes(app, settings, served, ready_engine, _read_body, validate_batch)
    return app


def validate_generate(req: GenerateRequestJSON, settings: Settings, info) -> None:
    codec.check_protocol_version(req.protocol_version)
    if not req.prompts:
        raise ProtocolError("prompts is empty: send at least one prompt", error_type="empty_request")
    if not 1 <= req.n <= 64:
        raise ProtocolError(f"n={req.n} must be in [1, 64]", error_type="invalid_n")
    if len(req.prompts) * req.n > settings.max_sequences_per_request:
        raise ProtocolError(
            f"{len(req.prompts)} prompts x n={req.n} exceed max_sequences_per_request={settings.max_sequences_per_request}",
            error_type="too_many_sequences",
            status=413,
        )
    total = sum(len(p) + req.max_new_tokens for p in req.prompts) * req.n
    if total > settings.max_tokens_per_request:
        raise ProtocolError(
            f"{len(req.prompts)} prompts x n={req.n} with max_new_tokens={req.max_new_tokens} may reach {total} tokens, "
            f"more than max_tokens_per_request={settings.max_tokens_per_request}; split the request",
            error_type="request_too_large",
            status=413,
        )
    if not req.temperature >= 0 or not 0 < req.top_p <= 1:
        raise ProtocolError("temperature must be >= 0 and top_p in (0, 1]", error_type="invalid_sampling")
    for i, p in enumerate(req.prompts):
        if not p:
            raise ProtocolError(f"prompt {i} is empty", error_type="invalid_sequence")
        if len(p) + req.max_new_tokens > info.max_seq_len or req.max_new_tokens < 1:
            raise ProtocolError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens={req.max_new_tokens} must be within [1, max_seq_len="
                f"{info.max_seq_len}]",
                error_type="sequence_too_long",
            )
        if min(p) < 0 or max(p) >= info.vocab_size:
            raise ProtocolError(
                f"prompt {i}: token id outside the vocabulary [0, {info.vocab_size})", error_type="invalid_token_id"
            )
