"""Ray Train overhead: one table, one run, same model and the same in-memory batches.

    python bench/train_overhead.py [--models tiny r2plus1d_18] [--steps 4] [--batch 4]

For each model (at 8x112x112): step time of a plain PyTorch loop vs the same loop inside a Ray
Train TorchTrainer with 1 worker (goal <= 1.05x), and throughput of 2 workers x 1 thread (DDP,
gloo) vs 1 worker x 2 threads (goal >= 0.9x). Batches are random uint8 clips made once per
process from a fixed seed; the timed steps follow one warm-up step. Ray is started the way every
finegrain command starts it (``finegrain.platform.cluster.connect``: dashboard and State API on,
so Ray Train's placement-group cleaner works), so the overhead measured is the platform's.

Where the time goes: beside each step time, the CPU seconds per step of the stepping process(es)
(``time.process_time``: every thread of the step) and of the whole machine (``/proc/stat``)
over the same timed steps. On 2 cores a loop that keeps both busy loses to anything else that
runs: ``machine - step`` is what the rest (Ray's daemons, controller, dashboard; other load)
took from it.
"""

from __future__ import annotations

import argparse
import os
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


def machine_cpu_s() -> float:
    """CPU seconds used so far by the whole machine (all cores, ``/proc/stat``: user to steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


def timed_loop(
    model_name: str, steps: int, batch: int, threads: int, ddp: bool = False
) -> dict[str, float]:
    """Per step (after one warm-up step) of the training step on in-memory batches: wall
    seconds ``step_s``, CPU seconds of this process ``cpu_s`` and of the machine ``machine_s``."""
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
            start, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_s()
        out = model(to_model_input(clips))
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {
        "step_s": (time.perf_counter() - start) / steps,
        "cpu_s": (time.process_time() - cpu) / steps,
        "machine_s": (machine_cpu_s() - machine) / steps,
    }


def _ray_loop(config: dict) -> None:
    import ray.train

    from finegrain.platform.logs import quiet_ray_logs

    quiet_ray_logs()  # as a run's training worker: Train V2's INFO line per report off
    per_step = timed_loop(
        config["model"], config["steps"], config["batch"], config["threads"], True
    )
    if ray.train.get_context().get_world_size() > 1:  # the step's CPU: all workers together
        import torch.distributed as dist

        cpu = torch.tensor([per_step["cpu_s"]], dtype=torch.float64)
        dist.all_reduce(cpu)
        per_step["cpu_s"] = float(cpu)
    # Train V2 keeps a run's final metrics with its checkpoint: rank 0 attaches an empty one
    with tempfile.TemporaryDirectory() as d:
        rank0 = ray.train.get_context().get_world_rank() == 0
        checkpoint = ray.train.Checkpoint.from_directory(d) if rank0 else None
        ray.train.report(per_step, checkpoint=checkpoint)


def ray_step(
    model_name: str, steps: int, batch: int, workers: int, threads: int
) -> dict[str, float]:
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from finegrain.platform import cluster

    cluster.watch_preemptions()  # as a run sets up its trainer: no watcher on a fixed cluster
    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"model": model_name, "steps": steps, "batch": batch, "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=RunConfig(
            storage_path="/tmp/finegrain-bench",
            name=f"overhead-{time.time()}",
            logging_config=LoggingConfig(log_level="WARNING"),  # as the runs': no INFO lines
        ),
    )
    return trainer.fit().metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "r2plus1d_18"])
    p.add_argument(
        "--steps", type=int, help="timed steps per measurement (default: 40 tiny, 4 others)"
    )
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)

    from finegrain.platform import cluster

    cluster.connect(num_cpus=2)
    rows = []
    for name in args.models:
        steps = args.steps or (40 if name == "tiny" else 4)
        print(f"[{name}] plain loop, 2 threads, {steps} steps ...", flush=True)
        plain = timed_loop(name, steps, args.batch, threads=2)
        print(f"[{name}] Ray Train, 1 worker x 2 threads ...", flush=True)
        one = ray_step(name, steps, args.batch, workers=1, threads=2)
        print(f"[{name}] Ray Train, 2 workers x 1 thread ...", flush=True)
        two = ray_step(name, steps, args.batch, workers=2, threads=1)
        rows.append((name, plain, one, two))
    import ray

    ray.shutdown()

    print(f"\nRay Train overhead (onepass, 8x112x112, batch {args.batch} per worker, 2 cores)")
    head = "| model | plain s/step | Ray 1w s/step | Ray/plain (<=1.05) "
    head += "| 1w x 2t clips/s | 2w x 1t clips/s | 2w/1w (>=0.9) |"
    print(head)
    print("|---|---|---|---|---|---|---|")
    for name, plain, one, two in rows:
        # throughput (clips/s): 1 worker processes `batch` clips per step, 2 workers 2x that
        tp_one, tp_two = args.batch / one["step_s"], 2 * args.batch / two["step_s"]
        print(
            f"| {name} | {plain['step_s']:.3f} | {one['step_s']:.3f} | "
            f"{one['step_s'] / plain['step_s']:.2f} | {tp_one:.1f} | {tp_two:.1f} | "
            f"{tp_two / tp_one:.2f} |"
        )
    print("\nWhere the time goes: CPU seconds per step, the step's own process(es) vs the machine")
    print("| model | run | step s | step CPU s | machine CPU s | taken by the rest |")
    print("|---|---|---|---|---|---|")
    for name, *runs in rows:
        for what, r in zip(("plain, 2 threads", "Ray 1w x 2t", "Ray 2w x 1t"), runs):
            print(
                f"| {name} | {what} | {r['step_s']:.3f} | {r['cpu_s']:.3f} | "
                f"{r['machine_s']:.3f} | {r['machine_s'] - r['cpu_s']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
