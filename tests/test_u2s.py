"""U2S: shapes, the three training stages, the CSM, category regularization, ablations, oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models import build_model
from finegrain.models.base import trainable_parameters
from finegrain.models.u2s import (
    alpha_for_confusers,
    binary_csm,
    category_regularization,
    channel_sparsity,
    mean_confusers,
    similarity_from_sparsity,
    topn_confusers,
)

K = 4


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def u2s(**options):
    torch.manual_seed(0)
    return build_model("u2s", K, **options)


def ready(model, batch):
    """Past stage 1: CSM installed from ``batch``, the CSN on."""
    model.begin_stage(1, lambda: [batch])
    return model


# --- shapes, determinism, training --------------------------------------------------------


def test_un_only_mode_before_the_csm(batch):
    clips, labels = batch
    model = u2s()
    out = model(clips)
    assert out.logits.shape == (4, K) and set(out.extras) == {"universal"}
    torch.testing.assert_close(out.logits, F.log_softmax(out.extras["universal"], dim=1))
    torch.testing.assert_close(
        model.loss(out, labels), F.cross_entropy(out.extras["universal"], labels)
    )


def test_shapes_tiny_full_model(batch):
    clips, labels = batch
    model = ready(u2s(), batch)
    out = model(clips)
    assert out.logits.shape == (4, K)
    assert set(out.extras) == {"universal", "bridge", "specific"}
    assert all(z.shape == (4, K) for z in out.extras.values())
    # logits = log of the mean of the three softmaxes
    mean = torch.stack([z.softmax(1) for z in out.extras.values()]).mean(0)
    torch.testing.assert_close(out.logits.exp(), mean)
    assert set(out.aux_losses) == {"category_reg"}
    assert out.diagnostics["mask"].shape == (4, 4, 2, 2)  # tiny: T/2, H/16, W/16
    assert out.diagnostics["csm"].shape == (K, K)
    expected = sum(F.cross_entropy(z, labels) for z in out.extras.values())
    torch.testing.assert_close(model.loss(out, labels), expected + out.aux_losses["category_reg"])


@pytest.mark.filterwarnings("ignore:U2S CSM")
def test_shapes_r2plus1d_18():
    torch.manual_seed(0)
    model = build_model("u2s", 5, backbone="r2plus1d_18").eval()
    clips, labels = torch.randn(2, 3, 8, 32, 32), torch.tensor([0, 3])
    model.compute_csm([(clips, labels)])
    out = model(clips)
    assert out.logits.shape == (2, 5) and set(out.extras) == {"universal", "bridge", "specific"}
    assert model.mask_network.weight.shape == (5, 512, 1, 1, 1)
    assert len(model.specific_stages) == 2  # layer3, layer4 owned


def test_eval_is_deterministic(batch):
    model = ready(u2s(), batch).eval()
    a, b = model(batch[0]), model(batch[0])
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_train_steps_reduce_the_loss(batch):
    clips, labels = batch
    model = ready(u2s(dropout=0.0), batch).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = model.loss(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- ablations and option validation ----------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"fuse": "universal"},
        {"fuse": "bridge,specific"},
        {"fuse": ["universal", "specific"]},
        {"fuse": ("specific",)},
        {"category_reg": False},
        {"mask": "own_class_only"},
        {"csm": "soft"},
        {"mask_network": False},
        {"mask_network": False, "fuse": "specific"},
        {"csn_init": "universal"},
        {"owned_stages": 1},
        {"owned_stages": 4},
        {"alpha": 0.5},
        {"confusers": 1},
        {"freeze_bn": False},
    ],
)
def test_every_ablation_builds_trains_and_runs(options, batch):
    clips, labels = batch
    model = u2s(**options)
    model.loss(model(clips), labels).backward()
    ready(model, batch).train()
    out = model(clips)
    model.loss(out, labels).backward()
    assert out.logits.shape == (4, K) and torch.isfinite(out.logits).all()


def test_fuse_selects_the_averaged_predictions(batch):
    model = ready(u2s(fuse="universal,specific"), batch).eval()
    out = model(batch[0])
    mean = (out.extras["universal"].softmax(1) + out.extras["specific"].softmax(1)) / 2
    torch.testing.assert_close(out.logits.exp(), mean)
    assert u2s(fuse=["specific", "universal"]).fuse == ("universal", "specific")


def test_no_mask_network_is_a_plain_two_branch_ensemble(batch):
    model = ready(u2s(mask_network=False), batch)
    out = model(batch[0])
    assert model.mask_network is None
    assert set(out.extras) == {"universal", "specific"} and not out.aux_losses


def test_category_reg_off_drops_the_term(batch):
    out = ready(u2s(category_reg=False), batch)(batch[0])
    assert not out.aux_losses


@pytest.mark.parametrize(
    "options, field",
    [
        ({"fuse": "universal,foo"}, "fuse"),
        ({"fuse": ""}, "fuse"),
        ({"mask_network": False, "fuse": "bridge"}, "fuse"),
        ({"csm": "hard"}, "csm"),
        ({"mask": "all"}, "mask"),
        ({"csn_init": "random"}, "csn_init"),
        ({"owned_stages": 0}, "owned_stages"),
        ({"owned_stages": 5}, "owned_stages"),
        ({"alpha": 1.5}, "alpha"),
        ({"confusers": 4}, "confusers"),
        ({"confusers": "many"}, "confusers"),
        ({"confusers_topn_target": 0.0}, "confusers_topn_target"),
        ({"stage_shares": (0.5, 0.5)}, "stage_shares"),
        ({"lam": -1.0}, "lam"),
        ({"category_reg": "yes"}, "category_reg"),
        ({"oracle": 1}, "oracle"),
        ({"oracle": True, "mask_network": False}, "oracle"),
        ({"joint_lr_scale": 0.0}, "joint_lr_scale"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_options_fail_fast(options, field):
    with pytest.raises(ValueError, match=field):
        u2s(**options)


# --- category similarity matrix -------------------------------------------------------------


def test_csm_from_hand_made_sparsity_vectors():
    xi = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.9, 0.1, 0.0],  # cos with class 0: 0.994
            [0.0, 0.0, 1.0],
            [0.0, 0.6, 0.8],  # cos with class 2: 0.8, with class 1: 0.066
        ]
    )
    s = similarity_from_sparsity(xi)
    assert s.min() >= 0 and s.max() <= 1
    torch.testing.assert_close(s[0, 1], torch.tensor(0.9 / (0.81 + 0.01) ** 0.5))
    expected = torch.tensor(
        [[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    )  # α = 0.75: {0, 1} and {2, 3}
    torch.testing.assert_close(binary_csm(s, 0.75), expected)
    only_01 = torch.eye(4)
    only_01[0, 1] = only_01[1, 0] = 1
    torch.testing.assert_close(binary_csm(s, 0.9), only_01)  # α = 0.9: only {0, 1}
    torch.testing.assert_close(binary_csm(s, 1.0), torch.eye(4))  # diagonal always 1
    assert mean_confusers(binary_csm(s, 0.75)) == 1.0


def test_install_csm_through_the_model_with_alpha():
    model = u2s(alpha=0.75)
    xi = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]])
    xi = torch.cat([xi, torch.zeros(4, model.backbone.out_channels - 3)], dim=1)
    counts = torch.tensor([2.0, 3.0, 1.0, 4.0])
    c = model.install_csm(xi * counts.unsqueeze(1), counts)  # sums = Ξ_m · count
    torch.testing.assert_close(c, binary_csm(similarity_from_sparsity(xi), 0.75))
    assert bool(model.specific_enabled) and float(model.csm_alpha) == 0.75
    assert model.csm_diagnostics()["mean_confusers"] == 1.0


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7])
def test_confusers_n_gives_n_confusers_on_average(n):
    xi = torch.rand(8, 16, generator=torch.Generator().manual_seed(n))
    s = similarity_from_sparsity(xi)
    assert mean_confusers(binary_csm(s, alpha_for_confusers(s, n))) == n


@pytest.mark.parametrize(
    ("table", "target", "confusers"),
    [
        ([0.5, 0.92, 0.97, 1.0], 0.9, 1),  # top-2 reaches 0.9: each class and one other
        ([0.5, 0.8, 0.88, 1.0], 0.9, 3),
        ([0.95, 1.0, 1.0, 1.0], 0.9, 0),  # top-1 suffices: no confuser
        ([0.5, 0.8, 0.85, 0.9], 0.85, 2),  # SSv2's 85 %
        ([0.2, 0.3, 0.4, 0.5], 0.9, 3),  # never reached: every other class
    ],
)
def test_confusers_auto_is_the_papers_top_n_rule(table, target, confusers):
    assert topn_confusers(torch.tensor(table, dtype=torch.float64), target) == confusers


def test_confusers_auto_chooses_alpha_from_the_trained_universal_networks_top_n():
    model = u2s()  # confusers="auto", target 0.9
    xi = torch.rand(K, model.backbone.out_channels, generator=torch.Generator().manual_seed(1))
    counts = torch.full((K,), 5.0)
    with pytest.raises(ValueError, match="needs the UN's top-n"):
        model.install_csm(xi, counts)
    hits = torch.tensor([10.0, 19.0, 20.0, 20.0])  # top-2 accuracy 0.95 of 20 samples
    model.install_csm(xi * 5, counts, hits)
    assert mean_confusers(model.csm) == 1
    torch.testing.assert_close(
        model.csm_diagnostics()["topn_accuracy"], torch.tensor([0.5, 0.95, 1.0, 1.0])
    )


def test_confusers_option_sets_alpha_when_the_csm_is_installed():
    model = u2s(confusers=2)
    xi = torch.rand(K, model.backbone.out_channels, generator=torch.Generator().manual_seed(1))
    model.install_csm(xi, torch.ones(K))
    assert mean_confusers(model.csm) == 2


def test_unseen_classes_confuse_nobody():
    model = u2s(alpha=0.0)
    sums = torch.rand(K, model.backbone.out_channels)
    with pytest.warns(UserWarning, match="no training sample"):
        c = model.install_csm(sums, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert c[3].tolist() == [0, 0, 0, 1] and c[:, 3].tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="no training samples"):
        model.install_csm(sums, torch.zeros(K))


def test_accumulate_sparsity_matches_the_un_features(batch):
    clips, labels = batch
    model = u2s().train()
    sums, counts, topn = model.accumulate_sparsity(
        [(clips[:2], labels[:2]), (clips[2:], labels[2:])]
    )
    assert model.training  # mode restored
    with torch.no_grad():
        u = model.eval().backbone(clips)[-1]
        xi = channel_sparsity(u)
        scores = model.universal_head(u)
    torch.testing.assert_close(sums.float(), xi)  # one sample per class
    assert counts.tolist() == [1, 1, 1, 1]
    rank = (scores > scores.gather(1, labels[:, None])).sum(1)  # of the true class
    assert topn.tolist() == [float((rank < n).sum()) for n in range(1, K + 1)]
    assert topn[-1] == 4  # everyone is in the top K


def test_compute_csm_reduces_across_ranks(batch):
    """A reducer (sum or mean over ranks) sees [sums, counts]; the ratio is what matters."""
    seen = []

    def reduce(tensors):
        seen.append([t.clone() for t in tensors])
        for t in tensors:
            t.mul_(3.0)  # as if three identical ranks were summed

    a, b = u2s(alpha=0.9), u2s(alpha=0.9)
    torch.testing.assert_close(a.compute_csm([batch], reduce=reduce), b.compute_csm([batch]))
    assert len(seen) == 1 and seen[0][0].shape == (K, a.backbone.out_channels)


def test_csm_is_in_the_state_dict(batch):
    model = ready(u2s(), batch)
    fresh = u2s()
    assert not bool(fresh.specific_enabled)
    fresh.load_state_dict(model.state_dict())
    assert bool(fresh.specific_enabled)
    torch.testing.assert_close(fresh.csm, model.csm)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(batch[0]).logits, model(batch[0]).logits)


# --- category regularization ----------------------------------------------------------------


def test_category_regularization_sums_only_over_confusable_pairs():
    e0, e1 = torch.eye(3)[0], torch.eye(3)[1]
    w = torch.stack([e0, 2 * e0, -e0, e1]).view(4, 3, 1, 1, 1)  # s01 = 1, s02 = 0, s03 = 0.5
    pairs = torch.eye(4)
    assert category_regularization(w, pairs) == 0  # no confusable pair: 0 (diagonal ignored)
    pairs[0, 1] = pairs[1, 0] = 1
    torch.testing.assert_close(category_regularization(w, pairs), torch.tensor(1.0))
    pairs[0, 3] = pairs[3, 0] = 1
    torch.testing.assert_close(category_regularization(w, pairs), torch.tensor(0.75))
    pairs[0, 2] = pairs[2, 0] = 1
    torch.testing.assert_close(category_regularization(w, pairs), torch.tensor(0.5))


def test_category_regularization_in_the_loss_is_lam_weighted(batch):
    model = ready(u2s(lam=0.5, alpha=0.0), batch)  # every pair confusable
    out = model(batch[0])
    expected = 0.5 * category_regularization(model.mask_network.weight, model.csm)
    torch.testing.assert_close(out.aux_losses["category_reg"], expected)
    model = ready(u2s(alpha=1.0), batch)  # no pair confusable
    assert model(batch[0]).aux_losses["category_reg"] == 0


# --- masks -----------------------------------------------------------------------------------


def test_masks_of_the_predicted_class_confusers_are_averaged(batch):
    model = ready(u2s(alpha=0.0), batch).eval()
    model.csm.copy_(torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]))
    out = model(batch[0])
    with torch.no_grad():
        u = model.backbone(batch[0])[-1]
        masks = model.mask_network(u)
    cls = out.extras["universal"].argmax(1)
    rows = model.csm[cls]
    expected = torch.sigmoid(
        (rows[:, :, None, None, None] * masks).sum(1) / rows.sum(1)[:, None, None, None]
    )
    torch.testing.assert_close(out.diagnostics["mask"], expected)
    own = ready(u2s(mask="own_class_only"), batch).eval()
    own.load_state_dict(model.state_dict())
    expected = torch.sigmoid(masks[torch.arange(4), cls])
    torch.testing.assert_close(own(batch[0]).diagnostics["mask"], expected)


# --- training stages ----------------------------------------------------------------------


def test_three_stages_and_their_frozen_parameters(batch):
    model = u2s()
    stages = model.training_stages()
    assert [s.name for s in stages] == ["universal", "specific", "joint"]
    assert stages[2].lr_scale == pytest.approx(0.1)
    names = {id(p): n for n, p in model.named_parameters()}

    def trained(stage):
        return {names[id(p)].split(".")[0] for p in trainable_parameters(model, stage)}

    assert trained(stages[0]) == {"backbone", "universal_head"}
    assert trained(stages[1]) == {"specific_stages", "specific_head", "mask_network"}
    assert trained(stages[2]) == {
        "backbone",
        "universal_head",
        "specific_stages",
        "specific_head",
        "mask_network",
    }


def test_stage_two_trains_the_csn_and_leaves_the_un_untouched(batch):
    clips, labels = batch
    model = u2s()
    stage = model.training_stages()[1]
    model.begin_stage(1, lambda: [batch])
    params = trainable_parameters(model, stage)
    model.train()
    assert not model.backbone.training and model.specific_stages.training  # frozen UN BN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(params, lr=0.1)
    model.loss(model(clips), labels).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.universal_head.parameters())
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        if k.startswith(("backbone.", "universal_head.")):
            assert not changed, k  # weights and BN running statistics
    assert not torch.equal(before["mask_network.weight"], after["mask_network.weight"])
    assert not torch.equal(before["specific_head.fc.weight"], after["specific_head.fc.weight"])


def test_begin_stage_computes_the_csm_once(batch):
    calls = []

    def train_batches():
        calls.append(1)
        return [batch]

    reduced = []

    def reduce_mean(tensors):  # the trainer's reducer, here over one rank
        reduced.append(len(tensors))

    model = u2s()
    model.begin_stage(0, train_batches, reduce_mean)
    assert not calls and not bool(model.specific_enabled)
    model.begin_stage(1, train_batches, reduce_mean)
    assert reduced == [3]  # [sums, counts, top-n hits]
    model.begin_stage(2, train_batches)  # resume / next stage: already installed
    assert len(calls) == 1 and bool(model.specific_enabled)
    no_mn = u2s(mask_network=False)
    no_mn.begin_stage(1, train_batches)
    assert len(calls) == 1 and bool(no_mn.specific_enabled)  # no CSM needed


def test_csn_init_universal_copies_the_trained_un(batch):
    model = u2s(csn_init="universal")
    with torch.no_grad():
        for p in model.backbone.stages[-1].parameters():
            p.add_(1.0)  # "stage 1 training"
    model.begin_stage(1, lambda: [batch])
    for a, b in zip(model.backbone.stages[2:].parameters(), model.specific_stages.parameters()):
        torch.testing.assert_close(a, b)


# --- oracle ------------------------------------------------------------------------------------


def test_oracle_cannot_be_trained(batch):
    model = u2s(oracle=True)
    assert not model.training and model.needs_labels
    with pytest.raises(RuntimeError, match="evaluation only"):
        model.train()
    with pytest.raises(RuntimeError, match="evaluation only"):
        model.training_stages()
    with pytest.raises(RuntimeError, match="evaluation only"):
        model.begin_stage(0, lambda: [batch])
    model.training = True  # forced past train(): forward still refuses
    with pytest.raises(RuntimeError, match="evaluation only"):
        model(batch[0], labels=batch[1])


def test_oracle_selects_masks_with_the_ground_truth(batch):
    clips, labels = batch
    trained = ready(u2s(alpha=0.0), batch)
    oracle = u2s(oracle=True, alpha=0.0)
    with pytest.raises(RuntimeError, match="CSM"):
        oracle(clips, labels=labels)
    oracle.load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match="labels"):
        oracle(clips)
    out = oracle(clips, labels=labels)
    assert torch.equal(out.diagnostics["mask_class"], labels)
    trained.eval()
    normal = trained(clips)
    torch.testing.assert_close(normal.extras["universal"], out.extras["universal"])
    assert torch.equal(normal.diagnostics["mask_class"], normal.extras["universal"].argmax(1))


def _csm_on_rank(rank: int, world: int, store_path: str, batch, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        clips, labels = batch
        model = u2s(alpha=0.9)
        shard = [(clips[rank::world], labels[rank::world])]  # each rank sees half the data
        csm = model.compute_csm(shard)  # default reducer: torch.distributed.all_reduce
        torch.save((csm, model.csm_similarity), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch (fork is unsafe once Ray threads run)
def test_compute_csm_under_distributed_matches_one_process(batch, tmp_path):
    """Two gloo ranks on disjoint shards install the CSM of the whole training set."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "csm")
    mp.spawn(_csm_on_rank, args=(2, str(tmp_path / "store"), batch, out), nprocs=2)
    single = u2s(alpha=0.9)
    expected = single.compute_csm([batch])
    for rank in range(2):
        csm, similarity = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(csm, expected)
        torch.testing.assert_close(similarity, single.csm_similarity)
