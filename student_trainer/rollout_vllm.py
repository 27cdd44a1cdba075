"""vLLM rollout engine for the student: `VLLMGenerator` behind the same `Generator` interface as `HFGenerator`.

The student samples with vLLM; after every optimizer step the trainer calls `after_update(weights)`, which
writes the new weights as safetensors (to /dev/shm when it has room, else the temp dir; each tensor cast to the
engine's dtype on its own device before it is gathered, and written in ~1 GiB files so that rank 0 never holds
a second full copy; under torchrun rank 0 writes once and every rank's engine reads) and has the running engine
reload them in place
(`collective_rpc("reload_weights", weights_path=...)`, vLLM's in-place reload on both the GPU and the CPU
worker, then `reset_prefix_cache()`). On GPU, with `sleep=True`, `before_update()` (once a step's rollouts are
generated) puts the engine to sleep: vLLM sleep mode level 2 frees its weights and KV cache for the update;
the reload wakes the weights, reloads, then wakes the KV cache. (vLLM's CPU worker has no sleep
mode, so this part has not run here.) The sampled tokens' log-probabilities come from vLLM
(`logprobs_mode="raw_logprobs"`: the policy itself, before temperature/top-p), so the trainer can apply the
stale-policy / engine-mismatch importance correction (`loss.importance_correction`).

LoRA students (`lora_rank`): the engine serves the frozen base with LoRA enabled and never reloads it; each
update writes only the adapter (peft's format, megabytes) and the engine takes it as a new LoRA request
(`add_lora` with a fresh id, the previous one removed), which every following `generate` uses. Sleep mode is
then level 1 (weights offloaded to host memory and restored on wake, KV cache freed), since the base must
survive the sleep; not exercised on CPU either.

Only this module (on the trainer side) imports vllm.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from student_trainer.rollout import Generator, Rollout

if TYPE_CHECKING:
    from student_trainer.parallel import StudentWeights

logger = logging.getLogger(__name__)


class VLLMGenerator(Generator):
    def __init__(
        self,
        model_dir: str,
        tokenizer,
        *,
        dtype: str = "auto",
        max_model_len: int,
        gpu_memory_utilization: float | None = None,
        reserve_bytes: float = 0.0,
        seed: int = 0,
        weights_dir: str | None = None,
        remove_weights_dir: bool | None = None,
        gpu: int | None = None,
        sleep: bool = True,
        weights_bytes: int | None = None,
        lora_rank: int | None = None,
    ):
        """`weights_dir`: where the new weights are written and reloaded from (default: `new_weights_dir()`).
        `remove_weights_dir`: whether `close` removes it (default: when it was created here). `weights_bytes`: the
        size of one copy of the weights in the engine's dtype (chooses /dev/shm or disk). `gpu`: index among
        the visible GPUs to run the engine on (one engine per trainer
        rank under torchrun); None: vLLM's default, the first. `lora_rank`: serve `model_dir` as a frozen base with
        LoRA adapters of this (maximal) rank, pushed by `after_update`. `gpu_memory_utilization` None: derived from
        the GPU memory free now, leaving `reserve_bytes` (see student_trainer.estimate.engine_share)."""
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # prefix caching: the samples of one prompt, and prompts sharing a chat template's system prompt, reuse
        # the prompt's KV blocks; the cache is reset after every weight reload, so no stale entry survives a step
        kwargs = dict(
            model=model_dir, dtype=dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32"),
            max_model_len=max_model_len, enable_prefix_caching=True, seed=seed, max_logprobs=1,
            logprobs_mode="raw_logprobs", skip_tokenizer_init=True,
        )
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        self.lora = lora_rank is not None
        self.lora_request = None  # the adapter every generate() samples with (LoRA: set by the first after_update)
        self.sleep_enabled = on_gpu and sleep
        self.asleep = False
        self.wake_bytes = 0  # GPU memory the engine released when it last went to sleep
        if on_gpu:
            if gpu_memory_utilization is None:
                gpu_memory_utilization = derive_memory_share(gpu or 0, reserve_bytes)
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.sleep_enabled
        self.dtype = getattr(torch, kwargs["dtype"])
        with standalone_engine_env(gpu if on_gpu else None):
            self.llm = LLM(**kwargs)
        self.eos = tokenizer.eos_token_id
        self.remove_weights_dir = weights_dir is None if remove_weights_dir is None else remove_weights_dir
        self.sync_bytes = 0  # bytes of weights written by the last after_update (rank 0)
        self.weights_dir = weights_dir or new_weights_dir(weights_bytes)

    def before_update(self) -> None:
        self.sleep()

    def after_update(self, weights: StudentWeights) -> None:
        """The trainer's new weights into the running engine (collective when sharded: rank 0 writes them once,
        to a directory every rank's engine reloads from). LoRA: the adapter only."""
        if weights.lora:
            state = weights.full_state()
            if weights.ranks.main:
                from student_trainer.lora import save_adapter

                save_adapter(weights.peft, self.weights_dir, state)
            weights.ranks.barrier()
            self.load_adapter()
        else:
            self.sync_bytes = write_safetensors(weights.engine_tensors(self.dtype), self.weights_dir)
            weights.ranks.barrier()
            self.reload()

    def load_weights(self, model) -> None:
        """Push a (one-process) model's current weights into the running engine."""
        from student_trainer.parallel import Policy, iter_full_weights

        self.sync_bytes = write_safetensors(iter_full_weights(Policy(model), self.dtype, True), self.weights_dir)
        self.reload()

    def load_adapter(self) -> None:
        """Have the engine take the adapter in `weights_dir` (peft's format) as a new LoRA request, loaded now,
        and drop the previous one."""
        from vllm.lora.request import LoRARequest

        self._wake(["weights", "kv_cache"])  # level-1 sleep kept the base: everything wakes at once
        previous = self.lora_request
        n = previous.lora_int_id + 1 if previous is not None else 1
        self.lora_request = LoRARequest(f"student-{n}", n, self.weights_dir)
        self.llm.llm_engine.add_lora(self.lora_request)  # read now: the directory may be rewritten next step
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self.asleep = False

    def _wake(self, tags: list[str]) -> None:
        if not self.asleep:
            return
        import torch

        # the engine allocates in its own process: hand back what this process's caching allocator holds
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        if free < self.wake_bytes:
            raise RuntimeError(
                f"the rollout engine cannot wake up: it needs the {self.wake_bytes / 2**30:.1f} GiB it released when "
                f"it went to sleep, and {free / 2**30:.1f} GiB of the GPU are free while the trainer holds its state "
                "(python -m student_trainer.estimate shows the budget). Lower rollout.vllm_gpu_memory_utilization, "
                "or the trainer's share: optim.micro_batch_tokens, more GPUs"
            )
        self.llm.wake_up(tags=tags)

    def reload(self) -> None:
        """Have the engine reload the weights in `weights_dir` (written by `write_safetensors`, maybe by another rank)."""
        self._wake(["weights"])  # the KV cache stays freed until the weights are in
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.weights_dir})
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) until the next reload; no-op on CPU. What it frees
        is measured, so that waking up can check it is free again (see `reload`)."""
        if self.sleep_enabled and not self.asleep:
            import torch

            before, _ = torch.cuda.mem_get_info()
            self.llm.sleep(level=1 if self.lora else 2)
            after, _ = torch.cuda.mem_get_info()
            self.wake_bytes = max(0, after - before)
            self.asleep = True

    def _params(self, n, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams

        greedy = temperature == 0  # vLLM refuses n > 1 when greedy: sample once, repeat (see `_rollouts`)
        return SamplingParams(
            n=1 if greedy else n, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
            seed=seed, logprobs=0, flat_logprobs=True, detokenize=False,
            stop_token_ids=[self.eos] if self.eos is not None else None,
        )

    def _rollouts(self, prompt, out, pi: int, n: int) -> list[Rollout]:
        """One prompt's finished `RequestOutput` as its n rollouts, in sample order."""
        comps = sorted(out.outputs, key=lambda c: c.index)
        if len(comps) == 1 and n > 1:  # greedy
            comps = comps * n
        rollouts = []
        for c in comps:
            ids = list(c.token_ids)
            # logprobs=0: one entry per generated position, the sampled token's (flat lists, no dicts)
            lps = (np.asarray(c.logprobs.logprobs, dtype=np.float32) if c.logprobs is not None
                   else np.zeros(len(ids), np.float32))
            finished = c.finish_reason == "stop"
            if finished and c.stop_reason == self.eos and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)  # keep EOS in the completion, as HFGenerator does (its logprob unknown: 0)
                lps = np.append(lps, np.float32(0.0))
            rollouts.append(Rollout(list(prompt), ids, lps[: len(ids)], finished, pi))
        return rollouts

    def generate(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seed=None) -> list[Rollout]:
        from vllm.inputs import TokensPrompt

        params = self._params(n, max_new_tokens, temperature, top_p, seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False,
                                    lora_request=self.lora_request)
        return [r for pi, (p, out) in enumerate(zip(prompts, outputs, strict=True)) for r in self._rollouts(p, out, pi, n)]

    def stream(self, prompts, n, *, max_new_tokens, temperature=1.0, top_p=1.0, seeds) -> Iterator[list[Rollout]]:
        """All prompts submitted at once (the engine schedules them together, continuous batching), each
        prompt's group of n rollouts yielded as soon as its last sample finishes, in finishing order.
        `seeds[i]` seeds prompt i's samples (vLLM seeds each request on its own, so a group's samples do not
        depend on what else is in the batch)."""
        from vllm.inputs import TokensPrompt

        params = [self._params(n, max_new_tokens, temperature, top_p, s) for s in seeds]
        ids = self.llm.enqueue([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                               lora_request=self.lora_request, use_tqdm=False)
        # enqueue returns the engine's internal ids, "<the request's own id>-<8 random characters>"; outputs
        # carry the request's own id
        index = {rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)}
        engine, done = self.llm.llm_engine, set()
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        pi = index[out.request_id]
                        done.add(pi)
                        yield self._rollouts(prompts[pi], out, pi, n)
        finally:  # a consumer that stops early must not leave requests behind for the next generate
            left = [rid for i, rid in enumerate(ids) if i not in done]
            if left:
                engine.abort_request(left, internal=True)

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            engine.engine_core.shutdown()
        if self.remove_weights_dir:  # a copy of the model in /dev/shm is memory until removed
            shutil.rmtree(self.weights_dir, ignore_errors=True)


def derive_memory_share(gpu: int, reserve_bytes: float) -> float:
    """`gpu_memory_utilization` from the memory free on GPU `gpu` now (what this process's allocator caches
    handed back first), or a ConfigError naming the knobs when too little is left."""
    import torch

    from student_trainer.config import ConfigError
    from student_trainer.estimate import engine_share

    torch.cuda.synchronize(gpu)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(gpu)
    share = engine_share(free, total, reserve_bytes)
    logger.info("rollout engine: %.1f of %.1f GiB free, %.1f GiB kept for the update: gpu_memory_utilization=%.3f",
                free / 2**30, total / 2**30, reserve_bytes / 2**30, share)
    if share < MIN_MEMORY_SHARE:
        raise ConfigError(
            f"the rollout engine would get {share:.3f} of the GPU ({free / 2**30:.1f} GiB free, {reserve_bytes / 2**30:.1f} "
            "GiB kept for the update): too little for its weights and KV cache. Shard the trainer over more GPUs, "
            "keep rollout.vllm_sleep=true, lower optim.micro_batch_tokens, or set rollout.vllm_gpu_memory_utilization"
        )
    return share


MIN_MEMORY_SHARE = 0.02


# Weights go to the engine in files of about this size: rank 0 holds at most one file's tensors at a time.
SHARD_BYTES = 1 << 30


def write_safetensors(tensors, out_dir: str, shard_bytes: int | None = None) -> int:
    """Write (name, tensor) pairs as `model-NNNNN.safetensors` files of about `shard_bytes` each into `out_dir`
    (what vLLM's loader reads: every *.safetensors file of a directory), dropping files left from a previous
    write with more parts. Exhausts `tensors` (which may be collective) on every rank; returns the bytes written
    (0 where nothing was yielded)."""
    from safetensors.torch import save_file

    shard_bytes = shard_bytes or SHARD_BYTES
    part: dict = {}
    size = written = n = 0

    def flush() -> None:
        nonlocal part, size, n
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(out_dir, f".model-{n:05d}.safetensors.tmp")
        save_file(part, tmp)
        os.replace(tmp, os.path.join(out_dir, f"model-{n:05d}.safetensors"))  # never a half-written part
        part, size, n = {}, 0, n + 1

    for name, t in tensors:
        part[name] = t.contiguous()
        nbytes = t.numel() * t.element_size()
        size += nbytes
        written += nbytes
        if size >= shard_bytes:
            flush()
    if part:
        flush()
    if written:
        for f in os.listdir(out_dir):
            stale = f.startswith("model-") and f.endswith(".safetensors") and int(f[6:11]) >= n
            if stale or f == "model.safetensors":
                os.remove(os.path.join(out_dir, f))
    return written


# Room /dev/shm must have beyond one copy of the weights (safetensors headers, the engine's reads meanwhile).
SHM_HEADROOM = 1.25


def new_weights_dir(weights_bytes: int | None = None, shm: str = "/dev/shm") -> str:
    """A fresh directory for handing weights to the engine: in /dev/shm (memory, not disk) when it exists and has
    room for `weights_bytes` (with headroom), else in the local temp dir. A container's /dev/shm is 64 MB unless
    raised (`--shm-size`, compose `shm_size`): an 8B student's 16 GB would fail there with ENOSPC mid-run."""
    where = shm if os.path.isdir(shm) else None
    if where is not None and weights_bytes is not None:
        free = shutil.disk_usage(where).free
        if free < SHM_HEADROOM * weights_bytes:
            logger.warning(
                "%s has %.2f GiB free; the student's weights need %.2f GiB: handing them to the rollout engine "
                "through %s instead (slower; raise the container's --shm-size to use memory)",
                where, free / 2**30, weights_bytes / 2**30, tempfile.gettempdir(),
            )
            where = None
    return tempfile.mkdtemp(prefix="aopd-student-weights-", dir=where)


def weights_nbytes(model, dtype) -> int:
    """Bytes of `model`'s weights in `dtype` (global sizes, also for sharded parameters)."""
    import torch

    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


# torchrun's variables: an engine started inside a trainer rank must not take itself for a member of that group
_TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


# vLLM picks some code paths by what it finds at start: on CUDA the V2 model runner (when Triton sees a GPU
# driver) and forking its workers (also from a thread that runs other work). Pin the paths this project tested:
# the V1 runner and spawned workers (a user's own setting wins). The teacher's engine pins the same.
VLLM_PINNED_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


@contextlib.contextmanager
def standalone_engine_env(gpu: int | None):
    """While vLLM starts its engine process (which inherits this environment): hide torchrun's variables, pin
    `VLLM_PINNED_ENV`, and, when `gpu` is given, make only that GPU visible (mapped through an existing
    CUDA_VISIBLE_DEVICES)."""
    saved = {k: os.environ.get(k) for k in (*_TORCHRUN_ENV, "CUDA_VISIBLE_DEVICES", *VLLM_PINNED_ENV)}
    try:
        for k in _TORCHRUN_ENV:
            os.environ.pop(k, None)
        for k, v in VLLM_PINNED_ENV.items():
            os.environ.setdefault(k, v)
        if gpu is not None:
            import torch

            visible = saved["CUDA_VISIBLE_DEVICES"]
            ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[gpu]
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
