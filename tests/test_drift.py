"""The drift monitor (student_trainer/drift.py): on synthetic metric series, a collapse-like drift is flagged at
the step the rule says and not before, noisy flat runs and learning runs (OPD-like, GKD-like, AOPD-add-like)
are not, a mode without an intervention ratio (or without any of the signals: seqkd) never alarms, and a
monitor rebuilt from metrics.jsonl on resume continues exactly as an uninterrupted one. Through the real trainer
against a live teacher: drift/alarm reaches metrics.jsonl, the warning is logged once (not again after a
resume, whose monitor carries on from the logged history), and drift.enabled=false logs no drift/* at all."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from student_trainer.config import DriftSection
from student_trainer.drift import (
    ACCURACY,
    DIVERGENCE,
    ENTROPY,
    FINISHED,
    GAP,
    INTERVENTION,
    DriftMonitor,
    read_train_records,
)
from student_trainer.train import train
from tests.helpers import make_cfg


def series(n, entropy, gap, intervention=None, noise=0.0, seed=0):
    """Records for steps 1..n; each signal a function of the step (intervention=None: the key is absent)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, n + 1):
        r = {"step": t, "optim/grad_norm": 1.0, ENTROPY: entropy(t) + noise * rng.normal(),
             GAP: gap(t) + 0.1 * noise * rng.normal()}
        if intervention is not None:
            r[INTERVENTION] = intervention(t) + 0.5 * noise * rng.normal()
        out.append(r)
    return out


def ramp(t, start, stop, lo, hi):
    """lo until step `start`, linear to hi at step `stop`, hi after."""
    return lo + (hi - lo) * min(1.0, max(0.0, (t - start) / (stop - start)))


def first_alarm(records, cfg=None, warn=False):
    m = DriftMonitor(cfg or DriftSection())
    outs = [m.observe(r, warn=warn) for r in records]
    return m.first_alarm_step, outs


def collapse(n=100, noise=0.0, seed=0):
    """Shaped like AOPD's collapse in docs/results/figures/weak (seed 0): the gap falls below 0 from step 10, the
    entropy climbs from step 30 (0.31 -> 0.85 at step 75), the intervention ratio from step 35 (0.13 -> 0.30)."""
    return series(n, lambda t: ramp(t, 30, 75, 0.31, 0.85), lambda t: ramp(t, 10, 70, 0.0, -0.06),
                  lambda t: ramp(t, 35, 75, 0.13, 0.30), noise=noise, seed=seed)


def test_a_step_change_is_flagged_at_the_step_the_rule_says():
    """Flat until step 30, then entropy +0.4, gap -0.07, intervention +0.15 at once. Window 10: after k steps of
    the new regime the window is k/10 in it, so the conditions first all hold at k = 2 (entropy 0.08 >= max(0.05,
    0.2 * 0.3), gap -0.014 <= -0.01, intervention 0.03 >= 0.02; at k = 1 none does), i.e. at step 32, and
    patience 5 raises the alarm at step 36."""
    cfg = DriftSection(baseline_steps=10, window=10, patience=5, entropy_rise=0.05, entropy_rise_frac=0.2,
                       gap_margin=0.01, intervention_rise=0.02)
    recs = series(60, lambda t: 0.3 + 0.4 * (t > 30), lambda t: -0.07 * (t > 30), lambda t: 0.1 + 0.15 * (t > 30))
    step, outs = first_alarm(recs, cfg)
    assert step == 36
    assert [o["drift/alarm"] for o in outs[:35]] == [0] * 35 and all(o["drift/alarm"] == 1 for o in outs[35:])
    assert outs[31]["drift/streak"] == 1 and outs[30]["drift/streak"] == 0
    assert "drift/entropy_rise" not in outs[18] and "drift/entropy_rise" in outs[19]  # from step baseline + window
    assert outs[-1]["drift/entropy_rise"] == pytest.approx(0.4) and outs[-1]["drift/gap"] == pytest.approx(-0.07)
    assert outs[-1]["drift/intervention_rise"] == pytest.approx(0.15)


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_collapse_is_flagged_before_half_its_steps_with_the_default_thresholds(seed):
    step, _ = first_alarm(collapse(noise=0.02, seed=seed))
    assert step is not None and 35 <= step < 50, step


def test_each_condition_alone_is_not_enough():
    up, flat = (lambda t: ramp(t, 10, 80, 0.30, 0.80)), (lambda t: 0.30)
    neg, pos = (lambda t: ramp(t, 10, 80, 0.005, -0.055)), (lambda t: 0.01)
    rising, level = (lambda t: ramp(t, 10, 80, 0.13, 0.27)), (lambda t: 0.13)
    for e, g, i in [(up, pos, level), (flat, neg, level), (flat, pos, rising), (up, neg, level), (up, pos, rising),
                    (flat, neg, rising)]:
        assert first_alarm(series(100, e, g, i, noise=0.01))[0] is None
    assert first_alarm(series(100, up, neg, rising, noise=0.01))[0] is not None


@pytest.mark.parametrize("seed", range(5))
def test_noisy_flat_runs_and_runs_that_learn_are_not_flagged(seed):
    flat = series(100, lambda t: 0.3, lambda t: -0.005, lambda t: 0.13, noise=0.05, seed=seed)
    # OPD and GKD as in RESULTS.md: entropy falls; gkd's intervention ratio is 1 throughout, its gap slightly < 0
    gkd = series(100, lambda t: ramp(t, 0, 60, 0.30, 0.24), lambda t: -0.007, lambda t: 1.0, noise=0.03, seed=seed)
    # AOPD-add: the gap dips below 0 early, the intervention ratio falls
    add = series(100, lambda t: ramp(t, 0, 50, 0.30, 0.16), lambda t: ramp(t, 0, 30, -0.02, 0.013),
                 lambda t: ramp(t, 0, 100, 0.122, 0.076), noise=0.03, seed=seed)
    for recs in (flat, gkd, add):
        step, outs = first_alarm(recs)
        assert step is None and not any(o["drift/alarm"] for o in outs)


def multisum_collapse(acc_start: float, n=100, noise=0.0, seed=0):
    """Shaped like AOPD's collapse on multisum from the strong student (docs/results/runs/multisum, seed 0): the
    rollouts' accuracy falls from step 5 (0.25 -> 0 at step 25), the entropy climbs (0.30 -> 0.85 at step 26), the
    intervention ratio dips then rises (0.45 -> 0.40 at step 15 -> 0.52 at step 26) and the gap stays above 0
    (0.10, reaching 0 only after step 55)."""
    recs = series(n, lambda t: ramp(t, 5, 26, 0.30, 0.85), lambda t: ramp(t, 30, 60, 0.10, -0.005),
                  lambda t: ramp(t, 1, 15, 0.45, 0.40) + ramp(t, 15, 26, 0.0, 0.12), noise=noise, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for r in recs:
        r[ACCURACY] = max(0.0, ramp(r["step"], 5, 25, acc_start, 0.0) + noise * rng.normal())
    return recs


@pytest.mark.parametrize("seed", range(3))
def test_a_collapse_seen_in_accuracy_with_the_gap_above_zero_is_flagged_before_half(seed):
    step, outs = first_alarm(multisum_collapse(0.25, noise=0.01, seed=seed))
    assert step is not None and 20 <= step < 40, step
    assert outs[step - 1]["drift/accuracy_ratio"] < 0.5 and outs[step - 1]["drift/gap"] > 0
    # without the accuracy condition (or without the accuracy key) the gap alone is too late
    late, _ = first_alarm(multisum_collapse(0.25, noise=0.01, seed=seed), DriftSection(accuracy_drop_frac=1.0))
    assert late is None or late >= 50
    bare = [{k: v for k, v in r.items() if k != ACCURACY} for r in multisum_collapse(0.25, seed=seed)]
    assert first_alarm(bare)[0] is None or first_alarm(bare)[0] >= 50
    # a student at the floor cannot fall: below accuracy_floor the condition is off
    assert first_alarm(multisum_collapse(0.03, noise=0.0, seed=seed))[0] is None


def test_falling_accuracy_alone_or_without_rising_interventions_is_not_enough():
    for recs in (series(100, lambda t: 0.3, lambda t: 0.05, lambda t: 0.4),  # accuracy falls, nothing else
                 series(100, lambda t: ramp(t, 5, 26, 0.30, 0.85), lambda t: 0.05, lambda t: 0.4)):  # + entropy
        for r in recs:
            r[ACCURACY] = ramp(r["step"], 5, 25, 0.3, 0.0)
        assert first_alarm(recs)[0] is None


def gkd_run(div_to: float, acc_to: float, entropy_to: float, noise=0.01, seed=0):
    """GKD (intervention ratio 1 throughout) as on multisum from the strong student, seed 0: div/all 0.61 -> 1.1
    by step 40, entropy 0.30 -> 1.06 by step 49, rollout accuracy 0.27 -> 0.03 by step 20, the gap above 0."""
    recs = series(100, lambda t: ramp(t, 5, 49, 0.30, entropy_to), lambda t: 0.07, lambda t: 1.0, noise=noise, seed=seed)
    rng = np.random.default_rng(seed + 7)
    for r in recs:
        r[DIVERGENCE] = ramp(r["step"], 5, 40, 0.61, div_to) + noise * rng.normal()
        r[ACCURACY] = max(0.0, ramp(r["step"], 5, 20, 0.27, acc_to) + noise * rng.normal())
    return recs


@pytest.mark.parametrize("seed", range(3))
def test_gkd_collapse_is_flagged_by_the_divergence_rising_and_gkd_learning_is_not(seed):
    step, outs = first_alarm(gkd_run(1.1, 0.03, 1.06, seed=seed))
    assert step is not None and step < 50, step
    assert outs[step - 1]["drift/div_rise"] >= 0.3 and abs(outs[step - 1]["drift/intervention_rise"]) < 0.02
    # learning: the divergence falls, accuracy rises, entropy falls
    assert first_alarm(gkd_run(0.35, 0.5, 0.25, seed=seed))[0] is None
    # the divergence rising a little (below div_rise) with the rest of the signature: no alarm
    assert first_alarm(gkd_run(0.70, 0.03, 1.06, seed=seed))[0] is None


def floor_run(entropy_to: float, finished_to: float, mode: str = "aopd", noise=0.01, seed=0):
    """A student at the accuracy floor, as on multisum from the weak student (docs/results/runs/multisum, seeds 0-1):
    rollout accuracy ~0.01 throughout, the gap above 0 and falling, the divergence falling, the intervention ratio
    level (1 for gkd, 0 for opd); the entropy climbs from 0.88 and the finished share falls from 0.83, both from
    step 8 to step 25 (AOPD: 1.6 and 0.1; OPD: 0.78 and 0.75)."""
    level = {"aopd": 0.62, "gkd": 1.0, "opd": 0.0}[mode]
    recs = series(100, lambda t: ramp(t, 8, 25, 0.88, entropy_to), lambda t: ramp(t, 1, 40, 0.17, 0.0),
                  lambda t: level, noise=noise, seed=seed)
    rng = np.random.default_rng(seed + 11)
    for r in recs:
        r[ACCURACY] = max(0.0, 0.01 + noise * rng.normal())
        r[DIVERGENCE] = ramp(r["step"], 1, 100, 1.7, 1.2) + noise * rng.normal()
        r[FINISHED] = min(1.0, max(0.0, ramp(r["step"], 8, 25, 0.83, finished_to) + noise * rng.normal()))
    return recs


def test_a_runaway_step_change_is_flagged_at_the_step_the_rule_says():
    """Flat until step 30, then entropy +0.4 and the finished share 0.9 -> 0.2 at once (default thresholds: window
    5, patience 3). After k steps of the new regime the window's finished share is 0.9 - 0.14 k, first below half
    the baseline (0.45) at k = 4 (0.34; at k = 3 0.48), the entropy condition holding from k = 1: held from step
    34, the alarm at step 36. Nothing else moves: the first signature never holds."""
    recs = series(60, lambda t: 0.3 + 0.4 * (t > 30), lambda t: 0.1, lambda t: 0.5)
    for r in recs:
        r[FINISHED] = 0.9 - 0.7 * (r["step"] > 30)
    step, outs = first_alarm(recs)
    assert step == 36
    assert outs[32]["drift/runaway"] == 0 and outs[33]["drift/runaway"] == 1 and outs[33]["drift/streak"] == 1
    assert outs[-1]["drift/finished_ratio"] == pytest.approx(0.2 / 0.9)
    # finish_drop_frac=1 turns the runaway off
    assert first_alarm(recs, DriftSection(finish_drop_frac=1.0))[0] is None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ["aopd", "gkd"])
def test_a_collapse_at_the_accuracy_floor_is_flagged_by_the_runaway_before_half(mode, seed):
    step, outs = first_alarm(floor_run(1.6, 0.1, mode, seed=seed))
    assert step is not None and 15 <= step < 30, step
    o = outs[step - 1]
    assert o["drift/runaway"] == 1 and o["drift/finished_ratio"] < 0.5 and o["drift/gap"] > 0
    assert "drift/accuracy_ratio" not in o  # at the floor the accuracy condition is off
    # the same run without the finished share logged: the first signature alone misses it
    bare = [{k: v for k, v in r.items() if k != FINISHED} for r in floor_run(1.6, 0.1, mode, seed=seed)]
    assert first_alarm(bare)[0] is None


@pytest.mark.parametrize("seed", range(3))
def test_fewer_finished_rollouts_without_the_entropy_climb_or_a_smaller_drop_is_not_enough(seed):
    assert first_alarm(floor_run(0.88, 0.1, seed=seed))[0] is None  # entropy level, the finished share falls
    assert first_alarm(floor_run(1.6, 0.55, seed=seed))[0] is None  # entropy climbs, finished 0.83 -> 0.55 (0.66x)
    assert first_alarm(floor_run(0.78, 0.75, "opd", seed=seed))[0] is None  # OPD from the weak multisum student


def test_the_runaway_warning_says_which_signature_held(caplog):
    with caplog.at_level(logging.WARNING, logger="student_trainer.drift"):
        step, _ = first_alarm(floor_run(1.6, 0.1), warn=True)
    msg = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msg) == 1 and "runaway" in msg[0] and "rollouts finished within the token limit" in msg[0]
    assert "loss.mode=opd" in msg[0]


def test_modes_without_an_intervention_ratio_or_any_signal_never_alarm():
    # OPD-like but with the other two conditions met: without the key the third condition is unmet
    opd = series(100, lambda t: ramp(t, 10, 80, 0.30, 0.80), lambda t: ramp(t, 10, 80, 0.005, -0.055), None)
    step, outs = first_alarm(opd)
    assert step is None and "drift/intervention_rise" not in outs[-1] and "drift/entropy_rise" in outs[-1]
    seqkd = [{"step": t, "optim/grad_norm": 1.0, "loss/nll": 1.0} for t in range(1, 60)]
    step, outs = first_alarm(seqkd)
    assert step is None and outs[-1] == {"drift/streak": 0, "drift/alarm": 0}
    nan = [{**r, ENTROPY: float("nan")} for r in collapse()]  # a non-finite value counts as absent
    assert first_alarm(nan)[0] is None


def test_the_first_alarm_warns_once_with_the_numbers_and_what_to_try(caplog):
    with caplog.at_level(logging.WARNING, logger="student_trainer.drift"):
        step, outs = first_alarm(collapse(), warn=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and sum(o["drift/alarm"] for o in outs) > 10
    msg = warnings[0]
    assert f"drift alarm at step {step}" in msg
    for text in ("policy entropy", "confidence gap", "intervention ratio", "loss.mode=aopd_add", "loss.tau=-0.5",
                 "loss.beta=1.0", "loss.mode=opd", "drift.enabled=false"):
        assert text in msg, text


def test_a_monitor_rebuilt_from_metrics_jsonl_continues_as_an_uninterrupted_one(tmp_path):
    recs = collapse(noise=0.02)
    _, expected = first_alarm(recs)
    # an interrupted run: logged steps 1..33 (and an eval line, a cut line), checkpointed at 30; resumed, it
    # logs 31.. again
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": 0, "eval/pass@1": 0.1})] + [json.dumps(r) for r in recs[:33]] + ['{"step": 34, "po']
    path.write_text("\n".join(lines + [json.dumps(r) for r in recs[30:]]) + "\n")
    assert [r["step"] for r in read_train_records(path)] == list(range(1, 101))
    resumed = DriftMonitor(DriftSection())
    resumed.replay(read_train_records(path, upto=30))
    assert [resumed.observe(r) for r in recs[30:]] == expected[30:]


def test_the_trainer_logs_drift_alarm_and_warns_once_across_a_resume(student_dir, teacher_url, data_files, tmp_path,
                                                                     caplog):
    # thresholds every run meets, so the alarm comes at the first step it can: baseline 1 + window 1 = step 2
    always = ["drift.baseline_steps=1", "drift.window=1", "drift.patience=1", "drift.entropy_rise=-9",
              "drift.entropy_rise_frac=-9", "drift.gap_margin=-9", "drift.intervention_rise=-9"]
    common = ["loss.mode=aopd", "train.steps=3", "train.eval_every=0", "train.save_every=1", *always]
    caplog.set_level(logging.INFO, logger="student_trainer")
    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "run", *common, "train.stop_after_steps=2"))
    assert [r.getMessage()[:21] for r in caplog.records if r.levelno == logging.WARNING] == ["drift alarm at step 2"]
    caplog.clear()
    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "run", *common), resume=True)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("drift alarm first raised at step 2, before this resume" in r.getMessage() for r in caplog.records)
    steps = read_train_records(tmp_path / "run" / "metrics.jsonl")
    assert [(r["step"], r["drift/alarm"], r["drift/streak"]) for r in steps] == [(1, 0, 0), (2, 1, 1), (3, 1, 2)]
    assert {"drift/entropy_rise", "drift/gap", "drift/intervention_rise"} <= steps[2].keys()

    train(make_cfg(student_dir, teacher_url, data_files, tmp_path / "off", "train.steps=1", "train.eval_every=0",
                   "drift.enabled=false"))
    (record,) = read_train_records(tmp_path / "off" / "metrics.jsonl")
    assert not [k for k in record if k.startswith("drift/")]
