"""Figures comparing training runs, read from each run's `metrics.jsonl`.

    python -m student_trainer.plot runs/opd runs/aopd [--out DIR] [--hist-steps 0,50,100]

writes PNGs (pass@k, policy entropy, gradient norm, intervention ratio, confidence gap, loss parts and the
advantage histogram at chosen steps), one line per run, labelled by the run's `config.yaml` `name` or its
directory name. A metric no run logged is skipped with a note. `plot_runs()` is the same for callers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend needed

logger = logging.getLogger(__name__)

# (file name, title, [(key, y label)]): one subplot per key
LINE_FIGURES = [
    ("entropy.png", "Policy entropy", [("policy/entropy", "entropy (nats / token)")]),
    ("grad_norm.png", "Gradient norm before clipping", [("optim/grad_norm", "grad norm")]),
    ("intervention_ratio.png", "AOPD intervention ratio", [("aopd/intervention_ratio", "mean m_t")]),
    (
        "confidence_gap.png",
        "Confidence gap (student - teacher)",
        [("conf/gap_sampled", "p_S(y_t) - p_T(y_t)"), ("conf/gap_top1", "top-1 p_S - top-1 p_T")],
    ),
    ("losses.png", "Loss parts", [("loss/pg", "policy-gradient part"), ("loss/div", "divergence part")]),
]
PASS_AT_K = re.compile(r"^eval/pass@(\d+)$")
HIST_COUNTS, HIST_EDGES = "adv/hist_counts", "adv/hist_edges"


@dataclass
class Run:
    label: str
    records: list[dict]  # metrics.jsonl lines, in file order

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a scalar key, sorted by step; a step logged twice (a resumed run) keeps the
        later value."""
        by_step = {}
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                by_step[r["step"]] = float(v)
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def histograms(self) -> dict[int, tuple[list[float], list[float]]]:
        """step -> (counts, edges) for the lines that carry an advantage histogram."""
        out = {}
        for r in self.records:
            counts, edges = r.get(HIST_COUNTS), r.get(HIST_EDGES)
            if counts is None or edges is None:
                continue
            if len(edges) != len(counts) + 1:
                logger.warning(
                    "%s step %s: %s has %d entries for %d counts; skipped",
                    *(self.label, r["step"], HIST_EDGES, len(edges), len(counts)),
                )
                continue
            out[r["step"]] = (counts, edges)
        return dict(sorted(out.items()))


def load_run(run_dir: str | Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a run directory written by the trainer")
    records = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # e.g. the last line of a run killed mid-write
                logger.warning("%s:%d is not valid JSON; skipped", path, lineno)
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            else:
                logger.warning("%s:%d has no integer 'step'; skipped", path, lineno)
    return Run(label=_run_label(run_dir), records=records)


def load_runs(run_dirs: list[str | Path]) -> list[Run]:
    """load_run for each directory; runs that share a label get their directory appended to it."""
    runs = [load_run(d) for d in run_dirs]
    counts = Counter(run.label for run in runs)
    for run, run_dir in zip(runs, run_dirs, strict=True):
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run_dir})"
    return runs


def _run_label(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        try:
            name = (yaml.safe_load(config.read_text()) or {}).get("name")
        except (yaml.YAMLError, AttributeError):
            name = None
        if name:
            return str(name)
    return run_dir.resolve().name


def line_figure(runs: list[Run], title: str, panels: list[tuple[str, str]]) -> Figure | None:
    """One subplot per (key, y label) that at least one run logged, one line per run; None if none did."""
    panels = [(key, ylabel) for key, ylabel in panels if any(run.series(key)[0] for run in runs)]
    if not panels:
        return None
    fig = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for run in runs:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=run.label)
            else:
                logger.info("run %s has no %s", run.label, key)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def hist_figure(runs: list[Run], hist_steps: list[int] | None = None) -> Figure | None:
    """One subplot per requested step, one line per run at its nearest logged step; None if no run logged a
    histogram. Default steps: the first, middle and last logged."""
    hists = {run.label: run.histograms() for run in runs}
    available = sorted({s for h in hists.values() for s in h})
    if not available:
        return None
    for label in (label for label, h in hists.items() if not h):
        logger.info("run %s has no %s", label, HIST_COUNTS)
    if not hist_steps:  # first, middle and last logged step
        hist_steps = sorted({available[0], available[len(available) // 2], available[-1]})
    fig = Figure(figsize=(5.0 * len(hist_steps), 4.2), layout="constrained")
    axes = fig.subplots(1, len(hist_steps), squeeze=False)[0]
    for ax, wanted in zip(axes, hist_steps, strict=True):
        for label, h in hists.items():
            if not h:
                continue
            step = min(h, key=lambda s: (abs(s - wanted), s))  # nearest logged step
            counts, edges = h[step]
            total = sum(counts)
            fractions = [c / total if total > 0 else 0.0 for c in counts]
            # one value per bin, drawn as a step line so several runs stay readable on one axis
            ax.stairs(fractions, edges, label=f"{label} (step {step})")
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")  # the tails (strongly negative A_t) are what the method is about
        ax.set_xlabel("advantage A_t = lp_T(y_t) - lp_S(y_t)")
        ax.set_ylabel("fraction of completion tokens")
        ax.set_title(f"step {wanted}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Advantage distribution")
    return fig


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path, hist_steps: list[int] | None = None) -> list[Path]:
    """Write the comparison figures for `run_dirs` into `out_dir`; returns the paths written.

    hist_steps: steps at which to draw the advantage histogram (each run uses its nearest logged step);
      default: the first, middle and last logged step.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = load_runs(run_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    figures = []
    ks = sorted({int(m.group(1)) for run in runs for r in run.records for key in r if (m := PASS_AT_K.match(key))})
    for k in ks:
        figures.append((f"pass_at_{k}.png", f"pass@{k} on held-out problems", [(f"eval/pass@{k}", f"pass@{k}")]))
    if 1 not in ks:
        logger.info("pass_at_1.png: no run logged eval/pass@1; skipped")
    figures += LINE_FIGURES

    written = []
    for name, title, panels in figures:
        fig = line_figure(runs, title, panels)
        if fig is None:
            logger.info("%s: no run logged %s; skipped", name, " or ".join(k for k, _ in panels))
            continue
        fig.savefig(out_dir / name, dpi=120)
        written.append(out_dir / name)
    fig = hist_figure(runs, hist_steps)
    if fig is None:
        logger.info("advantage_hist.png: no run logged %s; skipped", HIST_COUNTS)
    else:
        fig.savefig(out_dir / "advantage_hist.png", dpi=120)
        written.append(out_dir / "advantage_hist.png")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot and compare training runs from their metrics.jsonl")
    parser.add_argument("run_dirs", nargs="+", help="run directories, each with a metrics.jsonl")
    parser.add_argument(
        "--out", default=None, help="output directory (default: RUN_DIR/plots for one run, else ../plots beside them)"
    )
    parser.add_argument("--hist-steps", default=None, help="comma-separated steps for the advantage histogram")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    hist_steps = None
    if args.hist_steps:
        try:
            hist_steps = [int(s) for s in args.hist_steps.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--hist-steps takes comma-separated integers, got {args.hist_steps!r}")
    first = Path(args.run_dirs[0])
    out = Path(args.out) if args.out else (first if len(args.run_dirs) == 1 else first.resolve().parent) / "plots"
    try:
        written = plot_runs(args.run_dirs, out, hist_steps)
    except ValueError as e:
        parser.error(str(e))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
