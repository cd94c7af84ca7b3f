"""From a config's ``data`` section to shards and Ray datasets (driver side).

``prepare_data`` makes sure the shards exist: a prebuilt folder (``data.shards``), the synthetic
benchmark (generated and sharded on first use under ``<run dir>/data/``, cached afterwards), or a
real dataset (``data.root``, sharded once under ``<run dir>/data/<dataset>-split<k>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finegrain.datasets.layout import CLASS_GROUPS_FILE, CLASSES_FILE, REPORT_FILE, has_split
from finegrain.platform.config import ExperimentConfig
from finegrain.platform.paths import run_root


@dataclass
class DataSpec:
    shards: Path
    classes: list[str]
    class_groups: dict[str, dict] = field(default_factory=dict)

    @property
    def val_split(self) -> str:
        """``val`` where the shards have one, else ``test`` (UCF101, HMDB51)."""
        return "val" if has_split(self.shards, "val") else "test"

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
            decode_batch=d.decode_batch,
            read_cpus=d.read_cpus,
        )

    def run_dataset(
        self,
        cfg: ExperimentConfig,
        epochs: list[int],
        rank: int,
        world: int,
        streams: int = 1,
        bad_log=None,
    ):
        """Everything rank ``rank`` of a run reads from ``epochs[0]`` on, as one dataset (one
        execution for the run): its training clips of every epoch (``streams`` samplers) and
        its exact share of the validation views — decoded once when they fit in
        ``eval.cache_mb`` (the rank keeps them), else after every epoch's training clips."""
        from finegrain.datasets.pipeline import build_run_dataset

        _configure_data_context()
        return build_run_dataset(
            self.shards,
            self.clip_config(cfg, True),
            self.clip_config(cfg, False),
            epochs=epochs,
            seed=cfg.run.seed,
            rank=rank,
            world=world,
            streams=streams,
            evaluate="once" if self.val_fits(cfg, world) else "every_epoch",
            eval_split=self.val_split,
            bad_log=bad_log,
        )

    def train_stream(
        self, cfg: ExperimentConfig, epochs: list[int], rank: int, world: int, bad_log=None
    ):
        """Rank ``rank``'s training clips of ``epochs`` alone (a pass of its own)."""
        from finegrain.datasets.pipeline import build_clip_dataset

        _configure_data_context()
        return build_clip_dataset(
            self.shards,
            "train",
            self.clip_config(cfg, True),
            True,
            cfg.run.seed,
            epochs=epochs,
            rank=rank,
            world=world,
            bad_log=bad_log,
        )

    def val_dataset(
        self, cfg: ExperimentConfig, rank: int = 0, world: int = 1, bad_log=None, stream: int = 0
    ):
        """Rank ``rank``'s share of every validation view (the ranks' shares partition them)."""
        from finegrain.datasets.pipeline import build_clip_dataset

        _configure_data_context()
        return build_clip_dataset(
            self.shards,
            self.val_split,
            self.clip_config(cfg, False),
            train=False,
            rank=rank,
            world=world,
            bad_log=bad_log,
            stream=stream,
        )

    def split_sizes(self) -> dict[str, int]:
        """Videos per split of the shards."""
        from finegrain.datasets.pipeline import split_rows

        return {
            split: sum(split_rows(self.shards, split).values())
            for split in ("train", "val", "test")
            if has_split(self.shards, split)
        }

    def train_rows(self) -> int:
        """Training videos in the shards."""
        from finegrain.datasets.pipeline import split_rows

        return sum(split_rows(self.shards, "train").values())

    def val_views(self, cfg: ExperimentConfig) -> tuple[int, int]:
        """(validation videos, views per video)."""
        from finegrain.datasets.pipeline import split_rows

        videos = sum(split_rows(self.shards, self.val_split).values())
        return videos, cfg.eval.clips * cfg.eval.crops

    def val_fits(self, cfg: ExperimentConfig, world: int) -> bool:
        """Whether a rank's share of the decoded validation views fits in ``eval.cache_mb``."""
        videos, views = self.val_views(cfg)
        clip = cfg.data.num_frames * cfg.data.crop * cfg.data.crop * 3
        return videos * views * clip / world <= cfg.eval.cache_mb * 2**20


def _configure_data_context() -> None:
    """This process's Ray Data settings, copied into every dataset built after it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # one bar per operator per run would bury the epoch lines; the run prints its own progress
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # same seed → same batches: blocks are yielded in plan order, not as tasks finish
    context.execution_options.preserve_order = True


def dataset_name(cfg: ExperimentConfig) -> str:
    """The dataset's name as MLflow shows it: the synthetic benchmark's options, or the real
    dataset and its split."""
    if cfg.data.shards:
        return Path(cfg.data.shards).resolve().name
    if cfg.data.dataset == "synthetic":
        return synthetic_dirs(cfg)[0].parent.name
    return f"{cfg.data.dataset}-split{cfg.data.split}"


def synthetic_dirs(cfg: ExperimentConfig) -> tuple[Path, Path]:
    s = cfg.data.synthetic
    kind = "" if s.kind == "finegrained" else f"{s.kind}-"
    val = "" if s.val_videos_per_class is None else f"+{s.val_videos_per_class}"
    tag = f"synthetic-{kind}c{s.classes}-v{s.videos_per_class}{val}-s{s.size}-seed{s.seed}"
    base = run_root(cfg.run.dir) / "data"
    return base / tag / "raw", base / tag / "shards"


def prepare_data(cfg: ExperimentConfig, quiet: bool = False) -> DataSpec:
    from finegrain.datasets.shards import is_current, prepare

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
            kind=s.kind,
            val_videos_per_class=s.val_videos_per_class,
        )
        if not is_current(out):  # shards of an older format lack columns (e.g. evidence)
            prepare("ssv2", raw, out, extensions=("mp4",), shard_mb=4, progress=not quiet)
    else:
        out = run_root(cfg.run.dir) / "data" / f"{d.dataset}-split{d.split}"
        # (older shards of a real dataset are kept: its only new column, evidence, is null for
        # real data, and the pipeline reads shards without it as such)
        if not (out / REPORT_FILE).exists():
            prepare(d.dataset, d.root, out, split=d.split, progress=not quiet)
    return load_spec(out)


def load_spec(out: Path) -> DataSpec:
    if not (out / CLASSES_FILE).is_file():
        raise FileNotFoundError(
            f"{out}: no {CLASSES_FILE}; build shards with build_shards.py first"
        )
    classes_map = json.loads((out / CLASSES_FILE).read_text())
    classes = [classes_map[str(i)] for i in range(len(classes_map))]
    groups_file = out / CLASS_GROUPS_FILE
    groups = json.loads(groups_file.read_text()) if groups_file.is_file() else {}
    return DataSpec(out, classes, groups)


def bad_video_note(bad: dict) -> str:
    """A one-line note naming the first skipped videos of ``BadVideoLog.summary()``."""
    if not bad["count"]:
        return ""
    names = ", ".join(f"{b['split']}/{b['video_id']} ({b['error']})" for b in bad["first"])
    more = bad["count"] - len(bad["first"])
    return f"{bad['count']} video(s) could not be decoded and were skipped: {names}" + (
        f" and {more} more" if more > 0 else ""
    )
