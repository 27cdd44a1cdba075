"""Tenants of a shared teacher: who asked (API keys), what each may use (limits), and in which order the engine
serves them when it is saturated (weighted fair queueing).

Keys file (`--api-keys-file`, YAML or JSON), keys stored as SHA-256 hex digests, never in the clear:

    tenants:
      - name: team-a
        key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   # python -m teacher_server.tenants hash
        weight: 2                      # share of the engine when several tenants are backlogged (default 1)
        max_requests_in_flight: 16     # optional limits; beyond one: 429 with Retry-After, other tenants unaffected
        max_tokens_in_flight: 500000
        tokens_per_minute: 20000000

The file is re-read on SIGHUP and whenever its modification time changes (checked every
`--api-keys-reload-s`): a new key works and a removed key is refused from then on, while requests already
admitted finish (tenant state is kept by name). `--api-key` alone is one tenant named "default"; with neither,
every caller is the tenant "anonymous".

Fair scheduling (`FairGate`, with a keys file; a single tenant goes straight to the engine): scoring work
enters the engine under a token capacity (`--engine-tokens-in-flight`, default two forwards' worth, so the
engine always has its next batch). Beyond it requests wait in a heap ordered
by start-time fair queueing tags (Goyal et al. 1996): a request of n tokens from a tenant of weight w gets
start = max(V, the tenant's last finish) and finish = start + n / w, V being the start tag last admitted. So
backlogged tenants receive tokens in proportion to their weights, a tenant that was idle gets no banked credit,
and a light tenant's request waits behind at most one request per other tenant, not behind a heavy tenant's
whole backlog. `--scheduling fifo` admits in arrival order instead (for comparison; `bench/tenants.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protocol.codec import ProtocolError
from teacher_server.engines.base import record_timing, score_priority

logger = logging.getLogger(__name__)

# The tenant of the request being served (set by the app's admission; read by the gated engine).
current_tenant: contextvars.ContextVar[TenantState | None] = contextvars.ContextVar("aopd_tenant", default=None)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    max_requests_in_flight: int | None = None
    max_tokens_in_flight: int | None = None
    tokens_per_minute: int | None = None


@dataclass
class TenantState:
    """A tenant's live figures, kept by name across reloads of the keys file."""

    tenant: Tenant
    requests_in_flight: int = 0
    tokens_in_flight: int = 0
    requests: int = 0
    rejected: int = 0
    tokens_scored: int = 0
    queue_wait_s: float = 0.0
    queued: int = 0
    bucket: float = 0.0  # tokens_per_minute: tokens available now (refilled continuously, capped at one minute's)
    bucket_t: float = field(default_factory=time.monotonic)

    def usage(self) -> dict[str, Any]:
        t = self.tenant
        return {
            "tenant": t.name, "weight": t.weight,
            "limits": {"max_requests_in_flight": t.max_requests_in_flight, "max_tokens_in_flight": t.max_tokens_in_flight,
                       "tokens_per_minute": t.tokens_per_minute},
            "requests": self.requests, "rejected": self.rejected, "tokens_scored": self.tokens_scored,
            "requests_in_flight": self.requests_in_flight, "tokens_in_flight": self.tokens_in_flight,
            "queue_wait_s": {"total": self.queue_wait_s, "count": self.queued},
        }


def _over(message: str, retry_after_s: float) -> ProtocolError:
    exc = ProtocolError(message, error_type="tenant_limit", status=429)
    exc.retry_after_s = max(1, int(retry_after_s + 0.999))  # type: ignore[attr-defined]
    return exc


def parse_keys_file(path: Path) -> dict[str, Tenant]:
    """{sha256 hex: Tenant}; a ValueError naming the entry for anything malformed."""
    raw = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    entries = raw.get("tenants") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'tenants' list")
    out: dict[str, Tenant] = {}
    names = set()
    allowed = {"name", "key_sha256", "weight", "max_requests_in_flight", "max_tokens_in_flight", "tokens_per_minute"}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise ValueError(f"{path}: tenants[{i}] needs a name")
        unknown = set(e) - allowed
        digest = str(e.get("key_sha256", "")).lower()
        if unknown:
            raise ValueError(f"{path}: tenants[{i}] ({e['name']}): unknown fields {sorted(unknown)}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: tenants[{i}] ({e['name']}): key_sha256 must be 64 hex digits "
                             "(python -m teacher_server.tenants hash <key>)")
        weight = float(e.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"{path}: tenants[{i}] ({e['name']}): weight must be > 0")
        limits = {k: e.get(k) for k in ("max_requests_in_flight", "max_tokens_in_flight", "tokens_per_minute")}
        for k, v in limits.items():
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{path}: tenants[{i}] ({e['name']}): {k} must be a positive integer")
        if digest in out:
            raise ValueError(f"{path}: tenants[{i}] ({e['name']}): the same key as {out[digest].name}")
        names.add(e["name"])
        out[digest] = Tenant(e["name"], weight, **limits)
    return out


class Tenants:
    """Authentication and per-tenant limits. `keys_file`, else `api_key` (one tenant), else open."""

    def __init__(self, keys_file: str | None = None, api_key: str | None = None):
        self.keys_file = Path(keys_file) if keys_file else None
        self.api_key = api_key
        self.states: dict[str, TenantState] = {}
        self._by_digest: dict[str, Tenant] = {}
        self._mtime: float | None = None
        if self.keys_file is not None:
            self.reload(force=True)
        elif api_key is not None:
            self._by_digest = {hash_key(api_key): Tenant("default")}
        self.open = self.keys_file is None and api_key is None
        if self.open:
            self.states["anonymous"] = TenantState(Tenant("anonymous"))

    def reload(self, force: bool = False) -> bool:
        """Re-read the keys file if it changed (or `force`). A broken file keeps the previous keys (logged);
        at start-up it is an error. Returns whether the keys changed."""
        assert self.keys_file is not None
        try:
            mtime = os.stat(self.keys_file).st_mtime_ns
            if not force and mtime == self._mtime:
                return False
            table = parse_keys_file(self.keys_file)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if force and self._mtime is None:
                raise ValueError(f"--api-keys-file: {exc}") from None
            logger.error("keys file not reloaded, keeping the previous keys: %s", exc)
            return False
        self._by_digest, self._mtime = table, mtime
        for t in table.values():  # state by name: in-flight work and counters survive a reload
            st = self.states.get(t.name)
            if st is None:
                self.states[t.name] = TenantState(t, bucket=float(t.tokens_per_minute or 0))
            else:
                st.tenant = t
        logger.info("keys file loaded: %d tenants (%s)", len(table), ", ".join(sorted(t.name for t in table.values())))
        return True

    def authenticate(self, authorization: str) -> TenantState:
        if self.open:
            return self.states["anonymous"]
        scheme, _, token = authorization.partition(" ")
        tenant = None
        if scheme.lower() == "bearer" and token:
            digest = hash_key(token.strip())
            for known, t in self._by_digest.items():  # compare every digest: no early exit on a match
                if hmac.compare_digest(known, digest):
                    tenant = t
        if tenant is None:
            raise ProtocolError(
                "missing, wrong or revoked API key: send 'Authorization: Bearer <key>' (the server's --api-key / "
                "TEACHER_API_KEY, or a key of --api-keys-file)", error_type="unauthorized", status=401,
            )
        st = self.states.get(tenant.name)
        if st is None:  # --api-key's single tenant
            st = self.states[tenant.name] = TenantState(tenant)
        return st

    def admit_request(self, st: TenantState) -> None:
        t = st.tenant
        if t.max_requests_in_flight is not None and st.requests_in_flight >= t.max_requests_in_flight:
            st.rejected += 1
            raise _over(f"tenant {t.name!r} has {st.requests_in_flight} requests in flight, its limit "
                        f"(max_requests_in_flight={t.max_requests_in_flight}); retry when one finishes", 1)
        st.requests_in_flight += 1
        st.requests += 1

    def charge_tokens(self, st: TenantState, tokens: int) -> None:
        """Before scoring `tokens`: the tenant's tokens-in-flight and tokens-per-minute limits."""
        t = st.tenant
        if t.max_tokens_in_flight is not None and st.tokens_in_flight + tokens > t.max_tokens_in_flight:
            if st.tokens_in_flight > 0 or tokens > t.max_tokens_in_flight:
                st.rejected += 1
                raise _over(f"tenant {t.name!r}: {tokens} more tokens would put {st.tokens_in_flight + tokens} in "
                            f"flight, over its max_tokens_in_flight={t.max_tokens_in_flight}", 1)
        if t.tokens_per_minute is not None:
            now = time.monotonic()
            rate = t.tokens_per_minute / 60.0
            st.bucket = min(float(t.tokens_per_minute), st.bucket + (now - st.bucket_t) * rate)
            st.bucket_t = now
            if tokens > st.bucket:
                st.rejected += 1
                raise _over(f"tenant {t.name!r}: {tokens} tokens exceed its tokens_per_minute={t.tokens_per_minute} "
                            f"budget ({int(st.bucket)} left now)", (tokens - st.bucket) / rate)
            st.bucket -= tokens
        st.tokens_in_flight += tokens

    @staticmethod
    def release_tokens(st: TenantState, tokens: int) -> None:
        st.tokens_in_flight -= tokens

    @staticmethod
    def release_request(st: TenantState) -> None:
        st.requests_in_flight -= 1


class FairGate:
    """Admits work into the engine under `capacity` tokens in flight; waiting work is admitted by start-time
    fair queueing over tenants (weights), or in arrival order (`fair=False`). A request larger than the
    capacity is admitted alone once nothing is in flight.

    The latency lane (fair only), for a tenant below its share: one whose admitted tokens over the last few
    seconds (`SHARE_WINDOW_S`, exponentially decayed) are under 90% of its weight's share of all tenants' with
    any recent traffic, and that has nothing waiting. Its request, if its start tag is at most `lane_burst` tokens
    (over its weight) ahead of the first waiting request's, is admitted at once, beyond the capacity, with the
    priority `LANE`, so the engine runs it in the next forward, without other work (teacher_server/engines/hf.py),
    instead of after the capacity's worth admitted ahead of it. A light tenant then waits for the forward in
    flight and its own, as alone it waits for its own. The burst allowance (default: the capacity, the lag that
    admitting the capacity ahead of it costs anyway) covers a light tenant's bursts (four requests within a few
    forwards of a Poisson stream). A tenant at its share (backlogged, however few requests it keeps
    outstanding) gets no lane: its requests wait for their tags, so a lead it took in the lane never costs it
    throughput later. Fairness is bounded by the burst: tags are charged as for any request. At most the
    capacity in tokens is in the lane at once (so at most twice the capacity in the engine): memory stays
    bounded however many light tenants arrive together."""

    LANE = -1.0  # the engine priority of lane requests; queued ones get their start tag (>= 0), FIFO ones 0
    SHARE_WINDOW_S = 5.0  # the decay time of the admitted-token counts that say who is below its share

    def __init__(self, capacity: int, fair: bool = True, lane_burst: int | None = None):
        self.capacity, self.fair = capacity, fair
        self.lane_burst = capacity if lane_burst is None else lane_burst
        self.in_flight = 0
        self.lane_in_flight = 0
        self._heap: list[tuple[float, int, int, asyncio.Future, Tenant]] = []
        self._waiting: dict[str, int] = {}  # requests in the heap, per tenant
        self._seq = itertools.count()
        self._vtime = 0.0
        self._finish: dict[str, float] = {}
        self._recent: dict[str, tuple[float, float, float]] = {}  # tenant -> (decayed admitted tokens, at, weight)

    def _decayed(self, name: str, now: float) -> float:
        count, at, _ = self._recent.get(name, (0.0, now, 1.0))
        return count * math.exp((at - now) / self.SHARE_WINDOW_S)

    def _admitted(self, tenant: Tenant, tokens: int) -> None:
        now = time.monotonic()
        self._recent[tenant.name] = (self._decayed(tenant.name, now) + tokens, now, tenant.weight)

    def below_share(self, tenant: Tenant) -> bool:
        """Whether the tenant's recent admitted tokens are under 90% of its weight's share of everyone's (tenants
        with under 1% of the recent tokens count as idle)."""
        now = time.monotonic()
        recent = {n: (self._decayed(n, now), w) for n, (_, _, w) in self._recent.items()}
        total = sum(c for c, _ in recent.values())
        if total <= 0:
            return True
        mine = recent.get(tenant.name, (0.0, tenant.weight))[0]
        weights = sum(w for n, (c, w) in recent.items() if c >= 0.01 * total and n != tenant.name) + tenant.weight
        return mine < 0.9 * total * tenant.weight / weights

    def _tag(self, tenant: Tenant, tokens: int) -> float:
        if not self.fair:
            return 0.0  # ties broken by arrival order
        start = max(self._vtime, self._finish.get(tenant.name, 0.0))
        self._finish[tenant.name] = start + tokens / tenant.weight
        return start

    def _fits(self, tokens: int) -> bool:
        return self.in_flight == 0 or self.in_flight + tokens <= self.capacity

    async def acquire(self, tenant: Tenant, tokens: int) -> tuple[float, float]:
        """Wait for admission; returns (seconds waited, the request's priority in the engine: `LANE`, or its
        start tag). Release it with `release(tokens, priority)`."""
        tag = self._tag(tenant, tokens)
        if not self._heap and self._fits(tokens):
            self._vtime = max(self._vtime, tag)
            self.in_flight += tokens
            self._admitted(tenant, tokens)
            return 0.0, tag
        if (self.fair and self._heap and not self._waiting.get(tenant.name)  # a backlogged tenant has no lane
                and tag <= self._heap[0][0] + self.lane_burst / tenant.weight
                and self.lane_in_flight + tokens <= self.capacity and self.below_share(tenant)):
            self._vtime = max(self._vtime, min(tag, self._heap[0][0]))  # not past the backlog's head
            self.in_flight += tokens
            self.lane_in_flight += tokens
            self._admitted(tenant, tokens)
            return 0.0, self.LANE
        t0 = time.perf_counter()
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (tag, next(self._seq), tokens, fut, tenant))
        self._waiting[tenant.name] = self._waiting.get(tenant.name, 0) + 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted, then the client went away
                self.release(tokens, tag)
            else:
                self._heap = [e for e in self._heap if e[3] is not fut]
                heapq.heapify(self._heap)
                self._waiting[tenant.name] -= 1
                self._dispatch()
            raise
        return time.perf_counter() - t0, tag

    def release(self, tokens: int, priority: float = 0.0) -> None:
        self.in_flight -= tokens
        if priority == self.LANE:
            self.lane_in_flight -= tokens
        self._dispatch()

    def _dispatch(self) -> None:
        while self._heap and self._fits(self._heap[0][2]):
            tag, _, tokens, fut, tenant = heapq.heappop(self._heap)
            self._waiting[tenant.name] -= 1
            if fut.done():
                continue
            self._vtime = max(self._vtime, tag)
            self.in_flight += tokens
            self._admitted(tenant, tokens)
            fut.set_result(None)


class GatedEngine:
    """The app's view of the engine: `score` passes the tenant's limits and the fair gate first; everything else
    is the wrapped engine's."""

    def __init__(self, inner, tenants: Tenants, gate: FairGate, metrics):
        self._inner, self._tenants, self._gate, self._metrics = inner, tenants, gate, metrics

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def score(self, batch):
        st = current_tenant.get()
        tokens = int(batch.num_tokens)
        if st is None:  # not through a tenant's request (in-process callers)
            return await self._inner.score(batch)
        if self._tenants.keys_file is None:  # one tenant: no limits, and the engine's own queue is the order
            return self._count(st, await self._inner.score(batch))
        self._tenants.charge_tokens(st, tokens)
        try:
            waited, priority = await self._gate.acquire(st.tenant, tokens)
            st.queue_wait_s += waited
            record_timing("gate", waited)
            st.queued += 1
            self._metrics.tenant_queue_wait.labels(tenant=st.tenant.name).observe(waited)
            token = score_priority.set(priority)
            try:
                result = await self._inner.score(batch)
            finally:
                score_priority.reset(token)
                self._gate.release(tokens, priority)
            return self._count(st, result)
        finally:
            self._tenants.release_tokens(st, tokens)

    def _count(self, st: TenantState, result):
        scored = int(result.token_logprobs_N.size)
        st.tokens_scored += scored
        self._metrics.tenant_tokens.labels(tenant=st.tenant.name).inc(scored)
        return result


async def watch_keys_file(tenants: Tenants, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        tenants.reload()


def install_sighup(tenants: Tenants) -> None:
    """SIGHUP re-reads the keys file (only possible from the main thread's loop: `python -m teacher_server`)."""
    import signal

    with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: tenants.reload(force=True))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "hash":
        print("usage: python -m teacher_server.tenants hash <key>   (prints the key_sha256 for --api-keys-file)",
              file=sys.stderr)
        return 2
    print(hash_key(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
