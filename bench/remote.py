"""Trainer step time with the teacher (a) on 127.0.0.1, (b) behind 20 ms RTT at 1 Gbit/s, (c) behind 100 ms RTT
at 200 Mbit/s: the same toy models, data and steps, in one run (root: it builds network namespaces).

    python bench/remote.py [--steps 6] [--rounds 2] [--set teacher.some_knob=value ...] [--paths a,b,c]

Builds a teacher and a smaller student (tiny Qwen3s sharing one tokenizer, as bench/pipeline.py) and a lab
(bench/netlab.py): the teacher (`python -m teacher_server`, hf engine) on 127.0.0.1 inside a "teacher"
namespace; two trainer namespaces whose links are shaped with tbf to 1 Gbit/s ("near") and 200 Mbit/s ("far");
a delaying relay (bench/relay.py) per trainer in the teacher namespace, adding 20 ms and 100 ms of round trip.
(a) runs the trainer inside the teacher's namespace against 127.0.0.1; (b) and (c) run it in "near" and "far"
against the relay's address, so every byte crosses the shaped veth and the relay. The path is measured first
(RTT through each relay, goodput over each link) and printed against its targets.

Per path: the median step time over the steps after the first (warm-up), its ratio to (a), where the step's time
goes (the trainer's own timing/generate_s, timing/score_wait_s, timing/update_s; "other" is the rest: rollout
bookkeeping, logging), the teacher's latency per request, and the bytes per scored position over the whole run:
HTTP payload both ways (the relay's counters; for (a), the loopback's) and L2 bytes both ways (the trainer's
veth; GSO-merged frames, so per-segment headers are partly missing). Every `--set` is passed to all three
trainer runs as a config override, so the same command re-measures a trainer with other settings.

Each process runs torch with one thread: trainer and teacher each own one of the two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.netlab import Lab  # noqa: E402

TEACHER_PORT = 8000
PATHS = {  # name: (description, trainer host, RTT ms, Mbit/s)
    "a": ("127.0.0.1", "teacher", 0.0, None),
    "b": ("20 ms, 1 Gbit/s", "near", 20.0, 1000.0),
    "c": ("100 ms, 200 Mbit/s", "far", 100.0, 200.0),
    # opt-in control: the lab's path with nothing added (relay at 0 ms, link unshaped), what (a) -> (b) costs
    # before any RTT or rate limit
    "z": ("relay 0 ms, no tc", "plain", 0.0, None),
}


def step_records(run_dir: Path) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in recs if "timing/step_s" in r]


def summary(runs: list[list[dict]], seqs_per_step: int) -> dict[str, float]:
    """Medians over every run's steps but its first (warm-up); scored positions (completion tokens) of all steps."""
    keys = ["timing/step_s", "timing/generate_s", "timing/score_wait_s", "timing/update_s", "teacher/latency_ms",
            "timing/score_overlap"]
    steady = [r for recs in runs for r in recs[1:]]
    out = {k: statistics.median(r[k] for r in steady) for k in keys}
    out["other_s"] = statistics.median(r["timing/step_s"] - r["timing/generate_s"] - r["timing/score_wait_s"]
                                       - r["timing/update_s"] for r in steady)
    out["positions"] = sum(r["rollout/len_mean"] * seqs_per_step for recs in runs for r in recs)
    out["steps"] = len(steady)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per path, interleaved a,b,c,a,b,c (other load on the machine drifts over minutes)")
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--chunk-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer config override for every path, e.g. --set rollout.stream_chunk_prompts=2")
    p.add_argument("--paths", default="a,b,c", help="which of a,b,c to run (and z: the lab's path at 0 ms, unshaped)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    a = p.parse_args()
    if (why := Lab.unavailable()) is not None:
        sys.exit(f"remote.py: {why}")
    paths = [x.strip() for x in a.paths.split(",") if x.strip()]
    if not set(paths) <= set(PATHS):
        sys.exit(f"--paths {a.paths}: choose among {','.join(PATHS)}")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bench.pipeline import toy_models

    tmp = Path(tempfile.mkdtemp(prefix="aopd-bench-remote-"))
    teacher_dir, student_dir, data, t_params, s_params = toy_models(tmp, a)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    seqs_per_step = a.prompts_per_step * a.samples

    def overrides(url: str, run_dir: Path) -> list[str]:
        return [
            f"model.path={student_dir}", f"teacher.url={url}", f"teacher.top_k={a.top_k}", f"data.train_path={data}",
            "data.apply_chat_template=false", f"rollout.prompts_per_step={a.prompts_per_step}",
            f"rollout.samples_per_prompt={a.samples}", f"rollout.max_new_tokens={a.max_new_tokens}",
            f"rollout.stream_chunk_prompts={a.chunk_prompts}", "loss.mode=aopd", f"train.steps={a.steps}",
            f"train.run_dir={run_dir}", "train.progress=false", "train.hist_every=0", *a.set,
        ]

    with Lab(["teacher", "near", "far", "plain"]) as lab:
        for name in ("b", "c"):
            lab.shape(PATHS[name][1], PATHS[name][3])
        teacher = lab.popen("teacher", [sys.executable, "-m", "teacher_server", "--model", str(teacher_dir),
                                        "--host", "127.0.0.1", "--port", str(TEACHER_PORT), "--dtype", "float32",
                                        "--max-top-k", str(a.top_k), "--log-level", "warning"], env=env, cwd=REPO)
        t0 = time.perf_counter()
        lab.wait_http("teacher", f"http://127.0.0.1:{TEACHER_PORT}/health", proc=teacher)
        print(f"[remote] teacher up in {time.perf_counter() - t0:.0f}s", flush=True)

        # ---- the paths, measured: RTT through each relay (to an echo server), goodput over each link
        lab.local_server("teacher", "echo", 7000)
        lab.local_server("teacher", "bulk", 7001)
        print(f"\n{'path':<22}{'RTT target':>11}{'measured':>10}{'rate target':>13}{'goodput get':>13}{'put':>8}")
        relays = {}
        for name in paths:
            desc, host, rtt, mbit = PATHS[name]
            if name == "a":
                continue
            echo = lab.relay("teacher", 9100 + ord(name), ("127.0.0.1", 7000), rtt)
            bulk = lab.relay("teacher", 9200 + ord(name), ("127.0.0.1", 7001), rtt)
            r = lab.measure_rtt(host, echo.address)
            mbytes = (mbit or 1000) / 8 * 1.5  # 1.5 s worth of the rate
            get = lab.measure_rate(host, bulk.address, mbytes, "get")
            put = lab.measure_rate(host, bulk.address, mbytes, "put")
            lab.stop(echo.proc)
            lab.stop(bulk.proc)
            target = f"{mbit:>8.0f}Mbit" if mbit else f"{'none':>12}"
            print(f"{f'({name}) {desc}':<22}{rtt:>9.0f}ms{r['median_ms']:>8.1f}ms{target}{get['mbit_s']:>9.0f}Mbit"
                  f"{put['mbit_s']:>8.0f}", flush=True)
            relays[name] = lab.relay("teacher", 9000 + ord(name), ("127.0.0.1", TEACHER_PORT), rtt)

        # ---- the trainer, `rounds` times per path, interleaved
        runs: dict[str, list[list[dict]]] = {name: [] for name in paths}
        wire = {name: {"payload_bytes": 0, "l2_bytes": 0} for name in paths}
        for round_ in range(a.rounds):
            for name in paths:
                desc, host, _, _ = PATHS[name]
                url = f"http://127.0.0.1:{TEACHER_PORT}" if name == "a" else relays[name].url
                run_dir = tmp / f"run_{name}{round_}"
                dev = "lo" if name == "a" else "eth0"
                before = lab.counters(host, dev)
                if name != "a":
                    relays[name].control.reset_counters()
                t0 = time.perf_counter()
                log = tmp / f"trainer_{name}{round_}.log"
                with open(log, "w") as f:
                    proc = lab.popen(host, [sys.executable, "-m", "student_trainer", *overrides(url, run_dir)],
                                     env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
                    rc = proc.wait(timeout=1800)
                if rc != 0:
                    sys.exit(f"trainer ({name}) exited {rc}:\n" + log.read_text()[-4000:])
                after = lab.counters(host, dev)
                runs[name].append(step_records(run_dir))
                if name == "a":  # loopback: each byte is counted once as sent (and once more as received)
                    wire[name]["payload_bytes"] += after["tx_bytes"] - before["tx_bytes"]
                    wire[name]["l2_bytes"] += after["tx_bytes"] - before["tx_bytes"]
                else:
                    st = relays[name].control.stats()
                    wire[name]["payload_bytes"] += st["bytes_up"] + st["bytes_down"]
                    wire[name]["l2_bytes"] += sum(after[k] - before[k] for k in ("tx_bytes", "rx_bytes"))
                print(f"[remote] round {round_ + 1}/{a.rounds} ({name}) {desc}: {len(runs[name][-1])} steps in "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        results = {name: {**summary(runs[name], seqs_per_step), **wire[name]} for name in paths}

    print(f"\nteacher {t_params / 1e6:.2f}M params ({a.teacher_layers} x {a.teacher_hidden}), student {s_params / 1e6:.2f}M "
          f"({a.student_layers} x {a.student_hidden}); {a.prompts_per_step} prompts x {a.samples} samples x "
          f"<= {a.max_new_tokens} new tokens per step, chunks of {a.chunk_prompts} prompts, K={a.top_k}; "
          f"medians over steps 2..{a.steps} of {a.rounds} run(s) per path; 1 torch thread per process; "
          f"overrides: {' '.join(a.set) or 'none'}")
    head = (f"{'path':<22}{'step s':>8}{'x (a)':>7}{'generate':>10}{'score wait':>12}{'update':>8}{'other':>7}"
            f"{'teacher ms/req':>16}{'overlap':>9}{'B/pos http':>12}{'B/pos L2':>10}")
    print(head)
    ref = results.get("a", {}).get("timing/step_s")
    for name, r in results.items():
        step, pos = r["timing/step_s"], r["positions"]
        ratio = f"{step / ref:.2f}" if ref else "-"
        print(f"{f'({name}) {PATHS[name][0]}':<22}{step:>8.3f}{ratio:>7}{r['timing/generate_s']:>10.3f}"
              f"{r['timing/score_wait_s']:>12.3f}{r['timing/update_s']:>8.3f}{r['other_s']:>7.3f}{r['teacher/latency_ms']:>16.0f}"
              f"{r['timing/score_overlap']:>9.2f}{r['payload_bytes'] / pos:>12.0f}{r['l2_bytes'] / pos:>10.0f}")
    if ref and "b" in results and "c" in results:
        print(f"\n(b)/(a) = {results['b']['timing/step_s'] / ref:.2f} (target <= 1.10)   "
              f"(c)/(a) = {results['c']['timing/step_s'] / ref:.2f} (target <= 1.5)")
    if a.keep:
        print(f"runs kept in {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
