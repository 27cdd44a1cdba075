"""Peak memory and time of the distillation loss: materialised logits vs the chunked lm_head.

Runs one forward + backward of each implementation, each in its own fresh process so that neither sees the
other's allocations:

- naive: logits_NV = hidden_ND @ lm_head_weight_VD.T, then `token_losses`;
- fused: `fused_token_losses(hidden_ND, lm_head_weight_VD, ...)`.

Peak extra memory is measured after the inputs exist: on CUDA with torch.cuda.max_memory_allocated minus the
memory allocated before the step; on CPU as the peak resident set (VmHWM, reset through /proc/self/clear_refs
just before the step) minus the resident set at that moment. Both include the gradients of hidden and lm_head
that the step creates. Time: each process runs --warmup untimed steps, then --repeats timed ones; --rounds
alternates naive and fused processes so that load from elsewhere hits both alike; the median and the minimum
over all timed steps are reported.

    python bench/loss_memory.py                                   # CPU defaults (a few minutes on 2 cores)
    python bench/loss_memory.py --device cuda --dtype bfloat16 --n 16384 --d 2560   # Qwen3-4B shapes on a GPU

Targets: fused peak extra memory <= 0.10 x naive, fused time <= 1.5 x naive.
"""

# N = scored positions, K = teacher top-k, V = vocabulary, D = hidden size

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MEMORY_TARGET = 0.10
TIME_TARGET = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="scored positions N")
    parser.add_argument("--d", type=int, default=256, help="hidden size D (Qwen3-4B: 2560)")
    parser.add_argument("--v", type=int, default=151_936, help="vocabulary V (Qwen3: 151936)")
    parser.add_argument("--k", type=int, default=32, help="teacher top-k K")
    parser.add_argument("--chunk-size", type=int, default=None, help="fused chunk size (default: LossConfig's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--mode", default="aopd", help="LossConfig.mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before measuring")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating naive/fused process pairs (2 or more on a busy machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("naive", "fused"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Child: one implementation, one process
# ---------------------------------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise RuntimeError(
            "cannot reset the peak resident set through /proc/self/clear_refs (needs Linux >= 4.0); "
            "measure on such a machine or with --device cuda"
        ) from exc


def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from student_trainer.losses import LossConfig, fused_token_losses, resolve_chunk_size, token_losses

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    cfg = LossConfig(mode=args.mode) if args.chunk_size is None else LossConfig(mode=args.mode,
                                                                                chunk_size=args.chunk_size)
    kwargs = {}
    gen = torch.Generator().manual_seed(args.seed)

    # Inputs: hidden states and an lm_head scaled so the logits have a plausible spread (std ~ 2).
    hidden_ND = torch.randn(args.n, args.d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight_VD = (torch.randn(args.v, args.d, generator=gen) * (2.0 / args.d**0.5)).to(device=device, dtype=dtype)
    weight_VD.requires_grad_()
    sampled_ids_N = torch.randint(0, args.v, (args.n,), generator=gen).to(device)
    teacher_token_logprobs_N = (-5.0 * torch.rand(args.n, generator=gen)).to(device)
    teacher_topk_ids_NK = torch.randint(0, args.v, (args.n, args.k), generator=gen).to(device)
    teacher_topk_logprobs_NK = (torch.randn(args.n, args.k, generator=gen) - 3.0).sort(-1, descending=True).values
    teacher_topk_logprobs_NK = teacher_topk_logprobs_NK.to(device)
    if cfg.mode == "exopd":
        kwargs["ref_token_logprobs_N"] = (-5.0 * torch.rand(args.n, generator=gen)).to(device)
    if cfg.mode == "aopd_acc":
        kwargs["correct_N"] = (torch.rand(args.n, generator=gen) > 0.5).to(device)
    teacher = (sampled_ids_N, teacher_token_logprobs_N, teacher_topk_ids_NK, teacher_topk_logprobs_NK, cfg)

    def step() -> float:
        hidden_ND.grad = None
        weight_VD.grad = None
        if args.child == "naive":
            out = token_losses(hidden_ND @ weight_VD.T, *teacher, **kwargs)
        else:
            out = fused_token_losses(hidden_ND, weight_VD, *teacher, **kwargs)
        loss = out.loss_N.mean()
        loss.backward()
        return float(loss)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()

    # Peak extra memory of one step.
    hidden_ND.grad = None
    weight_VD.grad = None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_value = step()
        sync()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        loss_value = step()
        peak_extra = _rss_bytes("VmHWM") - base
    grad_norms = (float(hidden_ND.grad.float().norm()), float(weight_VD.grad.float().norm()))

    times = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "impl": args.child,
        "peak_extra_bytes": peak_extra,
        "time_s": statistics.median(times),
        "times_s": times,
        "loss": loss_value,
        "grad_norm_hidden": grad_norms[0],
        "grad_norm_weight": grad_norms[1],
        "chunk_size": resolve_chunk_size(cfg.chunk_size, device),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------
# Parent: run both children, print the table
# ---------------------------------------------------------------------------------------------------------------


def run_in_subprocess(impl: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", impl]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0

    print(
        f"shapes: N={args.n} D={args.d} V={args.v} K={args.k} | device={args.device} dtype={args.dtype} "
        f"mode={args.mode} | warmup={args.warmup} repeats={args.repeats} rounds={args.rounds}"
    )
    # Rounds alternate naive and fused, so that load from other processes hits both alike.
    runs: dict[str, list[dict]] = {"naive": [], "fused": []}
    for _ in range(args.rounds):
        for impl in ("naive", "fused"):
            runs[impl].append(run_in_subprocess(impl, argv))
    summary = {}
    for impl, rs in runs.items():
        times = [t for r in rs for t in r["times_s"]]
        summary[impl] = {
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rs),
            "time_median_s": statistics.median(times),
            "time_min_s": min(times),
            "times_s": times,
            **{key: rs[0][key] for key in ("loss", "grad_norm_hidden", "grad_norm_weight", "chunk_size", "threads")},
        }
    naive, fused = summary["naive"], summary["fused"]
    logits_mib = args.n * args.v * 4 / 2**20
    print(f"one float32 [N, V] logits tensor = {logits_mib:.1f} MiB; fused chunk_size = {fused['chunk_size']}; "
          f"torch threads = {fused['threads']}")
    print()
    header = (f"{'impl':<6} | {'peak extra MiB':>14} | {'time median s':>13} | {'time min s':>10} | {'loss':>12} | "
              f"{'|grad h|':>10} | {'|grad W|':>10}")
    print(header)
    print("-" * len(header))
    for impl, r in summary.items():
        print(f"{impl:<6} | {r['peak_extra_bytes'] / 2**20:>14.1f} | {r['time_median_s']:>13.3f} | "
              f"{r['time_min_s']:>10.3f} | {r['loss']:>12.6f} | {r['grad_norm_hidden']:>10.4f} | "
              f"{r['grad_norm_weight']:>10.4f}")
    mem_ratio = fused["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
    time_ratio = fused["time_median_s"] / naive["time_median_s"]
    time_ratio_min = fused["time_min_s"] / naive["time_min_s"]
    print()
    print(f"memory ratio fused/naive          = {mem_ratio:.4f}  (target <= {MEMORY_TARGET:.2f}: "
          f"{'PASS' if mem_ratio <= MEMORY_TARGET else 'FAIL'})")
    print(f"time ratio fused/naive (medians)  = {time_ratio:.4f}  (target <= {TIME_TARGET:.2f}: "
          f"{'PASS' if time_ratio <= TIME_TARGET else 'FAIL'})")
    print(f"time ratio fused/naive (minimums) = {time_ratio_min:.4f}")
    print()
    print("exact figures:")
    for impl, r in summary.items():
        times = ", ".join(f"{t:.4f}" for t in r["times_s"])
        print(f"  {impl}: peak_extra_bytes={r['peak_extra_bytes']} time_median_s={r['time_median_s']:.6f} "
              f"time_min_s={r['time_min_s']:.6f} times_s=[{times}] loss={r['loss']!r}")
    print(f"  memory_ratio={mem_ratio:.6f} time_ratio_median={time_ratio:.6f} time_ratio_min={time_ratio_min:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
