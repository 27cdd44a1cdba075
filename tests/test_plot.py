"""Run comparison plots: two synthetic run directories give non-empty PNGs for every logged metric, labels
from config.yaml or the directory name, a re-logged step (resumed run) keeps its later value, the advantage
histogram uses each run's nearest logged step, missing metrics and bad lines are skipped, and the CLI."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from student_trainer.plot import hist_figure, line_figure, load_run, load_runs, main, plot_runs

pytestmark = pytest.mark.numeric  # compares floating-point results (see `make test-numeric`)

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, *, aopd: bool, hist_steps: list[int], name: str | None = None, steps: int = 21):
    """A metrics.jsonl like the trainer's: a training line per step, eval lines every 5 steps, histograms."""
    run_dir.mkdir(parents=True)
    if name is not None:
        (run_dir / "config.yaml").write_text(f"name: {name}\nloss: {'aopd' if aopd else 'opd'}\n")
    rng = np.random.default_rng(int(aopd))
    lines = []
    for step in range(steps):
        line = {
            "step": step,
            "policy/entropy": 1.5 - step * (0.01 if aopd else 0.04),
            "optim/grad_norm": float(rng.uniform(0.5, 1.0) * (1 if aopd else 3)),
            "loss/pg": float(rng.normal()),
            "conf/gap_sampled": 0.01 * step,
        }
        if aopd:
            line |= {"aopd/intervention_ratio": 0.4 - 0.005 * step, "loss/div": 0.1}
        if step in hist_steps:
            edges = np.linspace(-4, 2, 13)
            counts = rng.integers(0, 50, 12).astype(float)
            line |= {"adv/hist_counts": counts.tolist(), "adv/hist_edges": edges.tolist()}
        lines.append(json.dumps(line))
        if step % 5 == 0:
            lines.append(json.dumps({"step": step, "eval/pass@1": 0.1 + step / 100, "eval/pass@4": 0.2 + step / 80}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    return [
        write_run(tmp_path / "run_a", aopd=True, hist_steps=[0, 10, 20], name="aopd tau=0"),
        write_run(tmp_path / "run_b", aopd=False, hist_steps=[0, 12, 20]),
    ]


def test_plot_two_runs_writes_pngs(two_runs, tmp_path):
    out = tmp_path / "plots"
    written = plot_runs(two_runs, out, hist_steps=[0, 10, 20])
    names = {p.name for p in written}
    assert names == {
        "pass_at_1.png", "pass_at_4.png", "entropy.png", "grad_norm.png", "intervention_ratio.png",
        "confidence_gap.png", "losses.png", "advantage_hist.png",
    }  # fmt: skip
    for path in written:
        assert path.parent == out
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.01  # something is drawn, not a blank canvas


def test_labels_and_series(two_runs):
    runs = [load_run(d) for d in two_runs]
    assert [r.label for r in runs] == ["aopd tau=0", "run_b"]  # config.yaml name, else the directory name
    fig = line_figure(runs, "entropy", [("policy/entropy", "entropy")])
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["aopd tau=0", "run_b"]
    x, y = ax.get_lines()[1].get_data()
    assert list(x) == list(range(21)) and y[20] == pytest.approx(1.5 - 20 * 0.04)
    # only run_a logged the intervention ratio: one line, no error
    fig = line_figure(runs, "ratio", [("aopd/intervention_ratio", "m"), ("conf/gap_top1", "never logged")])
    assert len(fig.axes) == 1 and [line.get_label() for line in fig.axes[0].get_lines()] == ["aopd tau=0"]
    assert line_figure(runs, "nothing", [("conf/gap_top1", "never logged")]) is None


def test_resumed_run_keeps_later_value_and_skips_bad_lines(tmp_path, caplog):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    lines = [
        {"step": 0, "policy/entropy": 1.0},
        {"step": 1, "policy/entropy": 0.9},
        {"step": 2, "policy/entropy": 0.8},  # lost: the run crashed and resumed from step 1
        {"step": 2, "policy/entropy": 0.7},
        {"step": 3, "policy/entropy": float("nan")},
        {"policy/entropy": 5.0},  # no step
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "policy/ent'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    with caplog.at_level(logging.WARNING):
        run = load_run(run_dir)
    assert run.series("policy/entropy") == ([0, 1, 2], [1.0, 0.9, 0.7])
    assert "metrics.jsonl:7 is not valid JSON" in caplog.text and "metrics.jsonl:6 has no integer 'step'" in caplog.text


def test_hist_uses_nearest_step(two_runs):
    runs = [load_run(d) for d in two_runs]
    fig = hist_figure(runs, [11, 19])
    assert [ax.get_title() for ax in fig.axes] == ["step 11", "step 19"]
    labels = [ax.get_legend_handles_labels()[1] for ax in fig.axes]
    # run_a logged 0, 10, 20 (11 -> 10); run_b 0, 12, 20 (11 -> 12); 19 -> 20 for both
    assert labels == [["aopd tau=0 (step 10)", "run_b (step 12)"], ["aopd tau=0 (step 20)", "run_b (step 20)"]]
    # drawn as fractions of the tokens: each run's bins sum to 1
    for patch in fig.axes[0].patches:
        assert math.isclose(sum(patch.get_data().values), 1.0, rel_tol=1e-9)
    default = hist_figure(runs)  # first, middle and last logged step
    assert [ax.get_title() for ax in default.axes] == ["step 0", "step 12", "step 20"]


def test_missing_metrics_skipped(tmp_path, caplog):
    run_dir = tmp_path / "eval_only"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/pass@1": 0.3}) + "\n")
    with caplog.at_level(logging.INFO):
        written = plot_runs([run_dir], tmp_path / "out")
    assert [p.name for p in written] == ["pass_at_1.png"]
    assert "entropy.png: no run logged policy/entropy; skipped" in caplog.text
    assert "advantage_hist.png: no run logged adv/hist_counts; skipped" in caplog.text
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        plot_runs([tmp_path / "nope"], tmp_path / "out")


def test_same_name_gets_directory(tmp_path):
    dirs = [write_run(tmp_path / d, aopd=True, hist_steps=[0], name="same", steps=3) for d in ("x", "y")]
    dirs.append(write_run(tmp_path / "z", aopd=True, hist_steps=[0], name="other", steps=3))
    assert [r.label for r in load_runs(dirs)] == [f"same ({dirs[0]})", f"same ({dirs[1]})", "other"]


def test_cli(two_runs, tmp_path):
    cmd = [sys.executable, "-m", "student_trainer.plot", *map(str, two_runs), "--hist-steps", "0,20"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.split()
    assert str(tmp_path / "plots" / "advantage_hist.png") in printed  # beside the run directories
    assert len(printed) == 8
    assert main([str(two_runs[0])]) == 0
    assert (two_runs[0] / "plots" / "pass_at_1.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
