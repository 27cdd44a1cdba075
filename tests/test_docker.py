"""Deployment files, validated statically (no Docker engine runs on these machines): the compose file's
structure (GPU reservations, ipc host, healthcheck with a long start period, restart policy, the trainer
waiting for a healthy teacher, an optional replica), every file and variable it references, and the containers'
commands parsed by the same entry points the tests run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


@pytest.fixture(scope="module")
def compose(env) -> dict:
    text = (DOCKER / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))
    missing = used - env.keys()
    assert not missing, f"compose.yaml uses variables not in .env.example: {sorted(missing)}"
    return yaml.safe_load(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], text))


def test_services_and_their_runtime_settings(compose):
    services = compose["services"]
    assert set(services) == {"teacher", "teacher-2", "trainer"}
    assert services["teacher-2"]["profiles"] == ["replica"]
    for name in ("teacher", "teacher-2"):
        t = services[name]
        assert t["ipc"] == "host" and t["restart"] == "unless-stopped"
        hc = t["healthcheck"]
        assert "/health" in " ".join(hc["test"]) and int(hc["start_period"].rstrip("s")) >= 300
        dev = t["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
        assert any(v.endswith(":/root/.cache/huggingface") for v in t["volumes"])
    trainer = services["trainer"]
    assert trainer["depends_on"]["teacher"]["condition"] == "service_healthy"
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfiles_exist_and_copy_existing_paths(compose):
    for svc in compose["services"].values():
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        text = dockerfile.read_text()
        assert re.search(r"^FROM \S+:\S+", text, re.M), f"{dockerfile.name}: base image must be pinned by tag"
        for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{dockerfile.name} copies missing {path}"


def test_teacher_command_parses_with_the_server_cli(compose):
    from teacher_server.__main__ import parse_settings

    for name in ("teacher", "teacher-2"):
        settings = parse_settings(compose["services"][name]["command"])
        assert settings.max_top_k == 32 and settings.tensor_parallel_size == 1
    entry = (DOCKER / "teacher.Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "teacher_server"]' in entry


def test_trainer_command_and_example_config_parse(compose):
    from torch.distributed.run import get_args_parser

    from student_trainer.config import load_config

    entry = (DOCKER / "trainer.Dockerfile").read_text()
    launcher = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", entry, re.M).group(1))
    assert launcher[:3] == ["python", "-m", "torch.distributed.run"]
    cmd = compose["services"]["trainer"]["command"]
    torchrun = get_args_parser().parse_args(launcher[3:] + cmd)  # torchrun's own parser
    assert torchrun.standalone and torchrun.nproc_per_node == "1" and torchrun.module
    assert torchrun.training_script == "student_trainer"
    args = torchrun.training_script_args
    assert args[0] == "--config" and "--resume" in args
    overrides = [c for c in args[2:] if "=" in c]
    cfg = load_config(DOCKER / "run.example.yaml", overrides)
    assert cfg.teacher.url == "http://teacher:8000" and cfg.loss.mode == "aopd"


def test_empty_api_key_means_no_auth():
    from teacher_server.settings import Settings

    assert Settings(model="m", api_key="").api_key is None
    assert Settings(model="m", api_key="k").api_key.get_secret_value() == "k"


def test_hf_engine_refuses_tensor_parallelism():
    import pytest
    from pydantic import ValidationError

    from teacher_server.settings import Settings

    with pytest.raises(ValidationError, match="--engine vllm"):
        Settings(model="m", engine="hf", tensor_parallel_size=2)
    assert Settings(model="m", engine="vllm", tensor_parallel_size=2).tensor_parallel_size == 2
