"""Typed server settings: command-line flags, or `TEACHER_*` environment variables (flags win)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEACHER_", extra="forbid", protected_namespaces=())

    model: str = Field(description="Directory of a Hugging Face model (weights + tokenizer).")
    model_name: str | None = Field(None, description="Name reported in /v1/info (default: the directory's basename).")
    engine: Literal["hf", "vllm"] = Field("hf", description="Scoring backend: transformers ('hf') or vLLM.")
    host: str = Field("127.0.0.1", description="Bind address. Use 0.0.0.0 inside a container.")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="hf engine: 'cpu', 'cuda', 'cuda:1', or 'auto' (cuda if available).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Teacher weights dtype ('auto': bfloat16 on GPU, float32 on CPU)."
    )
    max_top_k: int = Field(64, ge=1, description="Largest K a request may ask for (vLLM: its max_logprobs).")
    max_tokens_per_batch: int = Field(
        16384, ge=1, description="Token budget of one forward (hf: padded tokens; vLLM: max_num_batched_tokens)."
    )
    max_tokens_per_request: int = Field(1 << 20, ge=1, description="Total tokens one request may carry (else 413).")
    max_sequences_per_request: int = Field(4096, ge=1)
    max_seq_len: int | None = Field(None, ge=2, description="Longest sequence accepted (default: the model's).")
    max_body_bytes: int = Field(64 << 20, ge=1024, description="Request bodies larger than this get 413 unparsed.")
    batch_wait_ms: float = Field(
        2.0, ge=0, description="hf engine: how long the batcher waits for more requests before a forward."
    )
    logits_chunk_size: int = Field(
        1024, ge=1, description="Rows of [rows, V] float32 logits materialised at once for log-softmax/top-k."
    )
    # vLLM engine options, passed through.
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM engine: GPUs the teacher is sharded over (the hf engine runs on one device)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    enable_prefix_caching: bool = Field(False, description="vLLM prefix cache (prompt logprobs skip reading it).")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1/score and /v1/generate require 'Authorization: Bearer <key>' (/health stays open)."
    )
    api_keys_file: str | None = Field(
        None, description="Tenants: a YAML/JSON file of API keys (stored as SHA-256), each naming a tenant with a weight "
        "and optional limits (see teacher_server/tenants.py); re-read on SIGHUP and when it changes. Replaces --api-key.",
    )
    api_keys_reload_s: float = Field(5.0, gt=0, description="How often the keys file's modification time is checked.")
    scheduling: Literal["fair", "fifo"] = Field(
        "fair", description="When the engine is saturated: fair = backlogged tenants get tokens in proportion to their "
        "weights (start-time fair queueing); fifo = arrival order.",
    )
    engine_tokens_in_flight: int | None = Field(
        None, ge=1, description="Scoring tokens admitted into the engine at once; beyond it requests wait in the fair "
        "queue (default: 2 x max_tokens_per_batch, so the engine always has its next batch).",
    )
    ssl_certfile: str | None = Field(None, description="Serve HTTPS with this certificate (PEM; uvicorn's TLS).")
    ssl_keyfile: str | None = Field(None, description="The certificate's private key (PEM).")
    max_queued_requests: int = Field(
        256, ge=1, description="Requests admitted at once (queued or running); beyond it: 429 with Retry-After."
    )
    keep_alive_s: float = Field(
        75.0, gt=0, description="How long an idle HTTP connection stays open. Longer than clients' own idle expiry "
        "(httpx: 5 s), so a client never sends on a connection the server is closing at that moment.",
    )
    graceful_shutdown_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight requests may finish.")
    log_level: str = Field("info")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.api_key is not None and not self.api_key.get_secret_value():
            self.api_key = None  # TEACHER_API_KEY="" (e.g. an unset compose variable) means no auth
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both to serve HTTPS")
        if self.api_keys_file is not None and self.api_key is not None:
            raise ValueError("--api-key and --api-keys-file both set: give the key as one tenant of the keys file")
        if self.engine == "hf" and self.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} with engine=hf: the transformers engine runs on one "
                "device; use --engine vllm for a teacher sharded over several GPUs"
            )
        if self.max_top_k > 4096:
            raise ValueError(f"max_top_k={self.max_top_k} is unreasonably large; use at most 4096")
        return self
