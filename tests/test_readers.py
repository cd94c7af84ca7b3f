"""Annotation readers on tiny fixtures written in each dataset's official layout."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from finegrain.datasets.readers import (
    MANIFEST_SCHEMA,
    LayoutError,
    find_class_groups,
    read_dataset,
    write_manifest,
)


@pytest.fixture
def clip(make_video) -> bytes:
    """The bytes of one tiny H.264 video, copied wherever a fixture needs a video file."""
    return make_video("clip.mp4", num_frames=8).read_bytes()


def _put(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _json(path: Path, obj) -> Path:
    return _put(path, json.dumps(obj))


def _rows(table) -> list[tuple]:
    return [(r["video_id"], r["label"], r["label_name"], r["split"]) for r in table.to_pylist()]


# --------------------------------------------------------------------------- SSv2


def _ssv2(root: Path, clip: bytes, ext: str = "webm", labels_dir: str = "labels") -> Path:
    """SSv2 as the official download unpacks it: labels/*.json, 20bn-something-something-v2/."""
    ann = root / labels_dir
    _json(
        ann / "labels.json",
        {
            "Holding something next to something": "1",
            "Pushing something from left to right": "0",
        },
    )
    entry = lambda i, t: {"id": str(i), "label": "x", "template": t, "placeholders": ["x"]}  # noqa: E731
    _json(
        ann / "train.json",
        [
            entry(10, "Holding [something] next to [something]"),
            entry(11, "Pushing [something] from left to right"),
            entry(12, "Juggling [something]"),  # unknown class
            entry(10, "Holding [something] next to [something]"),  # duplicate id
            entry(13, "Pushing [something] from left to right"),  # no video file
        ],
    )
    _json(ann / "validation.json", [entry(20, "pushing [something] from left to right")])
    videos = root / "20bn-something-something-v2" if ext == "webm" else root / "videos"
    for i in (10, 11, 12, 20):
        _put(videos / f"{i}.{ext}", clip)
    return root


def test_ssv2_official_layout(tmp_path, clip):
    manifest, classes, issues = read_dataset("ssv2", _ssv2(tmp_path / "ssv2", clip))
    assert classes == [
        "Pushing something from left to right",
        "Holding something next to something",
    ]
    assert _rows(manifest) == [
        ("10", 1, "Holding something next to something", "train"),
        ("11", 0, "Pushing something from left to right", "train"),
        ("20", 0, "Pushing something from left to right", "val"),  # case-folded template
    ]
    assert manifest.schema == MANIFEST_SCHEMA
    assert Path(manifest["path"][0].as_py()) == (
        tmp_path / "ssv2/20bn-something-something-v2/10.webm"
    )
    assert issues.counts() == {"missing": 1, "unknown_labels": 1, "duplicates": 1, "malformed": 0}
    assert issues.missing[0].startswith("13:")
    assert "Juggling something" in issues.unknown_labels[0]
    assert issues.duplicates[0].startswith("10:")


def test_ssv2_synthetic_layout_with_mp4(tmp_path, clip):
    """The synthetic benchmark: labels.json etc. at the root and videos/{id}.mp4."""
    root = _ssv2(tmp_path / "syn", clip, ext="mp4", labels_dir=".")
    manifest, _, issues = read_dataset("ssv2", root)  # default extensions try webm, then mp4
    assert manifest.num_rows == 3 and issues.counts()["missing"] == 1
    assert manifest["path"][0].as_py().endswith("videos/10.mp4")
    with pytest.raises(LayoutError, match=r"none of the 4 annotated videos.*10\.\{webm\}"):
        read_dataset("ssv2", root, extensions=["webm"])


def test_ssv2_old_file_names_and_overrides(tmp_path, clip):
    """something-something-v2-*.json names, annotations and videos anywhere via the overrides."""
    _ssv2(tmp_path / "src", clip)
    ann, vids = tmp_path / "elsewhere/ann", tmp_path / "elsewhere/vids"
    for name in ("labels", "train", "validation"):
        src = tmp_path / "src/labels" / f"{name}.json"
        _put(ann / f"something-something-v2-{name}.json", src.read_text())
    (tmp_path / "src/20bn-something-something-v2").rename(vids)
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest, _, _ = read_dataset("ssv2", empty, annotations=ann, videos=vids)
    assert manifest.column("video_id").to_pylist() == ["10", "11", "20"]


# --------------------------------------------------------------------------- Diving48


def test_diving48_v2(tmp_path, clip):
    root = tmp_path / "diving48"
    _json(
        root / "Diving48_vocab.json",
        [["Back", "15som", "05Twis", "FREE"], ["Forward", "1som", "NoTwis", "PIKE"]],
    )
    clip_entry = lambda v, label: {"vid_name": v, "label": label, "start_frame": 0, "end_frame": 7}  # noqa: E731
    _json(root / "Diving48_V2_train.json", [clip_entry("a_00000", 1), clip_entry("a_00001", 7)])
    _json(root / "Diving48_V2_test.json", [clip_entry("b_00000", 0), clip_entry("b_00001", 0)])
    for v in ("a_00000", "a_00001", "b_00000"):
        _put(root / "rgb" / f"{v}.mp4", clip)
    manifest, classes, issues = read_dataset("diving48", root)
    assert classes == ["Back 15som 05Twis FREE", "Forward 1som NoTwis PIKE"]
    assert _rows(manifest) == [
        ("a_00000", 1, "Forward 1som NoTwis PIKE", "train"),
        ("b_00000", 0, "Back 15som 05Twis FREE", "test"),
    ]
    assert issues.unknown_labels == ["a_00001: label '7'"]
    assert issues.missing[0].startswith("b_00001:")


# --------------------------------------------------------------------------- UCF101


def _ucf101(root: Path, clip: bytes) -> Path:
    ann = root / "ucfTrainTestlist"
    _put(ann / "classInd.txt", "1 ApplyEyeMakeup\n2 HandstandPushups\n")
    # the official lists spell the files v_HandStandPushups_* inside HandstandPushups/
    files = {
        "ApplyEyeMakeup": [f"v_ApplyEyeMakeup_g0{g}_c01.avi" for g in (1, 2, 3)],
        "HandstandPushups": [f"v_HandStandPushups_g0{g}_c01.avi" for g in (1, 2, 3)],
    }
    for cls, names in files.items():
        for name in names:
            _put(root / "UCF-101" / cls / name, clip)
    for n in (1, 2):  # split n holds out group n
        train = [
            f"{c}/{f} {i + 1}"
            for i, (c, fs) in enumerate(files.items())
            for g, f in enumerate(fs, 1)
            if g != n
        ]
        test = [f"{c}/{f}" for c, fs in files.items() for g, f in enumerate(fs, 1) if g == n]
        extra = [
            "Juggling/v_Juggling_g01_c01.avi 3",
            "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 1",
        ]
        _put(ann / f"trainlist0{n}.txt", "\n".join(train + extra) + "\n")
        _put(ann / f"testlist0{n}.txt", "\r\n".join(test + [train[0].split()[0]]) + "\r\n")
    return root


def test_ucf101_official_lists(tmp_path, clip):
    root = _ucf101(tmp_path / "ucf", clip)
    manifest, classes, issues = read_dataset("ucf101", root, split=2)
    assert classes == ["ApplyEyeMakeup", "HandstandPushups"]  # classInd is 1-based
    rows = _rows(manifest)
    assert [r for r in rows if r[3] == "test"] == [
        ("v_ApplyEyeMakeup_g02_c01", 0, "ApplyEyeMakeup", "test"),
        ("v_HandStandPushups_g02_c01", 1, "HandstandPushups", "test"),
    ]
    assert len([r for r in rows if r[3] == "train"]) == 4
    assert (
        manifest["path"][0].as_py().endswith("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi")
    )
    assert issues.counts() == {"missing": 1, "unknown_labels": 1, "duplicates": 1, "malformed": 0}
    assert issues.missing[0].startswith("v_ApplyEyeMakeup_g09_c01:")
    assert "Juggling" in issues.unknown_labels[0]


def test_ucf101_other_extension(tmp_path, clip):
    """Videos re-encoded to mp4 next to the official lists: --extension mp4."""
    root = _ucf101(tmp_path / "ucf", clip)
    for f in (root / "UCF-101").rglob("*.avi"):
        f.rename(f.with_suffix(".mp4"))
    manifest, _, _ = read_dataset("ucf101", root, extensions=[".mp4"])
    assert manifest.num_rows == 6 and manifest["path"][0].as_py().endswith(".mp4")


# --------------------------------------------------------------------------- HMDB51


def test_hmdb51_splits(tmp_path, clip):
    root = tmp_path / "hmdb"
    splits = root / "testTrainMulti_7030_splits"
    for cls in ("brush_hair", "ride_bike"):
        names = [f"{cls}_clip_{k}.avi" for k in range(4)]
        for name in names[:3]:  # clip_3 is listed but absent
            _put(root / "hmdb51_org" / cls / name, clip)
        for n in (1, 2, 3):
            tags = {1: "1 1 2 0", 2: "2 1 1 1", 3: "0 2 1 1"}[n].split()
            _put(
                splits / f"{cls}_test_split{n}.txt",
                "".join(f"{f} {t} \n" for f, t in zip(names, tags)),
            )
    manifest, classes, issues = read_dataset("hmdb51", root, split=1)
    assert classes == ["brush_hair", "ride_bike"]  # alphabetical: HMDB51 has no index file
    assert _rows(manifest) == [
        ("brush_hair_clip_0", 0, "brush_hair", "train"),
        ("brush_hair_clip_1", 0, "brush_hair", "train"),
        ("ride_bike_clip_0", 1, "ride_bike", "train"),
        ("ride_bike_clip_1", 1, "ride_bike", "train"),
        ("brush_hair_clip_2", 0, "brush_hair", "test"),
        ("ride_bike_clip_2", 1, "ride_bike", "test"),
    ]  # tag 0 = unused in this split: neither listed nor counted
    assert issues.counts()["missing"] == 0
    manifest, _, issues = read_dataset("hmdb51", root, split=3)
    assert manifest.column("split").to_pylist().count("test") == 2
    assert issues.counts()["missing"] == 2  # clip_3 (tag 1 in split 3) of both classes


# --------------------------------------------------------------------------- Kinetics


@pytest.mark.parametrize("layout", ["split_label", "flat"])
def test_kinetics_csv(tmp_path, clip, layout):
    root = tmp_path / "k400"
    header = "label,youtube_id,time_start,time_end,split\n"
    _put(
        root / "annotations/train.csv",
        header + "abseiling,aaaaaaaaaaa,10,20,train\n"
        '"passing American football (in game)",bbbbbbbbbbb,0,10,train\n'
        "abseiling,ccccccccccc,5,15,train\n",  # no video
    )
    _put(
        root / "annotations/validate.csv",
        header + "abseiling,ddddddddddd,417,427,val\n"
        "yodelling,eeeeeeeeeee,1,11,val\n"  # not a training class
        "abseiling,aaaaaaaaaaa,10,20,val\n",  # same clip as in train
    )
    for label, yid, s, e, split in [
        ("abseiling", "aaaaaaaaaaa", 10, 20, "train"),
        ("passing American football (in game)", "bbbbbbbbbbb", 0, 10, "train"),
        ("abseiling", "ddddddddddd", 417, 427, "val"),
    ]:
        sub = f"{split}/{label}" if layout == "split_label" else ""
        _put(root / "videos" / sub / f"{yid}_{s:06d}_{e:06d}.mp4", clip)
    manifest, classes, issues = read_dataset("kinetics", root)
    assert classes == ["abseiling", "passing American football (in game)"]
    assert _rows(manifest) == [
        ("aaaaaaaaaaa_000010_000020", 0, "abseiling", "train"),
        ("bbbbbbbbbbb_000000_000010", 1, "passing American football (in game)", "train"),
        ("ddddddddddd_000417_000427", 0, "abseiling", "val"),
    ]
    assert issues.counts() == {"missing": 1, "unknown_labels": 1, "duplicates": 1, "malformed": 0}
    assert issues.missing[0].startswith("ccccccccccc_000005_000015:")
    assert issues.unknown_labels[0].startswith("eeeeeeeeeee_000001_000011:")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("ssv2", "labels.json"),
        ("diving48", "Diving48_vocab.json"),
        ("ucf101", "classInd.txt"),
        ("hmdb51", "_test_split1.txt"),
        ("kinetics", "label,youtube_id,time_start,time_end,split"),
    ],
)
def test_wrong_root_names_the_missing_file(tmp_path, dataset, expected):
    with pytest.raises(LayoutError) as err:
        read_dataset(dataset, tmp_path)
    message = str(err.value)
    assert expected in message and str(tmp_path) in message and "looked in" in message


def test_missing_list_file_is_named(tmp_path, clip):
    root = _ucf101(tmp_path / "ucf", clip)
    (root / "ucfTrainTestlist/testlist02.txt").unlink()
    with pytest.raises(LayoutError, match="testlist02.txt"):
        read_dataset("ucf101", root, split=2)
    with pytest.raises(LayoutError, match="is not a directory"):
        read_dataset("ucf101", tmp_path / "nowhere")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "ssv3"}, "dataset"),
        ({"name": "ssv2", "split": 2}, "split"),
        ({"name": "ucf101", "split": 4}, "split"),
        ({"name": "ucf101", "extensions": ["mp4/"]}, "extensions"),
    ],
)
def test_bad_options_fail_fast(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        read_dataset(root=tmp_path, **kwargs)


# --------------------------------------------------------------------------- writing


def test_write_manifest_and_class_groups(tmp_path, clip):
    root = _ssv2(tmp_path / "syn", clip, ext="mp4", labels_dir=".")
    _json(
        root / "classes.json",
        {
            "Pushing something from left to right": {
                "index": 0,
                "group": "push",
                "subtlety": "temporal",
            },
            "Holding something next to something": {
                "index": 1,
                "group": "hold",
                "subtlety": "spatial",
            },
        },
    )
    manifest, classes, _ = read_dataset("ssv2", root)
    groups = find_class_groups(root, None, classes)
    out = tmp_path / "out"
    write_manifest(manifest, classes, out, class_groups=groups)
    assert pq.read_table(out / "manifest.parquet").equals(manifest)
    assert json.loads((out / "classes.json").read_text()) == {
        "0": "Pushing something from left to right",
        "1": "Holding something next to something",
    }
    assert json.loads((out / "class_groups.json").read_text()) == {
        "Pushing something from left to right": {"group": "push", "subtlety": "temporal"},
        "Holding something next to something": {"group": "hold", "subtlety": "spatial"},
    }
    # a classes.json that is not the benchmark's is ignored
    _json(root / "classes.json", ["a", "b"])
    assert find_class_groups(root, None, classes) is None
