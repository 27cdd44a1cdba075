"""LoRA against full-weight training on CPU: trainer memory and step time, and the per-step weight sync to vLLM.

    python bench/lora.py [--steps 5] [--ranks 16,64] [--student-hidden 512] [--student-layers 8] [--skip-vllm]

Builds a teacher and a student of a few tens of millions of parameters (tiny Qwen3s sharing one tokenizer)
offline and starts the teacher server (`python -m teacher_server`, hf engine) on 127.0.0.1.

1. Trainer: the real trainer CLI (`python -m student_trainer`, hf sampler, float32) on one config, full
   weights and `model.lora.rank=R` for each R. From metrics.jsonl: the weights, gradients and optimizer state
   the process holds (`memory/*`), its peak resident host memory, and the median update and step times
   (first step dropped).
2. Sync (unless --skip-vllm): a vLLM engine (CPU build) per mode, fed what the trainer feeds it after each
   step: full weights (`VLLMGenerator.load_weights`: safetensors written, engine reloads in place) or the
   adapter (`after_update`: the adapter in peft's format, taken as a new LoRA request). Median wall time of
   `--syncs` pushes, the bytes written per push, and one rollout's generate time with each.
One torch thread for the trainer (the teacher has the other core).
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


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json"))


def trainer_runs(a, tmp: Path, teacher_dir: Path, student_dir: Path, data: Path) -> list[tuple[str, dict]]:
    from student_trainer.config import dump_config, load_config
    from teacher_server.process import free_port, serve_in_subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    modes = [("full", [])] + [(f"LoRA r={r}", [f"model.lora.rank={r}"]) for r in a.ranks]
    out = []
    with serve_in_subprocess(str(teacher_dir), free_port(), "--dtype", "float32", "--max-top-k", "32") as teacher:
        for name, extra in modes:
            run_dir = tmp / name.replace(" ", "_").replace("=", "")
            cfg = load_config(None, [
                f"model.path={student_dir}", f"teacher.url={teacher.url}", "teacher.top_k=32", f"data.train_path={data}",
                "data.apply_chat_template=false", f"rollout.prompts_per_step={a.prompts_per_step}",
                f"rollout.samples_per_prompt={a.samples}", f"rollout.max_new_tokens={a.max_new_tokens}",
                "loss.mode=aopd", "optim.lr=1e-4", f"train.steps={a.steps}", f"train.run_dir={run_dir}",
                "train.progress=false", "train.save_every=0", *extra,
            ])
            dump_config(cfg, run_dir.with_suffix(".yaml"))
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "student_trainer", "--config", str(run_dir.with_suffix(".yaml"))],
                               env=env, cwd=ROOT, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
            print(f"[bench] trainer {name}: {time.perf_counter() - t0:.1f}s", flush=True)
            rs = records(run_dir)
            last = rs[-1]
            out.append((name, {
                "weights": last["memory/weights_mib"], "grads": last["memory/gradients_mib"],
                "optim": last["memory/optimizer_mib"], "host_peak": last["memory/host_peak_mib"],
                "update_s": statistics.median(x["timing/update_s"] for x in rs[1:]),
                "step_s": statistics.median(x["timing/step_s"] for x in rs[1:]),
            }))
    return out


def sync_runs(a, tmp: Path, student_dir: Path) -> list[tuple[str, dict]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.config import LoraSection
    from student_trainer.lora import apply_lora
    from student_trainer.parallel import Policy, Ranks, StudentWeights
    from student_trainer.rollout_vllm import VLLMGenerator

    tok = AutoTokenizer.from_pretrained(str(student_dir))
    prompts = [[2, 10 + i, 11, 12] for i in range(8)]
    out = []
    for name, rank in [("full reload", None)] + [(f"adapter r={r}", r) for r in a.ranks]:
        model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
        peft = apply_lora(model, LoraSection(rank=rank)) if rank else None
        weights = StudentWeights(Policy(model), Ranks(), False, peft)
        wdir = tmp / f"weights_{rank or 'full'}"
        gen = VLLMGenerator(str(student_dir), tok, dtype="float32", max_model_len=256, weights_dir=str(wdir),
                            lora_rank=rank)
        try:
            times, gen_s = [], []
            for i in range(a.syncs + 1):
                with torch.no_grad():  # a new update each time, as after an optimizer step
                    for p in (p for p in model.parameters() if p.requires_grad):
                        p.add_(torch.randn_like(p) * 1e-3)
                t0 = time.perf_counter()
                gen.after_update(weights)
                if i:  # the first push warms the engine up
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                gen.generate(prompts, 4, max_new_tokens=a.max_new_tokens, temperature=1.0, seed=i)
                if i:
                    gen_s.append(time.perf_counter() - t0)
            out.append((name, {"sync_s": statistics.median(times), "bytes": dir_bytes(wdir),
                               "generate_s": statistics.median(gen_s)}))
            print(f"[bench] sync {name}: {out[-1][1]}", flush=True)
        finally:
            gen.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64])
    p.add_argument("--student-hidden", type=int, default=512)
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--syncs", type=int, default=5)
    p.add_argument("--skip-vllm", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from safetensors.torch import load_file

    from student_trainer.tiny_models import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-lora-"))
    teacher_dir = build_tiny_model(tmp / "teacher", hidden_size=128, num_layers=2, seed=0)
    student_dir = build_tiny_model(tmp / "student", hidden_size=a.student_hidden, num_layers=a.student_layers,
                                   num_heads=max(1, a.student_hidden // 64), num_kv_heads=1,
                                   intermediate_size=3 * a.student_hidden, seed=1, tokenizer_dir=teacher_dir)
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + {j} =", "answer": str(i + j)}) for i in range(10) for j in range(10)))
    params = sum(v.numel() for v in load_file(str(student_dir / "model.safetensors")).values())

    train_rows = trainer_runs(a, tmp, teacher_dir, student_dir, data)
    sync_rows = [] if a.skip_vllm else sync_runs(a, tmp, student_dir)

    print(f"\nstudent {params / 1e6:.1f}M params ({a.student_layers} layers x {a.student_hidden}), float32, CPU; "
          f"{a.prompts_per_step} prompts x {a.samples} samples x <= {a.max_new_tokens} new tokens per step; "
          f"medians over steps 2..{a.steps}; LoRA on q,k,v,o,gate,up,down")
    print(f"{'trainer':<12}{'weights MiB':>12}{'grads MiB':>11}{'optim MiB':>11}{'host peak MiB':>15}"
          f"{'update s':>10}{'step s':>8}")
    for name, r in train_rows:
        print(f"{name:<12}{r['weights']:>12.1f}{r['grads']:>11.1f}{r['optim']:>11.1f}{r['host_peak']:>15.0f}"
              f"{r['update_s']:>10.3f}{r['step_s']:>8.3f}")
    if sync_rows:
        print(f"\n{'vLLM sync':<14}{'per step s':>11}{'MiB written':>13}{'generate s':>12}   (median of {a.syncs})")
        for name, r in sync_rows:
            print(f"{name:<14}{r['sync_s']:>11.3f}{r['bytes'] / 2**20:>13.2f}{r['generate_s']:>12.3f}")


if __name__ == "__main__":
    main()
