"""The drift monitor's detection table: student_trainer/drift.py replayed over a reproduction's runs.

    python bench/drift_calibration.py [--runs docs/results/runs/addition] [--seeds 0,1,2] [drift_key=value ...]

Every run directory under --runs with a metrics.jsonl (bench/reproduce.py's layout: <init>/<method>/seed<N>, and
ablations/<name>/seed0 from the weak initialisation) is replayed through `DriftMonitor` with the config's
default thresholds, or with those given as `key=value` (keys of the `drift` section, e.g. `patience=3`). The
alarms the runs logged themselves (drift/* in metrics.jsonl) are not used: the replay is what the given
thresholds would have done.

A run *declined* when its final held-out pass@1 is below its own step-0 pass@1 by more than the held-out
problems' noise: the per-problem paired difference (eval_problems.jsonl, step 0 against the last step) has a 95%
interval (mean +- 1.96 standard errors) below 0; without per-problem evaluations, when it is below at all. A
declined run *collapsed* when it also ended below OPD's run of the same initialisation and seed by more than that
noise (the same interval on the per-problem difference to OPD at the last step; without OPD's run, every decline
counts). A decline OPD's own run shares is not one the monitor can help with: its advice is to switch to OPD; such
runs (OPD's own declines among them, from a student at the accuracy floor) are listed as *declined as OPD*, an
alarm there is neither required nor false. A run whose own interval covers 0 is *flat*; every other finished run
*learned*. Flat and learning runs are the ones an alarm would be false on. Printed per run: its step-0 and final
pass@1, the class, and the step of the first alarm; then the totals: collapses flagged before half their steps,
every decline (the first definition, before OPD's pairing was added) flagged before half, and false alarms,
overall and per initialisation. Unfinished runs are listed but not counted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from student_trainer.config import DriftSection  # noqa: E402
from student_trainer.drift import DriftMonitor, read_train_records  # noqa: E402


@dataclass
class Row:
    init: str
    method: str
    seed: str
    steps: int  # the run's configured train.steps
    done: int  # steps it has logged
    pass0: float | None
    pass_final: float | None
    first_alarm: int | None
    change_lo: float | None = None  # 95% interval of the per-problem pass@1 change, step 0 -> final
    change_hi: float | None = None
    vs_opd_lo: float | None = None  # 95% interval of the per-problem final pass@1 minus OPD's (same init, seed)
    vs_opd_hi: float | None = None

    @property
    def finished(self) -> bool:
        return self.pass_final is not None

    @property
    def declined(self) -> bool:
        if not self.finished or self.pass0 is None:
            return False
        return self.change_hi < 0 if self.change_hi is not None else self.pass_final < self.pass0

    @property
    def collapsed(self) -> bool:
        """Declined, and ended below OPD's run of the same seed (OPD itself is the reference: never)."""
        if self.method == "opd" or not self.declined:
            return False
        return self.vs_opd_hi is None or self.vs_opd_hi < 0

    @property
    def declined_as_opd(self) -> bool:
        """A decline OPD's run shares (OPD's own among them): counted neither as a miss nor as a false alarm."""
        return self.declined and not self.collapsed

    @property
    def flagged_early(self) -> bool:
        return self.first_alarm is not None and self.first_alarm < self.steps / 2

    @property
    def flat(self) -> bool:
        return self.finished and not self.declined and self.change_lo is not None and self.change_lo <= 0


def change_interval(run_dir: Path, steps: int, base_dir: Path | None = None, base_step: int = 0):
    """95% interval (normal approximation) of the mean per-problem pass@1 difference: `run_dir` at `steps` minus
    `base_dir` (default: the run itself) at `base_step`; (None, None) without both per-problem evaluations."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    from reproduce import per_problem

    start, end = per_problem(base_dir or run_dir, base_step), per_problem(run_dir, steps)
    if start is None or end is None or not np.array_equal(start[0], end[0]) or len(start[0]) < 2:
        return None, None
    d = end[1] - start[1]
    half = 1.96 * float(d.std(ddof=1)) / len(d) ** 0.5
    return float(d.mean()) - half, float(d.mean()) + half


def eval_records(path: Path) -> dict[int, dict]:
    """step -> the eval line (a step evaluated twice, by a resumed run, keeps the later line)."""
    import json

    out = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "eval/pass@1" in r:
            out[r["step"]] = r
    return out


def replay(run_dir: Path, drift: DriftSection, runs_root: Path) -> Row:
    parts = run_dir.relative_to(runs_root).parts
    init, method, seed = ("/".join(parts[:-2]) or "-"), (parts[-2] if len(parts) > 1 else "-"), parts[-1]
    if init == "ablations":  # bench/reproduce.py's ablations start from the weak student
        init = "weak (ablation)"
    steps = int((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("train", {}).get("steps", 0))
    train = read_train_records(run_dir / "metrics.jsonl")
    monitor = DriftMonitor(drift)
    monitor.replay(train)
    evals = eval_records(run_dir / "metrics.jsonl")
    final = evals.get(steps) if steps and train and train[-1]["step"] == steps else None
    lo, hi = change_interval(run_dir, steps) if final else (None, None)
    # OPD's run of the same seed: <init>/opd/<seed>; the ablations start from the weak student
    opd_dir = runs_root / ("weak" if parts[0] == "ablations" else Path(*parts[:-2])) / "opd" / seed
    vs_lo, vs_hi = (None, None)
    if final and method != "opd" and (opd_dir / "eval_problems.jsonl").is_file():
        vs_lo, vs_hi = change_interval(run_dir, steps, opd_dir, steps)
    return Row(init, method, seed.removeprefix("seed"), steps, train[-1]["step"] if train else 0,
               evals[0]["eval/pass@1"] if 0 in evals else None, final["eval/pass@1"] if final else None,
               monitor.first_alarm_step, lo, hi, vs_lo, vs_hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="docs/results/runs/addition", help="a bench/reproduce.py results folder (one task)")
    ap.add_argument("--seeds", default=None, help="only these seeds, e.g. 2 (a held-out seed); default all")
    ap.add_argument("overrides", nargs="*", help="drift thresholds, e.g. window=8 patience=3")
    a = ap.parse_args()
    runs_root = Path(a.runs) if Path(a.runs).is_absolute() else (Path.cwd() / a.runs)
    values = {}
    for item in a.overrides:
        key, _, value = item.partition("=")
        values[key.removeprefix("drift.")] = yaml.safe_load(value)
    drift = DriftSection(**values)
    seeds = None if a.seeds is None else set(a.seeds.split(","))
    dirs = sorted((p.parent for p in runs_root.rglob("metrics.jsonl") if (p.parent / "config.yaml").is_file()),
                  key=lambda d: (d.relative_to(runs_root).parts[0] == "ablations", d))  # ablations last
    rows = [replay(d, drift, runs_root) for d in dirs]
    rows = [r for r in rows if seeds is None or r.seed in seeds]

    knobs = ", ".join(f"{k}={v}" for k, v in drift.model_dump().items() if k != "enabled")
    which = "" if seeds is None else f", seeds {a.seeds}"
    print(f"drift monitor replayed over {runs_root} ({len(rows)} runs{which}): {knobs}\n")
    print("| init | method | seed | pass@1 step 0 → final [95% interval of the change] | final − OPD's [95%] | class | "
          "first alarm | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p0 = "–" if r.pass0 is None else f"{100 * r.pass0:.1f}"
        if not r.finished:
            print(f"| {r.init} | {r.method} | {r.seed} | {p0} → (step {r.done}/{r.steps}) | | unfinished | "
                  f"{r.first_alarm or 'none'} | not counted |")
            continue
        if r.collapsed:
            verdict = ("flagged before half" if r.flagged_early else
                       "flagged late" if r.first_alarm is not None else "MISSED")
        elif r.declined_as_opd:
            verdict = "not counted" + (f" (alarm at {r.first_alarm})" if r.first_alarm is not None else "")
        else:
            verdict = "FALSE ALARM" if r.first_alarm is not None else "ok"
        ci = "" if r.change_lo is None else f" [{100 * r.change_lo:+.1f}, {100 * r.change_hi:+.1f}]"
        vs = "–" if r.vs_opd_lo is None else f"[{100 * r.vs_opd_lo:+.1f}, {100 * r.vs_opd_hi:+.1f}]"
        state = ("collapsed" if r.collapsed else "declined as OPD" if r.declined_as_opd else "flat" if r.flat else
                 "learned")
        print(f"| {r.init} | {r.method} | {r.seed} | {p0} → {100 * r.pass_final:.1f}{ci} | {vs} | "
              f"{state} | {r.first_alarm or 'none'} | {verdict} |")
    done = [r for r in rows if r.finished]
    collapsed = [r for r in done if r.collapsed]
    early = [r for r in collapsed if r.flagged_early]
    flagged = [r for r in collapsed if r.first_alarm is not None]
    declined = [r for r in done if r.declined]
    shared = [r for r in done if r.declined_as_opd]
    rest = [r for r in done if not r.declined]
    false = [r for r in rest if r.first_alarm is not None]
    print()
    print(f"collapses flagged before half their steps: {len(early)} / {len(collapsed)} "
          f"(flagged at all: {len(flagged)} / {len(collapsed)})")
    print(f"every decline (collapses and declines as OPD's) flagged before half: "
          f"{sum(r.flagged_early for r in declined)} / {len(declined)}; declines as OPD's with an alarm: "
          f"{sum(r.first_alarm is not None for r in shared)} / {len(shared)}")
    flat = [r for r in rest if r.flat]
    print(f"false alarms on runs that did not decline: {len(false)} / {len(rest)} "
          f"({len(rest) - len(flat)} learned, {len(flat)} flat)")
    if len(done) < len(rows):
        print(f"unfinished runs not counted: {len(rows) - len(done)}")
    print("\n| init | runs | collapsed | flagged before half | flagged late | missed | declined as OPD (alarmed) | "
          "false alarms (of the rest) |")
    print("|---|---|---|---|---|---|---|---|")
    for init in sorted({r.init for r in done}):
        rs = [r for r in done if r.init == init]
        col = [r for r in rs if r.collapsed]
        n_early = sum(r.flagged_early for r in col)
        n_late = sum(r.first_alarm is not None for r in col) - n_early
        sh = [r for r in rs if r.declined_as_opd]
        ok = [r for r in rs if not r.declined]
        print(f"| {init} | {len(rs)} | {len(col)} | {n_early} | {n_late} | {len(col) - n_early - n_late} | "
              f"{len(sh)} ({sum(r.first_alarm is not None for r in sh)}) | "
              f"{sum(r.first_alarm is not None for r in ok)} / {len(ok)} |")


if __name__ == "__main__":
    main()
