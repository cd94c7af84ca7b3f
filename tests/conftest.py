"""Shared fixtures: tiny generated videos (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.datasets.encode import write_mp4

# Tests assert behaviour, not speed: one intra-op thread keeps them from fighting over the cores
# (test processes, Ray workers and decode actors all run at once on a 2-core machine).
torch.set_num_threads(1)


# Test modules that start Ray (in-process or as `ray start` / job subprocesses). Under pytest-xdist
# (`-n 2 --dist loadgroup`, the README's test command) they all run on one worker, one after the
# other: never two Ray instances at once (ports, /tmp/ray, CPU accounting), while the CPU-only
# tests run beside them on the other worker.
RAY_MODULES = {"test_ablate", "test_cluster", "test_pipeline", "test_registry", "test_train",
               "test_tune"}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in RAY_MODULES:
            item.add_marker(pytest.mark.xdist_group("ray"))


def moving_square(num_frames: int = 16, size: int = 32, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright square moving left to right over a noisy background."""
    rng = np.random.default_rng(seed)
    frames = (rng.random((num_frames, size, size, 3)) * 60).astype(np.uint8)
    side = max(2, size // 6)
    for t in range(num_frames):
        x = int(t * (size - side) / max(1, num_frames - 1))
        frames[t, size // 3 : size // 3 + side, x : x + side] = (230, 40, 40)
    return frames


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """``make_video(name, num_frames=16, size=32, seed=0, fps=12) -> Path`` of an H.264 mp4."""

    def _make(name: str, num_frames: int = 16, size: int = 32, seed: int = 0, fps: int = 12):
        path = tmp_path / name
        write_mp4(path, moving_square(num_frames, size, seed), fps=fps)
        return path

    return _make
