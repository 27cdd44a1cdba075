"""Helpers shared by the tests (fixtures live in conftest.py): a live uvicorn server, teacher settings, the
engines to parametrise over, the trainer config of test_train, and the one rule for floating-point tolerances.

Tolerances: two computations of one quantity that add the same terms in another order (batched vs single,
padded vs packed, fused vs chunked, vLLM's kernels vs transformers', AVX2 vs scalar ATen kernels) differ by
rounding only. A sum of n terms of size ~m, reassociated, moves by about eps * m * sqrt(n): the rounding errors
have random signs and add like a random walk. `fp_tol` is that estimate times a safety factor of ULPS, where m
is the magnitude of the largest intermediate the compared values come from (the logits, for log-probabilities)
and n the longest sum inside (a dot product's width, a sum over positions). Derived this way, a tolerance
follows the numbers in the test instead of the one machine where it was first measured, and stays orders of
magnitude below what a real bug (a position shifted by one, a wrong normalisation: 1e-1 to 1) moves.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn

from teacher_server.process import free_port
from teacher_server.settings import Settings

__all__ = [
    "ENGINES", "F32_EPS", "HAS_VLLM", "ULPS", "LiveServer", "adam_weight_tol",
    "assert_topk_match", "cfg_overrides", "float32_tol", "fp_tol", "free_port", "make_cfg", "model_terms",
    "teacher_settings", "untied_NK",
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# floating-point tolerances
# ----------------------------------------------------------------------------------------------------------

F32_EPS = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7, the spacing of float32 numbers just above 1
# Safety factor over the random-walk estimate. Measured on the tests' own computations the estimate is not
# exceeded (worst: 0.6x for fused vs naive gradients, 0.3x for a padded vs single forward), so 4 leaves >= 6x.
ULPS = 4.0


def fp_tol(magnitude, n: int = 1, *, eps: float = F32_EPS, ulps: float = ULPS):
    """Absolute tolerance for values computed from intermediates of size `magnitude` through sums of up to `n`
    terms: ulps * eps * magnitude * sqrt(n). `magnitude` may be an array (an elementwise tolerance)."""
    return ulps * eps * magnitude * math.sqrt(n)


def untied_NK(lps_NK: np.ndarray, tol, next_N: np.ndarray | None = None) -> np.ndarray:
    """Where a sorted top-k row's entry is apart by more than 2 tol from both neighbours: its id is determined.

    Ids of near-ties (within rounding) may come in either order from two computations. Without the (k+1)-th
    value `next_N` the last column is never clear: the next id might tie with it.
    """
    tol = np.broadcast_to(tol, lps_NK.shape)
    gap_prev = -np.diff(lps_NK, axis=1, prepend=np.inf)
    after = np.full(lps_NK.shape[0], -np.inf) if next_N is None else next_N
    gap_next = -np.diff(np.concatenate([lps_NK, after[:, None]], axis=1), axis=1)
    clear_NK = (gap_prev > 2 * tol) & (gap_next > 2 * tol)
    if next_N is None:
        clear_NK[:, -1] = False
    return clear_NK


def adam_weight_tol(lr: float, steps: int, weight_scale: float) -> float:
    """Weights after `steps` AdamW steps along two float32 paths (gradients summed in another order).

    Adam divides each coordinate's step by its own gradient scale, so where a coordinate's gradients nearly
    cancel, float32 noise becomes a relative change of the step far above eps (measured up to 4e-4 of
    lr * steps); no a-priori bound exists. A real bug (other data, another normalisation or averaging) changes
    the steps' direction by O(10%): 5e-3 of lr * steps sits between the two, plus the weights' own rounding.
    """
    return 5e-3 * lr * steps + fp_tol(weight_scale)


def float32_tol(values, terms: int, ulps: float = 2 * ULPS) -> float:
    """One absolute tolerance for float32 log-probabilities `values` of a model whose longest chain of sums has
    `terms` terms (`model_terms`): fp_tol of max(1, max |values|). A whole network sits between the compared
    values here, so twice the safety factor of a single sum; ~1e-4 for the tiny test models."""
    magnitude = max(1.0, float(np.max(np.abs(np.asarray(values, dtype=np.float64))))) if np.size(values) else 1.0
    return float(fp_tol(magnitude, terms, ulps=ulps))


def model_terms(model_dir: Path | str) -> int:
    """`terms` for `float32_tol` from a model's config: hidden size x layers (the residual stream's dot products
    through the depth) + vocabulary (the log-normaliser)."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return int(cfg["hidden_size"]) * int(cfg["num_hidden_layers"]) + int(cfg["vocab_size"])


def assert_topk_match(ids_a, lp_a, ids_b, lp_b, tol: float) -> None:
    """Two top-k lists of the same rows agree: values within `tol`, ids equal wherever `untied_NK` says the
    reference `lp_b` determines them (near-ties may come in either order from two kernel paths)."""
    np.testing.assert_allclose(np.asarray(lp_a, np.float64), np.asarray(lp_b, np.float64), atol=tol, rtol=0)
    clear = untied_NK(np.asarray(lp_b, np.float64), tol)
    differ = np.asarray(ids_a) != np.asarray(ids_b)
    assert not (differ & clear).any(), f"top-k ids differ away from any near-tie at {np.argwhere(differ & clear)[:5]}"


# ----------------------------------------------------------------------------------------------------------
# servers and configs
# ----------------------------------------------------------------------------------------------------------

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ENGINES = [
    "hf",
    pytest.param("vllm", marks=[pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")]),
]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self.thread.is_alive():
                raise RuntimeError("server thread died during start-up")
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def teacher_settings(model_dir: Path, engine: str, **overrides) -> Settings:
    base = dict(model=str(model_dir), engine=engine, max_top_k=32, dtype="float32", max_seq_len=512)
    if engine == "vllm":
        base.update(max_tokens_per_batch=2048)
    base.update(overrides)
    return Settings(**base)


def make_cfg(student_dir, teacher_url, data_files, run_dir, *overrides):
    """The trainer config of test_train and test_distributed: 4 prompts x 2 samples per step in chunks of 2,
    micro-batches of 3, 2 steps at lr 1e-3, eval at step 0 and 2."""
    from student_trainer.config import load_config

    return load_config(None, cfg_overrides(student_dir, teacher_url, data_files, run_dir, *overrides))


def cfg_overrides(student_dir, teacher_url, data_files, run_dir, *overrides) -> list[str]:
    """`make_cfg`'s config as the dotted overrides `python -m student_trainer` takes."""
    return [
        f"model.path={student_dir}", f"teacher.url={teacher_url}", "teacher.top_k=8",
        f"data.train_path={data_files[0]}", f"data.eval_path={data_files[1]}", "data.apply_chat_template=false",
        "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
        "rollout.stream_chunk_prompts=2", "optim.lr=1e-3", "optim.micro_batch_size=3",
        f"train.run_dir={run_dir}", "train.steps=2", "train.eval_every=2", "train.eval_n=2", "train.eval_ks=[1,2]",
        "train.progress=false", "train.hist_every=1", "train.dump_rollouts_every=2", *overrides,
    ]
