"""U2S (Zhao, Xie, Zhang, Tian): its model, options, search space, ablation suite and pictures."""

from finegrain.models.spec import MethodSpec, Suite, Variant, variant
from finegrain.models.u2s.model import (
    CSM_MODES,
    CSN_INITS,
    DEFAULT_TOPN_TARGET,
    MASK_MODES,
    ORACLE_ERROR,
    PREDICTIONS,
    STAGE_SHARES,
    U2S,
    U2SOptions,
    alpha_for_confusers,
    binary_csm,
    build,
    category_regularization,
    channel_sparsity,
    mean_confusers,
    similarity_from_sparsity,
    topn_confusers,
)

__all__ = [
    "CSM_MODES",
    "CSN_INITS",
    "DEFAULT_TOPN_TARGET",
    "MASK_MODES",
    "ORACLE_ERROR",
    "PREDICTIONS",
    "SPEC",
    "STAGE_SHARES",
    "U2S",
    "U2SOptions",
    "alpha_for_confusers",
    "binary_csm",
    "build",
    "category_regularization",
    "channel_sparsity",
    "mean_confusers",
    "similarity_from_sparsity",
    "topn_confusers",
]

ONEPASS = {"model.method": "onepass"}


def _fuse(names: str) -> Variant:
    """U2S Table I: the average of a subset of the full model's predictions (evaluation)."""
    parts = names.split(",")
    return variant("_".join(parts), {"model.fuse": names}, " + ".join(parts), "I", evaluates="full")


SPEC = MethodSpec(
    name="u2s",
    title="U2S",
    options=U2SOptions,
    build=build,
    needs_stages=True,  # the UN and the CSN each own the backbone's later CNN stages
    space={
        "model.confusers": {"type": "int", "low": 1, "high": 5},
        "model.lam": {"type": "loguniform", "low": 0.05, "high": 2.0},
    },
    suite=Suite(
        "u2s",
        "u2s",
        "U2S Tables I–III (prediction fusion, category regularization, mask network)",
        (
            variant("onepass", ONEPASS, "One-Pass Universal", "I, III"),
            _fuse("universal"),
            _fuse("bridge"),
            _fuse("specific"),
            _fuse("universal,bridge"),
            _fuse("universal,specific"),
            _fuse("bridge,specific"),
            variant("full", {}, "a) U2S (universal + bridge + specific)", "I, II, III"),
            variant(
                "no_category_reg",
                {"model.category_reg": False},
                "w/o category regularization",
                "II",
            ),
            variant("simple", {"model.mask": "own_class_only"}, "b) U2S (simple)", "III"),
            variant("soft_csm", {"model.csm": "soft"}, "c) U2S (soft CSM)", "III"),
            variant("no_mask_network", {"model.mask_network": False}, "d) U2S − MN", "III"),
            variant("oracle", {"model.oracle": True}, "f) U2S (oracle)", "III", evaluates="full"),
            variant(
                "old_schedule",
                {"model.stage_shares": [0.4, 0.4, 0.2], "optim.warmup_every_stage": True},
                "stages 0.4/0.4/0.2, warm-up in every stage",
                "rev.",
            ),
            variant("confusers_5", {"model.confusers": 5}, "5 confusers per class", "rev."),
        ),
    ),
    figures="finegrain.models.u2s.figures:draw",
    mechanisms="finegrain.models.u2s.mechanisms:score",
)
