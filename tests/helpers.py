"""Shared test settings: the tiny synthetic benchmark that end-to-end tests train on."""

from __future__ import annotations

import functools

# 4 classes x 4 videos (3 training, 1 validation) at 32 px, 4 frames, one epoch of batch 4, a
# width-4 tiny backbone from scratch
TINY_RUN = [
    "data.synthetic.classes=4",
    "data.synthetic.videos_per_class=4",
    "data.synthetic.val_videos_per_class=null",
    "data.synthetic.size=32",
    "data.num_frames=4",
    "data.short_side=32",
    "data.crop=32",
    "optim.batch_size=4",
    "optim.epochs=1",
    "model.width=4",
    "model.weights=null",  # the project's pretrained weights are for width 16
    "eval.batch_size=8",
]


def synthetic_clips(per_class: int = 4, classes: int = 12, size: int = 32, frames: int = 8,
                    seed: int = 0, kind: str = "finegrained"):  # fmt: skip
    """Real clips of the synthetic benchmark (rendered, not encoded), as model input.

    ``(clips (B, 3, T, size, size) float normalised, labels (B,))``, TSN-sampled centre frames,
    ``per_class`` videos of each of the first ``classes`` classes, class-interleaved.
    """
    return _synthetic_clips(per_class, classes, size, frames, seed, kind)


@functools.lru_cache(maxsize=8)
def _synthetic_clips(per_class, classes, size, frames, seed, kind):
    import torch

    from finegrain.datasets.pipeline import to_model_input
    from finegrain.datasets.sampling import tsn_indices
    from finegrain.datasets.synthetic import render

    clips, labels = [], []
    for k in range(per_class):
        for c in range(classes):
            video, _ = render(c, size=size, seed=seed, index=1000 * c + k, kind=kind)
            clips.append(torch.from_numpy(video[tsn_indices(len(video), frames, train=False)[0]]))
            labels.append(c)
    return to_model_input(torch.stack(clips)), torch.tensor(labels)


# How often Ray Train's controller looks at its workers (default 2 s): a run's end is noticed
# at the next look, so every run of the suite waits up to 2 s for nothing (~1 s measured per
# run, ~70 runs). A missed look is not a failure (that takes 10 minutes of missed looks), so a
# loaded CI machine only looks less often. The tests' setting, not the product's.
TRAIN_POLL = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a Ray or MLflow we start in a subprocess: none of our RAY_/MLFLOW_
    settings (it must not find the tests' Ray or store), the suite's Train poll interval."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return {**env, **TRAIN_POLL, **extra}


class MlflowUI:
    """``mlflow ui`` exactly as the README starts it (on a free port of 127.0.0.1), in a
    working directory of its own; ``files``/``read`` list and download through it as the
    browser does."""

    def __init__(self, db, cwd) -> None:
        self.db, self.cwd = db, cwd

    def __enter__(self) -> MlflowUI:
        import os
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{self.db}",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return self
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("mlflow ui did not start") from None
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def files(self, run_id: str, path: str = "") -> set[str]:
        import json
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode({"run_id": run_id, "path": path})
        url = f"{self.base}/ajax-api/2.0/mlflow/artifacts/list?{query}"
        with urllib.request.urlopen(url, timeout=30) as r:
            return {f["path"] for f in json.load(r).get("files", [])}

    def read(self, run_id: str, path: str) -> bytes:
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
        with urllib.request.urlopen(f"{self.base}/get-artifact?{query}", timeout=30) as r:
            return r.read()
