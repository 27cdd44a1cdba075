"""Make the toy data files and the weak and strong students, the way the method's paper makes students:
a smaller model warmed up by supervised training on teacher-written solutions (sampled from the committed
teacher at T = 1), for few steps (weak initialisation) or more steps (strong initialisation).

    python -m toy.make_students [--weak-steps 200] [--strong-steps 400]

Writes toy/data/{train,test}.jsonl and toy/assets/student_{weak,strong}/ (+ STUDENTS.md with accuracies).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from toy.task import build_tokenizer, prompt, rows, sample_pairs, write_jsonl
from toy.train_teacher import accuracy, qwen3, sft_step

ASSETS = Path(__file__).parent / "assets"
DATA = Path(__file__).parent / "data"


def new_student(tok, hidden: int, layers: int, lr: float, seed: int):
    """A fresh student, its AdamW and its schedule (warm-up then constant: a checkpoint's strength depends on its
    step only, not on the run's length)."""
    student = qwen3(tok, hidden, layers, hidden // 64, 1, seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    return student, opt, sched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(ASSETS / "teacher"))
    ap.add_argument("--weak-steps", type=int, default=200)
    ap.add_argument("--strong-steps", type=int, default=400)
    ap.add_argument("--pool", type=int, default=4096, help="teacher-written solutions to warm up on")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-steps", default="", help="also print sampled held-out accuracy at these steps (e.g. 50,100)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from student_trainer.rollout import HFGenerator

    t0 = time.time()
    tok = build_tokenizer()
    train_pairs = sample_pairs(8000, held_out=False, seed=1)
    test_pairs = sample_pairs(1000, held_out=True, seed=12345)  # the first 200 are the earlier set
    write_jsonl(DATA / "train.jsonl", rows(train_pairs))
    write_jsonl(DATA / "test.jsonl", rows(test_pairs))

    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    pool_pairs = train_pairs[: a.pool]
    pool_file = DATA / f"teacher_pool_{a.pool}_seed{a.seed}.jsonl"
    if pool_file.exists():  # the teacher's samples are deterministic given the seed: reuse them
        pool = [tuple(json.loads(x)) for x in pool_file.read_text().splitlines()]
    else:
        rolls = HFGenerator(teacher, tok, batch_size=256).generate(
            [tok(prompt(x, y))["input_ids"] for x, y in pool_pairs], 1, max_new_tokens=48, temperature=1.0, seed=a.seed
        )
        # SFT text: the teacher's tokens, space-separated, so it tokenizes back to the same ids (EOS added later)
        pool = [
            (prompt(x, y), " ".join(tok.convert_ids_to_tokens([i for i in r.completion_ids if i != tok.eos_token_id])))
            for (x, y), r in zip(pool_pairs, rolls, strict=True)
        ]
        pool_file.write_text("".join(json.dumps(p) + "\n" for p in pool))
    print(f"teacher pool: {len(pool)} solutions ({time.time() - t0:.0f}s)", flush=True)

    rng = random.Random(a.seed)
    student, opt, sched = new_student(tok, a.hidden, a.layers, a.lr, a.seed)
    lines = []
    for step in range(1, a.strong_steps + 1):
        sft_step(student, opt, sched, tok, rng.sample(pool, a.batch))
        if str(step) in a.probe_steps.split(","):
            student.eval()
            acc = accuracy(student, tok, test_pairs[:100], temperature=1.0)
            print(f"probe: step {step} sampled accuracy {acc:.3f}", flush=True)
            student.train()
        if step in (a.weak_steps, a.strong_steps):
            name = "student_weak" if step == a.weak_steps else "student_strong"
            student.eval()
            greedy, sampled = accuracy(student, tok, test_pairs), accuracy(student, tok, test_pairs, temperature=1.0)
            student.train()
            student.save_pretrained(str(ASSETS / name))
            tok.save_pretrained(str(ASSETS / name))
            line = f"{name}: {step} warm-up steps, held-out accuracy greedy {greedy:.3f}, sampled at T=1 {sampled:.3f}"
            print(line, f"({time.time() - t0:.0f}s)", flush=True)
            lines.append(line)
    (ASSETS / "STUDENTS.md").write_text(
        f"Made by `python -m toy.make_students --weak-steps {a.weak_steps} --strong-steps {a.strong_steps} --pool {a.pool} "
        f"--batch {a.batch} --lr {a.lr} --hidden {a.hidden} --layers {a.layers} --seed {a.seed}`.\n\n"
        + "\n".join(f"- {x}" for x in lines) + "\n"
    )


if __name__ == "__main__":
    main()
