"""Train one method on Ray Train and track it in MLflow.

    python experiments/train.py --method dsts
    python experiments/train.py --method u2s --config u2s --set optim.epochs=9 --workers 2
    python experiments/train.py --method dsts --run-name my-run   # again: resumes my-run

With no --config it trains on the synthetic benchmark (generated and sharded on first use under
runs/data/, cached afterwards) with the tiny backbone (the `synthetic` named config). The config
is validated before Ray starts: a bad value exits with code 2 and names the field.
"""

from __future__ import annotations

import argparse
import sys

from finegrain.models import METHODS
from finegrain.platform.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), help="overrides model.method")
    p.add_argument("--config", default=None, help="YAML file or named config (default: synthetic)")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="e.g. model.neurons=12")
    p.add_argument("--workers", type=int, help="Ray Train workers (scaling.workers)")
    p.add_argument("--gpus-per-worker", type=float, help="scaling.gpus_per_worker")
    p.add_argument("--run-name", help="run.name; an existing name resumes that run")
    p.add_argument("--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or embedded)")
    p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS, else a fresh local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(
            args.config or "synthetic",
            args.set,
            model={"method": args.method},
            scaling={"workers": args.workers, "gpus_per_worker": args.gpus_per_worker},
            run={"name": args.run_name},
            tracking={"mlflow_uri": args.mlflow_uri},
        )
    except (ConfigError, ValueError) as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2

    from finegrain.platform.cluster import ClusterTooSmall
    from finegrain.platform.logs import console_log
    from finegrain.platform.paths import run_root
    from finegrain.platform.train import run_experiment

    with console_log(run_root(cfg.run.dir), f"train-{cfg.model.method}"):
        try:
            result = run_experiment(cfg, address=args.address)
        except (ValueError, ClusterTooSmall) as e:  # before Ray starts: a config that cannot work
            print(f"config error:\n{e}", file=sys.stderr)
            return 2
        report(result)
    return 0


def report(result) -> None:
    from finegrain.platform.keys import is_accuracy
    from finegrain.platform.tracking import ui_hint

    print(f"\nMLflow run id: {result.run_id}  (run name {result.run_name})")
    keys = ["val/top1", "val/top5", "val/mean_class_acc", "val/spatial_top1", "val/temporal_top1"]
    for k in keys + ["val/best_top1", "val/loss", "train/loss"]:
        if k in result.metrics:
            value = result.metrics[k]
            print(f"  {k:<22} " + (f"{value:.1f} %" if is_accuracy(k) else f"{value:.4f}"))
    print(f"Open the MLflow UI: {ui_hint(result.tracking_uri, result.run_id)}")


if __name__ == "__main__":
    sys.exit(main())
