"""Prometheus metrics of one server instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TOKEN_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("aopd_teacher_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("aopd_teacher_errors", "Error responses by error type", ["type"], registry=r)
        self.sequences = Counter("aopd_teacher_sequences_scored", "Sequences scored", registry=r)
        self.tokens = Counter("aopd_teacher_tokens_scored", "Positions scored (rows returned)", registry=r)
        self.latency = Histogram(
            "aopd_teacher_request_latency_seconds", "Request latency by route", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_sequences = Histogram(
            "aopd_teacher_request_sequences", "Sequences per scoring request", buckets=_COUNT_BUCKETS, registry=r
        )
        self.forwards = Counter("aopd_teacher_forwards", "Engine forward passes", registry=r)
        self.forward_requests = Histogram(
            "aopd_teacher_forward_requests", "Requests served by one forward pass", buckets=_COUNT_BUCKETS, registry=r
        )
        self.forward_sequences = Histogram(
            "aopd_teacher_forward_sequences", "Sequences in one forward pass", buckets=_COUNT_BUCKETS, registry=r
        )
        self.forward_tokens = Histogram(
            "aopd_teacher_forward_tokens", "Tokens in one forward pass", buckets=_TOKEN_BUCKETS, registry=r
        )
        # per tenant (names come from the keys file: bounded cardinality)
        self.tenant_requests = Counter(
            "aopd_teacher_tenant_requests", "Work requests by tenant and status (429: over a limit)", ["tenant", "status"],
            registry=r,
        )
        self.tenant_tokens = Counter("aopd_teacher_tenant_tokens_scored", "Positions scored by tenant", ["tenant"], registry=r)
        self.tenant_queue_wait = Histogram(
            "aopd_teacher_tenant_queue_wait_seconds", "Wait in the fair queue before the engine, by tenant", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("aopd_teacher_requests_in_flight", "Scoring and generation requests being served", registry=r)

    def observe_forward(self, n_requests: int, n_sequences: int, n_tokens: int) -> None:
        self.forwards.inc()
        self.forward_requests.observe(n_requests)
        self.forward_sequences.observe(n_sequences)
        self.forward_tokens.observe(n_tokens)
