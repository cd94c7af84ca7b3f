"""Ray Data pipeline: Parquet shards -> sampled, decoded, transformed ``uint8`` clips.

``read_parquet`` (the ``video`` bytes, ``video_id``, ``label`` columns of one split's shards)
-> ``map_batches(ClipDecoder)`` in a pool of Ray actors: per row, sample frame indices
(:mod:`.sampling`), decode only those frames from the in-memory bytes with decord, apply the
spatial transforms (:mod:`.transforms`) -> rows ``clip`` ``(T, S, S, 3)`` uint8, ``label``,
``video_id``, ``view``. Consumers iterate with :func:`iter_clip_batches` and turn clips into
normalised float model input on the training device with :func:`to_model_input`.

Views: training emits one view per video (a random clip, random crop, optional flip).
Evaluation emits ``n_clips x n_crops`` views per video, ``view = clip * n_crops + crop``, all
tagged with the video's ``video_id`` so that their predictions can be averaged.

Bad videos (undecodable bytes, too few frames, a label outside the classes) are logged with their
``video_id`` and skipped; every skip is also recorded by a small named Ray actor,
:class:`BadVideoLog`, so :func:`bad_videos` reports how many and which, and a long run never fails
on them (not even if that actor is gone: then the skip is only logged).

Randomness: a training view is drawn from ``default_rng([seed, execution, crc32(video_id)])``:
reproducible for a given ``seed``, independent of which actor decodes the row, and different on
each re-execution (epoch) of the same dataset, because ``execution`` is Ray Data's execution
index of the pipeline (the counter its own ``FileShuffleConfig`` reseeds with). ``seed=None``
draws fresh entropy instead. Ray start-up is the caller's job (``ray.init``).

Start-up: Ray Data starts the decode actors afresh for every epoch, so the module a decode actor
imports (this one) imports no torch at the top: torch is imported by the consumer-side
functions (``iter_clip_batches``, ``to_model_input``) and, in an actor, only if a clip needs
resizing (``transforms.resize_short_side``). That saves each actor ~3-5 s every epoch on 2 cores.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import decord
import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from finegrain.datasets.sampling import dense_indices, tsn_indices
from finegrain.datasets.transforms import clip_views, flip_swap_map, unflippable_classes

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadVideoLog",
    "ClipCollate",
    "ClipConfig",
    "ClipDecoder",
    "bad_videos",
    "build_clip_dataset",
    "iter_clip_batches",
    "read_classes",
    "sample_views",
    "shard_files",
    "to_model_input",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BAD_VIDEO_LOG_NAME = "finegrain_bad_videos"
_COLUMNS = ["video", "video_id", "label"]


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type = int) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and lo <= value <= hi
    if kind is float:  # accept ints for floats
        ok = isinstance(value, int | float) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise ValueError(
            f"ClipConfig.{name} must be {kind.__name__} in [{lo}, {hi}], got {value!r}"
        )


@dataclass(frozen=True)
class ClipConfig:
    """How clips are sampled, transformed and decoded (validated on construction).

    sampling: ``"tsn"`` (``num_frames`` segments, one frame each) or ``"dense"``
    (``num_frames`` consecutive frames at ``stride``). ``short_side``: resize target of the
    shorter frame side; ``crop_size``: square crop (<= ``short_side``). ``n_clips`` x
    ``n_crops`` (1 or 3): evaluation views per video. ``flip``: random horizontal flip with
    label swap when training (see ``transforms.default_flip``). Decoding: ``decode_actors`` Ray
    actors reserving ``cpus_per_actor`` Ray CPUs each (the decode CPU budget is their product;
    it plus one CPU for Ray Data's own read/repartition tasks must fit in the cluster; Ray CPUs
    are scheduling units: an actor decodes on ``decode_threads`` threads whatever it reserves),
    ``decode_threads`` decord threads per video (0 = decord's auto; 1 is fastest when actors
    fill the cores), ``decode_batch`` videos per actor call (fewer, larger tasks cost Ray less
    per clip), ``read_cpus`` Ray CPUs of each Parquet read task.
    """

    sampling: Literal["tsn", "dense"] = "tsn"
    num_frames: int = 8
    stride: int = 4
    short_side: int = 64
    crop_size: int = 56
    n_clips: int = 1
    n_crops: int = 1
    flip: bool = False
    decode_actors: int = 2
    cpus_per_actor: float = 0.5
    decode_threads: int = 1
    decode_batch: int = 32
    read_cpus: float = 0.25

    def __post_init__(self) -> None:
        if self.sampling not in ("tsn", "dense"):
            raise ValueError(f"ClipConfig.sampling must be 'tsn' or 'dense', got {self.sampling!r}")
        _check_range("num_frames", self.num_frames, 1, 1024)
        _check_range("stride", self.stride, 1, 64)
        _check_range("short_side", self.short_side, 8, 4096)
        _check_range("crop_size", self.crop_size, 8, self.short_side)
        _check_range("n_clips", self.n_clips, 1, 64)
        if self.n_crops not in (1, 3) or isinstance(self.n_crops, bool):
            raise ValueError(f"ClipConfig.n_crops must be 1 or 3, got {self.n_crops!r}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"ClipConfig.flip must be True or False, got {self.flip!r}")
        _check_range("decode_actors", self.decode_actors, 1, 1024)
        _check_range("cpus_per_actor", self.cpus_per_actor, 0.05, 64.0, float)
        _check_range("decode_threads", self.decode_threads, 0, 64)
        _check_range("decode_batch", self.decode_batch, 1, 4096)
        _check_range("read_cpus", self.read_cpus, 0.0, 64.0, float)

    def views(self, train: bool) -> int:
        """Views emitted per video: 1 when training, ``n_clips * n_crops`` for evaluation."""
        return 1 if train else self.n_clips * self.n_crops


def sample_views(
    num_frames: int, config: ClipConfig, *, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Frame indices ``(clips, config.num_frames)`` of one video (1 clip when training)."""
    n_clips = 1 if train else config.n_clips
    if config.sampling == "tsn":
        return tsn_indices(num_frames, config.num_frames, train=train, rng=rng, n_clips=n_clips)
    return dense_indices(
        num_frames, config.num_frames, config.stride, train=train, rng=rng, n_clips=n_clips
    )


# --------------------------------------------------------------------------- shards, classes


def shard_files(shard_dir: str | Path, split: str) -> list[str]:
    """The shard files ``shard_dir/shards/{split}-{k:05d}.parquet`` of ``split``, sorted."""
    folder = Path(shard_dir) / "shards"
    pattern = re.compile(rf"{re.escape(split)}-\d{{5}}\.parquet")
    files = sorted(str(p) for p in folder.glob(f"{split}-*.parquet") if pattern.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(f"no shards {folder}/{split}-NNNNN.parquet for split {split!r}")
    return files


def read_classes(shard_dir: str | Path) -> list[str]:
    """Class names by label index from ``shard_dir/classes.json`` (``{"0": name, ...}``).

    A value may also be a dict with a ``"name"`` entry (richer class records).
    """
    path = Path(shard_dir) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (written next to the shards by build_shards)")
    raw = json.loads(path.read_text())
    names = {int(k): v["name"] if isinstance(v, dict) else v for k, v in raw.items()}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: class indices must be 0..{len(names) - 1}, got {sorted(names)}")
    return [names[i] for i in range(len(names))]


# --------------------------------------------------------------------------- bad videos


@ray.remote(num_cpus=0)
class BadVideoLog:
    """Counts skipped videos per split; keeps each one's first error (a few bytes per video)."""

    def __init__(self) -> None:
        self._first_error: dict[tuple[str, str], str] = {}
        self._events = 0

    def add(self, split: str, video_id: str, error: str) -> None:
        self._events += 1
        self._first_error.setdefault((split, video_id), error)

    def summary(self, split: str | None = None, first: int = 20) -> dict:
        bad = [(s, v, e) for (s, v), e in self._first_error.items() if split in (None, s)]
        return {
            "count": len(bad),
            "events": self._events,
            "first": [{"split": s, "video_id": v, "error": e} for s, v, e in bad[:first]],
        }


def _bad_video_log() -> Any:
    return BadVideoLog.options(name=BAD_VIDEO_LOG_NAME, get_if_exists=True).remote()


def bad_videos(split: str | None = None, first: int = 20) -> dict:
    """``{"count", "events", "first": [{split, video_id, error}]}`` of videos skipped so far.

    ``count`` counts distinct videos (a bad video re-read every epoch counts once); ``events``
    counts every skip. Call it from the driver that built the datasets.
    """
    return ray.get(_bad_video_log().summary.remote(split, first))


# --------------------------------------------------------------------------- decoding


class ClipDecoder:
    """The ``map_batches`` callable: encoded videos -> ``uint8`` clip views (one Ray actor).

    ``decode_row`` handles one video and is also what the plain DataLoader baseline in
    ``bench/data_throughput.py`` calls, so both paths do identical work.
    """

    def __init__(
        self,
        config: ClipConfig,
        *,
        train: bool,
        class_names: Sequence[str] | None = None,
        seed: int | None = 0,
        split: str = "",
        bad_log: Any = None,
    ) -> None:
        self.config, self.train, self.split, self.bad_log = config, train, split, bad_log
        self.num_classes = len(class_names) if class_names is not None else None
        self.swap = flip_swap_map(class_names) if class_names is not None else {}
        self.no_flip = unflippable_classes(class_names) if class_names is not None else frozenset()
        # Ray Data makes new actors for each execution of a dataset and ships its DataContext
        # with them; _execution_idx (private, hence getattr) is the epoch counter Ray's own
        # FileShuffleConfig reseeds with.
        execution = getattr(ray.data.DataContext.get_current(), "_execution_idx", 0)
        self.seed = None if seed is None else (seed, execution)
        self.rng = np.random.default_rng()  # used only when seed is None

    def row_rng(self, video_id: str) -> np.random.Generator:
        if self.seed is None:
            return self.rng
        return np.random.default_rng([*self.seed, zlib.crc32(video_id.encode())])

    def decode_row(
        self, video: bytes, label: int, video_id: str = "", out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One video -> (clips ``(V, T, S, S, 3)`` uint8, labels ``(V,)`` int64); raises if bad.

        ``out``: where to write the clips (a slice of the batch), else a new array. Each frame is
        decoded once even if eval clips overlap, resized once, cropped/flipped as views, and
        copied once into ``out``.
        """
        cfg = self.config
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside the {self.num_classes} classes")
        rng = self.row_rng(video_id) if self.train else None
        reader = decord.VideoReader(io.BytesIO(video), num_threads=cfg.decode_threads)
        indices = sample_views(len(reader), cfg, train=self.train, rng=rng)
        wanted, where = np.unique(indices, return_inverse=True)
        frames = reader.get_batch(wanted.tolist()).asnumpy()
        views = clip_views(
            frames,
            short_side=cfg.short_side,
            crop_size=cfg.crop_size,
            train=self.train,
            n_crops=cfg.n_crops,
            flip=cfg.flip and label not in self.no_flip,
            rng=rng,
        )
        shape = (len(indices) * len(views), cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        labels = np.full(len(out), label, np.int64)
        for k, clip_index in enumerate(where.reshape(indices.shape)):
            for c, (view, flipped) in enumerate(views):  # view index = clip * n_crops + crop
                np.take(view, clip_index, axis=0, out=out[k * len(views) + c])
                if flipped:
                    labels[k * len(views) + c] = self.swap.get(label, label)
        return out, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, n_views = self.config, self.config.views(self.train)
        rows = len(batch["video_id"])
        shape = (rows * n_views, cfg.num_frames, cfg.crop_size, cfg.crop_size, 3)
        clips, labels = np.empty(shape, np.uint8), np.empty(rows * n_views, np.int64)
        video_ids: list[str] = []
        n = 0
        for video, label, video_id in zip(batch["video"], batch["label"], batch["video_id"]):
            video_id = str(video_id)
            try:
                _, labels[n : n + n_views] = self.decode_row(
                    video, int(label), video_id, out=clips[n : n + n_views]
                )
            except Exception as err:  # any undecodable video: skip, log, count
                self._report(video_id, err)
                continue
            video_ids += [video_id] * n_views
            n += n_views
        return {
            "clip": clips[:n],
            "label": labels[:n],
            "video_id": np.array(video_ids, dtype=str),
            "view": np.tile(np.arange(n_views, dtype=np.int64), n // n_views),
        }

    def _report(self, video_id: str, err: Exception) -> None:
        message = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        )
        log.warning("skipping bad video %s (split %r): %s", video_id, self.split, message[:300])
        if self.bad_log is not None:
            try:
                # waited for (bad videos are rare) so a batch's skips are counted before it is seen
                ray.get(self.bad_log.add.remote(self.split, video_id, message[:300]), timeout=30)
            except Exception:  # the count is best effort; decoding goes on regardless
                log.exception("could not record bad video %s", video_id)


# --------------------------------------------------------------------------- dataset


def _check_cpu_budget(config: ClipConfig) -> None:
    """Fail fast where the decode actors would starve Ray Data's own tasks (a silent hang).

    The actor pool claims its CPUs when the dataset starts, before any row is read, and Ray
    Data's repartition tasks need a whole CPU each.
    """
    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0.0)
    budget = config.decode_actors * config.cpus_per_actor
    if budget + 1 > total:
        raise ValueError(
            f"ClipConfig.decode_actors x cpus_per_actor = {budget:g} CPUs plus 1 for reading the "
            f"shards exceeds the cluster's {total:g} CPUs; lower decode_actors or "
            f"cpus_per_actor (Ray CPUs are scheduling units: an actor decodes on "
            f"decode_threads threads whatever it reserves)"
        )


def _read_shards(
    files: list[str], shuffle: ray.data.FileShuffleConfig | None, num_cpus: float
) -> ray.data.Dataset:
    """``read_parquet`` of the shards' ``video, video_id, label`` columns, V1 reader.

    Ray 2.60's default Parquet reader (datasource V2) starts a pool of footer-reading actors
    on every execution, i.e. every epoch: seconds of process start-up before the first row on a
    small node (measured: first batch after ~11 s instead of ~3 s on 2 loaded cores). The V1
    reader reads the footers once, here, on the driver. The dataset keeps a copy of the
    DataContext taken at creation, so the switch is restored right after.
    """
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(files, columns=_COLUMNS, shuffle=shuffle, num_cpus=num_cpus)
    finally:
        ctx.use_datasource_v2 = v2


def build_clip_dataset(
    shard_dir: str | Path,
    split: str,
    config: ClipConfig,
    train: bool,
    seed: int | None = 0,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of clip views of ``split`` (needs ``ray.init`` first).

    Training shuffles the shard order (reseeded every epoch); shuffle rows further with
    ``iter_clip_batches(..., local_shuffle_buffer_size=...)``.
    """
    _check_cpu_budget(config)
    files = shard_files(shard_dir, split)
    class_names = read_classes(shard_dir)
    shuffle = ray.data.FileShuffleConfig(seed=seed) if train else None
    ds = _read_shards(files, shuffle, config.read_cpus)
    # small blocks (streaming, no barrier): a shard's rows spread over all actors, and each actor
    # task returns its clips at once instead of buffering a whole shard's worth of output
    ds = ds.repartition(target_num_rows_per_block=config.decode_batch)
    return ds.map_batches(
        ClipDecoder,
        fn_constructor_kwargs={
            "config": config,
            "train": train,
            "class_names": class_names,
            "seed": seed,
            "split": split,
            "bad_log": _bad_video_log(),
        },
        batch_size=config.decode_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.decode_actors),
        num_cpus=config.cpus_per_actor,
    )


class ClipCollate(NumpyBatchCollateFn):
    """Numpy batch -> ``{"clips", "labels", "video_id", "view"}`` (no copies of the clips)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        with warnings.catch_warnings():  # object-store arrays are read-only; never written
            warnings.simplefilter("ignore")
            return {
                "clips": torch.as_tensor(batch["clip"]),
                "labels": torch.as_tensor(batch["label"], dtype=torch.int64),
                "video_id": [str(v) for v in batch["video_id"]],
                "view": torch.as_tensor(batch["view"], dtype=torch.int64),
            }


def iter_clip_batches(
    ds: ray.data.Dataset | Any,
    batch_size: int,
    *,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[dict[str, Any]]:
    """Batches ``{"clips": (B, T, H, W, 3) uint8, "labels": (B,) int64, "video_id": [str],
    "view": (B,) int64}`` from a clip dataset (or a Ray Train dataset shard)."""
    import torch

    batches = ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=ClipCollate(),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
    )
    device = torch.device(device)
    for batch in batches:
        if device.type != "cpu":
            for key in ("clips", "labels", "view"):
                batch[key] = batch[key].to(device, non_blocking=True)
        yield batch


def to_model_input(
    clips: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``uint8 (B, T, H, W, 3)`` -> normalised ``float32 (B, 3, T, H, W)``: ``(x / 255 - m) / s``.

    Runs wherever ``clips`` lives (on the training device: 4x less host-to-device traffic).
    """
    import torch

    if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
        raise ValueError(
            f"clips must be uint8 (B, T, H, W, 3), got {clips.dtype} {tuple(clips.shape)}"
        )
    m = torch.as_tensor(mean, dtype=torch.float32, device=clips.device).view(1, 3, 1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=clips.device).view(1, 3, 1, 1, 1)
    b, t, h, w, _ = clips.shape
    x = torch.empty((b, 3, t, h, w), dtype=torch.float32, device=clips.device)
    x.copy_(clips.permute(0, 4, 1, 2, 3))  # one pass: layout change and uint8 -> float
    return x.div_(255.0).sub_(m).div_(s)
