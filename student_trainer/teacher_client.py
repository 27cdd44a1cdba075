"""Client of the teacher scoring service (sync and async), over one pooled httpx connection.

    with TeacherClient("http://127.0.0.1:8000") as teacher:
        teacher.connect(tokenizer=student_tokenizer, top_k=32)      # protocol + tokenizer handshake
        rows = teacher.score([(token_ids, score_from), ...], top_k=32)
        rows[0].token_logprobs, rows[0].topk_ids, rows[0].topk_logprobs  # numpy [n], [n, K], [n, K]

`AsyncTeacherClient` has the same methods as coroutines. Requests use the binary encoding by default.
Retries: only connection errors, 429, 502 and 503 are retried (bounded, exponential backoff, honouring
Retry-After): those mean "the teacher is busy or restarting", and a scoring request is idempotent, so
sending it again is safe. Every other failure surfaces at once with the server's own message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from protocol import codec
from protocol.fingerprint import tokenizer_fingerprint
from protocol.schema import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    PROTOCOL_VERSION,
    GenerateRequestJSON,
    GenerateResponseJSON,
    InfoResponse,
    ScoreBatch,
    ScoreResult,
    SequenceResult,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503})
# ConnectTimeout is a connection error; other timeouts are not retried by the client (see _request).
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class TeacherError(RuntimeError):
    """The teacher refused or failed a request; `status` and `error_type` come from its error envelope."""

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class TeacherIncompatibleError(TeacherError):
    """The teacher cannot serve this student (protocol, tokenizer, vocabulary or limits differ)."""


class TeacherUnavailableError(TeacherError):
    """An outage, worth waiting for: the teacher is unreachable, did not answer in time, or answered 429 / 502 /
    503 (overloaded, restarting, engine down) after the client's retries. `status` is None for a network failure.
    Any other `TeacherError` (a refusal, a bad response) will not go away by waiting."""


def _raise_for_response(resp: httpx.Response, url: str) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        error_type, message = str(err["type"]), str(err["message"])
    except Exception:
        error_type, message = "http_error", resp.text[:300]
    error = TeacherUnavailableError if resp.status_code in RETRY_STATUSES else TeacherError
    raise error(f"teacher at {url} answered {resp.status_code} ({error_type}): {message}",
                status=resp.status_code, error_type=error_type)


def _retry_after_s(resp: httpx.Response | None) -> float | None:
    if resp is None:
        return None
    value = resp.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _as_batch(sequences: Sequence[tuple[Any, int]] | ScoreBatch, top_k: int | None) -> ScoreBatch:
    if isinstance(sequences, ScoreBatch):
        return sequences
    if top_k is None:
        raise ValueError("top_k is required when scoring a list of sequences")
    return ScoreBatch.from_sequences(list(sequences), top_k)


class _Base:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        api_key: str | None = None,
        encoding: str = "msgpack",
    ):
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding={encoding!r}: choose 'msgpack' (fast) or 'json' (debugging)")
        self.url = url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.encoding = encoding
        key = api_key if api_key is not None else os.environ.get("TEACHER_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.server_info: InfoResponse | None = None

    def _after_attempt(
        self, attempt: int, path: str, resp: httpx.Response | None, exc: Exception | None
    ) -> float | None:
        """None: `resp` is a success to return. A float: retry after that many seconds. Otherwise raises."""
        if resp is not None and resp.status_code not in RETRY_STATUSES:
            _raise_for_response(resp, self.url)
            return None
        reason = f"HTTP {resp.status_code}" if resp is not None else f"{type(exc).__name__}: {exc}"
        if attempt >= self.max_retries:
            if resp is not None:
                _raise_for_response(resp, self.url)
            raise TeacherUnavailableError(f"teacher at {self.url} unreachable after {attempt + 1} attempts ({reason})")
        delay = self._delay(attempt, resp)
        logger.warning("teacher %s%s: %s; retry %d/%d in %.1fs", self.url, path, reason, attempt + 1, self.max_retries, delay)
        return delay

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        retry_after = _retry_after_s(resp)
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)

    def _encode(self, batch: ScoreBatch) -> tuple[bytes, dict[str, str]]:
        media = MSGPACK_MEDIA_TYPE if self.encoding == "msgpack" else JSON_MEDIA_TYPE
        body = codec.encode_request_msgpack(batch) if media == MSGPACK_MEDIA_TYPE else codec.encode_request_json(batch)
        return body, {**self.headers, "Content-Type": media, "Accept": media}

    def _generate_body(self, prompts, n, max_new_tokens, temperature, top_p, seed) -> tuple[bytes, dict[str, str]]:
        req = GenerateRequestJSON(
            prompts=[[int(t) for t in p] for p in prompts], n=n, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed,
        )
        return req.model_dump_json().encode(), {**self.headers, "Content-Type": JSON_MEDIA_TYPE}

    def _decode(self, resp: httpx.Response, batch: ScoreBatch) -> ScoreResult:
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        decode = codec.decode_response_msgpack if media == MSGPACK_MEDIA_TYPE else codec.decode_response_json
        result = decode(resp.content)
        if not np.array_equal(result.num_scored_B, batch.num_scored_B) or result.top_k != batch.top_k:
            raise TeacherError(
                f"teacher at {self.url} returned rows for {result.num_scored_B.size} sequences / K={result.top_k}, "
                f"expected {batch.num_sequences} / K={batch.top_k}",
                error_type="invalid_response",
            )
        return result

    def check_compatible(
        self,
        info: InfoResponse,
        *,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        top_k: int | None = None,
        max_seq_len: int | None = None,
    ) -> None:
        """Raise `TeacherIncompatibleError` naming both sides for any mismatch with the student."""
        if info.protocol_version != PROTOCOL_VERSION:
            raise TeacherIncompatibleError(
                f"teacher at {self.url} speaks protocol_version={info.protocol_version}, this client speaks "
                f"{PROTOCOL_VERSION}; install the same aopd release on both sides"
            )
        if tokenizer is not None:
            mine = tokenizer_fingerprint(tokenizer)
            if mine != info.tokenizer_fingerprint:
                raise TeacherIncompatibleError(
                    f"tokenizer mismatch: the teacher ({info.model}) has tokenizer fingerprint "
                    f"{info.tokenizer_fingerprint}, the student's tokenizer has {mine}; teacher and student must "
                    "share one tokenizer (same vocabulary and special tokens)"
                )
            if vocab_size is None and len(tokenizer) > info.vocab_size:
                raise TeacherIncompatibleError(
                    f"vocab mismatch: the student's tokenizer has {len(tokenizer)} tokens, the teacher ({info.model}) "
                    f"vocab_size is {info.vocab_size}"
                )
        if vocab_size is not None and vocab_size != info.vocab_size:
            raise TeacherIncompatibleError(
                f"vocab size mismatch: the teacher ({info.model}) has vocab_size={info.vocab_size}, the student has "
                f"{vocab_size}; top-k ids would index different vocabularies"
            )
        if top_k is not None and top_k > info.max_top_k:
            raise TeacherIncompatibleError(
                f"top_k={top_k} exceeds the teacher's max_top_k={info.max_top_k}; lower top_k or start the teacher "
                f"with --max-top-k {top_k}"
            )
        if max_seq_len is not None and max_seq_len > info.max_seq_len:
            raise TeacherIncompatibleError(
                f"sequences of up to {max_seq_len} tokens exceed the teacher's max_seq_len={info.max_seq_len}; shorten "
                "prompts/completions or serve the teacher with a longer --max-seq-len"
            )


class TeacherClient(_Base):
    """Synchronous client. Thread-safe for concurrent `score` calls (httpx pools connections)."""

    def __init__(self, url: str, *, transport: httpx.BaseTransport | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport)

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                resp, exc = self._http.request(method, path, **kwargs), None
            except _RETRY_EXCEPTIONS as e:
                resp, exc = None, e
            except httpx.TimeoutException as e:  # a hung teacher: not retried here (the request may be running)
                raise TeacherUnavailableError(f"teacher at {self.url} did not answer {path} in time ({type(e).__name__})") from e
            delay = self._after_attempt(attempt, path, resp, exc)
            if delay is None:
                return resp
            time.sleep(delay)
        raise AssertionError("unreachable")

    def info(self) -> InfoResponse:
        return InfoResponse.model_validate_json(self._request("GET", "/v1/info", headers=self.headers).content)

    def health(self) -> bool:
        try:
            return self._http.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def connect(self, **checks: Any) -> InfoResponse:
        """Fetch /v1/info and check compatibility (see `check_compatible` for the keyword arguments)."""
        info = self.info()
        self.check_compatible(info, **checks)
        self.server_info = info
        return info

    def score_batch(self, batch: ScoreBatch) -> ScoreResult:
        body, headers = self._encode(batch)
        return self._decode(self._request("POST", "/v1/score", content=body, headers=headers), batch)

    def score(self, sequences: Sequence[tuple[Any, int]] | ScoreBatch, top_k: int | None = None) -> list[SequenceResult]:
        """Score `[(token_ids, score_from), ...]`; one `SequenceResult` of numpy arrays per sequence."""
        return self.score_batch(_as_batch(sequences, top_k)).split()

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int = 1, *, max_new_tokens: int, temperature: float = 1.0,
        top_p: float = 1.0, seed: int | None = None,
    ) -> list[list[int]]:
        """Teacher-written completions, prompt-major (n per prompt): SeqKD's training data."""
        body, headers = self._generate_body(prompts, n, max_new_tokens, temperature, top_p, seed)
        resp = self._request("POST", "/v1/generate", content=body, headers=headers)
        return GenerateResponseJSON.model_validate_json(resp.content).completions


class AsyncTeacherClient(_Base):
    """asyncio client with the same methods as `TeacherClient`, as coroutines."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport)

    async def __aenter__(self) -> AsyncTeacherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            try:
                resp, exc = await self._http.request(method, path, **kwargs), None
            except _RETRY_EXCEPTIONS as e:
                resp, exc = None, e
            except httpx.TimeoutException as e:
                raise TeacherUnavailableError(f"teacher at {self.url} did not answer {path} in time ({type(e).__name__})") from e
            delay = self._after_attempt(attempt, path, resp, exc)
            if delay is None:
                return resp
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def info(self) -> InfoResponse:
        return InfoResponse.model_validate_json((await self._request("GET", "/v1/info", headers=self.headers)).content)

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def connect(self, **checks: Any) -> InfoResponse:
        info = await self.info()
        self.check_compatible(info, **checks)
        self.server_info = info
        return info

    async def score_batch(self, batch: ScoreBatch) -> ScoreResult:
        body, headers = self._encode(batch)
        return self._decode(await self._request("POST", "/v1/score", content=body, headers=headers), batch)

    async def score(
        self, sequences: Sequence[tuple[Any, int]] | ScoreBatch, top_k: int | None = None
    ) -> list[SequenceResult]:
        return (await self.score_batch(_as_batch(sequences, top_k))).split()

    async def generate(
        self, prompts: Sequence[Sequence[int]], n: int = 1, *, max_new_tokens: int, temperature: float = 1.0,
        top_p: float = 1.0, seed: int | None = None,
    ) -> list[list[int]]:
        body, headers = self._generate_body(prompts, n, max_new_tokens, temperature, top_p, seed)
        resp = await self._request("POST", "/v1/generate", content=body, headers=headers)
        return GenerateResponseJSON.model_validate_json(resp.content).completions
