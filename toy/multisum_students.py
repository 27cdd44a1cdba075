"""Make the multisum data files and its weak and strong students, as toy/make_students.py does for addition: a
smaller model warmed up by supervised training on teacher-written solutions (sampled from the committed
multisum teacher at T = 1, so in the teacher's own mix of orders), for few steps (weak) or more (strong).

    python -m toy.multisum_students [--weak-steps 150] [--strong-steps 400]

Writes toy/data/multisum/{train,test}.jsonl (8000 training-split problems; 1000 held-out ones),
the teacher pool toy/data/multisum/teacher_pool_<n>_seed<s>.jsonl, and toy/assets/multisum/student_{weak,strong}/
with STUDENTS.md (accuracies on the 1000 held-out problems).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from toy import multisum as ms
from toy.make_students import new_student
from toy.multisum_teacher import complete, train_step


def held_out_accuracy(model, tok, problems, temperature: float) -> tuple[float, float]:
    """(valid path to the right answer, right last box: what the trainer's verifier reads)."""
    outs = complete(model, tok, problems, temperature=temperature, seed=0)
    valid = sum(ms.verify(o, p) for o, p in zip(outs, problems, strict=True)) / len(problems)
    boxed = sum(ms.last_boxed(o) == sum(p) for o, p in zip(outs, problems, strict=True)) / len(problems)
    return valid, boxed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ms.ASSETS / "teacher"))
    ap.add_argument("--weak-steps", type=int, default=150)
    ap.add_argument("--strong-steps", type=int, default=400)
    ap.add_argument("--pool", type=int, default=4096, help="teacher-written solutions to warm up on")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe-steps", default="", help="also print sampled held-out accuracy at these steps (e.g. 50,100)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    t0 = time.time()
    tok = ms.build_tokenizer()
    train_file, test_file = ms.write_data()
    train, test = ms.read_problems(train_file), ms.read_problems(test_file)

    pool_file = ms.DATA / f"teacher_pool_{a.pool}_seed{a.seed}.jsonl"
    if pool_file.exists():  # the teacher's samples are deterministic given the seed: reuse them
        pool = [(tuple(r["nums"]), r["completion"].split()) for r in map(json.loads, pool_file.read_text().splitlines())]
    else:
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
        outs = complete(teacher, tok, train[: a.pool], seed=a.seed)
        pool = list(zip(train[: a.pool], outs, strict=True))
        pool_file.write_text("".join(json.dumps({"nums": list(p), "prompt": ms.prompt(p), "completion": " ".join(o)})
                                     + "\n" for p, o in pool))
    valid = sum(ms.verify(o, p) for p, o in pool) / len(pool)
    print(f"teacher pool: {len(pool)} solutions, {valid:.3f} valid ({time.time() - t0:.0f}s)", flush=True)

    rng = random.Random(a.seed)
    student, opt, sched = new_student(tok, a.hidden, a.layers, a.lr, a.seed)
    lines = []
    for step in range(1, a.strong_steps + 1):
        train_step(student, opt, sched, tok, [(p, o, [1] * len(o)) for p, o in rng.sample(pool, a.batch)])
        if str(step) in a.probe_steps.split(","):
            student.eval()
            v, b = held_out_accuracy(student, tok, test[:200], temperature=1.0)
            print(f"probe: step {step} sampled (200 problems) valid {v:.3f}, right box {b:.3f}", flush=True)
            student.train()
        if step in (a.weak_steps, a.strong_steps):
            name = "student_weak" if step == a.weak_steps else "student_strong"
            student.eval()
            (gv, gb), (sv, sb) = (held_out_accuracy(student, tok, test, t) for t in (0.0, 1.0))
            student.train()
            student.save_pretrained(str(ms.ASSETS / name))
            tok.save_pretrained(str(ms.ASSETS / name))
            line = (f"{name}: {step} warm-up steps, held-out ({len(test)} problems) valid path to the right answer: "
                    f"greedy {gv:.3f}, sampled at T=1 {sv:.3f}; right last box (the trainer's verifier): greedy "
                    f"{gb:.3f}, sampled {sb:.3f}")
            print(line, f"({time.time() - t0:.0f}s)", flush=True)
            lines.append(line)
    (ms.ASSETS / "STUDENTS.md").write_text(
        f"Made by `python -m toy.multisum_students --weak-steps {a.weak_steps} --strong-steps {a.strong_steps} "
        f"--pool {a.pool} --batch {a.batch} --lr {a.lr} --hidden {a.hidden} --layers {a.layers} --seed {a.seed} "
        f"--threads {a.threads}` in {time.time() - t0:.0f}s on one CPU core, from the teacher in "
        f"toy/assets/multisum/teacher ({valid:.3f} of its {len(pool)} pool solutions valid).\n\n"
        + "\n".join(f"- {x}" for x in lines) + "\n"
    )


if __name__ == "__main__":
    main()
