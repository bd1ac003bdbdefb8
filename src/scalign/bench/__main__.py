"""`python -m scalign.bench {sample,train,dpo,grpo} --workload NAME [--spec PATH]`.

Runs one workload of the shared peer spec and prints one JSON line
`{"system": "scalign", "workload", "metric", "value", "unit", ...}`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

KINDS = {"sample": "scalign.bench.sample", "train": "scalign.bench.train",
         "dpo": "scalign.bench.dpo", "grpo": "scalign.bench.grpo"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalign.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--workload", required=True)
    parser.add_argument("--spec", default=None, help="path to workloads.json")
    parser.add_argument("--extra", action="append", default=[],
                        help="kind-specific key=value options (see each module)")
    args = parser.parse_args(argv)
    from scalign.utils import tune_cpu_xla_flags

    tune_cpu_xla_flags()  # the launcher's XLA:CPU flags, so a benchmark measures what runs
    try:
        module = importlib.import_module(KINDS[args.kind])
    except ModuleNotFoundError as e:
        parser.error(f"benchmark kind {args.kind!r} is not available: {e}")
    extra = dict(kv.split("=", 1) for kv in args.extra)
    module.run(args.workload, args.spec, **extra)
    return 0


if __name__ == "__main__":
    from scalign.hostenv import reexec_with_malloc_tuning

    reexec_with_malloc_tuning()  # glibc malloc on huge pages, as the launcher runs
    sys.exit(main())
