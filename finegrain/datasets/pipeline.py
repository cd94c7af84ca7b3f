"""Ray Data pipeline: Parquet shards -> sampled, decoded, transformed ``uint8`` clips.

A *plan* (:func:`plan_reads`) lists, in the order they are consumed, the shard files to read for
each epoch and which of their rows a rank takes; a read task per planned file streams the file's
``video``, ``video_id``, ``label`` and ``evidence`` columns and keeps the rank's rows
(:func:`read_planned`); ``map_batches(ClipDecoder)`` in a pool of Ray actors samples frame
indices (:mod:`.sampling`), decodes only those frames from the in-memory bytes with decord and
applies the spatial transforms (:mod:`.transforms`) -> rows ``clip`` ``(T, S, S, 3)`` uint8,
``label``, ``video_id``, ``view``, ``epoch`` and the clip's ground truth ``gt_part``,
``gt_object`` ``(T, 4)`` float32 (boxes in the clip's pixels, NaN: none) and ``gt_visible``
``(T,)`` bool: the synthetic benchmark's per-frame boxes carried through the same frame
sampling, resize, crop and flip (NaN / False for a dataset without them). Consumers iterate
with :func:`iter_clip_batches` (one pass) or :class:`EpochBatches` (a whole multi-epoch run)
and turn clips into normalised float model input on the training device with
:func:`to_model_input`; :class:`ClipCollate` hands the ground truth on as ``batch["evidence"]``.

One execution per run. Ray Data cannot keep an actor pool alive from one execution of a dataset
to the next (ray-project/ray#46479), and starting the decode actors costs seconds every epoch.
So a training run builds *one* dataset whose plan covers all its remaining epochs; each row
carries its epoch, and :class:`EpochBatches` hands the loop one epoch at a time (batches never
straddle epochs). A resumed run plans from the checkpoint's epoch on.

Order and sampling, for a seed: epoch ``e`` reads the split's shard files in the order
``FileShuffleConfig(seed)`` gives on execution ``e`` (``default_rng(hash((seed, e)) % 2**32)``,
exactly the order Ray's own file shuffle gave when every epoch was a new execution), each file's
rows in file order; a training clip of video ``v`` in epoch ``e`` is drawn from
``default_rng([seed, e, crc32(v)])``, whatever actor decodes it. With one rank (one training
worker) each epoch's sequence of clips is therefore what the per-epoch executions gave.

Ranks: rank ``r`` of ``W`` takes the positions ``r, r + W, ...`` of its epoch's sequence (the
``DistributedSampler`` rule): for training the sequence is first padded to a multiple of ``W``
with its own first rows, so every rank takes the same number of clips and no row is dropped;
for evaluation nothing is padded, so the ranks' rows partition the split exactly. Each rank
reads every shard's bytes and decodes only its own rows (reading is a few percent of decoding).

Views: training emits one view per video (a random clip, random crop, optional flip).
Evaluation emits ``n_clips x n_crops`` views per video, ``view = clip * n_crops + crop``, all
tagged with the video's ``video_id`` so that their predictions can be averaged.

Bad videos (undecodable bytes, too few frames, a label outside the classes) are logged with their
``video_id`` and skipped; every skip is also recorded by a :class:`BadVideoLog` actor that the
run's driver owns and passes in, so the run reports how many and which, and a long run never
fails on them (not even if that actor is gone: then the skip is only logged). Ray start-up is
the caller's job (``ray.init``).

Start-up: the module a decode actor imports (this one) imports no torch at the top: torch is
imported by the consumer-side functions and, in an actor, only if a clip needs resizing
(``transforms.resize_short_side``).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import decord
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from finegrain.datasets.layout import CLASSES_FILE, shard_files
from finegrain.datasets.sampling import dense_indices, tsn_indices
from finegrain.datasets.transforms import (
    clip_views,
    flip_swap_map,
    unflippable_classes,
    view_geometry,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadVideoLog",
    "ClipCollate",
    "ClipConfig",
    "ClipDecoder",
    "EVAL",
    "EpochBatches",
    "GT_KEYS",
    "build_clip_dataset",
    "build_run_dataset",
    "empty_gt",
    "file_order",
    "iter_clip_batches",
    "new_bad_video_log",
    "plan_reads",
    "read_classes",
    "sample_views",
    "shard_files",
    "split_rows",
    "to_model_input",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_COLUMNS = ["video", "video_id", "label"]
_EVIDENCE = "evidence"  # optional shard column: the video's ground truth (JSON), or null
GT_KEYS = ("gt_part", "gt_object", "gt_visible")
EVAL = -1  # the stream of evaluation rows in a training run's dataset
# how long EpochBatches.close waits for a first block still being fetched by its start()
CLOSE_WAIT_S = 30.0


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
    actors reserving ``cpus_per_actor`` Ray CPUs each (Ray CPUs are scheduling units: an actor
    decodes on ``decode_threads`` threads whatever it reserves),
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
        _check_range("read_cpus", self.read_cpus, 0.05, 64.0, float)  # 0: unlimited tasks

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
# (file names: :mod:`.layout`; ``shard_files`` is its own, re-exported here)


def read_classes(shard_dir: str | Path) -> list[str]:
    """Class names by label index from ``shard_dir/classes.json`` (``{"0": name, ...}``).

    A value may also be a dict with a ``"name"`` entry (richer class records).
    """
    path = Path(shard_dir) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} (written next to the shards by build_shards)")
    raw = json.loads(path.read_text())
    names = {int(k): v["name"] if isinstance(v, dict) else v for k, v in raw.items()}
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: class indices must be 0..{len(names) - 1}, got {sorted(names)}")
    return [names[i] for i in range(len(names))]


def split_rows(shard_dir: str | Path, split: str) -> dict[str, int]:
    """``{shard file: number of rows}`` of ``split``, in sorted file order, from the Parquet
    footers alone (no video bytes are read)."""
    return {f: pq.ParquetFile(f).metadata.num_rows for f in shard_files(shard_dir, split)}


# --------------------------------------------------------------------------- the read plan


def file_order(files: Sequence[str], seed: int | None, epoch: int) -> list[str]:
    """The order in which epoch ``epoch`` reads ``files`` (``seed=None``: as given).

    Reproduces ``ray.data.FileShuffleConfig(seed)`` on execution ``epoch`` (its
    ``get_seed`` and ``_shuffle_file_metadata``), the order every epoch had when each epoch
    was a new execution of the dataset: runs keep their clips across this change.
    """
    files = list(files)
    if seed is None:
        return files
    rng = np.random.default_rng(hash((seed, epoch)) % (2**32))
    rng.shuffle(files)
    return files


def plan_reads(
    rows: dict[str, int],
    epochs: Sequence[int],
    *,
    seed: int | None,
    rank: int = 0,
    world: int = 1,
    pad: bool = True,
    streams: int = 1,
    chunk: int | None = None,
) -> list[dict[str, Any]]:
    """The read items of rank ``rank`` of ``world`` for ``epochs``, in consumption order.

    An item ``{"epoch", "stream", "path", "begin", "end", "start", "rank", "world"}`` reads
    rows ``[begin, end)`` of ``path``, whose first row sits at position ``start`` of the epoch's
    sequence; the rank keeps the positions ``p`` with ``p % world == rank``. ``pad``: the
    sequence is padded to a multiple of ``world`` with its own first rows (items starting at
    positions ``>= n``), so every rank gets ``ceil(n / world)`` rows per epoch (training);
    without it the ranks partition the split exactly (evaluation). ``chunk``: at most this many
    rows per item (a read task each: small blocks, which the decode actors share out and the
    training loop gets a batch at a time; default a whole file per item).

    ``streams > 1``: further independent samplers over the same split (stream ``s`` shuffles the
    files with the seed ``stream_seed(seed, s)``), their items interleaved with the main
    stream's (stream 0), so one execution feeds them all (DSTS's UDL draws its D_val batches
    from stream 1).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    items = []
    for epoch in epochs:
        per_stream = [
            _epoch_items(rows, epoch, stream_seed(seed, s), s, world, pad, chunk)
            for s in range(streams)
        ]
        for k in range(max(len(p) for p in per_stream)):
            items += [p[k] for p in per_stream if k < len(p)]
    for item in items:
        item.update(rank=rank, world=world)
    return items


def stream_seed(seed: int | None, stream: int) -> int | None:
    """The seed of stream ``stream``: ``seed`` itself for the main stream (0)."""
    if seed is None or stream == 0:
        return seed
    return zlib.crc32(f"{seed}/stream{stream}".encode())


def _epoch_items(rows, epoch, seed, stream, world, pad, chunk) -> list[dict[str, Any]]:
    order = file_order(sorted(rows), seed, epoch)
    items, position = [], 0

    def add(path: str, end: int) -> None:
        step = chunk or max(end, 1)
        for begin in range(0, end, step):
            items.append(
                {"epoch": epoch, "stream": stream, "path": path, "begin": begin,
                 "end": min(end, begin + step), "start": position + begin}
            )  # fmt: skip

    for path in order:
        if rows[path]:
            add(path, rows[path])
        position += rows[path]
    missing = (-position) % world if pad else 0
    for path in order:  # the padding: the sequence's first rows again
        if missing <= 0:
            break
        take = min(missing, rows[path])
        if take:
            add(path, take)
        position += take
        missing -= take
    return items


def planned_rows(rows: dict[str, int], world: int, rank: int, pad: bool) -> int:
    """How many rows rank ``rank`` takes per epoch under :func:`plan_reads`."""
    n = sum(rows.values())
    total = n + ((-n) % world if pad else 0)
    return len(range(rank, total, world))


def read_planned(batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
    """The ``map_batches`` read step: plan items -> the rank's rows of each, one block per item.

    Reads only the Parquet row groups that hold the item's rows (a shard's row groups are a
    few MB; a whole shard is never in memory) and keeps the rows at the rank's positions; a
    block holds rows of one epoch and one stream.
    """
    for k in range(len(batch["path"])):
        path, epoch, stream = str(batch["path"][k]), int(batch["epoch"][k]), int(batch["stream"][k])
        begin, end, start = int(batch["begin"][k]), int(batch["end"][k]), int(batch["start"][k])
        rank, world = int(batch["rank"][k]), int(batch["world"][k])
        first = begin + ((rank - start) % world)  # our first row in [begin, end)
        wanted = np.arange(first, end, world)
        if len(wanted) == 0:
            continue
        table = _read_rows(path, wanted)
        table = table.append_column("epoch", pa.array(np.full(len(wanted), epoch, np.int32)))
        yield table.append_column("stream", pa.array(np.full(len(wanted), stream, np.int8)))


def _read_rows(path: str, rows: np.ndarray) -> pa.Table:
    """Rows ``rows`` (sorted) of ``path``'s video, video_id, label and evidence columns (the
    last null where the shard has none), reading only the row groups that hold them."""
    shard = pq.ParquetFile(path)
    meta = shard.metadata
    bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    groups = [
        g for g in range(meta.num_row_groups) if bounds[g] <= rows[-1] and bounds[g + 1] > rows[0]
    ]
    has_evidence = _EVIDENCE in shard.schema_arrow.names
    table = shard.read_row_groups(groups, columns=_COLUMNS + [_EVIDENCE] * has_evidence)
    table = table.take(pa.array(rows - bounds[groups[0]]))
    if not has_evidence:  # shards of datasets without ground truth (or built before it)
        table = table.append_column(_EVIDENCE, pa.nulls(len(rows), pa.string()))
    return table


# --------------------------------------------------------------------------- bad videos


class BadVideoLog:
    """Counts skipped videos per split; keeps each one's first error (a few bytes per video).

    One per run, created by the process that drives the run (:func:`new_bad_video_log`), which
    holds the handle for the run's whole life and hands it to the decoders: the actor lives
    exactly as long as its run, whoever else is alive.
    """

    def __init__(self) -> None:
        self._first_error: dict[tuple[str, str], str] = {}
        self._events = 0

    def add(self, split: str, video_id: str, error: str) -> None:
        self._events += 1
        self._first_error.setdefault((split, video_id), error)

    def summary(self, split: str | None = None, first: int = 20) -> dict:
        """``{"count", "events", "first": [{split, video_id, error}]}``: ``count`` counts
        distinct videos (a bad video re-read every epoch counts once), ``events`` every skip."""
        bad = [(s, v, e) for (s, v), e in self._first_error.items() if split in (None, s)]
        return {
            "count": len(bad),
            "events": self._events,
            "first": [{"split": s, "video_id": v, "error": e} for s, v, e in bad[:first]],
        }


def new_bad_video_log() -> Any:
    """A :class:`BadVideoLog` actor owned by the caller (keep the handle as long as the run)."""
    return ray.remote(num_cpus=0, max_restarts=0)(BadVideoLog).remote()


# --------------------------------------------------------------------------- decoding


class ClipDecoder:
    """The ``map_batches`` callable: encoded videos -> ``uint8`` clip views (one Ray actor).

    ``decode_row`` handles one video and is also what the plain DataLoader baseline in
    ``bench/data_throughput.py`` calls, so both paths do identical work. A training dataset
    may also carry evaluation rows (``stream == EVAL``): those are decoded with ``eval_config``
    (every view, deterministic), the others with ``config``.
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
        eval_config: ClipConfig | None = None,
        eval_split: str = "",
    ) -> None:
        self.config, self.train, self.split, self.bad_log = config, train, split, bad_log
        self.eval_config, self.eval_split = eval_config or config, eval_split or split
        self.num_classes = len(class_names) if class_names is not None else None
        self.swap = flip_swap_map(class_names) if class_names is not None else {}
        self.no_flip = unflippable_classes(class_names) if class_names is not None else frozenset()
        self.seed = seed
        self.rng = np.random.default_rng()  # used only when seed is None

    def mode(self, stream: int) -> tuple[ClipConfig, bool, str]:
        """(config, train, split) of the rows of ``stream``."""
        if stream == EVAL:
            return self.eval_config, False, self.eval_split
        return self.config, self.train, self.split

    def row_rng(self, video_id: str, epoch: int = 0, stream: int = 0) -> np.random.Generator:
        """``default_rng([seed, epoch, crc32(video_id)])`` (``+ [stream]`` for a further
        stream): the same draw for a video in an epoch whatever actor decodes it (fresh entropy
        when ``seed`` is None)."""
        if self.seed is None:
            return self.rng
        key = [self.seed, epoch, zlib.crc32(video_id.encode())]
        return np.random.default_rng(key + [stream] if stream else key)

    def decode_row(
        self,
        video: bytes,
        label: int,
        video_id: str = "",
        out: np.ndarray | None = None,
        epoch: int = 0,
        stream: int = 0,
        *,
        evidence: str | dict | None = None,
        gt: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One video -> (clips ``(V, T, S, S, 3)`` uint8, labels ``(V,)`` int64); raises if bad.

        ``out``: where to write the clips (a slice of the batch), else a new array. Each frame is
        decoded once even if eval clips overlap, resized once, cropped/flipped as views, and
        copied once into ``out``.

        ``gt``: ``{"gt_part": (V, T, 4) float32, "gt_object": (V, T, 4) float32,
        "gt_visible": (V, T) bool}`` arrays (e.g. :func:`empty_gt`) that receive the video's
        ground truth ``evidence`` (its ``evidence.json`` entry, JSON text or parsed; None: no
        boxes) at each view's sampled frames, carried through the view's resize, crop and flip
        (:meth:`.transforms.ViewGeometry.transform_boxes`): boxes in the output clip's pixels,
        NaN where there is none; visible where the entry says so and the part is in the view.
        """
        cfg, train, _ = self.mode(stream)
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} outside the {self.num_classes} classes")
        rng = self.row_rng(video_id, epoch, stream) if train else None
        reader = decord.VideoReader(io.BytesIO(video), num_threads=cfg.decode_threads)
        indices = sample_views(len(reader), cfg, train=train, rng=rng)
        wanted, where = np.unique(indices, return_inverse=True)
        frames = reader.get_batch(wanted.tolist()).asnumpy()
        geometry = view_geometry(
            *frames.shape[1:3],
            short_side=cfg.short_side,
            crop_size=cfg.crop_size,
            train=train,
            n_crops=cfg.n_crops,
            flip=cfg.flip and train and label not in self.no_flip,
            rng=rng,
        )
        views = clip_views(
            frames, short_side=cfg.short_side, crop_size=cfg.crop_size, train=train,
            geometry=geometry,
        )  # fmt: skip
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
        if gt is not None:
            _view_evidence(evidence, len(reader), frames.shape[1:3], indices, geometry, gt)
        return out, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["video_id"])
        epochs = batch.get("epoch", np.zeros(rows, np.int32))
        streams = batch.get("stream", np.zeros(rows, np.int8))
        views = [self.mode(int(s))[0].views(self.mode(int(s))[1]) for s in streams]
        cfg = self.config
        total = sum(views)
        clips = np.empty((total, cfg.num_frames, cfg.crop_size, cfg.crop_size, 3), np.uint8)
        labels = np.empty(total, np.int64)
        gt = empty_gt(total, cfg.num_frames)
        evidence = batch.get(_EVIDENCE, [None] * rows)
        kept: list[int] = []
        n = 0
        for i, (video, label, video_id) in enumerate(
            zip(batch["video"], batch["label"], batch["video_id"])
        ):
            video_id, v = str(video_id), views[i]
            try:
                _, labels[n : n + v] = self.decode_row(
                    video,
                    int(label),
                    video_id,
                    out=clips[n : n + v],
                    epoch=int(epochs[i]),
                    stream=int(streams[i]),
                    evidence=evidence[i],
                    gt={k: a[n : n + v] for k, a in gt.items()},
                )
            except Exception as err:  # any undecodable video: skip, log, count
                self._report(video_id, err, self.mode(int(streams[i]))[2])
                continue
            kept.append(i)
            n += v
        rows_kept = np.repeat(np.asarray(kept, np.int64), [views[i] for i in kept])
        return {
            "clip": clips[:n],
            "label": labels[:n],
            "video_id": np.asarray(batch["video_id"], dtype=str)[rows_kept],
            "view": np.concatenate([np.arange(views[i], dtype=np.int64) for i in kept])
            if kept
            else np.zeros(0, np.int64),
            "epoch": np.asarray(epochs, np.int32)[rows_kept],
            "stream": np.asarray(streams, np.int8)[rows_kept],
            **{k: a[:n] for k, a in gt.items()},
        }

    def _report(self, video_id: str, err: Exception, split: str | None = None) -> None:
        split = self.split if split is None else split
        message = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        )
        log.warning("skipping bad video %s (split %r): %s", video_id, split, message[:300])
        if self.bad_log is not None:
            try:
                # waited for (bad videos are rare) so a batch's skips are counted before it is seen
                ray.get(self.bad_log.add.remote(split, video_id, message[:300]), timeout=30)
            except Exception:  # the count is best effort; decoding goes on regardless
                log.exception("could not record bad video %s", video_id)


def empty_gt(views: int, num_frames: int) -> dict[str, np.ndarray]:
    """Ground-truth arrays of ``views`` clips of ``num_frames`` frames with nothing in them:
    ``gt_part``, ``gt_object`` NaN ``(views, num_frames, 4)`` float32, ``gt_visible`` False
    ``(views, num_frames)``."""
    return {
        "gt_part": np.full((views, num_frames, 4), np.nan, np.float32),
        "gt_object": np.full((views, num_frames, 4), np.nan, np.float32),
        "gt_visible": np.zeros((views, num_frames), bool),
    }


def _frame_boxes(boxes: Any, num_frames: int, scale: tuple[float, float]) -> np.ndarray:
    """A list of per-frame ``[x0, y0, x1, y1]`` or None -> ``(num_frames, 4)`` float64 in the
    decoded frames' pixels (``scale`` = (x, y) factors), NaN where none or past its end."""
    out = np.full((num_frames, 4), np.nan)
    rows = [(t, b) for t, b in enumerate((boxes or [])[:num_frames]) if b is not None]
    if rows:
        out[[t for t, _ in rows]] = [b for _, b in rows]
    return out * (scale[0], scale[1], scale[0], scale[1])


def _view_evidence(
    evidence: str | dict | None,
    num_frames: int,
    frame_size: tuple[int, int],
    indices: np.ndarray,
    geometry: list,
    gt: dict[str, np.ndarray],
) -> None:
    """Fill ``gt`` (a video's slots, view = clip * crops + crop) from its ``evidence`` at the
    sampled ``indices`` ``(clips, T)``, through each view's geometry; no evidence: NaN, False.
    Malformed evidence is logged and counts as none: it never costs the video."""
    gt["gt_part"][:], gt["gt_object"][:], gt["gt_visible"][:] = np.nan, np.nan, False
    if evidence is None:
        return
    try:
        if isinstance(evidence, bytes | str):
            evidence = json.loads(evidence)
        height, width = frame_size  # of the decoded frames; other box frames are scaled to it
        scale = (width / evidence.get("width", width), height / evidence.get("height", height))
        part = _frame_boxes(evidence.get("part"), num_frames, scale)[indices]  # (clips, T, 4)
        obj = _frame_boxes(evidence.get("object"), num_frames, scale)[indices]
        visible = np.zeros(num_frames, bool)
        flags = np.asarray(evidence.get("visible") or [], bool)[:num_frames]
        visible[: len(flags)] = flags
        visible = visible[indices]
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as err:
        log.warning("ignoring malformed evidence (%s: %s)", type(err).__name__, err)
        return
    boxes, crops = np.stack([part, obj]), len(geometry)
    for c, g in enumerate(geometry):  # views c, c + crops, ...: every clip of crop c
        view_part, gt["gt_object"][c::crops] = g.transform_boxes(boxes)
        gt["gt_part"][c::crops] = view_part
        gt["gt_visible"][c::crops] = visible & ~np.isnan(view_part[..., 0])


# --------------------------------------------------------------------------- dataset


def build_clip_dataset(
    shard_dir: str | Path,
    split: str,
    config: ClipConfig,
    train: bool,
    seed: int | None = 0,
    *,
    epochs: Sequence[int] = (0,),
    rank: int = 0,
    world: int = 1,
    streams: int = 1,
    bad_log: Any = None,
    stream: int = 0,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of clip views of ``split`` (needs ``ray.init`` first).

    ``epochs``: the epochs its one execution covers, in order (training reads the files in each
    epoch's shuffled order and pads the sequence to a multiple of ``world``; evaluation reads
    them in sorted order, unpadded). ``rank`` / ``world``: this rank's share (see the module
    docstring). ``streams``: independent training samplers in the one execution (see
    :func:`plan_reads`). ``bad_log``: a :class:`BadVideoLog` handle that counts skipped videos.
    ``stream``: the stream an evaluation dataset's rows carry (:data:`EVAL` for
    :meth:`EpochBatches.evaluation`).
    """
    rows = split_rows(shard_dir, split)
    items = plan_reads(
        rows,
        list(epochs),
        seed=seed if train else None,
        rank=rank,
        world=world,
        pad=train,
        streams=streams if train else 1,
        chunk=config.decode_batch * world,
    )
    if not train:
        items = [{**item, "stream": stream} for item in items]
    decoder = {"config": config, "train": train, "seed": seed, "split": split, "bad_log": bad_log}
    return _clip_dataset(shard_dir, items, config, decoder, f"split {split!r}, rank {rank}/{world}")


def build_run_dataset(
    shard_dir: str | Path,
    train_config: ClipConfig,
    eval_config: ClipConfig,
    *,
    epochs: Sequence[int],
    seed: int | None,
    rank: int = 0,
    world: int = 1,
    streams: int = 1,
    evaluate: Literal["once", "every_epoch"] = "once",
    eval_split: str = "val",
    bad_log: Any = None,
) -> ray.data.Dataset:
    """Everything one rank of a training run reads, as one dataset (one execution, one actor
    pool): for each of ``epochs`` its training clips (``streams`` samplers), then its exact
    share of the ``eval_split`` views (stream :data:`EVAL`) — after the first epoch only
    (``"once"``: the run keeps them decoded) or after every epoch (``"every_epoch"``). Placed
    after an epoch's training clips, they are decoded while that epoch trains."""
    train_rows, eval_rows = split_rows(shard_dir, "train"), split_rows(shard_dir, eval_split)

    chunk = train_config.decode_batch * world

    def evaluation(epoch: int) -> list[dict[str, Any]]:
        items = plan_reads(
            eval_rows, [epoch], seed=None, rank=rank, world=world, pad=False, chunk=chunk
        )
        return [{**item, "stream": EVAL} for item in items]

    items = []
    for k, epoch in enumerate(epochs):
        items += plan_reads(
            train_rows, [epoch], seed=seed, rank=rank, world=world, pad=True, streams=streams,
            chunk=chunk,
        )  # fmt: skip
        if evaluate == "every_epoch" or k == 0:
            items += evaluation(epoch)
    decoder = {
        "config": train_config,
        "train": True,
        "seed": seed,
        "split": "train",
        "bad_log": bad_log,
        "eval_config": eval_config,
        "eval_split": eval_split,
    }
    return _clip_dataset(shard_dir, items, train_config, decoder, f"rank {rank}/{world}")


def _clip_dataset(shard_dir, items, config: ClipConfig, decoder: dict, what: str):
    if not items:
        raise ValueError(f"{shard_dir}: nothing to read for {what}")
    decoder = {**decoder, "class_names": read_classes(shard_dir)}
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # read tasks: one plan item (a chunk of a file) each, one small block each, so a shard's
    # rows spread over the decode actors and the loop gets its first batch early
    ds = ds.map_batches(read_planned, batch_size=1, batch_format="numpy", num_cpus=config.read_cpus)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates remote arguments passed as extra keywords (removal in 2.64) but
        # names no parameter for max_restarts; its actor pool reads it from there (see
        # ActorPoolMapOperator._apply_default_remote_args). Pinned to 2.60: nothing breaks.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
        return ds.map_batches(
            ClipDecoder,
            fn_constructor_kwargs=decoder,
            batch_size=config.decode_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=config.decode_actors),
            num_cpus=config.cpus_per_actor,
            # Ray Data keeps an actor's constructor arguments in the object store, where a
            # restart cannot rely on finding them (ray-project/ray#53727: "the actor restart
            # will fail", logged for every restartable actor). A restart that may fail is no
            # safety net: a dead decode actor fails the data stream, and the run restarts from
            # its checkpoint (run.max_failures).
            max_restarts=0,
        )


# --------------------------------------------------------------------------- consuming


class ClipCollate:
    """Numpy batch -> ``{"clips", "labels", "video_id", "view", "epoch", "evidence"}`` (no
    copies of the clips: the tensors view the arrays).

    ``evidence``: the clips' ground truth, ``{"part": (B, T, 4) float32, "object": (B, T, 4)
    float32, "visible": (B, T) bool}``, boxes ``(x0, y0, x1, y1)`` in the pixels of the
    ``crop_size`` x ``crop_size`` clip frames, NaN where there is none (every clip of a dataset
    without ground truth: NaN boxes, nothing visible)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        with warnings.catch_warnings():  # object-store arrays are read-only; never written
            warnings.simplefilter("ignore")
            out = {
                "clips": torch.as_tensor(batch["clip"]),
                "labels": torch.as_tensor(batch["label"], dtype=torch.int64),
                "video_id": [str(v) for v in batch["video_id"]],
                "view": torch.as_tensor(batch["view"], dtype=torch.int64),
            }
            gt = batch if all(k in batch for k in GT_KEYS) else empty_gt(*batch["clip"].shape[:2])
            out["evidence"] = {
                "part": torch.as_tensor(gt["gt_part"], dtype=torch.float32),
                "object": torch.as_tensor(gt["gt_object"], dtype=torch.float32),
                "visible": torch.as_tensor(gt["gt_visible"], dtype=torch.bool),
            }
        if "epoch" in batch and len(batch["epoch"]):
            out["epoch"] = int(batch["epoch"][0])
        return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _runs(block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """``block`` cut into runs of rows of one (epoch, stream) each (a decode batch may join
    the end of one planned file to the start of the next)."""
    n = len(block["label"])
    if n == 0:
        return
    if "epoch" not in block:
        yield block
        return
    key = block["epoch"].astype(np.int64) * 128 + block.get("stream", 0)
    cuts = np.flatnonzero(np.diff(key)) + 1
    if len(cuts) == 0:
        yield block
        return
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        yield {k: v[lo:hi] for k, v in block.items()}


class _Batcher:
    """Runs of rows -> batches of ``batch_size`` (the last of an epoch may be short); a run that
    is exactly one batch passes through without a copy."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size, self.parts, self.held, self.epoch = batch_size, [], 0, None

    def add(self, run: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        epoch = int(run["epoch"][0]) if "epoch" in run else None
        if self.parts and epoch != self.epoch:
            yield from self.flush()
        self.epoch = epoch
        n, start = len(run["label"]), 0
        while start < n:
            take = min(self.batch_size - self.held, n - start)
            whole = start == 0 and take == n
            self.parts.append(
                run if whole else {k: v[start : start + take] for k, v in run.items()}
            )
            self.held += take
            start += take
            if self.held == self.batch_size:
                yield from self.flush()

    def flush(self) -> Iterator[dict[str, np.ndarray]]:
        if self.parts:
            yield _concat(self.parts)
        self.parts, self.held = [], 0


def iter_clip_batches(
    ds: ray.data.Dataset | Any,
    batch_size: int,
    *,
    prefetch_batches: int = 2,
    device: str | torch.device = "cpu",
) -> Iterator[dict[str, Any]]:
    """Batches ``{"clips": (B, T, H, W, 3) uint8, "labels": (B,) int64, "video_id": [str],
    "view": (B,) int64, "evidence": {...}}`` (:class:`ClipCollate`) from one pass over a clip
    dataset (the last batch may be short). ``device``: where clips, labels and views go; the
    evidence stays on the CPU."""
    import torch

    collate, batcher = ClipCollate(), _Batcher(batch_size)
    device = torch.device(device)

    def batches():
        for block in ds.iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches
        ):
            for run in _runs(block):
                yield from batcher.add(run)
        yield from batcher.flush()

    for batch in batches():
        batch = collate(batch)
        if device.type != "cpu":  # page-locked, so that the copy overlaps the device's work
            for key in ("clips", "labels", "view"):
                batch[key] = batch[key].pin_memory().to(device, non_blocking=True)
        yield batch


def _phase(stream: int) -> int:
    """Where a stream's rows sit within an epoch of the plan: training (all its samplers,
    interleaved) first, then the evaluation views."""
    return 1 if stream == EVAL else 0


class EpochBatches:
    """One rank's batches of a run's dataset (:func:`build_run_dataset`), one epoch at a time.

    ``epoch(e)`` yields the main stream's batches of epoch ``e`` (as :func:`iter_clip_batches`)
    and ends where that stream's epoch ends; ``extra(e, s)`` returns the next batch of stream
    ``s`` in epoch ``e`` (None when it has no more); ``evaluation(e)`` yields the evaluation
    views planned for epoch ``e``. Batches never straddle epochs; rows of an epoch the caller
    left before its end are skipped (``dropped`` counts them). The whole run is one iteration
    of the dataset, so the decode actors start once.

    Where a part of the plan ends: blocks arrive in plan order (``preserve_order``), and the
    plan is epoch by epoch, training rows then evaluation rows. So a block of (epoch, phase)
    ends every part before it: its partial batches are handed out, and a caller waiting for
    more of it gets None instead of reading ahead through the rest of the run.
    """

    def __init__(
        self,
        ds: ray.data.Dataset,
        batch_size: int,
        streams: int = 1,
        eval_batch_size: int | None = None,
        prefetch_batches: int = 2,
    ) -> None:
        from collections import deque

        self._blocks = iter(
            ds.iter_batches(
                batch_size=None, batch_format="numpy", prefetch_batches=prefetch_batches
            )
        )
        sizes = {s: batch_size for s in range(streams)} | {EVAL: eval_batch_size or batch_size}
        self._batchers = {s: _Batcher(size) for s, size in sizes.items()}
        self._ready = {s: deque() for s in sizes}
        self._collate = ClipCollate()
        self._frontier: tuple[int, int] = (-1, 0)  # the latest (epoch, phase) seen
        self._exhausted = False
        self._first = None  # the first block, being fetched by start()'s thread
        self.dropped = 0

    def start(self) -> None:
        """Start the execution now, in a thread that fetches the first block: its decode actors
        and read tasks start while the caller sets up (the model, the optimizers, the run's
        record), not after. Later blocks are fetched by the caller, as without it."""
        from concurrent.futures import Future

        first: Future = Future()

        def fetch() -> None:
            try:
                first.set_result(next(self._blocks, None))
            except BaseException as e:  # raised where the caller asks for the block
                first.set_exception(e)

        # a daemon thread, not a ThreadPoolExecutor (whose threads are joined at exit): a fetch
        # still stuck after close() gave up on it must not hold the worker's process open
        threading.Thread(target=fetch, name="first-block", daemon=True).start()
        self._first = first

    def _next_block(self) -> dict[str, np.ndarray] | None:
        if self._first is not None:
            first, self._first = self._first, None
            return first.result()
        return next(self._blocks, None)

    def _pull(self) -> None:
        block = self._next_block()
        if block is None:
            self._exhausted = True
            for s, batcher in self._batchers.items():
                self._ready[s].extend(batcher.flush())
            return
        for run in _runs(block):
            s = int(run["stream"][0]) if "stream" in run else 0
            here = (int(run["epoch"][0]), _phase(s)) if "epoch" in run else (0, 0)
            if here > self._frontier:
                self._frontier = here
                for other, batcher in self._batchers.items():  # parts that ended before it
                    if batcher.parts and (batcher.epoch, _phase(other)) < here:
                        self._ready[other].extend(batcher.flush())
            self._ready[s].extend(self._batchers[s].add(run))

    def _take(self, stream: int, epoch: int) -> dict[str, np.ndarray] | None:
        ready = self._ready[stream]
        while True:
            while ready and int(ready[0]["epoch"][0]) < epoch:
                self.dropped += len(ready.popleft()["label"])
            if ready:
                return ready.popleft() if int(ready[0]["epoch"][0]) == epoch else None
            if self._exhausted or self._frontier > (epoch, _phase(stream)):
                return None  # that part of the plan is over
            self._pull()

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        while (batch := self._take(0, epoch)) is not None:
            yield self._collate(batch)

    def extra(self, epoch: int, stream: int = 1) -> dict[str, Any] | None:
        batch = self._take(stream, epoch)
        return None if batch is None else self._collate(batch)

    def evaluation(self, epoch: int) -> Iterator[dict[str, Any]]:
        while (batch := self._take(EVAL, epoch)) is not None:
            yield self._collate(batch)

    def close(self) -> None:
        """End the execution now (its decode actors, and its share of the cluster at Ray
        Data's job-wide resource coordinator, which a run that ends before the iterator is
        exhausted would otherwise hold until the request expires and starve the job's next
        run's reads)."""
        if self._first is not None:  # the generator runs in start()'s thread until its first
            # block: closed only after it (a generator cannot be closed while it runs)
            first, self._first = self._first, None
            try:
                first.result(timeout=CLOSE_WAIT_S)
            except Exception:  # its error is the run's only when the run reads the block
                pass
            if not first.done():
                self._exhausted = True
                return  # the execution ends with this worker's process
        close = getattr(self._blocks, "close", None)
        if close is not None:
            close()
        self._exhausted = True


@functools.cache
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """``mean`` and ``std`` as ``(1, 3, 1, 1, 1)`` float32 tensors on ``device``, made once per
    process: a tensor made from a Python list on a GPU is a blocking copy, which waits for every
    kernel queued before it (one per step: the host could not queue a step ahead)."""
    import torch

    def stat(values: tuple) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)

    return stat(mean), stat(std)


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
    m, s = _channel_stats(tuple(mean), tuple(std), clips.device)
    b, t, h, w, _ = clips.shape
    x = torch.empty((b, 3, t, h, w), dtype=torch.float32, device=clips.device)
    x.copy_(clips.permute(0, 4, 1, 2, 3))  # one pass: layout change and uint8 -> float
    return x.div_(255.0).sub_(m).div_(s)
