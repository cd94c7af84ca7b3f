"""DFB: shapes, the four losses, cross-channel pooling, the local branch, branch ablations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.models import build_model
from finegrain.models.dfb import cross_channel_pool, fresh_copy

K = 4


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def dfb(**options):
    torch.manual_seed(0)
    return build_model("dfb", K, **options)


def filter_responses(model, clips):
    """The filter bank's output ``(B, N·K, T, H, W)``, captured by a forward hook."""
    seen = []
    handle = model.filter_bank.register_forward_hook(lambda m, i, o: seen.append(o))
    out = model(clips)
    handle.remove()
    return out, seen[0]


def test_shapes_tiny(batch):
    clips, labels = batch
    model = dfb()
    out, responses = filter_responses(model, clips)
    assert out.logits.shape == (4, K)
    assert set(out.extras) == {"z_avg", "z_xchannel", "z_max"}
    # tiny: stage 3 gives (T/2, H/8); upsampled ×2 and through the stride-2 copy of stage 4
    assert responses.shape == (4, 5 * K, 4, 4, 4)
    assert out.diagnostics["max_response_thw"].shape == (4, K, 3)
    assert out.diagnostics["feature_stride"].tolist() == [2.0, 8.0, 8.0]


def test_shapes_r2plus1d_18():
    torch.manual_seed(0)
    model = build_model("dfb", 5, backbone="r2plus1d_18").eval()
    clips = torch.randn(2, 3, 8, 32, 32)
    out, responses = filter_responses(model, clips)
    assert out.logits.shape == (2, 5)
    assert responses.shape == (2, 25, 1, 4, 4)  # layer4 copy on 2× upsampled layer3 (2×4×4)
    assert model.skip.in_channels == 256 and model.skip.out_channels == 512


def test_eval_is_deterministic(batch):
    model = dfb().eval()
    a, b = model(batch[0]), model(batch[0])
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_prediction_and_the_four_losses(batch):
    clips, labels = batch
    model = dfb()
    out = model(clips)
    ex = out.extras
    torch.testing.assert_close(out.logits, ex["z_avg"] + ex["z_xchannel"] + ex["z_max"])
    expected = sum(F.cross_entropy(z, labels) for z in (out.logits, *ex.values()))
    torch.testing.assert_close(model.loss(out, labels), expected)


def test_train_steps_reduce_the_loss(batch):
    clips, labels = batch
    model = dfb(dropout=0.0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = model.loss(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_xchannel_is_the_class_block_mean_of_max_pooled_responses(batch):
    model = dfb(filters_per_class=3).eval()
    out, responses = filter_responses(model, batch[0])
    r = responses.amax(dim=(2, 3, 4))  # (B, 3·K)
    expected = torch.stack([r[:, 3 * k : 3 * k + 3].mean(dim=1) for k in range(K)], dim=1)
    torch.testing.assert_close(out.extras["z_xchannel"], expected)
    torch.testing.assert_close(out.extras["z_max"], model.max_classifier(r))
    torch.testing.assert_close(
        cross_channel_pool(torch.arange(6.0).view(1, 6), 3), torch.tensor([[1.0, 4.0]])
    )


def test_gb_alone_equals_the_one_pass_baseline(batch):
    model = dfb(branches="gb").eval()
    torch.manual_seed(1)
    onepass = build_model("onepass", K).eval()
    onepass.load_state_dict(model.state_dict())  # same parameter names: backbone.*, head.*
    out = model(batch[0])
    torch.testing.assert_close(out.logits, onepass(batch[0]).logits)
    assert model.loss(out, batch[1]) == F.cross_entropy(out.logits, batch[1])
    assert not hasattr(model, "filter_bank") and not hasattr(model, "local_stage")


@pytest.mark.parametrize("branches", ["gb", "gb_df", "gb_df_lb"])
def test_every_branch_setting_builds_trains_and_runs(branches, batch):
    clips, labels = batch
    model = dfb(branches=branches, filters_per_class=2)
    out = model(clips)
    model.loss(out, labels).backward()
    assert out.logits.shape == (4, K) and torch.isfinite(out.logits).all()
    assert hasattr(model, "local_stage") == (branches == "gb_df_lb")


def test_gb_df_filters_read_the_last_stage(batch):
    model = dfb(branches="gb_df")
    out, responses = filter_responses(model, batch[0])
    assert responses.shape[2:] == model.backbone(batch[0])[-1].shape[2:]


@pytest.mark.parametrize(
    "options, field",
    [
        ({"branches": "gb_lb"}, "branches"),
        ({"filters_per_class": 0}, "filters_per_class"),
        ({"filters_per_class": 2.5}, "filters_per_class"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_bad_options_fail_fast(options, field):
    with pytest.raises(ValueError, match=field):
        dfb(**options)


def test_local_stage_is_a_randomly_initialised_copy():
    model = dfb()
    last = model.backbone.stages[-1]
    with torch.no_grad():
        for p in last.parameters():
            p.fill_(0.123)
    fresh = fresh_copy(last)
    assert [n for n, _ in fresh.named_parameters()] == [n for n, _ in last.named_parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(fresh.parameters(), last.parameters()))
    assert all(p.data_ptr() != q.data_ptr() for p in fresh.parameters() for q in last.parameters())
    bn = next(m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm3d))
    assert bn.num_batches_tracked == 0 and torch.all(bn.running_var == 1)


def test_max_response_diagnostics_point_at_the_maximum(batch):
    model = dfb(filters_per_class=2).eval()
    out, responses = filter_responses(model, batch[0])
    thw = out.diagnostics["max_response_thw"]
    filt = out.diagnostics["max_response_filter"]
    r = responses.view(4, K, 2, *responses.shape[2:])
    for b in range(4):
        for k in range(K):
            t, h, w = thw[b, k].tolist()
            value = r[b, k, filt[b, k], t, h, w]
            assert value == r[b, k].max() == out.diagnostics["max_response_value"][b, k]
