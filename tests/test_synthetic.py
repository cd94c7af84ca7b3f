"""The synthetic benchmark: SSv2 layout and formats, classes.json, decodable videos, determinism,
option validation, ensure_synthetic's reuse."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import decord
import pytest

from finegrain.datasets import synthetic
from finegrain.datasets.synthetic import CLASSES, MAX_FRAMES, MIN_FRAMES, ensure_synthetic, generate

_CLI = Path(__file__).parents[1] / "experiments" / "make_synthetic.py"
TINY = {"classes": 4, "videos_per_class": 3, "size": 32, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate(out, workers=1, **TINY)
    return out


def _read(path: Path):
    return json.loads(path.read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_annotations_are_ssv2(tiny: Path):
    labels = _read(tiny / "labels.json")
    assert sorted(labels.values(), key=int) == [str(i) for i in range(4)]
    ids = []
    for split, per_class in (("train", 2), ("validation", 1)):
        entries = _read(tiny / f"{split}.json")
        assert len(entries) == 4 * per_class  # stratified: round(3 * 0.25) = 1 per class
        for e in entries:
            assert set(e) == {"id", "label", "template", "placeholders"}
            name = e["template"].replace("[", "").replace("]", "")  # the SSv2 rule
            assert name in labels
            assert len(e["placeholders"]) == e["template"].count("[something]") >= 1
            filled = e["template"]
            for word in e["placeholders"]:
                filled = filled.replace("[something]", word, 1)
            assert e["label"] == filled.lower()
            assert (tiny / "videos" / f"{e['id']}.mp4").stat().st_size > 0
            ids.append(e["id"])
        per_label = Counter(
            labels[e["template"].replace("[", "").replace("]", "")] for e in entries
        )
        assert per_label == {str(c): per_class for c in range(4)}
    assert len(set(ids)) == 12
    assert sorted(p.stem for p in (tiny / "videos").iterdir()) == sorted(ids)


def test_classes_json_records_group_and_subtlety(tiny: Path):
    labels = _read(tiny / "labels.json")
    classes = _read(tiny / "classes.json")
    assert list(classes) == list(labels)
    assert {c["subtlety"] for c in classes.values()} == {"spatial", "temporal"}
    for name, c in classes.items():
        assert str(c["index"]) == labels[name]
        group = [n for n, o in classes.items() if o["group"] == c["group"]]
        assert len(group) >= 2 and all(classes[n]["subtlety"] == c["subtlety"] for n in group)


def test_class_list_is_grouped_balanced_and_flip_paired():
    assert len({c.name for c in CLASSES}) == len(CLASSES)
    default = CLASSES[: synthetic.DEFAULT_CLASSES]
    assert sum(c.subtlety == "spatial" for c in default) == len(default) // 2
    side = re.compile(r"\b(left|right)\b")
    names = {c.name for c in CLASSES}
    for name in names:
        if side.search(name):  # a horizontal flip maps it onto an existing class
            other = side.sub(lambda m: "right" if m.group(0) == "left" else "left", name)
            assert other in names and other != name


def test_videos_decode_with_expected_frames(tiny: Path):
    for path in (tiny / "videos").glob("*.mp4"):
        vr = decord.VideoReader(str(path))
        assert MIN_FRAMES <= len(vr) <= MAX_FRAMES
        assert vr[0].shape == (32, 32, 3)
        assert round(vr.get_avg_fps()) == 12


def test_same_seed_same_bytes_whatever_the_workers(tiny: Path, tmp_path: Path):
    generate(tmp_path / "again", workers=2, **TINY)
    a, b = _files(tiny), _files(tmp_path / "again")
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []


def test_the_pretraining_set_is_the_same_bytes_for_a_seed(tmp_path: Path):
    """What `experiments/pretrain.py` trains on (kind="pretrain") is as deterministic as the
    benchmark: the same seed gives the same bytes, with one worker or two."""
    options = {**TINY, "kind": "pretrain", "classes": 3, "videos_per_class": 2}
    generate(tmp_path / "one", workers=1, **options)
    generate(tmp_path / "two", workers=2, **options)
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert any(k.startswith("videos") for k in a) and a == b


def test_different_seed_differs(tiny: Path, tmp_path: Path):
    generate(tmp_path / "other", workers=1, **{**TINY, "seed": 1})
    a, b = _files(tiny), _files(tmp_path / "other")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.startswith("videos")) == 12


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("classes", 1),
        ("classes", len(CLASSES) + 1),
        ("videos_per_class", 0),
        ("size", 31),
        ("size", 16),
        ("seed", -1),
        ("workers", 0),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("fps", 0),
        ("classes", 2.5),
    ],
)
def test_bad_options_name_the_option(tmp_path: Path, option: str, value):
    with pytest.raises(ValueError, match=option):
        generate(tmp_path / "x", **{**TINY, option: value})
    assert not (tmp_path / "x").exists()


def test_val_fraction_must_leave_training_videos(tmp_path: Path):
    with pytest.raises(ValueError, match="val_fraction"):
        generate(tmp_path, **{**TINY, "videos_per_class": 1, "val_fraction": 0.6})


def test_cli_reports_bad_option(tmp_path: Path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic", _CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path), "--classes", "99"])
    assert "classes must be an integer in [2, " in capsys.readouterr().err


def test_ensure_synthetic_reuses_or_regenerates(tmp_path: Path, monkeypatch):
    calls = []
    real = synthetic.generate
    monkeypatch.setattr(
        synthetic, "generate", lambda out, **kw: calls.append(kw) or real(out, **kw)
    )
    opts = {**TINY, "classes": 2, "videos_per_class": 2, "workers": 1}
    out = tmp_path / "data"
    assert ensure_synthetic(out, **opts) == out and len(calls) == 1
    ensure_synthetic(out, **opts)
    assert len(calls) == 1  # complete and same options: reused
    ensure_synthetic(out, **{**opts, "seed": 3})
    assert len(calls) == 2  # other options: regenerated
    assert _read(out / synthetic.MARKER)["options"]["seed"] == 3
    next((out / "videos").glob("*.mp4")).unlink()
    ensure_synthetic(out, **{**opts, "seed": 3})
    assert len(calls) == 3  # a missing video: regenerated
    (out / synthetic.MARKER).unlink()
    ensure_synthetic(out, **{**opts, "seed": 3})
    assert len(calls) == 4  # no marker (interrupted run): regenerated


def test_fewer_classes_removes_stale_videos(tmp_path: Path):
    generate(tmp_path, **{**TINY, "classes": 3, "workers": 1})
    generate(tmp_path, **{**TINY, "classes": 2, "workers": 1})
    ids = {e["id"] for s in ("train", "validation") for e in _read(tmp_path / f"{s}.json")}
    assert {p.stem for p in (tmp_path / "videos").glob("*.mp4")} == ids
    assert len(ids) == 6
