"""The data-layer demo: synthetic benchmark → shards → one epoch of clips through Ray Data.

    python experiments/demo.py [--out runs/demo] [--workers 2] [--videos-per-class 24]

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
    p.add_argument("--videos-per-class", type=int, default=24, help="size of the benchmark")
    args = p.parse_args(argv)

    import ray

    from finegrain.datasets.pipeline import (
        ClipConfig,
        build_clip_dataset,
        iter_clip_batches,
        new_bad_video_log,
        read_classes,
    )
    from finegrain.datasets.shards import prepare
    from finegrain.datasets.synthetic import ensure_synthetic
    from finegrain.platform import cluster

    out = Path(args.out)
    t0 = time.perf_counter()
    raw = ensure_synthetic(
        out / "synthetic", videos_per_class=args.videos_per_class, workers=args.workers
    )
    report = prepare(
        "ssv2", raw, out / "shards", extensions=("mp4",), shard_mb=4, workers=args.workers
    )
    t1 = time.perf_counter()

    # like every command: $RAY_ADDRESS, else a fresh local Ray (a bare ray.init() would follow
    # a dead head's ray_current_cluster pointer and refuse num_cpus)
    cluster.connect(num_cpus=4)
    classes = read_classes(out / "shards")
    bad_log = new_bad_video_log()  # counts the videos the decoders skip, per split
    lines = []
    for split, train in (("train", True), ("val", False)):
        cfg = ClipConfig(n_clips=1 if train else 2, decode_actors=2)
        start = time.perf_counter()
        clips, labels, shape = 0, Counter(), None
        for batch in iter_clip_batches(
            build_clip_dataset(out / "shards", split, cfg, train, bad_log=bad_log), args.batch_size
        ):
            clips += len(batch["labels"])
            labels.update(batch["labels"].tolist())
            shape = tuple(batch["clips"].shape[1:])
        secs = time.perf_counter() - start
        bad = ray.get(bad_log.summary.remote(split))
        lines.append(
            f"  {split:<5} {clips:>5} clips  shape {shape} uint8  {len(labels)} classes  "
            f"{clips / secs:7.1f} clips/s  bad videos: {bad['count']}"
        )
    ray.shutdown()

    print("\nfinegrain data demo")
    print(f"  benchmark + shards: {out}  ({t1 - t0:.1f} s)")
    videos = {split: s["videos"] for split, s in report["splits"].items()}
    print(f"  classes: {len(classes)}; videos per split: {videos}")
    print(f"  quarantined while packing: {report['totals']['quarantined']}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
