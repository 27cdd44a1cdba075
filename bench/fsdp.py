"""The multi-process trainer (torchrun + FSDP2) against one process: per-rank memory, step time, agreement.

    python bench/fsdp.py [--ranks 2] [--steps 4] [--student-hidden 512] [--student-layers 8]

Builds a teacher and a larger student (tiny Qwen3s sharing one tokenizer) offline, starts the teacher server
(`python -m teacher_server`, hf engine) on 127.0.0.1, and runs the real trainer CLI twice on the same config:
`python -m student_trainer` (one process) and `torchrun --nproc-per-node R -m student_trainer` (FSDP2, gloo
on CPU, NCCL on GPUs). It prints, from each run's metrics.jsonl: the weights and optimizer state rank 0 holds
(`memory/*`, its shard), the median step time (first step dropped), and the largest relative difference of the
step losses and gradient norms between the two runs. One torch thread per process: R ranks use R cores where
one process uses one (the teacher shares them), so the step times compare compute, not a GPU's scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "timing/step_s" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args()

    from student_trainer.config import dump_config, load_config
    from student_trainer.tiny_models import build_tiny_model
    from teacher_server.process import free_port, serve_in_subprocess

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-fsdp-"))
    teacher_dir = build_tiny_model(tmp / "teacher", hidden_size=128, num_layers=2, seed=0)
    student_dir = build_tiny_model(tmp / "student", hidden_size=a.student_hidden, num_layers=a.student_layers,
                                   num_heads=max(1, a.student_hidden // 64), num_kv_heads=1,
                                   intermediate_size=3 * a.student_hidden, seed=1, tokenizer_dir=teacher_dir)
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + {j} =", "answer": str(i + j)}) for i in range(10) for j in range(10)))
    from safetensors.torch import load_file

    s_params = sum(v.numel() for v in load_file(str(student_dir / "model.safetensors")).values())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    chunk = a.prompts_per_step // a.ranks  # whole chunks per rank: both runs sample the same rollouts
    runs: dict[str, Path] = {}
    with serve_in_subprocess(str(teacher_dir), free_port(), "--dtype", "float32", "--max-top-k", "32") as teacher:
        for name, nproc in (("1 process", 1), (f"{a.ranks} ranks", a.ranks)):
            run_dir = tmp / f"run{nproc}"
            cfg = load_config(None, [
                f"model.path={student_dir}", f"teacher.url={teacher.url}", "teacher.top_k=32", f"data.train_path={data}",
                "data.apply_chat_template=false", f"rollout.prompts_per_step={a.prompts_per_step}",
                f"rollout.samples_per_prompt={a.samples}", f"rollout.max_new_tokens={a.max_new_tokens}",
                f"rollout.stream_chunk_prompts={chunk}", "loss.mode=aopd", "optim.lr=1e-4", f"train.steps={a.steps}",
                f"train.run_dir={run_dir}", "train.progress=false", "train.save_every=0",
            ])
            dump_config(cfg, tmp / f"run{nproc}.yaml")
            launcher = [sys.executable] if nproc == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            t0 = time.perf_counter()
            r = subprocess.run(launcher + ["-m", "student_trainer", "--config", str(tmp / f"run{nproc}.yaml")],
                               env=env, cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            runs[name] = run_dir

    rec = {name: records(d) for name, d in runs.items()}
    one, many = rec["1 process"], rec[f"{a.ranks} ranks"]
    rel = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(one, many, strict=True)
              for k in ("loss/total", "optim/grad_norm"))
    print(f"\nstudent {s_params / 1e6:.1f}M params ({a.student_layers} x {a.student_hidden}), float32; "
          f"{a.prompts_per_step} prompts x {a.samples} samples x <= {a.max_new_tokens} new tokens per step; "
          f"median over steps 2..{a.steps}; 1 torch thread per process")
    print(f"{'run':<12}{'weights MiB/rank':>18}{'optimizer MiB/rank':>20}{'step s':>9}{'tok/s':>8}")
    for name, rs in rec.items():
        last = rs[-1]
        print(f"{name:<12}{last['memory/weights_mib']:>18.1f}{last['memory/optimizer_mib']:>20.1f}"
              f"{statistics.median(r['timing/step_s'] for r in rs[1:]):>9.2f}"
              f"{statistics.median(r['throughput/tok_per_s'] for r in rs[1:]):>8.0f}")
    print(f"per-rank share of weights: {many[-1]['memory/weights_mib'] / one[-1]['memory/weights_mib']:.3f} "
          f"(1/{a.ranks} = {1 / a.ranks:.3f}); optimizer: "
          f"{many[-1]['memory/optimizer_mib'] / one[-1]['memory/optimizer_mib']:.3f}")
    print(f"largest relative difference of step loss / grad norm, {a.ranks} ranks vs 1 process: {rel:.2e}")


if __name__ == "__main__":
    main()
