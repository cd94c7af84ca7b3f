"""Model cost: parameters, forward GFLOPs (train / eval mode), and CPU time per train step.

    python bench/model_cost.py [--backbones tiny r2plus1d_18] [--methods ...] [--batch 2]
                               [--reps 2] [--threads 1] [--device cpu|cuda]

One table per backbone, clips ``(batch, 3, 8, 112, 112)``; r2plus1d_18 is built with
``keep_time=True`` (all rows) so that DSTS sees T = 4 time steps. Rows: every method of
``finegrain.models.METHODS`` whose module imports (others are listed as skipped), with
method-specific variants for DSTS (N = 1 and N = 10 without UDL, N = 10 with UDL).

Columns: ``params`` (millions); ``fwd GF train`` / ``fwd GF eval``: forward GFLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` in train and eval mode; ``step GF``: the whole train
step (forward with the meta step when the method has one, backward) counted the same way;
``step ms``: CPU wall time of one train step (the forward — which runs DSTS's UDL steps 1–2 on its
own backbone features and one no-grad backbone pass over D_val — loss, backward, SGD step; the
fastest of ``reps``, after the FLOP-counted step as warm-up), on ``--threads`` threads (default 1:
on a shared machine, spinning OpenMP threads make multi-threaded timings swing by several x);
``meta ms``: the meta step's share of it. ``--device cuda`` times the same steps on the GPU
(synchronised around each timed region; FLOPs are counted the same way).

Goals: DSTS eval FLOPs at N=10 <= 1.1x those at N=1 (issue 3); a UDL train step <= 1.5x a plain
DSTS step on r2plus1d_18 (issue 11, METHODS.md revised: the D_val batch's no-grad backbone pass
alone is about a third of a step).
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from finegrain.models import METHODS, build_model
from finegrain.models.base import FineGrainModel, MetaContext, trainable_parameters

BACKBONE_OPTIONS = {"tiny": {}, "r2plus1d_18": {"keep_time": True}}
VARIANTS: dict[str, list[tuple[str, dict]]] = {
    "dsts": [
        ("N=1", {"neurons": 1, "udl": False}),
        ("N=10", {"neurons": 10, "udl": False}),
        ("N=10 UDL", {"neurons": 10, "udl": True}),
    ],
}
NUM_CLASSES = 10


def _noop_reduce(tensors) -> None:  # one process: nothing to average
    pass


def _gflops(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: FineGrainModel, batch, extras, reps: int, device=None) -> dict[str, float]:
    device = device or torch.device("cpu")
    clips, labels = batch
    stage = model.training_stages()[0]
    model.begin_stage(0, lambda: iter([batch]), _noop_reduce)
    optimizer = torch.optim.SGD(trainable_parameters(model, stage), lr=1e-3, momentum=0.9)
    hook = model.hook_parameters()
    hook_optimizer = torch.optim.SGD(hook, lr=1e-3, momentum=0.9) if hook else None
    meta_s: list[float] = []
    udl_step = getattr(model, "udl_step", None)
    if udl_step is not None:  # time the meta step inside the forward

        def timed(x, meta):
            _sync(device)
            start = time.perf_counter()
            udl_step(x, meta)
            _sync(device)
            meta_s.append(time.perf_counter() - start)

        model.udl_step = timed

    def train_step() -> None:
        model.train()
        meta = None
        if model.extra_batches:
            meta = MetaContext(labels, extras, _noop_reduce, lr=1e-3, optimizer=hook_optimizer)
        loss = model.loss(model(clips, meta=meta) if meta else model(clips), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(train: bool) -> None:
        model.train(train)
        with torch.no_grad():
            model(clips)

    row = {
        "params": sum(p.numel() for p in model.parameters()) / 1e6,
        "fwd GF train": _gflops(lambda: forward(True)),
        "fwd GF eval": _gflops(lambda: forward(False)),
        "step GF": _gflops(train_step),
    }
    times = []
    meta_s.clear()
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        train_step()
        _sync(device)
        times.append(time.perf_counter() - start)
    row["step ms"] = 1e3 * min(times)
    row["meta ms"] = 1e3 * min(meta_s) if meta_s else 0.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONE_OPTIONS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    available, skipped = [], []
    for method in args.methods:
        try:
            importlib.import_module(METHODS[method])
            available.append(method)
        except ImportError as e:
            skipped.append(f"{method} (ImportError: {e})")

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.frames, args.size, args.size)
    batch = (torch.randn(shape, generator=g), torch.randint(0, NUM_CLASSES, (args.batch,)))
    extras = [(torch.randn(shape, generator=g), torch.randint(0, NUM_CLASSES, (args.batch,)))]
    batch = tuple(t.to(device) for t in batch)
    extras = [tuple(t.to(device) for t in e) for e in extras]
    cols = ["params", "fwd GF train", "fwd GF eval", "step GF", "step ms", "meta ms"]
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"clips {shape} on {on}, {torch.get_num_threads()} CPU threads, {args.reps} timed reps")
    if skipped:
        print("skipped: " + "; ".join(skipped))

    for backbone in args.backbones:
        bb_options = BACKBONE_OPTIONS.get(backbone, {})
        print(f"\n### {backbone} {bb_options or ''}\n")
        print("| method | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        results: dict[str, dict[str, float]] = {}
        for method in available:
            for label, options in VARIANTS.get(method, [("", {})]):
                name = f"{method} {label}".strip()
                torch.manual_seed(0)
                try:
                    model = build_model(method, NUM_CLASSES, backbone, **bb_options, **options)
                    row = measure(model.to(device), batch, extras, args.reps, device)
                except Exception as e:  # a method that cannot run here is reported, not fatal
                    print(f"| {name} | error: {type(e).__name__}: {e} |")
                    continue
                results[name] = row
                print(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |", flush=True)
        _goals(backbone, results)


def _goals(backbone: str, results: dict[str, dict[str, float]]) -> None:
    one, ten, udl = (results.get(f"dsts {k}") for k in ("N=1", "N=10", "N=10 UDL"))
    if one and ten:
        r = ten["fwd GF eval"] / one["fwd GF eval"]
        goal = "met" if r <= 1.1 else "MISSED"
        print(f"\nDSTS eval FLOPs N=10 / N=1 = {r:.3f} (goal <= 1.1: {goal})")
    if ten and udl:
        r_ms, r_gf = udl["step ms"] / ten["step ms"], udl["step GF"] / ten["step GF"]
        goal = "met" if r_ms <= 1.5 else "MISSED"
        print(
            f"DSTS UDL step / plain step = {r_ms:.2f}x time, {r_gf:.2f}x FLOPs "
            f"(goal <= 1.5 on r2plus1d_18: {goal if backbone == 'r2plus1d_18' else 'n/a'})"
        )


if __name__ == "__main__":
    main()
