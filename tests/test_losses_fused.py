"""Tests of the chunked lm_head path, `fused_token_losses`, against `token_losses` on materialised logits.

Covers: equal per-token losses, masks, metrics and gradients with respect to the hidden states and the lm_head
weight over random shapes (N not a multiple of chunk_size, a chunk larger than N, K = V) and several modes;
duplicate top-k ids; autograd gradcheck of the chunked statistics in float64; a frozen lm_head; an empty batch;
-inf padding and extreme logits; the bfloat16 code path; and that no [N, V] tensor is ever created.
"""

# N = scored positions, K = teacher top-k, V = vocabulary, D = hidden size

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from student_trainer.losses import LossConfig, fused_logit_stats, fused_token_losses, token_losses

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

NEG_INF = float("-inf")


def make_inputs(n, d, v, k, seed=0, dtype=torch.float32):
    """Hidden states, an lm_head, a teacher's top-k (row 0 partly padded when n > 0), sampled tokens."""
    gen = torch.Generator().manual_seed(seed)
    hidden_ND = torch.randn(n, d, generator=gen).to(dtype)
    weight_VD = (torch.randn(v, d, generator=gen) * (1.5 / math.sqrt(d))).to(dtype)
    teacher_lp_NV = torch.log_softmax(2.0 * torch.randn(n, v, generator=gen), -1)
    topk_lp_NK, topk_ids_NK = teacher_lp_NV.topk(k, dim=-1)
    if n > 0 and k > 2:
        topk_lp_NK[0, -2:] = NEG_INF
        topk_ids_NK[0, -2:] = -1
    sampled_N = torch.randint(0, v, (n,), generator=gen)
    return {
        "hidden_ND": hidden_ND,
        "weight_VD": weight_VD,
        "teacher": (
            sampled_N,
            teacher_lp_NV.gather(1, sampled_N[:, None]).squeeze(1),
            topk_ids_NK,
            topk_lp_NK,
        ),
        "kwargs": {
            "ref_token_logprobs_N": -3.0 * torch.rand(n, generator=gen),
            "correct_N": torch.rand(n, generator=gen) > 0.5,
            "behaviour_logprobs_N": None,
        },
    }


def both_paths(inputs, cfg, weight_grad=True):
    """(naive, fused) results and gradients (hidden, weight) of loss_N.sum() for each path."""
    results = []
    for fused in (False, True):
        hidden_ND = inputs["hidden_ND"].clone().requires_grad_()
        weight_VD = inputs["weight_VD"].clone().requires_grad_(weight_grad)
        if fused:
            out = fused_token_losses(hidden_ND, weight_VD, *inputs["teacher"], cfg, **inputs["kwargs"])
        else:
            out = token_losses(hidden_ND @ weight_VD.T, *inputs["teacher"], cfg, **inputs["kwargs"])
        # A random weight per position, so that the gradient of every position matters differently.
        scale_N = torch.linspace(0.5, 1.5, hidden_ND.shape[0])
        (out.loss_N * scale_N).sum().backward()
        results.append((out, hidden_ND.grad, weight_VD.grad))
    return results


def assert_same(naive, fused, rtol=2e-5, atol=2e-5):
    (out_n, gh_n, gw_n), (out_f, gh_f, gw_f) = naive, fused
    torch.testing.assert_close(out_f.loss_N, out_n.loss_N, rtol=rtol, atol=atol)
    assert torch.equal(out_f.mask_N, out_n.mask_N)
    torch.testing.assert_close(out_f.advantage_N, out_n.advantage_N, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_f.div_loss_N, out_n.div_loss_N, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_f.pg_loss_N, out_n.pg_loss_N, rtol=rtol, atol=atol)
    assert out_f.metrics.keys() == out_n.metrics.keys()
    for key in out_n.metrics:
        torch.testing.assert_close(out_f.metrics[key], out_n.metrics[key], rtol=rtol, atol=atol, msg=key)
    torch.testing.assert_close(gh_f, gh_n, rtol=rtol, atol=atol)
    if gw_n is None:
        assert gw_f is None
    else:
        torch.testing.assert_close(gw_f, gw_n, rtol=rtol, atol=atol)


SHAPES = [  # (N, D, V, K, chunk_size)
    (37, 8, 50, 5, 8),  # N not a multiple of the chunk
    (64, 16, 97, 7, 16),  # N a multiple of the chunk
    (13, 6, 30, 4, 100),  # one chunk larger than N
    (21, 5, 12, 12, 4),  # K = V
    (1, 4, 11, 3, 1),
]
CONFIGS = [
    LossConfig(mode="opd"),
    LossConfig(mode="aopd"),
    LossConfig(mode="aopd", tau=0.05, beta=0.5),
    LossConfig(mode="aopd", support_norm="teacher"),
    LossConfig(mode="aopd_add", beta=1.0),
    LossConfig(mode="gkd", beta=0.3),
    LossConfig(mode="aopd_zero", zero_eps=0.5),
    LossConfig(mode="aopd_acc"),
    LossConfig(mode="exopd"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-D{}-V{}-K{}-C{}".format(*s))
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-tau{c.tau}-b{c.beta}-{c.support_norm}")
def test_fused_equals_naive(shape, cfg):
    n, d, v, k, chunk = shape
    cfg = dataclasses.replace(cfg, chunk_size=chunk)
    inputs = make_inputs(n, d, v, k, seed=n * 7 + k)
    assert_same(*both_paths(inputs, cfg))


def test_fused_equals_naive_with_importance_weights():
    inputs = make_inputs(40, 8, 60, 6, seed=1)
    inputs["kwargs"]["behaviour_logprobs_N"] = inputs["teacher"][1] + torch.linspace(-2, 2, 40)
    assert_same(*both_paths(inputs, LossConfig(mode="aopd", beta=0.5, chunk_size=16)))


def test_fused_equals_naive_in_float64_to_rounding():
    inputs = make_inputs(29, 6, 40, 5, seed=2, dtype=torch.float64)
    assert_same(*both_paths(inputs, LossConfig(mode="aopd_add", beta=0.5, chunk_size=8)), rtol=1e-11, atol=1e-11)


def test_duplicate_topk_ids_accumulate_their_gradients():
    inputs = make_inputs(17, 6, 25, 5, seed=3)
    sampled_N, lp_t_y_N, ids_NK, lp_NK = inputs["teacher"]
    ids_NK = ids_NK.clone()
    ids_NK[:, 1] = ids_NK[:, 0]  # valid (finite) entries sharing one id
    ids_NK[0, :] = 0  # a row where padding and valid entries share id 0 as well
    inputs["teacher"] = (sampled_N, lp_t_y_N, ids_NK, lp_NK)
    for cfg in (LossConfig(mode="gkd", beta=0.5, chunk_size=4), LossConfig(mode="gkd", support_norm="teacher")):
        assert_same(*both_paths(inputs, cfg))


def test_frozen_lm_head_gets_no_gradient():
    inputs = make_inputs(19, 6, 33, 4, seed=4)
    naive, fused = both_paths(inputs, LossConfig(mode="aopd", chunk_size=5), weight_grad=False)
    assert fused[2] is None
    assert_same(naive, fused)


def test_chunked_statistics_gradcheck():
    inputs = make_inputs(7, 4, 9, 3, seed=5, dtype=torch.float64)
    sampled_N, _, ids_NK, lp_NK = inputs["teacher"]
    support_ids_NK = torch.where(lp_NK > NEG_INF, ids_NK, 0)  # padding ids (-1) are not gathered

    def stats(hidden_ND, weight_VD):
        return tuple(fused_logit_stats(hidden_ND, weight_VD, sampled_N, support_ids_NK, chunk_size=3)[:3])

    hidden_ND = inputs["hidden_ND"].clone().requires_grad_()
    weight_VD = inputs["weight_VD"].clone().requires_grad_()
    assert torch.autograd.gradcheck(stats, (hidden_ND, weight_VD))


def test_empty_batch():
    inputs = make_inputs(0, 6, 20, 4)
    naive, fused = both_paths(inputs, LossConfig(mode="aopd_acc"))
    assert fused[0].loss_N.shape == (0,)
    assert fused[1].shape == (0, 6) and torch.all(fused[2] == 0)
    assert all(math.isfinite(float(x)) for x in fused[0].metrics.values())
    assert_same(naive, fused)


@pytest.mark.parametrize("cfg", [LossConfig(mode="aopd", beta=b, chunk_size=3) for b in (0.0, 0.5, 1.0)]
                         + [LossConfig(mode="gkd", support_norm="teacher", chunk_size=3)],
                         ids=["fkl", "jsd", "rkl", "teacher-norm"])
def test_extreme_logits_stay_finite_and_equal(cfg):
    inputs = make_inputs(9, 4, 16, 4, seed=6)
    inputs["hidden_ND"][2] *= 3e3  # logits of order 1e4
    inputs["hidden_ND"][3] = 0.0  # a uniform distribution
    _, lp_t_y_N, _, lp_NK = inputs["teacher"]
    lp_NK[4, :] = NEG_INF  # an empty support
    lp_t_y_N[5] = NEG_INF
    naive, fused = both_paths(inputs, cfg)
    for tensor in (fused[0].loss_N, fused[1], fused[2]):
        assert torch.isfinite(tensor).all()
    assert_same(naive, fused, rtol=1e-4, atol=1e-3)


def test_bfloat16_logits_are_computed_in_float32():
    """A bfloat16 model: the fused path's logits are float32 products of the bfloat16 inputs (no rounding of
    the logits themselves), so its losses sit at float32 distance from a float64 reference, while the naive
    `(h @ W.T).float()` path rounds every logit to bfloat16 first (a logit near 4 moves by up to 2**-7)."""
    inputs = make_inputs(24, 16, 64, 5, seed=7, dtype=torch.bfloat16)
    cfg = LossConfig(mode="aopd", beta=0.5, chunk_size=5)
    naive, fused = both_paths(inputs, cfg)
    assert fused[1].dtype == torch.bfloat16 and fused[2].dtype == torch.bfloat16
    assert fused[0].loss_N.dtype == torch.float32
    exact = token_losses(inputs["hidden_ND"].double() @ inputs["weight_VD"].double().T, *inputs["teacher"], cfg,
                         **inputs["kwargs"])
    fused_err = (fused[0].advantage_N.double() - exact.advantage_N).abs().max()
    naive_err = (naive[0].advantage_N.double() - exact.advantage_N).abs().max()
    # float32 logits of |z| <~ 10 from 16-term sums: a few float32 ulps of 10, far below bfloat16's 2**-8 steps
    assert fused_err < 1e-5, fused_err
    assert naive_err > 10 * fused_err
    torch.testing.assert_close(fused[0].loss_N.double(), exact.loss_N, rtol=1e-5, atol=1e-5)
    # gradients still flow through bfloat16 (the weight's dtype): bfloat16's relative precision, 2**-8
    torch.testing.assert_close(fused[1].float(), naive[1].float(), rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(fused[2].float(), naive[2].float(), rtol=5e-2, atol=5e-2)


def test_bfloat16_gradients_are_summed_in_float32():
    """A bfloat16 model's gradients: each chunk's weight gradient is added into a float32 sum (no per-chunk
    bfloat16 product), and the hidden states' gradient is a float32 product rounded once. So each element
    sits within one bfloat16 rounding (half an ulp: at most 2**-8 of the value) of the float64 gradient of the
    same loss, plus float32 noise of the largest contribution. The naive bfloat16 path, which rounds its
    products and sums, does not."""
    n, d, v, k = 40, 16, 64, 5
    inputs = make_inputs(n, d, v, k, seed=11, dtype=torch.bfloat16)
    cfg = LossConfig(mode="aopd", beta=0.5, chunk_size=6)  # 7 chunks
    naive, fused = both_paths(inputs, cfg)
    hidden = inputs["hidden_ND"].double().requires_grad_()
    weight = inputs["weight_VD"].double().requires_grad_()
    exact = token_losses(hidden @ weight.T, *inputs["teacher"], cfg, **inputs["kwargs"])
    assert torch.equal(exact.mask_N, fused[0].mask_N)
    (exact.loss_N * torch.linspace(0.5, 1.5, n).double()).sum().backward()
    def beyond_one_rounding(got, want):
        return ((got.double() - want).abs() - (2.0**-8 * want.abs() + 1e-5 * want.abs().max())).max()

    assert beyond_one_rounding(fused[1], hidden.grad) <= 0
    assert beyond_one_rounding(fused[2], weight.grad) <= 0
    assert beyond_one_rounding(naive[2], weight.grad) > 0  # so the bound can tell the two apart


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("fused", [False, True], ids=["naive", "fused"])
def test_no_tensor_of_n_by_v_elements(fused):
    n, d, v, k, chunk = 96, 4, 120, 8, 8
    inputs = make_inputs(n, d, v, k, seed=8)
    hidden_ND = inputs["hidden_ND"].requires_grad_()
    weight_VD = inputs["weight_VD"].requires_grad_()
    with _LargestTensor() as probe:
        if fused:
            out = fused_token_losses(hidden_ND, weight_VD, *inputs["teacher"], LossConfig(chunk_size=chunk))
        else:
            out = token_losses(hidden_ND @ weight_VD.T, *inputs["teacher"], LossConfig())
        out.loss_N.sum().backward()
    if fused:
        assert probe.largest <= max(chunk * v, n * d, v * d, n * k)
    else:
        assert probe.largest >= n * v  # the probe sees the materialised logits, so it can catch them
