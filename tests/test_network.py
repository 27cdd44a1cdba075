"""The teacher on another host, over a real (namespaced) network: the lab's tools measured against their settings,
faults on the path, and the trainer on two nodes.

Hosts are network namespaces on one bridge (bench/netlab.py): "teacher" (the hf-engine teacher on its 127.0.0.1,
reached only through a delaying relay, bench/relay.py, on 10.77.0.1), "node1" and "node2" (trainers).

- The relay adds the round-trip time it is set to, the tc-shaped link carries the rate it is set to, and a
  stalled relay holds data without closing anything while a reset one sends an RST.
- The teacher's cable is pulled for 30 s mid-run: the trainer rides it out, every step logged, the outage
  counted, the last checkpoint complete.
- A relay that stalls (no FIN, no RST) is detected by the client's read timeout (teacher.timeout_s): a short
  stall is retried through, one longer than teacher.outage_timeout_s ends the run with status 3 and the reason.
- torchrun on two nodes (one process each, gloo, c10d rendezvous) trains, checkpoints to a shared directory,
  resumes on one node, and matches the single-node 2-rank run within test_distributed's tolerances.

Skipped, with the reason, where network namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench.netlab import Lab
from bench.relay import RelayControl
from student_trainer import checkpoint as ckpt_mod
from student_trainer.config import dump_config, load_config
from student_trainer.tiny_models import build_tiny_model
from teacher_server.process import free_port
from tests.helpers import cfg_overrides
from tests.test_distributed import LOSS_TOL, WEIGHT_TOL

REPO = Path(__file__).resolve().parents[1]
TEACHER_PORT = 8000
OUTAGE_S = 30.0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}

_UNAVAILABLE = Lab.unavailable()
needs_lab = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"no network namespaces here: {_UNAVAILABLE}")


# ----------------------------------------------------------------------------------------------------------
# the lab: a teacher host and two trainer hosts, one teacher server for the module
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tiny_model_dir):
    if _UNAVAILABLE is not None:
        pytest.skip(f"no network namespaces here: {_UNAVAILABLE}")
    with Lab(["teacher", "node1", "node2"]) as lab:
        teacher = lab.popen("teacher", [sys.executable, "-m", "teacher_server", "--model", str(tiny_model_dir),
                                        "--host", "127.0.0.1", "--port", str(TEACHER_PORT), "--dtype", "float32",
                                        "--max-top-k", "8", "--log-level", "warning"], env=ENV, cwd=REPO)
        lab.wait_http("teacher", f"http://127.0.0.1:{TEACHER_PORT}/health", proc=teacher)
        yield lab


_relay_ports = itertools.count(9001)


def new_relay(lab: Lab, rtt_ms: float, upstream_port: int = TEACHER_PORT):
    """A fresh relay to the teacher (or to another server in the teacher host): no fault state shared by tests."""
    return lab.relay("teacher", next(_relay_ports), ("127.0.0.1", upstream_port), rtt_ms)


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("net")
    student = build_tiny_model(d / "student", hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128,
                               seed=3, tokenizer_dir=tiny_model_dir)
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(1, 7) for b in range(1, 4)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    return {"student": student, "data": (d / "train.jsonl", d / "eval.jsonl"), "dir": d}


def overrides(files, url: str, run_dir: Path, *extra: str) -> list[str]:
    """test_train's config (4 prompts x 2 samples, micro-batches of 3) without evaluation."""
    return cfg_overrides(files["student"], url, files["data"], run_dir, "loss.mode=aopd", "train.eval_every=0",
                         "train.dump_rollouts_every=0", "train.hist_every=0", *extra)


def start_trainer(lab: Lab, host: str, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return lab.popen(host, [sys.executable, "-m", "student_trainer", *args], env=ENV, cwd=REPO, stdout=f,
                         stderr=subprocess.STDOUT)


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "optim/grad_norm" in r]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "trainer exited early:\n" + log.read_text()[-3000:]
        if any(r["step"] >= step for r in steps(run_dir)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached:\n" + log.read_text()[-3000:])


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        Lab.stop(proc)
        raise AssertionError(f"trainer still running after {timeout:.0f}s:\n" + log.read_text()[-3000:]) from None


# ----------------------------------------------------------------------------------------------------------
# the tools: what they produce against what they are set to
# ----------------------------------------------------------------------------------------------------------


@needs_lab
def test_relay_adds_its_rtt_and_tc_gives_its_rate(lab):
    """Through the relay a ping-pong takes the set RTT (median of 20; a loaded machine wakes the relay a little
    late, which it compensates for), and a bulk transfer over a tbf-shaped link runs at the set rate (goodput
    is ~95% of the L2 rate: 1448 payload bytes per 1514-byte frame)."""
    lab.local_server("teacher", "echo", 7000)
    lab.local_server("teacher", "bulk", 7001)
    base = lab.measure_rtt("node1", new_relay(lab, 0.0, 7000).address)
    assert base["median_ms"] < 2.0, base
    for rtt in (20.0, 100.0):
        r = lab.measure_rtt("node1", new_relay(lab, rtt, 7000).address)
        assert rtt - 2.0 <= r["median_ms"] <= rtt + 4.0, (rtt, r)
    lab.shape("node1", mbit=200)
    try:
        got = lab.measure_rate("node1", new_relay(lab, 20.0, 7001).address, mbytes=25, direction="get")
    finally:
        lab.unshape("node1")
    assert 0.75 * 200 <= got["mbit_s"] <= 200, got  # measured 191
    assert got["wire_mbit_s"] <= 205, got


def test_relay_stall_holds_data_without_closing_and_reset_sends_rst(tmp_path):
    """On 127.0.0.1 (no namespaces needed): stall delivers nothing and closes nothing; the held bytes arrive,
    in order, once forwarding resumes; reset aborts connections with an RST."""
    echo_port, relay_port = free_port(), free_port()
    control_path = str(tmp_path / "relay.sock")
    tool = [sys.executable, str(REPO / "bench" / "relay.py")]
    procs = [subprocess.Popen(tool + ["echo", "--listen", f"127.0.0.1:{echo_port}"], stdout=subprocess.PIPE, text=True),
             subprocess.Popen(tool + ["relay", "--listen", f"127.0.0.1:{relay_port}", "--upstream",
                                      f"127.0.0.1:{echo_port}", "--control", control_path], stdout=subprocess.PIPE, text=True)]
    try:
        assert all(p.stdout.readline().strip() == "ready" for p in procs)
        control = RelayControl(control_path)
        with socket.create_connection(("127.0.0.1", relay_port), timeout=5) as s:
            s.sendall(b"one")
            assert s.recv(16) == b"one"
            control.set(mode="stall")
            s.sendall(b"two")
            s.settimeout(1.5)
            with pytest.raises(TimeoutError):  # nothing arrives, and no FIN (b"") or RST (ConnectionResetError)
                s.recv(16)
            control.set(mode="forward")
            s.settimeout(5)
            got = b""
            while len(got) < 3:
                got += s.recv(16)
            assert got == b"two"
            control.set(mode="reset")
            with pytest.raises(ConnectionResetError):
                s.sendall(b"three")
                s.recv(16)
        stats = control.stats()
        assert stats["bytes_up"] == stats["bytes_down"] == 6 and stats["mode"] == "reset"
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


@pytest.mark.parametrize("max_in_flight", [1, 4])
def test_scoring_requests_overlap_their_round_trips_up_to_max_in_flight(teacher_url, tmp_path, max_in_flight):
    """Behind a 300 ms relay on 127.0.0.1, four chunks submitted at once go out on as many connections as
    teacher.max_in_flight allows (httpx opens a connection only when every pooled one is busy, so the relay's
    accepted-connection count is the number of requests that were in flight together), and every chunk comes
    back scored, in full, whatever the concurrency."""
    from student_trainer.rollout import Rollout
    from student_trainer.teacher_client import TeacherClient
    from student_trainer.train import StreamingScorer

    upstream = int(teacher_url.rsplit(":", 1)[1])
    relay_port, control_path = free_port(), str(tmp_path / "relay.sock")
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "relay.py"), "relay", "--listen",
                             f"127.0.0.1:{relay_port}", "--upstream", f"127.0.0.1:{upstream}", "--rtt-ms", "300",
                             "--control", control_path], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        control = RelayControl(control_path)
        with TeacherClient(f"http://127.0.0.1:{relay_port}") as client:
            scorer = StreamingScorer(client, None, top_k=4, outage_timeout_s=30, max_in_flight=max_in_flight)
            chunks = [[Rollout([5, 6, 7], [8 + i, 9, 10 + j], np.zeros(3, np.float32), True, 2 * i + j) for j in range(2)]
                      for i in range(4)]
            futures = [scorer.submit(c) for c in chunks]
            scored = [f.result(timeout=60) for f in futures]
            scorer.close()
        assert control.stats()["connections"] == max_in_flight
        for chunk, s in zip(chunks, scored, strict=True):
            assert s.rollouts is chunk and len(s.teacher) == 2
            assert all(r.token_logprobs.shape == (3,) and np.isfinite(r.token_logprobs).all() for r in s.teacher)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------------
# faults on the path
# ----------------------------------------------------------------------------------------------------------


@needs_lab
def test_link_to_teacher_down_30s_mid_run_loses_no_step(lab, files, tmp_path):
    """The teacher's switch port goes down (its packets vanish: no RST, no error) for 30 s after step 2 of 8,
    then comes back. The in-flight request times out (teacher.timeout_s=10), new connections time out until
    the link is back; the step's rollouts are kept and re-scored: all 8 steps logged, the outage counted and
    reported, and the checkpoint of step 8 complete."""
    relay = new_relay(lab, 5.0)
    run_dir, log = tmp_path / "run", tmp_path / "trainer.log"
    args = overrides(files, relay.url, run_dir, "train.steps=8", "train.save_every=1", "rollout.max_new_tokens=24",
                     "teacher.timeout_s=10", "teacher.max_retries=2", "teacher.max_backoff_s=1")
    trainer = start_trainer(lab, "node1", args, log)
    wait_for_step(run_dir, 2, trainer, log)
    lab.link_down("teacher")
    try:
        down_at = max(r["step"] for r in steps(run_dir))
        time.sleep(OUTAGE_S)
        during = max(r["step"] for r in steps(run_dir))
    finally:
        lab.link_up("teacher")
    rc = wait_exit(trainer, log, 240)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert during <= down_at + 1, "steps went on while the teacher was unreachable"  # at most one in flight
    records = steps(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert sum(r["teacher/outage_s"] for r in records) > 0.5 * OUTAGE_S, [r["teacher/outage_s"] for r in records]
    assert "teacher outage" in out
    latest = ckpt_mod.latest_checkpoint(run_dir)
    assert latest is not None and latest.name == "step_000008"
    assert ckpt_mod.load_trainer_state(latest)["step"] == 8


@needs_lab
def test_stalled_path_is_detected_by_the_read_timeout_then_retried_or_failed(lab, files, tmp_path):
    """The relay stops forwarding (no FIN, no RST). With teacher.timeout_s=2 each stalled request fails after 2 s
    of silence: a 5 s stall is retried through (the step finishes, its outage logged); a stall outlasting
    teacher.outage_timeout_s=12 ends the run with status 3 and a message naming the timeout, not a hang. The
    steps before it are checkpointed, so the run resumes later."""
    relay = new_relay(lab, 5.0)
    run_dir, log = tmp_path / "run", tmp_path / "trainer.log"
    args = overrides(files, relay.url, run_dir, "train.steps=50", "train.save_every=1", "rollout.max_new_tokens=24",
                     "teacher.timeout_s=2", "teacher.outage_timeout_s=12", "teacher.max_retries=2",
                     "teacher.max_backoff_s=1")
    trainer = start_trainer(lab, "node1", args, log)
    wait_for_step(run_dir, 2, trainer, log)
    relay.control.set(mode="stall")
    time.sleep(5.0)
    relay.control.set(mode="forward")
    after_stall = max(r["step"] for r in steps(run_dir))
    wait_for_step(run_dir, after_stall + 2, trainer, log)  # recovered: a whole step after the stalled one
    relay.control.set(mode="stall")
    stalled_at = time.monotonic()
    rc = wait_exit(trainer, log, 90)
    took = time.monotonic() - stalled_at
    out = log.read_text()
    assert rc == 3, out[-3000:]
    assert "did not answer /v1/score in time" in out, out[-3000:]
    assert took < 60, f"{took:.0f}s to give up on a stalled path with outage_timeout_s=12"
    records = steps(run_dir)
    assert sum(r["teacher/outage_s"] for r in records) > 0, "the short stall must be logged as an outage"
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    latest = ckpt_mod.latest_checkpoint(run_dir)
    assert latest is not None and ckpt_mod.load_trainer_state(latest)["step"] == records[-1]["step"]


# ----------------------------------------------------------------------------------------------------------
# the trainer on two nodes
# ----------------------------------------------------------------------------------------------------------


def torchrun(lab: Lab, host: str, config: Path, launcher: list[str], ifname: str, *args: str) -> subprocess.Popen:
    # gloo binds to the interface named here: the hostname resolves to the machine's own address, not this host's
    env = {**ENV, "GLOO_SOCKET_IFNAME": ifname, "TP_SOCKET_IFNAME": ifname}
    log = config.parent / f"{config.stem}-{host}-{time.monotonic_ns()}.log"
    f = open(log, "w")
    proc = lab.popen(host, [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "student_trainer",
                            "--config", str(config), *args], env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    f.close()
    proc.log = log
    return proc


def finish(*procs: subprocess.Popen, timeout: float = 300) -> None:
    for p in procs:
        rc = wait_exit(p, p.log, timeout)
        assert rc == 0, p.log.read_text()[-5000:]


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@needs_lab
@pytest.mark.numeric
def test_two_nodes_train_checkpoint_resume_on_one_node_and_match_one_node(lab, files):
    """node1 and node2 run one trainer process each (torchrun c10d rendezvous on node1, gloo over eth0) for step 1
    and checkpoint to a directory both see; node2 alone (2 processes) resumes for step 2. Losses of both steps
    and the step-2 weights match a 2-rank run on one node (same global batch) within test_distributed's
    tolerances (the same float sums in the same order: gloo over a network or over loopback)."""
    relay = new_relay(lab, 2.0)
    d = files["dir"]

    def config(run_dir: Path, *extra: str) -> Path:
        cfg = load_config(None, overrides(files, relay.url, run_dir, *extra))
        path = d / f"{run_dir.name}.yaml"
        dump_config(cfg, path)
        return path

    single, split = d / "one_node", d / "two_nodes"
    finish(torchrun(lab, "node1", config(single), ["--standalone", "--nproc-per-node=2"], "lo"))

    cfg = config(split, "train.stop_after_steps=1")
    port = free_port()
    node_procs = []
    for rank, host in enumerate(("node1", "node2")):
        launcher = ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={lab.ip('node1')}:{port}", "--rdzv-id=aopd-net-test", f"--local-addr={lab.ip(host)}",
                    f"--rdzv-conf=is_host={'true' if rank == 0 else 'false'}", "--max-restarts=0"]
        node_procs.append(torchrun(lab, host, cfg, launcher, "eth0"))
    finish(*node_procs)
    assert any("rank 0/2" in p.log.read_text() for p in node_procs), "not one world of 2 over the two nodes"
    assert ckpt_mod.latest_checkpoint(split).name == "step_000001"
    assert [r["step"] for r in steps(split)] == [1]
    finish(torchrun(lab, "node2", config(split), ["--standalone", "--nproc-per-node=2"], "lo", "--resume"))

    a, b = steps(single), steps(split)
    assert [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["rollout/len_mean"] == rb["rollout/len_mean"]
        for k in ("loss/total", "loss/pg", "loss/div", "aopd/intervention_ratio", "policy/entropy", "optim/grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=LOSS_TOL, abs=1e-7), k
    wa, wb = weights(single, 2), weights(split, 2)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= WEIGHT_TOL, worst
    init = load_file(str(files["student"] / "model.safetensors"))
    assert any(not torch.equal(v, init[k]) for k, v in wb.items()), "training changed nothing"
