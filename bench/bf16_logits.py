"""bfloat16 student: how far lp_S(y) and AOPD's mask move when the logits are rounded to bfloat16 (the old
fused path, and `lm_head(h).float()`) versus computed in float32 from the bfloat16 inputs (the fused loss now),
both against a float64 reference of the same bfloat16 weights.

    python bench/bf16_logits.py [--n 4096] [--d 1024] [--v 32768] [--logit-std 6] [--adv-std 0.05]

The mask is AOPD's at tau = 0: intervene where lp_T(y) - lp_S(y) <= 0. The teacher's lp_T(y) is the exact
lp_S(y) plus Gaussian noise of --adv-std nats: positions where teacher and student nearly agree, which is
where a rounding error decides the mask.
"""

from __future__ import annotations

import argparse
import time

import torch

from student_trainer.losses import fused_logit_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--logit-std", type=float, default=6.0, help="spread of the logits (top ones reach ~4-5 std)")
    ap.add_argument("--adv-std", type=float, default=0.05)
    ap.add_argument("--chunk", type=int, default=256)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(a.n, a.d, generator=gen).bfloat16()
    w = (torch.randn(a.v, a.d, generator=gen) * (a.logit_std / a.d**0.5)).bfloat16()
    y = torch.randint(0, a.v, (a.n,), generator=gen)
    # make y a plausible sampled token: the argmax of a noisy copy of the logits
    exact, rounded, top = [], [], []
    w64 = w.double()
    for s in range(0, a.n, a.chunk):
        z64 = h[s : s + a.chunk].double() @ w64.T
        y[s : s + a.chunk] = (z64 + 2.0 * torch.randn(z64.shape, generator=gen, dtype=torch.float64)).argmax(-1)
        yy = y[s : s + a.chunk, None]
        exact.append((z64.gather(1, yy) - z64.logsumexp(-1, keepdim=True)).squeeze(1))
        zb = (h[s : s + a.chunk] @ w.T).float()  # rounded to bfloat16, then float32
        rounded.append((zb.gather(1, yy) - zb.logsumexp(-1, keepdim=True)).squeeze(1).double())
        top.append(z64.amax(-1))
    exact_N, rounded_N, top_N = torch.cat(exact), torch.cat(rounded), torch.cat(top)
    t0 = time.perf_counter()
    stats = fused_logit_stats(h, w, y, y[:, None], a.chunk)
    fused_s = time.perf_counter() - t0
    fused_N = (stats.sampled_logit_N - stats.lse_N).double()
    lp_t_N = exact_N + a.adv_std * torch.randn(a.n, generator=gen, dtype=torch.float64)
    mask_exact = lp_t_N - exact_N <= 0
    print(f"N={a.n} D={a.d} V={a.v} bfloat16 weights | top logit median {top_N.median():.1f}, max {top_N.max():.1f}"
          f" | lp_S(y) median {exact_N.median():.2f}")
    print(f"{'path':<34} {'|lp_S - exact| max':>18} {'mean':>10} {'mask flips':>11}")
    for name, lp in (("bfloat16 logits (before)", rounded_N), ("float32 logits, fused (after)", fused_N)):
        err = (lp - exact_N).abs()
        flips = ((lp_t_N - lp <= 0) != mask_exact).double().mean()
        print(f"{name:<34} {err.max():>18.2e} {err.mean():>10.2e} {100 * flips:>10.3f}%")
    print(f"fused forward: {fused_s:.2f}s on {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
