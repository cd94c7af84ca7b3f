"""Make the project's pretrained backbone: pretrain, then save the backbone's weights.

    python experiments/pretrain.py                     # ~28 minutes on 2 cores
    python experiments/pretrain.py --seed 1 --out weights/tiny16-synthetic-pretrain-s1.pt

No weights can be downloaded, so the project makes its own (METHODS.md, "The regime every paper
assumes"): the one-pass baseline trained through the normal trainer on the synthetic
pretraining set (coarse shapes x motions, disjoint from the fine-grained benchmark's classes;
the `pretrain_synthetic` named config), and the backbone of its best epoch by val top-1 saved
as an ordinary state dict (the wrapper's key names, `torch.load(weights_only=True)`), which a
config loads with `model.weights=PATH`, as it would torchvision weights. Deterministic for a seed
and a version of the code (the JSON beside the weights records how they were made, and the commit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finegrain.platform.config import ConfigError, load_config

DEFAULT_OUT = "weights/tiny16-synthetic-pretrain.pt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="pretrain_synthetic", help="named config or YAML file")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V", help="config overrides")
    p.add_argument("--seed", type=int, default=None, help="run.seed (default: the config's)")
    p.add_argument("--epochs", type=int, default=None, help="optim.epochs")
    p.add_argument(
        "--out",
        default=None,
        help=f"weights file (default: the project's {DEFAULT_OUT}, which the configs load)",
    )
    p.add_argument("--run-name", default=None, help="run.name (default pretrain-TIMESTAMP)")
    p.add_argument("--address", default=None, help="Ray cluster (default: a fresh local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(
            args.config,
            args.set,
            optim={"epochs": args.epochs},
            run={"seed": args.seed, "name": args.run_name},
        )
        if cfg.model.method != "onepass":
            raise ConfigError(f"model.method: pretraining trains onepass, got {cfg.model.method}")
    except (ConfigError, ValueError) as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2

    from finegrain.platform.logs import console_log
    from finegrain.platform.paths import run_root
    from finegrain.platform.pretrain import pretrain

    with console_log(run_root(cfg.run.dir), "pretrain"):
        out = args.out or Path(__file__).resolve().parents[1] / DEFAULT_OUT
        made = pretrain(cfg, out, address=args.address)
        print(
            f"\nbackbone of epoch {made['epoch']} (val top-1 {made['val/top1']:.1f}%, "
            f"{made['classes']} pretraining classes) saved to {made['path']}\n"
            f"sha256 {made['sha256']}; load it with --set model.weights={made['path']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
