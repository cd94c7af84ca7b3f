"""Ray Train overhead: one table, one run, same model and the same in-memory batches.

    python bench/train_overhead.py [--models tiny r2plus1d_18] [--steps 4] [--batch 4]

For each model (at 8x112x112): step time of a plain PyTorch loop vs the same loop inside a Ray
Train TorchTrainer with 1 worker (goal <= 1.05x), and throughput of 2 workers x 1 thread (DDP,
gloo) vs 1 worker x 2 threads (goal >= 0.9x). Batches are random uint8 clips made once per
process from a fixed seed; the timed steps follow one warm-up step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def batches(n: int, batch: int, frames: int = 8, size: int = 112, classes: int = 10):
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, classes, (batch,), generator=g),
        )
        for _ in range(n)
    ]


def timed_loop(model_name: str, steps: int, batch: int, threads: int, ddp: bool = False) -> float:
    """Seconds per step (after one warm-up step) of the training step on in-memory batches."""
    from finegrain.datasets.pipeline import to_model_input
    from finegrain.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model("onepass", 10, model_name)
    if ddp:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = batches(steps + 1, batch)
    model.train()
    for i, (clips, labels) in enumerate(data):
        if i == 1:
            start = time.perf_counter()
        out = model(to_model_input(clips))
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def _ray_loop(config: dict) -> None:
    import ray.train

    per_step = timed_loop(
        config["model"], config["steps"], config["batch"], config["threads"], True
    )
    # Train V2 keeps a run's final metrics with its checkpoint: rank 0 attaches an empty one
    with tempfile.TemporaryDirectory() as d:
        rank0 = ray.train.get_context().get_world_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(d) if rank0 else None
        ray.train.report({"step_s": per_step}, checkpoint=checkpoint)


def ray_step(model_name: str, steps: int, batch: int, workers: int, threads: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"model": model_name, "steps": steps, "batch": batch, "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(storage_path="/tmp/finegrain-bench", name=f"overhead-{time.time()}"),
    )
    return trainer.fit().metrics["step_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "r2plus1d_18"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)

    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="error")
    rows = []
    for name in args.models:
        print(f"[{name}] plain loop, 2 threads ...", flush=True)
        plain = timed_loop(name, args.steps, args.batch, threads=2)
        print(f"[{name}] Ray Train, 1 worker x 2 threads ...", flush=True)
        one = ray_step(name, args.steps, args.batch, workers=1, threads=2)
        print(f"[{name}] Ray Train, 2 workers x 1 thread ...", flush=True)
        two = ray_step(name, args.steps, args.batch, workers=2, threads=1)
        # throughput (clips/s): 1 worker processes `batch` clips per step, 2 workers 2x that
        tp_one, tp_two = args.batch / one, 2 * args.batch / two
        rows.append((name, plain, one, one / plain, tp_one, tp_two, tp_two / tp_one))
    ray.shutdown()

    print(f"\nRay Train overhead (onepass, 8x112x112, batch {args.batch} per worker, 2 cores)")
    head = "| model | plain s/step | Ray 1w s/step | Ray/plain (<=1.05) "
    head += "| 1w x 2t clips/s | 2w x 1t clips/s | 2w/1w (>=0.9) |"
    print(head)
    print("|---|---|---|---|---|---|---|")
    for name, plain, one, ratio, tp1, tp2, scale in rows:
        print(
            f"| {name} | {plain:.3f} | {one:.3f} | {ratio:.2f} | {tp1:.1f} | {tp2:.1f} | "
            f"{scale:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
