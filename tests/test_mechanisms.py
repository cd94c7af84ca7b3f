"""Mechanism scores (``finegrain/models/<method>/mechanisms.py``) on hand-made diagnostics whose
answer is known, and on the diagnostics the real models emit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from finegrain.models import build_model, method_spec
from finegrain.models.classreg.mechanisms import score as classreg_score
from finegrain.models.dsts.mechanisms import score as dsts_score
from finegrain.models.u2s.mechanisms import score as u2s_score

# two groups of two classes: "a" spatial-subtle, "b" temporal-subtle
NAMES = ["a0", "a1", "b0", "b1"]
GROUPS = {
    "a0": {"group": "a", "subtlety": "spatial"},
    "a1": {"group": "a", "subtlety": "spatial"},
    "b0": {"group": "b", "subtlety": "temporal"},
    "b1": {"group": "b", "subtlety": "temporal"},
}


def entropy(p: list[float]) -> float:
    return -sum(x * math.log2(x) for x in p if x > 0)


def dsts_diag(selection, neurons: int, share=None, layer: int = 0) -> dict:
    selection = torch.as_tensor(selection)
    d = {
        f"dsts/layer{layer}/selected": torch.bincount(selection, minlength=neurons),
        f"dsts/layer{layer}/selection": selection,
    }
    if share is not None:
        d[f"dsts/layer{layer}/temporal_share"] = torch.as_tensor(share, dtype=torch.float32)
    return d


# --- DSTS ---------------------------------------------------------------------------------


def test_dsts_one_neuron_for_every_clip_has_zero_entropy():
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    diags = [dsts_diag([0, 0, 0], 4), dsts_diag([0, 0, 0], 4)]
    out = dsts_score(diags, labels, labels, NAMES, GROUPS)
    assert out["selection_entropy_l0"] == 0.0
    assert out["selection_entropy_norm_l0"] == 0.0
    assert out["group_mi_l0"] == pytest.approx(0.0, abs=1e-12)  # a constant tells nothing


def test_dsts_uniform_selection_has_normalised_entropy_one():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    diags = [dsts_diag([0, 1, 2, 3], 4), dsts_diag([3, 2, 1, 0], 4)]
    out = dsts_score(diags, labels, labels, NAMES, GROUPS)
    assert out["selection_entropy_l0"] == pytest.approx(2.0)
    assert out["selection_entropy_norm_l0"] == pytest.approx(1.0)


def test_dsts_normalises_by_the_layer_neurons_not_the_ones_used():
    labels = torch.tensor([0, 1])
    out = dsts_score([dsts_diag([0, 1], 4)], labels, labels, NAMES, GROUPS)
    assert out["selection_entropy_l0"] == pytest.approx(1.0)
    assert out["selection_entropy_norm_l0"] == pytest.approx(0.5)  # 1 bit of log2 4


def test_dsts_neuron_that_tells_the_group_has_mi_equal_to_group_entropy():
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 0, 1])  # groups a a b a a b a a: 6 a, 2 b
    group = [NAMES[i][0] for i in labels.tolist()]
    selection = [2 if g == "a" else 0 for g in group]  # neuron 2 ⇔ group a (3 neurons)
    diags = [dsts_diag(selection[:5], 3), dsts_diag(selection[5:], 3)]
    out = dsts_score(diags, labels, labels, NAMES, GROUPS)
    assert out["group_mi_l0"] == pytest.approx(entropy([6 / 8, 2 / 8]))
    # independent of the group: MI 0
    diags = [dsts_diag([0, 0, 1, 1], 3), dsts_diag([0, 1, 0, 1], 3)]
    labels = torch.tensor([0, 2, 1, 3, 0, 0, 2, 2])  # neuron 0: a b a b; neuron 1: a b a b
    out = dsts_score(diags, labels, labels, NAMES, GROUPS)
    assert out["group_mi_l0"] == pytest.approx(0.0, abs=1e-12)


def test_dsts_temporal_share_gap_sign():
    labels = torch.tensor([0, 2, 1, 3])  # spatial, temporal, spatial, temporal
    share = [0.9, 0.1]  # neuron 0 temporal, neuron 1 spatial
    right = dsts_score([dsts_diag([1, 0, 1, 0], 2, share)], labels, labels, NAMES, GROUPS)
    assert right["temporal_share_gap_l0"] == pytest.approx(0.8)
    wrong = dsts_score([dsts_diag([0, 1, 0, 1], 2, share)], labels, labels, NAMES, GROUPS)
    assert wrong["temporal_share_gap_l0"] == pytest.approx(-0.8)
    # no share (conv3d), or no clip of one kind: no gap
    assert "temporal_share_gap_l0" not in dsts_score(
        [dsts_diag([1, 0, 1, 0], 2)], labels, labels, NAMES, GROUPS
    )
    spatial = torch.tensor([0, 1, 0, 1])
    assert "temporal_share_gap_l0" not in dsts_score(
        [dsts_diag([1, 0, 1, 0], 2, share)], spatial, spatial, NAMES, GROUPS
    )


def test_dsts_scores_every_layer_and_skips_group_scores_without_groups():
    labels = torch.tensor([0, 2])
    diag = {**dsts_diag([0, 1], 2, [0.5, 0.5], layer=0), **dsts_diag([1, 1], 2, layer=1)}
    out = dsts_score([diag], labels, labels, NAMES, GROUPS)
    assert {"selection_entropy_l1", "group_mi_l1", "temporal_share_gap_l0"} <= set(out)
    assert "temporal_share_gap_l1" not in out
    bare = dsts_score([diag], labels, labels, NAMES, {})
    assert set(bare) == {f"selection_entropy{n}_l{j}" for n in ("", "_norm") for j in (0, 1)}


def test_dsts_missing_diagnostics_give_nothing():
    labels = torch.tensor([0, 1])
    assert dsts_score([], labels, labels, NAMES, GROUPS) == {}
    assert dsts_score([{}, {"mask": torch.ones(2)}], labels, labels, NAMES, GROUPS) == {}
    # synapse="average_all": counts only, no per-clip selection
    assert dsts_score([{"dsts/layer0/temporal_share": torch.ones(2)}], labels, labels, NAMES,
                      GROUPS) == {}  # fmt: skip


# --- U2S ----------------------------------------------------------------------------------

TRUE_CSM = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
NO_CLIPS = torch.zeros(0, dtype=torch.long)


def u2s(csm, groups=GROUPS) -> dict:
    return u2s_score([{"csm": csm}, {"csm": csm}], NO_CLIPS, NO_CLIPS, NAMES, groups)


def test_u2s_csm_equal_to_the_groups_is_perfect():
    assert u2s(TRUE_CSM) == {
        "csm_pairs": 2.0,
        "csm_precision": 1.0,
        "csm_recall": 1.0,
        "csm_chance_precision": 1 / 3,
    }


def test_u2s_one_wrong_extra_pair_lowers_precision_only():
    csm = TRUE_CSM.clone()
    csm[0, 2] = csm[2, 0] = 1
    out = u2s(csm)
    assert out["csm_pairs"] == 3.0
    assert out["csm_precision"] == pytest.approx(2 / 3) and out["csm_recall"] == 1.0
    one_sided = TRUE_CSM.clone()
    one_sided[1, 3] = 1  # unordered pairs: C_ij or C_ji
    assert u2s(one_sided)["csm_pairs"] == 3.0


def test_u2s_soft_csm_is_thresholded_at_half_and_the_diagonal_ignored():
    soft = TRUE_CSM * 0.4 + 0.3  # 0.7 on same-group pairs, 0.3 elsewhere
    assert u2s(soft) == {
        "csm_pairs": 2.0,
        "csm_precision": 1.0,
        "csm_recall": 1.0,
        "csm_chance_precision": 1 / 3,
    }
    missed = TRUE_CSM.clone()
    missed[2, 3] = missed[3, 2] = 0
    assert u2s(missed) == {
        "csm_pairs": 1.0,
        "csm_precision": 1.0,
        "csm_recall": 0.5,
        "csm_chance_precision": 1 / 3,
    }


def test_u2s_empty_prediction_has_no_precision():
    assert u2s(torch.eye(4)) == {"csm_pairs": 0.0, "csm_recall": 0.0, "csm_chance_precision": 1 / 3}


def test_u2s_missing_diagnostics_give_nothing():
    assert u2s_score([], NO_CLIPS, NO_CLIPS, NAMES, GROUPS) == {}
    assert u2s_score([{"mask": torch.ones(1)}], NO_CLIPS, NO_CLIPS, NAMES, GROUPS) == {}
    assert u2s(TRUE_CSM, groups={}) == {}  # a real dataset: no groups
    assert u2s(torch.eye(3)) == {}  # a CSM that is not over these classes


# --- ClassReg -----------------------------------------------------------------------------


def classreg_diag(chosen, stages=(2, 3)) -> dict:
    return {"chosen_class": torch.tensor(chosen), **{f"agreement_stage{s}": 0 for s in stages}}


def test_classreg_blocks_that_always_agree():
    preds = torch.tensor([0, 3, 1, 2, 2])
    diags = [classreg_diag([[0, 0], [3, 3]]), classreg_diag([[1, 1], [2, 2], [2, 2]])]
    out = classreg_score(diags, preds, preds, NAMES, GROUPS)
    assert out == {"agreement_stage2": 1.0, "agreement_stage3": 1.0, "agreement_gap": 0.0}


def test_classreg_agreement_grows_with_depth():
    preds = torch.tensor([0, 1, 2, 3])
    chosen = [[0, 0], [0, 1], [0, 2], [1, 3]]  # shallow agrees once, deep always
    out = classreg_score([classreg_diag(chosen)], preds, preds, NAMES, {})  # no groups needed
    assert out == {"agreement_stage2": 0.25, "agreement_stage3": 1.0, "agreement_gap": 0.75}
    # without stage keys: named by block
    bare = classreg_score([{"chosen_class": torch.tensor(chosen)}], preds, preds, NAMES, {})
    assert set(bare) == {"agreement_block0", "agreement_block1", "agreement_gap"}


def test_classreg_missing_diagnostics_give_nothing():
    preds = torch.tensor([0, 1])
    assert classreg_score([], preds, preds, NAMES, GROUPS) == {}
    assert classreg_score([{}], preds, preds, NAMES, GROUPS) == {}  # stages=0: no blocks
    # clips that do not line up with the predictions
    assert classreg_score([classreg_diag([[0, 0]])], preds, preds, NAMES, GROUPS) == {}


# --- the spec -----------------------------------------------------------------------------


def test_spec_scores_lazily_and_never_raises(capsys):
    spec = method_spec("classreg")
    assert spec.mechanisms == "finegrain.models.classreg.mechanisms:score"
    assert method_spec("onepass").score_mechanisms([{}], NO_CLIPS, NO_CLIPS, NAMES, GROUPS) == {}
    broken = dataclasses.replace(spec, mechanisms="math:sqrt")  # wrong signature: raises
    assert broken.score_mechanisms([{}], NO_CLIPS, NO_CLIPS, NAMES, GROUPS) == {}
    assert (
        "warning: classreg mechanism scores (math:sqrt) failed: TypeError"
        in capsys.readouterr().out
    )
    missing = dataclasses.replace(spec, mechanisms="finegrain.no_such_module:score")
    assert missing.score_mechanisms([{}], NO_CLIPS, NO_CLIPS, NAMES, GROUPS) == {}


# --- the real models ----------------------------------------------------------------------


def real_scores(method: str, model, **forward) -> dict[str, float]:
    """Two evaluation batches of random clips through ``model``; its spec's scores."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(2, 3, 8, 32, 32, generator=g), torch.tensor([0, 2])),
        (torch.randn(2, 3, 8, 32, 32, generator=g), torch.tensor([1, 3])),
    ]
    model.eval()
    diagnostics, labels, preds = [], [], []
    with torch.no_grad():
        for clips, y in batches:
            out = model(clips, **forward)
            diagnostics.append({k: v.detach().cpu() for k, v in out.diagnostics.items()})
            labels.append(y)
            preds.append(out.logits.argmax(1))
    scores = method_spec(method).score_mechanisms(
        diagnostics, torch.cat(labels), torch.cat(preds), NAMES, GROUPS
    )
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()), scores
    return scores


def test_real_dsts_model():
    torch.manual_seed(0)
    model = build_model("dsts", 4, "tiny", width=4)
    scores = real_scores("dsts", model)
    kinds = ("selection_entropy", "selection_entropy_norm", "group_mi", "temporal_share_gap")
    assert set(scores) == {f"{k}_l{j}" for k in kinds for j in range(len(model.head.layers))}
    assert all(0.0 <= scores[f"selection_entropy_norm_l{j}"] <= 1.0 for j in range(3))


@pytest.mark.filterwarnings("ignore:U2S CSM")
def test_real_u2s_model():
    torch.manual_seed(0)
    model = build_model("u2s", 4, "tiny", width=4)
    train = (torch.randn(4, 3, 8, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert real_scores("u2s", model) == {}  # stage 1: no CSM yet
    model.begin_stage(1, lambda: [train])  # stage 2: the CSM computed and installed
    scores = real_scores("u2s", model)
    assert (
        {"csm_pairs", "csm_recall"}
        <= set(scores)
        <= {"csm_pairs", "csm_recall", "csm_precision", "csm_chance_precision"}
    )
    assert ("csm_precision" in scores) == (scores["csm_pairs"] > 0)


def test_real_classreg_model():
    torch.manual_seed(0)
    model = build_model("classreg", 4, "tiny", width=4, min_channels=0)  # a block per stage
    scores = real_scores("classreg", model)
    stages = model.block_stages
    assert len(stages) > 1
    assert set(scores) == {f"agreement_stage{s}" for s in stages} | {"agreement_gap"}
    assert all(0.0 <= scores[f"agreement_stage{s}"] <= 1.0 for s in stages)
    deep, shallow = scores[f"agreement_stage{stages[-1]}"], scores[f"agreement_stage{stages[0]}"]
    assert scores["agreement_gap"] == pytest.approx(deep - shallow)


def test_verdicts_say_whether_each_claim_holds_from_the_intervals():
    from finegrain.models import method_spec

    dsts = method_spec("dsts").verdict
    holds = {
        "group_mi_l2": (0.8, 0.5, 1.0),
        "selection_entropy_norm_l2": (0.6, 0.5, 0.7),
        "temporal_share_gap_l2": (0.1, 0.02, 0.2),
    }
    assert dsts(holds).startswith("specialisation holds") and "temporal routing holds" in dsts(
        holds
    )
    loose = {**holds, "group_mi_l2": (0.1, 0.0, 0.2), "temporal_share_gap_l2": (0.0, -0.1, 0.1)}
    assert "specialisation not shown" in dsts(loose) and "routing not shown" in dsts(loose)
    u2s = method_spec("u2s").verdict
    good = {"csm_precision": (0.8, 0.6, 0.9), "csm_chance_precision": (0.1, 0.1, 0.1)}
    assert u2s(good).startswith("holds") and u2s({}).startswith("not scored")
    assert u2s({**good, "csm_precision": (0.2, 0.05, 0.3)}).startswith("not shown")
    classreg = method_spec("classreg").verdict
    rising = {"agreement_stage2": (0.5, 0.4, 0.6), "agreement_stage3": (0.9, 0.8, 1.0)}
    assert classreg({**rising, "agreement_gap": (0.4, 0.3, 0.5)}).startswith("holds")
    assert classreg({**rising, "agreement_gap": (0.4, -0.1, 0.5)}).startswith("not shown")
    assert "no mechanism score" in method_spec("onepass").verdict({})
