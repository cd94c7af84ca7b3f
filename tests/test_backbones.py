"""Backbones: stage shapes (the module docstring's table), key mapping, local weight loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import video as tvv
from torchvision.models.video.mvit import MSBlockConfig

from finegrain.models import build_model
from finegrain.models.backbones import BACKBONES, build_backbone, mvit

SMALL = (8, 32, 32)  # input (T, H, W)
RES = [(64, 8, 16, 16), (128, 4, 8, 8)]  # ResNet stages 1-2, stages 3-4 follow (C, T, H, W)
SWIN = [(96, 2, 8, 8), (192, 2, 4, 4), (384, 2, 2, 2), (768, 2, 1, 1)]
SWIN_B = [(128, 2, 8, 8), (256, 2, 4, 4), (512, 2, 2, 2), (1024, 2, 1, 1)]
FC = ("fc.weight", "fc.bias")  # torchvision classifier heads, which the wrappers leave out
SWIN_HEAD = ("head.weight", "head.bias")
slow = pytest.mark.slow

# (name, options, input (T, H, W), stage outputs (C, T, H, W), torchvision head keys)
CASES = [
    ("tiny", {}, SMALL, [(16, 8, 16, 16), (32, 8, 8, 8), (64, 4, 4, 4), (128, 4, 2, 2)], ()),
    ("tiny", {"width": 4}, SMALL, [(4, 8, 16, 16), (8, 8, 8, 8), (16, 4, 4, 4), (32, 4, 2, 2)], ()),
    ("r3d_18", {}, SMALL, RES + [(256, 2, 4, 4), (512, 1, 2, 2)], FC),
    ("r3d_18", {"keep_time": True}, SMALL, RES + [(256, 4, 4, 4), (512, 4, 2, 2)], FC),
    ("mc3_18", {}, SMALL, [(64, 8, 16, 16), (128, 8, 8, 8), (256, 8, 4, 4), (512, 8, 2, 2)], FC),
    ("r2plus1d_18", {}, SMALL, RES + [(256, 2, 4, 4), (512, 1, 2, 2)], FC),
    ("r2plus1d_18", {"keep_time": True}, SMALL, RES + [(256, 4, 4, 4), (512, 4, 2, 2)], FC),
    ("s3d", {}, (16, 32, 32), [(480, 8, 4, 4), (832, 4, 2, 2), (1024, 2, 1, 1)],
     ("classifier.1.weight", "classifier.1.bias")),
    ("swin3d_t", {}, (4, 32, 32), SWIN, SWIN_HEAD),
    pytest.param("swin3d_s", {}, (4, 32, 32), SWIN, SWIN_HEAD, marks=slow),
    pytest.param("swin3d_b", {}, (4, 32, 32), SWIN_B, SWIN_HEAD, marks=slow),
    pytest.param("mvit_v2_s", {}, (4, 64, 64), [(768, 2, 2, 2)], ("head.1.weight", "head.1.bias"),
                 marks=slow),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options", "thw", "stages", "head"), CASES)
def test_stage_shapes_and_torchvision_key_map(name, options, thw, stages, head):
    torch.manual_seed(0)
    backbone = build_backbone(name, **options).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, *thw))
    assert [tuple(o.shape[1:]) for o in outs] == stages
    assert backbone.stage_channels == tuple(s[0] for s in stages)
    assert backbone.out_channels == stages[-1][0]
    if name != "tiny":  # every wrapper tensor is a torchvision tensor; only the head is left out
        assert len(backbone.torchvision_keys) == len(backbone.state_dict())
        assert len(set(backbone.torchvision_keys.values())) == len(backbone.torchvision_keys)
        assert backbone.torchvision_ignored == head


def _small_mvit() -> tvv.MViT:
    blocks = [
        MSBlockConfig(1, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        MSBlockConfig(2, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
    ]
    return tvv.MViT(
        spatial_size=(32, 32),
        temporal_size=4,
        block_setting=blocks,
        residual_pool=True,
        residual_with_cls_embed=False,
        rel_pos_embed=True,
        proj_after_attn=True,
    ).eval()


def test_mvit_tokens_equal_torchvision_and_other_sizes_run():
    torch.manual_seed(0)
    net = _small_mvit()
    backbone = mvit(net, "small_mvit")
    final = {}
    net.norm.register_forward_hook(lambda m, i, o: final.update(tokens=o))
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        net(x)
        (ours,) = backbone(x)
        tokens = final["tokens"][:, 1:]  # without the class token
        torch.testing.assert_close(ours, tokens.transpose(1, 2).reshape(2, 32, 2, 4, 4))
        # torchvision's own forward only runs at the built size; the wrapper runs at any size
        assert backbone(torch.randn(1, 3, 8, 48, 64))[0].shape == (1, 32, 4, 6, 8)


def test_mvit_supports_only_token_methods(monkeypatch):
    from finegrain.models import backbones

    monkeypatch.setitem(
        backbones.BACKBONES, "small_mvit", lambda: mvit(_small_mvit(), "small_mvit")
    )
    assert not backbones.BACKBONES["small_mvit"]().has_stages
    for method in ("onepass", "dsts"):
        assert build_model(method, 4, "small_mvit") is not None
    for method in ("u2s", "dfb", "classreg", "joint_attn"):
        with pytest.raises(ValueError, match=f"{method}.*needs CNN stages.*onepass, dsts"):
            build_model(method, 4, "small_mvit")


def test_unknown_backbone_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown backbone 'r50'.*tiny.*mvit_v2_s"):
        build_backbone("r50")
    with pytest.raises(ValueError, match="'s3d' has no option.*keep_time.*valid: \\(none\\)"):
        build_backbone("s3d", keep_time=True)
    with pytest.raises(ValueError, match="has no option.*depth.*valid: width"):
        build_backbone("tiny", depth=3)
    with pytest.raises(ValueError, match="width must be an int >= 1"):
        build_backbone("tiny", width=0)
    with pytest.raises(ValueError, match="keep_time must be a bool"):
        build_backbone("r3d_18", keep_time="yes")
    assert set(BACKBONES) >= {"tiny", "r3d_18", "s3d", "swin3d_b", "mvit_v2_s"}


# --- local pretrained weights ----------------------------------------------------------------


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_own_keys_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("tiny", width=4)
    path = _save({"state_dict": source.state_dict()}, tmp_path / "tiny.pt")
    torch.manual_seed(1)
    loaded = build_backbone("tiny", weights=path, width=4)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["r3d_18", "swin3d_t"])
def test_torchvision_keys_round_trip(tmp_path, name):
    """A torchvision state dict (with its classifier head) loads; features equal torchvision's."""
    torch.manual_seed(0)
    net = getattr(tvv, name)(weights=None).eval()
    path = _save(net.state_dict(), tmp_path / f"{name}.pth")
    loaded = build_backbone(name, weights=path).eval()
    theirs = net.state_dict()
    for ours, key in loaded.torchvision_keys.items():
        assert torch.equal(loaded.state_dict()[ours], theirs[key]), key
    last = net.layer4 if name == "r3d_18" else net.norm
    got = {}
    last.register_forward_hook(lambda m, i, o: got.update(x=o))
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        net(x)
        expected = got["x"] if name == "r3d_18" else got["x"].permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(loaded(x)[-1], expected)


def test_keep_time_loads_the_same_torchvision_weights(tmp_path):
    net = tvv.r2plus1d_18(weights=None)
    path = _save(net.state_dict(), tmp_path / "r2plus1d.pth")
    loaded = build_backbone("r2plus1d_18", weights=path, keep_time=True)
    key = "stages.3.1.conv2.0.0.weight"
    assert loaded.torchvision_keys[key] == "layer4.1.conv2.0.0.weight"
    assert torch.equal(loaded.state_dict()[key], net.state_dict()["layer4.1.conv2.0.0.weight"])


def test_missing_file_is_reported(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="'tiny' not found: .*nope.pt"):
        build_backbone("tiny", weights=path)


def test_mismatched_weights_are_rejected(tmp_path):
    r3d = tvv.r3d_18(weights=None).state_dict()
    path = _save(r3d, tmp_path / "r3d.pth")  # same key names as mc3_18, other kernel shapes
    with pytest.raises(ValueError, match=r"do not fit backbone 'mc3_18' \(torchvision key names\)"):
        build_backbone("mc3_18", weights=path)
    with pytest.raises(ValueError, match=r"wrong shapes \(file vs model, e.g. \['layer2.0.conv1"):
        build_backbone("mc3_18", weights=path)

    tiny = build_backbone("tiny", width=4).state_dict()
    with pytest.raises(
        ValueError, match="'tiny' \\(wrapper key names\\).*wrong shapes.*stem.0.weight"
    ):
        build_backbone("tiny", weights=_save(tiny, tmp_path / "w4.pt"), width=8)
    partial = {k: v for k, v in tiny.items() if k != "stages.3.0.conv2.1.running_var"}
    with pytest.raises(
        ValueError, match=r"1 missing keys \(e.g. \['stages.3.0.conv2.1.running_var'\]"
    ):
        build_backbone("tiny", weights=_save(partial, tmp_path / "partial.pt"), width=4)
    extra = {**tiny, "fc.weight": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"1 unexpected keys \(e.g. \['fc.weight'\]"):
        build_backbone("tiny", weights=_save(extra, tmp_path / "extra.pt"), width=4)

    with pytest.raises(ValueError, match="not a state dict"):
        build_backbone("tiny", weights=_save([1, 2, 3], tmp_path / "list.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights .*garbage.pt"):
        build_backbone("tiny", weights=garbage)


def test_the_registry_and_the_trial_path_do_not_import_torchvisions_models():
    """A Tune trial's actor and Ray Train's controller import the training module and the
    registry but build no backbone: ``torchvision.models`` (which loads ``torch._dynamo``,
    ~2 s) is imported when a backbone is built, not before."""
    import subprocess
    import sys

    code = (
        "import sys, finegrain.platform.tune, finegrain.platform.train; "
        "from finegrain.models import build_model; "
        "assert 'torchvision.models' not in sys.modules, 'imported'; "
        "build_model('onepass', num_classes=3, backbone='tiny', width=2); "
        "assert 'torchvision.models' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
