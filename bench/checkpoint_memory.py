"""Peak host memory per rank when a sharded (FSDP2) run saves and resumes a checkpoint: the full-state format
(before: rank 0 gathers the weights and the whole optimizer state and torch.saves it into trainer_state.pt;
every rank memory-maps it at resume) against the DCP one (after: each rank writes and reads its own shards of
the weights and optimizer state with torch.distributed.checkpoint; only the Hugging Face export of the weights
is gathered onto rank 0).

    python bench/checkpoint_memory.py [--ranks 2] [--hidden 1024] [--layers 12]

Builds a randomly initialised Qwen3 (float32; ~150M parameters by default) offline, then for each format runs
two `torchrun --nproc-per-node R` jobs (gloo, CPU), each phase in fresh processes:
  save:    the policy built as train.setup builds it (rank 0 reads, the others are filled by broadcast), AdamW
           state filled with random moments, then one checkpoint (`train.checkpoint`, or for "full" the code it
           replaced);
  resume:  as `--resume` does: the weights read from the checkpoint's Hugging Face export by rank 0 and
           broadcast as shards (the same code for both formats), then `train.restore` (optimizer, scheduler,
           RNG, data position).
Each phase's figure is the process's VmHWM (peak resident set, file-backed pages of a memory-mapped file
included) after the phase, the high-water mark reset just before it (`/proc/self/clear_refs`), and its rise
above the resident set at the start of the phase. One torch thread per process.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, re.M)}


class Phase:
    """Peak resident set over a block: VmHWM reset on entry (Linux >= 4.0), read on exit."""

    def __enter__(self):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.start = _status()["VmRSS"]
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = _status()["VmHWM"]
        return False


def build_policy(path: str, ranks, device):
    """The sharded policy exactly as train.setup builds it."""
    import torch

    from student_trainer.parallel import Policy, fill_from_rank0, full_state_before_sharding, load_causal_lm, shard

    model = load_causal_lm(path, torch.float32, None, meta=not ranks.main)
    policy = Policy(model)
    full = full_state_before_sharding(policy) if ranks.main else None
    shard(policy, ranks, device)
    fill_from_rank0(policy, ranks, device, full)
    del full
    return model, policy


def trainer_parts(policy):
    import torch

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    prompts = SimpleNamespace(state=None, state_dict=lambda: {"epoch": 0, "pos": 3},
                              load_state_dict=lambda st: setattr(prompts, "state", st))
    return optimizer, scheduler, prompts


def checkpoint_full_state(run, step: int) -> None:
    """`train.checkpoint` before dcp/ (the code it replaced): full weights and a full name-keyed optimizer state
    gathered onto rank 0, which writes them."""
    import torch

    from student_trainer.checkpoint import save_checkpoint
    from student_trainer.parallel import full_optimizer_state

    weights = run.weights.full_state()
    optim_state = full_optimizer_state(run.policy, run.optimizer)
    if run.ranks.main:
        save_checkpoint(run.run_dir, step, run.model, run.tokenizer,
                        {"step": step, "optimizer": optim_state, "scheduler": run.scheduler.state_dict(),
                         "sampler": run.prompts.state_dict(), "torch_rng": torch.get_rng_state()},
                        keep=run.cfg.train.keep_checkpoints, state_dict=weights)
    run.ranks.barrier()


def worker(a) -> None:
    import torch
    from transformers import AutoTokenizer

    from student_trainer import train
    from student_trainer.checkpoint import latest_checkpoint
    from student_trainer.parallel import StudentWeights, close_ranks, init_optimizer_state, init_ranks

    ranks, device = init_ranks("cpu", 1800)
    run_dir = Path(a.run_dir)
    out: dict = {"rank": ranks.rank, "format": a.format, "phase": a.worker}
    if a.worker == "save":
        model, policy = build_policy(a.model, ranks, device)
        optimizer, scheduler, prompts = trainer_parts(policy)
        init_optimizer_state(optimizer)
        torch.manual_seed(ranks.rank)
        for st in optimizer.state.values():  # real moments, resident like a trained run's
            st["step"].fill_(1)
            for k in ("exp_avg", "exp_avg_sq"):
                st[k].to_local().uniform_(0, 1e-3)
        run = SimpleNamespace(
            ranks=ranks, run_dir=run_dir, policy=policy, optimizer=optimizer, scheduler=scheduler, prompts=prompts,
            model=model, peft=None, tokenizer=AutoTokenizer.from_pretrained(a.model),
            weights=StudentWeights(policy, ranks, True), cfg=SimpleNamespace(train=SimpleNamespace(keep_checkpoints=2)),
        )
        ranks.barrier()
        with Phase() as ph:
            (train.checkpoint if a.format == "dcp" else checkpoint_full_state)(run, 1)
        out["save"] = ph.__dict__
    else:
        ckpt = latest_checkpoint(run_dir)
        ranks.barrier()
        with Phase() as weights_ph:
            _, policy = build_policy(str(ckpt), ranks, device)
            optimizer, scheduler, prompts = trainer_parts(policy)
        ranks.barrier()
        with Phase() as state_ph:
            step = train.restore(ckpt, policy, optimizer, scheduler, prompts)
        assert step == 1 and prompts.state == {"epoch": 0, "pos": 3}
        st = optimizer.state[next(iter(policy.parameters()))]
        assert float(st["exp_avg"].to_local().abs().max()) > 0, "moments restored"
        out["resume_weights"], out["resume_state"] = weights_ph.__dict__, state_ph.__dict__
    print("RESULT " + json.dumps(out), flush=True)
    ranks.barrier()
    close_ranks()


def launch(a, phase: str, fmt: str, model: Path, run_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}", __file__,
           "--worker", phase, "--format", fmt, "--model", str(model), "--run-dir", str(run_dir)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rows = [json.loads(line.removeprefix("RESULT ")) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda x: x["rank"])


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--worker", choices=["save", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--format", choices=["full", "dcp"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    from safetensors.torch import load_file

    from student_trainer.tiny_models import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-ckpt-"))
    model = build_tiny_model(tmp / "student", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64,
                             num_kv_heads=4, intermediate_size=3 * a.hidden, seed=1)
    n = sum(v.numel() for v in load_file(str(model / "model.safetensors")).values())
    mib = 2**20
    print(f"[bench] {n / 1e6:.1f}M parameters: {4 * n / mib:.0f} MiB of float32 weights, {8 * n / mib:.0f} MiB of "
          f"AdamW moments; {a.ranks} ranks, gloo on CPU; {tmp}", flush=True)
    table = []
    for fmt in ("full", "dcp"):
        run_dir = tmp / f"run_{fmt}"
        rows = launch(a, "save", fmt, model, run_dir) + launch(a, "resume", fmt, model, run_dir)
        ckpt = next((run_dir / "checkpoints").glob("step_*"))
        print(f"[bench] {fmt}: checkpoint {du(ckpt) / mib:.0f} MiB: "
              + ", ".join(f"{q.relative_to(ckpt)} {du(q) / mib if q.is_dir() else q.stat().st_size / mib:.0f}"
                          for q in sorted(ckpt.iterdir()) if (q.stat().st_size if q.is_file() else du(q)) > mib),
              flush=True)
        for r in range(a.ranks):
            got = {k: v for row in rows if row["rank"] == r for k, v in row.items() if isinstance(v, dict)}
            table.append((fmt, r, got))
    cols = [("save", "save"), ("resume_weights", "resume: weights"), ("resume_state", "resume: trainer state")]
    head = "| format | rank | " + " | ".join(f"{t} peak (rise) MiB, s" for _, t in cols) + " |"
    print("\n" + head + "\n|" + "---|" * (2 + len(cols)))
    for fmt, r, got in table:
        cells = [f"{got[k]['peak'] / mib:.0f} ({(got[k]['peak'] - got[k]['start']) / mib:+.0f}), {got[k]['seconds']:.1f}"
                 for k, _ in cols]
        print(f"| {'full state (before)' if fmt == 'full' else 'dcp (after)'} | {r} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
