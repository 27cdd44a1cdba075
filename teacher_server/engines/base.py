"""The engine interface the server is built around (so tests build the app around any engine)."""

from __future__ import annotations

import abc
import contextvars
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol.schema import ScoreBatch, ScoreResult

# Called once per forward pass an engine runs: (requests, sequences, tokens) that the forward served.
ForwardObserver = Callable[[int, int, int], None]


# The order in which admitted scoring work should enter a forward: the fair gate's start tag of the request
# (teacher_server/tenants.py), lowest first; 0.0 (the default) for every request keeps arrival order.
score_priority: contextvars.ContextVar[float] = contextvars.ContextVar("aopd_score_priority", default=0.0)

# Where a scoring request's time went, in seconds by stage, filled in by whoever knows (the fair gate: "gate";
# the hf engine: "queue", "forward" and "wake"); the /v1/score route sets a dict and returns it as a Server-Timing header.
score_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("aopd_score_timings", default=None)


def record_timing(stage: str, seconds: float) -> None:
    timings = score_timings.get()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + seconds


@dataclass(frozen=True)
class EngineInfo:
    model: str
    engine: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_seq_len: int


class ScoringEngine(abc.ABC):
    """Lifecycle: `await start()` (loads the model) -> many concurrent `await score(batch)` -> `await close()`.

    `score` receives a batch the server has already validated (ids in vocab, 1 <= score_from < len, K in
    range) and returns, for every sequence, rows score_from .. len-1 as defined in `protocol.schema`.
    Engines batch concurrent calls themselves (hf: coalesced padded forwards; vLLM: continuous batching).
    """

    info: EngineInfo
    observe_forward: ForwardObserver | None = None
    tokenizer: Any = None  # the teacher's tokenizer, once started (text prompts and decoded tokens of the peer routes)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def score(self, batch: ScoreBatch) -> ScoreResult: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def generate(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int | None
    ) -> list[list[int]]:
        """Sample n completions per prompt (prompt-major), each ending at EOS (included) or the limit."""
        raise NotImplementedError(f"the {type(self).__name__} engine does not generate")

    def healthy(self) -> bool:
        """False once the engine can no longer serve (the server then answers 503)."""
        return True
