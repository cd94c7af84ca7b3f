"""Clip throughput: the Ray Data pipeline vs a torch DataLoader vs the decode-only ceiling.

    python bench/data_throughput.py [--shards DIR] [--workers 2] [--videos 192] [--repeat 8]

Without ``--shards`` it writes ``--videos`` tiny H.264 videos (``--size`` px, ``--frames``
frames, a textured square moving over a noisy background) into shards whose rows repeat each
video ``--repeat`` times under distinct ids (enough clips for seconds of steady decoding).
Then, on the same rows of ``--split``, one table of clips/s:

(a) ``build_clip_dataset`` + ``iter_clip_batches``: ``--workers`` decode actors.
(b) ``torch.utils.data.DataLoader`` with ``--workers`` worker processes, each item decoded and
    transformed by the same ``ClipDecoder.decode_row`` (decord, the MMAction2 way); the encoded
    bytes are held in memory (the most favourable case for the DataLoader).
(c) decode only: ``--workers`` forked processes doing decord ``get_batch`` of the same sampled
    frames, nothing else (no transforms, no batching, no transport): the ceiling.

Every path runs ``--rounds`` epochs, interleaved (c, b, a, c, b, a, ...) so that load from
elsewhere on the machine hits all of them alike, and the table shows each path's best epoch.
``clips/s`` counts the whole epoch including start-up (Ray starts its decode actors afresh each
epoch; the DataLoader forks its workers each epoch); ``start-up`` is the time to the first batch
and ``steady`` the rate from the first batch on. Goals (issue 2): (a) >= 1.0x (b) and >= 0.8x
(c). Below the table: where the CPU went in each of those epochs (CPU seconds by process kind,
read from ``/proc``; "other load on the machine" is everything not started by this script).

Then the case that matters for training: a ``--run-epochs`` run (default 5), epochs back to
back — (a) one Ray Data execution over all of them (what the trainer reads: decode actors start
once per run), (b) the DataLoader epoch after epoch, (c) decode only — clips/s over the whole
run, start-ups included. Goals: a/b >= 1.0x, a/c >= 0.8x.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import decord
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from torch.utils.data import DataLoader, Dataset

from finegrain.datasets.encode import write_mp4
from finegrain.datasets.pipeline import (
    ClipConfig,
    ClipDecoder,
    build_clip_dataset,
    iter_clip_batches,
    read_classes,
    sample_views,
    shard_files,
)

CLASSES = [
    "Moving something from left to right",
    "Moving something from right to left",
    "Moving something up",
    "Moving something down",
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


def moving_video(label: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(T, S, S, 3) uint8: a textured square moving in the class's direction over noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    background = 80 + 40 * np.sin(xx / rng.uniform(3, 9) + rng.uniform(0, 6))[..., None] * [
        1,
        0.6,
        0.3,
    ]
    side = size // 4
    texture = rng.integers(120, 255, size=(side, side, 3))
    video = np.empty((frames, size, size, 3), np.uint8)
    start, speed = rng.uniform(0, size - side, 2), rng.uniform(0.4, 1.0)
    direction = [(1, 0), (-1, 0), (0, -1), (0, 1)][label]
    for t in range(frames):
        noise = rng.integers(0, 20, size=(size, size, 3))
        frame = np.clip(background + noise, 0, 255)
        x = int(start[0] + direction[0] * speed * t) % (size - side)
        y = int(start[1] + direction[1] * speed * t) % (size - side)
        frame[y : y + side, x : x + side] = texture
        video[t] = frame
    return video


def make_shards(out: Path, args: argparse.Namespace) -> Path:
    """Generate the videos and write ``out/shards/{split}-NNNNN.parquet`` + ``classes.json``."""
    rng = np.random.default_rng(args.seed)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CLASSES)}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.videos):
            label = int(rng.integers(len(CLASSES)))
            path = Path(tmp) / "v.mp4"
            write_mp4(path, moving_video(label, args.frames, args.size, rng), fps=12)
            data = path.read_bytes()
            for r in range(args.repeat):
                rows.append(
                    dict(
                        video=data,
                        video_id=f"v{i:04d}-{r}",
                        label=label,
                        num_frames=args.frames,
                        fps=12.0,
                        height=args.size,
                        width=args.size,
                    )
                )
    rng.shuffle(rows)
    for k in range(0, len(rows), args.per_shard):
        table = pa.Table.from_pylist(rows[k : k + args.per_shard], schema=SHARD_SCHEMA)
        pq.write_table(table, out / "shards" / f"{args.split}-{k // args.per_shard:05d}.parquet")
    return out


def load_rows(shard_dir: Path, split: str) -> list[tuple[bytes, int, str]]:
    """All (video bytes, label, video_id) rows of the split, in memory."""
    rows = []
    for f in shard_files(shard_dir, split):
        t = pq.read_table(f, columns=["video", "label", "video_id"]).to_pydict()
        rows += list(zip(t["video"], t["label"], t["video_id"]))
    return rows


@dataclass
class Epoch:
    clips: int
    seconds: float  # iterator creation to last batch
    startup: float  # iterator creation to first batch

    @property
    def rate(self) -> float:
        return self.clips / self.seconds

    @property
    def steady(self) -> float:  # from the first batch on
        return self.clips / max(self.seconds - self.startup, 1e-9)


def timed_epoch(batches: Iterable) -> Epoch:
    clips, start, first = 0, time.perf_counter(), None
    for batch in batches:
        first = first or time.perf_counter()
        clips += len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])
    end = time.perf_counter()
    return Epoch(clips, end - start, (first or end) - start)


# ---------------------------------------------------------------- (c) decode only

_ROWS: list[tuple[bytes, int, str]] = []
_CFG: ClipConfig | None = None


def _decode_only(chunk: tuple[int, int]) -> int:
    """Decode the sampled frames of rows chunk[0]:chunk[1]: no transforms (the ceiling)."""
    assert _CFG is not None
    seeds = ClipDecoder(_CFG, train=True, seed=0)  # the frames (a) and (b) sample in epoch 0
    for video, _, video_id in _ROWS[chunk[0] : chunk[1]]:
        reader = decord.VideoReader(io.BytesIO(video), num_threads=_CFG.decode_threads)
        rng = seeds.row_rng(video_id)
        idx = np.unique(sample_views(len(reader), _CFG, train=True, rng=rng))
        reader.get_batch(idx.tolist()).asnumpy()
    return chunk[1] - chunk[0]


def decode_only_epoch(pool, rows: int, chunk: int = 16) -> Epoch:
    """Chunks of rows handed out dynamically (no straggler waits for a fixed half)."""
    start = time.perf_counter()
    chunks = [(k, min(k + chunk, rows)) for k in range(0, rows, chunk)]
    clips = sum(pool.imap_unordered(_decode_only, chunks))
    return Epoch(clips, time.perf_counter() - start, 0.0)


# ---------------------------------------------------------------- where the CPU goes


class CpuMeter:
    """CPU seconds by process kind over a block (Linux ``/proc``), for "where the time goes".

    Processes descending from this one (Ray's daemons and workers, forked workers) are sorted by
    kind; everything else is "other load on the machine". Polls every 0.2 s, charging each
    process's CPU since the last sample to its current kind: Ray renames a worker process after
    the task it runs, and the decode actors exit with each epoch.
    """

    KINDS = (
        ("MapWorker", "decode actors"),
        ("ReadParquet", "read/repartition tasks"),
        ("Repartition", "read/repartition tasks"),
        ("ray::IDLE", "worker process start-up"),
        ("default_worker.py", "worker process start-up"),
        ("ray::", "other ray actors (stats, coordinators)"),
        ("ray", "ray daemons (raylet, gcs, agents)"),
    )

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> dict[int, tuple[str, float, int]]:
        """{pid: (command line, CPU seconds, parent pid)} of every process."""
        out = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError):
                continue
            out[int(pid)] = (cmd, (int(stat[11]) + int(stat[12])) / self.tick, int(stat[1]))
        return out

    def __enter__(self) -> CpuMeter:
        self.prev, self.seconds, self.stop = self._sample(), {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _account(self) -> None:
        now = self._sample()
        mine, grew = {os.getpid()}, True
        while grew:  # descendants of this process
            new = {pid for pid, (_, _, ppid) in now.items() if ppid in mine} - mine
            mine |= new
            grew = bool(new)
        for pid, (cmd, cpu, _) in now.items():
            used = cpu - self.prev[pid][1] if pid in self.prev else cpu
            if pid == os.getpid():
                kind = "driver (iteration, executor)"
            elif pid not in mine:
                kind = "other load on the machine"
            else:
                kind = next((k for key, k in self.KINDS if key in cmd), "forked worker processes")
            self.seconds[kind] = self.seconds.get(kind, 0.0) + used
        self.prev = now

    def _poll(self) -> None:
        while not self.stop.wait(0.2):
            self._account()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._account()

    def by_kind(self) -> dict[str, float]:
        return dict(self.seconds)


# ---------------------------------------------------------------- (b) DataLoader


class DecordClips(Dataset):
    """Map-style dataset: item i -> (clip (T, S, S, 3) uint8, label), decoded with decord."""

    def __init__(self, rows, cfg: ClipConfig, class_names: list[str]) -> None:
        self.rows, self.decoder = rows, ClipDecoder(cfg, train=True, class_names=class_names)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        video, label, video_id = self.rows[i]
        clips, labels = self.decoder.decode_row(video, label, video_id)
        return clips[0], int(labels[0])


def make_loader(rows, cfg, class_names, workers: int, batch_size: int) -> DataLoader:
    return DataLoader(
        DecordClips(rows, cfg, class_names),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        prefetch_factor=4,
        multiprocessing_context="fork",
    )


# ---------------------------------------------------------------- (a) Ray Data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", type=Path, help="existing shard dir (else generate tiny videos)")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", type=int, default=2, help="decode actors = DataLoader workers")
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--decode-batch", type=int, default=32, help="videos per actor call")
    p.add_argument("--decode-threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="epochs per path, interleaved")
    p.add_argument("--run-epochs", type=int, default=5, help="epochs of the multi-epoch run")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--sampling", choices=["tsn", "dense"], default="tsn")
    p.add_argument("--short-side", type=int, default=64)
    p.add_argument("--crop-size", type=int, default=56)
    p.add_argument("--videos", type=int, default=192)
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = ClipConfig(
        sampling=args.sampling,
        num_frames=args.num_frames,
        short_side=args.short_side,
        crop_size=args.crop_size,
        flip=True,
        decode_actors=args.workers,
        cpus_per_actor=args.cpus_per_actor,
        decode_threads=args.decode_threads,
        decode_batch=args.decode_batch,
    )
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        shard_dir = args.shards or make_shards(Path(tmp), args)
        rows = load_rows(shard_dir, args.split)
        classes = read_classes(shard_dir)
        print(
            f"{len(rows)} videos of split {args.split!r} ({time.perf_counter() - t0:.1f} s to "
            f"prepare); {cfg.sampling} T={cfg.num_frames}, crop {cfg.crop_size} of short side "
            f"{cfg.short_side}, flip; {args.workers} workers; batch {args.batch_size}; "
            f"decode batch {cfg.decode_batch}; {args.rounds} interleaved epochs per path; "
            f"{os.cpu_count()} CPUs"
        )
        global _ROWS, _CFG
        _ROWS, _CFG = rows, cfg  # inherited by the forked decode-only processes
        pool = mp.get_context("fork").Pool(args.workers)
        loader = make_loader(rows, cfg, classes, args.workers, args.batch_size)
        ray.init(
            address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR"
        )  # a fresh Ray of this machine: the benchmark measures it alone
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = build_clip_dataset(shard_dir, args.split, cfg, train=True, seed=args.seed)
        epochs: dict[str, list[Epoch]] = {"a": [], "b": [], "c": []}
        cpu: dict[str, list[dict[str, float]]] = {"a": [], "b": [], "c": []}
        runs = {
            "c": lambda: decode_only_epoch(pool, len(rows)),
            "b": lambda: timed_epoch(loader),
            "a": lambda: timed_epoch(iter_clip_batches(ds, args.batch_size)),
        }
        for _ in range(args.rounds):  # interleaved: load from elsewhere hits all paths alike
            for key, run in runs.items():
                with CpuMeter() as meter:
                    epochs[key].append(run())
                cpu[key].append(meter.by_kind())
        # the case that matters for training: --run-epochs epochs back to back; (a) as the
        # trainer reads them, one execution whose decode actors start once for the whole run
        run_ds = build_clip_dataset(
            shard_dir, args.split, cfg, train=True, seed=args.seed, epochs=range(args.run_epochs)
        )
        run = {
            "c": lambda: _sum(decode_only_epoch(pool, len(rows)) for _ in range(args.run_epochs)),
            "b": lambda: timed_epoch(b for _ in range(args.run_epochs) for b in loader),
            "a": lambda: timed_epoch(iter_clip_batches(run_ds, args.batch_size)),
        }
        multi = {key: go() for key, go in run.items()}
        pool.close()
        ray.shutdown()
    report(epochs, cpu)
    report_run(multi, args.run_epochs)


def _sum(epochs: Iterable[Epoch]) -> Epoch:
    parts = list(epochs)
    return Epoch(sum(e.clips for e in parts), sum(e.seconds for e in parts), parts[0].startup)


def report_run(multi: dict[str, Epoch], n: int) -> None:
    """The multi-epoch run: clips/s over all its epochs, start-ups included."""
    names = {
        "a": "(a) Ray Data, one execution",
        "b": "(b) torch DataLoader",
        "c": "(c) decode only",
    }
    print(f"\nA {n}-epoch run, epochs back to back (start-ups included):")
    print(f"| {'path':<27} | clips | seconds | clips/s |")
    print(f"|{'-' * 29}|-------|---------|---------|")
    for key in "abc":
        e = multi[key]
        print(f"| {names[key]:<27} | {e.clips:>5} | {e.seconds:>7.1f} | {e.rate:>7.1f} |")
    for key, goal in (("b", 1.0), ("c", 0.8)):
        print(f"a/{key} over the run = {multi['a'].rate / multi[key].rate:.2f}x; goal >= {goal}x")


def report(epochs: dict[str, list[Epoch]], cpu: dict[str, list[dict[str, float]]]) -> None:
    """Best epoch of each path (the least disturbed by the machine's other load), then where
    the CPU went in each of those epochs."""
    names = {
        "a": "(a) Ray Data pipeline",
        "b": "(b) torch DataLoader",
        "c": "(c) decode-only ceiling",
    }
    best = {k: max(v, key=lambda e: e.rate) for k, v in epochs.items()}
    steady = {k: max(e.steady for e in v) for k, v in epochs.items()}
    print(f"\n| {'path':<25} | clips/epoch | start-up s | clips/s | steady clips/s |")
    print(f"|{'-' * 27}|-------------|------------|---------|----------------|")
    for key in "abc":
        e = best[key]
        print(
            f"| {names[key]:<25} | {e.clips:>11} | {e.startup:>10.2f} | {e.rate:>7.1f} "
            f"| {steady[key]:>14.1f} |"
        )
    for key, goal in (("b", 1.0), ("c", 0.8)):
        print(
            f"a/{key} = {best['a'].rate / best[key].rate:.2f}x "
            f"(steady {steady['a'] / steady[key]:.2f}x); goal >= {goal}x"
        )
    for key in "abc":
        i = epochs[key].index(best[key])
        seconds = sorted(cpu[key][i].items(), key=lambda kv: -kv[1])
        wall, cores = best[key].seconds, os.cpu_count() or 1
        print(
            f"\nCPU seconds in that epoch of {names[key]} ({wall:.1f} s wall x {cores} cores = "
            f"{cores * wall:.1f} CPU s):"
        )
        for kind, used in seconds:
            if used >= 0.05:
                print(f"  {kind:<32} {used:6.2f}  ({1000 * used / best[key].clips:.2f} ms/clip)")


if __name__ == "__main__":
    main()
