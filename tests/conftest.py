"""Shared fixtures: tiny generated videos (no downloads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TRAIN_POLL

from finegrain.datasets.encode import write_mp4

# Tests assert behaviour, not speed: one intra-op thread keeps them from fighting over the cores
# (test processes, Ray workers and decode actors all run at once on a 2-core machine).
torch.set_num_threads(1)


# The README's test command runs the tests on two pytest-xdist workers (`-n 2`), Ray tests
# included: at most two Ray instances at once, one per worker, and they do not share anything.
# In-process tests start a fresh local Ray (`address="local"`: a new head on ports Ray picks free,
# its own session folder); tests that start `ray start` heads or drivers as subprocesses give them
# their own RAY_TMPDIR, free ports and a marker by which only their own processes are ended.
# (Serialising the Ray tests would take the suite past CI's 20 minutes; it is measured to run
# them two at a time. `xdist_group` marks, written on the tests, only keep together the tests
# that share one trained run.)
os.environ.update(TRAIN_POLL)  # before any Ray starts: its runs' ends are noticed sooner


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


def pytest_runtest_setup(item):
    """Under `--dist loadgroup`, a test whose `xdist_group` was not applied fails, saying so:
    it would not share its group's trained run (pytest 9.2 broke that: see constraints.txt)."""
    grouped = getattr(item.config.option, "loadgroup", False)  # set on xdist workers, loadgroup
    if grouped and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail("pytest-xdist did not apply this test's xdist_group (pytest/xdist versions?)")


def pytest_collection_modifyitems(config, items):
    """The minutes-long (`slow`) tests first, in their files' order, then the short ones.

    Under `-n 2` a worker is handed the next test when its queue runs low, so what is collected
    last runs last: test_tune.py's sweeps (5 minutes each under CI's load) were, and one worker
    ran them alone while the other had finished. With the long tests handed out first, the
    hundreds of short ones fill in behind them and both workers end together. (pytest-xdist
    still sends the `two_epoch_run` group, the largest, ahead of everything.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
