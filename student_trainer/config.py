"""Typed run configuration: YAML file + dotted `key=value` overrides, validated before any work.

    python -m student_trainer --config run.yaml loss.mode=aopd loss.tau=-0.1 train.steps=200

Every field has a docstring-like description; errors name the key and the fix. The resolved config is written
to `<run_dir>/config.yaml`, so a run directory always says exactly what produced it.
"""

from __future__ import annotations

import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from student_trainer.losses import LossConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class LossSection(_Section):
    """The method: which per-token loss, and its knobs (shared/spec/method.md; student_trainer/losses.py)."""

    mode: Literal["opd", "aopd", "aopd_add", "gkd", "aopd_zero", "aopd_acc", "exopd", "seqkd"] = Field(
        "aopd", description="opd: policy gradient with the advantage A = lp_T(y) - lp_S(y) at every token. aopd: the "
        "same where p_T(y) - p_S(y) > tau, a forward KL toward the teacher's top-k distribution elsewhere. aopd_add: "
        "policy gradient everywhere plus that KL where masked. gkd: the KL everywhere. aopd_zero: KL where |A| <= "
        "zero_eps. aopd_acc: KL where A <= 0 and the answer is wrong. exopd: extrapolated advantage lam * (lp_T - "
        "lp_R) - (lp_S - lp_R) (needs teacher.ref_url, or model.lora: R is the base). seqkd: supervised on the "
        "teacher's own samples.",
    )
    tau: float = Field(
        0.0, description="AOPD threshold on p_T(y) - p_S(y), in [-1, 1]: intervene where it is <= tau. 0 = at zero and "
        "negative advantages (the paper's setting); < -1 never intervenes (= opd); >= 1 always (= gkd).",
    )
    beta: float = Field(
        0.0, description="Divergence at masked tokens, TRL's generalised JSD: 0 = forward KL(teacher || "
        "student) (the paper's), 1 = reverse KL, in between the JSD with mixture weight beta.",
    )
    zero_eps: float = Field(1e-3, description="|A| <= zero_eps counts as a zero advantage (aopd_zero's mask, adv/frac_zero).")
    lam: float = Field(1.25, description="exopd: the extrapolation factor lam; lam = 1 is opd.")
    support_norm: Literal["both", "teacher"] = Field(
        "both", description="Support of the divergence: both = teacher and student renormalised on the teacher's top-k "
        "(the paper's); teacher = only the teacher, so the student's mass outside the top-k is pushed down too "
        "(beta = 0 only).",
    )
    importance_correction: bool = Field(
        False, description="Weight the policy gradient by min(pi/pi_behaviour, is_cap) using the sampling logprobs "
        "(for rollouts from an older policy or another engine). Plain on-policy when false."
    )
    is_cap: float = Field(2.0, gt=0, description="Cap of the truncated importance weight (importance_correction).")
    reduction: Literal["token", "sequence"] = Field(
        "token", description="token: mean over all completion tokens of the step; sequence: mean of per-sequence means."
    )
    chunk_size: int | None = Field(None, ge=1, description="Positions per chunk of the fused lm_head + loss (the "
                                   "[chunk, V] logits are its largest temporaries); None: 128 on CPU, 2048 on a GPU.")

    def loss_config(self) -> LossConfig:
        return LossConfig(
            mode=self.mode, tau=self.tau, beta=self.beta, zero_eps=self.zero_eps, lam=self.lam,
            support_norm=self.support_norm, chunk_size=self.chunk_size, is_cap=self.is_cap,
        )


# Qwen3's (and Llama's, Mistral's, Qwen2's) linear layers: every projection of attention and MLP, the placement
# that matches full fine-tuning best at a given rank (Schulman et al., "LoRA Without Regret", 2025; tinker's default).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM 0.32's max_lora_rank choices (vllm/config/lora.py MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class LoraSection(_Section):
    """LoRA adapters (peft): the base weights stay frozen, only the adapters train (student_trainer/lora.py)."""

    rank: int = Field(32, ge=1, description="LoRA rank r of every adapted layer (with rollout.engine=vllm: one of "
                      f"vLLM's {list(VLLM_LORA_RANKS)}).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank (32 with rank 32: "
                         "scale 1; a fixed alpha keeps the best lr roughly independent of the rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input, during the update's forward "
                           "only (the advantage then comes from a perturbed policy; 0, the default, keeps it exact).")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), description="Names of the linear layers to adapt (peft's "
        "target_modules: a module whose name ends with one of them). Not lm_head or the embeddings: the fused loss "
        "reads lm_head's weight directly, so it stays frozen.",
    )

    @model_validator(mode="after")
    def _frozen_head(self) -> LoraSection:
        bad = [m for m in self.target_modules if m.split(".")[-1] in ("lm_head", "embed_tokens", "wte")]
        if bad:
            raise ValueError(f"model.lora.target_modules {bad}: lm_head and the embeddings stay frozen (the fused loss "
                             "reads lm_head's weight directly); adapt the attention and MLP projections")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules is empty: name the layers to adapt, e.g. q_proj, v_proj")
        return self


class ModelSection(_Section):
    path: str = Field(description="Student model directory (Hugging Face format, with its tokenizer).")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on GPU, float32 on CPU.")
    device: str = Field("auto", description="'cpu', 'cuda', 'cuda:1' or 'auto'.")
    lora: LoraSection | None = Field(
        None, description="Train LoRA adapters instead of all weights (e.g. model.lora.rank=64; model.lora={} for the "
        "defaults). The frozen base stays in model.dtype; adapters and their optimizer state are float32; "
        "checkpoints hold the adapter in peft's format (python -m student_trainer.export merges it). null: full weights.",
    )


class TeacherEndpoint(_Section):
    """One of several named teachers (teacher.teachers.<name>)."""

    url: str = Field(description="This teacher's endpoint; several replicas comma-separated.")
    top_k: int | None = Field(None, ge=1, description="Its top-k (default: teacher.top_k).")
    api_key: str | None = Field(None, description="Its bearer token (default: teacher.api_key / TEACHER_API_KEY).")


class TeacherSection(_Section):
    url: str | None = Field(
        None, description="Teacher endpoint, e.g. http://teacher:8000; several replicas comma-separated "
        "(requests go to the least busy; a failed one is skipped and taken back when healthy)."
    )
    ref_url: str | None = Field(
        None,
        description="exopd only: a second scoring endpoint serving the student's initial weights (python -m "
        "teacher_server --model <student init>), so no extra copy of the student sits in trainer memory. With "
        "model.lora it is optional: the reference is the base model, scored in the trainer with the adapters off.",
    )
    top_k: int = Field(32, ge=1, description="K: teacher top-k per position.")
    protocol: Literal["auto", "aopd", "openai"] = Field(
        "auto", description="aopd: our teacher's /v1/score; openai: any vLLM-compatible server (e.g. a stock `vllm "
        "serve`), scored through /v1/completions with prompt_logprobs; auto: aopd where /v1/info exists, else openai."
    )
    encoding: Literal["msgpack", "json"] = Field(
        "msgpack", description="Wire encoding of scoring requests: msgpack (binary arrays, fast) or json (debugging)."
    )
    compression: Literal["auto", "zstd", "lz4", "none"] = Field(
        "auto", description="Compression of scoring responses, asked for per request (Accept-Encoding): auto = zstd "
        "(lz4 from a teacher without it), none from a loopback teacher. zstd sends ~1.3x fewer bytes with a 150k "
        "vocabulary and pays below ~1 Gbit/s; set none for a faster link, where compressing costs more time than "
        "the bytes save (see bench/codec.py)."
    )
    max_in_flight: int = Field(
        4, ge=1, description="Scoring requests this rank keeps in flight per teacher: a chunk of rollouts goes out "
        "as soon as it is generated, without waiting for earlier chunks' answers, so round trips to a distant "
        "teacher overlap generation and each other (see bench/remote.py). The teacher's admission limits still apply."
    )
    timeout_s: float = Field(600.0, gt=0, description="Read timeout of one scoring request.")
    max_retries: int = Field(8, ge=0, description="Retries per request on connection errors / 429 / 502 / 503.")
    max_backoff_s: float = Field(30.0, gt=0, description="Longest wait between two retries (a Retry-After is capped to it).")
    startup_wait_s: float = Field(600.0, ge=0, description="How long to wait for a teacher that is down at start-up.")
    outage_timeout_s: float = Field(
        3600.0, ge=0, description="Mid-run: keep retrying a step's scoring this long before giving up (the step's "
        "rollouts are kept meanwhile)."
    )
    api_key: str | None = Field(None, description="Bearer token (default: TEACHER_API_KEY from the environment).")
    teachers: dict[str, TeacherEndpoint] | None = Field(
        None, description="Several named teachers instead of teacher.url, e.g. {math: {url: http://t1:8000}, code: "
        "{url: http://t2:8000, top_k: 16}}; data.teacher_field names the teacher of each prompt. All must share the "
        "student's tokenizer. Metrics per teacher: teacher/<name>/latency_ms, .../loss/div, .../aopd/intervention_ratio.",
    )
    ca_file: str | None = Field(
        None, description="https teachers: verify the certificate against this CA (PEM) instead of the system's "
        "trust store. A certificate that does not verify stops the run at once with the reason.",
    )


class DataSection(_Section):
    train_path: str = Field(description="Training prompts: local JSONL or Parquet.")
    eval_path: str | None = Field(None, description="Held-out problems with answers, for pass@k.")
    prompt_field: str = Field("prompt", description="Field of each record holding the prompt text.")
    answer_field: str = Field("answer", description="Field holding the reference answer (for correctness and pass@k).")
    apply_chat_template: bool | None = Field(None, description="None: apply when the tokenizer has a chat template.")
    system_prompt: str | None = Field(None, description="System message put before each prompt by the chat template.")
    eval_limit: int | None = Field(None, ge=1, description="Evaluate on the first N held-out problems only.")
    teacher_field: str | None = Field(
        None, description="With teacher.teachers: the field of each training record naming its teacher (required "
        "with two or more teachers; every record must name one of them).",
    )


class RolloutSection(_Section):
    prompts_per_step: int = Field(16, ge=1, description="Prompts drawn per optimizer step (split over ranks under torchrun).")
    samples_per_prompt: int = Field(4, ge=1, description="Completions the student samples per prompt.")
    max_new_tokens: int = Field(256, ge=1, description="Length limit of a completion (rollouts and evaluation).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of rollouts (1 = on-policy; 0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts (1 = off, on-policy).")
    stream_chunk_prompts: int = Field(
        4, ge=1, description="Prompts per streamed chunk: each chunk's rollouts go to the teacher as soon as they are "
        "generated, so scoring overlaps the generation of the next chunk."
    )
    stream: bool = Field(
        True, description="Stream chunks to the teacher during generation (false: generate everything, then score; "
        "for comparison, see bench/pipeline.py)."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="Student sampler: transformers generate, or a vLLM engine that reloads the weights after "
        "every optimizer step (its sampling logprobs feed loss.importance_correction)."
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="GPU share of the student's vLLM engine (weights + KV cache). Default: derived "
        "at start from the memory then free (the trainer's weights and Adam state already allocated), less 8% "
        "headroom and, when the engine does not sleep, what the update needs (python -m student_trainer.estimate "
        "prints it).",
    )
    vllm_sleep: bool = Field(
        True, description="On GPU: put the engine to sleep (vLLM sleep mode, level 2: weights and KV cache freed) "
        "while the trainer updates, and wake it for the new weights, so trainer and engine share one GPU. "
        "Ignored on CPU.",
    )
    generation_batch_size: int = Field(64, ge=1, description="Sequences per generate() call.")


class OptimSection(_Section):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (peak, after warm-up).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up from lr/warmup_steps to lr over this many steps.")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="After warm-up: constant lr, or cosine decay to min_lr_ratio * lr."
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: final lr as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this (logged before clipping).")
    fp32_master_weights: bool = Field(
        True, description="When model.dtype is bfloat16: keep float32 weights, gradient reduction and optimizer "
        "state, and compute in bfloat16 (FSDP2 mixed precision, also in one process). false: train the bfloat16 "
        "weights themselves (less memory, but an update below ~1/256 of a weight rounds away: lr 1e-5 on weights "
        "of 0.01 changes nothing).",
    )
    activation_checkpointing: bool | None = Field(
        None, description="Recompute each decoder layer's activations in backward instead of keeping them (one "
        "layer's activations plus each layer's input instead of all of them; the gradients are the same, the "
        "update ~1.3x slower). None: on with a GPU, off on CPU.",
    )
    memory_check: bool = Field(
        True, description="On a GPU, refuse at start a run that cannot fit in its memory by python -m "
        "student_trainer.estimate's arithmetic (naming the knob to change); false: start anyway.",
    )
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward; gradients accumulate over "
                                  "the step's micro-batches (the step's update does not depend on it).")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="A token budget per forward/backward instead: the step's sequences sorted by length "
        "and packed while members x the longest <= this many (padded) tokens, at most micro_batch_size of them. "
        "Bounds activation memory whatever the lengths and cuts padding (optim/padding_frac); the update is the "
        "same up to float summation order. None: micro_batch_size sequences in rollout order.",
    )


class TrainSection(_Section):
    steps: int = Field(100, ge=1, description="Optimizer steps of the whole run.")
    seed: int = Field(0, description="Seeds prompt order, sampling and evaluation: a run is a function of its config.")
    run_dir: str = Field("runs/default", description="Metrics, resolved config and checkpoints go here.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (and at start and end); 0 = never.")
    eval_n: int = Field(4, ge=1, description="Samples per held-out problem.")
    eval_ks: list[int] = Field(default_factory=lambda: [1, 4], description="pass@k values reported.")
    eval_temperature: float = Field(1.0, ge=0, description="Sampling temperature of the pass@k evaluation.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (and at the end); 0 = only at the end.")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk (oldest deleted first).")
    stop_after_steps: int | None = Field(
        None, ge=1, description="Stop (after checkpointing) once this invocation has run N steps; resume later with "
        "--resume. For preemptible / time-sliced jobs."
    )
    hist_every: int = Field(10, ge=0, description="Log the advantage histogram every N steps (0 = never).")
    dump_rollouts_every: int = Field(
        0, ge=0, description="Every N steps write the step's rollouts with per-token mask, advantage and teacher "
        "top-k entropy to <run_dir>/rollouts.jsonl, for post-hoc analysis (0 = never)."
    )
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to <run_dir>/tb.")
    progress: bool = Field(True, description="Progress bars for long phases (generation, evaluation).")
    dist_timeout_s: float | None = Field(
        None, gt=0, description="torchrun: how long a rank waits in a collective for the others (default: "
        "max(1800, teacher.outage_timeout_s + 600), so a teacher outage on one rank does not end the run).",
    )


class DriftSection(_Section):
    """The drift monitor (student_trainer/drift.py): a warning in the log and drift/alarm = 1 in metrics.jsonl when
    the run shows the signature AOPD's collapse had in our toy reproduction (docs/results/RESULTS.md): policy
    entropy climbing while the student's confidence falls below the teacher's and the intervention ratio rises;
    or the runaway: entropy climbing while the rollouts stop finishing within the token limit."""

    enabled: bool = Field(True, description="Watch each step's metrics for the drift signature (drift/* metrics, one "
                          "warning at the first alarm naming the settings that did not drift); false: off.")
    baseline_steps: int = Field(10, ge=1, description="The baseline of each signal is its mean over the run's first "
                                "this many steps.")
    window: int = Field(5, ge=1, description="Each signal is compared as its mean over the last this many steps, from "
                        "step baseline_steps + window on (the window never overlaps the baseline).")
    patience: int = Field(3, ge=1, description="Alarm once the signature has held on this many consecutive steps.")
    entropy_rise: float = Field(0.03, description="Entropy condition: the window's policy/entropy is above the "
                                "baseline's by at least this many nats per token ...")
    entropy_rise_frac: float = Field(0.1, description="... and by at least this fraction of the baseline.")
    gap_margin: float = Field(0.01, description="Confidence condition: the window's conf/gap_sampled (p_S(y) - p_T(y) "
                              "on sampled tokens) is at most -gap_margin (or the accuracy condition holds).")
    accuracy_drop_frac: float = Field(0.5, description="Accuracy condition, the confidence condition's alternative: "
                                      "the window's rollout/correct_frac is below (1 - this) x the baseline's ...")
    accuracy_floor: float = Field(0.05, description="... from a baseline of at least this (a student at the floor "
                                  "cannot fall; accuracy_drop_frac=1 turns the condition off).")
    intervention_rise: float = Field(0.02, description="Intervention condition: the window's aopd/intervention_ratio "
                                     "is above the baseline's by at least this much (or the divergence condition holds).")
    div_rise: float = Field(0.15, description="Divergence condition, the intervention condition's alternative: the "
                            "window's div/all (the support divergence from the teacher on the student's own rollouts) "
                            "is above the baseline's by at least this many nats ...")
    div_rise_frac: float = Field(0.5, description="... and by at least this fraction of the baseline.")
    finish_drop_frac: float = Field(0.5, description="Runaway, the second signature: the entropy condition and the "
                                    "window's rollout/finished_frac (rollouts ending within the token limit) below "
                                    "(1 - this) x the baseline's, alone (it needs no accuracy above the floor); "
                                    "1 turns it off.")


class RunConfig(_Section):
    name: str | None = Field(None, description="Run label in plots (default: the run directory's name).")
    loss: LossSection = LossSection()
    model: ModelSection
    teacher: TeacherSection = TeacherSection()
    data: DataSection
    rollout: RolloutSection = RolloutSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()
    drift: DriftSection = DriftSection()

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        named = self.teacher.teachers
        if self.teacher.url is None and not named:
            raise ValueError("teacher.url is required: the teacher endpoint that scores (or, for seqkd, writes) rollouts")
        if named is not None:
            if self.teacher.url is not None:
                raise ValueError("teacher.url and teacher.teachers both set: list every teacher under teacher.teachers")
            if not named:
                raise ValueError("teacher.teachers is empty: name at least one teacher, e.g. {main: {url: ...}}")
            bad = [n for n in named if not n or not all(c.isalnum() or c in "-_" for c in n)]
            if bad:
                raise ValueError(f"teacher.teachers names {bad}: use letters, digits, - and _ (they go into metric names)")
            if len(named) > 1 and self.data.teacher_field is None:
                raise ValueError(f"teacher.teachers has {len(named)} teachers ({', '.join(named)}): set data.teacher_field "
                                 "to the field of each record that names its teacher")
            if len(named) > 1 and self.loss.mode == "seqkd":
                raise ValueError("loss.mode=seqkd samples from one teacher: give teacher.url (or one teacher.teachers entry)")
        elif self.data.teacher_field is not None:
            raise ValueError("data.teacher_field routes prompts to teacher.teachers, which is not set")
        if self.loss.mode != "seqkd":
            self.loss.loss_config()  # LossConfig's own validation, with its messages
        if self.loss.mode == "exopd" and self.teacher.ref_url is None and self.model.lora is None:
            raise ValueError(
                "loss.mode=exopd needs reference logprobs: serve the student's initial weights as a second endpoint "
                f"(python -m teacher_server --model {self.model.path} --port 8001) and set teacher.ref_url"
            )
        if self.model.lora is not None and self.rollout.engine == "vllm" and self.model.lora.rank not in VLLM_LORA_RANKS:
            raise ValueError(f"model.lora.rank={self.model.lora.rank}: vLLM serves LoRA ranks {list(VLLM_LORA_RANKS)} only; "
                             "pick one of them (or rollout.engine=hf)")
        if self.loss.mode == "aopd_acc" and self.data.answer_field is None:
            raise ValueError("loss.mode=aopd_acc needs answers to verify: set data.answer_field")
        if self.train.eval_every and self.data.eval_path is None:
            raise ValueError("train.eval_every > 0 needs held-out problems: set data.eval_path (or eval_every=0)")
        bad_k = [k for k in self.train.eval_ks if k < 1 or k > self.train.eval_n]
        if bad_k:
            raise ValueError(f"train.eval_ks {bad_k} must be within [1, train.eval_n={self.train.eval_n}]")
        return self


class ConfigError(ValueError):
    pass


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML: numbers, bools, lists, null)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. loss.tau=-0.1)")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an optional section left null (model.lora: null)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, teacher:, ...)")
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e["loc"]) or "config"
            lines.append(f"  {where}: {e['msg']}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None


def _sections() -> list[tuple[str, type[_Section] | None]]:
    return [(name, f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, _Section) else None)
            for name, f in RunConfig.model_fields.items()]


def describe_config(width: int = 100) -> str:
    """Every key with its type, default and description, the method's own (loss.*) first: what --help shows."""
    lines: list[str] = []
    for name, section in _sections():
        fields = section.model_fields.items() if section is not None else [(None, RunConfig.model_fields[name])]
        for key, f in fields:
            dotted = name if key is None else f"{name}.{key}"
            default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
            lines.append(f"  {dotted} ({default})")
            lines += textwrap.wrap(f.description or "", width, initial_indent="      ", subsequent_indent="      ")
            nested = [a for a in typing.get_args(f.annotation) if isinstance(a, type) and issubclass(a, _Section)]
            for sub_key, sub in (nested[0].model_fields.items() if nested else []):  # e.g. model.lora.rank
                lines.append(f"  {dotted}.{sub_key} (default {sub.get_default(call_default_factory=True)!r})")
                lines += textwrap.wrap(sub.description or "", width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """The resolved config as YAML, each key under a comment with its description (loads back with load_config)."""
    values = cfg.model_dump(mode="json")
    out: list[str] = []

    def put(key: str, value: Any, description: str | None, indent: str) -> None:
        out.extend(textwrap.wrap(description or "", 110, initial_indent=indent + "# ", subsequent_indent=indent + "# "))
        out.append(indent + yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1])

    for name, section in _sections():
        if section is None:
            put(name, values[name], RunConfig.model_fields[name].description, "")
            continue
        out.append(f"{name}:")
        for key, f in section.model_fields.items():
            put(key, values[name][key], f.description, "  ")
    Path(path).write_text("\n".join(out) + "\n")
