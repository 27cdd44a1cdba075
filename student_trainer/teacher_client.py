"""Client of the teacher scoring service (sync and async), over one pooled httpx connection.

    with TeacherClient("http://127.0.0.1:8000") as teacher:
        teacher.connect(tokenizer=student_tokenizer, top_k=32)      # protocol + tokenizer handshake
        rows = teacher.score([(token_ids, score_from), ...], top_k=32)
        rows[0].token_logprobs, rows[0].topk_ids, rows[0].topk_logprobs  # numpy [n], [n, K], [n, K]

`AsyncTeacherClient` has the same methods as coroutines. Requests use the binary encoding by default.

Protocols: our `/v1/score` (`protocol="aopd"`), or any server of vLLM's OpenAI-compatible protocol, e.g. a stock
`vllm serve` (`protocol="openai"`: scoring through `/v1/completions` with `prompt_logprobs`, read back into the
same `ScoreResult`). `protocol="auto"` (the default) asks `/v1/info` and falls back to the OpenAI protocol where
the server has no such route. Against an OpenAI server the handshake compares tokenisations through its
`/tokenize` route (it has no fingerprint), and probes one scoring request at the wanted K, so a server started
with too small a `--max-logprobs` or a smaller vocabulary is refused at connect with the fix named.
Compression: scoring responses are asked for compressed (`compression="auto"`: zstd, else lz4, except from a
loopback teacher; see protocol/codec.py for why zstd first), 1.3x (150k vocabulary) to 1.65x (the tiny test
vocabulary) fewer bytes, which pays below ~1 Gbit/s; "none" for a faster link, where compressing costs more time
than the bytes save.
Retries: only connection errors, 429, 502 and 503 are retried (bounded, exponential backoff, honouring
Retry-After): those mean "the teacher is busy or restarting", and a scoring request is idempotent, so
sending it again is safe. Every other failure surfaces at once with the server's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import ssl
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import orjson

from protocol import codec
from protocol.fingerprint import tokenizer_fingerprint
from protocol.peer import PeerResponseError, read_prompt_logprobs
from protocol.schema import (
    JSON_MEDIA_TYPE,
    MSGPACK_MEDIA_TYPE,
    PROTOCOL_VERSION,
    GenerateRequestJSON,
    GenerateResponseJSON,
    InfoResponse,
    ProtocolError,
    ScoreBatch,
    ScoreResult,
    SequenceResult,
)

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503})
# ConnectTimeout is a connection error; other timeouts are not retried by the client (see _request).
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _undone_by_httpx(coding: str) -> bool:
    """Whether httpx undoes `coding` itself when it reads a body: it does zstd (zstandard is installed) and passes
    codings it does not know, such as lz4, through as they came. Asked once, of httpx's public API."""
    probe = b"aopd"
    try:
        return httpx.Response(200, headers={"Content-Encoding": coding}, content=codec.compress(probe, coding)).content == probe
    except httpx.DecodingError:
        return False


# The codings this client undoes itself are the rest: a body is never decoded twice, nor left coded.
_HTTPX_UNDOES = frozenset(c for c in codec.CONTENT_CODINGS if _undone_by_httpx(c))


class TeacherError(RuntimeError):
    """The teacher refused or failed a request; `status` and `error_type` come from its error envelope."""

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class TeacherTLSError(TeacherError):
    """The teacher's certificate cannot be verified (unknown CA, wrong host name, expired): not retried."""


def _tls_problem(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind an httpx connection error, if that is what it is."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _tls_error(url: str, err: ssl.SSLError) -> TeacherTLSError:
    why = str(getattr(err, "verify_message", None) or err.reason or err).rstrip(".")
    return TeacherTLSError(
        f"TLS to the teacher at {url} failed: {why}. If the teacher's certificate is signed by your own CA, set "
        "teacher.ca_file to that CA's PEM file; check that the URL's host name is one the certificate names"
    )


def _tls_context(url: str, ca_file: str | None) -> ssl.SSLContext | bool:
    """httpx's `verify`: for https, the system's trust store, or only `ca_file`'s CA when given."""
    if ca_file is not None:
        if not os.path.isfile(ca_file):
            raise ValueError(f"teacher.ca_file={ca_file!r} does not exist")
        return ssl.create_default_context(cafile=ca_file)
    return ssl.create_default_context() if url.startswith("https://") else True


def _is_loopback(url: str) -> bool:
    host = (httpx.URL(url).host or "").strip("[]")
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    return loopback


def _warn_plain_key(url: str, has_key: bool) -> None:
    if has_key and url.startswith("http://") and not _is_loopback(url):
        logger.warning("sending the teacher API key over plain HTTP to %s: anyone on the path can read it; serve the "
                       "teacher with --ssl-certfile/--ssl-keyfile and use https:// (teacher.ca_file for your own CA)", url)


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


def _tokenizer_probe(tokenizer: Any) -> str:
    """Text whose tokenisation tells tokenizers apart: words, digits, whitespace, non-ASCII, every special token,
    and 256 tokens spread over the student's whole vocabulary (a teacher without them splits them otherwise)."""
    specials = " ".join(str(t) for t in getattr(tokenizer, "all_special_tokens", []))[:4000]
    spread = np.linspace(0, len(tokenizer) - 1, 256).astype(np.int64).tolist()
    sample = tokenizer.decode(spread, skip_special_tokens=True)
    return f"The sum of 123 and 4567 is 4690.\n\tWait, let me redo: 12*34 = 408. Über naïve café, 東京 {specials} {sample}"


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
        protocol: str = "auto",
        ca_file: str | None = None,
        compression: str = "auto",
    ):
        if encoding not in ("msgpack", "json"):
            raise ValueError(f"encoding={encoding!r}: choose 'msgpack' (fast) or 'json' (debugging)")
        if compression not in codec.ACCEPT_ENCODING:
            raise ValueError(f"compression={compression!r}: choose one of {', '.join(codec.ACCEPT_ENCODING)}")
        if protocol not in ("auto", "aopd", "openai"):
            raise ValueError(f"protocol={protocol!r}: choose 'auto', 'aopd' (our /v1/score) or 'openai' (/v1/completions)")
        self.protocol = protocol
        self.openai_model: str | None = None  # the model name an OpenAI server listed, sent with every request
        self.url = url.rstrip("/")
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.encoding = encoding
        # auto: nothing to gain on loopback, where compressing only adds CPU time to every response
        self.accept_encoding = codec.ACCEPT_ENCODING[
            "none" if compression == "auto" and _is_loopback(self.url) else compression
        ]
        key = api_key if api_key is not None else os.environ.get("TEACHER_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.server_info: InfoResponse | None = None
        self.verify = _tls_context(self.url, ca_file)
        _warn_plain_key(self.url, bool(key))

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
        return body, {**self.headers, "Content-Type": media, "Accept": media, "Accept-Encoding": self.accept_encoding}

    def _generate_body(self, prompts, n, max_new_tokens, temperature, top_p, seed) -> tuple[bytes, dict[str, str]]:
        req = GenerateRequestJSON(
            prompts=[[int(t) for t in p] for p in prompts], n=n, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed,
        )
        return req.model_dump_json().encode(), {**self.headers, "Content-Type": JSON_MEDIA_TYPE}

    def _check_generates(self) -> None:
        if self.protocol == "openai":
            raise TeacherIncompatibleError(
                f"teacher at {self.url} speaks the OpenAI protocol: seqkd's teacher-written completions need our "
                "teacher's /v1/generate (python -m teacher_server)"
            )

    def _decode(self, resp: httpx.Response, batch: ScoreBatch) -> ScoreResult:
        media = resp.headers.get("content-type", "").split(";")[0].strip()
        decode = codec.decode_response_msgpack if media == MSGPACK_MEDIA_TYPE else codec.decode_response_json
        body, coding = resp.content, resp.headers.get("content-encoding", codec.IDENTITY).strip().lower()
        if coding not in _HTTPX_UNDOES:
            try:
                body = codec.decompress(body, coding)
            except ProtocolError as exc:
                raise TeacherError(f"teacher at {self.url} sent an undecodable body: {exc}",
                                   error_type="invalid_response") from None
        result = decode(body)
        if not np.array_equal(result.num_scored_B, batch.num_scored_B) or result.top_k != batch.top_k:
            raise TeacherError(
                f"teacher at {self.url} returned rows for {result.num_scored_B.size} sequences / K={result.top_k}, "
                f"expected {batch.num_sequences} / K={batch.top_k}",
                error_type="invalid_response",
            )
        return result

    # -----------------------------------------------------------------------------------------------------
    # the handshake (either protocol) and the OpenAI scoring path; the I/O is driven by each client class
    # -----------------------------------------------------------------------------------------------------

    def _handshake(self, checks: dict[str, Any]):
        """Generator of the handshake's requests: yields `(method, path, json_body)`, receives the response (or the
        request's `TeacherError` thrown in), returns the `InfoResponse`. One plan for the sync and async clients."""
        if self.protocol != "openai":
            try:
                resp = yield ("GET", "/v1/info", None)
            except TeacherError as exc:
                if self.protocol != "auto" or exc.status != 404:
                    raise
                logger.info("teacher %s has no /v1/info: speaking the OpenAI protocol (/v1/completions)", self.url)
                self.protocol = "openai"
            else:
                info = InfoResponse.model_validate_json(resp.content)
                self.protocol = "aopd"
                self.check_compatible(info, **checks)
                return info
        models = (yield ("GET", "/v1/models", None)).json()
        try:
            card = models["data"][0]
            name = str(card["id"])
        except (KeyError, IndexError, TypeError):
            raise TeacherIncompatibleError(f"teacher at {self.url}: /v1/models lists no model") from None
        self.openai_model = name
        tokenizer, vocab, top_k = checks.get("tokenizer"), checks.get("vocab_size"), checks.get("top_k")
        fingerprint = "unchecked"
        if tokenizer is not None:
            probe = _tokenizer_probe(tokenizer)
            try:
                resp = yield ("POST", "/tokenize", {"model": name, "prompt": probe, "add_special_tokens": False})
            except TeacherError as exc:
                if exc.status not in (404, 405):
                    raise
                raise TeacherIncompatibleError(
                    f"teacher at {self.url} ({name}) has no /tokenize route, so the student's tokenizer cannot be "
                    "compared with the teacher's; serve the teacher with `vllm serve` (which has /tokenize) or with "
                    "`python -m teacher_server`"
                ) from exc
            theirs, mine = list(resp.json()["tokens"]), list(tokenizer(probe, add_special_tokens=False)["input_ids"])
            if theirs != mine:
                at = next((i for i, (a, b) in enumerate(zip(theirs, mine, strict=False)) if a != b), min(len(theirs), len(mine)))
                raise TeacherIncompatibleError(
                    f"tokenizer mismatch: the teacher at {self.url} ({name}) and the student tokenise a probe text "
                    f"differently (first difference at token {at}: {theirs[at:at + 3]} vs {mine[at:at + 3]}); teacher "
                    "and student must share one tokenizer"
                )
            fingerprint = tokenizer_fingerprint(tokenizer)
            vocab = vocab or len(tokenizer)
        # A scoring probe at the wanted K holding the student's highest token id: a server started with a smaller
        # --max-logprobs, or with a smaller vocabulary, refuses it here rather than at the first step.
        k = top_k or 1
        ids = [0, 1] + ([int(vocab) - 1] if vocab else [])
        try:
            resp = yield ("POST", "/v1/completions", self._openai_request([ids], k))
        except TeacherError as exc:
            if exc.status not in (400, 422):
                raise
            raise TeacherIncompatibleError(
                f"teacher at {self.url} ({name}) refused a scoring probe with prompt_logprobs={k} and token id "
                f"{ids[-1]}: {exc}. If it is about logprobs, start `vllm serve` with --max-logprobs {k} (or more); if "
                "it is about a token id, the teacher's vocabulary is smaller than the student's"
            ) from exc
        self._read_openai(resp, ScoreBatch.from_sequences([(ids, 1)], k), int(vocab) if vocab else None)
        max_model_len = card.get("max_model_len")
        info = InfoResponse(
            protocol_version=PROTOCOL_VERSION, model=name, engine="openai", vocab_size=int(vocab or 0),
            tokenizer_fingerprint=fingerprint, max_top_k=k, max_tokens_per_request=1 << 40,
            max_sequences_per_request=1 << 40,
            # vLLM counts the one generated token in max_model_len
            max_seq_len=int(max_model_len) - 1 if max_model_len else 1 << 40, max_body_bytes=1 << 40,
        )
        self.check_compatible(info, max_seq_len=checks.get("max_seq_len"))
        return info

    def _openai_request(self, sequences: list[list[int]], k: int) -> dict[str, Any]:
        # temperature 1: stock vLLM's prompt logprobs are log_softmax(logits) whatever it is (see the README)
        return {"model": self.openai_model, "prompt": sequences, "max_tokens": 1, "temperature": 1.0,
                "prompt_logprobs": k}

    def _openai_body(self, batch: ScoreBatch) -> tuple[bytes, dict[str, str]]:
        seqs = [batch.sequence(i).tolist() for i in range(batch.num_sequences)]
        body = orjson.dumps(self._openai_request(seqs, batch.top_k))
        return body, {**self.headers, "Content-Type": JSON_MEDIA_TYPE}

    def _read_openai(self, resp: httpx.Response, batch: ScoreBatch, vocab_size: int | None) -> ScoreResult:
        seqs = [batch.sequence(i) for i in range(batch.num_sequences)]
        try:
            rows = read_prompt_logprobs(resp.content, seqs, batch.score_from_B, batch.top_k)
        except PeerResponseError as exc:
            raise TeacherError(f"teacher at {self.url}: unreadable /v1/completions response: {exc}",
                               error_type="invalid_response") from exc
        if vocab_size is not None and rows.topk_ids_NK.size and int(rows.topk_ids_NK.max()) >= vocab_size:
            raise TeacherIncompatibleError(
                f"teacher at {self.url} returned token id {int(rows.topk_ids_NK.max())}, outside the student's "
                f"vocabulary of {vocab_size}: the teacher's vocabulary is larger"
            )
        return ScoreResult(
            token_logprobs_N=rows.token_logprobs_N, topk_ids_NK=rows.topk_ids_NK, topk_logprobs_NK=rows.topk_logprobs_NK,
            num_scored_B=batch.num_scored_B, model=self.openai_model or "", token_ranks_N=rows.token_ranks_N,
        )

    def _vocab(self) -> int | None:
        return self.server_info.vocab_size if self.server_info is not None and self.server_info.vocab_size else None

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
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, transport=transport, verify=self.verify)

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
                if (tls := _tls_problem(e)) is not None:
                    raise _tls_error(self.url, tls) from e
                resp, exc = None, e
            except httpx.TimeoutException as e:  # a hung teacher: not retried here (the request may be running)
                raise TeacherUnavailableError(f"teacher at {self.url} did not answer {path} in time ({type(e).__name__})") from e
            except httpx.DecodingError as e:  # a body that httpx could not undo the Content-Encoding of
                raise TeacherError(f"teacher at {self.url} sent an undecodable {path} body: {e}",
                                   error_type="invalid_response") from e
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
        except httpx.HTTPError as e:
            if (tls := _tls_problem(e)) is not None:  # waiting would not help: say so now
                raise _tls_error(self.url, tls) from e
            return False

    def connect(self, **checks: Any) -> InfoResponse:
        """The handshake (`/v1/info`, or an OpenAI server's routes) and the compatibility checks (see
        `check_compatible` for the keyword arguments)."""
        plan, resp, exc = self._handshake(checks), None, None
        while True:
            try:
                method, path, body = plan.throw(exc) if exc is not None else plan.send(resp)
            except StopIteration as done:
                self.server_info = done.value
                return done.value
            resp, exc = None, None
            try:
                resp = self._request(method, path, headers=self.headers, **({} if body is None else {"json": body}))
            except TeacherError as e:
                exc = e

    def score_batch(self, batch: ScoreBatch) -> ScoreResult:
        if self.protocol == "openai":
            body, headers = self._openai_body(batch)
            resp = self._request("POST", "/v1/completions", content=body, headers=headers)
            return self._read_openai(resp, batch, self._vocab())
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
        self._check_generates()
        body, headers = self._generate_body(prompts, n, max_new_tokens, temperature, top_p, seed)
        resp = self._request("POST", "/v1/generate", content=body, headers=headers)
        return GenerateResponseJSON.model_validate_json(resp.content).completions


class AsyncTeacherClient(_Base):
    """asyncio client with the same methods as `TeacherClient`, as coroutines."""

    def __init__(self, url: str, *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any):
        super().__init__(url, **kwargs)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, transport=transport, verify=self.verify)

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
                if (tls := _tls_problem(e)) is not None:
                    raise _tls_error(self.url, tls) from e
                resp, exc = None, e
            except httpx.TimeoutException as e:
                raise TeacherUnavailableError(f"teacher at {self.url} did not answer {path} in time ({type(e).__name__})") from e
            except httpx.DecodingError as e:
                raise TeacherError(f"teacher at {self.url} sent an undecodable {path} body: {e}",
                                   error_type="invalid_response") from e
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
        except httpx.HTTPError as e:
            if (tls := _tls_problem(e)) is not None:  # waiting would not help: say so now
                raise _tls_error(self.url, tls) from e
            return False

    async def connect(self, **checks: Any) -> InfoResponse:
        plan, resp, exc = self._handshake(checks), None, None
        while True:
            try:
                method, path, body = plan.throw(exc) if exc is not None else plan.send(resp)
            except StopIteration as done:
                self.server_info = done.value
                return done.value
            resp, exc = None, None
            try:
                resp = await self._request(method, path, headers=self.headers, **({} if body is None else {"json": body}))
            except TeacherError as e:
                exc = e

    async def score_batch(self, batch: ScoreBatch) -> ScoreResult:
        if self.protocol == "openai":
            body, headers = self._openai_body(batch)
            resp = await self._request("POST", "/v1/completions", content=body, headers=headers)
            return self._read_openai(resp, batch, self._vocab())
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
        self._check_generates()
        body, headers = self._generate_body(prompts, n, max_new_tokens, temperature, top_p, seed)
        resp = await self._request("POST", "/v1/generate", content=body, headers=headers)
        return GenerateResponseJSON.model_validate_json(resp.content).completions
