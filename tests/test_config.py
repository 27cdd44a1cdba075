"""The run config as a user meets it: every key described (the method's own first) in `--help`, and the
resolved config written to the run directory with those descriptions, loading back to the same config.
Also the package boundary: the teacher server imports nothing of the trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from student_trainer.config import RunConfig, _Section, describe_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _all_fields():
    for name, f in RunConfig.model_fields.items():
        section = f.annotation if isinstance(f.annotation, type) and issubclass(f.annotation, _Section) else None
        if section is None:
            yield name, f
        else:
            yield from ((f"{name}.{k}", g) for k, g in section.model_fields.items())


def test_every_config_key_has_a_description_and_the_method_comes_first():
    keys = [k for k, _ in _all_fields()]
    missing = [k for k, f in _all_fields() if not (f.description or "").strip()]
    assert not missing, f"config keys without a description: {missing}"
    method = ["loss.mode", "loss.tau", "loss.beta", "loss.lam", "loss.support_norm"]
    first_other = min(i for i, k in enumerate(keys) if k != "name" and not k.startswith("loss."))
    assert all(keys.index(k) < first_other for k in method), keys[:10]


def test_help_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "student_trainer", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for key, _ in _all_fields():
        assert f"  {key} (" in out.stdout, key
    assert describe_config() in out.stdout.replace("\r", "")


def test_resolved_config_is_commented_and_loads_back(tmp_path):
    cfg = load_config(ROOT / "toy" / "configs" / "base.yaml", ["teacher.url=http://127.0.0.1:1", "loss.tau=-0.5",
                                                               "train.eval_ks=[1,2]"])
    cfg.data.system_prompt = "a: b, 'c' # not a comment"
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    text = path.read_text()
    assert text.index("loss:") < text.index("model:")
    assert "  # AOPD threshold on p_T(y) - p_S(y)" in text
    assert load_config(path) == cfg


def test_teacher_server_imports_nothing_from_the_trainer():
    offenders = []
    for py in sorted((ROOT / "teacher_server").rglob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{py.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "student_trainer"]
    assert not offenders, offenders
    teacher_image = (ROOT / "docker" / "teacher.Dockerfile").read_text()
    assert "student_trainer" not in teacher_image, "the teacher image ships the trainer"


def test_exopd_without_a_reference_endpoint_is_refused_before_any_work():
    import pytest

    from student_trainer.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.ref_url"):
        load_config(ROOT / "toy" / "configs" / "base.yaml", ["teacher.url=http://127.0.0.1:1", "loss.mode=exopd"])


def test_unreachable_teacher_exits_with_status_3_and_says_how_to_start_it(tmp_path):
    from teacher_server.process import free_port

    cmd = [sys.executable, "-m", "student_trainer", "--config", str(ROOT / "toy" / "configs" / "base.yaml"),
           f"teacher.url=http://127.0.0.1:{free_port()}", "teacher.startup_wait_s=0", f"train.run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "not reachable" in out.stderr and "python -m teacher_server" in out.stderr
    assert "Traceback" not in out.stderr
