"""The drift monitor: watches each step's metrics for the signature of AOPD's collapse and warns once.

In our toy reproduction (docs/results/runs/addition/RESULTS.md) AOPD at tau = 0 collapsed from the weak initialisation, and
the collapse showed before the accuracy fell: the policy entropy climbed, the student's confidence on its own
tokens fell below the teacher's (`conf/gap_sampled` = p_S(y) - p_T(y) < 0) and the intervention ratio rose.
The runs that learned did not show the three together. On the second toy task (multisum: several valid
paths, a teacher that redoes wrong steps) the strong student's AOPD collapse showed entropy and interventions
rising while the sampled rollouts' accuracy fell, but its confidence gap stayed above 0 until after half the
run: the confidence condition has an alternative, the rollouts' own accuracy falling. GKD collapsed there
too, and the intervention condition has an alternative for it, the divergence from the teacher rising. From
the weak multisum student, at the accuracy floor (about 1% pass@1, where no accuracy can be seen to fall), AOPD
and GKD collapsed another way: the entropy climbed and the rollouts stopped reaching an answer (the share
finished within the token limit 0.83 -> 0.16 in ten steps) while the gap stayed above 0 and neither the
intervention ratio nor the divergence rose. That is the second signature, the runaway.
`DriftMonitor.observe` takes the record the trainer writes to metrics.jsonl (rank 0's, reduced over ranks)
and returns `drift/*` metrics to add to it:

    baseline   per signal, the mean over the run's first `baseline_steps` steps
    window     per signal, the mean over the last `window` steps (checked once it no longer overlaps the baseline)
    signature  entropy:      window - baseline >= max(entropy_rise, entropy_rise_frac * baseline)
               confidence:   window gap <= -gap_margin, or accuracy: the rollouts' verified accuracy
                             (rollout/correct_frac) is below (1 - accuracy_drop_frac) x its baseline, from a
                             baseline of at least accuracy_floor (a student at the floor cannot fall)
               intervention: window - baseline >= intervention_rise, or divergence: the student's divergence
                             from the teacher on its own rollouts (div/all, every mode logs it) risen by at
                             least max(div_rise, div_rise_frac x baseline) (GKD's collapse on multisum:
                             its intervention ratio is 1 throughout)
    runaway    the second signature: the entropy condition, and the rollouts' finished share
               (rollout/finished_frac, the share ending with EOS within the token limit) below
               (1 - finish_drop_frac) x its baseline: measured on every rollout, it does not need a student
               above the floor
    alarm      either signature held on `patience` consecutive steps (`drift/alarm` = 1 on every such step);
               the first alarm logs one warning with the numbers and the settings that did not drift

A signal a mode does not log (seqkd logs none of the three) leaves its condition unmet, so such runs never
alarm; opd logs an intervention ratio of 0 and gkd of 1, which never rise. On resume the trainer rebuilds the
monitor by replaying the run's own metrics.jsonl up to the checkpoint's step (`read_train_records`, `replay`):
the state is a function of the logged records, so nothing is stored in the checkpoint.

Shape letters: W = steps in the trailing window, S = signals (entropy, gap, intervention ratio, accuracy,
divergence, finished share).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ENTROPY, GAP, INTERVENTION = "policy/entropy", "conf/gap_sampled", "aopd/intervention_ratio"
ACCURACY, DIVERGENCE, FINISHED = "rollout/correct_frac", "div/all", "rollout/finished_frac"
SIGNALS = (ENTROPY, GAP, INTERVENTION, ACCURACY, DIVERGENCE, FINISHED)

# What did not drift in our reproduction (docs/results/runs/SUMMARY.md: two toy tasks, two initialisations,
# 5 paired seeds, pass@1 at step 100). AOPD at tau = 0 collapsed on addition from the weak student (1.1 against
# OPD's 13.6) and on multisum from the strong one (0.2 against 49.4); GKD collapsed there too (3.0); from the weak
# multisum student (at the floor) AOPD, GKD and AOPD with beta = 1 ran away (docs/results/runs/multisum/DRIFT.md).
ADVICE = (
    "settings that did not drift in our toy reproduction (docs/results/runs/SUMMARY.md, pass@1 on addition "
    "weak / addition strong / multisum strong): loss.mode=opd (13.6 / 89.5 / 49.4); loss.mode=aopd_add "
    "loss.beta=1.0 (16.8 / 91.7 / 49.0, the one AOPD setting at or above OPD everywhere); loss.mode=aopd_add "
    "(16.0 / 93.2 / 41.8); loss.tau=-0.5 (15.5 / 90.6 / 46.2). loss.mode=gkd did not drift on addition but "
    "collapsed on multisum (3.0), where the teacher spreads over several valid paths; teacher.top_k=8/16 and "
    "loss.support_norm=teacher drifted like tau=0. From a student at the floor (multisum weak, 1.3%), where no "
    "on-policy loss learned, aopd, gkd and aopd beta=1 ran away (rollouts no longer finishing), aopd_add in 1 of 5 "
    "seeds, opd, tau=-0.5 and aopd_add beta=1 in none; loss.mode=seqkd (imitating the teacher's samples) was "
    "the one loss above its start there"
)


def _window_mean_S(values_WS: np.ndarray) -> np.ndarray:
    """Mean over the rows that are not NaN, per column; NaN where a column has none (a signal never logged)."""
    valid_WS = ~np.isnan(values_WS)
    counts_S = valid_WS.sum(axis=0)
    sums_S = np.where(valid_WS, values_WS, 0.0).sum(axis=0)
    return np.divide(sums_S, counts_S, out=np.full(sums_S.shape, np.nan), where=counts_S > 0)


def _signals_S(record: dict[str, Any]) -> np.ndarray:
    """The record's signals; NaN for a key it does not have (or a non-finite value)."""
    out = np.full(len(SIGNALS), np.nan)
    for i, key in enumerate(SIGNALS):
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[i] = float(v)
    return out


class DriftMonitor:
    """Fed one training record per step (`observe`); see the module docstring for the rule. `cfg` is the
    config's `drift` section (student_trainer/config.py DriftSection) or anything with the same attributes."""

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._baseline_rows: list[np.ndarray] = []  # the first baseline_steps records' signals
        self.baseline_S = np.full(len(SIGNALS), np.nan)  # their means, once all are in
        self._window_WS: deque[np.ndarray] = deque(maxlen=cfg.window)
        self.observed = 0
        self.streak = 0  # consecutive steps on which the signature held
        self.first_alarm_step: int | None = None

    def observe(self, record: dict[str, Any], warn: bool = True) -> dict[str, float | int]:
        """One step's record (as written to metrics.jsonl) -> the drift/* metrics to add to it. Logs a warning
        on the first alarm only (and not at all with warn=False)."""
        cfg = self.cfg
        row_S = _signals_S(record)
        self.observed += 1
        if len(self._baseline_rows) < cfg.baseline_steps:
            self._baseline_rows.append(row_S)
            if len(self._baseline_rows) == cfg.baseline_steps:
                self.baseline_S = _window_mean_S(np.stack(self._baseline_rows))
        self._window_WS.append(row_S)
        out: dict[str, float | int] = {}
        if self.observed < cfg.baseline_steps + cfg.window:  # the window still overlaps the baseline
            self.streak = 0
            out["drift/streak"] = 0
            out["drift/alarm"] = 0
            return out
        base_S, win_S = self.baseline_S, _window_mean_S(np.stack(self._window_WS))
        ent_rise, gap, int_rise = win_S[0] - base_S[0], win_S[1], win_S[2] - base_S[2]
        acc_ratio = win_S[3] / base_S[3] if base_S[3] >= cfg.accuracy_floor else math.nan
        div_rise = win_S[4] - base_S[4]
        fin_ratio = win_S[5] / base_S[5] if base_S[5] > 0 else math.nan
        for key, v in (("drift/entropy_rise", ent_rise), ("drift/gap", gap), ("drift/intervention_rise", int_rise),
                       ("drift/accuracy_ratio", acc_ratio), ("drift/div_rise", div_rise),
                       ("drift/finished_ratio", fin_ratio)):
            if not math.isnan(v):
                out[key] = float(v)
        # NaN compares False: a signal the mode does not log never meets its condition
        entropy = ent_rise >= max(cfg.entropy_rise, cfg.entropy_rise_frac * base_S[0])
        collapse = bool(
            entropy
            and (gap <= -cfg.gap_margin or acc_ratio < 1 - cfg.accuracy_drop_frac)
            and (int_rise >= cfg.intervention_rise or div_rise >= max(cfg.div_rise, cfg.div_rise_frac * base_S[4]))
        )
        runaway = bool(entropy and fin_ratio < 1 - cfg.finish_drop_frac)
        if not math.isnan(fin_ratio):
            out["drift/runaway"] = int(runaway)
        held = collapse or runaway
        self.streak = self.streak + 1 if held else 0
        alarm = self.streak >= cfg.patience
        out["drift/streak"] = self.streak
        out["drift/alarm"] = int(alarm)
        if alarm and self.first_alarm_step is None:
            self.first_alarm_step = int(record["step"])
            if warn:
                logger.warning("%s", self.describe(record["step"], base_S, win_S, runaway and not collapse))
        return out

    def describe(self, step: int, base_S: np.ndarray, win_S: np.ndarray, runaway: bool = False) -> str:
        c = self.cfg
        which = ("the runaway signature (entropy climbing, rollouts no longer finishing) of AOPD's and GKD's "
                 "collapse from a student at the accuracy floor" if runaway else "the signature of AOPD's collapse")
        return (
            f"drift alarm at step {step}: {which} in our toy reproduction held for "
            f"{self.streak} steps. Mean of the last {c.window} steps against the first {c.baseline_steps}: policy "
            f"entropy {win_S[0]:.3f} vs {base_S[0]:.3f} ({win_S[0] - base_S[0]:+.3f}; alarm at "
            f"{max(c.entropy_rise, c.entropy_rise_frac * base_S[0]):+.3f}), confidence gap p_S(y) - p_T(y) "
            f"{win_S[1]:+.4f} (alarm at <= {-c.gap_margin:+.4f}; below 0 the student is less sure of its own tokens "
            f"than the teacher) or rollout accuracy {win_S[3]:.3f} vs {base_S[3]:.3f} (alarm below "
            f"{1 - c.accuracy_drop_frac:.2f}x, from a baseline >= {c.accuracy_floor}), intervention ratio "
            f"{win_S[2]:.3f} vs {base_S[2]:.3f} ({win_S[2] - base_S[2]:+.3f}; alarm at {c.intervention_rise:+.3f}) or "
            f"divergence from the teacher {win_S[4]:.3f} vs {base_S[4]:.3f} (alarm at "
            f"{max(c.div_rise, c.div_rise_frac * base_S[4]):+.3f}); or, the runaway, rollouts finished within the "
            f"token limit {win_S[5]:.3f} vs {base_S[5]:.3f} (alarm below {1 - c.finish_drop_frac:.2f}x). "
            f"Accuracy tends to fall from here, or is falling; try the {ADVICE}. "
            "drift.* sets the thresholds, drift.enabled=false turns the monitor off"
        )

    def replay(self, records: Iterable[dict[str, Any]]) -> None:
        """Feed already-logged records without warning (a resumed run's history; calibration)."""
        for r in records:
            self.observe(r, warn=False)


def read_train_records(path: str | Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The training-step records of a metrics.jsonl (not the eval lines), one per step in step order, up to and
    including step `upto`. A step logged twice (steps after the last checkpoint of an interrupted run, logged
    again after its resume) keeps the later line; a line cut by an interruption is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "optim/grad_norm" in r and (upto is None or r["step"] <= upto):
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]
