"""`make demo`: AOPD on the toy task through the real system (a teacher server process, a trainer process,
HTTP between them), on the CPU, with nothing downloaded.

Starts `python -m teacher_server` on the committed teacher (toy/assets/teacher), trains the weak student with
AOPD (and, for comparison, OPD) through `python -m student_trainer`, evaluates before and after, prints a
small table and writes comparison plots. The server is stopped on exit, also on Ctrl-C or failure.

    python -m toy.demo [--steps 60] [--modes aopd,opd] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from teacher_server.process import serve_in_subprocess

HERE = Path(__file__).parent


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if "optim/grad_norm" in r], [r for r in recs if "eval/pass@1" in r]


def summarise(mode: str, run_dir: Path) -> dict:
    steps, evals = read_metrics(run_dir)
    head, tail = steps[: max(1, len(steps) // 5)], steps[-max(1, len(steps) // 5):]

    def mean(rs, k):
        return sum(r.get(k, 0.0) for r in rs) / len(rs)

    return {
        "mode": mode,
        "pass1_before": evals[0]["eval/pass@1"], "pass1_after": evals[-1]["eval/pass@1"],
        "pass4_before": evals[0].get("eval/pass@4", float("nan")), "pass4_after": evals[-1].get("eval/pass@4", float("nan")),
        "int_early": mean(head, "aopd/intervention_ratio"), "int_late": mean(tail, "aopd/intervention_ratio"),
        "ent_early": mean(head, "policy/entropy"), "ent_late": mean(tail, "policy/entropy"),
        "gn_late": mean(tail, "optim/grad_norm"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--modes", default="aopd,opd", help="comma-separated loss modes; the first is the headline")
    ap.add_argument("--student", default=str(HERE / "assets" / "student_weak"))
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    modes = [m for m in a.modes.split(",") if m]
    print(f"[demo] teacher: {HERE / 'assets' / 'teacher'} ({a.engine} engine); student: {a.student}; "
          f"modes: {', '.join(modes)}; {a.steps} steps each", flush=True)
    with serve_in_subprocess(str(HERE / "assets" / "teacher"), None, "--engine", a.engine, "--dtype", "float32",
                             "--max-top-k", "32") as teacher:
        url = teacher.url
        print(f"[demo] teacher server up at {url}", flush=True)
        for mode in modes:
            cmd = [
                sys.executable, "-m", "student_trainer", "--config", str(HERE / "configs" / "base.yaml"),
                f"model.path={a.student}", f"teacher.url={url}", f"loss.mode={mode}", f"train.steps={a.steps}",
                f"train.eval_every={a.steps}", f"data.eval_limit={a.eval_limit}", f"train.seed={a.seed}",
                f"train.run_dir={out / mode}", f"name={mode}",
            ]
            print(f"[demo] training: {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
    from student_trainer.plot import plot_runs

    figures = plot_runs([out / m for m in modes], out / "plots")
    rows = [summarise(m, out / m) for m in modes]
    print("\n[demo] weak student, held-out 3-digit addition "
          f"({a.eval_limit} problems x 4 samples), {a.steps} on-policy steps of 16 prompts x 4 samples")
    print(f"{'method':<8}{'pass@1 before':>15}{'pass@1 after':>14}{'pass@4 after':>14}{'interv. early->late':>22}"
          f"{'entropy early->late':>22}")
    for r in rows:
        print(f"{r['mode']:<8}{r['pass1_before']:>15.3f}{r['pass1_after']:>14.3f}{r['pass4_after']:>14.3f}"
              f"{r['int_early']:>11.3f} -> {r['int_late']:.3f}{r['ent_early']:>13.3f} -> {r['ent_late']:.3f}")
    print(f"[demo] figures: {', '.join(str(f) for f in figures)}")
    print(f"[demo] metrics: {', '.join(str(out / m / 'metrics.jsonl') for m in modes)}; wall time {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
