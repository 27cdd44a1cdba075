"""Schema of the teacher scoring contract: `POST /v1/score`, `GET /v1/info`, and the error envelope.

Two views of the same data:

* pydantic models (`ScoreRequestJSON`, `ScoreResponseJSON`, `InfoResponse`, `ErrorEnvelope`): the JSON
  encoding, the OpenAPI schema at `/docs`, and strict validation (`extra="forbid"`).
* packed numpy views (`ScoreBatch`, `ScoreResult`): what the engines, the binary codec and the client work
  with. Sequences are concatenated, so no code path loops over positions in Python.

Shape letters: B = sequences in a request, T = all tokens of the request (packed), N = scored positions
(packed over sequences), K = top-k.

Semantics (per sequence with tokens x[0..L-1] and score_from s, 1 <= s < L), for t = s .. L-1, row t - s:
    token_logprobs[t-s]   = log p_T(x[t] | x[:t])                (also when x[t] is not in the top-k)
    topk_ids[t-s, :]      = the K most likely next tokens after x[:t], by descending logprob
    topk_logprobs[t-s, :] = their log-probabilities, normalised over the full vocabulary
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
JSON_MEDIA_TYPE = "application/json"
MSGPACK_MEDIA_TYPE = "application/msgpack"

MAX_ERROR_MESSAGE_CHARS = 500


class ProtocolError(ValueError):
    """A request or response that breaks the contract. `error_type` names the rule; `status` is the HTTP code."""

    def __init__(self, message: str, *, error_type: str = "invalid_request", status: int = 400):
        super().__init__(message)
        self.error_type = error_type
        self.status = status


def cap_message(message: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """Error messages never echo a whole input back: cut them to `limit` characters."""
    return message if len(message) <= limit else message[: limit - 15] + "... (truncated)"


# ----------------------------------------------------------------------------------------------------------
# JSON / OpenAPI models
# ----------------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SequenceIn(_Strict):
    # Range rules are checked by the server (same error types for JSON and binary bodies), not here.
    token_ids: list[int] = Field(description="Prompt + completion token ids, each in [0, vocab_size).")
    score_from: int = Field(description="First position scored (1 <= score_from < len(token_ids)).")


class ScoreRequestJSON(_Strict):
    protocol_version: int = Field(PROTOCOL_VERSION, description="Must equal the server's protocol version.")
    top_k: int = Field(description="K: number of teacher top tokens returned per position.")
    sequences: list[SequenceIn] = Field(description="Sequences to score.")


class SequenceScores(_Strict):
    token_logprobs: list[float] = Field(description="[len - score_from] log p_T(actual token).")
    topk_ids: list[list[int]] = Field(description="[len - score_from, K] teacher top-K ids, best first.")
    topk_logprobs: list[list[float]] = Field(description="[len - score_from, K] their log-probabilities.")


class ScoreResponseJSON(_Strict):
    protocol_version: int
    model: str
    top_k: int
    results: list[SequenceScores]


class GenerateRequestJSON(_Strict):
    """`POST /v1/generate`: the teacher samples completions (SeqKD's teacher-written training data)."""

    protocol_version: int = Field(PROTOCOL_VERSION)
    prompts: list[list[int]] = Field(description="Prompt token ids.")
    n: int = Field(1, description="Samples per prompt (1 <= n <= 64).")
    max_new_tokens: int = Field(description="Completion length limit (prompt + completion <= max_seq_len).")
    temperature: float = Field(1.0, description="0 = greedy.")
    top_p: float = Field(1.0, description="Nucleus sampling, in (0, 1].")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Sampling seed (same seed, same engine state: same samples).")


class GenerateResponseJSON(_Strict):
    protocol_version: int
    model: str
    completions: list[list[int]] = Field(description="Prompt-major: n completions per prompt, each ending at EOS or the limit.")


class InfoResponse(_Strict):
    protocol_version: int
    model: str = Field(description="Model name (directory basename unless configured).")
    engine: Literal["hf", "vllm", "openai"] = Field(
        description="Scoring backend; 'openai' is what the client reports for a stock OpenAI-compatible server."
    )
    vocab_size: int = Field(description="Rows of the teacher's output layer; valid ids are [0, vocab_size).")
    tokenizer_fingerprint: str = Field(description="sha256 of the token->id map and special tokens.")
    max_top_k: int
    max_tokens_per_request: int
    max_sequences_per_request: int
    max_seq_len: int
    max_body_bytes: int
    encodings: list[str] = [JSON_MEDIA_TYPE, MSGPACK_MEDIA_TYPE]


class ErrorBody(_Strict):
    type: str = Field(description="Machine-readable error kind, e.g. 'invalid_top_k'.")
    message: str = Field(description="Human-readable explanation (capped in length).")


class ErrorEnvelope(_Strict):
    """The single error format of every route."""

    error: ErrorBody


# ----------------------------------------------------------------------------------------------------------
# Packed views
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreBatch:
    """A scoring request, packed: `token_ids_T` is every sequence's tokens concatenated."""

    token_ids_T: np.ndarray  # int32 [T]
    lengths_B: np.ndarray  # int32 [B]
    score_from_B: np.ndarray  # int32 [B]
    top_k: int
    protocol_version: int = PROTOCOL_VERSION

    @classmethod
    def from_sequences(
        cls, sequences: list[tuple[list[int] | np.ndarray, int]], top_k: int
    ) -> ScoreBatch:
        """Build from `[(token_ids, score_from), ...]` (one numpy conversion per sequence)."""
        arrays = [np.asarray(ids, dtype=np.int64) for ids, _ in sequences]
        for arr in arrays:
            if arr.ndim != 1:
                raise ProtocolError("token_ids must be a flat list of ints", error_type="invalid_sequence")
        token_ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        if token_ids.size and (token_ids.min() < np.iinfo(np.int32).min or token_ids.max() > np.iinfo(np.int32).max):
            raise ProtocolError("token ids must fit in int32", error_type="invalid_token_id")
        return cls(
            token_ids_T=token_ids.astype(np.int32),
            lengths_B=np.array([a.size for a in arrays], dtype=np.int32),
            score_from_B=np.array([s for _, s in sequences], dtype=np.int32),
            top_k=int(top_k),
        )

    @property
    def num_sequences(self) -> int:
        return int(self.lengths_B.size)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.size)

    @property
    def num_scored_B(self) -> np.ndarray:
        return (self.lengths_B - self.score_from_B).astype(np.int32)

    @property
    def offsets_B1(self) -> np.ndarray:
        """Start of each sequence in `token_ids_T`, with the total appended ([B + 1])."""
        return np.concatenate([[0], np.cumsum(self.lengths_B, dtype=np.int64)])

    def sequence(self, i: int) -> np.ndarray:
        off = self.offsets_B1
        return self.token_ids_T[off[i] : off[i + 1]]

    def check_shapes(self) -> None:
        """Structural checks that need no server limits (the server adds its own)."""
        if self.token_ids_T.ndim != 1 or self.lengths_B.ndim != 1 or self.score_from_B.ndim != 1:
            raise ProtocolError("token_ids, lengths and score_from must be 1-D arrays", error_type="invalid_shape")
        if self.lengths_B.shape != self.score_from_B.shape:
            raise ProtocolError(
                f"lengths has {self.lengths_B.size} entries but score_from has {self.score_from_B.size}",
                error_type="invalid_shape",
            )
        if (self.lengths_B < 0).any() or int(self.lengths_B.astype(np.int64).sum()) != self.token_ids_T.size:
            raise ProtocolError(
                f"lengths must be >= 0 and sum to len(token_ids)={self.token_ids_T.size}",
                error_type="invalid_shape",
            )


@dataclass(frozen=True)
class ScoreResult:
    """A scoring response, packed over sequences: rows of sequence i are `offsets[i]:offsets[i+1]`."""

    token_logprobs_N: np.ndarray  # float32 [N]
    topk_ids_NK: np.ndarray  # int32 [N, K]
    topk_logprobs_NK: np.ndarray  # float32 [N, K]
    num_scored_B: np.ndarray  # int32 [B]
    model: str = ""
    protocol_version: int = PROTOCOL_VERSION
    # The actual token's rank in the full vocabulary (1 = most likely; tokens with an equal logprob count, as in
    # vLLM). Engines fill it for the peer routes (vLLM's `prompt_logprobs` carry it); `/v1/score` does not send it.
    token_ranks_N: np.ndarray | None = None  # int64 [N]

    @property
    def top_k(self) -> int:
        return int(self.topk_ids_NK.shape[1])

    @property
    def offsets_B1(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.num_scored_B, dtype=np.int64)])

    def split(self) -> list[SequenceResult]:
        """Per-sequence views (no copies)."""
        off = self.offsets_B1
        return [
            SequenceResult(
                token_logprobs=self.token_logprobs_N[a:b],
                topk_ids=self.topk_ids_NK[a:b],
                topk_logprobs=self.topk_logprobs_NK[a:b],
            )
            for a, b in zip(off[:-1], off[1:], strict=True)
        ]

    def check_shapes(self) -> None:
        n = int(self.num_scored_B.astype(np.int64).sum()) if self.num_scored_B.size else 0
        ok = (
            self.token_logprobs_N.shape == (n,)
            and self.topk_ids_NK.ndim == 2
            and self.topk_ids_NK.shape[0] == n
            and self.topk_logprobs_NK.shape == self.topk_ids_NK.shape
            and (self.num_scored_B >= 0).all()
        )
        if not ok:
            raise ProtocolError(
                "inconsistent response shapes: "
                f"num_scored sums to {n}, token_logprobs {self.token_logprobs_N.shape}, "
                f"topk_ids {self.topk_ids_NK.shape}, topk_logprobs {self.topk_logprobs_NK.shape}",
                error_type="invalid_response",
            )

    @staticmethod
    def concat(results: list[ScoreResult], model: str = "") -> ScoreResult:
        k = results[0].top_k if results else 0
        return ScoreResult(
            token_logprobs_N=np.concatenate([r.token_logprobs_N for r in results]) if results else np.zeros(0, np.float32),
            topk_ids_NK=np.concatenate([r.topk_ids_NK for r in results]) if results else np.zeros((0, k), np.int32),
            topk_logprobs_NK=np.concatenate([r.topk_logprobs_NK for r in results])
            if results
            else np.zeros((0, k), np.float32),
            num_scored_B=np.concatenate([r.num_scored_B for r in results]) if results else np.zeros(0, np.int32),
            model=model,
        )


@dataclass(frozen=True)
class SequenceResult:
    """One sequence's teacher scores, as numpy arrays (rows = positions score_from .. len-1)."""

    token_logprobs: np.ndarray  # float32 [n]
    topk_ids: np.ndarray  # int32 [n, K]
    topk_logprobs: np.ndarray  # float32 [n, K]
