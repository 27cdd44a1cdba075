"""Per-token distillation losses: OPD, AOPD and the ablation variants of shared/spec/method.md.

Two entry points with identical semantics:

- `token_losses(student_logits_NV, ...)` takes the materialised student logits.
- `fused_token_losses(hidden_ND, lm_head_weight_VD, ...)` takes the last hidden states and the lm_head weight
  and never materialises the [N, V] logits: they are computed chunk by chunk in forward and again in backward,
  so the extra memory is O(chunk_size * V) instead of O(N * V). Same per-token losses, same gradients.

Both reduce the full-vocabulary logits to a few per-position statistics (`LogitStats`: the log-normaliser, the
logit of the sampled token, the K logits at the teacher's top-k ids, and two detached diagnostics) and share one
small-tensor implementation of advantage, mask, policy-gradient part and divergence, `_losses_from_stats`. The
full vocabulary enters the loss only through the log-normaliser.

Everything returned is per token. Reduction is the caller's: a token mean is `loss_N.sum() / N_total`, a sequence
mean averages `loss_N` within each completion first. The `metric_sums` are sums over the N positions passed
in, so a step's micro-batches and ranks add up by name; `metrics` gives this call's means and quantiles.

Run the tests with `python -m pytest tests/test_losses*.py -q`, the memory benchmark with
`python bench/loss_memory.py`.
"""

# N = scored completion positions (packed), K = teacher top-k, V = vocabulary, D = hidden size,
# C = positions in one chunk (LossConfig.chunk_size), Q = number of advantage quantiles, B = histogram bins

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "MODES",
    "SUPPORT_NORMS",
    "TEACHER_LOGPROB_FLOOR",
    "LossConfig",
    "LogitStats",
    "TokenLosses",
    "token_losses",
    "fused_token_losses",
    "logit_stats",
    "fused_logit_stats",
    "advantage_histogram",
]

MODES = ("opd", "aopd", "aopd_add", "gkd", "aopd_zero", "aopd_acc", "exopd")
SUPPORT_NORMS = ("both", "teacher")

# A teacher (or reference) log-probability of the sampled token of -inf (the teacher rules the token out) would
# make the advantage -inf and the loss NaN. It is raised to this floor instead: the token still gets a very large
# negative advantage, and the fraction of floored positions is logged as `teacher/floored_frac`.
TEACHER_LOGPROB_FLOOR = -1.0e4

_ADV_QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


# Positions per chunk of the fused lm_head + loss when the config leaves it open. On a CPU small chunks keep the
# [chunk, V] temporaries in cache (128 measured fastest in bench/loss_memory.py); a GPU needs thousands of rows
# per matmul to be busy (2,048 x 151,936 float32 logits is 1.2 GB, against the 80-141 GB it has).
DEFAULT_CHUNK_SIZE = {"cpu": 128, "cuda": 2048}


def resolve_chunk_size(chunk_size: int | None, device: torch.device) -> int:
    return chunk_size or DEFAULT_CHUNK_SIZE.get(device.type, DEFAULT_CHUNK_SIZE["cpu"])


@dataclass(frozen=True)
class LossConfig:
    """Which per-token loss to compute, and its knobs. Validated on construction."""

    mode: str = "aopd"
    """One of MODES. `opd`: policy gradient with the K1 advantage everywhere. `aopd`: the divergence replaces the
    policy gradient where p_T(y) - p_S(y) <= tau. `aopd_add`: policy gradient everywhere plus the divergence where
    masked. `gkd`: the divergence everywhere. `aopd_zero`: divergence where |A| <= zero_eps. `aopd_acc`: divergence
    where A <= 0 and the trajectory's answer is wrong (needs `correct_N`). `exopd`: policy gradient with the
    extrapolated advantage lam * (lp_T - lp_R) - (lp_S - lp_R) (needs `ref_token_logprobs_N`)."""

    tau: float = 0.0
    """AOPD threshold on p_T(y) - p_S(y), meaningful in [-1, 1]: below -1 never intervenes (= opd), at or above 1
    always intervenes (= gkd). At exactly 0 the mask is computed as A <= 0, the same set without exp underflow."""

    beta: float = 0.0
    """Generalised JSD interpolation in TRL's convention: 0 = forward KL(p~T || p~S), 1 = reverse KL(p~S || p~T),
    in between beta * KL(p~T || M) + (1 - beta) * KL(p~S || M) with M = beta * p~T + (1 - beta) * p~S."""

    zero_eps: float = 1e-3
    """|A| <= zero_eps counts as a zero advantage: the `aopd_zero` mask and the `adv/frac_zero` metric."""

    lam: float = 1.25
    """ExOPD extrapolation factor; lam = 1 gives OPD."""

    support_norm: str = "both"
    """`both`: teacher and student are both renormalised on the teacher's top-k support S (a sampled token outside S
    gets no push from the divergence). `teacher`: only the teacher is renormalised; the student keeps its
    full-vocabulary log-probabilities, D = sum_{v in S} p~T(v) (log p~T(v) - lp_S(v)), which pushes every token
    outside S down by its own p_S(v). `teacher` is defined for beta = 0 only."""

    chunk_size: int | None = None  # None: DEFAULT_CHUNK_SIZE for the hidden states' device type
    """Positions per chunk in `fused_token_losses`: the [C, V] float32 logits of one chunk are the largest
    temporaries (two in forward, one in backward; 74 MiB each at C = 128, V = 151936). Each chunk also reads and
    writes the [V, D] lm_head gradient once, so on a GPU, where memory is less tight, a larger chunk (e.g. 1024)
    makes fewer of those passes. Ignored by `token_losses`."""

    is_cap: float = 2.0
    """Cap of the truncated importance weight min(exp(lp_S(y) - lp_behaviour(y)), is_cap) applied (detached) to the
    policy-gradient part when `behaviour_logprobs_N` is given, for rollouts sampled by a slightly older policy or a
    different engine (truncated importance sampling, as TIS in verl; 2.0 is its usual cap). Absent behaviour
    log-probabilities the update is plain on-policy and this is unused."""

    def __post_init__(self) -> None:
        if self.mode == "seqkd":
            raise ValueError(
                "mode='seqkd' is supervised fine-tuning on teacher completions, not a per-token loss over student "
                "rollouts; train it with plain cross-entropy, or pick one of " + ", ".join(MODES)
            )
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not a loss mode; use one of {', '.join(MODES)}")
        if self.support_norm not in SUPPORT_NORMS:
            raise ValueError(f"support_norm={self.support_norm!r} is unknown; use 'both' (default) or 'teacher'")
        for name in ("tau", "beta", "zero_eps", "lam", "is_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(
                f"beta={self.beta} is outside [0, 1]; TRL's convention: 0 = forward KL, 1 = reverse KL, "
                "in between the generalised JSD"
            )
        if self.support_norm == "teacher" and self.beta != 0.0:
            raise ValueError(
                f"support_norm='teacher' is defined for forward KL only, but beta={self.beta}; "
                "set beta=0 or use support_norm='both'"
            )
        if self.zero_eps < 0:
            raise ValueError(f"zero_eps={self.zero_eps} must be >= 0 (it is a tolerance on |A|)")
        if self.is_cap <= 0:
            raise ValueError(f"is_cap={self.is_cap} must be > 0 (a cap on the importance weight; TIS uses 2.0)")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0
        ):
            raise ValueError(
                f"chunk_size={self.chunk_size!r} must be a positive integer (positions per chunk of the fused "
                "lm_head, e.g. 128)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


class LogitStats(NamedTuple):
    """What the losses need from the full-vocabulary student logits z_NV, per position.

    The first three are differentiable with respect to the logits; the last two are detached diagnostics.
    """

    lse_N: torch.Tensor
    """log sum_v exp(z_v): the full-vocabulary log-normaliser."""
    sampled_logit_N: torch.Tensor
    """z at the sampled token y."""
    support_logits_NK: torch.Tensor
    """z at the teacher's top-k ids (0 where the teacher's entry is -inf padding)."""
    entropy_N: torch.Tensor
    """Full-vocabulary entropy of softmax(z) (detached)."""
    top1_logit_N: torch.Tensor
    """max_v z_v (detached); the student's top-1 probability is exp(top1_logit - lse)."""


@dataclass
class TokenLosses:
    """Per-token results of `token_losses` / `fused_token_losses`."""

    loss_N: torch.Tensor
    """The loss to reduce and backpropagate (differentiable)."""
    mask_N: torch.Tensor
    """bool: where the divergence replaced (or, for aopd_add, was added to) the policy gradient."""
    advantage_N: torch.Tensor
    """The (detached) advantage A."""
    pg_loss_N: torch.Tensor
    """-w * A * lp_S(y) at every position, w the importance weight or 1 (detached; enters loss where not masked,
    and everywhere for aopd_add)."""
    div_loss_N: torch.Tensor
    """D_beta on the teacher's support at every position, computed for every mode (detached; enters loss only where
    masked). For opd / exopd it is a diagnostic: how far the student is from the teacher on the support."""
    metric_sums: dict[str, torch.Tensor]
    """Namespaced 0-dim float32 tensors, detached: sums over the N positions, so micro-batches and ranks add up
    by name and the step's mean is the total over the step's token count (see `_metric_sums`)."""

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        """Means over the N positions (0 when N = 0) and the advantage quantiles (adv/p05 ... adv/p95)."""
        n = max(int(self.advantage_N.shape[0]), 1)
        means = {k: v / n for k, v in self.metric_sums.items()}
        return means | advantage_quantiles(self.advantage_N)


def advantage_quantiles(advantage_N: torch.Tensor) -> dict[str, torch.Tensor]:
    """adv/p05 ... adv/p95 as float32 0-dim tensors (zeros when N = 0)."""
    if advantage_N.shape[0] > 0:
        q_Q = torch.tensor(_ADV_QUANTILES, dtype=advantage_N.dtype, device=advantage_N.device)
        quantiles_Q = torch.quantile(advantage_N.detach(), q_Q).float()
    else:
        quantiles_Q = advantage_N.new_zeros(len(_ADV_QUANTILES), dtype=torch.float32)
    return {f"adv/p{round(q * 100):02d}": v for q, v in zip(_ADV_QUANTILES, quantiles_Q, strict=True)}


# ---------------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------------


def token_losses(
    student_logits_NV: torch.Tensor,
    sampled_ids_N: torch.Tensor,
    teacher_token_logprobs_N: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    cfg: LossConfig,
    *,
    ref_token_logprobs_N: torch.Tensor | None = None,
    correct_N: torch.Tensor | None = None,
    behaviour_logprobs_N: torch.Tensor | None = None,
) -> TokenLosses:
    """Per-token distillation losses from materialised student logits.

    Args:
        student_logits_NV: [N, V] student logits at the scored positions (any float dtype; computed in float32,
            or float64 if given float64).
        sampled_ids_N: [N] int, the token the student sampled at each position.
        teacher_token_logprobs_N: [N] teacher full-vocabulary log-probability of the sampled token, also when it is
            outside the top-k. -inf is raised to TEACHER_LOGPROB_FLOOR.
        teacher_topk_ids_NK: [N, K] int, the teacher's top-k ids S. Ids at -inf (padding) entries are ignored and
            may be anything, e.g. -1.
        teacher_topk_logprobs_NK: [N, K] teacher full-vocabulary log-probabilities at S; -inf marks padding (the
            entry is not part of S). A row of only padding has an empty support and zero divergence.
        cfg: the loss configuration.
        ref_token_logprobs_N: [N] reference-model log-probability of the sampled token; required by `exopd`.
        correct_N: [N] bool, whether the trajectory this position belongs to ends in a correct answer; required by
            `aopd_acc`.
        behaviour_logprobs_N: [N] log-probability of the sampled token under the policy that sampled it; if given,
            the policy-gradient part is weighted by min(exp(lp_S(y) - behaviour), cfg.is_cap), detached.

    Returns:
        TokenLosses with per-token `loss_N` (differentiable), `mask_N`, `advantage_N`, `pg_loss_N`, `div_loss_N`
        and `metric_sums` (`metrics` for means). Reduction over tokens / sequences is the caller's.
    """
    _check_inputs(
        student_logits_NV.shape[0], sampled_ids_N, teacher_token_logprobs_N, teacher_topk_ids_NK,
        teacher_topk_logprobs_NK, cfg, ref_token_logprobs_N, correct_N, behaviour_logprobs_N,
    )
    if student_logits_NV.dim() != 2:
        raise ValueError(f"student_logits_NV must be [N, V], got shape {tuple(student_logits_NV.shape)}")
    support_valid_NK, support_ids_NK = _support(teacher_topk_ids_NK, teacher_topk_logprobs_NK)
    stats = logit_stats(student_logits_NV, sampled_ids_N.long(), support_ids_NK)
    return _losses_from_stats(
        stats, teacher_token_logprobs_N, teacher_topk_logprobs_NK, support_valid_NK, cfg,
        ref_token_logprobs_N, correct_N, behaviour_logprobs_N,
    )


def fused_token_losses(
    hidden_ND: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    sampled_ids_N: torch.Tensor,
    teacher_token_logprobs_N: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    cfg: LossConfig,
    *,
    ref_token_logprobs_N: torch.Tensor | None = None,
    correct_N: torch.Tensor | None = None,
    behaviour_logprobs_N: torch.Tensor | None = None,
) -> TokenLosses:
    """`token_losses` with student_logits_NV = hidden_ND @ lm_head_weight_VD.T, never materialising [N, V].

    Same per-token losses and the same gradients with respect to `hidden_ND` and `lm_head_weight_VD` (the weight
    may be frozen, or tied to the embeddings: autograd routes its gradient as usual). The logits are computed
    `cfg.chunk_size` positions at a time, in forward and again in backward, so the extra memory is
    O(chunk_size * V), never O(N * V). When the weight needs a gradient and is not float32 / float64, its gradient
    is summed over chunks in a float32 [V, D] accumulator (through a [V, D] temporary in the weight's dtype) and
    cast once at the end: O(V * D), independent of N. `hidden_ND` and
    `lm_head_weight_VD` must share a dtype. No lm_head bias, no logit soft-capping.

    Other arguments and the result: see `token_losses`.
    """
    _check_inputs(
        hidden_ND.shape[0], sampled_ids_N, teacher_token_logprobs_N, teacher_topk_ids_NK,
        teacher_topk_logprobs_NK, cfg, ref_token_logprobs_N, correct_N, behaviour_logprobs_N,
    )
    if hidden_ND.dim() != 2 or lm_head_weight_VD.dim() != 2 or hidden_ND.shape[1] != lm_head_weight_VD.shape[1]:
        raise ValueError(
            f"hidden_ND {tuple(hidden_ND.shape)} and lm_head_weight_VD {tuple(lm_head_weight_VD.shape)} must be "
            "[N, D] and [V, D] with the same D; pass the last hidden states at the scored positions and "
            "lm_head.weight"
        )
    if hidden_ND.dtype != lm_head_weight_VD.dtype:
        raise ValueError(
            f"hidden_ND is {hidden_ND.dtype} but lm_head_weight_VD is {lm_head_weight_VD.dtype}; cast the hidden "
            "states to the lm_head dtype, as the model's own forward does"
        )
    support_valid_NK, support_ids_NK = _support(teacher_topk_ids_NK, teacher_topk_logprobs_NK)
    chunk = resolve_chunk_size(cfg.chunk_size, hidden_ND.device)
    stats = fused_logit_stats(hidden_ND, lm_head_weight_VD, sampled_ids_N.long(), support_ids_NK, chunk)
    return _losses_from_stats(
        stats, teacher_token_logprobs_N, teacher_topk_logprobs_NK, support_valid_NK, cfg,
        ref_token_logprobs_N, correct_N, behaviour_logprobs_N,
    )


def advantage_histogram(
    advantage_N: torch.Tensor, num_bins: int = 40, limit: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram of advantages over [-limit, limit] for logging; values outside land in the end bins.

    Returns (counts_B, edges_B1): float32 counts of the B = num_bins bins and their B + 1 edges, on the CPU.
    """
    if num_bins <= 0 or not limit > 0:
        raise ValueError(f"num_bins={num_bins} and limit={limit} must both be positive")
    clipped_N = advantage_N.detach().float().cpu().clamp(-limit, limit)
    counts_B = torch.histc(clipped_N, bins=num_bins, min=-limit, max=limit)
    edges_B1 = torch.linspace(-limit, limit, num_bins + 1)
    return counts_B, edges_B1


# ---------------------------------------------------------------------------------------------------------------
# Logit statistics: materialised and chunked
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact references, gradcheck); everything else is computed in float32."""
    return torch.promote_types(dtype, torch.float32)


def logit_stats(
    student_logits_NV: torch.Tensor, sampled_ids_N: torch.Tensor, support_ids_NK: torch.Tensor
) -> LogitStats:
    """`LogitStats` from materialised logits; differentiable through ordinary autograd.

    `support_ids_NK` must all be valid vocabulary ids: padding entries replaced by any valid id (their statistics
    are ignored downstream), as `token_losses` does.
    """
    z_NV = student_logits_NV.to(_compute_dtype(student_logits_NV.dtype))
    lse_N = torch.logsumexp(z_NV, dim=-1)
    sampled_logit_N = z_NV.gather(1, sampled_ids_N[:, None]).squeeze(1)
    support_logits_NK = z_NV.gather(1, support_ids_NK)
    with torch.no_grad():
        z_det_NV = z_NV.detach()
        entropy_N = torch.special.entr(torch.softmax(z_det_NV, dim=-1)).sum(-1)
        top1_logit_N = z_det_NV.amax(-1)
    return LogitStats(lse_N, sampled_logit_N, support_logits_NK, entropy_N, top1_logit_N)


def fused_logit_stats(
    hidden_ND: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    sampled_ids_N: torch.Tensor,
    support_ids_NK: torch.Tensor,
    chunk_size: int,
) -> LogitStats:
    """`LogitStats` of hidden_ND @ lm_head_weight_VD.T, computed chunk by chunk (see `_ChunkedLogitStats`).

    Same contract as `logit_stats`; only the first three statistics are differentiable.
    """
    return LogitStats(
        *_ChunkedLogitStats.apply(hidden_ND, lm_head_weight_VD, sampled_ids_N, support_ids_NK, chunk_size)
    )


class _ChunkBuffers:
    """[C, V] work buffers allocated once per forward / backward and reused by every chunk.

    Reuse matters on the CPU: a fresh 100 MB tensor per chunk is a fresh mmap, and its page faults cost as much
    as the arithmetic. With a low precision model (bfloat16) the chunk's logits are still produced in float32:
    rounding them to bfloat16 first (what `lm_head(hidden).float()` does) moves a logit near 30 by up to 0.06,
    and lp_S(y) with it, which is the quantity AOPD's mask and the importance ratio are decided on. On CUDA the
    matmul writes float32 directly (`torch.mm(..., out_dtype=torch.float32)`, float32 accumulation as before);
    elsewhere, where that kernel does not exist, the inputs are upcast (bfloat16 -> float32 is exact), with one
    float32 copy of the weight per forward / backward. Backward works the same way: on CUDA `lowp_CV` holds
    grad_z cast to the weight's dtype for the two tensor-core matmuls, and the weight gradient is accumulated
    by `addmm(..., out_dtype=float32)` straight into its float32 sum; elsewhere both matmuls run in float32 on
    the float32 grad_z. Either way no [V, D] temporary is made per chunk, and no chunk's weight gradient is
    rounded to the weight's dtype before it is summed.
    """

    def __init__(self, rows: int, weight_VD: torch.Tensor, dtype: torch.dtype, n_work: int) -> None:
        shape = (rows, weight_VD.shape[0])
        self.work_CV = [weight_VD.new_empty(shape, dtype=dtype) for _ in range(n_work)]
        self.lowp = weight_VD.dtype != dtype
        cuda = weight_VD.device.type == "cuda"
        self.lowp_CV = weight_VD.new_empty(shape) if self.lowp and cuda else None
        self.weight_hi_VD = weight_VD.to(dtype) if self.lowp and not cuda else None

    def logits(self, hidden_CD: torch.Tensor, weight_VD: torch.Tensor) -> torch.Tensor:
        """z = h W^T of one chunk in the compute dtype (float32 output, see above), in the first work buffer,
        ours to overwrite."""
        rows = hidden_CD.shape[0]
        z_CV = self.work_CV[0][:rows]
        if not self.lowp:
            return torch.mm(hidden_CD, weight_VD.T, out=z_CV)
        if self.weight_hi_VD is None:  # CUDA
            return z_CV.copy_(torch.mm(hidden_CD, weight_VD.T, out_dtype=z_CV.dtype))
        return torch.mm(hidden_CD.to(z_CV.dtype), self.weight_hi_VD.T, out=z_CV)

    def backward_matmuls(self, grad_z_CV, hidden_CD, weight_VD, grad_hidden_CD, grad_weight_VD) -> None:
        """grad_h = grad_z W into `grad_hidden_CD` (if given) and grad_W += grad_z^T h into the float32 (or
        float64) sum `grad_weight_VD` (if given); grad_z is this chunk's gradient in the compute dtype."""
        if not self.lowp:
            if grad_hidden_CD is not None:
                torch.mm(grad_z_CV, weight_VD, out=grad_hidden_CD)
            if grad_weight_VD is not None:
                grad_weight_VD.addmm_(grad_z_CV.T, hidden_CD)
        elif self.weight_hi_VD is None:  # CUDA: low precision operands, float32 accumulation and output
            grad_z_lo_CV = self.lowp_CV[: grad_z_CV.shape[0]].copy_(grad_z_CV)
            if grad_hidden_CD is not None:
                torch.mm(grad_z_lo_CV, weight_VD, out=grad_hidden_CD)
            if grad_weight_VD is not None:
                torch.addmm(grad_weight_VD, grad_z_lo_CV.T, hidden_CD, out_dtype=grad_weight_VD.dtype,
                            out=grad_weight_VD)
        else:  # no such kernel: float32 operands ([C, D] upcasts only; the weight's copy is kept from forward)
            if grad_hidden_CD is not None:
                grad_hidden_CD.copy_(torch.mm(grad_z_CV, self.weight_hi_VD))
            if grad_weight_VD is not None:
                grad_weight_VD.addmm_(grad_z_CV.T, hidden_CD.to(grad_z_CV.dtype))


class _ChunkedLogitStats(torch.autograd.Function):
    """(hidden_ND, weight_VD) -> LogitStats without an [N, V] tensor.

    Forward, per chunk of C positions: z = h W^T, gather z at y and at S, then lse and entropy from
    p_u = exp(z - max z) (two [C, V] buffers). Backward, per chunk: recompute z, turn it in place into
    grad_z = g_lse * softmax(z) + scatter(g_sampled at y) + scatter_add(g_support at S) (one [C, V] buffer;
    scatter_add accumulates duplicate ids), then grad_h = grad_z W and grad_W += grad_z^T h.
    """

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, sampled_ids_N, support_ids_NK, chunk_size):
        n, k = support_ids_NK.shape
        dtype = _compute_dtype(hidden_ND.dtype)
        lse_N = hidden_ND.new_empty(n, dtype=dtype)
        sampled_logit_N = hidden_ND.new_empty(n, dtype=dtype)
        support_logits_NK = hidden_ND.new_empty(n, k, dtype=dtype)
        entropy_N = hidden_ND.new_empty(n, dtype=dtype)
        top1_logit_N = hidden_ND.new_empty(n, dtype=dtype)
        buffers = _ChunkBuffers(min(chunk_size, n), weight_VD, dtype, n_work=2)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            z_CV = buffers.logits(hidden_ND[start:stop], weight_VD)
            sampled_logit_N[start:stop] = z_CV.gather(1, sampled_ids_N[start:stop, None]).squeeze(1)
            support_logits_NK[start:stop] = z_CV.gather(1, support_ids_NK[start:stop])
            max_C = z_CV.amax(-1)
            z_CV.sub_(max_C[:, None])  # z' = z - max z, so p_u = exp(z') <= 1
            p_u_CV = torch.exp(z_CV, out=buffers.work_CV[1][: stop - start])
            sum_C = p_u_CV.sum(-1)
            # sum p_u z' (nansum: where z' = -inf, p_u = 0 and the product is 0, not NaN)
            plogp_C = z_CV.mul_(p_u_CV).nansum(-1)
            log_sum_C = torch.log(sum_C)
            lse_N[start:stop] = max_C + log_sum_C
            # H = -sum (p_u / s) log(p_u / s) = log s - (sum p_u z') / s
            entropy_N[start:stop] = log_sum_C - plogp_C / sum_C
            top1_logit_N[start:stop] = max_C
        del buffers
        ctx.save_for_backward(hidden_ND, weight_VD, sampled_ids_N, support_ids_NK, lse_N)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropy_N, top1_logit_N)
        return lse_N, sampled_logit_N, support_logits_NK, entropy_N, top1_logit_N

    @staticmethod
    def backward(ctx, g_lse_N, g_sampled_N, g_support_NK, _g_entropy_N, _g_top1_N):
        hidden_ND, weight_VD, sampled_ids_N, support_ids_NK, lse_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, k = support_ids_NK.shape
        dtype = lse_N.dtype
        g_lse_N = lse_N.new_zeros(n) if g_lse_N is None else g_lse_N
        g_sampled_N = lse_N.new_zeros(n) if g_sampled_N is None else g_sampled_N
        g_support_NK = lse_N.new_zeros(n, k) if g_support_NK is None else g_support_NK

        grad_hidden_ND = hidden_ND.new_empty(hidden_ND.shape) if need_hidden else None
        grad_weight_VD = None
        if need_weight:
            # Summed over chunks in float32 (or float64) and cast once at the end.
            acc_dtype = weight_VD.dtype if weight_VD.dtype in (torch.float32, torch.float64) else torch.float32
            grad_weight_VD = torch.zeros(weight_VD.shape, dtype=acc_dtype, device=weight_VD.device)
        buffers = _ChunkBuffers(min(ctx.chunk_size, n), weight_VD, dtype, n_work=1)
        for start in range(0, n, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, n)
            hidden_CD = hidden_ND[start:stop]
            grad_z_CV = buffers.logits(hidden_CD, weight_VD)
            grad_z_CV.sub_(lse_N[start:stop, None]).exp_()  # softmax(z), in place
            grad_z_CV.mul_(g_lse_N[start:stop, None])
            grad_z_CV.scatter_add_(1, sampled_ids_N[start:stop, None], g_sampled_N[start:stop, None])
            grad_z_CV.scatter_add_(1, support_ids_NK[start:stop], g_support_NK[start:stop])
            buffers.backward_matmuls(grad_z_CV, hidden_CD, weight_VD,
                                     grad_hidden_ND[start:stop] if need_hidden else None, grad_weight_VD)
        del buffers
        if grad_weight_VD is not None:
            grad_weight_VD = grad_weight_VD.to(weight_VD.dtype)
        return grad_hidden_ND, grad_weight_VD, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# The losses, on small per-position tensors
# ---------------------------------------------------------------------------------------------------------------


def _support(
    teacher_topk_ids_NK: torch.Tensor, teacher_topk_logprobs_NK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(support_valid_NK, support_ids_NK): which top-k entries belong to S, and ids safe to gather with."""
    support_valid_NK = teacher_topk_logprobs_NK > float("-inf")
    support_ids_NK = torch.where(support_valid_NK, teacher_topk_ids_NK, 0).long()
    return support_valid_NK, support_ids_NK


def _masked_log_softmax(x_NK: torch.Tensor, valid_NK: torch.Tensor) -> torch.Tensor:
    """log_softmax over the valid entries of each row; 0 at invalid entries and on rows with none valid.

    Invalid entries are filled with the dtype's most negative finite value rather than -inf, so that a row with
    no valid entry has a finite logsumexp and backward never sees exp(-inf - -inf).
    """
    x_filled_NK = torch.where(valid_NK, x_NK, torch.finfo(x_NK.dtype).min)
    lse_N1 = torch.logsumexp(x_filled_NK, dim=-1, keepdim=True)
    return torch.where(valid_NK, x_filled_NK - lse_N1, 0.0)


def _support_divergence(
    support_logits_NK: torch.Tensor,
    lse_N: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    support_valid_NK: torch.Tensor,
    cfg: LossConfig,
) -> torch.Tensor:
    """D_beta(p~T, p~S) on the teacher's support, per position (see LossConfig.beta / support_norm)."""
    n, k = support_logits_NK.shape
    if k == 0:
        return support_logits_NK.new_zeros(n) + 0.0 * lse_N  # keeps the graph connected
    log_pt_NK = _masked_log_softmax(teacher_topk_logprobs_NK, support_valid_NK)
    pt_NK = torch.where(support_valid_NK, torch.exp(log_pt_NK), 0.0)
    if cfg.support_norm == "teacher":
        # The student keeps its full-vocabulary log-probabilities lp_S(v) = z_v - lse.
        lp_s_NK = torch.where(support_valid_NK, support_logits_NK - lse_N[:, None], 0.0)
        return (pt_NK * (log_pt_NK - lp_s_NK)).sum(-1)
    log_ps_NK = _masked_log_softmax(support_logits_NK, support_valid_NK)
    ps_NK = torch.where(support_valid_NK, torch.exp(log_ps_NK), 0.0)
    if cfg.beta == 0.0:
        terms_NK = pt_NK * (log_pt_NK - log_ps_NK)
    elif cfg.beta == 1.0:
        terms_NK = ps_NK * (log_ps_NK - log_pt_NK)
    else:
        # log M in log space, so that M is never log(0) where both distributions underflow.
        log_m_NK = torch.logaddexp(math.log(cfg.beta) + log_pt_NK, math.log1p(-cfg.beta) + log_ps_NK)
        terms_NK = cfg.beta * pt_NK * (log_pt_NK - log_m_NK) + (1.0 - cfg.beta) * ps_NK * (log_ps_NK - log_m_NK)
    return terms_NK.sum(-1)  # padding entries contribute 0: p~ = 0 there and the log terms are finite


def _intervention_mask(
    advantage_N: torch.Tensor,
    teacher_prob_N: torch.Tensor,
    student_prob_N: torch.Tensor,
    correct_N: torch.Tensor | None,
    cfg: LossConfig,
) -> torch.Tensor:
    """m_N: where the divergence replaces (aopd_add: joins) the policy gradient; see the table in method.md."""
    if cfg.mode in ("opd", "exopd"):
        return torch.zeros_like(advantage_N, dtype=torch.bool)
    if cfg.mode == "gkd":
        return torch.ones_like(advantage_N, dtype=torch.bool)
    if cfg.mode in ("aopd", "aopd_add"):
        if cfg.tau == 0.0:
            # Same set as p_T - p_S <= 0, but immune to both probabilities underflowing to 0.
            return advantage_N <= 0
        return (teacher_prob_N - student_prob_N) <= cfg.tau
    if cfg.mode == "aopd_zero":
        return advantage_N.abs() <= cfg.zero_eps
    if cfg.mode == "aopd_acc":
        return (advantage_N <= 0) & ~correct_N.to(device=advantage_N.device, dtype=torch.bool)
    raise AssertionError(cfg.mode)  # LossConfig validates the mode


def _losses_from_stats(
    stats: LogitStats,
    teacher_token_logprobs_N: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    support_valid_NK: torch.Tensor,
    cfg: LossConfig,
    ref_token_logprobs_N: torch.Tensor | None,
    correct_N: torch.Tensor | None,
    behaviour_logprobs_N: torch.Tensor | None,
) -> TokenLosses:
    """Advantage, mask, policy-gradient part, divergence and metrics from the per-position statistics."""
    dtype = stats.lse_N.dtype
    lp_s_y_N = stats.sampled_logit_N - stats.lse_N  # differentiable
    lp_s_y_det_N = lp_s_y_N.detach()
    lp_t_y_raw_N = teacher_token_logprobs_N.to(dtype)
    lp_t_y_N = lp_t_y_raw_N.clamp(min=TEACHER_LOGPROB_FLOOR)

    if cfg.mode == "exopd":
        lp_r_y_N = ref_token_logprobs_N.to(dtype).clamp(min=TEACHER_LOGPROB_FLOOR)
        advantage_N = cfg.lam * (lp_t_y_N - lp_r_y_N) - (lp_s_y_det_N - lp_r_y_N)
    else:
        advantage_N = lp_t_y_N - lp_s_y_det_N

    weighted_adv_N = advantage_N
    is_weight_N = None
    if behaviour_logprobs_N is not None:
        is_weight_N = torch.exp(lp_s_y_det_N - behaviour_logprobs_N.to(dtype)).clamp(max=cfg.is_cap)
        weighted_adv_N = is_weight_N * advantage_N
    pg_N = -weighted_adv_N * lp_s_y_N

    div_N = _support_divergence(
        stats.support_logits_NK, stats.lse_N, teacher_topk_logprobs_NK.to(dtype), support_valid_NK, cfg
    )

    # Probabilities clamped to [0, 1] so that p_T - p_S stays in [-1, 1] (tau < -1 never, tau >= 1 always masks).
    teacher_prob_N = torch.exp(lp_t_y_N).clamp(0.0, 1.0)
    student_prob_N = torch.exp(lp_s_y_det_N).clamp(0.0, 1.0)
    mask_N = _intervention_mask(advantage_N, teacher_prob_N, student_prob_N, correct_N, cfg)

    # torch.where, not (1 - m) * pg + m * div: the unselected part gets an exact 0 gradient.
    if cfg.mode == "aopd_add":
        pg_part_N = pg_N
        div_part_N = torch.where(mask_N, div_N, 0.0)
        loss_N = pg_part_N + div_part_N
    else:
        pg_part_N = torch.where(mask_N, 0.0, pg_N)
        div_part_N = torch.where(mask_N, div_N, 0.0)
        loss_N = torch.where(mask_N, div_N, pg_N)

    metric_sums = _metric_sums(
        stats, loss_N, pg_part_N, div_part_N, div_N, advantage_N, mask_N, teacher_prob_N, student_prob_N,
        teacher_topk_logprobs_NK, lp_t_y_raw_N, is_weight_N, cfg,
    )
    return TokenLosses(
        loss_N=loss_N,
        mask_N=mask_N,
        advantage_N=advantage_N,
        pg_loss_N=pg_N.detach(),
        div_loss_N=div_N.detach(),
        metric_sums=metric_sums,
    )


@torch.no_grad()
def _metric_sums(
    stats: LogitStats,
    loss_N: torch.Tensor,
    pg_part_N: torch.Tensor,
    div_part_N: torch.Tensor,
    div_N: torch.Tensor,
    advantage_N: torch.Tensor,
    mask_N: torch.Tensor,
    teacher_prob_N: torch.Tensor,
    student_prob_N: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    lp_t_y_raw_N: torch.Tensor,
    is_weight_N: torch.Tensor | None,
    cfg: LossConfig,
) -> dict[str, torch.Tensor]:
    """Sums over the N positions, as detached float32 0-dim tensors (divide by the token count for means).

    loss/pg and loss/div are the parts that enter the loss, div/all the divergence at every position.
    """

    def total(x_N: torch.Tensor) -> torch.Tensor:
        return x_N.detach().float().sum()

    if teacher_topk_logprobs_NK.shape[1] > 0:
        teacher_top1_prob_N = torch.exp(teacher_topk_logprobs_NK.amax(-1)).clamp(0.0, 1.0)
    else:
        teacher_top1_prob_N = torch.zeros_like(teacher_prob_N)
    student_top1_prob_N = torch.exp(stats.top1_logit_N - stats.lse_N.detach()).clamp(0.0, 1.0)

    metrics = {
        "loss/total": total(loss_N),
        "loss/pg": total(pg_part_N),
        "loss/div": total(div_part_N),
        "div/all": total(div_N),
        "adv/mean": total(advantage_N),
        "adv/frac_pos": total(advantage_N > cfg.zero_eps),
        "adv/frac_zero": total(advantage_N.abs() <= cfg.zero_eps),
        "adv/frac_neg": total(advantage_N < -cfg.zero_eps),
        "aopd/intervention_ratio": total(mask_N),
        "policy/entropy": total(stats.entropy_N),
        "conf/gap_sampled": total(student_prob_N - teacher_prob_N),
        "conf/gap_top1": total(student_top1_prob_N - teacher_top1_prob_N),
        "teacher/floored_frac": total(lp_t_y_raw_N < TEACHER_LOGPROB_FLOOR),
    }
    if is_weight_N is not None:
        metrics["is/weight_mean"] = total(is_weight_N)
        metrics["is/capped_frac"] = total(is_weight_N >= cfg.is_cap)
    return metrics


def _check_inputs(
    n: int,
    sampled_ids_N: torch.Tensor,
    teacher_token_logprobs_N: torch.Tensor,
    teacher_topk_ids_NK: torch.Tensor,
    teacher_topk_logprobs_NK: torch.Tensor,
    cfg: LossConfig,
    ref_token_logprobs_N: torch.Tensor | None,
    correct_N: torch.Tensor | None,
    behaviour_logprobs_N: torch.Tensor | None,
) -> None:
    """Shape and presence checks (no device sync): mismatched rows are the classic silent bug of packed batches."""
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    if cfg.mode == "aopd_acc" and correct_N is None:
        raise ValueError("mode='aopd_acc' needs correct_N (per position: the trajectory's final answer is correct)")
    if cfg.mode == "exopd" and ref_token_logprobs_N is None:
        raise ValueError(
            "mode='exopd' needs ref_token_logprobs_N (the reference model's log-probability of each sampled token, "
            "by default from the student's initial weights)"
        )
    per_position = {
        "sampled_ids_N": sampled_ids_N,
        "teacher_token_logprobs_N": teacher_token_logprobs_N,
        "ref_token_logprobs_N": ref_token_logprobs_N,
        "correct_N": correct_N,
        "behaviour_logprobs_N": behaviour_logprobs_N,
    }
    for name, tensor in per_position.items():
        if tensor is not None and tuple(tensor.shape) != (n,):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected ({n},): one entry per scored position")
    if teacher_topk_ids_NK.dim() != 2 or teacher_topk_ids_NK.shape != teacher_topk_logprobs_NK.shape:
        raise ValueError(
            f"teacher_topk_ids_NK {tuple(teacher_topk_ids_NK.shape)} and teacher_topk_logprobs_NK "
            f"{tuple(teacher_topk_logprobs_NK.shape)} must both be [N, K]"
        )
    if teacher_topk_ids_NK.shape[0] != n:
        raise ValueError(f"teacher top-k has {teacher_topk_ids_NK.shape[0]} rows, expected {n} (one per position)")
    if sampled_ids_N.is_floating_point() or teacher_topk_ids_NK.is_floating_point():
        raise ValueError("sampled_ids_N and teacher_topk_ids_NK must be integer token ids")
