"""Tests of student_trainer/losses.py on materialised logits (`token_losses`).

Covers: LossConfig validation; every mode against a slow float64 reference written from shared/spec/method.md;
logit gradients against the closed forms (OPD, forward KL on the support, support_norm="teacher") and autograd
gradcheck for the generalised JSD; aopd_add as OPD plus the masked divergence; the limits (tau < -1 = OPD,
tau >= 1 = GKD, tau = 0 masks exactly A <= 0, ExOPD with lam = 1 = OPD, K = V = full-vocabulary divergence,
TRL's generalized_jsd_loss convention); non-negative divergences; -inf padding; empty batches; extreme logits;
the importance weight; metrics; input validation. The fused, chunked path is tested in test_losses_fused.py.
"""

# N = scored positions, K = teacher top-k, V = vocabulary

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_trainer.losses import (
    MODES,
    TEACHER_LOGPROB_FLOOR,
    LossConfig,
    advantage_histogram,
    token_losses,
)

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a random batch and a slow reference
# ---------------------------------------------------------------------------------------------------------------


def make_batch(n=9, v=13, k=4, seed=0, dtype=torch.float64, pad=True):
    """Student logits, a full teacher distribution, its top-k, a sampled token per position.

    With pad=True, row 0 has its last two top-k entries padded (-inf, id -1) and row 1 has no support at all.
    """
    gen = torch.Generator().manual_seed(seed)
    logits_NV = (2.0 * torch.randn(n, v, generator=gen, dtype=torch.float64)).to(dtype)
    teacher_lp_NV = torch.log_softmax(2.0 * torch.randn(n, v, generator=gen, dtype=torch.float64), -1)
    sampled_N = torch.multinomial(torch.softmax(logits_NV.double(), -1), 1, generator=gen).squeeze(1)
    topk_lp_NK, topk_ids_NK = teacher_lp_NV.topk(k, dim=-1)
    if pad:
        topk_lp_NK[0, k - 2 :] = NEG_INF
        topk_ids_NK[0, k - 2 :] = -1
        topk_lp_NK[1, :] = NEG_INF
        topk_ids_NK[1, :] = 0
    return {
        "logits_NV": logits_NV,
        "teacher_lp_NV": teacher_lp_NV,
        "sampled_N": sampled_N,
        "lp_t_y_N": teacher_lp_NV.gather(1, sampled_N[:, None]).squeeze(1),
        "topk_ids_NK": topk_ids_NK,
        "topk_lp_NK": topk_lp_NK,
        "ref_N": teacher_lp_NV.gather(1, sampled_N[:, None]).squeeze(1) - torch.rand(n, generator=gen) - 0.2,
        "correct_N": torch.rand(n, generator=gen) > 0.5,
    }


def run(batch, cfg, logits_NV=None, **kwargs):
    kwargs.setdefault("ref_token_logprobs_N", batch["ref_N"])
    kwargs.setdefault("correct_N", batch["correct_N"])
    return token_losses(
        batch["logits_NV"] if logits_NV is None else logits_NV,
        batch["sampled_N"],
        batch["lp_t_y_N"],
        batch["topk_ids_NK"],
        batch["topk_lp_NK"],
        cfg,
        **kwargs,
    )


def _kl(p, log_p, log_q):
    return sum(pi * (lpi - lqi) for pi, lpi, lqi in zip(p, log_p, log_q, strict=True))


def reference_position(z, y, lp_t_y, support_ids, support_lps, cfg, lp_r_y=None, correct=None, behaviour=None):
    """One position, straight from method.md, in Python floats. support_* hold the valid entries only."""
    m = max(z)
    lse = m + math.log(sum(math.exp(zv - m) for zv in z))
    lp_s = [zv - lse for zv in z]
    lp_t_y = max(lp_t_y, TEACHER_LOGPROB_FLOOR)
    if cfg.mode == "exopd":
        adv = cfg.lam * (lp_t_y - lp_r_y) - (lp_s[y] - lp_r_y)
    else:
        adv = lp_t_y - lp_s[y]
    weight = 1.0 if behaviour is None else min(math.exp(lp_s[y] - behaviour), cfg.is_cap)
    pg = -weight * adv * lp_s[y]

    if not support_ids:
        div = 0.0
    else:
        t_norm = math.log(sum(math.exp(lp) for lp in support_lps))
        log_pt = [lp - t_norm for lp in support_lps]
        pt = [math.exp(x) for x in log_pt]
        zs = [z[i] for i in support_ids]
        s_norm = math.log(sum(math.exp(x) for x in zs))
        log_ps = [x - s_norm for x in zs]
        ps = [math.exp(x) for x in log_ps]
        if cfg.support_norm == "teacher":
            div = _kl(pt, log_pt, [lp_s[i] for i in support_ids])
        elif cfg.beta == 0:
            div = _kl(pt, log_pt, log_ps)
        elif cfg.beta == 1:
            div = _kl(ps, log_ps, log_pt)
        else:
            mix = [cfg.beta * a + (1 - cfg.beta) * b for a, b in zip(pt, ps, strict=True)]
            log_mix = [math.log(x) for x in mix]
            div = cfg.beta * _kl(pt, log_pt, log_mix) + (1 - cfg.beta) * _kl(ps, log_ps, log_mix)

    gap = math.exp(lp_t_y) - math.exp(lp_s[y])
    mask = {
        "opd": False,
        "exopd": False,
        "gkd": True,
        "aopd": gap <= cfg.tau,
        "aopd_add": gap <= cfg.tau,
        "aopd_zero": abs(adv) <= cfg.zero_eps,
        "aopd_acc": adv <= 0 and not correct,
    }[cfg.mode]
    if cfg.mode == "aopd_add":
        loss = pg + (div if mask else 0.0)
    else:
        loss = div if mask else pg
    return {"loss": loss, "mask": mask, "adv": adv, "pg": pg, "div": div}


def reference(batch, cfg, behaviour_N=None):
    rows = []
    for i in range(batch["logits_NV"].shape[0]):
        ids = [int(a) for a, lp in zip(batch["topk_ids_NK"][i], batch["topk_lp_NK"][i], strict=True) if lp > NEG_INF]
        lps = [float(lp) for lp in batch["topk_lp_NK"][i] if lp > NEG_INF]
        rows.append(
            reference_position(
                batch["logits_NV"][i].double().tolist(), int(batch["sampled_N"][i]), float(batch["lp_t_y_N"][i]),
                ids, lps, cfg, float(batch["ref_N"][i]), bool(batch["correct_N"][i]),
                None if behaviour_N is None else float(behaviour_N[i]),
            )
        )
    return {
        key: torch.tensor([r[key] for r in rows], dtype=torch.bool if key == "mask" else torch.float64)
        for key in rows[0]
    }


def grad_of(batch, cfg, **kwargs):
    logits_NV = batch["logits_NV"].clone().requires_grad_()
    out = run(batch, cfg, logits_NV=logits_NV, **kwargs)
    out.loss_N.sum().backward()
    return out, logits_NV.grad


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


def test_default_config_is_the_method():
    cfg = LossConfig()
    assert (cfg.mode, cfg.tau, cfg.beta, cfg.support_norm, cfg.lam) == ("aopd", 0.0, 0.0, "both", 1.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "aopdd"}, "use one of opd, aopd"),
        ({"mode": "seqkd"}, "cross-entropy"),
        ({"support_norm": "student"}, "use 'both'"),
        ({"support_norm": "teacher", "beta": 0.5}, "set beta=0 or use support_norm='both'"),
        ({"support_norm": "teacher", "beta": 1.0}, "set beta=0"),
        ({"beta": -0.1}, r"outside \[0, 1\]"),
        ({"beta": 1.5}, r"outside \[0, 1\]"),
        ({"chunk_size": 0}, "positive integer"),
        ({"chunk_size": -4}, "positive integer"),
        ({"chunk_size": 2.5}, "positive integer"),
        ({"chunk_size": True}, "positive integer"),
        ({"zero_eps": -1e-3}, "must be >= 0"),
        ({"is_cap": 0.0}, "must be > 0"),
        ({"tau": float("nan")}, "finite number"),
        ({"lam": float("inf")}, "finite number"),
        ({"beta": "0"}, "finite number"),
    ],
)
def test_config_rejects_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kwargs)


@pytest.mark.parametrize(
    ("mode", "missing", "match"),
    [("aopd_acc", "correct_N", "needs correct_N"), ("exopd", "ref_token_logprobs_N", "needs ref_token_logprobs_N")],
)
def test_mode_specific_inputs_are_required(mode, missing, match):
    batch = make_batch()
    with pytest.raises(ValueError, match=match):
        run(batch, LossConfig(mode=mode), **{missing: None})


def test_mismatched_rows_are_rejected():
    batch = make_batch(n=6)
    with pytest.raises(ValueError, match="one entry per scored position"):
        token_losses(batch["logits_NV"], batch["sampled_N"][:5], batch["lp_t_y_N"], batch["topk_ids_NK"],
                     batch["topk_lp_NK"], LossConfig(mode="opd"))
    with pytest.raises(ValueError, match="expected 6"):
        token_losses(batch["logits_NV"], batch["sampled_N"], batch["lp_t_y_N"], batch["topk_ids_NK"][:4],
                     batch["topk_lp_NK"][:4], LossConfig(mode="opd"))


# ---------------------------------------------------------------------------------------------------------------
# Every mode against the reference
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_CONFIGS = [
    LossConfig(mode="opd"),
    LossConfig(mode="aopd"),
    LossConfig(mode="aopd", tau=0.1, beta=0.5),
    LossConfig(mode="aopd", tau=-0.05, beta=1.0),
    LossConfig(mode="aopd", support_norm="teacher"),
    LossConfig(mode="aopd_add", beta=0.3),
    LossConfig(mode="gkd"),
    LossConfig(mode="gkd", beta=1.0),
    LossConfig(mode="gkd", beta=0.7),
    LossConfig(mode="gkd", support_norm="teacher"),
    LossConfig(mode="aopd_zero", zero_eps=0.7),
    LossConfig(mode="aopd_acc", beta=0.2),
    LossConfig(mode="exopd"),
    LossConfig(mode="exopd", lam=2.0),
]


@pytest.mark.parametrize("cfg", REFERENCE_CONFIGS, ids=lambda c: f"{c.mode}-tau{c.tau}-b{c.beta}-{c.support_norm}")
@pytest.mark.parametrize("seed", [0, 1])
def test_mode_matches_reference(cfg, seed):
    batch = make_batch(n=24, seed=seed)
    out = run(batch, cfg)
    ref = reference(batch, cfg)
    torch.testing.assert_close(out.loss_N.detach(), ref["loss"], rtol=1e-10, atol=1e-10)
    assert torch.equal(out.mask_N, ref["mask"])
    torch.testing.assert_close(out.advantage_N, ref["adv"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.pg_loss_N, ref["pg"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.div_loss_N, ref["div"], rtol=1e-10, atol=1e-10)


def test_the_batch_exercises_both_branches():
    """Guards the reference test against a batch where the mask is constant."""
    batch = make_batch(n=24, seed=0)
    mask = run(batch, LossConfig(mode="aopd")).mask_N
    assert mask.any() and not mask.all()
    outside = [int(y) not in batch["topk_ids_NK"][i].tolist() for i, y in enumerate(batch["sampled_N"])]
    assert any(outside)


def test_float32_logits_match_the_float64_reference():
    batch = make_batch(n=24, seed=3, dtype=torch.float32)
    cfg = LossConfig(mode="aopd", beta=0.5)
    out = run(batch, cfg)
    assert out.loss_N.dtype == torch.float32
    torch.testing.assert_close(out.loss_N.double(), reference(batch, cfg)["loss"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Gradients on the logits against the closed forms
# ---------------------------------------------------------------------------------------------------------------


def test_opd_gradient_closed_form():
    batch = make_batch(n=16, seed=4)
    out, grad_NV = grad_of(batch, LossConfig(mode="opd"))
    p_s_NV = torch.softmax(batch["logits_NV"], -1)
    onehot_NV = F.one_hot(batch["sampled_N"], p_s_NV.shape[1]).double()
    expected_NV = -out.advantage_N[:, None] * (onehot_NV - p_s_NV)
    torch.testing.assert_close(grad_NV, expected_NV, rtol=1e-10, atol=1e-12)


def _support_distributions(batch, i):
    ids = [int(a) for a, lp in zip(batch["topk_ids_NK"][i], batch["topk_lp_NK"][i], strict=True) if lp > NEG_INF]
    lps = torch.tensor([float(lp) for lp in batch["topk_lp_NK"][i] if lp > NEG_INF], dtype=torch.float64)
    pt = torch.softmax(lps, 0) if ids else lps
    ps = torch.softmax(batch["logits_NV"][i, ids], 0) if ids else lps
    return ids, pt, ps


def test_forward_kl_gradient_closed_form_and_exactly_zero_off_support():
    batch = make_batch(n=16, seed=5)
    _, grad_NV = grad_of(batch, LossConfig(mode="gkd", beta=0.0))
    for i in range(grad_NV.shape[0]):
        ids, pt, ps = _support_distributions(batch, i)
        expected_V = torch.zeros(grad_NV.shape[1], dtype=torch.float64)
        if ids:
            expected_V[ids] = ps - pt
        torch.testing.assert_close(grad_NV[i], expected_V, rtol=1e-10, atol=1e-12)
        off = torch.ones(grad_NV.shape[1], dtype=torch.bool)
        off[ids] = False
        assert torch.all(grad_NV[i][off] == 0.0), "forward KL on the support must not touch tokens outside S"


def test_teacher_support_norm_gradient_closed_form_pushes_down_outside_support():
    batch = make_batch(n=16, seed=6)
    _, grad_NV = grad_of(batch, LossConfig(mode="gkd", support_norm="teacher"))
    _, grad_both_NV = grad_of(batch, LossConfig(mode="gkd", support_norm="both"))
    p_s_NV = torch.softmax(batch["logits_NV"], -1)
    pushed = 0
    for i in range(grad_NV.shape[0]):
        ids, pt, _ = _support_distributions(batch, i)
        if not ids:
            continue  # an empty support has zero divergence; the closed form assumes S is not empty
        expected_V = p_s_NV[i].clone()
        expected_V[ids] -= pt
        torch.testing.assert_close(grad_NV[i], expected_V, rtol=1e-10, atol=1e-12)
        y = int(batch["sampled_N"][i])
        if y not in ids:
            # The sampled mistake outside S is pushed down by its own p_S(y) ("teacher") ...
            assert grad_NV[i, y] > 0
            torch.testing.assert_close(grad_NV[i, y], p_s_NV[i, y], rtol=1e-10, atol=0.0)
            # ... and receives exactly nothing from the divergence with both sides renormalised.
            assert grad_both_NV[i, y] == 0.0
            pushed += 1
    assert pushed > 0, "the batch must contain a sampled token outside the teacher's top-k"


@pytest.mark.parametrize("beta", [0.25, 0.5, 0.8])
def test_generalised_jsd_gradcheck(beta):
    batch = make_batch(n=4, v=6, k=3, seed=7)
    cfg = LossConfig(mode="gkd", beta=beta)

    def divergence(logits_NV):
        return run(batch, cfg, logits_NV=logits_NV).loss_N

    # The full Jacobian at beta = 0.5, gradcheck's cheaper random-projection mode at the other values.
    logits_NV = batch["logits_NV"].clone().requires_grad_()
    assert torch.autograd.gradcheck(divergence, (logits_NV,), fast_mode=beta != 0.5)


# ---------------------------------------------------------------------------------------------------------------
# Relations between modes, limits
# ---------------------------------------------------------------------------------------------------------------


def test_aopd_add_is_opd_plus_masked_divergence_term_by_term():
    batch = make_batch(n=24, seed=8)
    cfg_add = LossConfig(mode="aopd_add", beta=0.5, tau=0.05)
    add, grad_add = grad_of(batch, cfg_add)
    opd, grad_opd = grad_of(batch, LossConfig(mode="opd"))
    aopd = run(batch, LossConfig(mode="aopd", beta=0.5, tau=0.05))
    assert torch.equal(add.mask_N, aopd.mask_N) and add.mask_N.any() and not add.mask_N.all()
    expected_N = opd.loss_N.detach() + torch.where(aopd.mask_N, aopd.div_loss_N, 0.0)
    torch.testing.assert_close(add.loss_N.detach(), expected_N, rtol=1e-12, atol=1e-12)

    logits_NV = batch["logits_NV"].clone().requires_grad_()
    gkd = run(batch, LossConfig(mode="gkd", beta=0.5), logits_NV=logits_NV)
    gkd.loss_N[aopd.mask_N].sum().backward()
    torch.testing.assert_close(grad_add, grad_opd + logits_NV.grad, rtol=1e-10, atol=1e-12)


def test_aopd_below_minus_one_is_opd():
    batch = make_batch(n=24, seed=9)
    aopd, grad_aopd = grad_of(batch, LossConfig(mode="aopd", tau=-1.01))
    opd, grad_opd = grad_of(batch, LossConfig(mode="opd"))
    assert not aopd.mask_N.any()
    torch.testing.assert_close(aopd.loss_N, opd.loss_N, rtol=0, atol=0)
    torch.testing.assert_close(grad_aopd, grad_opd, rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_aopd_at_one_is_gkd(beta):
    batch = make_batch(n=24, seed=10)
    aopd, grad_aopd = grad_of(batch, LossConfig(mode="aopd", tau=1.0, beta=beta))
    gkd, grad_gkd = grad_of(batch, LossConfig(mode="gkd", beta=beta))
    assert aopd.mask_N.all()
    torch.testing.assert_close(aopd.loss_N, gkd.loss_N, rtol=0, atol=0)
    torch.testing.assert_close(grad_aopd, grad_gkd, rtol=0, atol=0)


def test_tau_zero_masks_exactly_non_positive_advantages_even_when_probabilities_underflow():
    batch = make_batch(n=24, seed=11, dtype=torch.float32)
    # Rows 2..4: float32 probabilities underflow to 0 on both sides, so p_T - p_S = 0 whatever the sign of A.
    batch["logits_NV"][torch.arange(2, 5), batch["sampled_N"][2:5]] = -250.0
    lp_s_N = torch.log_softmax(batch["logits_NV"], -1).gather(1, batch["sampled_N"][:, None]).squeeze(1)
    batch["lp_t_y_N"][2] = lp_s_N[2] + 50.0  # A = +50: no intervention
    batch["lp_t_y_N"][3] = lp_s_N[3] - 50.0  # A = -50: intervention
    batch["lp_t_y_N"][4] = lp_s_N[4]  # A = 0 exactly: intervention
    out = run(batch, LossConfig(mode="aopd", tau=0.0))
    assert out.advantage_N[2] > 0 and out.advantage_N[3] < 0 and out.advantage_N[4] == 0
    assert torch.equal(out.mask_N, out.advantage_N <= 0)
    assert out.mask_N.any() and not out.mask_N.all()


def test_exopd_with_lam_one_is_opd():
    batch = make_batch(n=24, seed=12)
    exopd, grad_exopd = grad_of(batch, LossConfig(mode="exopd", lam=1.0))
    opd, grad_opd = grad_of(batch, LossConfig(mode="opd"))
    torch.testing.assert_close(exopd.advantage_N, opd.advantage_N, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exopd.loss_N, opd.loss_N, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_exopd, grad_opd, rtol=1e-12, atol=1e-12)


def trl_generalized_jsd(student_logits, teacher_logits, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (temperature 1, reduction "none" summed over the vocabulary)."""
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta_t * kl_teacher + (1 - beta_t) * kl_student
    return jsd.sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trl_generalized_jsd_on_the_support(beta):
    batch = make_batch(n=16, seed=13)
    out = run(batch, LossConfig(mode="gkd", beta=beta))
    for i in range(16):
        valid_K = batch["topk_lp_NK"][i] > NEG_INF
        if not valid_K.any():
            assert out.div_loss_N[i] == 0.0
            continue
        ids_K = batch["topk_ids_NK"][i][valid_K]
        expected = trl_generalized_jsd(batch["logits_NV"][i, ids_K], batch["topk_lp_NK"][i][valid_K], beta)
        torch.testing.assert_close(out.div_loss_N[i], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(mode="gkd", beta=0.0), LossConfig(mode="gkd", beta=1.0), LossConfig(mode="gkd", beta=0.4),
     LossConfig(mode="gkd", support_norm="teacher")],
    ids=["fkl", "rkl", "jsd", "teacher-norm"],
)
def test_full_support_equals_full_vocabulary_divergence(cfg):
    batch = make_batch(n=10, v=11, k=11, seed=14, pad=False)
    out = run(batch, cfg)
    expected_N = trl_generalized_jsd(batch["logits_NV"], batch["teacher_lp_NV"], cfg.beta)
    torch.testing.assert_close(out.div_loss_N, expected_N, rtol=1e-10, atol=1e-12)
    if cfg.beta == 0.0:
        p_t_NV = batch["teacher_lp_NV"].exp()
        kl_N = (p_t_NV * (batch["teacher_lp_NV"] - torch.log_softmax(batch["logits_NV"], -1))).sum(-1)
        torch.testing.assert_close(out.div_loss_N, kl_N, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(mode="gkd", beta=b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    + [LossConfig(mode="gkd", support_norm="teacher")],
    ids=lambda c: f"b{c.beta}-{c.support_norm}",
)
def test_divergences_are_non_negative_without_clamping(cfg):
    batch = make_batch(n=200, v=30, k=8, seed=15)
    out = run(batch, cfg)
    assert torch.all(out.div_loss_N >= 0)
    assert out.div_loss_N[1] == 0.0  # the empty support
    assert torch.all(out.div_loss_N[2:] > 0) and out.div_loss_N[0] > 0
    # Identical distributions on the support: D ~ 0 without being clamped there.
    same = make_batch(n=20, v=30, k=30, seed=16, pad=False)
    same["logits_NV"] = same["teacher_lp_NV"] + 3.0
    assert torch.all(run(same, cfg).div_loss_N.abs() < 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Padding, empty batches, extreme values
# ---------------------------------------------------------------------------------------------------------------


def test_padding_entries_are_not_part_of_the_support():
    batch = make_batch(n=6, v=13, k=5, seed=17, pad=False)
    padded = {key: (value.clone() if torch.is_tensor(value) else value) for key, value in batch.items()}
    padded["topk_ids_NK"] = torch.cat([batch["topk_ids_NK"], torch.tensor([[-1, 3, 3]] * 6)], dim=1)
    padded["topk_lp_NK"] = torch.cat([batch["topk_lp_NK"], torch.full((6, 3), NEG_INF, dtype=torch.float64)], dim=1)
    for cfg in (LossConfig(mode="gkd", beta=0.5), LossConfig(mode="gkd", support_norm="teacher")):
        plain, grad_plain = grad_of(batch, cfg)
        pad, grad_pad = grad_of(padded, cfg)
        torch.testing.assert_close(pad.loss_N, plain.loss_N, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_pad, grad_plain, rtol=1e-12, atol=1e-12)


def test_no_top_k_at_all():
    """K = 0 (a teacher asked for no top-k): OPD is unchanged, the divergence is 0 and still backpropagates."""
    batch = make_batch(n=8, seed=21, pad=False)
    empty = {**batch, "topk_ids_NK": batch["topk_ids_NK"][:, :0], "topk_lp_NK": batch["topk_lp_NK"][:, :0]}
    opd, grad_opd = grad_of(batch, LossConfig(mode="opd"))
    opd_k0, grad_opd_k0 = grad_of(empty, LossConfig(mode="opd"))
    torch.testing.assert_close(opd_k0.loss_N, opd.loss_N, rtol=0, atol=0)
    torch.testing.assert_close(grad_opd_k0, grad_opd, rtol=0, atol=0)
    gkd, grad_gkd = grad_of(empty, LossConfig(mode="gkd"))
    assert torch.all(gkd.loss_N == 0) and torch.all(grad_gkd == 0)
    assert all(math.isfinite(float(v)) for v in gkd.metrics.values())


ALL_CONFIGS = [LossConfig(mode=m, beta=b) for m in MODES for b in (0.0, 0.5, 1.0)] + [
    LossConfig(mode=m, support_norm="teacher") for m in ("aopd", "gkd", "aopd_add")
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.mode}-b{c.beta}-{c.support_norm}")
def test_empty_batch_gives_zero_not_nan(cfg):
    logits_NV = torch.randn(0, 13, requires_grad=True)
    empty_N = torch.zeros(0)
    out = token_losses(
        logits_NV, torch.zeros(0, dtype=torch.long), empty_N, torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, 4), cfg, ref_token_logprobs_N=empty_N, correct_N=torch.zeros(0, dtype=torch.bool),
        behaviour_logprobs_N=empty_N,
    )
    assert out.loss_N.shape == (0,) and out.mask_N.shape == (0,) and out.mask_N.dtype == torch.bool
    assert out.loss_N.sum().item() == 0.0
    out.loss_N.sum().backward()
    assert logits_NV.grad.shape == (0, 13)
    assert all(math.isfinite(float(v)) for v in out.metrics.values()), out.metrics
    assert float(out.metrics["aopd/intervention_ratio"]) == 0.0


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.mode}-b{c.beta}-{c.support_norm}")
def test_extreme_values_stay_finite(cfg):
    batch = make_batch(n=8, v=13, k=4, seed=18, dtype=torch.float32)  # rows 0 and 1 carry -inf padding
    batch["logits_NV"][2, :] = -1e4
    batch["logits_NV"][2, 0] = 1e4
    batch["logits_NV"][3, batch["topk_ids_NK"][3]] = -1e4  # the student rules out the teacher's whole support
    batch["logits_NV"][4] *= 1e3
    batch["lp_t_y_N"][5] = NEG_INF  # the teacher rules out the sampled token
    batch["topk_lp_NK"][6, 1:] = -1e4
    behaviour_N = batch["lp_t_y_N"].clamp(min=-30.0) - 1.0
    out, grad_NV = grad_of(batch, cfg, behaviour_logprobs_N=behaviour_N)
    assert torch.isfinite(out.loss_N).all(), out.loss_N
    assert torch.isfinite(out.div_loss_N).all() and torch.isfinite(out.pg_loss_N).all()
    assert torch.isfinite(grad_NV).all()
    assert all(math.isfinite(float(v)) for v in out.metrics.values()), out.metrics
    if cfg.mode != "exopd":
        lp_s_y = torch.log_softmax(batch["logits_NV"][5], -1)[batch["sampled_N"][5]]
        assert out.advantage_N[5] == pytest.approx(TEACHER_LOGPROB_FLOOR - lp_s_y.item())
    assert float(out.metrics["teacher/floored_frac"]) == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------------------------------------------
# Importance weight, metrics, histogram
# ---------------------------------------------------------------------------------------------------------------


def test_importance_weight_scales_only_the_policy_gradient_and_is_capped():
    batch = make_batch(n=24, seed=19)
    cfg = LossConfig(mode="aopd", beta=0.5, is_cap=2.0)
    lp_s_N = torch.log_softmax(batch["logits_NV"], -1).gather(1, batch["sampled_N"][:, None]).squeeze(1)
    shift_N = torch.linspace(-2.0, 2.0, 24, dtype=torch.float64)  # weights from e^-2 up to the cap
    behaviour_N = lp_s_N + shift_N
    out = run(batch, cfg, behaviour_logprobs_N=behaviour_N)
    torch.testing.assert_close(out.loss_N, reference(batch, cfg, behaviour_N)["loss"], rtol=1e-10, atol=1e-10)
    plain = run(batch, cfg)
    weight_N = torch.exp(-shift_N).clamp(max=2.0)
    assert (weight_N == 2.0).any() and (weight_N < 1.0).any()
    torch.testing.assert_close(out.pg_loss_N, weight_N * plain.pg_loss_N, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.mask_N, plain.mask_N)
    torch.testing.assert_close(out.div_loss_N, plain.div_loss_N, rtol=0, atol=0)
    # On-policy (behaviour == current policy): weight 1, identical to no correction.
    on_policy = run(batch, cfg, behaviour_logprobs_N=lp_s_N)
    torch.testing.assert_close(on_policy.loss_N, plain.loss_N, rtol=1e-12, atol=1e-12)
    assert float(out.metrics["is/capped_frac"]) == pytest.approx(float((weight_N >= 2.0).double().mean()))


def test_metrics_match_direct_computation():
    batch = make_batch(n=40, v=17, k=5, seed=20, pad=False)
    cfg = LossConfig(mode="aopd", zero_eps=0.3)
    out = run(batch, cfg)
    m = {key: float(value) for key, value in out.metrics.items()}
    adv = out.advantage_N.numpy()
    assert m["adv/frac_pos"] == pytest.approx(np.mean(adv > 0.3))
    assert m["adv/frac_zero"] == pytest.approx(np.mean(np.abs(adv) <= 0.3))
    assert m["adv/frac_neg"] == pytest.approx(np.mean(adv < -0.3))
    assert m["adv/frac_pos"] + m["adv/frac_zero"] + m["adv/frac_neg"] == pytest.approx(1.0)
    assert 0 < m["adv/frac_pos"] < 1 and 0 < m["adv/frac_neg"] < 1
    for q in (5, 25, 50, 75, 95):
        assert m[f"adv/p{q:02d}"] == pytest.approx(np.quantile(adv, q / 100), rel=1e-5, abs=1e-6)
    assert m["aopd/intervention_ratio"] == pytest.approx(out.mask_N.double().mean().item())
    p_s_NV = torch.softmax(batch["logits_NV"], -1)
    entropy = -(p_s_NV * p_s_NV.log()).sum(-1).mean().item()
    assert m["policy/entropy"] == pytest.approx(entropy, rel=1e-5)
    p_s_y = p_s_NV.gather(1, batch["sampled_N"][:, None]).squeeze(1)
    assert m["conf/gap_sampled"] == pytest.approx((p_s_y - batch["lp_t_y_N"].exp()).mean().item(), rel=1e-5)
    top1_gap = (p_s_NV.amax(-1) - batch["teacher_lp_NV"].exp().amax(-1)).mean().item()
    assert m["conf/gap_top1"] == pytest.approx(top1_gap, rel=1e-5)
    assert m["loss/pg"] + m["loss/div"] == pytest.approx(m["loss/total"], rel=1e-5)
    assert m["loss/div"] == pytest.approx(torch.where(out.mask_N, out.div_loss_N, 0.0).mean().item(), rel=1e-5)
    assert m["div/all"] == pytest.approx(out.div_loss_N.mean().item(), rel=1e-5)
    assert all(key.count("/") == 1 for key in m)


def test_advantage_histogram_counts_every_position():
    advantage_N = torch.tensor([-100.0, -1.0, 0.0, 0.0, 0.5, 3.0, 100.0])
    counts_B, edges_B1 = advantage_histogram(advantage_N, num_bins=4, limit=4.0)
    # bins [-4, -2), [-2, 0), [0, 2), [2, 4]: -100 lands in the first, 100 in the last
    assert counts_B.tolist() == [1.0, 1.0, 3.0, 2.0]
    assert edges_B1.tolist() == [-4.0, -2.0, 0.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        advantage_histogram(advantage_N, num_bins=0)
