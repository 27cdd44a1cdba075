"""Train the toy teacher: a Qwen3 (head_dim 64, so vLLM's CPU build can serve it) fitted by supervised
training on clean column-wise solutions of training-split problems. Its weights are committed in
`toy/assets/teacher` so the demo never trains its teacher first; this script and its seed reproduce them.

    python -m toy.train_teacher [--steps 1000] [--out toy/assets/teacher]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from toy.task import HIGH, LOW, build_tokenizer, is_held_out, prompt, sample_pairs, solution


def qwen3(tokenizer, hidden: int, layers: int, heads: int, kv_heads: int, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def padded_batch(seqs: list[list[int]], labels: list[list[int]], pad: int):
    """Token id lists and their labels (-100 where no loss) -> right-padded input ids, attention mask, labels."""
    L = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (L - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (L - len(x)) for x in labels])
    mask = (torch.arange(L)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    return ids, mask, lab


def sft_batch(tokenizer, pairs_or_texts: list[tuple[str, str]]):
    """(prompt, completion) texts -> input ids, attention mask, labels (loss on completion + EOS only)."""
    seqs, labels = [], []
    for p, c in pairs_or_texts:
        p_ids = tokenizer(p)["input_ids"]
        c_ids = tokenizer(c)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    return padded_batch(seqs, labels, tokenizer.pad_token_id)


def sft_step(model, opt, sched, tokenizer, batch) -> float:
    return optimizer_step(model, opt, sched, *sft_batch(tokenizer, batch))


def optimizer_step(model, opt, sched, ids, mask, lab) -> float:
    """One clipped AdamW step on the labelled batch; returns its loss."""
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model, tokenizer, pairs, temperature: float = 0.0, max_new_tokens: int = 48, seed: int = 0) -> float:
    from student_trainer.evaluate import is_correct
    from student_trainer.rollout import HFGenerator

    gen = HFGenerator(model, tokenizer, batch_size=128)
    rolls = gen.generate([tokenizer(prompt(a, b))["input_ids"] for a, b in pairs], 1, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed)
    texts = tokenizer.batch_decode([r.completion_ids for r in rolls], skip_special_tokens=True)
    return sum(is_correct(t, str(a + b)) for t, (a, b) in zip(texts, pairs, strict=True)) / len(pairs)


def cosine(warmup: int, total: int):
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))

    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="toy/assets/teacher")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    tok = build_tokenizer()
    model = qwen3(tok, a.hidden, a.layers, a.hidden // 64, max(1, a.hidden // 128), a.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(100, a.steps))
    test = sample_pairs(200, held_out=True, seed=12345)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = []
        while len(batch) < a.batch:
            x, y = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
            if not is_held_out(x, y):
                batch.append((prompt(x, y), solution(x, y)))
        loss = sft_step(model, opt, sched, tok, batch)
        if step % 100 == 0 or step == a.steps:
            acc = accuracy(model.eval(), tok, test[:100]) if step % 500 == 0 or step == a.steps else float("nan")
            model.train()
            print(f"step {step} loss {loss:.4f} held-out greedy acc {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    greedy, sampled = accuracy(model, tok, test), accuracy(model, tok, test, temperature=1.0)
    print(f"final held-out accuracy (200 problems): greedy {greedy:.3f}, sampled at T=1 {sampled:.3f}")
    out = Path(a.out)
    model.to(torch.bfloat16).save_pretrained(str(out))  # bf16 on disk: a few MB; served in float32
    tok.save_pretrained(str(out))
    (out / "TRAINING.md").write_text(
        f"Trained by `python -m toy.train_teacher --steps {a.steps} --batch {a.batch} --lr {a.lr} --hidden {a.hidden} "
        f"--layers {a.layers} --seed {a.seed}` in {time.time() - t0:.0f}s on a 2-core CPU.\n"
        f"Held-out accuracy (200 problems): greedy {greedy:.3f}, sampled at T=1 {sampled:.3f}.\n"
    )


if __name__ == "__main__":
    main()
