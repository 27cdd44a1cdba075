"""`make compose-test`: the compose stack built and run for real, on CPU (docker/compose.cpu.yaml over
docker/compose.yaml, the example .env), with the toy teacher and student. About 10-15 minutes on 2 cores once
the images exist; the first build adds ~10 minutes (debootstrap, then pip inside each build).

1. `config` of compose.yaml alone and with compose.cpu.yaml, with docker/.env.example: both accepted, and the
   example's paths resolve where the file says (RUN_CONFIG an existing file under docker/, the other
   directories at the repository root).
2. docker/build_cpu.sh: the local Debian base, then both images from the same Dockerfiles as the GPU ones.
3. The stack up (project aopd-cpu, host networking; compose.yaml's GPU reservations and published ports
   dropped, as an override cannot drop them); waits for the teacher's healthcheck; the trainer trains the
   toy student for 30 steps.
4. Two teacher outages mid-run: at step 10 `docker kill` (the engine treats it as a manual stop: no restart
   policy restarts it; this script checks that and starts it again after a few seconds, as an operator would),
   at step 20 the teacher's process SIGKILLed from the host, a crash (an OOM kill, a segfault): the teacher's
   `restart: unless-stopped` brings it back. The trainer must ride out both, finish every step exactly once,
   and exit 0 without being restarted itself.
5. The last checkpoint on the run volume loaded with transformers' `from_pretrained` (in a trainer image
   container without network), then everything brought down (containers, network-less volumes).
6. A short report.

    python docker/compose_test.py [--no-build] [--rmi] [--keep]
--no-build: use the images as they are. --rmi: remove the two images (and the base) at the end. --keep: leave
the stack up (for a look; `docker-compose -p aopd-cpu -f <printed file> down -v` later).
Needs: a Docker engine (dockerd), docker-compose 1.29 or `docker compose`, debootstrap, PyYAML.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
PROJECT = "aopd-cpu"
ENV_FILE = DOCKER_DIR / ".env.example"
TEACHER_IMAGE = os.environ.get("AOPD_TEACHER_IMAGE", "aopd-teacher:0.1.0-cpu")
TRAINER_IMAGE = os.environ.get("AOPD_TRAINER_IMAGE", "aopd-trainer:0.1.0-cpu")
BASE_IMAGE = os.environ.get("AOPD_BASE_IMAGE", "aopd-base:bookworm")
RUN_DIR = "/work/runs/toy"  # docker/run.toy.yaml's train.run_dir, on the `runs` volume
STEPS = 30
KILL_AT, CRASH_AT = 10, 20
DOCKER = os.environ.get("DOCKER", "docker")


def log(msg: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True, capture: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, text=True, capture_output=capture, timeout=timeout)
    if check and p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{(p.stdout or '')[-3000:]}{(p.stderr or '')[-3000:]}")
    return p


def compose_cmd() -> list[str]:
    if subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode == 0:
        return [DOCKER, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit("neither `docker compose` nor docker-compose is installed")


def state(cid: str) -> dict:
    return json.loads(sh(DOCKER, "inspect", "-f", "{{json .State}}", cid).stdout)


def restart_count(cid: str) -> int:
    return int(sh(DOCKER, "inspect", "-f", "{{.RestartCount}}", cid).stdout)


def health(cid: str) -> str:
    s = state(cid)
    return (s.get("Health") or {}).get("Status", "none") if s["Running"] else s["Status"]


def wait_healthy(cid: str, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        h = health(cid)
        if h == "healthy":
            return time.monotonic() - t0
        if h in ("exited", "dead"):
            raise SystemExit(f"{what}: the teacher container is {h}:\n{container_logs(cid)}")
        time.sleep(0.5)
    raise SystemExit(f"{what}: the teacher was not healthy after {timeout:.0f} s:\n{container_logs(cid)}")


def container_logs(cid: str, tail: int = 40) -> str:
    p = sh(DOCKER, "logs", "--tail", str(tail), cid, check=False)
    return p.stdout + p.stderr


def steps_done(trainer: str) -> list[dict]:
    p = sh(DOCKER, "exec", trainer, "cat", f"{RUN_DIR}/metrics.jsonl", check=False)
    recs = [json.loads(x) for x in p.stdout.splitlines() if x.strip()] if p.returncode == 0 else []
    return [r for r in recs if "optim/grad_norm" in r]


def wait_step(trainer: str, step: int, timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        recs = steps_done(trainer)
        if recs and recs[-1]["step"] >= step:
            return
        if not state(trainer)["Running"]:
            raise SystemExit(f"the trainer stopped before step {step}:\n{container_logs(trainer)}")
        time.sleep(1)
    raise SystemExit(f"the trainer did not reach step {step} in {timeout:.0f} s:\n{container_logs(trainer)}")


def check_env_paths(compose: list[str]) -> list[str]:
    """The example .env's paths, resolved by compose itself (`config`) for the GPU file alone."""
    cfg = yaml.safe_load(sh(*compose, "-f", str(DOCKER_DIR / "compose.yaml"), "--env-file", str(ENV_FILE), "config").stdout)
    mounts = {}
    for svc in ("teacher", "trainer"):
        for v in cfg["services"][svc]["volumes"]:
            src, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
            mounts[target] = src
    problems = []
    if not Path(mounts["/work/run.yaml"]).is_file():
        problems.append(f"RUN_CONFIG resolves to {mounts['/work/run.yaml']}, not a file")
    for target, name in (("/models", "models"), ("/work/data", "data"), ("/work/runs", "runs")):
        if Path(mounts[target]) != ROOT / name:
            problems.append(f"{target} mounts {mounts[target]}, expected {ROOT / name}")
    if problems:
        raise SystemExit("docker/.env.example paths: " + "; ".join(problems))
    return [f"{t} <- {Path(s).relative_to(ROOT) if Path(s).is_relative_to(ROOT) else s}" for t, s in sorted(mounts.items())
            if t != "/root/.cache/huggingface"]


def cpu_config(compose: list[str], out: Path) -> Path:
    """compose.yaml + compose.cpu.yaml as compose merges them, less what an override cannot remove (compose
    appends an override's lists to the base's): the GPU device reservations (the daemon refuses a GPU request
    on a machine without one) and the published ports (docker-compose refuses them with host networking)."""
    text = sh(*compose, "-f", str(DOCKER_DIR / "compose.yaml"), "-f", str(DOCKER_DIR / "compose.cpu.yaml"),
              "--env-file", str(ENV_FILE), "config").stdout
    cfg = yaml.safe_load(text)
    for name, svc in cfg["services"].items():
        assert svc.get("network_mode") == "host", f"{name}: not on host networking"
        res = svc.get("deploy", {}).get("resources", {})
        devices = res.get("reservations", {}).pop("devices", [])
        assert all("gpu" in d.get("capabilities", []) for d in devices), devices
        if not res.get("reservations"):
            res.pop("reservations", None)
        if not res:
            svc.get("deploy", {}).pop("resources", None)
        if not svc.get("deploy"):
            svc.pop("deploy", None)
        svc.pop("ports", None)
    path = out / "compose.cpu.resolved.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def image_size(ref: str) -> str:
    p = sh(DOCKER, "image", "inspect", "-f", "{{.Size}}", ref, check=False)
    return f"{int(p.stdout) / 1e9:.2f} GB" if p.returncode == 0 else "absent"


def check_checkpoint(volume: str) -> str:
    code = (
        "import json, pathlib, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"root = pathlib.Path('{RUN_DIR}/checkpoints')\n"
        "ckpts = sorted(p for p in root.glob('step_*') if (p / 'COMPLETE').is_file())\n"
        "last = ckpts[-1]\n"
        "model = AutoModelForCausalLM.from_pretrained(last)\n"
        "tok = AutoTokenizer.from_pretrained(last)\n"
        "ids = tok('123+456=', return_tensors='pt').input_ids\n"
        "with torch.no_grad(): logits = model(ids).logits\n"
        "assert torch.isfinite(logits).all()\n"
        "print(json.dumps({'checkpoint': last.name, 'checkpoints': [p.name for p in ckpts], 'class': type(model).__name__,"
        " 'params': sum(p.numel() for p in model.parameters())}))\n"
    )
    p = sh(DOCKER, "run", "--rm", "--network", "none", "-v", f"{volume}:/work/runs:ro", "--entrypoint", "python3",
           TRAINER_IMAGE, "-c", code)
    return p.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--rmi", action="store_true")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    t_all = time.monotonic()
    if sh(DOCKER, "info", "--format", "{{.ServerVersion}}", check=False).returncode != 0:
        raise SystemExit("no Docker daemon answers (start one: dockerd --bridge=none --iptables=false &)")
    compose = compose_cmd()
    report: dict[str, object] = {"engine": sh(DOCKER, "info", "--format", "{{.ServerVersion}}").stdout.strip(),
                                 "compose": sh(*compose, "version", "--short", check=False).stdout.strip()}

    log("compose config: compose.yaml, and compose.yaml + compose.cpu.yaml, with docker/.env.example")
    report["env paths"] = check_env_paths(compose)
    work = Path(tempfile.mkdtemp(prefix="aopd-compose-test."))
    resolved = cpu_config(compose, work)

    builds: dict[str, str] = {}
    if not a.no_build:
        log("docker/build_cpu.sh (base, teacher, trainer)")
        p = subprocess.run(["bash", str(DOCKER_DIR / "build_cpu.sh"), "all"], text=True, stdout=subprocess.PIPE)
        if p.returncode != 0:
            raise SystemExit("docker/build_cpu.sh failed")
        builds = {ln.split()[1]: f"{ln.split()[2]} s" for ln in p.stdout.splitlines() if ln.startswith("build-time ")}
    report["build times"] = builds or "skipped (--no-build)"
    report["image sizes"] = {ref: image_size(ref) for ref in (BASE_IMAGE, TEACHER_IMAGE, TRAINER_IMAGE)}

    dc = [*compose, "-p", PROJECT, "-f", str(resolved)]
    sh(*dc, "down", "-v", "--remove-orphans", check=False)
    ok = False
    try:
        log("up (teacher first; the trainer waits for its healthcheck)")
        t_up = time.monotonic()
        up = subprocess.Popen([*dc, "up", "-d", "--no-build"], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        teacher = ""
        while not teacher:
            teacher = sh(*dc, "ps", "-q", "teacher").stdout.strip()
            if not teacher and up.poll() is not None:
                raise SystemExit(f"up failed:\n{up.communicate()[0]}")
            time.sleep(0.5)
        wait_healthy(teacher, 600, "start")
        healthy_s = time.monotonic() - t_up
        report["start to healthy"] = f"{healthy_s:.1f} s (from `up` to the teacher's healthcheck passing)"
        up_out, _ = up.communicate(timeout=120)
        if up.returncode != 0:
            raise SystemExit(f"up failed:\n{up_out}")
        trainer = sh(*dc, "ps", "-q", "trainer").stdout.strip()
        log(f"teacher healthy after {healthy_s:.1f} s; trainer {trainer[:12]} started")
        t_train = time.monotonic()

        wait_step(trainer, KILL_AT, 900)
        log(f"step {KILL_AT} done: docker kill teacher")
        sh(DOCKER, "kill", teacher)
        time.sleep(8)
        s = state(teacher)
        after_kill = (f"{'running' if s['Running'] else s['Status']} after 8 s, restart count {restart_count(teacher)} "
                      "(the engine counts `docker kill` as a manual stop: no restart policy applies)")
        log(f"after docker kill: {after_kill}")
        if not s["Running"]:
            sh(DOCKER, "start", teacher)
        back1 = wait_healthy(teacher, 600, "after docker kill") + 8
        log(f"teacher healthy again {back1:.1f} s after the kill")

        wait_step(trainer, CRASH_AT, 900)
        pid = state(teacher)["Pid"]
        rc0 = restart_count(teacher)
        log(f"step {CRASH_AT} done: SIGKILL to the teacher's process (host pid {pid}), a crash")
        t_crash = time.monotonic()
        os.kill(pid, 9)
        t0 = time.monotonic()
        while restart_count(teacher) == rc0 and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        restarted_s = time.monotonic() - t_crash
        rc1 = restart_count(teacher)
        if rc1 == rc0:
            raise SystemExit("the restart policy did not restart the crashed teacher in 60 s")
        back2 = wait_healthy(teacher, 600, "after the crash") + restarted_s
        log(f"restart policy: restarted after {restarted_s:.1f} s (restart count {rc1}), healthy {back2:.1f} s after the crash")

        t0 = time.monotonic()
        while state(trainer)["Running"] and time.monotonic() - t0 < 900:
            time.sleep(1)
        st = state(trainer)
        train_s = time.monotonic() - t_train
        if st["Running"] or st["ExitCode"] != 0:
            raise SystemExit(f"the trainer did not finish cleanly ({st['Status']}, exit {st['ExitCode']}):\n"
                             f"{container_logs(trainer)}")
        volume = f"{PROJECT}_runs"
        recs = [json.loads(x) for x in sh(DOCKER, "run", "--rm", "--network", "none", "-v", f"{volume}:/r:ro",
                                           "--entrypoint", "cat", TRAINER_IMAGE, "/r/toy/metrics.jsonl").stdout.splitlines()
                if x.strip()]
        steps = [r["step"] for r in recs if "optim/grad_norm" in r]
        outage = [(r["step"], r.get("teacher/outage_s", 0.0)) for r in recs if "optim/grad_norm" in r]
        lost = sorted(set(range(1, STEPS + 1)) - set(steps))
        dup = sorted({s for s in steps if steps.count(s) > 1})
        trainer_logs = container_logs(trainer, 400)
        report["training"] = (f"{len(steps)} steps (1..{max(steps)}), lost {lost or 'none'}, repeated {dup or 'none'}; "
                              f"trainer exit {st['ExitCode']}, trainer restarts {restart_count(trainer)}; {train_s:.0f} s")
        report["outage 1 (docker kill at step 10)"] = f"{after_kill}; `docker start`; healthy {back1:.1f} s after the kill"
        report["outage 2 (crash at step 20)"] = (f"restart policy restarted it {restarted_s:.1f} s after the SIGKILL; "
                                                 f"healthy {back2:.1f} s after it; teacher restart count {rc1}")
        # The client's own retries (teacher.max_retries, with backoff) ride out a short outage inside the request;
        # teacher/outage_s counts only the time past them (the step's outer wait). Both are reported.
        waits = {r["step"]: r.get("timing/score_wait_s", 0.0) for r in recs if "optim/grad_norm" in r}
        typical = sorted(waits.values())[len(waits) // 2]
        slow = [(s, round(w, 1)) for s, w in sorted(waits.items()) if w > max(5.0, 5 * typical)]
        retries = sum(1 for ln in trainer_logs.splitlines() if "; retry " in ln)
        seen = [(s, round(o, 1)) for s, o in outage if o > 0]
        report["outage seen by the trainer"] = (
            f"steps waiting on scoring {slow} (s; median step {typical:.1f} s); {retries} client retries logged; "
            f"teacher/outage_s {sum(o for _, o in outage):.1f} s in all {seen or ''}")
        print("\n".join(ln for ln in trainer_logs.splitlines() if "retry" in ln or "outage" in ln), flush=True)
        report["checkpoint"] = check_checkpoint(volume)
        if lost or dup or len(steps) != STEPS:
            raise SystemExit(f"steps lost {lost} or repeated {dup}")
        if not (seen or retries):
            raise SystemExit("the trainer saw no outage: the kills did not hit the run")
        ok = True
    finally:
        if a.keep:
            log(f"stack left up: {' '.join(dc)} down -v")
        else:
            log("down -v")
            sh(*dc, "down", "-v", "--remove-orphans", check=False)
            shutil.rmtree(work, ignore_errors=True)
        if a.rmi:
            sh(DOCKER, "rmi", TEACHER_IMAGE, TRAINER_IMAGE, BASE_IMAGE, check=False)
        print_report(report, t_all, ok)
    return 0 if ok else 1


def print_report(report: dict, t_all: float, ok: bool) -> None:
    report["total"] = f"{time.monotonic() - t_all:.0f} s"
    print("\n== make compose-test report ==")
    for k, v in report.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {vv}" for kk, vv in v.items())
        elif isinstance(v, list):
            v = "; ".join(v)
        print(f"{k:>36}: {v}")
    print("compose-test: " + ("passed" if ok else "FAILED"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
