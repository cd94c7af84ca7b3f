"""DFB (Martinez et al., ICCV 2019): its model, options, search space, ablation suite and
pictures."""

from finegrain.models.dfb.model import (
    BRANCHES,
    DFB,
    DFBOptions,
    build,
    cross_channel_pool,
    fresh_copy,
)
from finegrain.models.spec import MethodSpec, Suite, variant

__all__ = [
    "BRANCHES",
    "DFB",
    "SPEC",
    "DFBOptions",
    "build",
    "cross_channel_pool",
    "fresh_copy",
]

SPEC = MethodSpec(
    name="dfb",
    title="DFB",
    options=DFBOptions,
    build=build,
    needs_stages=True,  # the local branch reads the second-to-last CNN stage
    space={"model.filters_per_class": {"type": "int", "low": 1, "high": 10}},
    suite=Suite(
        "dfb",
        "dfb",
        "DFB Table 1 (global branch, discriminative filters, local branch)",
        (
            variant("gb", {"model.branches": "gb"}, "GB (baseline)", "1"),
            variant("gb_df", {"model.branches": "gb_df"}, "GB + DF", "1"),
            variant("gb_df_lb", {"model.branches": "gb_df_lb"}, "GB + DF + LB", "1"),
        ),
    ),
    figures="finegrain.models.dfb.figures:draw",
    mechanisms="finegrain.models.dfb.mechanisms:score",
    mechanisms_need_evidence=True,
)
