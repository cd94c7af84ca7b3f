"""Ablation suites: the runs behind the papers' ablation tables, in parallel on Ray, in MLflow.

    python experiments/ablate.py --suite dfb                       # 3 variants x 3 seeds
    python experiments/ablate.py --suite dsts --seeds 3 --epochs 4
    python experiments/ablate.py --suite u2s --variants full oracle --seeds 1
    python experiments/ablate.py --suite all --max-concurrent 8 --gpus-per-worker 1

Suites: dsts (Tables 3-7), u2s (Tables I-III), dfb (Table 1), classreg (on/off, gamma),
joint_attn (early/late fusion, attention regularization), methods (every method vs one-pass),
mechanisms (the methods suite with each paper's mechanism scored and a verdict), all.

With no --config the base is the named config tune_synthetic (tiny backbone, 48 px, 8 frames,
4 epochs); each suite sets model.method itself. Runs go to the MLflow experiment ablate-SUITE,
named ablate-SUITE-VARIANT-sSEED: a rerun skips the finished ones. The table (mean +- std over
seeds, a 95 % interval and a paired test against the first row) is printed and written to
RUN_DIR/ablate/SUITE/table.md with table.png.
A bad option exits with 2 before anything starts.
"""

from __future__ import annotations

import argparse
import os
import sys

# MLflow's telemetry thread sets and unsets an environment variable while the main thread's HTTP
# requests iterate os.environ (requests' proxy lookup): a KeyError that fails an MLflow call.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from finegrain.platform.ablate import suite_choices
from finegrain.platform.config import ConfigError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", choices=suite_choices(), required=True)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per variant (default 3)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: config's)")
    p.add_argument(
        "--config", default=None, help="base config: YAML file or named (default tune_synthetic)"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="base config overrides")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="only these rows (one suite)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many runs at once (default: as many as the cluster holds)")  # fmt: skip
    p.add_argument("--workers-per-run", type=int, default=None, help="Ray Train workers per run")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--address", default=None,
                   help="Ray cluster (default: $RAY_ADDRESS, else a fresh local Ray)")  # fmt: skip
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from finegrain.platform import ablate

    try:
        if args.seeds < 1 or (args.max_concurrent or 1) < 1:
            raise ConfigError("--seeds and --max-concurrent must be >= 1")
        if args.workers_per_run is not None and args.workers_per_run < 1:
            raise ConfigError("--workers-per-run must be >= 1")
        names = ablate.suite_names(args.suite)
        if args.variants and len(names) > 1:
            raise ConfigError("--variants needs a single --suite, not 'all'")
        plans = []
        for name in names:  # every suite's configs are checked before any run starts
            suite = ablate.get_suite(name)
            base = ablate.load_base(
                suite,
                args.config,
                args.set,
                epochs=args.epochs,
                workers=args.workers_per_run,
                gpus_per_worker=args.gpus_per_worker,
                mlflow_uri=args.mlflow_uri,
            )
            ablate.check_suite(base, suite, ablate.select(suite, args.variants))
            plans.append((suite, base))
        for suite, base in plans:  # and no run name is taken by a run of another config
            ablate.check_existing(base, suite, seeds=range(args.seeds), variants=args.variants)
    except (ConfigError, ValueError) as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2

    from finegrain.platform.cluster import ClusterTooSmall
    from finegrain.platform.logs import console_log
    from finegrain.platform.paths import run_root
    from finegrain.platform.tracking import ui_hint

    failed = []
    with console_log(run_root(plans[0][1].run.dir), f"ablate-{args.suite}"):
        for suite, base in plans:
            try:
                result = ablate.run_suite(
                    suite,
                    base,
                    seeds=range(args.seeds),
                    variants=args.variants,
                    max_concurrent=args.max_concurrent,
                    address=args.address,
                )
            except (ConfigError, ClusterTooSmall) as e:
                print(f"config error:\n{e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(
                    f"\nsuite {suite.name} interrupted: rerun the same command to finish it "
                    "(finished runs are not trained again)",
                    file=sys.stderr,
                )
                return 130
            print("\n" + result.markdown)
            print(f"wrote {result.markdown_path} and {result.png_path}")
            print(
                f"MLflow summary run {result.summary_run_id}; UI: {ui_hint(result.tracking_uri, result.summary_run_id)}"
            )
            failed += result.failed
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
