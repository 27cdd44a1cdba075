"""bench/gpu_check.py, the one command a GPU session runs: its dry run walks every stage on CPU with tiny shapes
(the real entry points, the same children, the same result files), so the script cannot rot between the rare
GPU sessions; and a stage that fails is recorded as failed, with its reason, while the others still run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    return proc, json.loads((out / "gpu_check.json").read_text())


def leftover_processes(work_dir: str) -> list[str]:
    """Command lines of live processes that still name the run's work dir (teacher server, trainers, builders)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if work_dir in text:
            found.append(text)
    return found


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports_sane_figures(tmp_path):
    proc, result = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    stages = result["stages"]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(("loss", "score", "train", "fsdp"), "ok")
    assert all(s["seconds"] > 0 and s["error"] is None for s in stages.values())
    assert "random" in result["weights"]
    env = result["environment"]
    assert env["probe"] == "ok" and env["torch"] and env["python"]
    assert env["packages"]["transformers"] == env["pinned"]["transformers"]  # this machine runs the pinned set
    assert env["mm_out_dtype"].startswith("unavailable on cpu")  # CUDA-only kernel: the probe says so here

    loss = stages["loss"]["figures"]
    naive = [r for r in loss["runs"] if r["impl"] == "naive"]
    fused = [r for r in loss["runs"] if r["impl"] == "fused"]
    assert naive and len(fused) == len(naive) * 2
    for r in fused:
        ref = next(n for n in naive if n["d"] == r["d"])
        assert r["time_median_s"] > 0 and r["time_ratio"] > 0
        assert r["peak_extra_mib"] < ref["peak_extra_mib"]  # no [N, V] logits: measurable even at tiny shapes
        # the same loss: bf16 inputs, float32 arithmetic on both paths, except that the naive path rounds each
        # logit to bfloat16 first (2**-8 relative); a wrong chunk or a missed position moves it far more
        assert math.isclose(r["loss"], ref["loss"], rel_tol=2e-2)

    score = stages["score"]["figures"]
    assert score["teacher_setup"]["params"] > 0 and score["teacher_setup"]["server_ready_s"] > 0
    assert score["tokens"] == score["sequences"] * score["seq_len"] and score["tok_per_s"] > 0
    assert "limit_tok_per_s" not in score  # the bf16 limit is a GPU figure

    plan = result["plan"]
    for name in ("train", "fsdp"):
        f = stages[name]["figures"]
        assert [s["step"] for s in f["steps"]] == [1, 2, 3], name
        for s in f["steps"]:
            assert s["step_s"] > 0 and s["generate_s"] > 0 and s["update_s"] > 0 and s["score_wait_s"] >= 0
            assert s["teacher_ms_per_request"] > 0 and 0 < s["len_mean"] <= plan["new_tokens"]
            assert math.isfinite(s["loss"])
        assert f["checkpoint_complete"] and f["checkpoint_bytes"] > 0
        assert f["process_s"] > sum(s["step_s"] for s in f["steps"])
    assert "torch.distributed.run" in stages["fsdp"]["figures"]["command"]
    assert stages["train"]["figures"]["student_setup"]["params"] > 0  # built once, reported once
    assert stages["fsdp"]["figures"]["student_setup"] == {}

    table = (tmp_path / "gpu_check.txt").read_text()
    assert table.strip() in proc.stdout
    assert all(rec["title"] in table for rec in stages.values()) and "random weights" in table
    log = (tmp_path / "gpu_check.log").read_text()
    assert "=== trainer: exit 0" in log and "=== torchrun trainer: exit 0" in log
    assert not Path(result["work_dir"]["path"]).exists()
    assert leftover_processes(result["work_dir"]["path"]) == []


@pytest.mark.slow
def test_a_failed_stage_is_recorded_while_the_others_still_run(tmp_path):
    # No child imports torch in half a second: the environment probe and the loss stage run past their limits
    # and are killed; the teacher stage after them runs as usual.
    proc, result = run_check(tmp_path, "--only", "loss,score", "--limit", "env=0.5", "--limit", "loss=0.5")
    assert proc.returncode == 1
    stages = result["stages"]
    env = result["environment"]
    assert env["probe"] == "failed" and "time limit" in env["probe_error"]
    assert stages["loss"]["status"] == "failed" and "time limit" in stages["loss"]["error"]
    assert all("error" in r for r in stages["loss"]["figures"]["runs"])
    assert stages["score"]["status"] == "ok" and stages["score"]["figures"]["tok_per_s"] > 0
    assert stages["train"]["status"] == stages["fsdp"]["status"] == "skipped"
    table = (tmp_path / "gpu_check.txt").read_text()
    assert "failed" in table and "skipped" in table
    assert leftover_processes(result["work_dir"]["path"]) == []
