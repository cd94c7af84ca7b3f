"""Tune a method's hyperparameters with Ray Tune + Optuna (TPE) + ASHA; track it in MLflow.

    python experiments/tune.py --method u2s
    python experiments/tune.py --method dsts --num-samples 20 --max-concurrent 4 --gpus-per-worker 1
    python experiments/tune.py --method dsts --resume            # the latest interrupted sweep

With no --config it searches on the synthetic benchmark with the tiny backbone. --space FILE
replaces the method's default search space (YAML: `space: {model.neurons: {type: int, low: 2,
high: 16}, optim.lr: {type: loguniform, low: 1e-3, high: 1e-1}, ...}`; types: int, uniform,
loguniform, choice with `values`). At the end it prints the best configuration, its val top-1
beside the one-pass baseline trained on the same data, and how to open the MLflow UI.
"""

from __future__ import annotations

import argparse
import sys

from finegrain.models import METHODS
from finegrain.platform.config import ConfigError, load_config


def parse_args(argv=None, method: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    if method is None:
        p.add_argument("--method", choices=list(METHODS), required=True)
    p.add_argument(
        "--config", default=None, help="base config: YAML file or named (default tune_synthetic)"
    )
    p.add_argument("--space", default=None, help="YAML search space (default: the method's)")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="base config overrides")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default 8)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="at most this many trials at once (default: as many as the cluster holds)")  # fmt: skip
    p.add_argument("--workers-per-trial", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-worker", type=float, default=None)
    p.add_argument("--time-budget", type=float, default=450, help="seconds for the search (450)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP",
                   help="continue an interrupted sweep (default: the latest)")  # fmt: skip
    p.add_argument("--name", default=None, help="sweep name (default tune-METHOD-TIMESTAMP)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-pass baseline run")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--mlflow-uri", default=None)
    p.add_argument("--address", default=None,
                   help="Ray cluster (default: $RAY_ADDRESS, else a fresh local Ray)")  # fmt: skip
    args = p.parse_args(argv)
    if method is not None:
        args.method = method
    return args


def main(argv=None, method: str | None = None) -> int:
    args = parse_args(argv, method)
    try:
        if args.num_samples < 1 or (args.max_concurrent or 1) < 1 or args.workers_per_trial < 1:
            raise ConfigError("--num-samples, --max-concurrent, --workers-per-trial must be >= 1")
        if args.time_budget is not None and args.time_budget <= 0:
            raise ConfigError("--time-budget must be > 0 seconds")
        base = load_config(
            args.config or "tune_synthetic",
            args.set,
            model={"method": args.method},
            scaling={"workers": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker},
            tracking={"mlflow_uri": args.mlflow_uri, "experiment": f"tune-{args.method}"},
        )
        from finegrain.platform.tune import load_space

        space = load_space(args.space, args.method, base.optim.optimizer)
    except (ConfigError, ValueError, OSError) as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2

    from finegrain.platform.cluster import ClusterTooSmall
    from finegrain.platform.logs import console_log
    from finegrain.platform.paths import run_root
    from finegrain.platform.tune import SweepInterrupted, run_sweep

    with console_log(run_root(base.run.dir), f"tune-{args.method}"):
        try:
            result = run_sweep(
                base,
                space=space,
                num_samples=args.num_samples,
                max_concurrent=args.max_concurrent or args.num_samples,
                time_budget=args.time_budget,
                resume=args.resume,
                name=args.name,
                baseline=not args.no_baseline,
                seed=args.seed,
                address=args.address,
            )
        except (ConfigError, ClusterTooSmall) as e:
            print(f"config error:\n{e}", file=sys.stderr)
            return 2
        except SweepInterrupted as e:
            print(f"\nsweep {e.name} interrupted: rerun the same command with --resume {e.name}")
            return 130
        report(result)
    return 0


def report(result) -> None:
    from finegrain.platform.tracking import ui_hint

    print(f"\nsweep {result.name}: {result.accounting()}")
    print(result.table.head(10).to_string(index=False))
    print("\nbest configuration (exact values: the parent run's best_config.yaml):")
    for k, v in result.best_params.items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    line = f"best val top-1: {result.best_top1:.1f}%"
    if result.baseline_top1 is not None:
        line += f"   one-pass baseline: {result.baseline_top1:.1f}%"
    print(line)
    print(
        f"MLflow parent run {result.parent_run_id}; open the UI: {ui_hint(result.tracking_uri, result.parent_run_id)}"
    )


if __name__ == "__main__":
    sys.exit(main())
