"""transformers engine: the reference backend (CPU or CUDA).

Concurrent `score` calls are coalesced by a batcher: requests that arrive while a forward runs (or within
`batch_wait_ms`) join the next forward, up to `max_tokens_per_batch` padded tokens, taken in the order of their
`score_priority` (the fair gate's start tags; arrival order without tenants). Work in the gate's latency lane
(negative priority) goes first, in a forward of its own; while there is lane work about, other forwards take
half the token budget, so the forward a lane request waits for is shorter. Sequences are sorted by
length inside a forward to keep padding small. Only the scored positions' hidden states go through the
output layer, `logits_chunk_size` rows at a time, so [all tokens, V] float32 logits never exist at once.

Shape letters: b = sequences in one forward, L = padded length, D = hidden size, N = scored positions,
K = top-k, V = vocabulary.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from generation.hf import load_causal_lm, sample
from protocol.fingerprint import tokenizer_fingerprint
from protocol.schema import ScoreBatch, ScoreResult
from teacher_server.engines.base import EngineInfo, ScoringEngine, record_timing, score_priority
from teacher_server.settings import Settings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


LANE_ACTIVE_S = 2.0  # how long after lane work the batcher keeps other forwards at half the token budget


@dataclass(order=True)
class _Job:
    """Queued work, ordered by (priority, arrival): the fair gate's start tag when there is one, so a request the
    gate put first also goes first into the next forward; arrival order otherwise (all priorities 0)."""

    priority: float
    seq: int
    batch: ScoreBatch = field(compare=False)
    future: asyncio.Future = field(compare=False)
    tokens: int = field(init=False, compare=False)
    queued_at: float = field(init=False, compare=False)
    started_at: float = field(default=0.0, compare=False)  # when its forward started (perf_counter)
    forward_s: float = field(default=0.0, compare=False)
    done_at: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        self.tokens = self.batch.num_tokens
        self.queued_at = time.perf_counter()


class HFEngine(ScoringEngine):
    def __init__(self, settings: Settings):
        self.settings = settings
        self._queue: asyncio.PriorityQueue[_Job] | None = None
        self._seq = itertools.count()
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-forward")
        self._failed: BaseException | None = None

    # ------------------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)
        self._queue = asyncio.PriorityQueue()
        self._worker = asyncio.create_task(self._batch_loop(), name="hf-batcher")

    def _load(self) -> None:
        from transformers import AutoTokenizer

        s = self.settings
        self.device, self.dtype = resolve_device_dtype(s.device, s.dtype)
        tokenizer = AutoTokenizer.from_pretrained(s.model)
        self.tokenizer = tokenizer
        model = load_causal_lm(s.model, self.dtype, self.device)  # straight onto a GPU, no host copy
        self.model = model.to(self.device).eval()
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # Low precision weights: the logits are still float32 (see `_logits_fp32`); off CUDA with a float32 copy
        # of the output layer, since the float32-output bfloat16 matmul exists only there.
        low = self.lm_head.weight.dtype not in (torch.float32, torch.float64)
        self._head_fp32 = None
        if low and self.device.type != "cuda":
            bias = getattr(self.lm_head, "bias", None)
            self._head_fp32 = (self.lm_head.weight.float(), None if bias is None else bias.float())
        model_max = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.info = EngineInfo(
            model=s.model_name or os.path.basename(os.path.normpath(s.model)),
            engine="hf",
            vocab_size=int(self.lm_head.weight.shape[0]),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_seq_len=min(s.max_seq_len or model_max, model_max),
        )
        logger.info("hf engine: %s on %s (%s), vocab %d", s.model, self.device, self.dtype, self.info.vocab_size)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=True)

    def healthy(self) -> bool:
        return self._failed is None and self._worker is not None and not self._worker.done()

    async def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        # The trainer's sampling code (generation.hf, one tested path), on the teacher's weights. It runs on the
        # same worker thread as scoring forwards, so the two never compete for the model.
        def run() -> list[list[int]]:
            samples = sample(
                self.model, self.tokenizer, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, seed=seed, batch_size=max(1, self.settings.max_tokens_per_batch // 512),
                record_logprobs=False,
            )
            return [s.completion_ids for s in samples]

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    # ------------------------------------------------------------------------------------------------------
    # batching
    # ------------------------------------------------------------------------------------------------------

    async def score(self, batch: ScoreBatch) -> ScoreResult:
        if self._queue is None:
            raise RuntimeError("engine not started")
        job = _Job(score_priority.get(), next(self._seq), batch, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        result = await job.future
        record_timing("queue", job.started_at - job.queued_at)
        record_timing("forward", job.forward_s)
        record_timing("wake", time.perf_counter() - job.done_at)  # the event loop's delay in resuming this request
        return result

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        full = self.settings.max_tokens_per_batch
        wait_s = self.settings.batch_wait_ms / 1000
        lane_seen = -float("inf")
        while True:
            jobs = [await self._queue.get()]
            tokens = jobs[0].tokens
            lane = jobs[0].priority < 0  # the gate's latency lane: a forward of lane work only, not filled up
            now = loop.time()
            if lane:
                lane_seen = now
            # While light tenants are being served, other forwards take half the budget: lane work arriving during
            # one waits for half as long, at some cost in batch size (none once the lane has been idle 2 s).
            budget = full // 2 if now - lane_seen < LANE_ACTIVE_S else full
            deadline = now + wait_s
            # Coalesce: everything already queued, plus whatever arrives within the wait window.
            while tokens < budget:
                if lane:  # other lane work already queued, nothing else, no waiting
                    if self._queue.empty():
                        break
                    job = self._queue.get_nowait()  # the queue's smallest: lane work first, if there is any
                    if job.priority >= 0:
                        self._queue.put_nowait(job)
                        break
                    jobs.append(job)
                    tokens += job.tokens
                    continue
                try:
                    timeout = max(0.0, deadline - loop.time())
                    job = self._queue.get_nowait() if timeout == 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.QueueEmpty, TimeoutError):
                    break
                jobs.append(job)
                tokens += job.tokens
            jobs = [j for j in jobs if not j.future.cancelled()]
            if not jobs:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._score_jobs, [j.batch for j in jobs])
            except Exception as exc:  # the engine stays up; the requests get the error
                logger.exception("forward failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            done = time.perf_counter()
            for j, r in zip(jobs, results, strict=True):
                j.started_at, j.forward_s, j.done_at = started, done - started, done
                if not j.future.done():
                    j.future.set_result(r)

    # ------------------------------------------------------------------------------------------------------
    # scoring (worker thread)
    # ------------------------------------------------------------------------------------------------------

    def _score_jobs(self, batches: list[ScoreBatch]) -> list[ScoreResult]:
        """Score several requests together; returns one result per request."""
        seqs = [b.sequence(i) for b in batches for i in range(b.num_sequences)]
        starts = np.concatenate([b.score_from_B for b in batches])
        k_max = max(b.top_k for b in batches)
        request_B = np.repeat(np.arange(len(batches)), [b.num_sequences for b in batches])
        lp_N, ids_NK, lps_NK, num_scored, rank_N = self.score_sequences(seqs, starts, k_max, request_B)
        out, row, seq = [], 0, 0
        for b in batches:
            n_b = int(num_scored[seq : seq + b.num_sequences].sum())
            out.append(
                ScoreResult(
                    token_logprobs_N=lp_N[row : row + n_b],
                    topk_ids_NK=np.ascontiguousarray(ids_NK[row : row + n_b, : b.top_k]),
                    topk_logprobs_NK=np.ascontiguousarray(lps_NK[row : row + n_b, : b.top_k]),
                    num_scored_B=num_scored[seq : seq + b.num_sequences],
                    model=self.info.model,
                    token_ranks_N=rank_N[row : row + n_b],
                )
            )
            row, seq = row + n_b, seq + b.num_sequences
        return out

    @torch.inference_mode()
    def score_sequences(
        self, seqs: list[np.ndarray], starts_B: np.ndarray, k: int, request_B: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Score sequences (in input order) in as few padded forwards as the token budget allows.

        `request_B` says which request each sequence came from (only for the forward metrics).
        """
        lengths = np.array([s.size for s in seqs], dtype=np.int64)
        num_scored = (lengths - starts_B).astype(np.int32)
        row_off = np.concatenate([[0], np.cumsum(num_scored, dtype=np.int64)])
        n = int(row_off[-1])
        lp_N = np.empty(n, np.float32)
        ids_NK = np.empty((n, k), np.int32)
        lps_NK = np.empty((n, k), np.float32)
        rank_N = np.empty(n, np.int64)

        order = np.argsort(-lengths, kind="stable")  # longest first: groups of similar length, little padding
        budget = self.settings.max_tokens_per_batch
        group: list[int] = []
        groups: list[list[int]] = []
        for i in order:  # per sequence, not per position
            if group and (len(group) + 1) * lengths[group[0]] > budget:
                groups.append(group)
                group = []
            group.append(int(i))
        if group:
            groups.append(group)

        for g in groups:
            lp, ids, lps, rank = self._forward_group([seqs[i] for i in g], starts_B[g], k)
            counts = num_scored[g]
            dst = np.concatenate([np.arange(row_off[i], row_off[i] + c) for i, c in zip(g, counts, strict=True)])
            lp_N[dst], ids_NK[dst], lps_NK[dst], rank_N[dst] = lp, ids, lps, rank
            if self.observe_forward is not None:
                n_req = 1 if request_B is None else int(np.unique(request_B[g]).size)
                self.observe_forward(n_req, len(g), int(lengths[g].sum()))
        return lp_N, ids_NK, lps_NK, num_scored, rank_N

    def _forward_group(
        self, seqs: list[np.ndarray], starts_b: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One padded forward; returns rows for every scored position, sequence by sequence."""
        lengths_b = np.array([s.size for s in seqs], dtype=np.int64)
        b, L = len(seqs), int(lengths_b.max())
        ids_bL = np.zeros((b, L), dtype=np.int64)
        mask_bL = np.arange(L)[None, :] < lengths_b[:, None]
        ids_bL[mask_bL] = np.concatenate(seqs)
        input_ids = torch.from_numpy(ids_bL).to(self.device)
        attention = torch.from_numpy(mask_bL.astype(np.int64)).to(self.device)
        # use_cache=False: scoring is one forward; a KV cache would only copy every layer's K/V
        hidden_bLD = self.decoder(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state

        # Row t-1 of sequence i predicts token t, for t in [start_i, len_i).
        counts = lengths_b - starts_b
        seq_N = np.repeat(np.arange(b), counts)
        pos_N = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(starts_b, counts) - 1
        seq_t, pos_t = torch.from_numpy(seq_N).to(self.device), torch.from_numpy(pos_N).to(self.device)
        hidden_ND = hidden_bLD[seq_t, pos_t]
        target_N = input_ids[seq_t, pos_t + 1]
        return self.logprobs_topk(hidden_ND, target_N, k)

    def _logits_fp32(self, hidden_CD: torch.Tensor) -> torch.Tensor:
        """float32 logits without rounding them to the weights' dtype first: `lm_head(h).float()` in bfloat16
        moves a logit near 30 by up to 0.06, and every logprob and top-k value with it."""
        weight, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if weight.dtype in (torch.float32, torch.float64):
            return self.lm_head(hidden_CD).float()
        if self._head_fp32 is not None:
            return torch.nn.functional.linear(hidden_CD.float(), *self._head_fp32)
        logits = torch.mm(hidden_CD, weight.T, out_dtype=torch.float32)  # CUDA: float32 output, float32 accumulation
        return logits if bias is None else logits + bias.float()

    def logprobs_topk(
        self, hidden_ND: torch.Tensor, target_N: torch.Tensor, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Chunked output layer, with at most `chunk` rows of [*, V] logits: actual-token logprob, top-k, and the
        actual token's rank (tokens whose logit is >= its own, counting itself: vLLM's definition). Results are
        gathered on the model's device and copied to the host once, not once per chunk (each copy is a sync)."""
        n, chunk = hidden_ND.shape[0], self.settings.logits_chunk_size
        dev = hidden_ND.device
        lp_N = torch.empty(n, dtype=torch.float32, device=dev)
        ids_NK = torch.empty((n, k), dtype=torch.int32, device=dev)
        lps_NK = torch.empty((n, k), dtype=torch.float32, device=dev)
        rank_N = torch.empty(n, dtype=torch.int64, device=dev)
        lowest = torch.finfo(torch.float32).min
        for a in range(0, n, chunk):
            logits = self._logits_fp32(hidden_ND[a : a + chunk])
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            top = torch.topk(logits, k, dim=-1, sorted=True)
            target_logit = logits.gather(1, target_N[a : a + chunk, None])
            lp_N[a : a + chunk] = (target_logit - lse).squeeze(1).clamp_min(lowest)
            rank_N[a : a + chunk] = (logits >= target_logit).sum(dim=-1)
            ids_NK[a : a + chunk] = top.indices
            lps_NK[a : a + chunk] = (top.values - lse).clamp_min(lowest)
        return tuple(t.cpu().numpy() for t in (lp_N, ids_NK, lps_NK, rank_N))
