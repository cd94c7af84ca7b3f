"""Learnability probe of the synthetic fine-grained benchmark: is it above chance, and are the
confusable pairs the hard part?

    python bench/synthetic_probe.py [--data DIR] [--epochs 30] [--frames 8] [--size 32]

Generates the default benchmark under ``--data`` (or reuses it: ``ensure_synthetic``), decodes
every video once with decord at ``--size`` px, then trains a tiny 3D CNN on CPU for a few
minutes: TSN-style sampling of ``--frames`` frames (a random frame per segment when training, the
centre one when evaluating). Prints one table: validation accuracy against chance, accuracy on the
classes whose difference from their group is spatial vs temporal, group accuracy (the prediction
lands in the right group), and the share of the errors that stay inside the true class's group.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import decord
import numpy as np
import torch
from torch import nn

from finegrain.datasets.synthetic import ensure_synthetic


def load(root: Path, size: int) -> tuple[list[np.ndarray], list[int], list[str], dict, list[str]]:
    """All videos decoded at ``size`` px: (clips (T, S, S, 3) uint8, labels, splits, classes,
    class names by index). Reads the SSv2 layout directly (no manifest needed for a probe)."""
    labels = {name: int(i) for name, i in json.loads((root / "labels.json").read_text()).items()}
    classes = json.loads((root / "classes.json").read_text())
    clips, ys, splits = [], [], []
    for split in ("train", "validation"):
        for entry in json.loads((root / f"{split}.json").read_text()):
            name = entry["template"].replace("[", "").replace("]", "")
            vr = decord.VideoReader(
                str(root / "videos" / f"{entry['id']}.mp4"), width=size, height=size
            )
            clips.append(vr.get_batch(list(range(len(vr)))).asnumpy())
            ys.append(labels[name])
            splits.append(split)
    names = sorted(labels, key=labels.get)
    return clips, ys, splits, classes, names


def sample(clip: np.ndarray, frames: int, rng: np.random.Generator | None) -> np.ndarray:
    """TSN: one frame per equal segment, random (train) or centre (eval, ``rng=None``)."""
    edges = np.linspace(0, len(clip), frames + 1)
    if rng is None:
        idx = (edges[:-1] + edges[1:]) / 2
    else:
        idx = edges[:-1] + rng.random(frames) * (edges[1:] - edges[:-1])
    return clip[np.minimum(idx.astype(int), len(clip) - 1)]


def batch(clips: list[np.ndarray]) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 → normalised (B, 3, T, H, W) float."""
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255
    return (x - 0.45) / 0.225


def tiny_cnn(num_classes: int, width: int = 24) -> nn.Module:
    """Four 3x3x3 conv-BN-ReLU blocks (space pooled from the first, time from the second)."""

    def block(cin: int, cout: int, pool: tuple[int, int, int]) -> list[nn.Module]:
        return [
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool3d(pool),
        ]

    w = width
    return nn.Sequential(
        *block(3, w, (1, 2, 2)),
        *block(w, 2 * w, (2, 2, 2)),
        *block(2 * w, 4 * w, (2, 2, 2)),
        *block(4 * w, 4 * w, (1, 1, 1)),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4 * w, num_classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/synthetic-default"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    root = ensure_synthetic(args.data)
    t_gen = time.perf_counter() - t0
    clips, ys, splits, classes, names = load(root, args.size)
    t_dec = time.perf_counter() - t0 - t_gen
    train = [i for i, s in enumerate(splits) if s == "train"]
    val = [i for i, s in enumerate(splits) if s == "validation"]
    k = len(names)

    model = tiny_cnn(k)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * -(-len(train) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    t1 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(train)
        total = 0.0
        for s in range(0, len(order), args.batch_size):
            idx = order[s : s + args.batch_size]
            x = batch([sample(clips[i], args.frames, rng) for i in idx])
            y = torch.tensor([ys[i] for i in idx])
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == 0:
            print(
                f"epoch {epoch + 1:3d}  loss {total / len(train):.3f}  {time.perf_counter() - t1:.0f}s",
                flush=True,
            )
    t_train = time.perf_counter() - t1

    model.eval()
    with torch.no_grad():
        x = batch([sample(clips[i], args.frames, None) for i in val])
        pred = model(x).argmax(1).numpy()
    true = np.array([ys[i] for i in val])
    group = np.array([classes[n]["group"] for n in names])
    subtle = np.array([classes[n]["subtlety"] for n in names])
    correct = pred == true
    wrong = ~correct
    rows = [
        ("val videos", f"{len(val)} ({len(train)} train, {k} classes)"),
        ("val accuracy", f"{correct.mean():.3f}  (chance {1 / k:.3f})"),
    ]
    for kind in ("spatial", "temporal"):
        m = subtle[true] == kind
        rows.append((f"  {kind}-subtle classes", f"{correct[m].mean():.3f}  ({m.sum()} videos)"))
    rows.append(("group accuracy", f"{(group[pred] == group[true]).mean():.3f}"))
    same = (group[pred] == group[true])[wrong]
    n_groups = len(set(group))
    chance_same = np.mean([(group == group[c]).sum() - 1 for c in range(k)]) / (k - 1)
    rows.append(
        (
            "errors inside the true group",
            f"{same.mean() if wrong.any() else float('nan'):.3f}  "
            f"({same.sum()}/{wrong.sum()}; {chance_same:.3f} if errors were uniform over "
            f"{k - 1} classes, {n_groups} groups)",
        )
    )
    for g in dict.fromkeys(group):
        m = group[true] == g
        rows.append((f"  {g} ({subtle[group == g][0]})", f"{correct[m].mean():.3f}"))
    rows.append(("time", f"generate/reuse {t_gen:.1f}s, decode {t_dec:.1f}s, train {t_train:.0f}s"))
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'metric':{width}s} | value")
    print(f"|-{'-' * width}-|------")
    for key, value in rows:
        print(f"| {key:{width}s} | {value}")


if __name__ == "__main__":
    main()
