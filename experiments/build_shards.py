"""Annotations → manifest → Parquet shards, for one dataset in its official layout.

    python experiments/build_shards.py --dataset ssv2 --root DIR --out DIR [--workers N]

Writes OUT/manifest.parquet, OUT/classes.json (+ OUT/class_groups.json for the synthetic
benchmark), OUT/shards/{split}-{k:05d}.parquet and OUT/report.json. A re-run skips the shards
that are already complete. Exit status 2 when the dataset root lacks an expected file.
"""

from __future__ import annotations

import argparse
import os
import sys

from finegrain.datasets.readers import DATASETS, LayoutError
from finegrain.datasets.shards import prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument(
        "--root", required=True, help="dataset root as the official download lays it out"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--annotations", help="folder holding the annotation files (overrides --root)")
    p.add_argument("--videos", help="folder holding the videos or their class folders")
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="UCF101/HMDB51 split")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="probing processes")
    p.add_argument(
        "--extension",
        nargs="+",
        dest="extensions",
        metavar="EXT",
        help="video file extensions to try, in order (default per dataset, ssv2: webm mp4)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = prepare(
            args.dataset,
            args.root,
            args.out,
            annotations=args.annotations,
            videos=args.videos,
            split=args.split,
            extensions=args.extensions,
            shard_mb=args.shard_mb,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (LayoutError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'split':<6} {'videos':>8} {'MB':>10} {'shards':>7} {'quarantined':>12}")
    for split, s in report["splits"].items():
        mb = s["bytes"] / (1 << 20)
        print(f"{split:<6} {s['videos']:>8} {mb:>10.1f} {s['shards']:>7} {s['quarantined']:>12}")
    issues = {k: v["count"] for k, v in report["reader_issues"].items() if v["count"]}
    if issues:
        print("reader issues: " + ", ".join(f"{k} {n}" for k, n in issues.items()))
    print(f"report: {os.path.join(args.out, 'report.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
