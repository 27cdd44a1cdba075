"""The paper's continual-learning claim at toy scale: after distillation on addition, adapt each student to a
second task with one identical recipe, and measure what it keeps of addition and what it learns of the new task.

    python bench/continual.py [--runs runs/repro/addition] [--results docs/results/runs/addition]
                              [--init weak] [--methods opd,aopd,aopd_add,gkd] [--seeds 0,1,2] [--steps 150]

Students: the last checkpoint of each finished `bench/reproduce.py --task addition` run (in `--runs`; the
checkpoints are not committed, so this runs on the machine that ran the sweep). The second task (`--task-b`),
in the addition students' vocabulary, its prompts starting with a word addition never uses:
- `multisum`: toy/multisum.py's clean solutions (three 2-digit numbers added two at a time in any order),
  prompts `w0 : 4 7 + 2 8 + 9 1 = ?`;
- `max`: the larger of two 3-digit numbers, `w1 : 4 7 3 w2 2 8 9 = ?` -> `\\boxed{ 4 7 3 }`.
The recipe, the same for every student: supervised fine-tuning on task-B examples of training-split problems,
`--steps` steps of `--batch`, AdamW at `--lr` with 10 warm-up steps and a cosine decay, the data order fixed by
the source run's seed (so the students of one seed see the same batches). Measured before and after, sampled
at T = 1, `--eval-n` samples per problem: addition pass@1 on the first `--eval-problems` held-out problems
(toy/data/test.jsonl) and task B's on as many held-out ones, both by the trainer's verifier.

Writes `<results>/continual_<init>_<task B>_<steps>x<batch>_lr<lr>.json` (every measurement) and
`<results>/CONTINUAL_<the same>.md`: per method, mean ± std over
seeds of addition before and after and task B after, and the paired difference against OPD in addition
kept (after) with a 95% bootstrap interval over seeds and problems (bench/reproduce.py's `paired_bootstrap`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

LABELS = {"opd": "OPD", "aopd": "AOPD", "aopd_add": "AOPD-add", "gkd": "GKD", "aopd_tau-0.5": "AOPD tau=-0.5",
          "seqkd": "SeqKD", "exopd": "ExOPD", "aopd_zero": "AOPD-Zero"}


def last_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p.parent for p in (run_dir / "checkpoints").glob("step_*/COMPLETE"))
    return done[-1] if done else None


@torch.no_grad()
def per_problem_pass1(model, tok, prompts: list[str], check, n: int, max_new_tokens: int, seed: int) -> np.ndarray:
    """Mean correctness of n samples (T = 1) per prompt; `check(i, text)` judges prompt i's decoded completion."""
    from student_trainer.rollout import HFGenerator

    model.eval()
    rolls = HFGenerator(model, tok, batch_size=256).generate(
        [tok(p)["input_ids"] for p in prompts], n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    ok = np.zeros(len(prompts))
    for r in rolls:
        ok[r.prompt_index] += check(r.prompt_index, tok.decode(r.completion_ids, skip_special_tokens=True))
    return ok / n


class TaskB:
    """The second task: `example(rng)` -> (prompt, completion tokens with EOS, answer) of a training-split
    problem; `held_out(n)` -> n held-out (prompt, answer)."""

    def __init__(self, name: str):
        self.name = name
        self.max_new_tokens = 64 if name == "multisum" else 16

    def example(self, rng: random.Random) -> tuple[str, list[str], str]:
        if self.name == "multisum":
            from toy import multisum as msum

            while True:
                nums = msum.random_problem(rng)
                if not msum.is_held_out(nums):
                    return self._ms_prompt(msum.prompt(nums)), list(rng.choice(msum.clean_tokens(nums))), str(sum(nums))
        from toy.task import is_held_out

        while True:
            x, y = rng.randint(100, 999), rng.randint(100, 999)
            if not is_held_out(x, y):
                return self._max(x, y)

    def held_out(self, n: int) -> list[tuple[str, str]]:
        if self.name == "multisum":
            rows = map(json.loads, (ROOT / "toy/data/multisum/test.jsonl").read_text().splitlines()[:n])
            return [(self._ms_prompt(r["prompt"]), r["answer"]) for r in rows]
        from toy.task import sample_pairs

        return [self._max(x, y)[::2] for x, y in sample_pairs(n, held_out=True, seed=777)]

    @staticmethod
    def _ms_prompt(prompt: str) -> str:
        return prompt.replace("Q :", "w0 :", 1)

    @staticmethod
    def _max(x: int, y: int) -> tuple[str, list[str], str]:
        from toy.task import spaced

        return f"w1 : {spaced(x)} w2 {spaced(y)} = ?", f"\\boxed{{ {spaced(max(x, y))} }} <eos>".split(), str(max(x, y))


def recipe_tag(a) -> str:
    """One file per recipe (and init), so recipes compared side by side do not overwrite each other."""
    return f"{a.init}_{a.task_b}_{a.steps}x{a.batch}_lr{a.lr:g}"


def measure(model, tok, addition: list[dict], task_b: TaskB, held_b: list[tuple[str, str]], n: int,
            seed: int) -> dict[str, list[float]]:
    from student_trainer.evaluate import is_correct

    add = per_problem_pass1(model, tok, [p["prompt"] for p in addition],
                            lambda i, t: is_correct(t, addition[i]["answer"]), n, 48, seed)
    b = per_problem_pass1(model, tok, [p for p, _ in held_b], lambda i, t: is_correct(t, held_b[i][1]), n,
                          task_b.max_new_tokens, seed)
    return {"addition": add.tolist(), "task_b": b.tolist()}


def adapt(model, tok, task_b: TaskB, steps: int, batch: int, lr: float, seed: int) -> float:
    """The one recipe: supervised fine-tuning on task-B examples; returns the last loss."""
    from toy.train_teacher import cosine, optimizer_step, padded_batch

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(10, steps))
    rng = random.Random(seed)
    loss = float("nan")
    for _ in range(steps):
        seqs, labels = [], []
        for _ in range(batch):
            prompt, completion, _ = task_b.example(rng)
            p_ids, c_ids = tok.convert_tokens_to_ids(prompt.split()), tok.convert_tokens_to_ids(completion)
            seqs.append(p_ids + c_ids)
            labels.append([-100] * len(p_ids) + c_ids)
        loss = optimizer_step(model, opt, sched, *padded_batch(seqs, labels, tok.pad_token_id))
    model.eval()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/repro/addition")
    ap.add_argument("--results", default="docs/results/runs/addition")
    ap.add_argument("--init", default="weak")
    ap.add_argument("--methods", default="opd,aopd,aopd_add,gkd")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-problems", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=4)
    ap.add_argument("--task-b", default="multisum", choices=["multisum", "max"])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from reproduce import paired_bootstrap
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    runs, results = (ROOT / a.runs).resolve(), (ROOT / a.results).resolve()
    addition = [json.loads(x) for x in (ROOT / "toy/data/test.jsonl").read_text().splitlines()][: a.eval_problems]
    task_b = TaskB(a.task_b)
    held_b = task_b.held_out(a.eval_problems)
    out_file = results / f"continual_{recipe_tag(a)}.json"
    done = json.loads(out_file.read_text()) if out_file.exists() else {}
    recipe = (f"SFT on task B = {a.task_b}, {a.steps} steps x {a.batch}, AdamW lr {a.lr}, cosine; "
              f"{a.eval_problems} held-out problems per task x {a.eval_n} samples at T=1")
    t0 = time.time()
    for seed in (int(s) for s in a.seeds.split(",")):
        for method in a.methods.split(","):
            key = f"{a.init}/{method}/seed{seed}"
            ckpt = last_checkpoint(runs / a.init / method / f"seed{seed}")
            if key in done and done[key].get("recipe") == recipe:
                continue
            if ckpt is None:
                print(f"{key}: no finished checkpoint in {runs}, skipped", flush=True)
                continue
            tok = AutoTokenizer.from_pretrained(str(ckpt))
            model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
            before = measure(model, tok, addition, task_b, held_b, a.eval_n, seed)
            loss = adapt(model, tok, task_b, a.steps, a.batch, a.lr, seed)
            after = measure(model, tok, addition, task_b, held_b, a.eval_n, seed)
            done[key] = {"checkpoint": str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else str(ckpt),
                         "recipe": recipe, "final_sft_loss": loss, "before": before, "after": after}
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(done) + "\n")
            m = lambda d, t: 100 * float(np.mean(d[t]))  # noqa: E731
            print(f"{key}: addition {m(before, 'addition'):.1f} -> {m(after, 'addition'):.1f}, {a.task_b} "
                  f"{m(before, 'task_b'):.1f} -> {m(after, 'task_b'):.1f} ({time.time() - t0:.0f}s)", flush=True)
    write_table(results, done, a, recipe, paired_bootstrap)


def write_table(results: Path, done: dict, a, recipe: str, paired_bootstrap) -> None:
    def ms(xs):
        return f"{100 * statistics.mean(xs):.1f} ± {100 * (statistics.stdev(xs) if len(xs) > 1 else 0):.1f}" if xs else "n/a"

    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    lines = [f"# Continual learning at toy scale: addition students adapted to {a.task_b}", "",
             f"Command: `python bench/continual.py --task-b {a.task_b} --init {a.init} --methods {a.methods} --seeds "
             f"{a.seeds} --steps {a.steps} --lr {a.lr} --eval-problems {a.eval_problems}`. Recipe: {recipe}. "
             f"Students: the last checkpoints of the {a.init}-init runs of "
             "`bench/reproduce.py --task addition`. pass@1 in %, mean ± std over seeds.", "",
             f"| method | seeds | addition before | addition after | kept (after / before) | {a.task_b} after |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        rows = [done[k] for s in seeds if (k := f"{a.init}/{m}/seed{s}") in done and done[k]["recipe"] == recipe]
        b = [float(np.mean(r["before"]["addition"])) for r in rows]
        f = [float(np.mean(r["after"]["addition"])) for r in rows]
        t = [float(np.mean(r["after"]["task_b"])) for r in rows]
        kept = [x / y for x, y in zip(f, b, strict=True) if y > 0]
        lines.append(f"| {LABELS.get(m, m)} | {len(rows)} | {ms(b)} | {ms(f)} | "
                     f"{statistics.mean(kept):.2f} | {ms(t)} |" if rows else f"| {LABELS.get(m, m)} | 0 | | | | |")
    lines += ["", "Paired against OPD (same seed), percentage points, 95% bootstrap interval over seeds and problems:", "",
              f"| method | seeds | addition after − OPD's | interval | {a.task_b} after − OPD's | interval |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        if m == "opd":
            continue
        pairs = [(done[f"{a.init}/opd/seed{s}"], done[f"{a.init}/{m}/seed{s}"]) for s in seeds
                 if f"{a.init}/opd/seed{s}" in done and f"{a.init}/{m}/seed{s}" in done]
        if not pairs:
            continue
        cells = []
        for task in ("addition", "task_b"):
            mean, lo, hi, ahead, n = paired_bootstrap([np.array(o["after"][task]) for o, _ in pairs],
                                                      [np.array(x["after"][task]) for _, x in pairs])
            cells += [f"{100 * mean:+.1f} ({ahead} of {n} ahead)", f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
                      + (" no difference" if lo <= 0 <= hi else "")]
        lines.append(f"| {LABELS.get(m, m)} | {len(pairs)} | " + " | ".join(cells) + " |")
    (results / f"CONTINUAL_{recipe_tag(a)}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
