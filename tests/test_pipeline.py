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
import torch

from finegrain.datasets.pipeline import (
    ClipConfig,
    ClipDecoder,
    bad_videos,
    build_clip_dataset,
    iter_clip_batches,
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


# ---------------------------------------------------------------- through Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_pipeline_train_round_trip_skips_corrupt(ray_cluster, videos, tmp_path: Path) -> None:
    rows = [_row(v, data, label) for v, (data, label) in videos.items()]
    rows.insert(2, _row("corrupt", b"\x13" * 3000, 0))
    rows.append(_row("empty", b"", 1))
    root = _write_shards(tmp_path, {"train-00000": rows[:4], "train-00001": rows[4:]})
    before = bad_videos("train", first=10_000)  # the log is cluster-wide: compare counts
    ds = build_clip_dataset(root, "train", CFG, train=True, seed=0)
    epochs = []
    for _ in range(2):
        seen = {}
        for batch in iter_clip_batches(ds, batch_size=3):
            assert batch["clips"].shape[1:] == (4, 24, 24, 3)
            assert batch["clips"].dtype == torch.uint8
            assert batch["labels"].dtype == batch["view"].dtype == torch.int64
            for clip, label, vid in zip(batch["clips"], batch["labels"], batch["video_id"]):
                seen[vid] = (clip.numpy().copy(), int(label))
        epochs.append(seen)
    assert sorted(epochs[0]) == sorted(videos)  # every good video once; bad ones skipped
    assert {v: lbl for v, (_, lbl) in epochs[0].items()} == {
        v: lbl for v, (_, lbl) in videos.items()
    }
    # a new epoch draws new frames/crops (Ray's execution index reseeds the decoders)
    assert any(not np.array_equal(epochs[0][v][0], epochs[1][v][0]) for v in videos)
    report = bad_videos("train", first=10_000)
    assert report["count"] - before["count"] == 2  # each counted once over the two epochs
    new = {b["video_id"] for b in report["first"]} - {b["video_id"] for b in before["first"]}
    assert new == {"corrupt", "empty"}


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


@pytest.mark.slow
def test_cpu_budget_that_would_starve_the_read_fails_fast(ray_cluster, tmp_path: Path) -> None:
    root = _write_shards(tmp_path, {"train-00000": []})
    greedy = ClipConfig(decode_actors=2, cpus_per_actor=1.0)  # 2 + 1 for listing > 2 CPUs
    with pytest.raises(ValueError, match=r"ClipConfig.decode_actors x cpus_per_actor = 2 CPUs"):
        build_clip_dataset(root, "train", greedy, train=True)
