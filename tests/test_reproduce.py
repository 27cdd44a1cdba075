"""bench/reproduce.py's paired comparison: the bootstrap interval and the seeds-ahead count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap_centres_on_the_difference_and_covers_zero_only_when_it_should(reproduce):
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 5, 1000) / 4 for _ in range(5)]  # per-problem pass@1 of 5 seeds, 1000 problems
    same = reproduce.paired_bootstrap(base, base, samples=2000)
    assert same[:3] == (0.0, 0.0, 0.0) and same[3:] == (0, 5)
    ahead = [np.clip(b + 0.25 * (rng.random(1000) < 0.4), 0, 1) for b in base]  # +0.1 on average, minus clipping
    mean, lo, hi, wins, n = reproduce.paired_bootstrap(base, ahead, samples=2000)
    exact = float(np.mean([a - b for a, b in zip(ahead, base, strict=True)]))
    assert mean == pytest.approx(exact) and lo < mean < hi and lo > 0 and (wins, n) == (5, 5)
    # noise only, no shift: the interval covers 0; seeds ahead are a coin toss, not all of them
    noisy = [np.clip(b + rng.choice([-0.25, 0.25], 1000) * (rng.random(1000) < 0.3), 0, 1) for b in base]
    mean, lo, hi, wins, _ = reproduce.paired_bootstrap(base, noisy, samples=2000)
    assert lo < 0 < hi and abs(mean) < 0.02


def test_per_problem_reads_the_last_evaluation_of_a_step_in_problem_order(reproduce, tmp_path):
    rows = [{"step": 0, "n": 4, "index": [2, 0, 1], "correct": [4, 0, 2]},
            {"step": 100, "n": 4, "index": [1, 2, 0], "correct": [1, 1, 1]},
            {"step": 100, "n": 4, "index": [1, 2, 0], "correct": [4, 3, 2]}]  # a resumed run logs a step twice
    (tmp_path / "eval_problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx, p1 = reproduce.per_problem(tmp_path, 100)
    assert idx.tolist() == [0, 1, 2] and p1.tolist() == [0.5, 1.0, 0.75]
    idx, p1 = reproduce.per_problem(tmp_path, 0)
    assert p1.tolist() == [0.0, 0.5, 1.0]
    assert reproduce.per_problem(tmp_path, 50) is None


def test_claim_keeps_two_sweep_processes_off_one_run_and_takes_over_a_dead_ones(reproduce, tmp_path):
    import os
    import subprocess

    run_dir = tmp_path / "weak" / "opd" / "seed3"
    assert reproduce.claim(run_dir) and (run_dir / ".lock").read_text() == str(os.getpid())
    assert reproduce.claim(run_dir)  # our own lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / ".lock").write_text(str(other.pid))
        assert not reproduce.claim(run_dir)  # a live sweep holds it
    finally:
        other.kill()
        other.wait()
    assert reproduce.claim(run_dir) and (run_dir / ".lock").read_text() == str(os.getpid())  # it died: stale


def test_summary_puts_every_setting_in_one_table_with_the_paired_verdict(reproduce, tmp_path):
    rng = np.random.default_rng(1)

    def write_run(d: Path, p_final: float):
        d.mkdir(parents=True)
        correct = rng.binomial(4, p_final, 400)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
            {"step": 0, "eval/pass@1": 0.1}, {"step": 100, "eval/pass@1": float(correct.mean() / 4)})))
        (d / "eval_problems.jsonl").write_text(json.dumps(
            {"step": 100, "n": 4, "index": list(range(400)), "correct": correct.tolist()}) + "\n")

    for s in range(3):
        write_run(tmp_path / "addition" / "weak" / "opd" / f"seed{s}", 0.3)
        write_run(tmp_path / "addition" / "weak" / "gkd" / f"seed{s}", 0.6)  # far ahead
        write_run(tmp_path / "addition" / "weak" / "aopd" / f"seed{s}", 0.05)  # far behind
    text = reproduce.write_summary(tmp_path, ["opd", "aopd", "gkd", "seqkd"], lambda m: [0, 1, 2], 100)
    row = next(line for line in text.splitlines() if line.startswith("| addition | weak |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3].startswith("**−** -") and cells[3].endswith("0/3")
    assert cells[4].startswith("**+** +") and cells[4].endswith("3/3")
    assert cells[5] == "not yet run"
    assert "| addition | strong |" not in text and (tmp_path / "SUMMARY.md").read_text() == text


def test_drift_calibration_counts_a_collapse_only_below_opds_run_and_never_a_decline_opd_shares(
        reproduce, tmp_path, capsys, monkeypatch):
    """bench/drift_calibration.py on a made-up results tree (weak init, seed 0, 400 problems x 4, 100 steps): OPD
    declines 10% -> 5%, AOPD-add declines as much (declined as OPD: not counted), AOPD falls to 0 and below OPD
    (collapsed) with the runaway in its records from step 20 (flagged before half), GKD learns but shows the runaway
    too (a false alarm), SeqKD is level (flat)."""
    spec = importlib.util.spec_from_file_location("drift_calibration", ROOT / "bench" / "drift_calibration.py")
    calib = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "drift_calibration", calib)  # its dataclass looks its module up
    spec.loader.exec_module(calib)
    rng = np.random.default_rng(0)

    def correct(p):  # per-problem correct counts of 4 samples, every problem at rate p
        return rng.binomial(4, p, 400).tolist()

    def write(method, start, end, runaway):
        d = tmp_path / "weak" / method / "seed0"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("train:\n  steps: 100\n")
        lines = [{"step": 0, "eval/pass@1": start}]
        for t in range(1, 101):
            late = runaway and t > 20
            lines.append({"step": t, "optim/grad_norm": 1.0, "policy/entropy": 0.8 + 0.6 * late,
                          "conf/gap_sampled": 0.1, "rollout/finished_frac": 0.9 - 0.7 * late})
        lines.append({"step": 100, "eval/pass@1": end})
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        probs = [{"step": s, "n": 4, "index": list(range(400)), "correct": correct(p)} for s, p in ((0, start), (100, end))]
        (d / "eval_problems.jsonl").write_text("\n".join(json.dumps(x) for x in probs) + "\n")

    for method, start, end, runaway in (("opd", 0.1, 0.05, False), ("aopd_add", 0.1, 0.05, False),
                                        ("aopd", 0.1, 0.0, True), ("gkd", 0.1, 0.2, True), ("seqkd", 0.1, 0.1, False)):
        write(method, start, end, runaway)
    from student_trainer.config import DriftSection

    rows = {r.method: r for r in (calib.replay(tmp_path / "weak" / m / "seed0", DriftSection(), tmp_path)
                                  for m in ("opd", "aopd_add", "aopd", "gkd", "seqkd"))}
    assert rows["opd"].declined and not rows["opd"].collapsed and rows["opd"].vs_opd_hi is None
    add = rows["aopd_add"]
    assert add.declined and not add.collapsed and add.vs_opd_lo < 0 < add.vs_opd_hi
    assert rows["aopd"].collapsed and rows["aopd"].vs_opd_hi < 0 and rows["aopd"].flagged_early
    # from step 21 on: the window's finished share 0.9 - 0.14 k after k such steps, below half of 0.9 at k = 4 (step
    # 24), then patience 3
    assert rows["aopd"].first_alarm == 26
    assert not rows["gkd"].declined and rows["gkd"].first_alarm is not None
    assert rows["seqkd"].flat and rows["seqkd"].first_alarm is None
    monkeypatch.setattr(sys, "argv", ["drift_calibration.py", "--runs", str(tmp_path)])
    calib.main()
    out = capsys.readouterr().out
    assert "collapses flagged before half their steps: 1 / 1" in out
    assert "every decline (collapses and declines as OPD's) flagged before half: 1 / 3" in out
    assert "false alarms on runs that did not decline: 1 / 2 (1 learned, 1 flat)" in out
    assert "| weak | 5 | 1 | 1 | 0 | 0 | 2 (0) | 1 / 2 |" in out
