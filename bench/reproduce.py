"""The method's claims at toy scale, through the real client-server path (one command, resumable).

    python bench/reproduce.py [--steps 100] [--seeds 0,1,2] [--out runs/repro] [--ablations/--no-ablations]

Runs OPD, AOPD (tau=0, beta=0, K=32), AOPD-add, GKD, ExOPD, SeqKD and AOPD-Zero from the weak and the strong
student (toy/assets), each seed, with the same budget of steps and samples, every run a `python -m
student_trainer` process against a `python -m teacher_server` process on 127.0.0.1 (ExOPD's reference logprobs
come from a second server serving the student's initial weights). Then the ablations, one seed, weak init:
beta = 1 in AOPD, K in {8, 16}, tau in {-0.1, -0.5, -0.9}, support_norm = teacher.

Writes `<out>/RESULTS.md` (the Table-1-shaped table, mean +- std over seeds, the ablations, the diagnostics)
and `<out>/figures/*.png`. Finished runs are skipped when re-run, interrupted ones resume from their last
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teacher_server.process import serve_in_subprocess  # noqa: E402

METHODS = ["opd", "aopd", "aopd_add", "gkd", "exopd", "seqkd", "aopd_zero"]
ABLATIONS = {
    "aopd_beta1": ["loss.mode=aopd", "loss.beta=1.0"],
    "aopd_k8": ["loss.mode=aopd", "teacher.top_k=8"],
    "aopd_k16": ["loss.mode=aopd", "teacher.top_k=16"],
    "aopd_tau-0.1": ["loss.mode=aopd", "loss.tau=-0.1"],
    "aopd_tau-0.5": ["loss.mode=aopd", "loss.tau=-0.5"],
    "aopd_tau-0.9": ["loss.mode=aopd", "loss.tau=-0.9"],
    "aopd_teacher_norm": ["loss.mode=aopd", "loss.support_norm=teacher"],
}
LABELS = {"opd": "OPD", "aopd": "AOPD", "aopd_add": "AOPD-add", "gkd": "GKD", "exopd": "ExOPD", "seqkd": "SeqKD",
          "aopd_zero": "AOPD-Zero"}


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line cut by an interruption
    by_step: dict[tuple[int, bool], dict] = {}
    for r in recs:  # a resumed run may log a step twice: keep the last
        by_step[(r["step"], "eval/pass@1" in r)] = r
    train = [r for (s, ev), r in sorted(by_step.items()) if not ev]
    evals = [r for (s, ev), r in sorted(by_step.items()) if ev]
    return train, evals


def finished(run_dir: Path, steps: int) -> bool:
    _, evals = records(run_dir)
    return any(r["step"] == steps for r in evals)


def run(run_dir: Path, overrides: list[str], steps: int, log) -> float:
    if finished(run_dir, steps):
        return 0.0
    resume = (run_dir / "checkpoints").is_dir()
    cmd = [sys.executable, "-m", "student_trainer", "--config", str(ROOT / "toy" / "configs" / "base.yaml"),
           *overrides, f"train.steps={steps}", f"train.run_dir={run_dir}", "train.save_every=25", "train.keep_checkpoints=1"]
    if resume:
        cmd.append("--resume")
    t0 = time.time()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    dt = time.time() - t0
    log(f"{run_dir.relative_to(run_dir.parents[2])}: {dt:.0f}s")
    return dt


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def avg(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if key in r]
    return statistics.mean(vals) if vals else float("nan")


def after_first_mistake_share(run_dir: Path) -> tuple[float, float]:
    """Over dumped rollouts: share of intervened positions at or after the student's first mistake, and the share
    of all positions that lie there (for comparison)."""
    from toy.task import build_tokenizer, first_mistake

    path = run_dir / "rollouts.jsonl"
    if not path.exists():
        return float("nan"), float("nan")
    tok = build_tokenizer()
    problems = [json.loads(x) for x in (ROOT / "toy" / "data" / "train.jsonl").read_text().splitlines()]
    masked = masked_after = total = total_after = 0
    for line in path.read_text().splitlines():
        d = json.loads(line)
        p = problems[d["prompt_index"]]
        fm = first_mistake(tok.convert_ids_to_tokens(d["completion_ids"]), p["a"], p["b"])
        cut = len(d["mask"]) if fm is None else fm
        masked += sum(d["mask"])
        masked_after += sum(d["mask"][cut:])
        total += len(d["mask"])
        total_after += len(d["mask"]) - cut
    return masked_after / max(masked, 1), total_after / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--inits", default="weak,strong")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    a = ap.parse_args()
    out = (ROOT / a.out).resolve() if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    methods = a.methods.split(",")
    inits = a.inits.split(",")
    t_start = time.time()
    logf = open(out / "progress.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:6.0f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    assets = ROOT / "toy" / "assets"
    common = [f"data.eval_limit={a.eval_limit}", f"train.eval_every={max(1, a.steps // 4)}"]
    serve = ["--dtype", "float32", "--max-top-k", "32"]
    with (
        serve_in_subprocess(str(assets / "teacher"), None, "--engine", a.engine, *serve) as teacher,
        serve_in_subprocess(str(assets / "student_weak"), None, *serve) as ref_weak,
        serve_in_subprocess(str(assets / "student_strong"), None, *serve) as ref_strong,
    ):
        teacher_url = teacher.url
        refs = {"weak": ref_weak.url, "strong": ref_strong.url}
        log(f"teacher {teacher_url}, references {refs}")
        for init in inits:
            for seed in seeds:
                for method in methods:
                    rd = out / init / method / f"seed{seed}"
                    rd.parent.mkdir(parents=True, exist_ok=True)
                    ov = [f"model.path={assets / f'student_{init}'}", f"teacher.url={teacher_url}", f"loss.mode={method}",
                          f"train.seed={seed}", f"name={LABELS[method]}", *common]
                    if method == "exopd":
                        ov.append(f"teacher.ref_url={refs[init]}")
                    if method == "aopd_zero":
                        ov.append("loss.zero_eps=0.05")
                    run(rd, ov, a.steps, log)
        if a.ablations:
            for name, extra in ABLATIONS.items():
                rd = out / "ablations" / name / "seed0"
                rd.parent.mkdir(parents=True, exist_ok=True)
                ov = [f"model.path={assets / 'student_weak'}", f"teacher.url={teacher_url}", "train.seed=0",
                      f"name={name}", *common, *extra]
                run(rd, ov, a.steps, log)
    write_report(out, inits, seeds, methods, a, time.time() - t_start)
    log(f"done: {out / 'RESULTS.md'}")


def write_report(out: Path, inits, seeds, methods, a, wall_s: float) -> None:
    from student_trainer.plot import plot_runs

    figs = out / "figures"
    lines = [f"# Toy reproduction ({a.steps} steps x 16 prompts x 4 samples per run, K=32 unless noted)", "",
             f"Command: `python bench/reproduce.py --steps {a.steps} --seeds {a.seeds} --eval-limit {a.eval_limit}`; "
             f"wall time of this invocation {wall_s / 60:.1f} min (runs already finished are not re-run).",
             f"Held-out pass@1 / pass@4 in %, mean ± std over seeds {a.seeds} "
             f"({a.eval_limit} held-out problems x 4 samples).", ""]
    for init in inits:
        lines += [f"## {init} initialisation", "", "| method | pass@1 | pass@4 | entropy (late) | grad norm (late) | "
                  "intervention (early → late) | p_S(y) − p_T(y) (late) |", "|---|---|---|---|---|---|---|"]
        # SFT checkpoint row: the step-0 evaluation of the runs (the initial student)
        start = [records(out / init / m / f"seed{s}")[1] for m in methods for s in seeds]
        p1 = [e[0]["eval/pass@1"] for e in start if e]
        p4 = [e[0]["eval/pass@4"] for e in start if e]
        lines.append(f"| SFT checkpoint | {mean_std(p1)} | {mean_std(p4)} | | | | |")
        for m in methods:
            finals1, finals4, ent, gn, i0, i1, gap = [], [], [], [], [], [], []
            for s in seeds:
                tr, ev = records(out / init / m / f"seed{s}")
                if not ev or ev[-1]["step"] != a.steps:
                    continue
                finals1.append(ev[-1]["eval/pass@1"])
                finals4.append(ev[-1]["eval/pass@4"])
                late, early = tr[-max(1, len(tr) // 5):], tr[: max(1, len(tr) // 5)]
                ent.append(avg(late, "policy/entropy"))
                gn.append(avg(late, "optim/grad_norm"))
                i0.append(avg(early, "aopd/intervention_ratio"))
                i1.append(avg(late, "aopd/intervention_ratio"))
                gap.append(avg(late, "conf/gap_sampled"))
            f = lambda xs: f"{statistics.mean(xs):.3f}" if xs and xs[0] == xs[0] else "–"  # noqa: E731
            lines.append(f"| {LABELS[m]} | {mean_std(finals1)} | {mean_std(finals4)} | {f(ent)} | {f(gn)} | "
                         f"{f(i0)} → {f(i1)} | {f(gap)} |")
        lines.append("")
        plot_runs([out / init / m / "seed0" for m in methods if (out / init / m / "seed0" / "metrics.jsonl").exists()],
                  figs / init, hist_steps=[1, a.steps])
    abl = out / "ablations"
    if abl.is_dir():
        lines += ["## Ablations (weak initialisation, seed 0)", "",
                  "| run | pass@1 | pass@4 | entropy (late) | intervention (early → late) | teacher top-k entropy at "
                  "intervened / other positions | intervened positions after the first mistake (all positions there) |",
                  "|---|---|---|---|---|---|---|"]
        runs = [("aopd (tau=0, beta=0, K=32)", out / "weak" / "aopd" / "seed0")] + [
            (n, abl / n / "seed0") for n in ABLATIONS]
        for name, rd in runs:
            tr, ev = records(rd)
            if not ev:
                continue
            late, early = tr[-max(1, len(tr) // 5):], tr[: max(1, len(tr) // 5)]
            share, base = after_first_mistake_share(rd)
            lines.append(
                f"| {name} | {100 * ev[-1]['eval/pass@1']:.1f} | {100 * ev[-1]['eval/pass@4']:.1f} | "
                f"{avg(late, 'policy/entropy'):.3f} | {avg(early, 'aopd/intervention_ratio'):.3f} → "
                f"{avg(late, 'aopd/intervention_ratio'):.3f} | {avg(tr, 'teacher/topk_entropy_masked'):.3f} / "
                f"{avg(tr, 'teacher/topk_entropy_unmasked'):.3f} | {100 * share:.0f}% ({100 * base:.0f}%) |")
        plot_runs([rd for _, rd in runs if (rd / "metrics.jsonl").exists()], figs / "ablations", hist_steps=[1, a.steps])
        lines.append("")
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
