"""The vLLM engine: same scores as the transformers engine, concurrency, the raw-tensor hook, the version guard.

One vLLM engine (and one hf engine) per module, both on an event loop in a background thread, as under
uvicorn; tests call into that loop. vLLM starts in ~25 s on CPU (longer on a cold torch.compile cache).

Run: pytest -m vllm tests/test_vllm_engine.py
"""

# N = scored positions (packed), K = top-k

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import tokens_input  # noqa: E402
from vllm.v1.engine import logprobs as vllm_logprobs  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402

from protocol.schema import ScoreBatch, ScoreResult  # noqa: E402
from teacher_server.engines.hf import HFEngine  # noqa: E402
from teacher_server.engines.vllm import (  # noqa: E402
    ALLOW_UNTESTED_ENV,
    HOOK,
    VLLMEngine,
    check_vllm_compat,
)
from teacher_server.settings import Settings  # noqa: E402

pytestmark = [pytest.mark.numeric, pytest.mark.vllm]

# Both engines run the same float32 model with different kernels (vLLM's CPU attention and fused RMSNorm,
# other GEMM blockings, log_softmax vs logsumexp), so results differ by rounding only. float32 has a relative
# epsilon of 1.2e-7; accumulated over two layers and 128-wide dot products on logits of magnitude ~10-20
# that gives differences of order 1e-5 (measured here: at most 1.8e-5). 1e-4 leaves a 5-10x margin, while any
# real bug (a row shifted by one position, a wrong column, another sequence's rows) moves logprobs by O(1).
ATOL = 1e-4
MAX_SEQ_LEN = 512


class LoopThread:
    """An asyncio loop in a background thread (like uvicorn's): engines start, score and close on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


def settings_for(model_dir, engine: str) -> Settings:
    return Settings(
        model=str(model_dir), engine=engine, dtype="float32", max_top_k=32, max_seq_len=MAX_SEQ_LEN,
        max_tokens_per_batch=2048,
    )


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def vllm_engine(loop, tiny_model_dir):
    engine = VLLMEngine(settings_for(tiny_model_dir, "vllm"))
    loop.run(engine.start())
    yield engine
    loop.run(engine.close())


@pytest.fixture(scope="module")
def hf_engine(loop, tiny_model_dir):
    engine = HFEngine(settings_for(tiny_model_dir, "hf"))
    loop.run(engine.start())
    yield engine
    loop.run(engine.close())


@pytest.fixture(scope="module")
def sequences(hf_engine) -> list[tuple[np.ndarray, int]]:
    """Random sequences (actual tokens mostly outside the top-K) and greedy continuations (actual = top-1)."""
    rng = np.random.default_rng(0)
    vocab = hf_engine.info.vocab_size
    seqs = [(rng.integers(0, vocab, n), s) for n, s in [(2, 1), (7, 1), (40, 3), (300, 120), (MAX_SEQ_LEN, 500)]]
    with torch.inference_mode():
        for n_prompt, n_new in [(5, 60), (20, 100)]:
            prompt = torch.from_numpy(rng.integers(4, vocab, (1, n_prompt)))
            out = hf_engine.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, pad_token_id=0,
            )
            seqs.append((out[0].numpy(), n_prompt))
    return seqs


def actual_tokens_N(batch: ScoreBatch) -> np.ndarray:
    off = batch.offsets_B1
    return np.concatenate(
        [batch.token_ids_T[a + s : b] for a, b, s in zip(off[:-1], off[1:], batch.score_from_B, strict=True)]
    )


def assert_same_scores(got: ScoreResult, ref: ScoreResult, k: int, ref_lps_NK1: np.ndarray) -> None:
    """`got` (top-k) against `ref`; `ref_lps_NK1` holds k+1 reference logprobs, to tell ties from errors.

    An id is compared where its logprob is clearly apart (> 2 ATOL) from both neighbours, the (k+1)-th
    included, so a near-tie that either engine may order either way does not fail the test.
    """
    np.testing.assert_array_equal(got.num_scored_B, ref.num_scored_B)
    assert got.topk_ids_NK.shape == ref.topk_ids_NK[:, :k].shape
    np.testing.assert_allclose(got.token_logprobs_N, ref.token_logprobs_N, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got.topk_logprobs_NK, ref.topk_logprobs_NK[:, :k], rtol=0, atol=ATOL)
    gap_prev = -np.diff(ref_lps_NK1[:, : k + 1], axis=1, prepend=np.inf)[:, :k]
    gap_next = -np.diff(ref_lps_NK1[:, : k + 1], axis=1)
    clear_NK = (gap_prev > 2 * ATOL) & (gap_next > 2 * ATOL)
    assert clear_NK.mean() > 0.9, "almost every id should be clear of ties: the comparison would be vacuous"
    np.testing.assert_array_equal(got.topk_ids_NK[clear_NK], ref.topk_ids_NK[:, :k][clear_NK])


# ----------------------------------------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 32])
def test_scores_match_transformers_engine(loop, vllm_engine, hf_engine, sequences, k):
    batch = ScoreBatch.from_sequences(sequences, top_k=k)
    got = loop.run(vllm_engine.score(batch))
    ref = loop.run(hf_engine.score(ScoreBatch.from_sequences(sequences, top_k=k + 1)))
    got.check_shapes()
    assert got.topk_ids_NK.dtype == np.int32 and got.topk_logprobs_NK.dtype == np.float32
    assert got.token_logprobs_N.dtype == np.float32
    assert (np.diff(got.topk_logprobs_NK, axis=1) <= 0).all(), "top-K must be sorted by descending logprob"
    assert_same_scores(got, ref, k, ref.topk_logprobs_NK)

    # The actual token's logprob is right also where that token is not among the top-K.
    actual_N = actual_tokens_N(batch)
    outside_N = ~(ref.topk_ids_NK[:, :k] == actual_N[:, None]).any(axis=1)
    assert outside_N.any() and (~outside_N).any(), "the sequences must cover tokens inside and outside the top-K"
    np.testing.assert_allclose(got.token_logprobs_N[outside_N], ref.token_logprobs_N[outside_N], rtol=0, atol=ATOL)
    assert (got.token_logprobs_N[outside_N] < got.topk_logprobs_NK[outside_N, -1] + ATOL).all()


def test_info_matches_transformers_engine(vllm_engine, hf_engine):
    assert vllm_engine.healthy()
    assert vllm_engine.info.engine == "vllm"
    assert vllm_engine.info.vocab_size == hf_engine.info.vocab_size
    assert vllm_engine.info.tokenizer_fingerprint == hf_engine.info.tokenizer_fingerprint
    assert vllm_engine.info.max_seq_len == MAX_SEQ_LEN


def test_concurrent_calls_match_serial(loop, vllm_engine):
    rng = np.random.default_rng(1)
    vocab = vllm_engine.info.vocab_size
    batches = []
    for i, k in enumerate([1, 5, 32, 8, 3, 16]):
        lengths = rng.integers(2, 200, size=1 + i)
        batches.append(
            ScoreBatch.from_sequences([(rng.integers(0, vocab, n), int(rng.integers(1, n))) for n in lengths], top_k=k)
        )
    serial = [loop.run(vllm_engine.score(b)) for b in batches]

    async def all_at_once():
        return await asyncio.gather(*(vllm_engine.score(b) for b in batches))

    concurrent = loop.run(all_at_once())
    for b, s, c in zip(batches, serial, concurrent, strict=True):
        np.testing.assert_array_equal(c.num_scored_B, b.num_scored_B)
        np.testing.assert_allclose(c.token_logprobs_N, s.token_logprobs_N, rtol=0, atol=ATOL)
        np.testing.assert_allclose(c.topk_logprobs_NK, s.topk_logprobs_NK, rtol=0, atol=ATOL)
        # ids where the serial run's logprobs leave no near-tie with the neighbours inside the top-K
        gaps = -np.diff(s.topk_logprobs_NK, axis=1)
        clear = np.ones_like(s.topk_ids_NK, dtype=bool)
        clear[:, 1:] &= gaps > 2 * ATOL
        clear[:, :-1] &= gaps > 2 * ATOL
        clear[:, -1] = False  # the (K+1)-th logprob is unknown here
        np.testing.assert_array_equal(c.topk_ids_NK[clear], s.topk_ids_NK[clear])


# ----------------------------------------------------------------------------------------------------------
# the raw-tensor hook
# ----------------------------------------------------------------------------------------------------------


def test_scoring_keeps_raw_tensors_and_builds_no_logprob_objects(loop, vllm_engine, monkeypatch):
    calls = []
    stock_append = vllm_logprobs.append_logprobs_for_next_position

    def counting_append(*args, **kwargs):  # vLLM builds one position's Logprob objects here
        calls.append(1)
        return stock_append(*args, **kwargs)

    monkeypatch.setattr(vllm_logprobs, "append_logprobs_for_next_position", counting_append)
    vocab = vllm_engine.info.vocab_size
    batch = ScoreBatch.from_sequences([(np.arange(30) % vocab, 1), (np.arange(50) % vocab, 10), ([5, 6], 1)], top_k=8)
    before = HOOK.raw_updates
    loop.run(vllm_engine.score(batch))
    assert HOOK.raw_updates == before + 3, "each sequence's prompt logprobs should arrive as one raw tensor"
    assert calls == [], "the scoring path must not build per-position Logprob objects"

    # A request without our marker still gets vLLM's stock objects: the hook is inert for it.
    async def stock_request():
        params = SamplingParams(max_tokens=1, prompt_logprobs=2, detokenize=False)
        async for out in vllm_engine.llm.generate(tokens_input(list(range(10, 20))), params, request_id="stock-1"):
            final = out
        return final

    out = loop.run(stock_request())
    assert HOOK.raw_updates == before + 3
    assert len(calls) == 9 and isinstance(out.prompt_logprobs[1], dict)


def _drop_tensors(self, prompt_logprobs_tensors):
    pass


def _truncate_columns(self, prompt_logprobs_tensors):
    t = prompt_logprobs_tensors
    self.prompt_logprobs.append(t._replace(logprob_token_ids=t.logprob_token_ids[:, :2], logprobs=t.logprobs[:, :2]))


def _drop_first_row(self, prompt_logprobs_tensors):
    t = prompt_logprobs_tensors
    self.prompt_logprobs.append(t._replace(logprob_token_ids=t.logprob_token_ids[1:], logprobs=t.logprobs[1:]))


def _shift_rows(self, prompt_logprobs_tensors):  # same shape, rows off by one
    t = prompt_logprobs_tensors
    roll = dict(shifts=1, dims=0)
    self.prompt_logprobs.append(
        t._replace(logprob_token_ids=t.logprob_token_ids.roll(**roll), logprobs=t.logprobs.roll(**roll))
    )


@pytest.mark.parametrize("broken_update", [_drop_tensors, _truncate_columns, _drop_first_row, _shift_rows])
def test_start_up_self_check_catches_a_silent_change(loop, vllm_engine, monkeypatch, broken_update):
    """What a vLLM change that keeps the method's name and signature could do: the self-check must fail."""
    monkeypatch.setattr(LogprobsProcessor, "_update_prompt_logprobs", broken_update)
    with pytest.raises(RuntimeError, match="self-check failed"):
        loop.run(vllm_engine._self_check())


# ----------------------------------------------------------------------------------------------------------
# version guard
# ----------------------------------------------------------------------------------------------------------


def test_unsupported_vllm_version_fails_before_starting(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"vllm 0\.99\.0 is not supported .*0\.32\.0"):
        check_vllm_compat()
    engine = VLLMEngine(settings_for(tiny_model_dir, "vllm"))
    with pytest.raises(RuntimeError, match="not supported"):
        asyncio.run(engine.start())
    assert engine.llm is None and not engine.healthy()

    monkeypatch.setenv(ALLOW_UNTESTED_ENV, "1")  # explicit opt-in: the hook checks still run
    check_vllm_compat()


def _other_signature(self, tensors, extra):
    pass


def _not_routed(self, output):
    pass


@pytest.mark.parametrize(
    "attr,value,message",
    [
        ("_update_prompt_logprobs", None, "_update_prompt_logprobs is missing"),
        ("_update_prompt_logprobs", _other_signature, "_update_prompt_logprobs.* changed signature"),
        ("from_new_request", None, "from_new_request is missing"),
        ("update_from_output", _not_routed, "no longer routes prompt logprobs"),
    ],
)
def test_changed_hook_points_fail_loudly(monkeypatch, attr, value, message):
    if value is None:
        monkeypatch.delattr(LogprobsProcessor, attr)
    else:
        monkeypatch.setattr(LogprobsProcessor, attr, value)
    with pytest.raises(RuntimeError, match=message):
        check_vllm_compat()


def test_generate_matches_hf_greedy_and_respects_n_and_limits(loop, vllm_engine, hf_engine):
    """SeqKD's /v1/generate on vLLM: greedy completions equal the transformers engine's, n per prompt, EOS or limit."""
    prompts = [[2, 10, 11, 12], [2, 40, 41]]
    got = loop.run(vllm_engine.generate(prompts, 2, 12, 0.0, 1.0, 0))
    ref = loop.run(hf_engine.generate(prompts, 2, 12, 0.0, 1.0, 0))
    assert len(got) == 4
    assert got == ref, (got, ref)
    sampled = loop.run(vllm_engine.generate(prompts, 3, 8, 1.0, 1.0, 1))
    eos = vllm_engine._eos
    assert len(sampled) == 6 and all(1 <= len(c) <= 8 + 1 and (len(c) <= 8 or c[-1] == eos) for c in sampled)
