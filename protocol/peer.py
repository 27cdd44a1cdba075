"""The peers' scoring formats: vLLM's OpenAI-compatible `prompt_logprobs`, and TRL <= 1.10's `/get_sequence_logprobs/`.

Both sides import this module: the teacher server builds these responses, the trainer's client reads a stock
`vllm serve` response (or ours) back into packed arrays. Shapes of what is on the wire, as vLLM 0.32 and TRL
1.10 produce them (see `../shared/notes/peer-protocols.md` for the peers' file paths):

* `choices[i].prompt_logprobs`: one entry per prompt token; entry 0 is `null` (nothing predicts the first
  token); entry t is a dict keyed by the *string* token id, `{"logprob", "rank", "decoded_token"}`. vLLM builds
  it as `{actual: .., top_1: .., ..., top_K: ..}`: the actual token first with its rank in the full vocabulary,
  then the top-K with ranks 1..K. When the actual token is among the top-K its key stays first and its value is
  the top-K entry's, so a position has K entries, else K + 1. `-inf` is sent as -9999.0.
* TRL's binary response: base64 of raw float32/int32 C-order arrays `(B, T_max, K)` (top-K by rank, padded with
  -inf and id 0) and `(B, T_max, 1)` for the actual token, plus `shape` and `completion_lengths`.

These responses are one JSON object per scored token: they are built and read here without a Python loop over
positions (numpy over every entry, one `bytes.join`, and one regular expression to read them back).

Shape letters: B = sequences, N = scored positions (packed), K = top-k, C = K + 1 candidate columns (actual
token, then the top-K), E = entries on the wire (K or K + 1 per position, packed).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

# vLLM's `clamp_prompt_logprobs`: JSON has no -inf, so a logprob of -inf is sent as this.
VLLM_NEG_INF = -9999.0
_LOWEST32 = float(np.finfo(np.float32).min)  # what our engines return for -inf


@dataclass(frozen=True)
class PromptLogprobRows:
    """Per scored position (packed over sequences): the actual token's logprob and rank, and the top-K."""

    token_logprobs_N: np.ndarray  # float32 [N]
    token_ranks_N: np.ndarray  # int64 [N], 1 = the most likely token
    topk_ids_NK: np.ndarray  # int32 [N, K]
    topk_logprobs_NK: np.ndarray  # float32 [N, K]


def vllm_entries(
    target_N: np.ndarray, rows: PromptLogprobRows, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """vLLM's dict per position, as flat arrays: (ids_E, logprobs_E, ranks_E, row_E), in vLLM's key order.

    `k` may be 0 (only the actual token, as vLLM's `prompt_logprobs=0`) up to the rows' K.
    """
    n = target_N.size
    top_ids = rows.topk_ids_NK[:, :k]
    dup_Nk = top_ids == target_N[:, None]
    in_top_N = dup_Nk.any(axis=1)
    j_N = dup_Nk.argmax(axis=1) if k else np.zeros(n, np.int64)
    top_j_lp_N = rows.topk_logprobs_NK[np.arange(n), j_N] if k else np.zeros(n, np.float32)
    # Column 0 is the actual token; where it is also top-j, vLLM's dict keeps its place with the top-j value.
    lp0 = np.where(in_top_N, top_j_lp_N, rows.token_logprobs_N)
    rank0 = np.where(in_top_N, j_N + 1, rows.token_ranks_N)
    ids_NC = np.concatenate([target_N[:, None].astype(np.int64), top_ids], axis=1)
    lps_NC = np.concatenate([lp0[:, None], rows.topk_logprobs_NK[:, :k]], axis=1)
    ranks_NC = np.concatenate([rank0[:, None], np.broadcast_to(np.arange(1, k + 1), (n, k))], axis=1)
    valid_NC = np.concatenate([np.ones((n, 1), bool), ~dup_Nk], axis=1)
    row_NC = np.broadcast_to(np.arange(n)[:, None], valid_NC.shape)
    return ids_NC[valid_NC], lps_NC[valid_NC], ranks_NC[valid_NC], row_NC[valid_NC]


def _row_edges(row_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For entries grouped by row (`row_E` non-decreasing): which entry opens its row, which closes it."""
    first_E = np.ones(row_E.size, bool)
    first_E[1:] = row_E[1:] != row_E[:-1]
    last_E = np.ones(row_E.size, bool)
    last_E[:-1] = first_E[1:]
    return first_E, last_E


def _numbers(values: np.ndarray) -> list[bytes]:
    """Each number's JSON text (shortest round-trip form), in one C call."""
    if values.size == 0:
        return []
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")


def _wire_logprobs(lps: np.ndarray) -> np.ndarray:
    """float64 for JSON (a float32 widens exactly), with our engines' -inf stand-in sent as vLLM sends -inf."""
    out = lps.astype(np.float64)
    out[out <= _LOWEST32] = VLLM_NEG_INF
    return out


class TokenTables:
    """Per-vocabulary JSON fragments, built once: the dict key of each id, and its decoded token as a JSON string."""

    def __init__(self, vocab_size: int, decoded: Sequence[str] | None):
        self.key = np.array([b'"%d":{"logprob":' % i for i in range(vocab_size)], dtype=object)
        if decoded is None:
            self.decoded = np.full(vocab_size, b"null", dtype=object)
        else:
            self.decoded = np.array([orjson.dumps(s) for s in decoded], dtype=object)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int) -> TokenTables:
        """`decoded_token` as vLLM computes it for one id alone: `tokenizer.decode([id])` (ids past the tokenizer's
        own vocabulary, the output layer's padding rows, decode to "")."""
        if tokenizer is None:
            return cls(vocab_size, None)
        n = min(vocab_size, len(tokenizer))
        decoded = tokenizer.batch_decode([[i] for i in range(n)]) + [""] * (vocab_size - n)
        return cls(vocab_size, decoded)


def prompt_logprobs_json(
    lengths_B: np.ndarray, target_N: np.ndarray, rows: PromptLogprobRows, k: int, tables: TokenTables
) -> list[bytes]:
    """Each sequence's `prompt_logprobs` list as JSON bytes (`[null, {...}, ...]`), rows packed over sequences.

    Sequence i has lengths_B[i] tokens and lengths_B[i] - 1 rows (positions 1 .. len - 1).
    """
    ids_E, lps_E, ranks_E, row_E = vllm_entries(target_N, rows, k)
    e = ids_E.size
    first_E, last_E = _row_edges(row_E)
    pieces = np.empty((e, 8), dtype=object)
    pieces[:, 0] = np.array([b",", b",{"], dtype=object)[first_E.view(np.int8)]
    pieces[:, 1] = tables.key[ids_E]
    pieces[:, 2] = _numbers(_wire_logprobs(lps_E))
    pieces[:, 3] = b',"rank":'
    pieces[:, 4] = _numbers(ranks_E.astype(np.int64))
    pieces[:, 5] = b',"decoded_token":'
    pieces[:, 6] = tables.decoded[ids_E]
    pieces[:, 7] = np.array([b"}", b"}}"], dtype=object)[last_E.view(np.int8)]
    flat = pieces.ravel().tolist()
    # Sequence boundaries in the flat piece list: rows per sequence -> entries per sequence -> pieces.
    rows_B1 = np.concatenate([[0], np.cumsum(np.maximum(lengths_B.astype(np.int64) - 1, 0))])
    entry_B1 = np.searchsorted(row_E, rows_B1) * 8 if e else np.zeros_like(rows_B1)
    return [b"[null" + b"".join(flat[a:b]) + b"]" for a, b in zip(entry_B1[:-1], entry_B1[1:], strict=True)]


# ----------------------------------------------------------------------------------------------------------
# reading a `/v1/completions` response back (the trainer's client, against any vLLM-compatible server)
# ----------------------------------------------------------------------------------------------------------

# One entry of a prompt_logprobs dict. A match cannot start inside a JSON string: quotes in strings are escaped.
_ENTRY_RE = re.compile(
    rb'([{,])\s*"(\d+)"\s*:\s*\{\s*"logprob"\s*:\s*(-?[0-9.eE+-]+|NaN|-?Infinity)\s*,\s*"rank"\s*:\s*(-?\d+|null)'
)


class PeerResponseError(ValueError):
    """A peer's response that cannot be read as the scores asked for; the message says what is wrong."""


def read_prompt_logprobs(
    body: bytes, sequences: Sequence[np.ndarray], score_from_B: np.ndarray, k: int
) -> PromptLogprobRows:
    """The rows t = score_from .. len - 1 of every sequence, from a `/v1/completions` response to
    `prompt=[sequences...], prompt_logprobs=k`, packed in sequence order.

    Works on the raw bytes (one regular expression over every entry, then numpy): a stock vLLM response holds
    K + 1 JSON objects per position. The choices must come in prompt order, as vLLM and TRL's client assume.
    """
    matches = _ENTRY_RE.findall(body)
    if not matches:
        raise PeerResponseError("the response has no prompt_logprobs entries (did the server ignore prompt_logprobs?)")
    cols = np.array(matches)  # bytes [E, 4]
    if (cols[:, 3] == b"null").any():
        raise PeerResponseError("a prompt_logprobs entry has rank null; the server must report ranks")
    first_E = cols[:, 0] == b"{"
    ids_E = cols[:, 1].astype(np.int64)
    lps_E = cols[:, 2].astype(np.float64)
    ranks_E = cols[:, 3].astype(np.int64)
    lengths_B = np.array([s.size for s in sequences], dtype=np.int64)
    rows_total = int(np.maximum(lengths_B - 1, 0).sum())
    row_E = np.cumsum(first_E) - 1
    if int(first_E.sum()) != rows_total or not first_E[0]:
        raise PeerResponseError(
            f"the response has prompt_logprobs for {int(first_E.sum())} positions; the {len(sequences)} prompts "
            f"have {rows_total} (one per token after the first)"
        )
    per_row = np.bincount(row_E, minlength=rows_total)
    if (per_row < k).any() or (per_row > k + 1).any():
        bad = int(np.flatnonzero((per_row < k) | (per_row > k + 1))[0])
        raise PeerResponseError(f"position row {bad} has {int(per_row[bad])} entries; expected {k} or {k + 1}")
    # Every position's actual token: the prompt token it predicts.
    target_R = np.concatenate([s[1:] for s in sequences]).astype(np.int64) if rows_total else np.zeros(0, np.int64)
    is_actual_E = ids_E == target_R[row_E]
    found = np.bincount(row_E[is_actual_E], minlength=rows_total)
    if (found != 1).any():
        bad = int(np.flatnonzero(found != 1)[0])
        raise PeerResponseError(
            f"position row {bad}: the actual token {int(target_R[bad])} is not in prompt_logprobs (vLLM always adds it)"
        )
    actual_lp_R = np.empty(rows_total, np.float64)
    actual_rank_R = np.empty(rows_total, np.int64)
    actual_lp_R[row_E[is_actual_E]] = lps_E[is_actual_E]
    actual_rank_R[row_E[is_actual_E]] = ranks_E[is_actual_E]
    # Top-K: per row by rank, leaving out the actual token where it is the (K+1)-th entry.
    extra_E = is_actual_E & (per_row[row_E] > k)
    order = np.lexsort((ranks_E, extra_E, row_E))
    row_sorted = row_E[order]
    slot = np.arange(order.size) - np.searchsorted(row_sorted, row_sorted)
    keep = order[slot < k]
    top_ids_RK = ids_E[keep].reshape(rows_total, k)
    top_lps_RK = lps_E[keep].reshape(rows_total, k)
    # Keep rows t >= score_from of each sequence (row r of a sequence predicts token r + 1).
    starts_B = np.concatenate([[0], np.cumsum(np.maximum(lengths_B - 1, 0))[:-1]])
    skip_B = np.asarray(score_from_B, np.int64) - 1
    n_B = lengths_B - np.asarray(score_from_B, np.int64)
    sel = np.concatenate([np.arange(s + a, s + a + n) for s, a, n in zip(starts_B, skip_B, n_B, strict=True)])
    sel = sel.astype(np.int64)
    lps_floor = np.float64(_LOWEST32)
    return PromptLogprobRows(
        token_logprobs_N=np.maximum(actual_lp_R[sel], lps_floor).astype(np.float32),
        token_ranks_N=actual_rank_R[sel],
        topk_ids_NK=top_ids_RK[sel].astype(np.int32),
        topk_logprobs_NK=np.maximum(top_lps_RK[sel], lps_floor).astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------
# TRL <= 1.10: POST /get_sequence_logprobs/
# ----------------------------------------------------------------------------------------------------------


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def trl_binary_response(
    completion_lengths_B: np.ndarray, row_B: np.ndarray, target_N: np.ndarray, rows: PromptLogprobRows, k: int
) -> bytes:
    """TRL's `response_format="binary"`: (B, T_max, K) top-K and (B, T_max, 1) actual, padded with -inf / id 0.

    `row_B[i]` is the first output row (t) of sequence i's packed rows: 0, or 1 when its prompt length is 0
    (position 0 has no logprob and keeps the padding, as in TRL's server).
    """
    b = completion_lengths_B.size
    t_max = int(completion_lengths_B.max()) if b else 0
    n_scored_B = completion_lengths_B - row_B
    seq_N = np.repeat(np.arange(b), n_scored_B)
    t_N = np.arange(seq_N.size) - np.repeat(np.cumsum(n_scored_B) - n_scored_B, n_scored_B) + np.repeat(row_B, n_scored_B)
    lps = np.full((b, t_max, k), -np.inf, np.float32)
    ids = np.zeros((b, t_max, k), np.int32)
    actual_lp = np.full((b, t_max, 1), -np.inf, np.float32)
    actual_id = np.zeros((b, t_max, 1), np.int32)
    lps[seq_N, t_N] = rows.topk_logprobs_NK[:, :k]
    ids[seq_N, t_N] = rows.topk_ids_NK[:, :k]
    actual_lp[seq_N, t_N, 0] = rows.token_logprobs_N
    actual_id[seq_N, t_N, 0] = target_N
    return orjson.dumps({
        "logprobs_b64": _b64(lps), "token_ids_b64": _b64(ids), "actual_logprobs_b64": _b64(actual_lp),
        "actual_token_ids_b64": _b64(actual_id), "shape": [b, t_max, k],
        "completion_lengths": completion_lengths_B.astype(np.int64).tolist(),
    })


def trl_json_response(
    completion_lengths_B: np.ndarray, row_B: np.ndarray, target_N: np.ndarray, rows: PromptLogprobRows, k: int
) -> bytes:
    """TRL's `response_format="json"`: per position every entry of vLLM's dict sorted by rank (K or K + 1,
    ragged), `[]` for position 0 of a sequence with prompt length 0; -inf sent as vLLM sends it."""
    ids_E, lps_E, ranks_E, row_E = vllm_entries(target_N, rows, k)
    order = np.lexsort((ranks_E, row_E))
    ids_E, lps_E, row_E = ids_E[order], lps_E[order], row_E[order]
    e = ids_E.size
    first_E, last_E = _row_edges(row_E)
    seps = np.array([b",", b",["], dtype=object)[first_E.view(np.int8)]
    ends = np.array([b"", b"]"], dtype=object)[last_E.view(np.int8)]
    lp_parts = np.empty((e, 3), dtype=object)
    lp_parts[:, 0], lp_parts[:, 1], lp_parts[:, 2] = seps, _numbers(_wire_logprobs(lps_E)), ends
    id_parts = np.empty((e, 3), dtype=object)
    id_parts[:, 0], id_parts[:, 1], id_parts[:, 2] = seps, _numbers(ids_E.astype(np.int64)), ends
    lp_flat, id_flat = lp_parts.ravel().tolist(), id_parts.ravel().tolist()
    n_scored_B = (completion_lengths_B - row_B).astype(np.int64)
    rows_B1 = np.concatenate([[0], np.cumsum(n_scored_B)])
    cut_B1 = np.searchsorted(row_E, rows_B1) * 3 if e else np.zeros_like(rows_B1)

    def seqs(flat: list[bytes]) -> bytes:
        out = []
        for i, (a, b) in enumerate(zip(cut_B1[:-1], cut_B1[1:], strict=True)):
            body = b"".join(flat[a:b])  # ",[..],[..]" (each row led by a comma)
            if row_B[i]:
                body = b",[]" + body
            out.append(b"[" + body[1:] + b"]")
        return b"[" + b",".join(out) + b"]"

    return b'{"logprobs":' + seqs(lp_flat) + b',"logprob_token_ids":' + seqs(id_flat) + b"}"
