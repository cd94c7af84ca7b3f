"""Parquet shards: the manifest's encoded videos, probed with decord and packed as they are.

``OUT/shards/{split}-{k:05d}.parquet`` holds about ``shard_mb`` of videos with the columns of
:data:`SHARD_SCHEMA` (``evidence``: the manifest's per-frame ground truth of the video, JSON, null
for datasets without it). Shard membership is planned up front from the manifest order and the file
sizes, so the same manifest always gives the same shards; each finished shard gets a sidecar
``OUT/shard_meta/{name}.json`` (plan fingerprint, counts, quarantined videos). A re-run skips every
shard whose sidecar matches the plan and rebuilds the report from the sidecars alone.

A video goes into a shard only if decord opens it and decodes its first and last frames (a
truncated file often opens and then fails at the end). Zero-byte, corrupt, truncated or otherwise
undecodable videos go to the quarantine list in ``OUT/report.json`` with their error. Probing runs
in worker processes; a decoder that kills its process (decord can abort on broken H.264) costs a
retry of the videos in flight one by one, and quarantines the one that crashes.

File and folder names come from :mod:`.layout`.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from finegrain.datasets import layout
from finegrain.datasets.readers import (
    MANIFEST_SCHEMA,
    SPLITS,
    ReaderIssues,
    find_class_groups,
    read_dataset,
    with_evidence,
    write_manifest,
)

SHARD_SCHEMA = pa.schema(
    [
        ("video", pa.binary()),  # the encoded file, byte for byte
        ("video_id", pa.string()),
        ("label", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("evidence", pa.string()),  # the manifest's per-frame ground truth (JSON) or null
    ]
)
ROW_GROUP_BYTES = 32 << 20  # readers hold one row group in memory, not a whole 256 MB shard
SHOW_FIRST = 20  # quarantined videos named on stderr; report.json lists them all
_FORMAT = 2  # bump when the shard layout changes so old shards are rebuilt

Probe = Callable[[str], dict[str, Any]]


@dataclass(frozen=True)
class Shard:
    """One planned shard: its name, split and members (video_id, path, label, size, mtime_ns,
    evidence)."""

    name: str
    split: str
    members: tuple[tuple[str, str, int, int, int, str | None], ...]

    @property
    def fingerprint(self) -> str:
        blob = json.dumps([_FORMAT, self.name, self.members]).encode()
        return hashlib.sha1(blob).hexdigest()


def plan_shards(manifest: pa.Table, shard_mb: float) -> list[Shard]:
    """Cut each split, in manifest order, into runs of about ``shard_mb`` MiB of files."""
    limit = shard_mb * (1 << 20)
    manifest = with_evidence(manifest)
    rows = manifest.select(["video_id", "path", "label", "split", "evidence"]).to_pylist()
    shards: list[Shard] = []
    for split in SPLITS:
        runs: list[list[tuple[str, str, int, int, int, str | None]]] = []
        size_now = 0
        for row in (r for r in rows if r["split"] == split):
            try:
                st = os.stat(row["path"])
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:  # vanished since the manifest: planned anyway, quarantined on load
                size, mtime = 0, 0
            if not runs or size_now + size > limit:
                runs.append([])
                size_now = 0
            member = (row["video_id"], row["path"], row["label"], size, mtime, row["evidence"])
            runs[-1].append(member)
            size_now += size
        shards += [
            Shard(layout.shard_name(split, k), split, tuple(run)) for k, run in enumerate(runs)
        ]
    return shards


# --------------------------------------------------------------------------- probing (workers)


def probe_video(path: str) -> dict[str, Any]:
    """Open ``path`` with decord and decode its first and last two frames.

    Returns ``num_frames, fps, height, width``; raises on any failure.
    """
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    n = len(vr)
    if n <= 0:
        raise ValueError("no video frames")
    height, width = vr[0].shape[:2]
    try:  # a truncated file often opens, indexes all its frames and fails here
        vr.get_batch(list(range(max(0, n - 2), n)))
    except Exception as e:
        raise RuntimeError(f"the last frames of {n} do not decode ({_first_line(e)})") from e
    return {"num_frames": n, "fps": float(vr.get_avg_fps()), "height": height, "width": width}


def _load(path: str, probe: Probe) -> tuple[bytes | None, dict | None, str | None]:
    """Worker task: ``(file bytes, probe result, None)`` or ``(None, None, error)``."""
    try:
        data = Path(path).read_bytes()
        if not data:
            return None, None, "empty file (0 bytes)"
        return data, probe(path), None
    except Exception as e:  # any failure quarantines this video, never the run
        return None, None, f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: Exception) -> str:
    """decord's messages carry a C++ backtrace: keep the first line."""
    return (str(e).strip().splitlines() or [""])[0][:300]


def _quiet_decoder() -> None:
    """Worker initializer: we report decode errors ourselves, so silence ffmpeg's log."""
    try:
        import decord

        decord.logging.set_level(decord.logging.QUIET)
    except Exception:  # a probe that is not decord does not need it
        pass


def _loaded(
    tasks: Iterable[tuple[Any, str]], workers: int, probe: Probe
) -> Iterator[tuple[Any, tuple]]:
    """Yield ``(key, _load(path))`` for each ``(key, path)``, in completion order.

    At most ``2 * workers`` loads are in flight, which bounds the bytes held in memory. If a
    worker process dies, the loads that were in flight are retried one at a time to find it.
    """
    todo = deque(tasks)
    pool = _pool(workers)
    running: dict = {}
    try:
        while todo or running:
            while todo and len(running) < 2 * workers:
                key, path = todo.popleft()
                running[pool.submit(_load, path, probe)] = (key, path)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                key, path = running.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    running[fut] = (key, path)
                    broken = True
                else:
                    yield key, fut.result()
            if broken:  # find the video that kills its process: retry the suspects one by one
                suspects = list(running.values())
                running.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = _pool(1)
                for key, path in suspects:
                    try:
                        result = pool.submit(_load, path, probe).result()
                    except BrokenProcessPool:
                        result = (None, None, "decoder process died while probing this video")
                        pool.shutdown(wait=True)
                        pool = _pool(1)
                    yield key, result
                pool.shutdown(wait=True)
                pool = _pool(workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(workers: int) -> ProcessPoolExecutor:
    ctx = mp.get_context("forkserver")  # no fork of a threaded parent (Ray, torch)
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_quiet_decoder)


# --------------------------------------------------------------------------- writing


def _write_shard(path: Path, rows: list[dict]) -> int:
    """Write rows to ``path`` through a temporary name; returns the file size."""
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    total = sum(len(r["video"]) for r in rows)
    groups = max(1, math.ceil(total / ROW_GROUP_BYTES))
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(
        table,
        tmp,
        row_group_size=max(1, math.ceil(len(rows) / groups)),
        compression={name: "snappy" for name in SHARD_SCHEMA.names} | {"video": "none"},
        use_dictionary=False,
        write_statistics=[n for n in SHARD_SCHEMA.names if n != "video"],
    )
    os.replace(tmp, path)
    return path.stat().st_size


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_sidecar(path: Path, shard: Shard, shard_file: Path) -> dict | None:
    """The sidecar of a complete shard that matches the plan, else None."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != shard.fingerprint:
        return None
    if meta["videos"] and (
        not shard_file.is_file() or shard_file.stat().st_size != meta["file_bytes"]
    ):
        return None
    return meta


def _as_table(manifest: pa.Table | Any | str | Path) -> pa.Table:
    if isinstance(manifest, (str, Path)):
        manifest = pq.read_table(manifest)
    elif not isinstance(manifest, pa.Table):  # a pandas DataFrame
        manifest = pa.Table.from_pandas(manifest, preserve_index=False)
    missing = set(MANIFEST_SCHEMA.names) - set(manifest.column_names)
    if missing:
        raise ValueError(f"manifest lacks the columns {sorted(missing)}")
    bad = set(manifest.column("split").to_pylist()) - set(SPLITS)
    if bad:
        raise ValueError(f"manifest split must be one of {SPLITS}, got {sorted(bad)}")
    return with_evidence(manifest)  # a manifest without ground truth: evidence null


def _check_options(shard_mb: float, workers: int | None) -> int:
    """Validate the packing options; returns the number of workers."""
    if not shard_mb > 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb!r}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return workers


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[shards] {message}", file=sys.stderr, flush=True)


def build_shards(
    manifest: pa.Table | Any | str | Path,
    out: str | Path,
    shard_mb: float = 256,
    workers: int | None = None,
    progress: bool = True,
    *,
    reader_issues: ReaderIssues | None = None,
    report_extra: dict | None = None,
    probe: Probe = probe_video,
) -> dict:
    """Pack the manifest's videos into ``OUT/shards`` and write ``OUT/report.json``.

    ``manifest``: a table, a DataFrame or the path of ``manifest.parquet``. ``workers``: probing
    processes (default: all CPUs). ``reader_issues`` and ``report_extra`` go into the report
    as they are. ``probe(path) -> {num_frames, fps, height, width}`` is replaceable for tests.
    Returns the report.
    """
    workers = _check_options(shard_mb, workers)
    manifest = _as_table(manifest)
    out = Path(out)
    shard_dir, meta_dir = out / layout.SHARDS_DIR, out / layout.META_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    meta_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    plan = plan_shards(manifest, shard_mb)
    _remove_stale(shard_dir, meta_dir, {s.name for s in plan})
    metas: dict[str, dict] = {}
    for shard in plan:
        meta = _read_sidecar(
            layout.meta_path(out, shard.name), shard, layout.shard_path(out, shard.name)
        )
        if meta is not None:
            metas[shard.name] = meta
    todo = [s for s in plan if s.name not in metas]
    total_videos = sum(len(s.members) for s in todo)
    _say(
        progress,
        f"{len(plan)} shards planned ({shard_mb:g} MB each), {len(metas)} already complete, "
        f"{len(todo)} to write: {total_videos} videos, {workers} workers",
    )

    results: dict[str, dict[int, tuple]] = {s.name: {} for s in todo}
    by_name = {s.name: s for s in todo}
    tasks = [((s.name, i), m[1]) for s in todo for i, m in enumerate(s.members)]
    done_videos = quarantined = 0
    for (name, i), result in _loaded(tasks, workers, probe):
        results[name][i] = result
        done_videos += 1
        shard = by_name[name]
        if len(results[name]) == len(shard.members):
            metas[name] = _finish(shard, results.pop(name), out)
            for q in metas[name]["quarantined"]:
                quarantined += 1
                if quarantined <= SHOW_FIRST:
                    print(
                        f"[shards] quarantined {q['video_id']} ({q['path']}): {q['error']}",
                        file=sys.stderr,
                    )
                elif quarantined == SHOW_FIRST + 1:
                    print("[shards] more quarantined videos: see report.json", file=sys.stderr)
            rate = done_videos / max(time.monotonic() - started, 1e-9)
            _say(
                progress,
                f"{len(metas)}/{len(plan)} shards, {done_videos}/{total_videos} videos "
                f"({rate:.1f} videos/s): {name} {metas[name]['videos']} videos "
                f"{metas[name]['bytes'] / (1 << 20):.1f} MB",
            )

    report = _report(plan, metas, shard_mb, reader_issues, report_extra)
    report["run"] = {
        "shards_written": len(todo),
        "shards_skipped": len(plan) - len(todo),
        "seconds": round(time.monotonic() - started, 2),
    }
    _write_json(out / layout.REPORT_FILE, report)
    return report


def is_current(out: str | Path) -> bool:
    """Whether ``OUT/report.json`` describes shards of this shard format (older builds lack
    columns, e.g. ``evidence``: :func:`prepare` on the same folder brings them up to date)."""
    try:
        report = json.loads((Path(out) / layout.REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("format") == _FORMAT


def _finish(shard: Shard, results: dict[int, tuple], out: Path) -> dict:
    """Write a shard's parquet file, then its sidecar."""
    rows, quarantined = [], []
    for i, (video_id, path, label, _, _, evidence) in enumerate(shard.members):
        data, meta, error = results[i]
        if error is not None:
            quarantined.append({"video_id": video_id, "path": path, "error": error})
            continue
        rows.append(
            {"video": data, "video_id": video_id, "label": label, **meta, "evidence": evidence}
        )
    shard_file = layout.shard_path(out, shard.name)
    file_bytes = _write_shard(shard_file, rows) if rows else 0
    if not rows:
        shard_file.unlink(missing_ok=True)
    meta = {
        "name": shard.name,
        "split": shard.split,
        "fingerprint": shard.fingerprint,
        "videos": len(rows),
        "bytes": sum(len(r["video"]) for r in rows),
        "file_bytes": file_bytes,
        "quarantined": quarantined,
    }
    _write_json(layout.meta_path(out, shard.name), meta)  # written last: marks the shard complete
    return meta


def _remove_stale(shard_dir: Path, meta_dir: Path, planned: set[str]) -> None:
    """Drop shards of an older plan (and half-written temporaries) so readers never see them."""
    for f in shard_dir.iterdir():
        if f.name.endswith(".tmp") or (
            layout.shard_split(f.name) in SPLITS and f.stem not in planned
        ):
            f.unlink()
    for f in meta_dir.iterdir():
        if f.name.endswith(".tmp") or f.stem not in planned:
            f.unlink()


def _report(plan, metas, shard_mb, reader_issues, report_extra) -> dict:
    splits: dict[str, dict] = {}
    quarantined = []
    for shard in plan:
        meta = metas[shard.name]
        s = splits.setdefault(shard.split, {"videos": 0, "bytes": 0, "shards": 0, "quarantined": 0})
        s["videos"] += meta["videos"]
        s["bytes"] += meta["bytes"]
        s["shards"] += 1 if meta["videos"] else 0
        s["quarantined"] += len(meta["quarantined"])
        quarantined += [{"split": shard.split, **q} for q in meta["quarantined"]]
    totals = {
        k: sum(s[k] for s in splits.values()) for k in ("videos", "bytes", "shards", "quarantined")
    }
    return {
        **(report_extra or {}),
        "format": _FORMAT,  # a report without it (or older) describes shards to rebuild
        "shard_mb": shard_mb,
        "splits": splits,
        "totals": totals,
        "quarantined": quarantined,
        "reader_issues": reader_issues.to_dict() if reader_issues is not None else None,
    }


# --------------------------------------------------------------------------- all of it


def prepare(
    dataset: str,
    root: str | Path,
    out: str | Path,
    *,
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
    split: int = 1,
    extensions: Iterable[str] | None = None,
    shard_mb: float = 256,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Annotations → ``OUT/manifest.parquet`` + ``classes.json`` (+ ``class_groups.json``) →
    ``OUT/shards`` + ``OUT/report.json``. Returns the report."""
    _check_options(shard_mb, workers)  # before any reading or writing
    manifest, classes, issues = read_dataset(dataset, root, annotations, videos, split, extensions)
    for line in issues.lines():
        print(f"[{dataset}] {line}", file=sys.stderr, flush=True)
    groups = find_class_groups(root, annotations, classes)
    write_manifest(manifest, classes, out, class_groups=groups)
    extra = {"dataset": dataset, "split": split, "classes": len(classes)}
    return build_shards(
        manifest,
        out,
        shard_mb,
        workers,
        progress,
        reader_issues=issues,
        report_extra=extra,
    )
