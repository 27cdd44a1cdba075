"""The peers' scoring routes on our teacher: vLLM's OpenAI-compatible `/v1/completions` (the scoring subset),
`/v1/models` and `/tokenize`, and TRL <= 1.10's `/get_sequence_logprobs/` and `/health/`.

Same engines, limits, auth, admission and error envelope as `/v1/score`; the responses have the peers' shapes
(`protocol/peer.py` builds them without a Python loop over positions). What is supported, and what is refused
with a 400 that says so:

* `/v1/completions`: `prompt` as token ids (one list or a list of lists) or text (one string or a list,
  tokenised with the teacher's tokenizer, special tokens added as vLLM adds them); `prompt_logprobs` = K in
  [0, max_top_k] (required: this server scores, it does not generate); `max_tokens` 0 or 1 (no token is sampled:
  each choice's `text` is "" or, with `echo`, the prompt's text); `model` must be ours when given; `n` = 1, no
  `stream`, no `logprobs`. Sampling parameters (`temperature`, `top_p`, `seed`, ...) are accepted and change
  nothing: prompt logprobs are `log_softmax(logits)` at temperature 1, as stock vLLM 0.32 returns them.
* `/get_sequence_logprobs/`: TRL's request (`sequences`, `prompt_lengths`, `top_logprobs`, `temperature`,
  `response_format` "binary" or "json"); rows of positions prompt_length .. len - 1.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.peer import PromptLogprobRows, TokenTables, prompt_logprobs_json, trl_binary_response, trl_json_response
from protocol.schema import JSON_MEDIA_TYPE, ProtocolError, ScoreBatch, ScoreResult
from teacher_server.engines import ScoringEngine
from teacher_server.settings import Settings

# Parameters that only shape sampling: nothing is sampled here, so they are accepted and have no effect.
_SAMPLING_ONLY = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "user", "stop", "stop_token_ids", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "length_penalty", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "min_tokens", "logit_bias", "priority",
    "request_id", "return_token_ids", "return_tokens_as_token_ids", "cache_salt",
})


TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class CompletionRequest(BaseModel):
    """The scoring subset of vLLM's `CompletionRequest`; other fields are checked in `_refuse_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: list[TokenId] | list[list[TokenId]] | str | list[str]
    max_tokens: int | None = 16
    prompt_logprobs: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    n: int = 1
    stream: bool | None = False
    add_special_tokens: bool = True
    temperature: float | None = None


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize` for a completion-style prompt (the trainer's tokenizer check against any server)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class SequenceLogprobsRequest(BaseModel):
    """TRL 1.1-1.10's `SequenceLogprobsRequest` (`trl/scripts/vllm_serve.py`)."""

    model_config = ConfigDict(extra="forbid")

    sequences: list[list[TokenId]]
    prompt_lengths: list[Annotated[int, Field(ge=0, lt=2**31)]]
    top_logprobs: int = 100
    temperature: float = 1.0
    response_format: Literal["json", "binary"] = "json"


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's request schema in the OpenAPI document (bodies are parsed by hand, under the body limit)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}}


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"invalid request at '{where}': {first.get('msg')}", error_type="malformed_body") from None


def _check_k(k: int, settings: Settings, vocab_size: int, name: str) -> None:
    max_k = min(settings.max_top_k, vocab_size)
    if not 0 <= k <= max_k:
        raise ProtocolError(
            f"{name}={k} is out of range: it must be in [0, {max_k}] (the server's max_top_k; -1, the whole "
            "vocabulary, is not served; start the teacher with a larger --max-top-k to raise it)",
            error_type="invalid_top_k",
        )


def _refuse_unsupported(req: CompletionRequest) -> None:
    if req.prompt_logprobs is None:
        raise ProtocolError(
            "this teacher serves the scoring subset of /v1/completions: set prompt_logprobs (0 .. max_top_k) with "
            "max_tokens 0 or 1; it does not generate text",
            error_type="unsupported_parameter",
        )
    if req.stream:
        raise ProtocolError("stream=true is not supported: prompt logprobs come in one response",
                            error_type="unsupported_parameter")
    if req.n != 1:
        raise ProtocolError(f"n={req.n} is not supported: scoring returns one choice per prompt (n=1)",
                            error_type="unsupported_parameter")
    if req.max_tokens not in (0, 1, None):
        raise ProtocolError(
            f"max_tokens={req.max_tokens} is not supported: this teacher scores prompts (max_tokens 0 or 1) and "
            "does not generate",
            error_type="unsupported_parameter",
        )
    if req.logprobs is not None:
        raise ProtocolError(
            "logprobs (sampled-token logprobs, or echo's legacy per-token format) is not supported: use "
            "prompt_logprobs, which carries the top-K and the actual token of every prompt position",
            error_type="unsupported_parameter",
        )
    unknown = sorted(k for k, v in (req.model_extra or {}).items() if k not in _SAMPLING_ONLY and v is not None)
    if unknown:
        raise ProtocolError(
            f"unsupported parameter(s) {', '.join(unknown)[:200]}: supported are model, prompt, max_tokens (0 or 1), "
            "prompt_logprobs, echo, n=1, add_special_tokens and sampling parameters (accepted, no effect)",
            error_type="unsupported_parameter",
        )


def _check_sequences(seqs: list[np.ndarray], info: Any) -> None:
    """Every token id in the vocabulary and every sequence within max_seq_len, scored or not."""
    lengths = np.array([s.size for s in seqs], dtype=np.int64)
    too_long = np.flatnonzero(lengths > info.max_seq_len)
    if too_long.size:
        i = int(too_long[0])
        raise ProtocolError(f"sequence {i} has {int(lengths[i])} tokens, more than max_seq_len={info.max_seq_len}",
                            error_type="sequence_too_long")
    ids = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    if ids.size and int(ids.max()) >= info.vocab_size:
        raise ProtocolError(f"token id {int(ids.max())} is outside the vocabulary [0, {info.vocab_size})",
                            error_type="invalid_token_id")


def _no_rows(k: int) -> PromptLogprobRows:
    return PromptLogprobRows(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros((0, k), np.int32),
                             np.zeros((0, k), np.float32))


def add_peer_routes(
    app: FastAPI,
    settings: Settings,
    served: Callable[[Request, str], Any],
    ready_engine: Callable[[Request], ScoringEngine],
    read_body: Callable[[Request, int], Any],
    validate_batch: Callable[[ScoreBatch, Settings, Any], None],
) -> None:
    """Register the peer routes on `app`, reusing the app's admission (`served`), engine readiness, body limit
    and batch validation, so every route shares one set of limits and one error envelope."""
    tables: dict[int, TokenTables] = {}

    def token_tables(eng: ScoringEngine) -> TokenTables:
        # Built on first use (decoding every id once); the engine's vocabulary does not change while it runs.
        key = id(eng)
        if key not in tables:
            tables.clear()
            tables[key] = TokenTables.from_tokenizer(eng.tokenizer, eng.info.vocab_size)
        return tables[key]

    def check_model(eng: ScoringEngine, model: str | None) -> None:
        if model is not None and model != eng.info.model:
            raise ProtocolError(
                f"the model {model[:100]!r} does not exist: this teacher serves {eng.info.model!r}",
                error_type="model_not_found", status=404,
            )

    def require_json(request: Request) -> None:
        media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if media != JSON_MEDIA_TYPE:
            raise ProtocolError(f"Content-Type must be {JSON_MEDIA_TYPE}", error_type="unsupported_media_type", status=415)

    async def parse_json(request: Request, eng: ScoringEngine, model: type[BaseModel]) -> Any:
        """The JSON body under the body limit, parsed into `model`; its `model` name, if any, must be ours."""
        require_json(request)
        req = _parse(model, await read_body(request, settings.max_body_bytes))
        check_model(eng, getattr(req, "model", None))
        return req

    async def score_all(eng: ScoringEngine, seqs: list[np.ndarray], score_from: np.ndarray, k: int) -> ScoreResult:
        batch = ScoreBatch.from_sequences(list(zip(seqs, score_from.tolist(), strict=True)), max(k, 1))
        validate_batch(batch, settings, eng.info)
        return await eng.score(batch)

    def rows_of(result: ScoreResult) -> PromptLogprobRows:
        if result.token_ranks_N is None:
            raise ProtocolError("the engine did not report token ranks", error_type="internal_error", status=500)
        return PromptLogprobRows(result.token_logprobs_N, result.token_ranks_N, result.topk_ids_NK, result.topk_logprobs_NK)

    # -----------------------------------------------------------------------------------------------------
    # vLLM / OpenAI
    # -----------------------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async with served(request, "/v1/models"):
            i = ready_engine(request).info
            card = {"id": i.model, "object": "model", "created": int(time.time()), "owned_by": "aopd", "root": i.model,
                    "parent": None, "max_model_len": i.max_seq_len + 1, "permission": []}
            return Response(orjson.dumps({"object": "list", "data": [card]}), media_type=JSON_MEDIA_TYPE)

    @app.post("/tokenize", openapi_extra=_json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        async with served(request, "/tokenize"):
            eng = ready_engine(request)
            req = await parse_json(request, eng, TokenizeRequest)
            if eng.tokenizer is None:
                raise ProtocolError("this engine has no tokenizer", error_type="not_implemented", status=501)
            ids = eng.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
            out: dict[str, Any] = {"count": len(ids), "max_model_len": eng.info.max_seq_len + 1, "tokens": ids,
                                   "token_strs": eng.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}
            return Response(orjson.dumps(out), media_type=JSON_MEDIA_TYPE)

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        async with served(request, "/v1/completions"):
            eng = ready_engine(request)
            req = await parse_json(request, eng, CompletionRequest)
            _refuse_unsupported(req)
            k = int(req.prompt_logprobs)
            _check_k(k, settings, eng.info.vocab_size, "prompt_logprobs")
            prompts = req.prompt
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], str)):
                if eng.tokenizer is None:
                    raise ProtocolError("text prompts need the teacher's tokenizer: send token ids",
                                        error_type="invalid_sequence")
                texts = [prompts] if isinstance(prompts, str) else prompts
                prompts = eng.tokenizer(texts, add_special_tokens=req.add_special_tokens)["input_ids"]
            elif prompts and isinstance(prompts[0], int):
                prompts = [prompts]
            if not prompts:
                raise ProtocolError("prompt is empty: send at least one prompt", error_type="empty_request")
            seqs = [np.asarray(p, dtype=np.int64) for p in prompts]
            lengths_B = np.array([s.size for s in seqs], dtype=np.int64)
            if (lengths_B == 0).any():
                raise ProtocolError(f"prompt {int(np.flatnonzero(lengths_B == 0)[0])} is empty", error_type="invalid_sequence")
            _check_sequences(seqs, eng.info)
            scored = np.flatnonzero(lengths_B > 1)  # a one-token prompt has only the null entry
            target_N = np.concatenate([seqs[i][1:] for i in scored]) if scored.size else np.zeros(0, np.int64)
            if scored.size:
                rows = rows_of(await score_all(eng, [seqs[i] for i in scored], np.ones(scored.size, np.int64), k))
            else:
                rows = _no_rows(max(k, 1))
            lists = prompt_logprobs_json(lengths_B, target_N, rows, k, token_tables(eng))
            texts_out = ([orjson.dumps(eng.tokenizer.decode(p)) for p in prompts] if req.echo and eng.tokenizer is not None
                         else [b'""'] * len(seqs))
            model = orjson.dumps(eng.info.model)
            choices = b",".join(
                b'{"index":%d,"text":%s,"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,'
                b'"prompt_logprobs":%s,"prompt_token_ids":null}' % (i, text, lp)
                for i, (text, lp) in enumerate(zip(texts_out, lists, strict=True))
            )
            n_tok = int(lengths_B.sum())
            body = (
                b'{"id":"cmpl-%s","object":"text_completion","created":%d,"model":%s,"choices":[%s],'
                b'"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":0}}'
                % (uuid.uuid4().hex.encode(), int(time.time()), model, choices, n_tok, n_tok)
            )
            return Response(body, media_type=JSON_MEDIA_TYPE)

    # -----------------------------------------------------------------------------------------------------
    # TRL <= 1.10
    # -----------------------------------------------------------------------------------------------------

    @app.get("/health/")
    async def trl_health(request: Request) -> dict[str, str]:
        ready_engine(request)
        return {"status": "ok"}

    @app.post("/get_sequence_logprobs/", openapi_extra=_json_body(SequenceLogprobsRequest))
    async def get_sequence_logprobs(request: Request) -> Response:
        async with served(request, "/get_sequence_logprobs/"):
            eng = ready_engine(request)
            req = await parse_json(request, eng, SequenceLogprobsRequest)
            k = req.top_logprobs
            _check_k(k, settings, eng.info.vocab_size, "top_logprobs")
            if k == 0:
                raise ProtocolError("top_logprobs must be >= 1", error_type="invalid_top_k")
            if len(req.sequences) != len(req.prompt_lengths):
                raise ProtocolError(
                    f"{len(req.sequences)} sequences but {len(req.prompt_lengths)} prompt_lengths", error_type="invalid_shape"
                )
            if not req.sequences:
                raise ProtocolError("sequences is empty: send at least one sequence", error_type="empty_request")
            seqs = [np.asarray(s, dtype=np.int64) for s in req.sequences]
            lengths_B = np.array([s.size for s in seqs], dtype=np.int64)
            prompt_B = np.asarray(req.prompt_lengths, dtype=np.int64)
            bad = np.flatnonzero((prompt_B < 0) | (prompt_B > lengths_B))
            if bad.size:
                i = int(bad[0])
                raise ProtocolError(
                    f"sequence {i}: prompt_length={int(prompt_B[i])} must be in [0, len(sequence)={int(lengths_B[i])}]",
                    error_type="invalid_score_from",
                )
            _check_sequences(seqs, eng.info)
            # Position 0 is never scored (nothing predicts it): a prompt length of 0 starts the rows at 1.
            start_B = np.maximum(prompt_B, 1)
            scored = np.flatnonzero(start_B < lengths_B)
            if scored.size:
                result = await score_all(eng, [seqs[i] for i in scored], start_B[scored], k)
                rows = rows_of(result)
                target_N = np.concatenate([seqs[i][start_B[i]:] for i in scored])
            else:
                rows, target_N = _no_rows(k), np.zeros(0, np.int64)
            completion_B = lengths_B - prompt_B
            row_B = np.where((prompt_B == 0) & (lengths_B > 0), 1, 0)
            build = trl_binary_response if req.response_format == "binary" else trl_json_response
            return Response(build(completion_B, row_B, target_N, rows, k), media_type=JSON_MEDIA_TYPE)
