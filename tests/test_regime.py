"""The regime every paper assumes (METHODS.md, revised): the project's pretrained backbone,
the backbone's learning rate, precise BN, warm-up in the first stage only, and DFB's global
branch as the one-pass baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import synthetic_clips

from finegrain.models import build_model
from finegrain.models.backbones import build_backbone
from finegrain.models.base import TrainingStage, trainable_named_parameters
from finegrain.platform.config import load_config, weights_path
from finegrain.platform.train import make_optimizer, make_scheduler, precise_bn

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "weights/tiny16-synthetic-pretrain.pt"


def test_the_shipped_pretrained_backbone_loads_as_an_ordinary_weights_file(monkeypatch):
    """What the fine-grained configs start from: a state dict (torch.load(weights_only=True))
    of the tiny width-16 backbone, made by `python experiments/pretrain.py` (its JSON says how),
    on classes disjoint from the benchmark's."""
    from finegrain.datasets.synthetic import CLASSES, PRETRAIN_CLASSES

    path = ROOT / WEIGHTS
    assert path.stat().st_size < 10 * 2**20
    state = torch.load(path, weights_only=True)
    backbone = build_backbone("tiny", width=16, weights=str(path))
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k]), k
    made = json.loads(path.with_suffix(".json").read_text())
    assert made["config"]["data"]["synthetic"]["kind"] == "pretrain"
    assert made["command"].startswith("python experiments/pretrain.py")
    assert not {c.name for c in CLASSES} & {c.name for c in PRETRAIN_CLASSES}
    for name in ("synthetic", "tune_synthetic"):  # the default fine-grained configs use it
        cfg = load_config(name)
        assert weights_path(cfg.model.weights) == path and cfg.model.width == 16
        monkeypatch.chdir(ROOT / "tests")  # from any working directory
        assert weights_path(cfg.model.weights) == path
        monkeypatch.undo()


def test_the_backbone_trains_at_its_own_rate_the_same_for_every_method():
    cfg = load_config("tune_synthetic", ["optim.backbone_lr_scale=0.1", "model.weights=null"])
    for method in ("onepass", "dsts", "u2s", "dfb", "classreg", "joint_attn"):
        model = build_model(method, 4, "tiny", width=4)
        params = trainable_named_parameters(model, TrainingStage("train"))
        opt = make_optimizer(cfg, params, 1.0, model.pretrained_prefixes())
        head, backbone = opt.param_groups
        assert head["lr"] == pytest.approx(cfg.optim.lr)
        assert backbone["lr"] == pytest.approx(0.1 * cfg.optim.lr)
        ids = {id(p) for p in backbone["params"]}
        assert ids == {id(p) for n, p in params if n.startswith(model.pretrained_prefixes())}
        assert {id(p) for p in model.backbone.parameters()} <= ids
    u2s = build_model("u2s", 4, "tiny", width=4)  # the CSN's stages are pretrained copies too
    assert "specific_stages." in u2s.pretrained_prefixes()


def test_warm_up_only_in_the_first_stage_and_each_stage_anneals_on_its_own():
    cfg = load_config("tune_synthetic", ["optim.warmup_epochs=1", "model.weights=null"])
    first, later = (
        make_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], 1.0), 4, w)
        for w in (True, False)
    )
    rates = {"first": [], "later": []}
    for name, sched in (("first", first), ("later", later)):
        for _ in range(4):
            rates[name].append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
    assert rates["first"][0] == pytest.approx(0.5)  # warm-up
    assert rates["later"][0] == pytest.approx(1.0)  # no warm-up: the cosine starts at once
    assert rates["later"] == sorted(rates["later"], reverse=True)  # annealed within the stage


def test_precise_bn_makes_evaluation_use_the_statistics_of_training_batches():
    """Short runs evaluate with running statistics that lag the weights; recomputed on a batch
    (cumulative average, momentum restored), evaluation normalises as training mode does."""
    torch.manual_seed(0)
    model = build_model("onepass", 12, "tiny", width=8, dropout=0.0)
    x, _ = synthetic_clips(per_class=2, classes=12, size=32)
    for m in model.modules():  # statistics far from this data's
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(3, 9)
    model.train()
    with torch.no_grad():
        train_mode = model(x).logits
    model.eval()
    with torch.no_grad():
        before = model(x).logits
    model.train()
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    reduced = []
    assert precise_bn(model, [(x, None)], reduced.extend) == 1
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)] == momenta
    assert len(reduced) == 2 * len(momenta)  # mean and var of every BN, averaged across ranks
    model.eval()
    with torch.no_grad():
        after = model(x).logits
    gap_before = (before - train_mode).abs().max().item()
    gap_after = (after - train_mode).abs().max().item()
    assert gap_after < 0.05 * gap_before and gap_after < 0.05, (gap_before, gap_after)


def test_dfb_with_the_global_branch_alone_is_the_one_pass_baseline():
    """DFB's check owed (METHODS.md): branches=gb builds, initialises, runs and trains exactly
    like one-pass for the same seed."""
    x, y = synthetic_clips(per_class=1, classes=12, size=32)
    runs = {}
    for method, options in (("onepass", {}), ("dfb", {"branches": "gb"})):
        torch.manual_seed(3)
        model = build_model(method, 12, "tiny", width=8, **options)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        torch.manual_seed(4)
        losses = []
        for _ in range(3):
            loss = model.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[method] = (losses, model.state_dict())
    assert runs["onepass"][0] == runs["dfb"][0]
    for k, v in runs["onepass"][1].items():
        assert torch.equal(v, runs["dfb"][1][k]), k


def _precise_bn_rank(rank: int, world: int, init: str, clips: torch.Tensor, out: str) -> None:
    """One DDP rank (gloo): the same initial model, its own share of the batches, precise BN
    with the trainer's cross-rank average; saves its BatchNorm buffers."""
    import torch.distributed as dist

    from finegrain.platform.stages import reduce_mean

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model("onepass", 12, "tiny", width=4, dropout=0.0).train()
        share = clips.chunk(world)[rank]
        with torch.no_grad():
            assert precise_bn(model, [(share, None)], reduce_mean) == 1
        torch.save(_bn_buffers(model), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))
    }


def test_precise_bn_leaves_every_ddp_rank_the_statistics_of_all_ranks_batches(tmp_path):
    """With DDP each rank recomputes the statistics on its own batches; the trainer's reduce
    averages them, so every rank evaluates with the same buffers: those of one process that
    saw every rank's batch (equal batches: the cumulative average is a mean over batches)."""
    import torch.multiprocessing as mp

    x, _ = synthetic_clips(per_class=2, classes=12, size=32)  # 24 clips: 12 per rank
    init = f"file://{tmp_path / 'store'}"
    mp.spawn(_precise_bn_rank, args=(2, init, x, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.manual_seed(0)
    model = build_model("onepass", 12, "tiny", width=4, dropout=0.0).train()
    with torch.no_grad():
        assert precise_bn(model, [(half, None) for half in x.chunk(2)], lambda _: None) == 2
    alone = _bn_buffers(model)
    assert ranks[0].keys() == alone.keys() and len(alone) >= 10
    for k in alone:
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank the same
        assert torch.allclose(ranks[0][k], alone[k], rtol=1e-4, atol=1e-5), k
