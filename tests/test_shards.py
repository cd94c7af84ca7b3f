"""Parquet shards: quarantine of bad videos, schema and byte round trip, re-runs, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from finegrain.datasets.readers import MANIFEST_SCHEMA
from finegrain.datasets.shards import SHARD_SCHEMA, build_shards, plan_shards, probe_video

REPO = Path(__file__).resolve().parents[1]


def _manifest(entries: list[tuple[str, Path, int, str]]) -> pa.Table:
    """(video_id, path, label, split) rows → a manifest table."""
    return pa.table(
        {
            "video_id": [e[0] for e in entries],
            "path": [str(e[1]) for e in entries],
            "label": [e[2] for e in entries],
            "label_name": [f"class{e[2]}" for e in entries],
            "split": [e[3] for e in entries],
        },
        schema=MANIFEST_SCHEMA,
    )


def _faststart_mp4(path: Path, num_frames: int = 48) -> bytes:
    """An mp4 with its index in front, as web downloads have: cut short, it still opens."""
    import av  # here, not at the top: crash-test workers import this module, keep that light

    frames = np.random.default_rng(0).integers(0, 255, (num_frames, 32, 32, 3), dtype=np.uint8)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


@pytest.fixture
def dataset(make_video, tmp_path) -> tuple[pa.Table, dict[str, Path]]:
    """Six good videos (train 4, val 2; one in an AVI container) plus four bad ones: random
    bytes, the first half of an mp4, an mp4 whose last frames are cut off, and an empty file."""
    names = [f"good{i}.avi" if i == 3 else f"good{i}.mp4" for i in range(6)]
    paths = {
        f"good{i}": make_video(f"videos/{name}", num_frames=8 + 2 * i, seed=i)
        for i, name in enumerate(names)
    }
    good = paths["good0"].read_bytes()
    tail = _faststart_mp4(tmp_path / "faststart.mp4")
    bad = {
        "corrupt": os.urandom(4000),
        "truncated": good[: len(good) // 2],
        "truncated_tail": tail[: len(tail) * 99 // 100],
        "empty": b"",
    }
    for name, data in bad.items():
        paths[name] = tmp_path / "videos" / f"{name}.mp4"
        paths[name].write_bytes(data)
    order = ["good0", "corrupt", "good1", "truncated", "good2", "good3", "truncated_tail"]
    order += ["good4", "empty", "good5"]
    split = {"good4": "val", "empty": "val", "good5": "val"}
    entries = [(v, paths[v], i % 3, split.get(v, "train")) for i, v in enumerate(order)]
    return _manifest(entries), paths


def _read_shards(out: Path) -> pa.Table:
    files = sorted((out / "shards").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_bad_videos_quarantined_rest_pack(dataset, tmp_path):
    manifest, paths = dataset
    out = tmp_path / "out"
    report = build_shards(manifest, out, shard_mb=1, workers=2, progress=False)

    quarantined = {q["video_id"]: q for q in report["quarantined"]}
    assert set(quarantined) == {"corrupt", "truncated", "truncated_tail", "empty"}
    assert quarantined["empty"]["error"] == "empty file (0 bytes)"
    # decord's decoder thread may already fail on the first frame of a tail-cut file (seen in
    # CI: "Error sending packet"); either way the file is quarantined with decord's reason
    error = quarantined["truncated_tail"]["error"]
    assert "last frames" in error or "DECORDError" in error, error
    assert all(q["error"] and q["path"] == str(paths[v]) for v, q in quarantined.items())
    assert report["splits"]["train"]["videos"] == 4 and report["splits"]["val"]["videos"] == 2
    assert report["splits"]["train"]["quarantined"] == 3
    assert report["totals"]["shards"] == 2
    assert json.loads((out / "report.json").read_text())["totals"] == report["totals"]

    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "train-00000.parquet",
        "val-00000.parquet",
    ]
    shards = _read_shards(out)
    assert shards.schema.remove_metadata() == SHARD_SCHEMA
    assert shards.column("video_id").to_pylist() == [f"good{i}" for i in range(6)]
    for row in shards.to_pylist():
        path = paths[row["video_id"]]
        assert row["video"] == path.read_bytes()  # the encoded file as is
        assert row["num_frames"] == len(decord.VideoReader(str(path)))
        assert (row["height"], row["width"], row["fps"]) == (32, 32, 12.0)
    assert report["splits"]["train"]["bytes"] == sum(
        paths[f"good{i}"].stat().st_size for i in range(4)
    )


def test_plan_is_deterministic_and_sized(dataset, tmp_path):
    manifest, paths = dataset
    limit = 2.5 * paths["good0"].stat().st_size
    plan = plan_shards(manifest, limit / (1 << 20))
    assert plan == plan_shards(manifest, limit / (1 << 20))
    for split in ("train", "val"):
        shards = [s for s in plan if s.split == split]
        assert [s.name for s in shards] == [f"{split}-{k:05d}" for k in range(len(shards))]
        members = [m[0] for s in shards for m in s.members]
        assert members == [r["video_id"] for r in manifest.to_pylist() if r["split"] == split]
        for shard, after in zip(shards, shards[1:] + [None]):
            sizes = [m[3] for m in shard.members]
            assert sum(sizes) <= limit or len(sizes) == 1
            if after is not None:  # greedy: the next video would not have fitted
                assert sum(sizes) + after.members[0][3] > limit
    assert len(plan) > 2


def test_rerun_skips_complete_shards(dataset, tmp_path):
    manifest, paths = dataset
    out = tmp_path / "out"
    shard_mb = 2.5 * paths["good0"].stat().st_size / (1 << 20)
    first = build_shards(manifest, out, shard_mb=shard_mb, workers=1, progress=False)
    files = sorted((out / "shards").glob("*.parquet"))
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}
    planned = len(plan_shards(manifest, shard_mb))
    assert first["run"]["shards_written"] == planned > 2

    again = build_shards(manifest, out, shard_mb=shard_mb, workers=1, progress=False)
    assert (again["run"]["shards_written"], again["run"]["shards_skipped"]) == (0, planned)
    assert {f.name: f.stat().st_mtime_ns for f in files} == mtimes
    assert {k: v for k, v in again.items() if k != "run"} == {
        k: v for k, v in first.items() if k != "run"
    }  # the report is rebuilt from the sidecars, quarantine included

    # a lost shard and a changed video: only their shards are rewritten
    (out / "shards/train-00000.parquet").unlink()
    os.utime(paths["good5"], ns=(1, 1))
    plan = plan_shards(manifest, shard_mb)
    good5_shard = next(s.name for s in plan if "good5" in [m[0] for m in s.members])
    third = build_shards(manifest, out, shard_mb=shard_mb, workers=1, progress=False)
    assert third["run"]["shards_written"] == 2
    now = {f.name: f.stat().st_mtime_ns for f in files}
    assert {n for n in mtimes if now[n] != mtimes[n]} == {
        "train-00000.parquet",
        f"{good5_shard}.parquet",
    }

    # a new plan replaces the old shards, none left behind
    build_shards(manifest, out, shard_mb=1, workers=1, progress=False)
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "train-00000.parquet",
        "val-00000.parquet",
    ]
    assert _read_shards(out).num_rows == 6


def _probe_or_die(path: str) -> dict:
    """A probe whose process dies on one file, as decord does on some broken H.264 streams."""
    if "good2" in path:
        os._exit(134)
    return probe_video(path)


def test_decoder_crash_quarantines_only_that_video(dataset, tmp_path):
    manifest, _ = dataset
    report = build_shards(
        manifest, tmp_path / "out", shard_mb=1, workers=2, progress=False, probe=_probe_or_die
    )
    errors = {q["video_id"]: q["error"] for q in report["quarantined"]}
    assert set(errors) == {"corrupt", "truncated", "truncated_tail", "empty", "good2"}
    assert "process died" in errors["good2"]
    assert report["totals"]["videos"] == 5


@pytest.mark.parametrize(
    "kwargs, field",
    [({"shard_mb": 0}, "shard_mb"), ({"workers": 0}, "workers")],
)
def test_bad_options_fail_fast(dataset, tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        build_shards(dataset[0], tmp_path / "out", **kwargs)


def test_manifest_from_file_and_dataframe(dataset, tmp_path):
    manifest, _ = dataset
    manifest = manifest.filter(pc.is_in(manifest["video_id"], pa.array(["good0", "good4"])))
    pq.write_table(manifest, tmp_path / "manifest.parquet")
    a = build_shards(tmp_path / "manifest.parquet", tmp_path / "a", workers=1, progress=False)
    b = build_shards(manifest.to_pandas(), tmp_path / "b", workers=1, progress=False)
    assert (
        a["totals"]
        == b["totals"]
        == {"videos": 2, "bytes": a["totals"]["bytes"], "shards": 2, "quarantined": 0}
    )


# --------------------------------------------------------------------------- the CLI


def _synthetic_ssv2(root: Path, make_video) -> Path:
    """The synthetic benchmark's SSv2 layout: labels.json, train/validation.json, videos/*.mp4."""
    names = ["Moving something left to right", "Moving something right to left"]
    (root / "videos").mkdir(parents=True)
    (root / "labels.json").write_text(json.dumps({n: str(i) for i, n in enumerate(names)}))
    groups = {n: {"index": i, "group": "move", "subtlety": "temporal"} for i, n in enumerate(names)}
    (root / "classes.json").write_text(json.dumps(groups))
    entries = []
    for i in range(4):
        make_video(f"{root.name}/videos/{i}.mp4", num_frames=8, seed=i)
        template = names[i % 2].replace("something", "[something]")
        entries.append({"id": str(i), "label": "x", "template": template, "placeholders": ["x"]})
    (root / "train.json").write_text(json.dumps(entries[:3]))
    (root / "validation.json").write_text(json.dumps(entries[3:]))
    return root


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "experiments/build_shards.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_smoke(make_video, tmp_path):
    root = _synthetic_ssv2(tmp_path / "syn", make_video)
    out = tmp_path / "out"
    args = ["--dataset", "ssv2", "--root", str(root), "--out", str(out), "--workers", "1"]
    done = _cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "report.json" in done.stdout
    assert "[shards]" in done.stderr  # progress
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "ssv2" and report["classes"] == 2
    assert {s: v["videos"] for s, v in report["splits"].items()} == {"train": 3, "val": 1}
    assert json.loads((out / "classes.json").read_text())["1"] == "Moving something right to left"
    assert json.loads((out / "class_groups.json").read_text())[
        "Moving something left to right"
    ] == {"group": "move", "subtlety": "temporal"}
    assert pq.read_table(out / "manifest.parquet").num_rows == 4


def test_cli_wrong_root(tmp_path):
    done = _cli(
        "--dataset", "ucf101", "--root", str(tmp_path), "--out", str(tmp_path / "o"), cwd=tmp_path
    )
    assert done.returncode != 0
    assert "classInd.txt" in done.stderr and str(tmp_path) in done.stderr
    assert not (tmp_path / "o").exists()
