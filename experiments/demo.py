"""The data-layer demo: synthetic benchmark → shards → one epoch of clips through Ray Data.

    python experiments/demo.py [--out runs/demo] [--workers 2]

Generates the synthetic benchmark (cached), packs it into Parquet shards (a re-run skips
complete shards), streams one epoch of training clips and the validation views through the Ray
Data decode pipeline, and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where the benchmark and shards go")
    p.add_argument("--workers", type=int, default=2, help="processes for generation and packing")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    import ray

    from finegrain.datasets.pipeline import (
        ClipConfig,
        bad_videos,
        build_clip_dataset,
        iter_clip_batches,
        read_classes,
    )
    from finegrain.datasets.shards import prepare
    from finegrain.datasets.synthetic import ensure_synthetic

    out = Path(args.out)
    t0 = time.perf_counter()
    raw = ensure_synthetic(out / "synthetic", workers=args.workers)
    report = prepare(
        "ssv2", raw, out / "shards", extensions=("mp4",), shard_mb=4, workers=args.workers
    )
    t1 = time.perf_counter()

    ray.init(num_cpus=4, include_dashboard=False, logging_level="warning")
    classes = read_classes(out / "shards")
    lines = []
    for split, train in (("train", True), ("val", False)):
        cfg = ClipConfig(n_clips=1 if train else 2, decode_actors=2)
        start = time.perf_counter()
        clips, labels, shape = 0, Counter(), None
        for batch in iter_clip_batches(
            build_clip_dataset(out / "shards", split, cfg, train), args.batch_size
        ):
            clips += len(batch["labels"])
            labels.update(batch["labels"].tolist())
            shape = tuple(batch["clips"].shape[1:])
        secs = time.perf_counter() - start
        lines.append(
            f"  {split:<5} {clips:>5} clips  shape {shape} uint8  {len(labels)} classes  "
            f"{clips / secs:7.1f} clips/s  bad videos: {bad_videos(split)['count']}"
        )
    ray.shutdown()

    print("\nfinegrain data demo")
    print(f"  benchmark + shards: {out}  ({t1 - t0:.1f} s)")
    print(f"  classes: {len(classes)}; videos per split: {report.get('videos', {})}")
    print(f"  quarantined while packing: {len(report.get('quarantined', []))}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
