"""One-pass baseline: backbone → GAP → dropout → linear."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from finegrain.models import build_model, method_options


@pytest.mark.parametrize(
    ("backbone", "options"), [("tiny", {"width": 4}), ("r3d_18", {"keep_time": True})]
)
def test_output_shapes_and_loss(backbone, options):
    torch.manual_seed(0)
    model = build_model("onepass", 7, backbone, **options)
    clips, labels = torch.randn(2, 3, 8, 32, 32), torch.tensor([1, 6])
    for train in (True, False):
        model.train(train)
        out = model(clips)
        assert out.logits.shape == (2, 7)
        assert out.aux_losses == {}
        torch.testing.assert_close(model.loss(out, labels), F.cross_entropy(out.logits, labels))
    assert model.extra_batches == 0 and model.hook_parameters() == []


def test_eval_is_deterministic_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_model("onepass", 3, "tiny", width=4, dropout=0.9).eval()
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(clips).logits, model(clips).logits)
        features = model.backbone(clips)[-1]
        model.train()
        assert not torch.equal(model.head(features), model.head(features))


def test_options_are_validated():
    assert method_options("onepass") == {"dropout": 0.5}
    with pytest.raises(ValueError, match=r"dropout: Input should be less than 1 \(got 1.0\)"):
        build_model("onepass", 3, "tiny", dropout=1.0)
    with pytest.raises(
        ValueError, match="neurons: not an option of method 'onepass'; valid: dropout"
    ):
        build_model("onepass", 3, "tiny", neurons=3)
