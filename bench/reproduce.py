"""The method's claims at toy scale, through the real client-server path (one command, resumable).

    python bench/reproduce.py [--task addition|multisum] [--steps 100] [--seeds 0,1,2,3,4] [--extra-seeds 0,1,2]
                              [--eval-limit 1000] [--out runs/repro] [--results docs/results/runs]

Runs every method from the weak and the strong student (toy/assets, or toy/assets/multisum for the second
task), each seed, with the same budget of steps and samples, every run a `python -m student_trainer` process
against a `python -m teacher_server` process on 127.0.0.1 (ExOPD's reference logprobs come from a second server
serving the student's initial weights). The paired design: OPD, AOPD (tau=0, beta=0, K=32), AOPD-add and GKD on
`--seeds`; AOPD tau=-0.5 and SeqKD on `--extra-seeds` (the same seeds, fewer of them); ExOPD and AOPD-Zero with
`--methods`. Runs go seed by seed, every method of a seed before the next seed, so a partial sweep is paired.
Then, for addition, the ablations, one seed, weak init: beta = 1 in AOPD, K in {8, 16}, tau in {-0.1, -0.5,
-0.9}, support_norm = teacher.

Each finished run's small files (config, metrics.jsonl, per-problem evaluations, the intervention summary) are
copied to `--results/<task>/<init>/<method>/seed<N>` to be committed: a run found there is not run again, on
this machine or a fresh clone. Checkpoints stay in `--out` (interrupted runs resume from their last one).

Writes `<results>/<task>/RESULTS.md`: per init the table (mean +- std over seeds), the paired comparison
against OPD at the last step (mean difference in pass@1 with a 95% bootstrap interval that resamples seeds and
held-out problems, and the number of seeds in which the method is ahead), the ablations and diagnostics, and
figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from teacher_server.process import serve_in_subprocess  # noqa: E402

PAIRED = ["opd", "aopd", "aopd_add", "gkd"]
EXTRA = ["aopd_tau-0.5", "seqkd"]
VARIANTS = ["aopd_rkl", "aopd_add_rkl"]  # the "at most two further variants": VARIANT_NOTE says why
OTHER = ["exopd", "aopd_zero"]
METHODS = [*PAIRED, *EXTRA, *VARIANTS, *OTHER]
OVERRIDES = {"aopd_tau-0.5": ["loss.mode=aopd", "loss.tau=-0.5"], "aopd_zero": ["loss.mode=aopd_zero", "loss.zero_eps=0.05"],
             "aopd_rkl": ["loss.mode=aopd", "loss.beta=1.0"], "aopd_add_rkl": ["loss.mode=aopd_add", "loss.beta=1.0"]}
# Written on 2026-12-03 before any run of the two variants started (the commit that adds it has none of their runs).
VARIANT_NOTE = """### The two further variants, and why (written before their runs)

AOPD-add was not ahead of OPD everywhere: on multisum from the strong student, seed 0, it reached 41.3 pass@1
against OPD's 50.0 (AOPD itself fell from 27.1 to 0.3). What the runs measured, on both tasks: the positions
AOPD hands to the divergence are the ones where the teacher is unsure (teacher top-K entropy at intervened
positions 0.053 vs 0.005 elsewhere on addition, weak; 0.27-0.47 vs 0.07-0.23 on multisum, strong, where the
teacher also spreads its mass over the valid orders and over `wait`, which half its own samples say); there
the forward KL, being mass-covering, moves the student's mass onto every token the teacher gives some weight,
and the collapses are that: the entropy climbing (late, AOPD 0.80 against OPD's 0.15 on addition, weak; on
multisum, strong, 0.30 -> 1.43 over the run, the rollouts 32 -> 52 tokens long, `wait` after `wait`, 0.97 ->
0.3 of them finished within 64 tokens). AOPD-add keeps the policy gradient everywhere, which holds the drift,
but the added pull toward the spread teacher is still a cost on multisum.
The reverse KL on the support (beta = 1, `D = KL(p~S || p~T)`) is mode-seeking: its gradient moves mass only
from the tokens the student holds toward those among them the teacher prefers, and does not spread mass to a
teacher's minor modes. In the earlier sweep's addition ablation AOPD with beta = 1 reached 21.8 against 1.0
with beta = 0 (one seed). So the two variants keep each AOPD form and swap the forward KL for the reverse:
- `aopd_rkl`: AOPD (tau = 0, the divergence replaces the policy gradient where A <= 0) with beta = 1;
- `aopd_add_rkl`: AOPD-add (policy gradient everywhere, the divergence added where A <= 0) with beta = 1.
Expected if the mechanism is right: no entropy climb, and each at or above its forward-KL form, most on
multisum. Run on the extra seeds (0, 1, 2), paired with OPD, in every setting, and reported whatever they show.
"""
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
          "aopd_zero": "AOPD-Zero", "aopd_tau-0.5": "AOPD tau=-0.5", "aopd_rkl": "AOPD rev-KL",
          "aopd_add_rkl": "AOPD-add rev-KL"}
KEEP = ("config.yaml", "metrics.jsonl", "eval_problems.jsonl", "interventions.json")  # what --results keeps of a run


@dataclass(frozen=True)
class Task:
    name: str
    config: Path
    assets: Path
    train: Path

    def first_mistake(self, tokens: list[str], problem: dict) -> int | None:
        if self.name == "multisum":
            from toy.multisum import first_mistake

            return first_mistake(tokens, tuple(problem["nums"]))
        from toy.task import first_mistake

        return first_mistake(tokens, problem["a"], problem["b"])

    def tokenizer(self):
        if self.name == "multisum":
            from toy.multisum import build_tokenizer
        else:
            from toy.task import build_tokenizer
        return build_tokenizer()


TASKS = {
    "addition": Task("addition", ROOT / "toy" / "configs" / "base.yaml", ROOT / "toy" / "assets",
                     ROOT / "toy" / "data" / "train.jsonl"),
    "multisum": Task("multisum", ROOT / "toy" / "configs" / "multisum.yaml", ROOT / "toy" / "assets" / "multisum",
                     ROOT / "toy" / "data" / "multisum" / "train.jsonl"),
}


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


def claim(run_dir: Path) -> bool:
    """Take `run_dir` for this process (a `.lock` file with its pid), unless a live process holds it: several
    sweeps may share a machine (say `--seeds 0,1,2` and `--seeds 3,4`) without two of them training one run."""
    import os

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or 0)
                os.kill(holder, 0)  # alive: not ours to take
                return holder == os.getpid()
            except (ValueError, ProcessLookupError):
                lock.unlink(missing_ok=True)  # a stale lock of a process that died: take it over
                continue
            except PermissionError:
                return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def run(run_dir: Path, keep_dir: Path, task: Task, overrides: list[str], steps: int, log) -> float:
    """One training run, unless `keep_dir` already holds it finished; its small files go to `keep_dir` after.
    A run another live sweep process is training is skipped (see `claim`)."""
    if finished(keep_dir, steps):
        return 0.0
    if not claim(run_dir):
        log(f"{run_dir.relative_to(run_dir.parents[2])}: being run by another sweep process, skipped")
        return 0.0
    try:
        _run(run_dir, keep_dir, task, overrides, steps, log)
    finally:
        (run_dir / ".lock").unlink(missing_ok=True)
    return 0.0


def _run(run_dir: Path, keep_dir: Path, task: Task, overrides: list[str], steps: int, log) -> None:
    if not finished(run_dir, steps):
        resume = (run_dir / "checkpoints").is_dir()
        cmd = [sys.executable, "-m", "student_trainer", "--config", str(task.config), *overrides, f"train.steps={steps}",
               f"train.run_dir={run_dir}", "train.save_every=25", "train.keep_checkpoints=1"]
        if resume:
            cmd.append("--resume")
        t0 = time.time()
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as f:
            subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        log(f"{run_dir.relative_to(run_dir.parents[2])}: {time.time() - t0:.0f}s")
    summary = after_first_mistake_share(run_dir, task)
    (run_dir / "interventions.json").write_text(json.dumps(summary) + "\n")
    keep_dir.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, keep_dir / name)


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def avg(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if key in r]
    return statistics.mean(vals) if vals else float("nan")


def after_first_mistake_share(run_dir: Path, task: Task) -> dict[str, float]:
    """Over dumped rollouts: the share of intervened positions at or after the student's first mistake, and the
    share of all positions that lie there (for comparison)."""
    path = run_dir / "rollouts.jsonl"
    out = {"intervened_after_first_mistake": float("nan"), "positions_after_first_mistake": float("nan")}
    if not path.exists():
        return out
    tok = task.tokenizer()
    problems = [json.loads(x) for x in task.train.read_text().splitlines()]
    masked = masked_after = total = total_after = 0
    for line in path.read_text().splitlines():
        d = json.loads(line)
        fm = task.first_mistake(tok.convert_ids_to_tokens(d["completion_ids"]), problems[d["prompt_index"]])
        cut = len(d["mask"]) if fm is None else fm
        masked += sum(d["mask"])
        masked_after += sum(d["mask"][cut:])
        total += len(d["mask"])
        total_after += len(d["mask"]) - cut
    return {"intervened_after_first_mistake": masked_after / max(masked, 1),
            "positions_after_first_mistake": total_after / max(total, 1)}


def per_problem(run_dir: Path, step: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(problem indices, pass@1 per problem) of the run's evaluation at `step` (the last one logged for it)."""
    path = run_dir / "eval_problems.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["step"] == step]
    if not rows:
        return None
    r = rows[-1]
    order = np.argsort(r["index"])
    return np.asarray(r["index"])[order], np.asarray(r["correct"], dtype=np.float64)[order] / r["n"]


def paired_bootstrap(base: list[np.ndarray], other: list[np.ndarray], samples: int = 10000, seed: int = 0):
    """Mean over seeds of (other - base) pass@1, and its 95% interval by a two-level bootstrap: seeds resampled
    with replacement (pairs kept together), then held-out problems resampled (the same problems for both
    methods and every seed). `base[i]`, `other[i]`: per-problem pass@1 of seed i, the same problems in order."""
    d = np.stack([o - b for b, o in zip(base, other, strict=True)])  # [seeds, problems]
    rng = np.random.default_rng(seed)
    s, p = d.shape
    means = np.empty(samples)
    for i in range(samples):  # per bootstrap sample, not per problem: vectorised inside
        rows = d[rng.integers(0, s, s)]
        means[i] = rows[:, rng.integers(0, p, p)].mean()
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi), int((d.mean(axis=1) > 0).sum()), s


def compare(init_dir: Path, method: str, done: dict[str, list[int]], steps: int):
    """`paired_bootstrap` of `method` against OPD at `steps` over the seeds both finished (None: no such seed)."""
    pairs = [(per_problem(init_dir / "opd" / f"seed{s}", steps), per_problem(init_dir / method / f"seed{s}", steps))
             for s in done.get(method, []) if s in done.get("opd", [])]
    pairs = [(b, o) for b, o in pairs if b is not None and o is not None and np.array_equal(b[0], o[0])]
    if not pairs:
        return None
    return paired_bootstrap([b[1] for b, _ in pairs], [o[1] for _, o in pairs])


def verdict_of(lo: float, hi: float) -> str:
    return "no difference" if lo <= 0 <= hi else ("ahead of OPD" if lo > 0 else "behind OPD")


def write_summary(results_root: Path, methods: list[str], seeds_of, steps: int) -> str:
    """`<results_root>/SUMMARY.md`: every task and initialisation in one table, each method against OPD."""
    others = [m for m in methods if m != "opd"]
    lines = ["# Every task and initialisation against OPD", "",
             f"pass@1 at step {steps} in percentage points against OPD's, paired by seed: mean difference, 95% interval "
             "(2-level bootstrap over seeds and held-out problems), seeds ahead. Written by `python bench/reproduce.py "
             "--summary-only`; per setting, the tables and curves in `<task>/RESULTS.md`.", "",
             "| task | init | OPD | " + " | ".join(LABELS[m] for m in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for task in TASKS:
        for init in ("weak", "strong"):
            d = results_root / task / init
            done = {m: [s for s in seeds_of(m) if finished(d / m / f"seed{s}", steps)] for m in methods}
            if not done.get("opd"):
                continue
            opd = [records(d / "opd" / f"seed{s}")[1][-1]["eval/pass@1"] for s in done["opd"]]
            cells = []
            for m in others:
                c = compare(d, m, done, steps)
                if c is None:
                    cells.append("not yet run")
                    continue
                mean, lo, hi, ahead, n = c
                mark = {"ahead of OPD": "**+**", "behind OPD": "**−**", "no difference": "="}[verdict_of(lo, hi)]
                cells.append(f"{mark} {100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] {ahead}/{n}")
            lines.append(f"| {task} | {init} | {mean_std(opd)} ({len(opd)}) | " + " | ".join(cells) + " |")
    lines += ["", "**+** ahead of OPD (the interval above 0), **−** behind (below 0), = no difference (it covers 0); "
              "with 2 seeds or fewer the interval does not show the seed-to-seed spread."]
    text = "\n".join(lines) + "\n"
    (results_root / "SUMMARY.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="addition", choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="seeds of OPD, AOPD, AOPD-add and GKD")
    ap.add_argument("--extra-seeds", default="0,1,2",
                    help="seeds of AOPD tau=-0.5, SeqKD, the two variants (and ExOPD, AOPD-Zero)")
    ap.add_argument("--methods", default=",".join([*PAIRED, *EXTRA, *VARIANTS]), help=f"of {','.join(METHODS)}")
    ap.add_argument("--inits", default="weak,strong")
    ap.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=None,
                    help="the weak-init ablations (default: on for addition)")
    ap.add_argument("--eval-limit", type=int, default=1000, help="held-out problems (x 4 samples) per evaluation")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="steps between evaluations (default: a quarter of --steps; --steps: the start and the end only)")
    ap.add_argument("--out", default="runs/repro", help="run directories, checkpoints (git-ignored)")
    ap.add_argument("--results", default="docs/results/runs", help="finished runs' small files, to commit")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    ap.add_argument("--teacher", default=None,
                    help="serve this teacher instead of the task's (toy/assets[/multisum]/teacher): a sensitivity "
                         "check; use its own --results")
    ap.add_argument("--report-only", action="store_true", help="write RESULTS.md from --results, run nothing")
    ap.add_argument("--summary-only", action="store_true",
                    help="write --results/SUMMARY.md (every task and init against OPD), run nothing")
    a = ap.parse_args()
    a.defaults = vars(ap.parse_args([]))  # the report's command line names the options given otherwise
    task = TASKS[a.task]
    resolve = lambda x: (ROOT / x).resolve() if not Path(x).is_absolute() else Path(x)  # noqa: E731
    out, results = resolve(a.out) / a.task, resolve(a.results) / a.task
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    seeds, extra_seeds = [int(s) for s in a.seeds.split(",")], [int(s) for s in a.extra_seeds.split(",")]
    methods, inits = a.methods.split(","), a.inits.split(",")
    ablations = a.task == "addition" if a.ablations is None else a.ablations
    t_start = time.time()
    logf = open(out / "progress.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:6.0f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    def seeds_of(method: str) -> list[int]:
        return seeds if method in PAIRED else extra_seeds

    if a.summary_only:
        print(write_summary(resolve(a.results), [*PAIRED, *EXTRA, *VARIANTS], seeds_of, a.steps))
        return
    if not a.report_only:
        sweep(a, task, out, results, inits, methods, seeds_of, ablations, log)
    # the report covers every method with results, not only this invocation's --methods / --inits (a sweep of
    # two variants must not drop the others from RESULTS.md)
    shown = [m for m in METHODS if m in methods or any((results / i / m).is_dir() for i in ("weak", "strong"))]
    shown_inits = [i for i in ("weak", "strong") if i in inits or (results / i).is_dir()]
    write_report(results, a.task, shown_inits, shown, seeds_of, a, time.time() - t_start)
    log(f"done: {results / 'RESULTS.md'}")


def eval_every(a) -> int:
    return a.eval_every or max(1, a.steps // 4)


def sweep(a, task: Task, out: Path, results: Path, inits, methods, seeds_of, ablations: bool, log) -> None:
    common = [f"data.eval_limit={a.eval_limit}", f"train.eval_every={eval_every(a)}"]
    serve = ["--dtype", "float32", "--max-top-k", "32"]
    with (
        serve_in_subprocess(a.teacher or str(task.assets / "teacher"), None, "--engine", a.engine, *serve) as teacher,
        serve_in_subprocess(str(task.assets / "student_weak"), None, *serve) as ref_weak,
        serve_in_subprocess(str(task.assets / "student_strong"), None, *serve) as ref_strong,
    ):
        refs = {"weak": ref_weak.url, "strong": ref_strong.url}
        log(f"task {a.task}: teacher {teacher.url}, references {refs}")
        for init in inits:
            for seed in sorted({s for m in methods for s in seeds_of(m)}):
                for method in methods:
                    if seed not in seeds_of(method):
                        continue
                    rel = Path(init) / method / f"seed{seed}"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    ov = [f"model.path={task.assets / f'student_{init}'}", f"teacher.url={teacher.url}",
                          *OVERRIDES.get(method, [f"loss.mode={method}"]), f"train.seed={seed}",
                          f"name={LABELS[method]}", *common]
                    if method == "exopd":
                        ov.append(f"teacher.ref_url={refs[init]}")
                    run(out / rel, results / rel, task, ov, a.steps, log)
        if ablations:
            for name, extra in ABLATIONS.items():
                rel = Path("ablations") / name / "seed0"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                ov = [f"model.path={task.assets / 'student_weak'}", f"teacher.url={teacher.url}", "train.seed=0",
                      f"name={name}", *common, *extra]
                run(out / rel, results / rel, task, ov, a.steps, log)


def write_report(results: Path, task_name: str, inits, methods, seeds_of, a, wall_s: float) -> None:
    from student_trainer.plot import plot_runs

    figs = results / "figures"
    lines = [f"# Toy reproduction, task `{task_name}` ({a.steps} steps x 16 prompts x 4 samples per run, K=32 unless "
             "noted)", "",
             f"Command: `python bench/reproduce.py --task {task_name} --steps {a.steps} --seeds {a.seeds} "
             f"--extra-seeds {a.extra_seeds} --eval-limit {a.eval_limit}"
             + "".join(f" --{k.replace('_', '-')} {getattr(a, k)}" for k in ("eval_every", "inits", "methods", "teacher",
                                                                              "results") if getattr(a, k) != a.defaults[k])
             + "`; "
             "wall time of this invocation "
             f"{wall_s / 60:.1f} min (runs already finished are not re-run). Held-out pass@1 / pass@4 in %, mean ± "
             f"std over the seeds finished ({a.eval_limit} held-out problems x 4 samples at the start, every "
             f"{eval_every(a)} steps and the end).", ""]
    for init in inits:
        done = {m: [s for s in seeds_of(m) if finished(results / init / m / f"seed{s}", a.steps)] for m in methods}
        lines += [f"## {init} initialisation", "", "| method | seeds | pass@1 | pass@4 | entropy (late) | grad norm (late) | "
                  "intervention (early → late) | p_S(y) − p_T(y) (late) | intervened positions after the first mistake "
                  "(all positions there) |", "|---|---|---|---|---|---|---|---|---|"]
        start = [records(results / init / m / f"seed{s}")[1] for m in methods for s in done[m]]
        p1 = [e[0]["eval/pass@1"] for e in start if e and e[0]["step"] == 0]
        p4 = [e[0]["eval/pass@4"] for e in start if e and e[0]["step"] == 0]
        lines.append(f"| SFT checkpoint (step 0 of every run) | {len(p1)} | {mean_std(p1)} | {mean_std(p4)} | | | | | |")
        for m in methods:
            finals1, finals4, ent, gn, i0, i1, gap, after, base = [], [], [], [], [], [], [], [], []
            for s in done[m]:
                rd = results / init / m / f"seed{s}"
                tr, ev = records(rd)
                finals1.append(ev[-1]["eval/pass@1"])
                finals4.append(ev[-1]["eval/pass@4"])
                late, early = tr[-max(1, len(tr) // 5):], tr[: max(1, len(tr) // 5)]
                ent.append(avg(late, "policy/entropy"))
                gn.append(avg(late, "optim/grad_norm"))
                i0.append(avg(early, "aopd/intervention_ratio"))
                i1.append(avg(late, "aopd/intervention_ratio"))
                gap.append(avg(late, "conf/gap_sampled"))
                if (rd / "interventions.json").exists():
                    summ = json.loads((rd / "interventions.json").read_text())
                    after.append(summ["intervened_after_first_mistake"])
                    base.append(summ["positions_after_first_mistake"])
            f = lambda xs: f"{statistics.mean(xs):.3f}" if xs and xs[0] == xs[0] else "–"  # noqa: E731
            pct = lambda xs: f"{100 * statistics.mean(xs):.0f}%" if xs and xs[0] == xs[0] else "–"  # noqa: E731
            lines.append(f"| {LABELS[m]} | {len(done[m])} | {mean_std(finals1)} | {mean_std(finals4)} | {f(ent)} | {f(gn)} "
                         f"| {f(i0)} → {f(i1)} | {f(gap)} | {pct(after)} ({pct(base)}) |")
        lines += ["", f"Paired against OPD at step {a.steps} (pass@1, percentage points; seeds both finished; interval: "
                  "2-level bootstrap over seeds and held-out problems, 10,000 samples; \"no difference\" where it "
                  "covers 0):", "", "| method | seeds | mean difference | 95% interval | seeds ahead | verdict |",
                  "|---|---|---|---|---|---|"]
        for m in methods:
            if m == "opd":
                continue
            c = compare(results / init, m, done, a.steps)
            if c is None:
                lines.append(f"| {LABELS[m]} | 0 | | | | not yet run |")
                continue
            mean, lo, hi, ahead, n = c
            verdict = verdict_of(lo, hi)
            if n == 1:  # resampling one seed says nothing of seed-to-seed spread
                verdict += " (1 seed: the interval is the held-out problems' noise only)"
            elif n == 2:
                verdict += " (2 seeds: too few for the interval to show the seed-to-seed spread)"
            lines.append(f"| {LABELS[m]} | {n} | {100 * mean:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {ahead} of {n} "
                         f"| {verdict} |")
        lines.append("")
        seed0 = [results / init / m / "seed0" for m in methods if (results / init / m / "seed0" / "metrics.jsonl").exists()]
        if seed0:
            plot_runs(seed0, figs / init, hist_steps=[1, a.steps])
    abl = results / "ablations"
    if abl.is_dir():
        lines += ["## Ablations (weak initialisation, seed 0)", "",
                  "| run | pass@1 | pass@4 | entropy (late) | intervention (early → late) | teacher top-k entropy at "
                  "intervened / other positions | intervened positions after the first mistake (all positions there) |",
                  "|---|---|---|---|---|---|---|"]
        runs = [("aopd (tau=0, beta=0, K=32)", results / "weak" / "aopd" / "seed0")] + [
            (n, abl / n / "seed0") for n in ABLATIONS]
        for name, rd in runs:
            tr, ev = records(rd)
            if not ev or not (rd / "interventions.json").exists():
                continue
            late, early = tr[-max(1, len(tr) // 5):], tr[: max(1, len(tr) // 5)]
            summ = json.loads((rd / "interventions.json").read_text())
            lines.append(
                f"| {name} | {100 * ev[-1]['eval/pass@1']:.1f} | {100 * ev[-1]['eval/pass@4']:.1f} | "
                f"{avg(late, 'policy/entropy'):.3f} | {avg(early, 'aopd/intervention_ratio'):.3f} → "
                f"{avg(late, 'aopd/intervention_ratio'):.3f} | {avg(tr, 'teacher/topk_entropy_masked'):.3f} / "
                f"{avg(tr, 'teacher/topk_entropy_unmasked'):.3f} | "
                f"{100 * summ['intervened_after_first_mistake']:.0f}% ({100 * summ['positions_after_first_mistake']:.0f}%) |")
        plot_runs([rd for _, rd in runs if (rd / "metrics.jsonl").exists()], figs / "ablations", hist_steps=[1, a.steps])
        lines.append("")
    lines += [VARIANT_NOTE]
    (results / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
