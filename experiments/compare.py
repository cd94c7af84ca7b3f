"""Compare methods/variants from MLflow: best and mean ± std over seeds, a 95 % interval, a paired
test of every row against a baseline row, and the run ids.

    python experiments/compare.py                               # every experiment but Default
    python experiments/compare.py --experiment finegrain --metric top5
    python experiments/compare.py --experiment finegrain --metric best_top1 \\
        --group-by method optim.lr --out runs/compare/lr.md
    python experiments/compare.py --mlflow-uri http://127.0.0.1:5000   # a cluster's server

Prints the Markdown table and writes it (--out, default runs/compare/report.md) with a bar chart
PNG beside it. --metric takes top1, top5, mean_class_acc, spatial_top1, temporal_top1,
best_top1, loss or the MLflow names (val/top1, train/loss, mech/..., ...): the value at each
run's last epoch; accuracies are in % (older runs' val_top1 fractions are converted). Rows: tags
method + variant (ablation suites) or method + backbone; --group-by takes tag or param names.
Only FINISHED runs unless --all-statuses. An unknown experiment, metric or key exits with 2.
For top1, rows are paired by seed and validation video (each run's eval/per_video.csv): the
interval is a bootstrap over seeds and videos, the test a sign-flip permutation test against
--baseline (the label of a row, e.g. "onepass / -"; default the first row), * at p < 0.05.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finegrain.platform.compare import (
    CompareError,
    baseline_row,
    compare,
    to_markdown,
    with_intervals,
    write_report,
)
from finegrain.platform.paths import run_root


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--experiment",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="MLflow experiment name(s) (default: all but Default)",
    )
    p.add_argument("--metric", default="top1", help="top1 (= val/top1), top5, best_top1, ...")
    p.add_argument("--out", type=Path, help="Markdown report (default: runs/compare/report.md)")
    p.add_argument("--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI or embedded)")
    p.add_argument(
        "--group-by", nargs="+", metavar="KEY", help="tag/param names (default: method variant)"
    )
    p.add_argument("--all-statuses", action="store_true", help="include unfinished runs")
    p.add_argument("--baseline", help="the row every other is tested against (default: first)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        df = compare(
            args.experiment,
            args.metric,
            args.mlflow_uri,
            args.group_by,
            all_statuses=args.all_statuses,
        )
        df = with_intervals(df, baseline=baseline_row(df, args.baseline))
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    out = args.out or run_root("runs") / "compare" / "report.md"
    md, png = write_report(df, out)
    print(to_markdown(df))
    skipped = df.attrs.get("skipped") or []
    if skipped:
        ids = ", ".join(r[:8] for r in skipped)
        print(f"note: {len(skipped)} run(s) without {df.attrs['metric']} left out: {ids}")
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
