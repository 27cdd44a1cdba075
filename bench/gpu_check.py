"""The project's first run on a GPU, in one command: the fused loss at real shapes, teacher scoring throughput,
a training step, and the same step under torchrun.

    bash bench/gpu_wheels.sh                        # here: the packages the GPU image lacks, as wheels in .whl/
    python bench/gpu_check.py --out DIR             # on the GPU machine: <= 8 minutes on one H200
    python bench/gpu_check.py --dry-run --out DIR   # every stage on CPU with tiny shapes (tests/test_gpu_check.py)
    python bench/gpu_check.py --only train,fsdp     # rerun some stages; --limit train=300 changes a time limit

Stages, each timed and under its own time limit (all of them under --budget-s), each failing on its own:

1. loss   fused chunked loss vs the naive full-logits loss, forward + backward, N = 16,384, D = 2,560 and 4,096,
          V = 151,936, K = 32, bfloat16: bench/loss_memory.py's measurement, one process per implementation
2. score  `python -m teacher_server --engine hf` on a Qwen3-8B-shaped model in bfloat16, scored over HTTP with
          msgpack (16 x 2,048 tokens, K = 32): tokens/s, and its share of the bf16 matmul limit
3. train  `python -m student_trainer`: a Qwen3-1.7B-shaped student (bfloat16 compute, float32 master weights)
          against the stage-2 teacher on the same GPU, 3 AOPD steps of 32 prompts x 4 samples x 256 new tokens
4. fsdp   the same run under `torchrun --nproc-per-node 1` (NCCL)

Every model is randomly initialised: the figures are speed and memory, never quality. DIR/gpu_check.json holds
per stage the status, seconds, figures and the tail of any error, plus the environment (versions, GPU, what this
torch supports); DIR/gpu_check.txt the same as a table, also printed. Both are rewritten after every stage, so
a run cut short still leaves what it measured. DIR/gpu_check.log has every child process's output.

This process uses the standard library only and runs all work in child processes (this file with --child, the
project's entry points, bench/loss_memory.py), so a missing package or a crash fails one stage, not the run,
and a stage past its limit is killed with everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loss_memory import MEMORY_TARGET, TIME_TARGET  # bench/ is this script's directory: the CPU targets

ROOT = Path(__file__).resolve().parents[1]
LOSS_MEMORY = Path(__file__).resolve().parent / "loss_memory.py"

STAGES = {
    "loss": "1 loss at real shapes",
    "score": "2 teacher scoring throughput",
    "train": "3 training step, one process",
    "fsdp": "4 FSDP2 under torchrun, 1 rank",
}
NOTES = {
    "train": "bfloat16 compute over float32 masters already runs FSDP2 here, over a process group of one "
             "(student_trainer/parallel.py)",
    "fsdp": "WORLD_SIZE=1 takes init_ranks' single-process branch, as stage 3 does; torchrun's rendezvous "
            "and more ranks need more GPUs",
}
RANDOM_WEIGHTS = "random weights: every model is randomly initialised; the figures are speed and memory, not quality"
BF16_TFLOPS = 790.0  # an 8192^3 bf16 matmul on this workplace's H200s (the device tool's KINDS.md)

# Modules the stages import, with the distribution that provides each: imported and versioned by the
# environment probe, so that a package the image lacks shows up before the stage that needs it fails.
PACKAGES = {
    "torch": "torch", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "numpy": "numpy", "fastapi": "fastapi", "starlette": "starlette", "uvicorn": "uvicorn", "pydantic": "pydantic",
    "pydantic_settings": "pydantic-settings", "typing_extensions": "typing_extensions", "orjson": "orjson",
    "msgpack": "msgpack", "httpx": "httpx", "prometheus_client": "prometheus_client", "yaml": "PyYAML",
    "datasets": "datasets", "pyarrow": "pyarrow", "math_verify": "math-verify", "tqdm": "tqdm",
    "huggingface_hub": "huggingface_hub",
}

# Model shapes (Hugging Face Qwen3Config fields). RoPE settings are left at their defaults: they cost nothing.
QWEN3_8B = dict(
    hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151_936, max_position_embeddings=40_960, tie_word_embeddings=False,
)
QWEN3_1_7B = dict(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, vocab_size=151_936, max_position_embeddings=40_960, tie_word_embeddings=True,
)
TINY_TEACHER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False,
)
TINY_STUDENT = {**TINY_TEACHER, "tie_word_embeddings": True}  # tied, as Qwen3-1.7B's


@dataclass(frozen=True)
class Plan:
    """What one run measures: the issue's GPU shapes, or tiny ones that walk the same code on CPU."""

    mode: str
    device: str
    loss_n: int
    loss_dims: tuple[int, ...]
    loss_v: int
    loss_chunks: tuple[int, ...]  # fused chunk sizes: DEFAULT_CHUNK_SIZE on CPU and on a GPU
    loss_warmup: int
    loss_repeats: int
    teacher_name: str
    teacher: dict[str, Any]
    score_sequences: int
    score_seq_len: int
    score_repeats: int
    student_name: str
    student: dict[str, Any]
    prompts: int
    samples: int
    new_tokens: int
    chunk_prompts: int  # rollout.stream_chunk_prompts: chunks stream to the teacher while the next one generates
    train_extra: tuple[str, ...]  # trainer overrides that differ between the GPU run and the dry run
    limits: dict[str, float]
    budget_s: float
    work_gib: float  # disk the models and one trainer checkpoint need at once
    top_k: int = 32
    steps: int = 3
    dtype: str = "bfloat16"


GPU = Plan(
    mode="gpu", device="cuda", loss_n=16_384, loss_dims=(2560, 4096), loss_v=151_936, loss_chunks=(128, 2048),
    loss_warmup=1, loss_repeats=3, teacher_name="Qwen3-8B", teacher=QWEN3_8B, score_sequences=16,
    score_seq_len=2048, score_repeats=3, student_name="Qwen3-1.7B", student=QWEN3_1_7B, prompts=32, samples=4,
    new_tokens=256, chunk_prompts=16, train_extra=(),
    # 450 s for the stages leaves the wheel install, start-up and teardown inside the issue's 8 minutes
    limits={"env": 90, "loss": 150, "score": 180, "train": 210, "fsdp": 210}, budget_s=450,
    # 16.4 GB teacher + 3.4 GB student + a 20.7 GB checkpoint (float32 weights and Adam state of 1.7B)
    work_gib=48,
)
DRY = Plan(
    # no warm-up: on the CPU the peak resident set grows only where the allocator takes fresh pages
    mode="dry-run (CPU, tiny shapes)", device="cpu", loss_n=512, loss_dims=(32,), loss_v=8192,
    loss_chunks=(128, 512), loss_warmup=0, loss_repeats=1, teacher_name="tiny Qwen3", teacher=TINY_TEACHER,
    score_sequences=4, score_seq_len=64, score_repeats=1, student_name="tiny Qwen3", student=TINY_STUDENT,
    prompts=4, samples=2, new_tokens=8, chunk_prompts=2,
    # what the trainer does by default on a GPU, asked for explicitly on the CPU
    train_extra=("model.device=cpu", "optim.activation_checkpointing=true"),
    limits={"env": 60, "loss": 90, "score": 90, "train": 90, "fsdp": 90}, budget_s=400, work_gib=1,
)


# ---------------------------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------------------------


class StageError(Exception):
    """A stage's failure; `tail` is the end of the output that explains it."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def tail_of(text: str, chars: int = 3000) -> str:
    return text[-chars:]


def last_json(stdout: str) -> dict[str, Any]:
    """A child's result: the last line of its stdout is one JSON object."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise StageError("the child printed no result", stdout)
    return json.loads(lines[-1])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (torchrun's workers, the server's threads), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class Context:
    """One run: its plan, folders, environment for children, the children alive, and the log."""

    def __init__(self, plan: Plan, out_dir: Path, work_dir: Path, stages: list[str]):
        self.plan, self.out_dir, self.work_dir = plan, out_dir, work_dir
        self.start = time.monotonic()
        self.deadline = self.start + plan.budget_s
        self.log = open(out_dir / "gpu_check.log", "w", encoding="utf-8")
        self.children: set[subprocess.Popen] = set()
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {
            **os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            # nothing is reachable from the GPU machine, and nothing needs to be
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work_dir / "hf"),
        }
        if plan.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on CPU on a GPU machine too
        needs = {"teacher": {"score", "train", "fsdp"}, "student": {"train", "fsdp"}}
        needed = [model for model, users in needs.items() if users & set(stages)]
        self.models = Models(self, needed)
        self.teacher = TeacherServer(self)

    def note(self, text: str) -> None:
        self.log.write(text if text.endswith("\n") else text + "\n")
        self.log.flush()

    def run(self, what: str, cmd: list[str], deadline: float) -> str:
        """Run one child in its own process group until it exits or `deadline`; returns its stdout. Both streams
        go to the log; a non-zero exit or the deadline raises StageError with the output's tail."""
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise StageError(f"{what}: no time left to start it")
        t0 = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=err, process_group=0)
            self.children.add(proc)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    kill_group(proc)
                self.children.discard(proc)
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        seconds = time.monotonic() - t0
        self.note(f"\n=== {what}: exit {proc.returncode} after {seconds:.1f} s\n$ {' '.join(cmd)}\n"
                  f"--- stdout\n{stdout[-65536:]}\n--- stderr\n{stderr[-65536:]}")
        if timed_out:
            raise StageError(f"{what}: killed after {timeout:.1f} s (its stage's time limit)", tail_of(stdout + stderr))
        if proc.returncode:
            raise StageError(f"{what}: exit status {proc.returncode}", tail_of(stderr or stdout))
        return stdout

    def child(self, what: str, kind: str, spec: dict[str, Any], deadline: float) -> dict[str, Any]:
        """This file with --child `kind`: one piece of work in a fresh process, its result as JSON."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
        return last_json(self.run(what, cmd, deadline))

    def kill_children(self) -> None:
        for proc in list(self.children):
            kill_group(proc)


class Once:
    """Set-up that several stages share (the teacher server): done by the first stage that needs it,
    within that stage's time, and its failure remembered so later stages fail at once with the reason."""

    def __init__(self, what: str, work: Callable[[float], dict[str, Any]]):
        self.what, self.work = what, work
        self.figures: dict[str, Any] | None = None
        self.error: str | None = None

    def __call__(self, deadline: float) -> dict[str, Any]:
        """The set-up's figures the first time it is done, {} when it was done before."""
        if self.error is not None:
            raise StageError(f"{self.what} failed earlier: {self.error}")
        if self.figures is not None:
            return {}
        try:
            self.figures = self.work(deadline)
        except Exception as exc:
            self.error = str(exc)
            raise
        return self.figures


# ---------------------------------------------------------------------------------------------------------------
# Work done in child processes (python bench/gpu_check.py --child KIND --spec JSON)
# ---------------------------------------------------------------------------------------------------------------


def child_env(spec: dict[str, Any]) -> dict[str, Any]:
    """Versions of everything the stages import, the device, and what this torch supports: the GPU image's
    torch and transformers are not the pinned ones."""
    import importlib
    import importlib.metadata

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
    }
    packages = {}
    for module, dist in PACKAGES.items():
        try:
            importlib.import_module(module)
            packages[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # recorded, not fatal: the stage that needs it will fail with the details
            packages[dist] = f"not importable: {type(exc).__name__}: {str(exc)[:200]}"
    env["packages"] = packages
    device = torch.device(spec["device"])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        env.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            bf16_matmul_tflops=round(matmul_tflops(device), 1),
        )
    env["mm_out_dtype"] = probe_mm_out_dtype(device)
    return env


def matmul_tflops(device) -> float:
    """TFLOP/s of bf16 8192^3 matmuls on this GPU, measured: beside the 790 that stage 2 divides by, to tell a
    slow GPU from a slow teacher."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.mm(a, b)
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1000) / 1e12


def probe_mm_out_dtype(device) -> str:
    """The fused loss and the hf teacher engine call torch.mm(bf16, bf16, out_dtype=torch.float32) on CUDA
    (float32 logits straight from the matmul; PyTorch >= 2.8): whether this torch, on this device, has it."""
    import torch

    a = torch.ones(64, 64, dtype=torch.bfloat16, device=device)
    try:
        out = torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"unavailable on {device.type}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if out.dtype != torch.float32 or float(out[0, 0]) != 64.0:
        return f"wrong result: {out.dtype}, {float(out[0, 0])}"
    return "ok"


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Every model of `spec["models"]`, in order, each failing on its own: {name: figures, or error and tail}."""
    results = {}
    for model in spec["models"]:
        try:
            results[model["name"]] = {"model": model["model"], **build_model(model)}
        except Exception as exc:  # the next model is still built; the stages needing this one fail with this
            results[model["name"]] = {"error": f"{type(exc).__name__}: {exc}", "tail": tail_of(traceback.format_exc())}
    return results


def build_model(spec: dict[str, Any]) -> dict[str, Any]:
    """A randomly initialised Qwen3 of `spec["shape"]` written to `spec["dir"]` with a word-level tokenizer of
    exactly its vocabulary (or the tokenizer of `spec["tokenizer_dir"]`, so teacher and student match).

    The weights are initialised on the target device in the target dtype, then saved in 2 GB safetensors shards:
    an 8B model never exists in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    from student_trainer.tiny_models import build_tokenizer

    out, shape = Path(spec["dir"]), spec["shape"]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if spec.get("tokenizer_dir"):
        tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])
        tokenizer.save_pretrained(str(out))
    else:
        base = len(build_tokenizer(out, n_filler=0))
        tokenizer = build_tokenizer(out, n_filler=shape["vocab_size"] - base)
    if len(tokenizer) != shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {shape['vocab_size']}")
    config = Qwen3Config(
        **shape, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, dtype=spec["dtype"],
    )
    device = torch.device(spec["device"])
    torch.manual_seed(spec["seed"])
    t1 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec["dtype"]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    model.save_pretrained(str(out), max_shard_size="2GB")
    t3 = time.perf_counter()
    return {
        "params": sum(p.numel() for p in model.parameters()), "dtype": spec["dtype"],
        "init_device": str(next(model.parameters()).device), "tokenizer_s": round(t1 - t0, 2),
        "init_s": round(t2 - t1, 2), "save_s": round(t3 - t2, 2),
        "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
    }


def child_score(spec: dict[str, Any]) -> dict[str, Any]:
    """Time POST /v1/score of one batch, msgpack both ways, as bench/teacher_throughput.py's path (e) does
    (fresh random sequences per run: client encode + HTTP + server + client decode); one untimed warm-up."""
    import httpx
    from teacher_throughput import http_job

    batch = argparse.Namespace(sequences=spec["sequences"], seq_len=spec["seq_len"], top_k=spec["top_k"], score_from=1)
    with httpx.Client(timeout=600) as client:
        resp = client.get(spec["url"] + "/v1/info")
        resp.raise_for_status()
        info = resp.json()
        run_once = http_job(client, spec["url"], batch, info["vocab_size"], "application/msgpack")
        times = []
        for rep in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            run_once(rep)
            times.append(time.perf_counter() - t0)
    return {"warmup_s": times[0], "times_s": times[1:], "vocab_size": info["vocab_size"], "model": info["model"]}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "env": child_env, "build": child_build, "score": child_score,
}


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up: the teacher server and the student
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TeacherServer:
    """`python -m teacher_server --engine hf` on a random model of the plan's teacher shape, kept up from the
    first stage that needs it to the end of the run (stages 3 and 4 train against it on the same GPU)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = ctx.work_dir / "teacher.log"
        self.start = Once("the teacher server", self._start)

    def ready(self, deadline: float) -> dict[str, Any]:
        """Start the server if no stage has yet (its set-up figures, else {}); refuse if it has died since."""
        figures = self.start(deadline)
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise StageError(f"the teacher server has exited (status {code})", self.log_tail())
        return figures

    def _start(self, deadline: float) -> dict[str, Any]:
        try:
            return self._build_and_serve(deadline)
        except BaseException:
            self.stop()  # a half-started server must not hold the GPU through the stages after
            raise

    def _build_and_serve(self, deadline: float) -> dict[str, Any]:
        p = self.ctx.plan
        build = self.ctx.models.get("teacher", deadline)
        port = free_port()
        cmd = [
            sys.executable, "-m", "teacher_server", "--model", str(self.ctx.models.dir("teacher")), "--engine", "hf",
            "--device", p.device, "--dtype", p.dtype, "--max-top-k", str(p.top_k), "--port", str(port),
            "--log-level", "warning",
        ]
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.ctx.env, stdout=log, stderr=subprocess.STDOUT,
                                         process_group=0)
        url = f"http://127.0.0.1:{port}"
        while not healthy(url):
            if self.proc.poll() is not None:
                raise StageError(f"teacher server exited with status {self.proc.returncode}", self.log_tail())
            if time.monotonic() > deadline:
                raise StageError("teacher server not healthy before its stage's time limit", self.log_tail())
            time.sleep(0.5)
        self.url = url
        return {**build, "server_ready_s": round(time.monotonic() - t0, 2),
                "command": " ".join(cmd)}

    def log_tail(self) -> str:
        return tail_of(self.log_path.read_text(errors="replace")) if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.ctx.note(f"\n=== teacher server log (exit {self.proc.returncode})\n"
                          f"{self.log_path.read_text(errors='replace')[-65536:]}")
            self.proc = None


class Models:
    """The random teacher and student on disk. One child process builds every model the selected stages need
    (importing transformers takes longer than building a small model), when a stage first needs one; a model's
    figures go to the first stage that asks for it, and a model that failed fails every stage that needs it."""

    def __init__(self, ctx: Context, names: list[str]):
        self.ctx, self.names = ctx, names
        self.results: dict[str, dict[str, Any]] | None = None
        self.reported: set[str] = set()

    def dir(self, name: str) -> Path:
        return self.ctx.work_dir / name

    def spec(self, name: str) -> dict[str, Any]:
        p = self.ctx.plan
        common = {"name": name, "dir": str(self.dir(name)), "dtype": p.dtype, "device": p.device}
        if name == "teacher":
            return {**common, "model": p.teacher_name, "shape": p.teacher, "seed": 0}
        # the teacher's tokenizer: the trainer checks that both tokenise alike; bfloat16 on disk, as a released
        # checkpoint is, loaded by the trainer into float32 master weights
        return {**common, "model": p.student_name, "shape": p.student, "seed": 1,
                "tokenizer_dir": str(self.dir("teacher"))}

    def get(self, name: str, deadline: float) -> dict[str, Any]:
        """Make sure model `name` is on disk; its build figures the first time they are asked for, else {}."""
        if self.results is None:
            try:
                self.results = self.ctx.child("build models", "build",
                                              {"models": [self.spec(n) for n in self.names]}, deadline)
            except StageError as exc:
                self.results = {n: {"error": str(exc), "tail": exc.tail} for n in self.names}
        result = self.results[name]
        if "error" in result:
            raise StageError(f"building the {name} failed: {result['error']}", result.get("tail", ""))
        if name in self.reported:
            return {}
        self.reported.add(name)
        return result


# ---------------------------------------------------------------------------------------------------------------
# Stages: each fills `figures` as it goes and raises on failure
# ---------------------------------------------------------------------------------------------------------------


def probe_environment(ctx: Context, figures: dict[str, Any], deadline: float) -> None:
    """Not a stage of the issue's, but run like one first: what the stages will run with."""
    figures.update(ctx.child("environment", "env", {"device": ctx.plan.device}, deadline))
    figures["nvidia_smi"] = nvidia_smi()


def stage_loss(ctx: Context, figures: dict[str, Any], deadline: float) -> None:
    """bench/loss_memory.py's children (one fresh process per implementation, so neither sees the other's
    allocations): peak memory beyond the inputs and time of forward + backward, naive first, then fused at each
    chunk size, as ratios to the naive of the same D."""
    p = ctx.plan
    figures.update(n=p.loss_n, v=p.loss_v, k=p.top_k, dtype=p.dtype, device=p.device,
                   targets={"memory_ratio": MEMORY_TARGET, "time_ratio": TIME_TARGET}, runs=[])
    failed = []
    for d in p.loss_dims:
        naive = None
        for impl, chunk in [("naive", None)] + [("fused", c) for c in p.loss_chunks]:
            argv = ["--n", str(p.loss_n), "--d", str(d), "--v", str(p.loss_v), "--k", str(p.top_k), "--device",
                    p.device, "--dtype", p.dtype, "--warmup", str(p.loss_warmup), "--repeats", str(p.loss_repeats)]
            argv += [] if chunk is None else ["--chunk-size", str(chunk)]
            row: dict[str, Any] = {"d": d, "impl": impl, "chunk_size": chunk}
            figures["runs"].append(row)
            try:
                r = last_json(ctx.run(f"loss D={d} {impl} {chunk or ''}".strip(),
                                      [sys.executable, str(LOSS_MEMORY), *argv, "--child", impl], deadline))
            except StageError as exc:
                row["error"] = str(exc)
                failed.append(exc)
                continue
            row.update(peak_extra_mib=round(r["peak_extra_bytes"] / 2**20, 1), time_median_s=r["time_s"],
                       times_s=r["times_s"], loss=r["loss"])
            if impl == "naive":
                naive = row
            elif naive is not None:
                row["memory_ratio"] = row["peak_extra_mib"] / max(naive["peak_extra_mib"], 1e-6)
                row["time_ratio"] = row["time_median_s"] / naive["time_median_s"]
    if failed:
        raise StageError(f"{len(failed)} of {len(figures['runs'])} measurements failed; first: {failed[0]}",
                         failed[0].tail)


def stage_score(ctx: Context, figures: dict[str, Any], deadline: float) -> None:
    """The teacher server's throughput over HTTP, and its share of what the GPU's bf16 matmuls allow for a
    forward of 2 x params FLOPs per token (attention's own FLOPs not counted)."""
    p, teacher = ctx.plan, ctx.teacher
    figures["teacher_setup"] = teacher.ready(deadline)
    spec = {"url": teacher.url, "sequences": p.score_sequences, "seq_len": p.score_seq_len, "top_k": p.top_k,
            "repeats": p.score_repeats}
    r = ctx.child("score", "score", spec, deadline)
    tokens = p.score_sequences * p.score_seq_len
    median = statistics.median(r["times_s"])
    figures.update(sequences=p.score_sequences, seq_len=p.score_seq_len, top_k=p.top_k, encoding="msgpack",
                   tokens=tokens, warmup_s=r["warmup_s"], times_s=r["times_s"], median_s=median,
                   tok_per_s=tokens / median)
    params = teacher.start.figures["params"]
    if p.device == "cuda":
        limit = BF16_TFLOPS * 1e12 / (2 * params)
        figures.update(bf16_tflops=BF16_TFLOPS, limit_tok_per_s=limit, fraction_of_limit=tokens / median / limit)
        figures["gpu_memory_used_mib"] = gpu_memory_used_mib()


def stage_train(ctx: Context, figures: dict[str, Any], deadline: float, torchrun: bool = False) -> None:
    """The trainer's own CLI for `plan.steps` steps against the teacher server; the per-step figures come from
    its metrics.jsonl (also after a failure, for the steps that ran). The final checkpoint is part of the run:
    its size is recorded, then it is deleted (20 GB at the GPU shapes)."""
    p, teacher = ctx.plan, ctx.teacher
    figures["teacher_setup"] = teacher.ready(deadline)
    figures["student_setup"] = ctx.models.get("student", deadline)
    run_dir = ctx.work_dir / ("run-fsdp" if torchrun else "run-train")
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"model.path={ctx.models.dir('student')}", f"model.dtype={p.dtype}", "optim.fp32_master_weights=true",
        f"teacher.url={teacher.url}", f"teacher.top_k={p.top_k}", "teacher.startup_wait_s=60",
        "teacher.outage_timeout_s=60", f"data.train_path={ctx.work_dir / 'prompts.jsonl'}",
        "data.apply_chat_template=false", "rollout.engine=hf", f"rollout.prompts_per_step={p.prompts}",
        f"rollout.samples_per_prompt={p.samples}", f"rollout.max_new_tokens={p.new_tokens}",
        f"rollout.stream_chunk_prompts={p.chunk_prompts}", "loss.mode=aopd", f"train.steps={p.steps}",
        f"train.run_dir={run_dir}", "train.progress=false", *p.train_extra,
    ]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"] if torchrun \
        else [sys.executable]
    cmd = [*launcher, "-m", "student_trainer", *overrides]
    figures.update(command=" ".join(cmd), note=NOTES["fsdp" if torchrun else "train"])
    t0 = time.monotonic()
    try:
        ctx.run("torchrun trainer" if torchrun else "trainer", cmd, deadline)
    finally:
        figures.update(read_run(run_dir, time.monotonic() - t0))
        shutil.rmtree(run_dir, ignore_errors=True)
    if len(figures["steps"]) != p.steps:
        raise StageError(f"{len(figures['steps'])} steps in metrics.jsonl, expected {p.steps}")
    if not figures["checkpoint_complete"]:
        raise StageError("the run ended without a complete final checkpoint")


def read_run(run_dir: Path, process_s: float) -> dict[str, Any]:
    """Per-step timings and memory from a run's metrics.jsonl, medians over the steps after the first (warm-up),
    and the final checkpoint's size."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a run killed mid-write
            continue
    keys = {
        "step_s": "timing/step_s", "generate_s": "timing/generate_s", "score_wait_s": "timing/score_wait_s",
        "update_s": "timing/update_s", "teacher_ms_per_request": "teacher/latency_ms",
        "tok_per_s": "throughput/tok_per_s", "device_peak_mib": "memory/device_peak_mib",
        "weights_mib": "memory/weights_mib", "optimizer_mib": "memory/optimizer_mib",
        "len_mean": "rollout/len_mean", "loss": "loss/total",
    }
    steps = [{"step": r["step"], **{k: r.get(m) for k, m in keys.items()}} for r in records if "timing/step_s" in r]
    later = steps[1:] or steps
    ckpt_root = run_dir / "checkpoints"
    ckpt_files = [f for f in ckpt_root.rglob("*") if f.is_file()] if ckpt_root.exists() else []
    # student_trainer/checkpoint.py: a complete checkpoint is a step_N folder (renamed last) holding COMPLETE
    complete = [f for f in ckpt_files if f.name == "COMPLETE" and f.parent.name.removeprefix("step_").isdigit()]
    peaks = [s["device_peak_mib"] for s in steps if s["device_peak_mib"] is not None]
    return {
        "steps": steps,
        "median_after_first": {k: statistics.median(s[k] for s in later)
                               for k in ("step_s", "generate_s", "score_wait_s", "update_s")} if steps else {},
        "device_peak_mib": max(peaks) if peaks else None,
        "process_s": round(process_s, 2),
        "outside_steps_s": round(process_s - sum(s["step_s"] for s in steps), 2),
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt_files),
        "checkpoint_complete": bool(complete),
    }


def nvidia_smi() -> str | None:
    """The GPU and its driver as nvidia-smi names them (the driver version is nowhere else)."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() or out.stderr.strip()


def gpu_memory_used_mib() -> float | None:
    """Memory in use on the GPU by every process (here the teacher server), from nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        return float(out.stdout.split()[0])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class StageRecord:
    title: str
    status: str = "skipped"  # ok | failed | skipped (not in --only) | running (only while it runs)
    seconds: float | None = None
    limit_s: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_tail: str | None = None


def run_stage(ctx: Context, record: StageRecord, work: Callable[[Context, dict[str, Any], float], None],
              limit_s: float) -> None:
    """One stage under min(its limit, what is left of the budget); any exception fails this stage only."""
    t0 = time.monotonic()
    deadline = min(t0 + limit_s, ctx.deadline)
    record.limit_s = round(deadline - t0, 1)
    record.status = "running"
    try:
        if deadline <= t0:
            raise StageError(f"no time left in the budget of {ctx.plan.budget_s:.0f} s")
        work(ctx, record.figures, deadline)
        record.status = "ok"
    except Exception as exc:  # each stage fails on its own; the next one still runs
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, StageError) else str(exc)
        record.error_tail = exc.tail if isinstance(exc, StageError) else tail_of(traceback.format_exc())
    record.seconds = round(time.monotonic() - t0, 2)


def pins() -> dict[str, str]:
    """The versions constraints.txt pins for the packages the environment probe reports: what they are compared
    against (names as PACKAGES spells them)."""
    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pinned[norm(name)] = version
    return {dist: pinned[norm(dist)] for dist in PACKAGES.values() if norm(dist) in pinned}


def pick_work_dir(requested: str | None, need_gib: float) -> Path:
    """Where the models and checkpoints go: /dev/shm (memory, the fastest to write and read) when it has room
    for them, else the temp dir's disk, else whichever has more space."""
    if requested:
        base = Path(requested)
    else:
        candidates = [c for c in (Path("/dev/shm"), Path(tempfile.gettempdir())) if c.is_dir()]
        roomy = [c for c in candidates if shutil.disk_usage(c).free >= need_gib * 2**30]
        base = roomy[0] if roomy else max(candidates, key=lambda c: shutil.disk_usage(c).free)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="aopd-gpu-check-", dir=base))


def write_prompts(path: Path) -> None:
    """The toy prompts of bench/fsdp.py: short, so every step's time is the 256 sampled tokens' and the update's."""
    path.write_text("".join(json.dumps({"prompt": f"{i} + {j} =", "answer": str(i + j)}) + "\n"
                            for i in range(10) for j in range(10)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the results (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every stage on CPU with tiny shapes")
    parser.add_argument("--only", default=",".join(STAGES), help=f"stages to run, comma-separated ({','.join(STAGES)})")
    parser.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                        help="a stage's time limit (also 'env'); repeatable")
    parser.add_argument("--budget-s", type=float, default=None, help="all stages' limit (default: 450, dry run 400)")
    parser.add_argument("--work-dir", default=None, help="where models and checkpoints go (default: /dev/shm or tmp)")
    parser.add_argument("--keep-work-dir", action="store_true", help="keep the models and the teacher log")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.only if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    limits = {}
    for item in args.limit:
        name, sep, seconds = item.partition("=")
        if not sep or (name not in STAGES and name != "env"):
            parser.error(f"--limit {item!r}: use STAGE=SECONDS with STAGE one of env, {', '.join(STAGES)}")
        try:
            limits[name] = float(seconds)
        except ValueError:
            parser.error(f"--limit {item!r}: {seconds!r} is not a number of seconds")
    args.limits = limits
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.spec))))
        return 0

    base = DRY if args.dry_run else GPU
    plan = replace(base, budget_s=args.budget_s or base.budget_s)
    limits = {**plan.limits, **args.limits}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = pick_work_dir(args.work_dir, plan.work_gib)
    ctx = Context(plan, out_dir, work_dir, args.only)
    write_prompts(work_dir / "prompts.jsonl")
    # SIGTERM (a time limit around this command) must still stop the children and write what was measured
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    result: dict[str, Any] = {
        "check": "bench/gpu_check.py", "mode": plan.mode, "weights": RANDOM_WEIGHTS,
        "command": " ".join([sys.executable, *sys.argv]), "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_s": None, "plan": asdict(plan) | {"limits": limits},
        "environment": {"host": platform.node(), "platform": platform.platform(), "pinned": pins()},
        "work_dir": {"path": str(work_dir), "free_gib": round(shutil.disk_usage(work_dir).free / 2**30, 1)},
        "stages": {name: StageRecord(title) for name, title in STAGES.items()},
    }
    env_record = StageRecord("environment")
    stage_work = {
        "loss": stage_loss, "score": stage_score, "train": stage_train,
        "fsdp": lambda c, f, d: stage_train(c, f, d, torchrun=True),
    }
    try:
        run_stage(ctx, env_record, probe_environment, limits["env"])
        result["environment"].update(env_record.figures, probe=env_record.status, probe_s=env_record.seconds,
                                     probe_error=env_record.error)
        save(result, ctx)
        for name in STAGES:
            if name in args.only:
                print(f"[gpu_check] stage {STAGES[name]} ...", flush=True)
                run_stage(ctx, result["stages"][name], stage_work[name], limits[name])
                rec = result["stages"][name]
                print(f"[gpu_check]   {rec.status} in {rec.seconds:.1f} s{': ' + rec.error if rec.error else ''}",
                      flush=True)
                save(result, ctx)
    finally:
        ctx.kill_children()
        ctx.teacher.stop()
        for rec in [env_record, *result["stages"].values()]:
            if rec.status == "running":  # SIGTERM or Ctrl-C arrived during it
                rec.status, rec.error = "failed", "interrupted before the stage ended"
        result["wall_s"] = round(time.monotonic() - ctx.start, 1)
        save(result, ctx)
        ctx.log.close()
        if not args.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(table(result))
    return 0 if all(r.status != "failed" for r in result["stages"].values()) else 1


def save(result: dict[str, Any], ctx: Context) -> None:
    """Rewrite both result files (after every stage: a run cut short keeps what it measured)."""
    plain = {**result, "stages": {k: asdict(v) for k, v in result["stages"].items()}}
    (ctx.out_dir / "gpu_check.json").write_text(json.dumps(plain, indent=1) + "\n")
    (ctx.out_dir / "gpu_check.txt").write_text(table(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """The readable table; a figure it cannot draw must not cost the run (the JSON has everything)."""
    try:
        return render(result)
    except Exception:
        return "the table could not be drawn; gpu_check.json has the results\n" + traceback.format_exc()


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def render(result: dict[str, Any]) -> str:
    env, plan = result["environment"], result["plan"]
    pinned = env.get("pinned", {})
    packages = env.get("packages", {})
    lines = [
        f"aopd GPU check, {result['mode']}; {result['weights']}",
        "   ".join(filter(None, [
            env.get("gpu") or f"no GPU ({env.get('cpu_count', '?')} CPUs)",
            f"torch {env.get('torch', '?')} (pinned {pinned.get('torch', '?')}), CUDA {env.get('torch_cuda')}",
            f"transformers {packages.get('transformers', '?')} (pinned {pinned.get('transformers', '?')})",
            f"python {env.get('python', '?')}",
            f"NCCL {env['nccl']}" if env.get("nccl") else "",
        ])),
        f"torch.mm(bf16, bf16, out_dtype=float32): {env.get('mm_out_dtype', '?')}"
        + (f"   bf16 8192^3 matmul: {env['bf16_matmul_tflops']:.0f} TFLOP/s" if env.get("bf16_matmul_tflops") else ""),
    ]
    missing = [f"{k} ({v})" for k, v in packages.items() if str(v).startswith("not importable")]
    if missing:
        lines.append("not importable: " + "; ".join(missing))
    other = [f"{k} {v} ({pinned[k]})" for k, v in packages.items()
             if k in pinned and str(v).split("+")[0] != pinned[k] and not str(v).startswith("not importable")]
    if other:
        lines.append("versions other than constraints.txt's (pinned): " + ", ".join(other))
    if env.get("probe_error"):
        lines.append(f"environment probe failed: {env['probe_error']}")
    lines.append(f"work dir {result['work_dir']['path']} ({result['work_dir']['free_gib']} GiB free at start); "
                 f"wall {fmt(result['wall_s'], '.1f')} s of a {plan['budget_s']:.0f} s budget")
    lines += ["", f"{'stage':<36}{'status':<9}{'seconds':>8}{'limit':>7}"]
    for name, rec in result["stages"].items():
        lines.append(f"{rec.title:<36}{rec.status:<9}{fmt(rec.seconds, '.1f'):>8}{fmt(rec.limit_s, '.0f'):>7}")
        if rec.status != "skipped":
            lines += ["    " + line for line in RENDER[name](rec.figures, plan) if line is not None]
        if rec.error:
            lines.append(f"    error: {rec.error[:300]}")
    return "\n".join(lines)


def render_loss(f: dict[str, Any], plan: dict[str, Any]) -> list[str | None]:
    if "runs" not in f:
        return []
    out = [f"N={f['n']} V={f['v']} K={f['k']} {f['dtype']} on {f['device']}, forward + backward; targets: memory <= "
           f"{f['targets']['memory_ratio']:.2f} x naive at time <= {f['targets']['time_ratio']:.2f} x naive",
           f"{'D':>6}  {'impl':<6}{'chunk':>6}{'peak extra MiB':>16}{'median s':>10}{'mem/naive':>11}{'time/naive':>11}"]
    for r in f["runs"]:
        if "error" in r:
            out.append(f"{r['d']:>6}  {r['impl']:<6}{r['chunk_size'] or '-':>6}  failed")
            continue
        out.append(f"{r['d']:>6}  {r['impl']:<6}{r['chunk_size'] or '-':>6}{r['peak_extra_mib']:>16.1f}"
                   f"{r['time_median_s']:>10.4f}{fmt(r.get('memory_ratio'), '.4f'):>11}"
                   f"{fmt(r.get('time_ratio'), '.3f'):>11}")
    return out


def render_setup(setup: dict[str, Any] | None, what: str) -> str | None:
    if not setup:
        return None
    return (f"{what}: {setup['model']} shape, {setup['params'] / 1e9:.3f}B params, {setup['dtype']}, initialised on "
            f"{setup['init_device']} in {setup['init_s']:.1f} s, saved ({setup['bytes'] / 2**30:.2f} GiB) in "
            f"{setup['save_s']:.1f} s" + (f"; server healthy {setup['server_ready_s']:.1f} s after launch"
                                          if "server_ready_s" in setup else ""))


def render_score(f: dict[str, Any], plan: dict[str, Any]) -> list[str | None]:
    out = [render_setup(f.get("teacher_setup"), "teacher")]
    if "median_s" in f:
        line = (f"{f['sequences']} x {f['seq_len']} tokens, K={f['top_k']}, {f['encoding']} over HTTP: median "
                f"{f['median_s']:.3f} s of {len(f['times_s'])} -> {f['tok_per_s']:,.0f} tok/s")
        if f.get("limit_tok_per_s"):
            line += (f" = {f['fraction_of_limit']:.3f} of the bf16 limit ({f['limit_tok_per_s']:,.0f} tok/s at "
                     f"{f['bf16_tflops']:.0f} TFLOP/s, 2 x params FLOPs per token)")
        out.append(line)
        if f.get("gpu_memory_used_mib") is not None:
            out.append(f"GPU memory in use with the teacher up (nvidia-smi): {f['gpu_memory_used_mib']:,.0f} MiB")
    return out


def render_train(f: dict[str, Any], plan: dict[str, Any]) -> list[str | None]:
    out = [render_setup(f.get("teacher_setup"), "teacher"), render_setup(f.get("student_setup"), "student")]
    out.append(f"{plan['prompts']} prompts x {plan['samples']} samples x {plan['new_tokens']} new tokens, "
               f"{plan['steps']} steps, K={plan['top_k']}, {plan['dtype']} compute, float32 masters")
    if f.get("note"):
        out.append(f"note: {f['note']}")
    if f.get("steps"):
        out.append(f"{'step':>4}{'step s':>9}{'generate s':>12}{'score wait s':>14}{'update s':>10}"
                   f"{'teacher ms/req':>16}{'tok/s':>8}{'peak MiB':>10}")
        for s in f["steps"]:
            out.append(f"{s['step']:>4}{fmt(s['step_s'], '.2f'):>9}{fmt(s['generate_s'], '.2f'):>12}"
                       f"{fmt(s['score_wait_s'], '.2f'):>14}{fmt(s['update_s'], '.2f'):>10}"
                       f"{fmt(s['teacher_ms_per_request'], '.0f'):>16}{fmt(s['tok_per_s'], '.0f'):>8}"
                       f"{fmt(s['device_peak_mib'], '.0f'):>10}")
    if f.get("median_after_first"):
        m = f["median_after_first"]
        out.append(f"median of steps 2..{len(f['steps'])}: {m['step_s']:.2f} s per step = generate {m['generate_s']:.2f}"
                   f" + score wait {m['score_wait_s']:.2f} + update {m['update_s']:.2f} (+ record)")
    if "process_s" in f:
        out.append(f"process {f['process_s']:.1f} s, of which outside the steps (start-up, final checkpoint of "
                   f"{f['checkpoint_bytes'] / 2**30:.2f} GiB) {f['outside_steps_s']:.1f} s")
    return out


RENDER: dict[str, Callable[[dict[str, Any], dict[str, Any]], list[str | None]]] = {
    "loss": render_loss, "score": render_score, "train": render_train, "fsdp": render_train,
}


if __name__ == "__main__":
    sys.exit(main())
