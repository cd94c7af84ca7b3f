"""The one-pass baseline: its model, options, search space, pictures (none) and the class
activation map it is scored by (its "mechanism": the reference for the methods')."""

from finegrain.models.heads import ClassifierHead
from finegrain.models.onepass.model import OnePass, OnePassOptions, build
from finegrain.models.spec import MethodSpec

__all__ = ["SPEC", "ClassifierHead", "OnePass", "OnePassOptions", "build"]

SPEC = MethodSpec(
    name="onepass",
    title="one-pass baseline",
    options=OnePassOptions,
    build=build,
    needs_stages=False,
    space={"model.dropout": {"type": "uniform", "low": 0.0, "high": 0.7}},
    mechanisms="finegrain.models.onepass.mechanisms:score",  # its CAM: the reference
    mechanisms_need_evidence=True,
)
