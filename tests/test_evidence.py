"""Ground truth ("evidence") of the synthetic benchmark: the generator's per-frame boxes, carried
through the reader's manifest, the shards and the clip decoder's frame sampling, resize, crop and
flip into each clip's pixels. No Ray: the decoder and the collate are called directly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from finegrain.datasets import synthetic
from finegrain.datasets.encode import write_mp4
from finegrain.datasets.pipeline import (
    GT_KEYS,
    ClipCollate,
    ClipConfig,
    ClipDecoder,
    _Batcher,
    _runs,
    sample_views,
)
from finegrain.datasets.readers import EVIDENCE_FIELD, read_dataset, write_manifest
from finegrain.datasets.shards import SHARD_SCHEMA, build_shards
from finegrain.datasets.transforms import view_geometry

CLASSES = ["Moving something from left to right", "Moving something from right to left"]

# --------------------------------------------------------------------------- a known square

H, W, T = 48, 64, 12
SIDE_X, SIDE_Y = 12, 9


def _square_video(path: Path) -> tuple[bytes, dict]:
    """A bright 12 x 9 square moving right and down over a dark frame (none in frame 0; partly
    out on the right at the end), and its evidence written by hand: part = the square, object
    = the square grown by 3 px, visible in frames 2-9."""
    frames = np.full((T, H, W, 3), 16, np.uint8)
    part, obj = [None], [None]
    for t in range(1, T):
        x, y = 6 * t - 4, 6 + 2 * t
        frames[t, y : y + SIDE_Y, x : x + SIDE_X] = 240
        part.append([x, y, min(x + SIDE_X, W), y + SIDE_Y])
        obj.append([max(x - 3, 0), y - 3, min(x + SIDE_X + 3, W), y + SIDE_Y + 3])
    visible = [int(2 <= t <= 9) for t in range(T)]
    write_mp4(path, frames, fps=12)
    evidence = {"height": H, "width": W, "part": part, "object": obj, "visible": visible}
    return path.read_bytes(), evidence


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> tuple[bytes, dict]:
    return _square_video(tmp_path_factory.mktemp("square") / "square.mp4")


def _assert_on_content(clips: np.ndarray, part: np.ndarray) -> int:
    """The bright pixels of every frame lie in its part box (1 px of slack for the resize's
    blur) and the box is tight around them (within 1.5 px); no box, no bright pixels. Returns
    how many frames had a box."""
    boxes = 0
    for v in range(len(clips)):
        for t in range(clips.shape[1]):
            bright = clips[v, t].max(-1) > 128
            box = part[v, t]
            if np.isnan(box).any():
                assert not bright.any(), (v, t)
                continue
            boxes += 1
            x0, y0, x1, y1 = box
            ys, xs = np.nonzero(bright)
            if x1 - x0 < 1.5 or y1 - y0 < 1.5:  # a sliver at the crop's edge: may be too dim
                assert len(xs) == 0 or (xs.min() >= x0 - 1.5 and ys.min() >= y0 - 1.5)
                continue
            assert len(xs), (v, t, box)
            cx, cy = xs + 0.5, ys + 0.5
            assert cx.min() >= x0 - 1 and cx.max() <= x1 + 1, (v, t, box, xs.min(), xs.max())
            assert cy.min() >= y0 - 1 and cy.max() <= y1 + 1, (v, t, box, ys.min(), ys.max())
            tight = (xs.min() - x0, ys.min() - y0, x1 - xs.max() - 1, y1 - ys.max() - 1)
            assert max(tight) <= 1.5, (v, t, box, tight)
    return boxes


def _expected_visible(evidence: dict, indices: np.ndarray, part: np.ndarray) -> np.ndarray:
    return np.asarray(evidence["visible"], bool)[indices] & ~np.isnan(part[..., 0])


def test_train_crop_and_flip_carry_the_boxes(square):
    video, evidence = square
    cfg = ClipConfig(sampling="tsn", num_frames=6, short_side=32, crop_size=24, flip=True)
    decoder = ClipDecoder(cfg, train=True, class_names=CLASSES, seed=1)
    flips, boxes = set(), 0
    for epoch in range(12):
        gt = {
            "gt_part": np.zeros((1, 6, 4), np.float32),
            "gt_object": np.zeros((1, 6, 4), np.float32),
            "gt_visible": np.zeros((1, 6), bool),
        }
        clips, labels = decoder.decode_row(
            video, 0, "sq", epoch=epoch, evidence=json.dumps(evidence), gt=gt
        )
        flipped = bool(labels[0] == 1)  # the left/right pair swaps when the view is mirrored
        flips.add(flipped)
        boxes += _assert_on_content(clips, gt["gt_part"])
        obj, part = gt["gt_object"], gt["gt_part"]
        both = ~np.isnan(part[..., 0])
        assert (obj[both][:, :2] <= part[both][:, :2] + 1e-4).all()  # the object holds the part
        assert (obj[both][:, 2:] >= part[both][:, 2:] - 1e-4).all()
        assert ((0 <= obj[~np.isnan(obj)]) & (obj[~np.isnan(obj)] <= 24)).all()
        # the visibility of the frames that clip sampled (the decoder's own draw)
        rng = decoder.row_rng("sq", epoch)
        indices = sample_views(T, cfg, train=True, rng=rng)
        np.testing.assert_array_equal(gt["gt_visible"], _expected_visible(evidence, indices, part))
        # the same numbers as the pixels: redraw the crop and flip from the decoder's rng
        (geom,) = view_geometry(H, W, short_side=32, crop_size=24, train=True, flip=True, rng=rng)
        assert geom.flipped == flipped
    assert flips == {True, False} and boxes > 30


@pytest.mark.parametrize("sampling", ["dense", "tsn"])
def test_eval_clips_and_three_crops_carry_the_boxes(square, sampling):
    video, evidence = square
    cfg = ClipConfig(
        sampling=sampling, num_frames=4, stride=2, n_clips=2, n_crops=3, short_side=32,
        crop_size=24,
    )  # fmt: skip
    decoder = ClipDecoder(cfg, train=False, class_names=CLASSES)
    # the same boxes written for frames 4x wider and 2x taller: scaled to the decoded frames
    big = {**evidence, "height": 2 * H, "width": 4 * W}
    for key in ("part", "object"):
        big[key] = [b and [4 * b[0], 2 * b[1], 4 * b[2], 2 * b[3]] for b in evidence[key]]
    batch = {
        "video": np.array([video, video, video], dtype=object),
        "video_id": np.array(["a", "b", "c"]),
        "label": np.array([0, 1, 0]),
        "evidence": np.array([json.dumps(evidence), None, json.dumps(big)], dtype=object),
    }
    out = decoder(batch)
    assert out["clip"].shape == (18, 4, 24, 24, 3)
    assert out["gt_part"].shape == out["gt_object"].shape == (18, 4, 4)
    for key in GT_KEYS:
        np.testing.assert_allclose(out[key][12:], out[key][:6], atol=1e-4)
    assert out["gt_part"].dtype == np.float32 and out["gt_visible"].dtype == bool
    first = slice(0, 6)  # video "a": views clip * 3 + crop
    assert _assert_on_content(out["clip"][first], out["gt_part"][first]) > 12
    indices = np.repeat(sample_views(T, cfg, train=False), 3, axis=0)  # (6, 4): per view
    expected = _expected_visible(evidence, indices, out["gt_part"][first])
    np.testing.assert_array_equal(out["gt_visible"][first], expected)
    # the three crops see the same frames at three horizontal offsets (lefts 0, 9, 18 of 42)
    part = out["gt_part"][first].reshape(2, 3, 4, 4)
    both = ~np.isnan(part[:, 0, :, 0]) & ~np.isnan(part[:, 1, :, 0])
    interior = both & (part[:, 0, :, 0] > 0) & (part[:, 1, :, 0] > 0)
    np.testing.assert_allclose(part[:, 0][interior][:, 0] - part[:, 1][interior][:, 0], 9)
    # the row without evidence: NaN boxes, nothing visible
    assert np.isnan(out["gt_part"][6:12]).all() and np.isnan(out["gt_object"][6:12]).all()
    assert not out["gt_visible"][6:12].any()


def test_rows_without_evidence_and_the_collate(square):
    video, evidence = square
    cfg = ClipConfig(num_frames=4, short_side=32, crop_size=32)
    decoder = ClipDecoder(cfg, train=False, class_names=CLASSES)
    plain = {"video": np.array([video], dtype=object), "video_id": np.array(["p"])}
    plain["label"] = np.array([0])
    out = decoder(plain)  # a shard without the column at all
    assert set(GT_KEYS) <= set(out)
    assert np.isnan(out["gt_part"]).all() and not out["gt_visible"].any()
    with_gt = decoder({**plain, "evidence": np.array([json.dumps(evidence)], dtype=object)})
    assert not np.isnan(with_gt["gt_part"]).all() and with_gt["gt_visible"].any()
    bad = decoder({**plain, "evidence": np.array(['{"part": 3}'], dtype=object)})
    assert len(bad["clip"]) == 1 and np.isnan(bad["gt_part"]).all()  # bad evidence: still decoded

    # batched as EpochBatches / iter_clip_batches do, then collated: the keys survive
    blocks = [{**b, "epoch": np.zeros(1, np.int32)} for b in (out, with_gt, out)]
    batcher = _Batcher(2)
    batches = [b for block in blocks for run in _runs(block) for b in batcher.add(run)]
    batches += list(batcher.flush())
    assert [len(b["label"]) for b in batches] == [2, 1]
    collated = ClipCollate()(batches[0])
    ev = collated["evidence"]
    assert ev["part"].shape == ev["object"].shape == (2, 4, 4) and ev["visible"].shape == (2, 4)
    assert ev["part"].dtype == torch.float32 and ev["visible"].dtype == torch.bool
    assert torch.isnan(ev["part"][0]).all() and not torch.isnan(ev["part"][1]).all()
    # a batch from before the ground truth existed: the same schema, nothing in it
    old = {k: v for k, v in batches[0].items() if k not in GT_KEYS}
    ev = ClipCollate()(old)["evidence"]
    assert torch.isnan(ev["part"]).all() and ev["visible"].shape == (2, 4)
    assert not ev["visible"].any()


# --------------------------------------------------------------------------- the generator


def _without_main_object(monkeypatch, scene: str) -> None:
    """Render scene ``scene`` without its main drawing (the random draws stay the same)."""
    real = synthetic._SCENES[scene]

    def hidden(sc, variant):
        placeholders, _, evidence = real(sc, variant)
        return placeholders, lambda f, t: None, evidence

    monkeypatch.setitem(synthetic._SCENES, scene, hidden)


def _outside(mask: np.ndarray, box) -> int:
    """How many pixels of ``mask`` have their centre outside ``box`` (None: all of them)."""
    ys, xs = np.nonzero(mask)
    if box is None:
        return len(xs)
    x0, y0, x1, y1 = box
    return int((~((xs + 0.5 >= x0) & (xs + 0.5 < x1) & (ys + 0.5 >= y0) & (ys + 0.5 < y1))).sum())


def _union(*boxes):
    boxes = [b for b in boxes if b is not None]
    return synthetic._union(*boxes) if boxes else None


@pytest.mark.parametrize("kind", ["finegrained", "pretrain"])
def test_generator_boxes_hold_the_drawn_object(monkeypatch, kind):
    """Every pixel the scene's drawing changes lies in the object (or part) box of its frame
    (the fill scene's pouring stream above the container aside; the occlusion scene's panel is
    checked against its partner below)."""
    classes = synthetic.KINDS[kind]
    for c, cls in enumerate(classes):
        if cls.scene == "occlude" or (kind == "pretrain" and c % 3):
            continue
        frames, _, ev = synthetic.render(c, size=32, seed=2, index=c, kind=kind, with_evidence=True)
        assert len(ev["part"]) == len(ev["object"]) == len(ev["visible"]) == len(frames)
        assert (ev["height"], ev["width"]) == (32, 32)
        with monkeypatch.context() as m:
            _without_main_object(m, cls.scene)
            background, _ = synthetic.render(c, size=32, seed=2, index=c, kind=kind)
        changed = (frames != background).any(-1)
        assert changed.any()
        for t in range(len(frames)):
            box = _union(ev["object"][t], ev["part"][t])
            if cls.scene == "fill" and box is not None:
                changed[t, : int(np.ceil(box[1] - 0.5))] = False  # the stream from above
            assert _outside(changed[t], box) == 0, (cls.name, t, box)
            for b in (ev["object"][t], ev["part"][t]):
                assert b is None or (0 <= b[0] < b[2] <= 32 and 0 <= b[1] < b[3] <= 32)
            assert ev["visible"][t] in (0, 1)
            assert not ev["visible"][t] or ev["part"][t] is not None
        if kind == "pretrain":
            assert not any(ev["visible"]) and all(p is None for p in ev["part"])
        else:
            assert any(ev["visible"]), cls.name


@pytest.mark.parametrize("group", ["corner-notch", "dot-count", "occlusion", "shade"])
def test_generator_part_boxes_hold_the_difference_between_partners(group):
    """The spatial groups draw the same scene for every member but for the difference: where
    two members' frames differ lies in their part boxes."""
    members = [c for c, cls in enumerate(synthetic.CLASSES) if cls.group == group]
    for index in (0, 1):
        outs = [
            synthetic.render(c, size=32, seed=4, index=index, with_evidence=True) for c in members
        ]
        for i, (fa, _, ea) in enumerate(outs):
            for fb, _, eb in outs[i + 1 :]:
                differs = (fa != fb).any(-1)
                assert differs.any()
                for t in range(len(fa)):
                    box = _union(ea["part"][t], eb["part"][t])
                    assert _outside(differs[t], box) == 0, (group, index, t, box)


def test_generated_pixels_unchanged():
    """The ground truth changed no pixel: this hash was taken from the generator before it
    wrote any (every class of both kinds, 32 px, seed 7)."""
    digest = hashlib.sha256()
    for kind, classes in synthetic.KINDS.items():
        for c in range(len(classes)):
            digest.update(synthetic.render(c, size=32, seed=7, index=c, kind=kind)[0].tobytes())
    assert digest.hexdigest() == (
        "e109f0d7093acb7c2d39811ea54b2557252f933d1f85ca7e37f2c7968b961ff7"
    )
    frames, *_ = synthetic.render(3, size=32, seed=7, index=3, with_evidence=True)
    assert np.array_equal(frames, synthetic.render(3, size=32, seed=7, index=3)[0])


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evidence") / "synth"
    synthetic.generate(
        out, classes=4, videos_per_class=2, size=32, seed=0, workers=1, progress=False,
        val_fraction=0.5,
    )  # fmt: skip
    return out


def test_evidence_round_trips_manifest_shards_decoder(tiny, tmp_path):
    truth = json.loads((tiny / synthetic.EVIDENCE).read_text())
    entries = [
        e for s in ("train", "validation") for e in json.loads((tiny / f"{s}.json").read_text())
    ]
    assert set(truth) == {e["id"] for e in entries}

    manifest, classes, issues = read_dataset("ssv2", tiny, extensions=("mp4",))
    assert issues.counts()["malformed"] == 0
    assert manifest.schema.field("evidence") == EVIDENCE_FIELD
    for row in manifest.to_pylist():
        assert json.loads(row["evidence"]) == truth[row["video_id"]]
    write_manifest(manifest, classes, tmp_path / "out")
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").equals(manifest)

    report = build_shards(tmp_path / "out/manifest.parquet", tmp_path / "out", workers=1,
                          progress=False)  # fmt: skip
    assert report["totals"]["videos"] == 8 and report["format"] >= 2
    shard = pq.read_table(tmp_path / "out/shards/val-00000.parquet")
    assert shard.schema.remove_metadata() == SHARD_SCHEMA
    for row in shard.to_pylist():
        assert json.loads(row["evidence"]) == truth[row["video_id"]]

    # the decoder, at the generated size (no resize, the whole frame): the boxes as written
    cfg = ClipConfig(num_frames=8, short_side=32, crop_size=32)
    batch = {k: np.array(shard.column(k).to_pylist(), dtype=object) for k in shard.column_names}
    out = ClipDecoder(cfg, train=False, class_names=classes)(batch)
    assert len(out["clip"]) == shard.num_rows
    for v, row in enumerate(shard.to_pylist()):
        idx = sample_views(row["num_frames"], cfg, train=False)[0]
        ev = truth[row["video_id"]]
        for key in ("part", "object"):
            want = np.array([ev[key][i] or [np.nan] * 4 for i in idx], np.float32)
            np.testing.assert_allclose(out[f"gt_{key}"][v], want, atol=1e-4)
        np.testing.assert_array_equal(out["gt_visible"][v], np.asarray(ev["visible"], bool)[idx])

    # a manifest without the column (a real dataset, an older build): null evidence, NaN boxes
    plain = manifest.drop_columns(["evidence"])
    build_shards(plain, tmp_path / "plain", workers=1, progress=False)
    shard = pq.read_table(tmp_path / "plain/shards/val-00000.parquet")
    assert shard.schema.remove_metadata() == SHARD_SCHEMA
    assert shard.column("evidence").null_count == shard.num_rows
    batch = {k: np.array(shard.column(k).to_pylist(), dtype=object) for k in shard.column_names}
    out = ClipDecoder(cfg, train=False, class_names=classes)(batch)
    assert np.isnan(out["gt_part"]).all() and not out["gt_visible"].any()


def test_real_layout_has_no_evidence_column(tiny, tmp_path):
    root = tmp_path / "ssv2"
    root.mkdir()
    for name in ("labels.json", "train.json", "validation.json"):
        (root / name).write_bytes((tiny / name).read_bytes())
    (root / "videos").symlink_to(tiny / "videos")
    manifest, _, _ = read_dataset("ssv2", root, extensions=("mp4",))
    assert "evidence" not in manifest.column_names and manifest.num_rows == 8


def test_ensure_synthetic_regenerates_without_evidence(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate
    monkeypatch.setattr(
        synthetic, "generate", lambda out, **kw: calls.append(kw) or real(out, **kw)
    )
    opts = {"classes": 2, "videos_per_class": 2, "size": 32, "workers": 1, "progress": False}
    out = synthetic.ensure_synthetic(tmp_path / "d", **opts)
    synthetic.ensure_synthetic(out, **opts)
    assert len(calls) == 1
    (out / synthetic.EVIDENCE).unlink()  # a benchmark generated before the ground truth
    synthetic.ensure_synthetic(out, **opts)
    assert len(calls) == 2 and (out / synthetic.EVIDENCE).is_file()
