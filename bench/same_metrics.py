"""Are two reproduction trees the same run? Compares every metrics.jsonl (and rollouts.jsonl) under two
`bench/reproduce.py --out` directories record by record: keys in the same order and values equal, except the
wall-clock keys (timing/*, throughput/*, teacher/latency_ms). With a tolerance, the per-token metric means
(loss/*, div/*, adv/mean, adv/frac_*, aopd/*, policy/*, conf/*, teacher/floored_frac, is/*) may differ by
that relative amount; everything else (grad norms, learning rates, eval pass@k, advantage quantiles and
histograms, rollouts) must still be exact.

    python bench/same_metrics.py runs/before runs/after [REL_TOL]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CLOCK = ("timing/", "throughput/", "teacher/latency_ms")
MEANS = ("loss/", "div/", "adv/mean", "adv/frac", "aopd/", "policy/", "conf/", "teacher/floored", "is/")


def main() -> None:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    worst: dict[str, float] = {}
    files = sorted(a.rglob("metrics.jsonl"))
    assert files, f"no metrics.jsonl under {a}"
    for fa in files:
        la, lb = fa.read_text().splitlines(), (b / fa.relative_to(a)).read_text().splitlines()
        assert len(la) == len(lb), (str(fa), len(la), len(lb))
        exact = 0
        for x, y in zip(la, lb, strict=True):
            ra, rb = json.loads(x), json.loads(y)
            assert list(ra) == list(rb), (str(fa), ra["step"], list(ra), list(rb))
            for k in ra:
                if k.startswith(CLOCK):
                    continue
                if ra[k] == rb[k]:
                    exact += 1
                elif tol and k.startswith(MEANS):
                    rel = abs(ra[k] - rb[k]) / max(abs(ra[k]), 1e-30)
                    assert rel <= tol, (str(fa), ra["step"], k, ra[k], rb[k], rel)
                    worst[k] = max(worst.get(k, 0.0), rel)
                else:
                    raise SystemExit(f"{fa} step {ra['step']}: {k} = {ra[k]!r} vs {rb[k]!r}")
        print(f"{fa.relative_to(a)}: {len(la)} records, {exact} values bit-identical, the rest wall-clock"
              + (" or within the tolerance" if tol else ""))
    for fa in sorted(a.rglob("rollouts.jsonl")):
        same = fa.read_bytes() == (b / fa.relative_to(a)).read_bytes()
        print(f"{fa.relative_to(a)}: {'identical' if same else 'DIFFERENT'}")
        if not same:
            raise SystemExit(1)
    if worst:
        print("largest relative differences of per-token metric means:",
              ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))


if __name__ == "__main__":
    main()
