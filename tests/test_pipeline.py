"""Ray Data clip pipeline: decoder unit behaviour, shard -> clip round trips, bad videos skipped."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from finegrain.datasets.pipeline import (
    ClipConfig,
    ClipDecoder,
    EpochBatches,
    build_clip_dataset,
    file_order,
    iter_clip_batches,
    new_bad_video_log,
    plan_reads,
    planned_rows,
    read_classes,
    shard_files,
)

CLASSES = [
    "Moving something from left to right",
    "Moving something from right to left",
    "Holding something",
]
SHARD_SCHEMA = pa.schema(
    [
        ("video", pa.binary()),
        ("video_id", pa.string()),
        ("label", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
CFG = ClipConfig(num_frames=4, short_side=32, crop_size=24, decode_actors=1, decode_batch=4)


def _row(video_id: str, data: bytes, label: int, num_frames: int = 16) -> dict:
    return dict(
        video=data,
        video_id=video_id,
        label=label,
        num_frames=num_frames,
        fps=12.0,
        height=32,
        width=32,
    )


def _write_shards(root: Path, shards: dict[str, list[dict]]) -> Path:
    """``{"train-00000": rows, ...}`` -> root/shards/*.parquet and root/classes.json."""
    (root / "shards").mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CLASSES)}))
    for name, rows in shards.items():
        pq.write_table(
            pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), root / "shards" / f"{name}.parquet"
        )
    return root


@pytest.fixture
def videos(make_video: Callable[..., Path]) -> dict[str, tuple[bytes, int]]:
    """Six good tiny videos of varied length {video_id: (bytes, label)}."""
    return {
        f"v{i}": (make_video(f"v{i}.mp4", num_frames=10 + 3 * i, seed=i).read_bytes(), i % 3)
        for i in range(6)
    }


# ---------------------------------------------------------------- the decoder alone (no Ray)


def test_decoder_eval_views_and_shapes(videos) -> None:
    cfg = ClipConfig(num_frames=4, short_side=32, crop_size=24, n_clips=2, n_crops=3)
    decoder = ClipDecoder(cfg, train=False, class_names=CLASSES)
    clips, labels = decoder.decode_row(*videos["v1"], "v1")
    assert clips.shape == (6, 4, 24, 24, 3) and clips.dtype == np.uint8
    assert labels.tolist() == [1] * 6
    again, _ = decoder.decode_row(*videos["v1"], "v1")
    np.testing.assert_array_equal(clips, again)  # eval is deterministic


def test_decoder_train_flip_swaps_label_and_is_seeded(videos) -> None:
    cfg = ClipConfig(num_frames=4, short_side=32, crop_size=24, flip=True)
    data, _ = videos["v0"]
    seen = defaultdict(set)
    for seed in range(12):
        decoder = ClipDecoder(cfg, train=True, class_names=CLASSES, seed=seed)
        for label in range(3):
            seen[label].add(int(decoder.decode_row(data, label, "v0")[1][0]))
    assert seen == {0: {0, 1}, 1: {0, 1}, 2: {2}}  # left/right swap; others keep their label
    a = ClipDecoder(cfg, train=True, class_names=CLASSES, seed=3).decode_row(data, 0, "v0")
    b = ClipDecoder(cfg, train=True, class_names=CLASSES, seed=3).decode_row(data, 0, "v0")
    np.testing.assert_array_equal(a[0], b[0])


def test_decoder_batch_skips_and_names_bad_videos(videos, caplog) -> None:
    good = videos["v2"][0]
    batch = {
        "video": np.array(
            [good, b"\x00" * 500, b"", good[: len(good) // 3], good, good], dtype=object
        ),
        "video_id": np.array(
            ["ok1", "garbage", "empty", "truncated", "badlabel", "ok2"], dtype=object
        ),
        "label": np.array([2, 0, 0, 1, 7, 0], dtype=np.int32),
    }
    with caplog.at_level(logging.WARNING, logger="finegrain.datasets.pipeline"):
        out = ClipDecoder(CFG, train=False, class_names=CLASSES)(batch)
    assert out["video_id"].tolist() == ["ok1", "ok2"]
    assert out["label"].tolist() == [2, 0] and out["view"].tolist() == [0, 0]
    assert out["clip"].shape == (2, 4, 24, 24, 3)
    for name in ("garbage", "empty", "truncated", "badlabel"):
        assert f"skipping bad video {name}" in caplog.text


def test_shard_files_and_classes(tmp_path: Path) -> None:
    root = _write_shards(tmp_path, {"train-00001": [], "train-00000": [], "val-00000": []})
    (root / "shards" / "train-00002.parquet.tmp").write_bytes(b"")  # unfinished: ignored
    assert [Path(f).name for f in shard_files(root, "train")] == [
        "train-00000.parquet",
        "train-00001.parquet",
    ]
    assert read_classes(root) == CLASSES
    with pytest.raises(FileNotFoundError, match="test-NNNNN.parquet"):
        shard_files(root, "test")


# ---------------------------------------------------------------- the read plan (no Ray)


def test_file_order_is_rays_own_file_shuffle_per_execution() -> None:
    """Each epoch reads the files in the order FileShuffleConfig(seed) gave execution e, when
    every epoch was a new execution: one execution per run changes no run's clips."""
    from ray.data.datasource.file_based_datasource import (
        FileShuffleConfig,
        _shuffle_file_metadata,
    )

    files = [f"/s/train-{k:05d}.parquet" for k in range(7)]
    for seed in (0, 3):
        for epoch in range(4):
            theirs, _ = _shuffle_file_metadata(files, files, FileShuffleConfig(seed), epoch)
            assert file_order(files, seed, epoch) == list(theirs)
    assert file_order(files, None, 2) == files  # evaluation: as given


@pytest.mark.parametrize("chunk", [None, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_ranks_share_every_row_once_and_train_pads_to_equal_counts(world, chunk) -> None:
    rows = {"/s/a.parquet": 5, "/s/b.parquet": 0, "/s/c.parquet": 6}  # 11 rows
    sequence = {}  # epoch → the rows of the epoch's sequence, as (path, row)
    for e in (0, 1):
        order = file_order(sorted(rows), 7, e)
        sequence[e] = [(p, r) for p in order for r in range(rows[p])]

    def taken(pad: bool, rank: int) -> dict[int, list]:
        out = {0: [], 1: []}
        for item in plan_reads(rows, [0, 1], seed=7 if pad else None, rank=rank, world=world,
                               pad=pad, chunk=chunk):  # fmt: skip
            assert item["rank"] == rank and item["world"] == world
            assert chunk is None or item["end"] - item["begin"] <= chunk
            for r in range(item["begin"], item["end"]):
                position = item["start"] + r - item["begin"]
                if position % world == rank:
                    out[item["epoch"]].append((position, (item["path"], r)))
        return out

    for e in (0, 1):
        train = [taken(True, r)[e] for r in range(world)]
        assert len({len(t) for t in train}) == 1  # every rank the same number of steps
        assert len(train[0]) == -(-11 // world) == planned_rows(rows, world, 0, True)
        positions = sorted(p for t in train for p, _ in t)
        assert positions == list(range(len(positions)))  # the padded sequence, each once
        for p, row in (x for t in train for x in t):  # padding repeats the sequence's start
            assert row == sequence[e][p % 11]
        evaluation = [taken(False, r)[0] for r in range(world)]
        assert sorted(row for t in evaluation for _, row in t) == sorted(
            (p, r) for p in rows for r in range(rows[p])
        )  # evaluation: an exact partition, nothing padded
    assert all(i["stream"] == 0 for i in plan_reads(rows, [0], seed=1))
    two = plan_reads(rows, [0], seed=1, streams=2)
    assert [i["stream"] for i in two] == [0, 1, 0, 1]  # interleaved item by item


# ---------------------------------------------------------------- through Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    yield
    if started:
        ray.shutdown()


def _epoch_clips(ds, epochs, streams=1, batch_size=3) -> dict:
    """{(epoch, stream): [(video_id, clip, label), ...]} in the order they came."""
    batches = EpochBatches(ds, batch_size, streams=streams)
    out = {}
    for e in epochs:
        for batch in batches.epoch(e):
            for clip, label, vid in zip(batch["clips"], batch["labels"], batch["video_id"]):
                out.setdefault((e, 0), []).append((vid, clip.numpy().copy(), int(label)))
            for s in range(1, streams):
                extra = batches.extra(e, s)
                for clip, vid in zip(extra["clips"], extra["video_id"]):
                    out.setdefault((e, s), []).append((vid, clip.numpy().copy(), None))
    return out


@pytest.mark.slow
def test_pipeline_train_round_trip_skips_corrupt(ray_cluster, videos, tmp_path: Path) -> None:
    rows = [_row(v, data, label) for v, (data, label) in videos.items()]
    rows.insert(2, _row("corrupt", b"\x13" * 3000, 0))
    rows.append(_row("empty", b"", 1))
    root = _write_shards(tmp_path, {"train-00000": rows[:4], "train-00001": rows[4:]})
    log = new_bad_video_log()
    ds = build_clip_dataset(root, "train", CFG, train=True, seed=0, epochs=[0, 1], bad_log=log)
    clips = _epoch_clips(ds, [0, 1])
    for e in (0, 1):
        assert sorted(v for v, _, _ in clips[(e, 0)]) == sorted(videos)  # bad ones skipped
        assert {v: lbl for v, _, lbl in clips[(e, 0)]} == {v: lbl for v, (_, lbl) in videos.items()}
        for _, clip, _ in clips[(e, 0)]:
            assert clip.shape == (4, 24, 24, 3) and clip.dtype == np.uint8
    first, second = (dict((v, c) for v, c, _ in clips[(e, 0)]) for e in (0, 1))
    assert any(not np.array_equal(first[v], second[v]) for v in videos)  # new epoch, new draws
    report = ray.get(log.summary.remote("train"))
    assert report["count"] == 2 and report["events"] == 4  # each counted once, seen per epoch
    assert {b["video_id"] for b in report["first"]} == {"corrupt", "empty"}


@pytest.mark.slow
def test_one_execution_gives_each_epoch_the_clips_of_its_own_execution(
    ray_cluster, videos, tmp_path: Path
) -> None:
    """Epoch e of the one-execution dataset == what a per-epoch execution gave: files in
    FileShuffleConfig(seed)'s order for execution e, rows in file order, each clip drawn from
    default_rng([seed, e, crc32(video_id)]). A resumed run (planned from epoch 2) sees the
    same epoch 2; rank r of W takes every W-th clip of that sequence."""
    items = list(videos.items())
    shards = {"train-00000": items[:2], "train-00001": items[2:4], "train-00002": items[4:]}
    root = _write_shards(
        tmp_path, {k: [_row(v, d, lbl) for v, (d, lbl) in rows] for k, rows in shards.items()}
    )
    decoder = ClipDecoder(CFG, train=True, class_names=CLASSES, seed=5)
    files = shard_files(root, "train")
    by_file = {f: shards[Path(f).stem] for f in files}

    def expected(epoch: int) -> list:
        return [
            (v, decoder.decode_row(d, lbl, v, epoch=epoch)[0][0])
            for f in file_order(files, 5, epoch)
            for v, (d, lbl) in by_file[f]
        ]

    run = _epoch_clips(build_clip_dataset(root, "train", CFG, True, 5, epochs=[0, 1, 2]), [0, 1, 2])
    resumed = _epoch_clips(build_clip_dataset(root, "train", CFG, True, 5, epochs=[2]), [2])
    for e in (0, 1, 2):
        want = expected(e)
        got = [(v, c) for v, c, _ in run[(e, 0)]]
        assert [v for v, _ in got] == [v for v, _ in want]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))
    assert [v for v, _, _ in resumed[(2, 0)]] == [v for v, _, _ in run[(2, 0)]]
    assert all(np.array_equal(a, b) for (_, a, _), (_, b, _) in zip(resumed[(2, 0)], run[(2, 0)]))
    rank1 = _epoch_clips(
        build_clip_dataset(root, "train", CFG, True, 5, epochs=[1], rank=1, world=2, streams=2),
        [1],
        streams=2,
    )
    assert [v for v, _, _ in rank1[(1, 0)]] == [v for v, _ in expected(1)][1::2]
    meta = [v for v, _, _ in rank1[(1, 1)]]  # an independent sampler, as many clips
    assert len(meta) == len(rank1[(1, 0)]) and set(meta) <= set(videos)


@pytest.mark.slow
def test_pipeline_eval_views_tagged_by_video(ray_cluster, videos, tmp_path: Path) -> None:
    rows = [_row(v, data, label) for v, (data, label) in list(videos.items())[:3]]
    root = _write_shards(tmp_path, {"val-00000": rows})
    cfg = ClipConfig(
        num_frames=4, short_side=32, crop_size=24, n_clips=2, n_crops=3, decode_actors=1
    )
    views = defaultdict(list)
    for batch in iter_clip_batches(build_clip_dataset(root, "val", cfg, train=False), batch_size=8):
        assert batch["clips"].shape[1:] == (4, 24, 24, 3)
        for label, vid, view in zip(batch["labels"], batch["video_id"], batch["view"]):
            views[vid].append((int(view), int(label)))
    assert sorted(views) == ["v0", "v1", "v2"]
    for vid, tagged in views.items():
        assert sorted(tagged) == [(k, videos[vid][1]) for k in range(6)]


class _Blocks:
    """A stand-in for a run's dataset: its blocks, and how many were read."""

    def __init__(self, blocks):
        self.blocks, self.read = blocks, 0

    def iter_batches(self, **_):
        for block in self.blocks:
            self.read += 1
            yield block


def _block(epoch: int, stream: int, rows: int, start: int = 0) -> dict[str, np.ndarray]:
    return {
        "clip": np.zeros((rows, 1, 2, 2, 3), np.uint8),
        "label": np.arange(start, start + rows) % 3,
        "video_id": np.array([f"v{start + i}" for i in range(rows)]),
        "view": np.zeros(rows, np.int64),
        "epoch": np.full(rows, epoch, np.int32),
        "stream": np.full(rows, stream, np.int8),
    }


def test_epoch_batches_end_each_part_where_the_plan_does_without_reading_ahead() -> None:
    """Blocks come in plan order (epoch by epoch: training rows of every sampler, then the
    evaluation views): a part ends at the first block of a later part, not at the run's end."""
    from finegrain.datasets.pipeline import EVAL

    plan = [
        _block(0, 0, 5), _block(0, 1, 5), _block(0, 0, 2, 5), _block(0, 1, 2, 5),
        _block(0, EVAL, 7),
        _block(1, 0, 5), _block(1, 1, 5), _block(1, 0, 2, 5), _block(1, 1, 2, 5),
        *[_block(e, 0, 7) for e in range(2, 40)],
    ]  # fmt: skip
    ds = _Blocks(plan)
    batches = EpochBatches(ds, batch_size=4, streams=2, eval_batch_size=3)
    sizes, extras = [], []
    for batch in batches.epoch(0):
        sizes.append(len(batch["labels"]))
        extras.append(len(batches.extra(0)["labels"]))
    assert sizes == extras == [4, 3]  # 7 rows of each sampler, the last batch short
    assert [len(b["labels"]) for b in batches.evaluation(0)] == [3, 3, 1]
    assert ds.read == 6  # stopped at the first block of epoch 1
    assert [len(b["labels"]) for b in batches.epoch(1)] == [4, 3]
    assert ds.read == 10  # epoch 1 ends at the first block of epoch 2
    assert list(batches.evaluation(1)) == []  # none planned for epoch 1 (kept from epoch 0)
    assert ds.read == 10


def test_the_data_demo_streams_every_clip_of_a_small_benchmark(tmp_path):
    """`python experiments/demo.py` (the README's data-layer demo) end to end, in its own
    process as a user runs it: it had imported a function that no longer existed for days."""
    import subprocess
    import sys

    from helpers import subprocess_env

    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "experiments/demo.py", "--out", str(tmp_path), "--videos-per-class",
            "4", "--workers", "1", "--batch-size", "8"]  # fmt: skip
    done = subprocess.run(
        argv, cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    out = done.stdout
    # 4 a class, a quarter held out: 3 train videos x 1 clip, 1 val video x 2 views, 12 classes
    assert "videos per split: {'train': 36, 'val': 12}" in out, out
    assert "quarantined while packing: 0" in out, out
    lines = {line.split()[0]: line for line in out.splitlines() if "clips/s" in line}
    assert lines["train"].split()[1] == "36" and lines["val"].split()[1] == "24", out
    assert all("12 classes" in line and line.endswith("bad videos: 0") for line in lines.values())
