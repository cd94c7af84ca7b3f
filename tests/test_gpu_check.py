"""The prepared GPU check (bench/gpu_check.py) dry-runs on CPU, so it cannot rot between the
sessions that have a GPU machine."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_dry_runs_on_cpu_and_writes_its_table(tmp_path):
    """As on a GPU machine whose image lacks PyAV, MLflow and Optuna: the shards are built here
    (``--shards``), and the check imports none of them (any import of one fails)."""
    import os

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    shards = gpu_check.make_shards(
        tmp_path / "work", gpu_check.settings(argparse.Namespace(tiny=True))
    )
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("av", "mlflow", "optuna"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('no {name} on this machine')\n")
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="fgray-", dir="/tmp")  # Ray's socket paths stay short
    env = subprocess_env()
    path = os.pathsep.join(p for p in (str(blocked), env.get("PYTHONPATH")) if p)
    env.update(RAY_TMPDIR=ray_tmp, OUT=str(out), PYTHONUNBUFFERED="1", PYTHONPATH=path)
    try:
        proc = subprocess.run(
            [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny",
             "--shards", str(shards), "--work", str(tmp_path / "work")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=420,
        )  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = (out / "gpu_check.md").read_text()
    assert md in proc.stdout  # the one table, printed and written alike
    assert "gloo" in md and "| tiny · onepass |" in md and "| tiny · dsts |" in md
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["tiny · onepass", "tiny · dsts"]
    for r in rows:
        assert r["fed_clips_s"] > 0 and r["resident_clips_s"] > 0
        assert r["resident_before_clips_s"] > 0 and r["resident_after_clips_s"] > 0
        assert r["fp32_loss"] == pytest.approx(r["fp32_loss"])  # finite
        assert abs(r["bf16_loss"] - r["fp32_loss"]) < 0.5  # bf16 autocast: the same step
        assert r["bf16_last_loss"] == pytest.approx(r["bf16_last_loss"])  # finite
        assert r["peak_mem_gib"] is None  # no device memory on CPU
    assert rows[0]["dsts_eval_ratio"] is None and rows[1]["dsts_eval_ratio"] > 0


def test_the_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cuda"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr


def test_the_gpu_check_names_shards_it_cannot_use(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--shards", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and f"--shards {tmp_path}: no shards" in proc.stderr
