"""The drift monitor's detection table: student_trainer/drift.py replayed over a reproduction's runs.

    python bench/drift_calibration.py [--runs docs/results/runs/addition] [--seeds 0,1,2] [drift_key=value ...]

Every run directory under --runs with a metrics.jsonl (bench/reproduce.py's layout: <init>/<method>/seed<N>, and
ablations/<name>/seed0 from the weak initialisation) is replayed through `DriftMonitor` with the config's
default thresholds, or with those given as `key=value` (keys of the `drift` section, e.g. `patience=3`). The
alarms the runs logged themselves (drift/* in metrics.jsonl) are not used: the replay is what the given
thresholds would have done.

A run *collapsed* when its final held-out pass@1 is below its own step-0 pass@1 (the eval lines of its
metrics.jsonl); every other finished run *learned*. Printed per run: its step-0 and final pass@1, whether it
collapsed, and the step of the first alarm; then the totals: collapsing runs flagged before half their steps,
and false alarms (runs that learned yet alarmed). Unfinished runs are listed but not counted.
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

    @property
    def finished(self) -> bool:
        return self.pass_final is not None

    @property
    def collapsed(self) -> bool:
        return self.finished and self.pass0 is not None and self.pass_final < self.pass0


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
    return Row(init, method, seed.removeprefix("seed"), steps, train[-1]["step"] if train else 0,
               evals[0]["eval/pass@1"] if 0 in evals else None, final["eval/pass@1"] if final else None,
               monitor.first_alarm_step)


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
    print("| init | method | seed | pass@1 step 0 → final | collapsed | first alarm | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p0 = "–" if r.pass0 is None else f"{100 * r.pass0:.1f}"
        if not r.finished:
            print(f"| {r.init} | {r.method} | {r.seed} | {p0} → (step {r.done}/{r.steps}) | unfinished | "
                  f"{r.first_alarm or 'none'} | not counted |")
            continue
        if r.collapsed:
            verdict = ("flagged before half" if r.first_alarm is not None and r.first_alarm < r.steps / 2 else
                       "flagged late" if r.first_alarm is not None else "MISSED")
        else:
            verdict = "FALSE ALARM" if r.first_alarm is not None else "ok"
        print(f"| {r.init} | {r.method} | {r.seed} | {p0} → {100 * r.pass_final:.1f} | "
              f"{'yes' if r.collapsed else 'no'} | {r.first_alarm or 'none'} | {verdict} |")
    done = [r for r in rows if r.finished]
    collapsed = [r for r in done if r.collapsed]
    early = [r for r in collapsed if r.first_alarm is not None and r.first_alarm < r.steps / 2]
    flagged = [r for r in collapsed if r.first_alarm is not None]
    learned = [r for r in done if not r.collapsed]
    false = [r for r in learned if r.first_alarm is not None]
    print()
    print(f"collapsing runs flagged before half their steps: {len(early)} / {len(collapsed)} "
          f"(flagged at all: {len(flagged)} / {len(collapsed)})")
    print(f"false alarms on runs that learned: {len(false)} / {len(learned)}")
    if len(done) < len(rows):
        print(f"unfinished runs not counted: {len(rows) - len(done)}")


if __name__ == "__main__":
    main()
