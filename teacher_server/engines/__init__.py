"""Scoring backends. Each engine turns a validated `ScoreBatch` into a `ScoreResult`.

`hf` (transformers, reference) lives in `hf.py`; `vllm` in `vllm.py`, the only module that imports vllm.
"""

from __future__ import annotations

from teacher_server.engines.base import EngineInfo, ScoringEngine
from teacher_server.settings import Settings


def build_engine(settings: Settings) -> ScoringEngine:
    if settings.engine == "hf":
        from teacher_server.engines.hf import HFEngine

        return HFEngine(settings)
    if settings.engine == "vllm":
        from teacher_server.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    raise ValueError(f"unknown engine {settings.engine!r}; choose 'hf' or 'vllm'")


__all__ = ["EngineInfo", "ScoringEngine", "build_engine"]
