"""Mechanism scores (``finegrain/models/<method>/mechanisms.py``) on hand-made diagnostics whose
answer is known, and on the diagnostics the real models emit."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from finegrain.models import build_model, method_spec
from finegrain.models.classreg.mechanisms import score as classreg_score
from finegrain.models.dfb.mechanisms import score as dfb_score
from finegrain.models.dsts.mechanisms import score as dsts_score
from finegrain.models.evidence import cell_overlap, clip_scores, frame_cells
from finegrain.models.joint_attn.mechanisms import score as joint_attn_score
from finegrain.models.onepass.mechanisms import score as onepass_score
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


# --- evidence boxes (DFB, JointAttn, the baseline's CAM) ----------------------------------
# Input clips of 8 frames × 32 × 32 px; feature grids of 4 time cells × 4 × 4 cells of 8 px.

SIZE = torch.tensor([8.0, 32.0, 32.0])
NAN_BOX = [math.nan] * 4


def truth(boxes, key: str = "part") -> dict:
    """A batch's evidence: ``boxes`` (B, T, 4) as ``key``, the other box all NaN."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    other = "object" if key == "part" else "part"
    return {
        key: boxes,
        other: torch.full_like(boxes, math.nan),
        "visible": torch.ones(boxes.shape[:2], dtype=torch.bool),
    }


def every_frame(*boxes) -> list:
    """(B, 8, 4): clip b's box ``boxes[b]`` on every frame."""
    return [[list(b)] * 8 for b in boxes]


def test_evidence_geometry():
    assert frame_cells(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert frame_cells(4, 4).tolist() == [0, 1, 2, 3]
    assert frame_cells(8, 1).tolist() == [0] * 8
    overlap, area = cell_overlap(torch.tensor([[4.0, 8, 16, 12], NAN_BOX]), (4, 4), (32, 32))
    assert area.tolist() == [12 * 4 / 1024, 0.0]
    assert overlap[0, 1].tolist() == [0.25, 0.5, 0.0, 0.0]  # row y 8..16: half of its height
    assert overlap[0].sum() * 64 == pytest.approx(12 * 4)  # the cells hold the box's area
    assert overlap[1].sum() == 0  # NaN: no box
    clipped, area = cell_overlap(torch.tensor([[-8.0, -8, 8, 8]]), (4, 4), (32, 32))
    assert area.item() == 64 / 1024 and clipped[0, 0, 0] == 1.0  # clipped to the frame


def test_attention_equal_to_the_box_has_mass_one_and_uniform_attention_scores_chance():
    box = (8.0, 8.0, 24.0, 16.0)  # cells (1, 1) and (1, 2): 128 px of 1024
    att = torch.zeros(2, 4, 4, 4)
    att[:, :, 1, 1:3] = 0.5
    diag = {"attention": att, "input_size": SIZE}
    out = joint_attn_score(
        [diag], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(box, box), "object")]
    )
    assert out == pytest.approx({"object_mass": 1.0, "object_chance": 0.125, "object_lift": 0.875})
    # uniform attention, a box off the grid: mass = the box's area share exactly
    odd = (3.0, 5.0, 13.5, 20.0)
    uniform = {"attention": torch.full((2, 4, 4, 4), 1 / 16), "input_size": SIZE}
    out = joint_attn_score(
        [uniform], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(odd, box), "object")]
    )
    chance = (10.5 * 15 / 1024 + 0.125) / 2
    assert out["object_mass"] == pytest.approx(chance) == out["object_chance"]
    assert out["object_lift"] == pytest.approx(0.0, abs=1e-12)


def test_attention_of_a_time_cell_is_read_on_its_own_frames():
    att = torch.zeros(1, 4, 4, 4)
    att[0, :2, 0, 0] = 1.0  # time cells 0, 1 (frames 0-3): top left; cells 2, 3: bottom right
    att[0, 2:, 3, 3] = 1.0
    boxes = [[[0.0, 0, 8, 8]] * 4 + [[24.0, 24, 32, 32]] * 4]
    diag = {"attention": att, "input_size": SIZE}
    out = joint_attn_score([diag], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(boxes, "object")])
    assert out["object_mass"] == pytest.approx(1.0)
    boxes = [[[24.0, 24, 32, 32]] * 4 + [[0.0, 0, 8, 8]] * 4]  # the other way round: missed
    out = joint_attn_score([diag], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(boxes, "object")])
    assert out["object_mass"] == 0.0 and out["object_lift"] == pytest.approx(-1 / 16)


def dfb_diag(true_cells, other_cell=(0, 3, 3)) -> dict:
    """Clip b's true class (label b) fires most at ``true_cells[b]``, every other class at
    ``other_cell``."""
    b = len(true_cells)
    thw = torch.tensor(other_cell).repeat(b, len(NAMES), 1)
    for i, cell in enumerate(true_cells):
        thw[i, i] = torch.tensor(cell)
    return {
        "max_response_thw": thw,
        "max_response_filter": torch.zeros(b, len(NAMES), dtype=torch.long),
        "max_response_value": torch.ones(b, len(NAMES)),
        "feature_stride": torch.tensor([2.0, 8.0, 8.0]),
        "input_size": SIZE,
    }


def test_dfb_true_class_responses_all_in_the_box_hit_one():
    labels = torch.tensor([0, 1])
    box = (0.0, 0.0, 16.0, 16.0)  # cells (0..1, 0..1): a quarter of the frame
    diag = dfb_diag([(1, 1, 0), (3, 0, 1)])  # (t, h, w): inside; the other classes outside
    out = dfb_score([diag], labels, labels, NAMES, GROUPS, [truth(every_frame(box, box))])
    assert out == pytest.approx(
        {"evidence_hit": 1.0, "evidence_chance": 0.25, "evidence_lift": 0.75}
    )
    # the true class's response is read, not the prediction's nor the strongest
    swapped = torch.tensor([2, 3])
    out = dfb_score([diag], swapped, swapped, NAMES, GROUPS, [truth(every_frame(box, box))])
    assert out["evidence_hit"] == 0.0 and out["evidence_lift"] == -0.25


def test_dfb_scores_the_frames_of_the_response_time_cell_only():
    labels = torch.tensor([0])
    # the box is on the top-left cell at frames 2-3 (time cell 1) only; elsewhere bottom right
    boxes = [[[24.0, 24, 32, 32]] * 2 + [[0.0, 0, 8, 8]] * 2 + [[24.0, 24, 32, 32]] * 4]
    hit = dfb_score([dfb_diag([(1, 0, 0)])], labels, labels, NAMES, GROUPS, [truth(boxes)])
    miss = dfb_score([dfb_diag([(2, 0, 0)])], labels, labels, NAMES, GROUPS, [truth(boxes)])
    assert hit["evidence_hit"] == 1.0 and miss["evidence_hit"] == 0.0
    assert hit["evidence_chance"] == miss["evidence_chance"] == 1 / 16


def cam_diag(cam) -> dict:
    cam = torch.as_tensor(cam, dtype=torch.float16)
    return {"cam": cam, "cam_class": torch.zeros(len(cam), dtype=torch.long), "input_size": SIZE}


def test_cam_peaked_outside_the_box_scores_zero():
    cam = -torch.ones(1, 4, 4, 4)
    cam[0, :, 3, 3] = 1.0  # the peak bottom right, negative elsewhere
    box = (0.0, 0.0, 16.0, 16.0)
    out = onepass_score(
        [cam_diag(cam)], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(box))]
    )
    assert out == pytest.approx(
        {"evidence_hit": 0.0, "evidence_mass": 0.0, "evidence_chance": 0.25, "evidence_lift": -0.25}
    )
    cam[0, :, 0, 0] = 3.0  # a higher peak in the box: hit 1, mass 3/4
    out = onepass_score(
        [cam_diag(cam)], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(box))]
    )
    assert out["evidence_hit"] == 1.0 and out["evidence_mass"] == pytest.approx(0.75)
    flat = torch.zeros(1, 4, 4, 4)  # nowhere positive: not scored
    assert (
        onepass_score(
            [cam_diag(flat)], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(box))]
        )
        == {}
    )


def test_cam_ties_share_the_peak():
    cam = torch.zeros(1, 4, 4, 4)
    cam[0, :, 0, 0] = cam[0, :, 3, 3] = 1.0  # two equal peaks, one in the box
    box = (0.0, 0.0, 8.0, 8.0)
    out = onepass_score(
        [cam_diag(cam)], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(every_frame(box))]
    )
    assert out["evidence_hit"] == 0.5 and out["evidence_mass"] == 0.5


def test_frames_and_clips_without_a_box_are_skipped():
    att = torch.zeros(3, 4, 4, 4)
    att[:, :, 0, 0] = 1.0
    half = [[0.0, 0, 8, 8]] * 4 + [[math.nan, 0, 8, 8]] * 4  # frames 4-7: no box
    boxes = [half, [[0.0, 0, 8, 8]] * 8, [NAN_BOX] * 8]  # clip 2: none at all
    diag = {"attention": att, "input_size": SIZE}
    out = joint_attn_score([diag], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(boxes, "object")])
    assert out["object_mass"] == 1.0 and out["object_chance"] == 1 / 16  # clip 2 left out
    per_clip = clip_scores(att, torch.tensor(boxes), SIZE)
    assert per_clip["mass"][:2].tolist() == [1.0, 1.0] and math.isnan(per_clip["mass"][2])
    # all NaN (a real dataset): nothing
    nan = [[NAN_BOX] * 8] * 3
    assert joint_attn_score([diag], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [truth(nan, "object")]) == {}


def test_no_evidence_gives_nothing():
    att = {"attention": torch.full((2, 4, 4, 4), 1 / 16), "input_size": SIZE}
    labels = torch.tensor([0, 1])
    box = every_frame((0.0, 0.0, 8.0, 8.0), (0.0, 0.0, 8.0, 8.0))
    for evidence in (None, [], [None], [{"visible": torch.ones(2, 8, dtype=torch.bool)}]):
        assert joint_attn_score([att], labels, labels, NAMES, GROUPS, evidence) == {}
        assert dfb_score([dfb_diag([(0, 0, 0)] * 2)], labels, labels, NAMES, GROUPS, evidence) == {}
        assert (
            onepass_score(
                [cam_diag(torch.ones(2, 4, 4, 4))], labels, labels, NAMES, GROUPS, evidence
            )
            == {}
        )
    assert joint_attn_score([att], labels, labels, NAMES, GROUPS) == {}  # the old signature
    # the diagnostics lack their maps, or the batches do not line up
    assert joint_attn_score([{}], labels, labels, NAMES, GROUPS, [truth(box, "object")]) == {}
    assert dfb_score([{"input_size": SIZE}], labels, labels, NAMES, GROUPS, [truth(box)]) == {}
    assert (
        onepass_score(
            [{"cam": torch.ones(2, 4, 4, 4)}], labels, labels, NAMES, GROUPS, [truth(box)]
        )
        == {}
    )
    assert joint_attn_score([att, att], labels, labels, NAMES, GROUPS, [truth(box, "object")]) == {}
    assert (
        dfb_score([dfb_diag([(0, 0, 0)] * 2)], labels[:1], labels[:1], NAMES, GROUPS, [truth(box)])
        == {}
    )
    # a batch without evidence among batches with it: its clips are skipped
    both = joint_attn_score(
        [att, att], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [None, truth(box, "object")]
    )
    assert both["object_chance"] == 1 / 16


def test_evaluator_collects_the_evidence_of_every_batch_for_the_scorer():
    from contextlib import nullcontext
    from types import SimpleNamespace

    from finegrain.platform.train import Evaluator

    torch.manual_seed(0)
    box = (0.0, 0.0, 16.0, 16.0)
    batches = []
    for i in range(2):
        y = torch.tensor([i, i + 2])
        clips = torch.randn(2, 3, 8, 32, 32)
        batch = {
            "video_id": [f"v{i}", f"v{i + 2}"],
            "clips": clips,
            "evidence": truth(every_frame(box, box)),
        }
        batches.append((clips, y, batch))
    worker = SimpleNamespace(
        cfg=SimpleNamespace(model=SimpleNamespace(method="onepass")),
        config={"classes": NAMES, "class_groups": GROUPS},
        world=1,
    )
    streams = SimpleNamespace(val_batches=lambda epoch: iter(batches))
    model = build_model("onepass", 4, "tiny", width=4)
    evaluator = Evaluator(worker, model, streams, nullcontext())
    evaluator.check_complete = lambda ids: None  # the data report lives in Ray
    seen = {}

    def record(diagnostics, labels, preds, names, groups, evidence=None):
        seen.update(diagnostics=diagnostics, labels=labels, evidence=evidence)
        return {}

    result, _ = evaluator.evaluate(0)
    assert {"evidence_hit", "evidence_mass", "evidence_chance", "evidence_lift"} <= set(
        result["mechanisms"]
    )
    assert result["mechanisms"]["evidence_chance"] == pytest.approx(0.25)
    evaluator.spec = SimpleNamespace(
        mechanisms="recorder", score_mechanisms=record, mechanisms_need_evidence=False
    )
    evaluator.evaluate(0)
    assert len(seen["evidence"]) == len(seen["diagnostics"]) == 2
    assert all(
        torch.equal(e["part"], b[2]["evidence"]["part"]) for e, b in zip(seen["evidence"], batches)
    )
    assert seen["labels"].tolist() == [0, 2, 1, 3]
    for _, _, batch in batches:  # old shards: no evidence at all → None
        del batch["evidence"]
    evaluator.evaluate(0)
    assert seen["evidence"] is None
    # a scorer of evidence boxes on a dataset without any: no diagnostics kept, not called
    seen.clear()
    evaluator.spec = SimpleNamespace(
        mechanisms="recorder", score_mechanisms=record, mechanisms_need_evidence=True
    )
    result, _ = evaluator.evaluate(0)
    assert not seen and "mechanisms" not in result
    assert (
        Evaluator.batch_evidence({"evidence": {"part": torch.ones(1)}})["part"].device.type == "cpu"
    )


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
    # a scorer of the old five-argument signature still runs, evidence or not
    old = dataclasses.replace(spec, mechanisms=f"{__name__}:five_argument_scorer")
    assert old.score_mechanisms([{}], NO_CLIPS, NO_CLIPS, NAMES, GROUPS, [None]) == {"old": 1.0}


def five_argument_scorer(diagnostics, labels, preds, class_names, class_groups):
    return {"old": 1}


# --- the real models ----------------------------------------------------------------------


def real_scores(method: str, model, evidence=None, **forward) -> dict[str, float]:
    """Two evaluation batches of random clips through ``model``; its spec's scores (with
    ``evidence``: the same evidence dict for both batches)."""
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
        diagnostics,
        torch.cat(labels),
        torch.cat(preds),
        NAMES,
        GROUPS,
        evidence=None if evidence is None else [evidence] * len(batches),
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


REAL_BOX = (8.0, 8.0, 24.0, 24.0)  # a quarter of the 32-px frames, centred


@pytest.mark.parametrize(
    ("method", "options", "keys"),
    [
        ("dfb", {}, {"evidence_hit", "evidence_chance", "evidence_lift"}),
        ("joint_attn", {"grid": 4}, {"object_mass", "object_chance", "object_lift"}),
        ("onepass", {}, {"evidence_hit", "evidence_mass", "evidence_chance", "evidence_lift"}),
    ],
)
def test_real_models_score_against_the_evidence(method, options, keys):
    torch.manual_seed(0)
    model = build_model(method, 4, "tiny", width=4, **options)
    prefix = next(iter(keys)).split("_")[0]
    assert real_scores(method, model) == {}  # no ground truth
    box = "object" if prefix == "object" else "part"
    scores = real_scores(method, model, evidence=truth(every_frame(REAL_BOX, REAL_BOX), box))
    assert set(scores) == keys
    assert scores[f"{prefix}_chance"] == pytest.approx(0.25)
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if not k.endswith("_lift"))
    if method == "onepass":  # training computes no CAM
        model.train()
        assert model(torch.randn(2, 3, 8, 32, 32)).diagnostics == {}


def test_real_cam_is_the_class_activation_map_of_the_prediction():
    torch.manual_seed(0)
    model = build_model("onepass", 4, "tiny", width=4).eval()
    clips = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        out = model(clips)
        features = model.backbone(clips)[-1]
    pred = out.logits.argmax(1)
    assert torch.equal(out.diagnostics["cam_class"], pred)
    assert out.diagnostics["cam"].dtype == torch.float16
    assert out.diagnostics["cam"].shape == (2, *features.shape[2:])
    assert out.diagnostics["input_size"].tolist() == [8.0, 32.0, 32.0]
    cam = model.head.class_activation_map(features, pred)  # its mean + bias: the logit
    logit = cam.mean(dim=(1, 2, 3)) + model.head.fc.bias[pred]
    torch.testing.assert_close(logit, out.logits.gather(1, pred[:, None]).squeeze(1))
    scaled = cam / cam.abs().amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.diagnostics["cam"].float(), scaled, atol=1e-3, rtol=1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: still float16
        low = model(clips).diagnostics["cam"]
    assert low.dtype == torch.float16 and torch.isfinite(low).all()
    assert low.abs().amax(dim=(1, 2, 3)).tolist() == [1.0, 1.0]


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
    assert method_spec("onepass").verdict({}).startswith("not scored")
    for method, prefix, key in (
        ("dfb", "evidence", "hit"),
        ("joint_attn", "object", "mass"),
        ("onepass", "evidence", "hit"),
    ):
        judge = method_spec(method).verdict
        above = {
            f"{prefix}_{key}": (0.6, 0.5, 0.7),
            f"{prefix}_chance": (0.1, 0.1, 0.1),
            f"{prefix}_lift": (0.5, 0.4, 0.6),
        }
        assert judge(above).startswith("holds: "), judge(above)
        assert "60 % in the" in judge(above) and "vs 10 % by chance" in judge(above)
        assert judge({**above, f"{prefix}_lift": (0.1, -0.05, 0.2)}).startswith("not shown")
        assert judge({}).startswith("not scored")
    onepass = method_spec("onepass").verdict
    assert "CAM mass 40 %" in onepass({**above, "evidence_mass": (0.4, 0.3, 0.5)})
