"""Several teacher endpoints behind the `TeacherClient` surface the trainer uses.

    pool = TeacherPool(["http://t1:8000", "http://t2:8000"])
    pool.connect(tokenizer=tok, top_k=32)      # every endpoint must pass the same handshake
    pool.score_batch(batch)                     # least outstanding requests; fails over; nothing lost

Routing: each request goes to the up endpoint with the fewest requests in flight. An endpoint that fails with a
connection error, 502 or 503 is marked down and the request is sent again to another one (scoring is
idempotent, so nothing is lost or duplicated in effect); a 429 moves the request elsewhere without marking the
endpoint down. A down endpoint is probed (`/health`, then `/v1/info` must match the pool's tokenizer fingerprint,
vocabulary and protocol) every `recheck_s` seconds and taken back when it passes. When every endpoint is down
the call raises `TeacherUnavailableError`, which the trainer's outage loop retries.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from protocol.schema import InfoResponse, ScoreBatch, ScoreResult
from student_trainer.teacher_client import (
    TeacherClient,
    TeacherError,
    TeacherIncompatibleError,
    TeacherUnavailableError,
)

logger = logging.getLogger(__name__)



class TeacherPool:
    def __init__(self, urls: list[str], *, recheck_s: float = 5.0, per_endpoint_retries: int = 1, **client_kwargs: Any):
        if not urls:
            raise ValueError("TeacherPool needs at least one teacher URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.url = ",".join(self.urls)
        kw = dict(client_kwargs, max_retries=per_endpoint_retries)
        self.clients = [TeacherClient(u, **kw) for u in self.urls]
        self.recheck_s = recheck_s
        self.outstanding = [0] * len(urls)
        self.down_since: list[float | None] = [None] * len(urls)
        self.last_probe = [0.0] * len(urls)
        self.lock = threading.Lock()
        self.reference: InfoResponse | None = None
        self.checks: dict[str, Any] = {}
        self.server_info: InfoResponse | None = None

    # ---------------------------------------------------------------------------------------------------
    # handshake and health
    # ---------------------------------------------------------------------------------------------------

    def health(self) -> bool:
        return any(c.health() for c in self.clients)

    def _same_teacher(self, info: InfoResponse, url: str) -> None:
        ref = self.reference
        if ref is None:
            return
        for field in ("protocol_version", "tokenizer_fingerprint", "vocab_size"):
            if getattr(info, field) != getattr(ref, field):
                raise TeacherIncompatibleError(
                    f"teacher endpoints disagree on {field}: {url} has {getattr(info, field)}, "
                    f"{self.urls[0]} has {getattr(ref, field)}; all replicas must serve the same model and tokenizer"
                )

    def connect(self, **checks: Any) -> InfoResponse:
        """Handshake with every endpoint that is up (the first one up sets the reference; all must match it);
        endpoints that are down are marked so and checked the same way when they come back."""
        self.checks = checks
        for i, client in enumerate(self.clients):
            try:
                info = client.connect(**checks)
            except TeacherUnavailableError as exc:
                logger.warning("teacher %s is down at connect (%s); continuing with the others", client.url, exc)
                self._mark_down(i)
                continue
            if self.reference is None:
                self.reference = info
            self._same_teacher(info, client.url)
        if self.reference is None:
            raise TeacherUnavailableError(f"no teacher endpoint is reachable: {self.url}")
        self.server_info = self.reference
        return self.reference

    def _mark_down(self, i: int) -> None:
        with self.lock:
            if self.down_since[i] is None:
                self.down_since[i] = time.monotonic()
                self.last_probe[i] = time.monotonic()
                logger.warning("teacher %s marked down", self.urls[i])

    def _probe(self, i: int) -> None:
        """Take a down endpoint back if it is healthy and still the same teacher."""
        now = time.monotonic()
        with self.lock:
            if self.down_since[i] is None or now - self.last_probe[i] < self.recheck_s:
                return
            self.last_probe[i] = now
        client = self.clients[i]
        if not client.health():
            return
        try:
            info = client.connect(**self.checks)
            self._same_teacher(info, client.url)
        except TeacherError as exc:
            logger.warning("teacher %s is back but refused the handshake: %s", client.url, exc)
            return
        if self.reference is None:
            self.reference = self.server_info = info
        with self.lock:
            logger.warning("teacher %s is back after %.0fs", client.url, now - (self.down_since[i] or now))
            self.down_since[i] = None

    # ---------------------------------------------------------------------------------------------------
    # routing
    # ---------------------------------------------------------------------------------------------------

    def _pick(self, exclude: set[int]) -> int | None:
        for i in range(len(self.clients)):
            self._probe(i)
        with self.lock:
            up = [i for i in range(len(self.clients)) if self.down_since[i] is None and i not in exclude]
            if not up:
                return None
            i = min(up, key=lambda j: self.outstanding[j])
            self.outstanding[i] += 1
            return i

    def _call(self, method: str, *args: Any, **kwargs: Any):
        tried: set[int] = set()
        last: Exception | None = None
        while True:
            i = self._pick(tried)
            if i is None:
                raise TeacherUnavailableError(f"no teacher endpoint available ({self.url}); last error: {last}")
            try:
                return getattr(self.clients[i], method)(*args, **kwargs)
            except TeacherUnavailableError as exc:
                last = exc
                tried.add(i)
                if exc.status != 429:  # unreachable or restarting; a 429 is busy, not down
                    self._mark_down(i)
                logger.warning("teacher %s failed (%s); sending the request to another endpoint", self.urls[i], exc)
            finally:
                with self.lock:
                    self.outstanding[i] -= 1

    def score_batch(self, batch: ScoreBatch) -> ScoreResult:
        return self._call("score_batch", batch)

    def score(self, sequences, top_k: int | None = None):
        return self._call("score", sequences, top_k)

    def generate(self, prompts, n: int = 1, **kwargs: Any) -> list[list[int]]:
        return self._call("generate", prompts, n, **kwargs)

    def close(self) -> None:
        for c in self.clients:
            c.close()
