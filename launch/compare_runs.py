"""Check that two runs of one config trained alike, e.g. under CP=2 and in one process:

    python launch/compare_runs.py outputs/recall_ar_8k outputs/recall_ar_8k_cp1 [rtol]

Prints, per logged quantity (loss, gradient norm, validation metrics), the largest relative
difference over the steps both runs logged and where it occurs; exits 1 when one exceeds
``rtol`` (default 1e-5, float32 with other reduction orders). Log every step
(``train.log_every=1``) to compare whole trajectories.
"""
from __future__ import annotations

import sys

from hyena_cp.train.compare import compare_runs

USAGE = "usage: python launch/compare_runs.py RUN_DIR REFERENCE_RUN_DIR [rtol]"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(USAGE, file=sys.stderr)
        return 2
    rtol = float(argv[2]) if len(argv) == 3 else 1e-5
    diff = compare_runs(argv[0], argv[1])
    print(f"{diff.steps} common training records; max relative difference (rtol {rtol:g}):")
    for key in sorted(diff.max_rel):
        verdict = "ok" if diff.max_rel[key] <= rtol else "EXCEEDS"
        print(f"  {key:<16} {diff.max_rel[key]:.2e} at step {diff.worst_step[key]:<6} {verdict}")
    return 0 if diff.within(rtol) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
