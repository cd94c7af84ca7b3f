"""From a config's ``data`` section to shards and Ray datasets (driver side).

``prepare_data`` makes sure the shards exist: a prebuilt folder (``data.shards``), the synthetic
benchmark (generated and sharded on first use under ``<run dir>/data/``, cached afterwards), or a
real dataset (``data.root``, sharded once under ``<run dir>/data/<dataset>-split<k>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.platform.config import ExperimentConfig
from finegrain.platform.tracking import run_root


@dataclass
class DataSpec:
    shards: Path
    classes: list[str]
    class_groups: dict[str, dict] = field(default_factory=dict)

    def clip_config(self, cfg: ExperimentConfig, train: bool):
        from finegrain.datasets.pipeline import ClipConfig
        from finegrain.datasets.transforms import default_flip

        d = cfg.data
        flip = d.flip if d.flip is not None else default_flip(d.dataset)
        return ClipConfig(
            sampling=d.sampling,
            num_frames=d.num_frames,
            stride=d.stride,
            short_side=d.short_side,
            crop_size=d.crop,
            n_clips=1 if train else cfg.eval.clips,
            n_crops=1 if train else cfg.eval.crops,
            flip=flip,
            decode_actors=d.decode_actors,
            cpus_per_actor=d.decode_cpus,
        )

    def datasets(self, cfg: ExperimentConfig) -> dict:
        import ray.data

        from finegrain.datasets.pipeline import build_clip_dataset

        # per-operator progress bars from every trainer would drown the per-epoch lines
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False  # nor its 3 lines per split per epoch
        # same seed → same batches: blocks are yielded in order, not as tasks finish
        context.execution_options.preserve_order = True

        val_split = "val" if any(self.shards.glob("shards/val-*.parquet")) else "test"
        return {
            "train": build_clip_dataset(
                self.shards, "train", self.clip_config(cfg, True), train=True, seed=cfg.run.seed
            ),
            "val": build_clip_dataset(
                self.shards, val_split, self.clip_config(cfg, False), train=False
            ),
        }


def synthetic_dirs(cfg: ExperimentConfig) -> tuple[Path, Path]:
    s = cfg.data.synthetic
    tag = f"synthetic-c{s.classes}-v{s.videos_per_class}-s{s.size}-seed{s.seed}"
    base = run_root(cfg.run.dir) / "data"
    return base / tag / "raw", base / tag / "shards"


def prepare_data(cfg: ExperimentConfig, quiet: bool = False) -> DataSpec:
    from finegrain.datasets.shards import prepare

    d = cfg.data
    if d.shards:
        out = Path(d.shards).resolve()
    elif d.dataset == "synthetic":
        from finegrain.datasets.synthetic import ensure_synthetic

        raw, out = synthetic_dirs(cfg)
        s = d.synthetic
        ensure_synthetic(
            raw,
            classes=s.classes,
            videos_per_class=s.videos_per_class,
            size=s.size,
            seed=s.seed,
            progress=not quiet,
        )
        if not (out / "report.json").exists():
            prepare("ssv2", raw, out, extensions=("mp4",), shard_mb=4, progress=not quiet)
    else:
        out = run_root(cfg.run.dir) / "data" / f"{d.dataset}-split{d.split}"
        if not (out / "report.json").exists():
            prepare(d.dataset, d.root, out, split=d.split, progress=not quiet)
    return load_spec(out)


def load_spec(out: Path) -> DataSpec:
    if not (out / "classes.json").is_file():
        raise FileNotFoundError(f"{out}: no classes.json; build shards with build_shards.py first")
    classes_map = json.loads((out / "classes.json").read_text())
    classes = [classes_map[str(i)] for i in range(len(classes_map))]
    groups_file = out / "class_groups.json"
    groups = json.loads(groups_file.read_text()) if groups_file.is_file() else {}
    return DataSpec(out, classes, groups)


def own_bad_video_log() -> None:
    """Create the pipeline's named bad-video log in this process (the driver), so that it lives
    as long as the whole job: created by a trial, it would die with that trial, under the feet
    of the others."""
    from finegrain.datasets.pipeline import bad_videos

    bad_videos()


def bad_video_note() -> tuple[int, str]:
    """(count, a one-line note naming the first skipped videos) of the job's bad videos."""
    from finegrain.datasets.pipeline import bad_videos

    bad = bad_videos()
    if not bad["count"]:
        return 0, ""
    names = ", ".join(f"{b['split']}/{b['video_id']} ({b['error']})" for b in bad["first"])
    more = (
        f" and {bad['count'] - len(bad['first'])} more" if bad["count"] > len(bad["first"]) else ""
    )
    return bad[
        "count"
    ], f"{bad['count']} video(s) could not be decoded and were skipped: {names}{more}"
