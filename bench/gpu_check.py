"""The prepared GPU check: NCCL DDP, bf16 autocast and a Ray Data feed that keeps a GPU busy.

    python bench/gpu_check.py                      # on a GPU machine (<= 6 minutes on one GPU)
    python bench/gpu_check.py --device cpu --tiny  # the dry run (gloo, seconds; in the tests)
    python bench/gpu_check.py --shards DIR         # on shards built elsewhere (no encoder there)

It builds its own small synthetic shards (no download), starts a local Ray sized to the
machine, and runs everything inside one 1-worker ``TorchTrainer`` (NCCL on GPU, gloo on CPU:
the platform's path through ``prepare_model``). For each configuration — r2plus1d_18
(``keep_time``) and the tiny backbone, each with the one-pass baseline and DSTS (N=10, L=3;
UDL off: its meta step needs a second stream, which is not what this measures):

- **feed**: clips/s of the training step fed (a) by the Ray Data pipeline (decode actors sized
  to the machine's cores, uint8 clips to the device with ``non_blocking``, normalised there) and
  (b) by clips already in device memory, timed twice: before (a), on random clips of the same
  shape, and after it, on (a)'s clips; a/b against the faster (goal >= 0.9: the pipeline is
  never the bottleneck). All count the steps after the first (start-up is shown separately);
  beside them the CPU ms per step of the stepping thread (near the wall time per step: the
  host cannot queue steps fast enough) and of the process's other threads (a busy one takes
  the GIL the stepping thread needs).
- **amp**: step time in bf16 autocast vs fp32 on the in-memory clips, from the same
  initialisation and batches: the first step's loss (the numerics: within ``--amp-tol`` of
  fp32's, relative) and the loss after ``--steps`` steps (finite; shown, not compared: DSTS's
  discrete routing may take another path once bf16 flips one choice).
- **DSTS eval**: wall time of an evaluation forward with N=10 neurons vs N=1 (goal <= 1.1x:
  grouping the clips by neuron must not cost what the FLOPs saved).
- **peak memory** of the device per configuration (GPU only).

Prints one Markdown table; writes it to ``$OUT/gpu_check.md`` (and the raw numbers to
``gpu_check.json``) when ``OUT`` is set, else next to ``--work``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# (backbone, method, backbone options, method options)
CONFIGS = [
    ("r2plus1d_18", "onepass", {"keep_time": True}, {}),
    ("r2plus1d_18", "dsts", {"keep_time": True}, {"udl": False}),
    ("tiny", "onepass", {"width": 16}, {}),
    ("tiny", "dsts", {"width": 16}, {"udl": False}),
]
TINY_CONFIGS = [
    ("tiny", "onepass", {"width": 4}, {}),
    ("tiny", "dsts", {"width": 4}, {"udl": False, "neurons": 10, "layers": 1}),
]


def settings(args) -> dict:
    """Sizes of the check: the GPU run, or the seconds-long dry run (``--tiny``)."""
    if args.tiny:
        return dict(classes=4, videos=4, size=32, frames=8, short=32, crop=32, batch=4, steps=3)
    return dict(classes=12, videos=12, size=64, frames=8, short=128, crop=112, batch=32, steps=20)


def make_shards(work: Path, s: dict) -> Path:
    """Small synthetic fine-grained shards under ``work`` (rendered and encoded here)."""
    from finegrain.datasets.shards import is_current, prepare
    from finegrain.datasets.synthetic import ensure_synthetic

    raw, out = work / "raw", work / "shards"
    ensure_synthetic(
        raw,
        classes=s["classes"],
        videos_per_class=s["videos"],
        size=s["size"],
        workers=os.cpu_count() or 2,
        progress=False,
    )
    if not is_current(out):
        prepare("ssv2", raw, out, extensions=("mp4",), shard_mb=4, progress=False)
    return out


def _step(model, opt, clips, labels, autocast, to_model_input):
    with autocast:
        out = model(to_model_input(clips))
        loss = (
            model.module.loss(out, labels) if hasattr(model, "module") else model.loss(out, labels)
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(cfg: dict, classes: int, device: torch.device, prepare: bool = True):
    import ray.train.torch

    from finegrain.models import build_model

    torch.manual_seed(0)
    backbone, method, bb, opts = cfg
    model = build_model(method, classes, backbone, **bb, **opts)
    model = ray.train.torch.prepare_model(model) if prepare else model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def _autocast(device: torch.device, bf16: bool):
    from contextlib import nullcontext

    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _timed_steps(model, opt, batches, autocast, device, to_model_input) -> tuple:
    """(seconds per step after the first, loss of the first step, loss of the last step, CPU
    seconds per step of this thread and of the process's other threads) over in-memory
    ``batches``."""
    model.train()
    loss = _step(model, opt, *batches[0], autocast, to_model_input)
    first = float(loss.detach())
    start, cpu = time.perf_counter(), _cpu()
    for clips, labels in batches[1:]:
        loss = _step(model, opt, clips, labels, autocast, to_model_input)
    _sync(device)
    n = max(1, len(batches) - 1)
    thread, others = ((now - then) / n for now, then in zip(_cpu(), cpu))
    return (time.perf_counter() - start) / n, first, float(loss.detach()), (thread, others)


def _cpu() -> tuple[float, float]:
    """CPU seconds so far of this thread and of this process's other threads (a busy one holds
    the GIL the stepping thread needs to queue its kernels)."""
    thread = time.thread_time()
    return thread, time.process_time() - thread


def check_worker(config: dict) -> None:
    """The whole check inside one Ray Train worker; rank 0 reports one row per configuration."""
    import ray.data
    import ray.train
    import ray.train.torch

    from finegrain.datasets.pipeline import (
        ClipConfig,
        build_clip_dataset,
        iter_clip_batches,
        read_classes,
        to_model_input,
    )
    from finegrain.platform.logs import quiet_ray_logs
    from finegrain.platform.worker import say

    quiet_ray_logs()  # as the training runs' workers: no INFO line per report on the console
    ray.data.DataContext.get_current().enable_progress_bars = False  # one table, no bars
    s, device = config["settings"], ray.train.torch.get_device()
    classes = len(read_classes(config["shards"]))
    clip = ClipConfig(
        num_frames=s["frames"],
        short_side=s["short"],
        crop_size=s["crop"],
        flip=True,
        decode_actors=config["decode_actors"],
        cpus_per_actor=config["cpus_per_actor"],
        decode_batch=8,
    )
    steps, batch, bf16 = s["steps"], s["batch"], config["bf16"]
    rows = []
    for cfg in config["configs"]:
        name = f"{cfg[0]} · {cfg[1]}"
        say(f"[gpu_check] {name}")  # once (Train's print patch would echo a print)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        epochs = math.ceil((steps + 1) * batch / config["train_rows"]) + 1
        ds = build_clip_dataset(
            config["shards"], "train", clip, train=True, seed=0, epochs=range(epochs)
        )
        autocast = _autocast(device, bf16)
        # (b) before any execution in this process: random clips of the same shape, in memory
        g = torch.Generator().manual_seed(0)
        shape = (batch, s["frames"], s["crop"], s["crop"], 3)
        noise = [
            (
                torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device),
                torch.randint(0, classes, (batch,), generator=g).to(device),
            )
            for _ in range(steps + 1)
        ]
        model, opt = _build(cfg, classes, device)
        before = _timed_steps(model, opt, noise, autocast, device, to_model_input)
        del noise
        # (a) fed by the pipeline: the clips of the epochs in order, to the device as they come
        model, opt = _build(cfg, classes, device)
        cached, started, start_up, cpu = [], time.perf_counter(), 0.0, (0.0, 0.0)
        feed = iter_clip_batches(ds, batch, device=device)
        for b in feed:
            if len(b["labels"]) < batch:
                continue
            _step(model, opt, b["clips"], b["labels"], autocast, to_model_input)
            cached.append((b["clips"], b["labels"]))
            if len(cached) == 1:
                _sync(device)
                start_up, started = time.perf_counter() - started, time.perf_counter()
                cpu = _cpu()
            if len(cached) == steps + 1:
                break
        _sync(device)
        fed = steps * batch / (time.perf_counter() - started)
        fed_cpu = tuple((now - then) / steps for now, then in zip(_cpu(), cpu))
        feed.close()  # ends the execution: its decode actors free their CPUs for the next one
        del feed, ds
        gc.collect()
        # (b) again after it: the same clips, already in device memory, a fresh model from the
        # same seed. The faster of the two is the device's rate (a first H200 run had (b) after
        # the feed 1.4-1.6x slower than the feed itself: the two timings tell the next one why)
        model, opt = _build(cfg, classes, device)
        after = _timed_steps(model, opt, cached, autocast, device, to_model_input)
        resident = batch / min(before[0], after[0])
        # bf16 vs fp32: same initialisation, same batches, unwrapped (no DDP hooks in the way)
        amp = {}
        for label, use in (("fp32", False), ("bf16", True)):
            model, opt = _build(cfg, classes, device, prepare=False)
            amp[label] = _timed_steps(
                model, opt, cached, _autocast(device, use), device, to_model_input
            )
        rows.append(
            {
                "config": name,
                "start_up_s": start_up,
                "fed_clips_s": fed,
                "resident_clips_s": resident,
                "resident_before_clips_s": batch / before[0],
                "resident_after_clips_s": batch / after[0],
                "feed_ratio": fed / resident,
                # (this thread, the process's other threads) per timed step
                "cpu_ms_per_step": {
                    "fed": [1e3 * t for t in fed_cpu],
                    "before": [1e3 * t for t in before[3]],
                    "after": [1e3 * t for t in after[3]],
                },
                "fp32_step_s": amp["fp32"][0],
                "bf16_step_s": amp["bf16"][0],
                "fp32_loss": amp["fp32"][1],
                "bf16_loss": amp["bf16"][1],
                "fp32_last_loss": amp["fp32"][2],
                "bf16_last_loss": amp["bf16"][2],
                "dsts_eval_ratio": _dsts_eval_ratio(cfg, classes, cached, device, to_model_input)
                if cfg[1] == "dsts"
                else None,
                "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
                if device.type == "cuda"
                else None,
            }
        )
        del model, opt, cached
    with tempfile.TemporaryDirectory() as d:
        # Train V2 keeps a run's final metrics with its checkpoint: rank 0 attaches an empty one
        ray.train.report({"rows": rows}, checkpoint=ray.train.Checkpoint.from_directory(d))


@torch.no_grad()
def _dsts_eval_ratio(cfg, classes, batches, device, to_model_input, repeats: int = 3) -> float:
    """Eval-forward wall time of DSTS with N=10 neurons over N=1 (same clips, best of repeats)."""
    from finegrain.models import build_model

    backbone, method, bb, opts = cfg
    times = {}
    for n in (10, 1):
        torch.manual_seed(0)
        model = build_model(method, classes, backbone, **bb, **{**opts, "neurons": n}).to(device)
        model.eval()
        model(to_model_input(batches[0][0]))  # warm-up (kernels, allocator)
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            for clips, _ in batches:
                model(to_model_input(clips))
            _sync(device)
            best = min(best, time.perf_counter() - start)
        times[n] = best
    return times[10] / times[1]


def _f(x, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def table(rows: list[dict], header: str, amp_tol: float) -> tuple[str, bool]:
    """The Markdown table and whether every goal is met."""
    lines = [
        header,
        "",
        "| configuration | start-up s | (a) Ray Data clips/s "
        "| (b) in-memory clips/s, before / after (a) | a/b (≥ 0.9) "
        "| CPU ms/step (thread+others) a / b before / after | fp32 s/step | bf16 s/step "
        "| step-1 loss fp32 → bf16 | last loss fp32 → bf16 | DSTS eval N=10/N=1 (≤ 1.1) "
        "| peak GiB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ok = True
    for r in rows:
        loss_ok = math.isfinite(r["bf16_loss"]) and abs(r["bf16_loss"] - r["fp32_loss"]) <= (
            amp_tol * max(1.0, abs(r["fp32_loss"]))
        )
        last_ok = math.isfinite(r["bf16_last_loss"]) and math.isfinite(r["fp32_last_loss"])
        feed_ok = r["feed_ratio"] >= 0.9
        eval_ok = r["dsts_eval_ratio"] is None or r["dsts_eval_ratio"] <= 1.1
        ok = ok and loss_ok and last_ok and feed_ok and eval_ok
        mark = lambda good: "" if good else " ✗"  # noqa: E731
        c = r["cpu_ms_per_step"]
        cpu = " / ".join("{:.1f}+{:.1f}".format(*c[k]) for k in ("fed", "before", "after"))
        lines.append(
            f"| {r['config']} | {r['start_up_s']:.1f} | {r['fed_clips_s']:.1f} | "
            f"{r['resident_before_clips_s']:.1f} / {r['resident_after_clips_s']:.1f} | "
            f"{r['feed_ratio']:.2f}{mark(feed_ok)} | {cpu} | "
            f"{r['fp32_step_s']:.3f} | {r['bf16_step_s']:.3f} | "
            f"{r['fp32_loss']:.3f} → {r['bf16_loss']:.3f}{mark(loss_ok)} | "
            f"{r['fp32_last_loss']:.3f} → {r['bf16_last_loss']:.3f}{mark(last_ok)} | "
            f"{_f(r['dsts_eval_ratio'], '{:.2f}')}{'' if eval_ok else ' ✗'} | "
            f"{_f(r['peak_mem_gib'], '{:.2f}')} |"
        )
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="seconds-long sizes (the CPU dry run)")
    p.add_argument("--steps", type=int, help="timed training steps per configuration")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finegrain-gpu-check")
    p.add_argument(
        "--shards",
        type=Path,
        help="prepared shards (build_shards.py's output) instead of the synthetic ones made "
        "under --work: a GPU machine without PyAV, or your own data",
    )
    p.add_argument("--amp-tol", type=float, default=0.1, help="bf16 vs fp32 loss, relative")
    p.add_argument("--no-bf16-train", action="store_true", help="the fed/in-memory steps in fp32")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu --tiny for the dry run)")

    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from finegrain.datasets.pipeline import split_rows
    from finegrain.platform import cluster

    s = settings(args)
    if args.steps:
        s["steps"] = args.steps
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.shards:
        from finegrain.datasets.shards import is_current

        if not is_current(args.shards):
            p.error(f"--shards {args.shards}: no shards of this format there (build_shards.py)")
        shards = args.shards.resolve()
        print(f"[gpu_check] shards in {shards}", flush=True)
    else:
        print(f"[gpu_check] synthetic shards in {args.work} ...", flush=True)
        shards = make_shards(args.work, s)
    cpus = os.cpu_count() or 2
    cluster.connect(num_cpus=cpus)
    cluster.watch_preemptions()  # as the training runs: no watcher where nothing drains nodes
    gpu = args.device == "cuda"
    # the worker holds 1 CPU; decode actors take the rest (one core each on a GPU machine)
    actors = max(1, cpus - 2) if gpu else 1
    trainer = TorchTrainer(
        check_worker,
        train_loop_config={
            "settings": s,
            "shards": str(shards),
            "train_rows": sum(split_rows(shards, "train").values()),
            "configs": TINY_CONFIGS if args.tiny else CONFIGS,
            "decode_actors": actors,
            "cpus_per_actor": 1.0 if gpu else 0.5,
            "bf16": not args.no_bf16_train and gpu,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            storage_path=str(args.work / "ray"),
            name=f"check-{int(time.time())}",
            # as the training runs: no INFO line per report and checkpoint on the console
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    rows = trainer.fit().metrics["rows"]
    ray.shutdown()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({cpus} cores)"
    header = (
        f"GPU check on {device}: {s['frames']}×{s['crop']}² clips, batch {s['batch']}, "
        f"{s['steps']} timed steps, {actors} decode actor(s), "
        f"{'NCCL' if gpu else 'gloo'}, fed steps in {'bf16' if gpu and not args.no_bf16_train else 'fp32'}; "
        f"{time.perf_counter() - started:.0f} s in all"
    )
    md, ok = table(rows, header, args.amp_tol)
    print("\n" + md, flush=True)
    out = Path(os.environ.get("OUT") or args.work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(md)
    (out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(f"written to {out / 'gpu_check.md'}" + ("" if ok else "; goals not met: ✗"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
