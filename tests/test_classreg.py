"""Class Regularization: shapes, Eq. 3 bounds, γ = 0 / stages = 0 equivalences, training."""

from __future__ import annotations

import pytest
import torch

from finegrain.models import build_backbone, build_model
from finegrain.models.classreg import ClassRegBlock, build, excitation_weights
from finegrain.models.onepass import OnePass

K = 5


def clips(b: int = 2, t: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, t, size, size, generator=torch.Generator().manual_seed(seed))


def model(**options):
    torch.manual_seed(0)
    return build_model("classreg", K, "tiny", **options)


def test_shapes_and_diagnostics_tiny():
    net = model()
    out = net(clips())
    assert out.logits.shape == (2, K)
    assert net.block_stages == (1, 2, 3)  # the 16-channel first stage is skipped (< 32)
    assert [b.gamma for b in net.blocks] == [0.2, 0.3, 0.4]
    assert out.diagnostics["chosen_class"].shape == (2, 3)
    for s in range(1, 4):
        agree = out.diagnostics[f"agreement_stage{s}"]
        assert agree.shape == () and 0.0 <= agree.item() <= 1.0
    assert out.aux_losses == {}


def test_shapes_r2plus1d():
    net = build_model("classreg", K, "r2plus1d_18", stages=2, dropout=0.0).eval()
    with torch.no_grad():
        out = net(clips(b=1, t=8, size=32))
    assert out.logits.shape == (1, K)
    assert net.block_stages == (2, 3)
    assert [b.P.weight.shape for b in net.blocks] == [(256, 512), (512, 512)]


def test_default_gamma_keeps_deepest_values_for_fewer_stages():
    assert [b.gamma for b in model(stages=2).blocks] == [0.3, 0.4]
    assert [b.gamma for b in model(stages=3, gamma=0.25).blocks] == [0.25] * 3
    assert [b.gamma for b in model(stages=2, gamma=(0.0, 0.5)).blocks] == [0.0, 0.5]
    # more stages than the backbone has: a block after every stage (narrow ones too on request)
    assert model(stages=9, gamma=0.1, min_channels=0).block_stages == (0, 1, 2, 3)
    assert model(stages=9, gamma=0.1).block_stages == (1, 2, 3)


def test_eval_is_deterministic():
    net = model().eval()
    x = clips()
    with torch.no_grad():
        assert torch.equal(net(x).logits, net(x).logits)


@pytest.mark.parametrize("gamma", [0.1, 0.4, 0.9])
def test_excitation_weights_attain_both_bounds(gamma):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    e = excitation_weights(w, gamma)
    assert e.shape == w.shape
    assert torch.all(e >= 1 - gamma - 1e-6) and torch.all(e <= 1 + gamma + 1e-6)
    torch.testing.assert_close(e.amin(dim=1), torch.full((6,), 1 - gamma))
    torch.testing.assert_close(e.amax(dim=1), torch.full((6,), 1 + gamma))
    # the order of the channels is kept (monotone map)
    assert torch.equal(e.argsort(dim=1), w.argsort(dim=1))


def test_excitation_weights_constant_row_is_neutral():
    e = excitation_weights(torch.full((2, 8), 3.0), 0.3)
    assert torch.equal(e, torch.ones(2, 8))


def test_block_excites_with_the_selected_class_row():
    torch.manual_seed(0)
    block = ClassRegBlock(feature_channels=12, channels=6, gamma=0.2)
    A = torch.rand(3, 6, 2, 4, 4)
    W = torch.randn(K, 12)
    out, c = block(A, W)
    W_l = block.P(W)
    assert torch.equal(c, (A.mean(dim=(2, 3, 4)) @ W_l.t()).argmax(dim=1))
    ratio = (out / A).flatten(2)  # per channel a constant in [0.8, 1.2]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))
    torch.testing.assert_close(ratio[..., 0], excitation_weights(W_l[c], 0.2))


def test_gamma_zero_leaves_activations_unchanged():
    torch.manual_seed(0)
    block = ClassRegBlock(feature_channels=12, channels=6, gamma=0.0)
    A = torch.rand(3, 6, 2, 4, 4)
    out, _ = block(A, torch.randn(K, 12))
    assert torch.equal(out, A)


def test_gamma_zero_model_equals_one_pass_with_same_weights():
    net = model(gamma=0.0).eval()
    base = OnePass(build_backbone("tiny"), K).eval()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.")}
    base.load_state_dict(state)
    x = clips()
    with torch.no_grad():
        assert torch.equal(net(x).logits, base(x).logits)


def test_stages_zero_is_the_one_pass_baseline():
    net = model(stages=0).eval()
    assert len(net.blocks) == 0 and net.block_stages == ()
    base = OnePass(build_backbone("tiny"), K).eval()
    base.load_state_dict(net.state_dict())  # strict: same parameters, same names
    x = clips()
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out.logits, base(x).logits)
    assert out.diagnostics == {}


def test_classifier_weights_are_detached_and_P_learns_through_the_excitation():
    net = model(dropout=0.0, min_channels=0, gamma_warmup_epochs=0)
    out = net(clips())
    loss = net.loss(out, torch.tensor([0, 1]))
    loss.backward()
    for block in net.blocks:
        assert block.P.weight.grad is not None
        assert block.P.weight.grad.abs().sum() > 0
    # W is detached in the blocks, so only the head's term reaches it: d loss / d W = (softmax − onehot)ᵀ · GAP(features).
    with torch.no_grad():
        x = net.backbone.stem(clips())
        blocks = dict(zip(net.block_stages, net.blocks))
        for s, stage in enumerate(net.backbone.stages):
            x = blocks[s](stage(x), net.head.fc.weight)[0]
        pooled = x.mean(dim=(2, 3, 4))
        p = out.logits.softmax(dim=1) - torch.nn.functional.one_hot(torch.tensor([0, 1]), K)
    torch.testing.assert_close(net.head.fc.weight.grad, p.t() @ pooled / 2, atol=1e-5, rtol=1e-4)


def test_train_steps_reduce_loss():
    net = model(dropout=0.0)
    x, y = clips(b=4), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = net.loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "options",
    [
        {"stages": 0},
        {"stages": 1},
        {"stages": 2, "gamma": [0.2, 0.3]},
        {"stages": 4, "gamma": 0.0},
        {"gamma": 0.5},
    ],
)
def test_ablation_switches_build_and_run(options):
    net = model(**options)
    out = net(clips())
    assert out.logits.shape == (2, K)
    net.loss(out, torch.tensor([0, 1])).backward()


def test_backbone_with_fewer_stages_gets_a_block_per_stage():
    backbone = build_backbone("tiny")
    backbone.stages, backbone.stage_channels = backbone.stages[:3], backbone.stage_channels[:3]
    net = build(K, backbone, min_channels=0)  # stages=4 by default
    assert net.block_stages == (0, 1, 2)
    assert [b.gamma for b in net.blocks] == [0.2, 0.3, 0.4]
    narrow_skipped = build(K, backbone)  # 16 channels < 32: no block there
    assert narrow_skipped.block_stages == (1, 2)
    assert [b.gamma for b in narrow_skipped.blocks] == [0.3, 0.4]


def test_gamma_warms_up_from_zero_over_the_first_epoch():
    """Early wrong class choices must not scale the features the classifier learns from: at the
    start γ is 0 (the blocks change nothing: the one-pass network), full after one epoch."""
    x = clips()
    net, plain = model(dropout=0.0).eval(), model(stages=0, dropout=0.0).eval()
    plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("blocks.")}
    )
    with torch.no_grad():
        net.progress = 0.0
        torch.testing.assert_close(net(x).logits, plain(x).logits)
        net.progress = 0.5
        assert net.gamma_scale() == 0.5
        half = net(x).logits
        net.progress = 3.0
        assert net.gamma_scale() == 1.0
        assert not torch.allclose(half, net(x).logits)
    assert model(gamma_warmup_epochs=0).gamma_scale() == 1.0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": (0.1, 0.2)}, "gamma"),
        ({"stages": 2, "gamma": (0.1, 0.2, 0.3)}, "gamma"),
        ({"stages": -1}, "stages"),
        ({"stages": 1.5}, "stages"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_options_fail_fast(options, field):
    with pytest.raises(ValueError, match=field):
        build_model("classreg", K, "tiny", **options)
