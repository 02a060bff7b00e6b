"""How TRACE combines per-concept stage-B LoRAs (issue 18): fusion's λ_p against the naive sum, on one half of the
toy classes erased together as one set of five.

Rows: ``trace`` (``--multi fuse``, λ_p = 1: the default), fuse with λ_p = 0.1 and 0, ``--multi sum``, and
``trace-closed-form`` (the joint stage A they all start from). The rule, fixed before the runs: the default becomes
the one with the highest H_o on the ``dev`` half; the ``test`` half reports every row.

    python benchmarks/fusion_choice.py --half dev  [--steps 150] [--seeds 2] [--output DIR]   # ~30 min, 1 thread
    python benchmarks/fusion_choice.py --half test
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _script import run

from trace_erase.benchmark.bench import run_bench
from trace_erase.benchmark.tables import markdown
from trace_erase.evaluation.suites import toy_split
from trace_erase.models import load_model

SWEEP = [{"fusion_lambda_preserve": 0.1}, {"fusion_lambda_preserve": 0.0}, {"multi": "sum"}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--half", choices=("dev", "test"), required=True)
    p.add_argument("--model", default="toy-sd")
    p.add_argument("--steps", type=int, default=150, help="stage-B steps per concept (the demo's budget)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    output = args.output or Path("benchmarks/results") / f"fusion-{args.half}-{args.model}"
    concept_set = ",".join(sorted(toy_split(args.half)))
    result = run_bench(load_model(args.model), ["trace", "trace-closed-form"], [concept_set], output,
                       seeds=args.seeds, options={"steps": args.steps}, sweep=SWEEP, overwrite=not args.resume,
                       resume=args.resume)
    print(markdown(result))


if __name__ == "__main__":
    run(main)
