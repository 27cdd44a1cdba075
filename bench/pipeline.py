"""Trainer pipeline benchmark: streaming vs sequential rollout->score->update, HTTP teacher vs in-process.

    python bench/pipeline.py [--steps 6] [--teacher-hidden 256] [--teacher-layers 4] [--max-new-tokens 48]

Builds a teacher and a smaller student (tiny Qwen3s sharing one tokenizer) offline, starts the teacher server
(`python -m teacher_server`, hf engine) on 127.0.0.1, and runs the real trainer (`student_trainer.train.train`)
three ways on the same config, printing median step times (first step dropped as warm-up):

  stream     rollouts go to the teacher chunk by chunk while the next chunk generates (the default)
  sequential generate everything, then score it, then update   (rollout.stream=false)
  in-process stream, but the same teacher model scored inside the trainer process, no HTTP

Each process runs torch with one thread, so trainer and teacher each own one of the two cores, as a trainer
GPU and a teacher GPU would. Targets: stream <= 0.75 x sequential when scoring takes about as long as
generation; stream (HTTP) <= 1.10 x in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class InProcessTeacher:
    """The teacher scored inside this process (hf engine, no HTTP), with the TeacherClient surface train() uses."""

    def __init__(self, model_dir: str):
        import asyncio

        from teacher_server.engines.hf import HFEngine
        from teacher_server.settings import Settings

        self.url = f"inproc://{model_dir}"
        # one forward at a time, as the server's single engine worker does: same compute, no HTTP
        self.lock = __import__("threading").Lock()
        self.engine = HFEngine(Settings(model=model_dir, dtype="float32", max_top_k=64))
        asyncio.run(self.engine.start())  # loads the model; the batcher task is not used here

    def health(self) -> bool:
        return True

    def connect(self, **_):
        from protocol.schema import InfoResponse

        i = self.engine.info
        return InfoResponse(protocol_version=1, model=i.model, engine="hf", vocab_size=i.vocab_size,
                            tokenizer_fingerprint=i.tokenizer_fingerprint, max_top_k=64, max_tokens_per_request=1 << 30,
                            max_sequences_per_request=1 << 20, max_seq_len=i.max_seq_len, max_body_bytes=1 << 30)

    def score_batch(self, batch):
        with self.lock:
            return self.engine._score_jobs([batch])[0]

    def close(self) -> None:
        pass


def toy_models(tmp: Path, a) -> tuple[Path, Path, Path, int, int]:
    """A teacher and a smaller student (tiny Qwen3s sharing one tokenizer, shaped by `a`'s --teacher-*/--student-*)
    and 100 addition prompts under `tmp`: (teacher dir, student dir, data file, teacher params, student params)."""
    from safetensors.torch import load_file

    from student_trainer.tiny_models import build_tiny_model

    teacher_dir = build_tiny_model(tmp / "teacher", hidden_size=a.teacher_hidden, num_layers=a.teacher_layers,
                                   num_heads=max(1, a.teacher_hidden // 64), num_kv_heads=1,
                                   intermediate_size=4 * a.teacher_hidden, seed=0)
    student_dir = build_tiny_model(tmp / "student", hidden_size=a.student_hidden, num_layers=a.student_layers,
                                   num_heads=max(1, a.student_hidden // 64), intermediate_size=2 * a.student_hidden,
                                   seed=1, tokenizer_dir=teacher_dir)
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + {j} =", "answer": str(i + j)}) for i in range(10) for j in range(10)))
    params = [sum(v.numel() for v in load_file(str(d / "model.safetensors")).values()) for d in (teacher_dir, student_dir)]
    return teacher_dir, student_dir, data, *params


def median_step(run_dir: Path) -> dict[str, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "timing/step_s" in r][1:]  # drop warm-up step
    keys = ["timing/step_s", "timing/generate_s", "timing/score_wait_s", "teacher/latency_ms", "timing/update_s"]
    return {k: statistics.median(r[k] for r in recs) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--chunk-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    a = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from student_trainer import train as train_mod
    from student_trainer.config import load_config
    from teacher_server.process import free_port, serve_in_subprocess

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-pipeline-"))
    teacher_dir, student_dir, data, t_params, s_params = toy_models(tmp, a)

    def cfg(run: str, url: str, *extra: str):
        return load_config(None, [
            f"model.path={student_dir}", f"teacher.url={url}", "teacher.top_k=32", f"data.train_path={data}",
            "data.apply_chat_template=false", f"rollout.prompts_per_step={a.prompts_per_step}",
            f"rollout.samples_per_prompt={a.samples}", f"rollout.max_new_tokens={a.max_new_tokens}",
            f"rollout.stream_chunk_prompts={a.chunk_prompts}", "loss.mode=aopd", f"train.steps={a.steps}",
            f"train.run_dir={tmp / run}", "train.progress=false", "train.hist_every=0", *extra,
        ])

    results = {}
    env_threads = {"OMP_NUM_THREADS": "1"}
    os.environ.update(env_threads)
    with serve_in_subprocess(str(teacher_dir), free_port(), "--dtype", "float32", "--max-top-k", "32") as teacher:
        url = teacher.url
        for name, extra in (("stream", []), ("sequential", ["rollout.stream=false"])):
            t0 = time.perf_counter()
            train_mod.train(cfg(name, url, *extra))
            results[name] = median_step(tmp / name)
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
    local = InProcessTeacher(str(teacher_dir))
    original = train_mod.TeacherClient
    train_mod.TeacherClient = lambda *args, **kw: local  # the same model, scored in-process
    try:
        train_mod.train(cfg("in-process", "http://unused"))
    finally:
        train_mod.TeacherClient = original
    results["in-process"] = median_step(tmp / "in-process")

    print(f"\nteacher {t_params / 1e6:.2f}M params ({a.teacher_layers} x {a.teacher_hidden}), student {s_params / 1e6:.2f}M "
          f"({a.student_layers} x {a.student_hidden}); {a.prompts_per_step} prompts x {a.samples} samples x "
          f"<= {a.max_new_tokens} new tokens per step, chunks of {a.chunk_prompts} prompts, K=32; "
          f"medians over steps 2..{a.steps}; 1 torch thread per process")
    print(f"{'mode':<12}{'step s':>9}{'generate s':>12}{'score wait s':>14}{'teacher ms/req':>16}{'update s':>10}")
    for name, r in results.items():
        print(f"{name:<12}{r['timing/step_s']:>9.3f}{r['timing/generate_s']:>12.3f}{r['timing/score_wait_s']:>14.3f}"
              f"{r['teacher/latency_ms']:>16.0f}{r['timing/update_s']:>10.3f}")
    s, q, i = results["stream"]["timing/step_s"], results["sequential"]["timing/step_s"], results["in-process"]["timing/step_s"]
    print(f"\nstream / sequential = {s / q:.2f}   (target <= 0.75)")
    print(f"stream HTTP / in-process = {s / i:.2f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
