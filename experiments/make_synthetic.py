"""Generate the synthetic fine-grained video benchmark in the Something-Something-v2 layout.

    python experiments/make_synthetic.py --out DIR [--classes K] [--videos-per-class N]
        [--size PX] [--seed S] [--workers W] [--val-fraction F | --val-videos-per-class V]
        [--fps FPS] [--kind finegrained|pretrain]

Writes DIR/videos/{id}.mp4, DIR/labels.json, DIR/train.json, DIR/validation.json (as SSv2) and
DIR/classes.json (group and subtlety of every class); see finegrain/datasets/synthetic.py.
``--kind pretrain`` writes the coarse pretraining set instead (shapes x motions, no class in
common with the fine-grained benchmark), which experiments/pretrain.py trains the backbone on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from finegrain.datasets import synthetic


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--classes",
        type=int,
        default=synthetic.DEFAULT_CLASSES,
        help=f"the first K classes of the fixed list (2..{len(synthetic.CLASSES)})",
    )
    parser.add_argument("--videos-per-class", type=int, default=24)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes (output is the same)")
    parser.add_argument("--val-fraction", type=float, default=0.25, help="per class, in [0, 1)")
    parser.add_argument(
        "--val-videos-per-class",
        type=int,
        default=None,
        help="that many validation videos per class on top of --videos-per-class "
        "(instead of --val-fraction)",
    )
    parser.add_argument("--fps", type=int, default=12)
    parser.add_argument(
        "--kind",
        choices=sorted(synthetic.KINDS),
        default="finegrained",
        help="the fine-grained benchmark (default) or the disjoint pretraining set",
    )
    args = parser.parse_args(argv)
    try:
        return synthetic.generate(
            args.out,
            classes=args.classes,
            videos_per_class=args.videos_per_class,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            val_fraction=args.val_fraction,
            fps=args.fps,
            kind=args.kind,
            val_videos_per_class=args.val_videos_per_class,
        )
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
