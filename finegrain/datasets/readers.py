"""Annotation readers: a dataset's official layout → one manifest.

The manifest has one row per usable video with the columns ``video_id`` (string), ``path``
(string, absolute), ``label`` (int32, an index into the dataset's own class list), ``label_name``
(string) and ``split`` ("train" | "val" | "test"), and, for a dataset with per-frame ground
truth (the synthetic benchmark's ``evidence.json`` beside its ``labels.json``), ``evidence``
(nullable string: the video's entry as compact JSON; see :mod:`.synthetic`). Real datasets have
none: their manifests lack the column, which :func:`with_evidence` adds as null. Every reader adds
rows split by split (train, val, test) in annotation order, so the same annotations always give
the same manifest.

Under ``root`` each reader looks where the official download (and the synthetic benchmark) puts
its files; ``annotations`` (the folder holding the annotation files) and ``videos`` (the folder
holding the videos or their class sub-folders) override that. A root without an expected file
raises :class:`LayoutError` at once, naming the file and every place looked; so do annotations
none of whose videos can be found.

Bad rows never crash a reader: a video that is not on disk, a label outside the class list,
a repeated video id, or a malformed annotation row is counted in :class:`ReaderIssues` (first
occurrence kept for duplicates) and left out of the manifest.

Splits. SSv2 ``validation`` → ``val``. UCF101, HMDB51 and Diving48 publish only train/test lists:
their test list becomes ``test`` and no ``val`` split is made up (carve one out of ``train`` later
if a tuner needs one). Kinetics' CSV ``split`` column gives train/val/test directly.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from finegrain.datasets import layout

DATASETS = ("ssv2", "diving48", "ucf101", "hmdb51", "kinetics")
SPLITS = ("train", "val", "test")
DEFAULT_EXTENSIONS = {
    "ssv2": ("webm", "mp4"),  # official webm; the synthetic benchmark writes mp4
    "diving48": ("mp4",),
    "ucf101": ("avi",),
    "hmdb51": ("avi",),
    "kinetics": ("mp4", "webm", "mkv"),
}
MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("path", pa.string()),
        ("label", pa.int32()),
        ("label_name", pa.string()),
        ("split", pa.string()),
    ]
)
# Optional: the synthetic benchmark's per-frame ground truth of a video (its evidence.json entry,
# compact JSON), null for a video without any. A reader adds it only when the dataset has some;
# :func:`with_evidence` adds it (all null) to a manifest without it.
EVIDENCE_FIELD = pa.field("evidence", pa.string(), nullable=True)
MANIFEST_EVIDENCE_SCHEMA = MANIFEST_SCHEMA.append(EVIDENCE_FIELD)
EVIDENCE_FILE = "evidence.json"
SUBTLETIES = ("spatial", "temporal")


class LayoutError(FileNotFoundError):
    """The dataset root lacks an expected annotation file or video folder."""


@dataclass
class ReaderIssues:
    """Rows left out of the manifest, each as ``"video_id: reason"`` in annotation order."""

    missing: list[str] = field(default_factory=list)
    unknown_labels: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in vars(self).items()}

    def to_dict(self, first: int = 20) -> dict[str, dict]:
        """``{kind: {"count": n, "first": [up to `first` offenders]}}`` for the report."""
        return {k: {"count": len(v), "first": v[:first]} for k, v in vars(self).items()}

    def lines(self, first: int = 5) -> list[str]:
        """Human-readable lines for stderr, one per non-empty kind."""
        return [
            f"{kind}: {len(items)} (first: {'; '.join(items[:first])})"
            for kind, items in vars(self).items()
            if items
        ]


# --------------------------------------------------------------------------- locating files


def _find_file(dataset: str, names: Sequence[str], dirs: Sequence[Path], flag: str) -> Path:
    """First ``dir/name`` that exists, else a LayoutError listing every place looked."""
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name
    looked = ", ".join(str(d) for d in dirs)
    raise LayoutError(
        f"{dataset}: expected annotation file {' or '.join(names)} not found; looked in: "
        f"{looked}. Pass {flag} DIR if it lives elsewhere."
    )


def _find_dir(dataset: str, what: str, dirs: Sequence[Path], flag: str) -> Path:
    for d in dirs:
        if d.is_dir():
            return d
    looked = ", ".join(str(d) for d in dirs)
    raise LayoutError(
        f"{dataset}: expected {what} not found; looked in: {looked}. Pass {flag} DIR."
    )


def _annotation_dirs(root: Path, annotations: Path | None, official: Sequence[str]) -> list[Path]:
    if annotations is not None:
        return [annotations]
    return [root / sub for sub in official] + [root, root / "annotations"]


def _video_dirs(root: Path, videos: Path | None, official: Sequence[str]) -> list[Path]:
    if videos is not None:
        return [videos]
    return [root / sub for sub in official] + [root / "videos", root]


class _Files:
    """Lists each directory once (a set of names) so 200k lookups cost no 200k stats."""

    def __init__(self, extensions: Sequence[str]):
        self.extensions = tuple(extensions)
        self._listing: dict[Path, frozenset[str]] = {}

    def find(self, directory: Path, stem: str) -> Path | None:
        if directory not in self._listing:
            try:
                self._listing[directory] = frozenset(os.listdir(directory))
            except OSError:
                self._listing[directory] = frozenset()
        names = self._listing[directory]
        for ext in self.extensions:
            if f"{stem}.{ext}" in names:
                return directory / f"{stem}.{ext}"
        return None

    def tried(self, directory: Path, stem: str) -> str:
        return str(directory / f"{stem}.{{{','.join(self.extensions)}}}")


# --------------------------------------------------------------------------- collecting rows


class _Manifest:
    """Turns annotation rows into manifest rows, counting the ones that cannot be used."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)
        self.index = {name: i for i, name in enumerate(self.classes)}
        self._folded = {name.lower(): i for i, name in enumerate(self.classes)}
        self.rows: dict[str, list] = {name: [] for name in MANIFEST_SCHEMA.names}
        self.evidence: list[str | None] = []
        self.seen: dict[str, str] = {}
        self.issues = ReaderIssues()

    def label_of(self, name: str) -> int | None:
        """Exact class name, else case-insensitive (SSv2 and UCF101 disagree on case in places)."""
        return self.index.get(name, self._folded.get(name.lower()))

    def add(
        self,
        video_id: str,
        split: str,
        label: int | None,
        label_text: str,
        find: tuple[_Files, Path, str],
        evidence: dict | None = None,
    ) -> None:
        """Add one row; ``find`` = (files, directory, stem) locates the video; ``evidence``:
        the video's ground truth, if the dataset has any."""
        if label is None or not 0 <= label < len(self.classes):
            self.issues.unknown_labels.append(f"{video_id}: label {label_text!r}")
            return
        if video_id in self.seen:
            self.issues.duplicates.append(f"{video_id}: {split} (first in {self.seen[video_id]})")
            return
        self.seen[video_id] = split
        files, directory, stem = find
        path = files.find(directory, stem)
        if path is None:
            self.issues.missing.append(f"{video_id}: {files.tried(directory, stem)}")
            return
        for key, value in zip(
            MANIFEST_SCHEMA.names,
            (video_id, os.path.abspath(path), label, self.classes[label], split),
        ):
            self.rows[key].append(value)
        self.evidence.append(
            None if evidence is None else json.dumps(evidence, separators=(",", ":"))
        )

    def table(self) -> pa.Table:
        """The manifest; with the ``evidence`` column when some video has ground truth."""
        if any(e is not None for e in self.evidence):
            return pa.table(
                {**self.rows, "evidence": self.evidence}, schema=MANIFEST_EVIDENCE_SCHEMA
            )
        return pa.table(self.rows, schema=MANIFEST_SCHEMA)


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


# --------------------------------------------------------------------------- the readers


def _ssv2(root, annotations, videos, split, extensions):
    """Something-Something v2: labels.json (name → "index"), train.json, validation.json."""
    dirs = _annotation_dirs(root, annotations, ["labels", "label"])
    flag = "--annotations"
    labels = _find_file("ssv2", ["labels.json", "something-something-v2-labels.json"], dirs, flag)
    lists = {
        "train": _find_file(
            "ssv2", ["train.json", "something-something-v2-train.json"], dirs, flag
        ),
        "val": _find_file(
            "ssv2", ["validation.json", "something-something-v2-validation.json"], dirs, flag
        ),
    }
    video_dir = _find_dir(
        "ssv2",
        "video folder",
        _video_dirs(root, videos, ["20bn-something-something-v2"]),
        "--videos",
    )
    name_to_index = _read_json(labels)
    classes = sorted(name_to_index, key=lambda name: int(name_to_index[name]))
    out, files = _Manifest(classes), _Files(extensions)
    truth = _ssv2_evidence(labels.parent, out.issues)
    for split_name, path in lists.items():
        for entry in _read_json(path):
            try:
                video_id, template = str(entry["id"]), entry["template"]
            except (KeyError, TypeError):
                out.issues.malformed.append(f"{path.name}: {str(entry)[:80]}")
                continue
            name = template.replace("[", "").replace("]", "")
            find = (files, video_dir, video_id)
            out.add(video_id, split_name, out.label_of(name), name, find, truth.get(video_id))
    return out


def _ssv2_evidence(folder: Path, issues: ReaderIssues) -> dict[str, dict]:
    """``folder/evidence.json`` (the synthetic benchmark's ground truth, beside its labels.json)
    as ``{video_id: entry}``; empty when there is none (real SSv2). Entries that are not JSON
    objects are counted as malformed and left out."""
    path = folder / EVIDENCE_FILE
    if not path.is_file():
        return {}
    try:
        raw = _read_json(path)
    except ValueError as e:
        issues.malformed.append(f"{path.name}: not JSON ({e})")
        return {}
    if not isinstance(raw, dict):
        issues.malformed.append(f"{path.name}: not an object of video ids")
        return {}
    good = {str(k): v for k, v in raw.items() if isinstance(v, dict)}
    issues.malformed += [f"{path.name}: {k}: not an object" for k in raw if str(k) not in good]
    return good


def _diving48(root, annotations, videos, split, extensions):
    """Diving48 v2: Diving48_vocab.json, Diving48_V2_{train,test}.json, rgb/{vid_name}.mp4."""
    dirs = _annotation_dirs(root, annotations, ["Diving48"])
    flag = "--annotations"
    vocab = _find_file("diving48", ["Diving48_vocab.json"], dirs, flag)
    lists = {
        "train": _find_file("diving48", ["Diving48_V2_train.json"], dirs, flag),
        "test": _find_file("diving48", ["Diving48_V2_test.json"], dirs, flag),
    }
    video_dir = _find_dir(
        "diving48",
        "video folder",
        _video_dirs(root, videos, ["rgb", "Diving48_rgb/rgb"]),
        "--videos",
    )
    # a class is a (take-off, somersault, twist, flight position) tuple, e.g. "Back 15som 05Twis FREE"
    classes = [" ".join(parts) for parts in _read_json(vocab)]
    out, files = _Manifest(classes), _Files(extensions)
    for split_name, path in lists.items():
        for entry in _read_json(path):
            try:
                video_id, label = str(entry["vid_name"]), entry["label"]
            except (KeyError, TypeError):
                out.issues.malformed.append(f"{path.name}: {str(entry)[:80]}")
                continue
            label = label if isinstance(label, int) else None
            out.add(video_id, split_name, label, str(entry["label"]), (files, video_dir, video_id))
    return out


def _ucf101(root, annotations, videos, split, extensions):
    """UCF101: classInd.txt ("1 ApplyEyeMakeup"), trainlist0N.txt, testlist0N.txt."""
    dirs = _annotation_dirs(root, annotations, ["ucfTrainTestlist"])
    flag = "--annotations"
    class_ind = _find_file("ucf101", ["classInd.txt"], dirs, flag)
    lists = {
        "train": _find_file("ucf101", [f"trainlist0{split}.txt"], dirs, flag),
        "test": _find_file("ucf101", [f"testlist0{split}.txt"], dirs, flag),
    }
    video_dir = _find_dir(
        "ucf101", "video folder", _video_dirs(root, videos, ["UCF-101", "UCF101"]), "--videos"
    )
    pairs = [line.split() for line in _read_lines(class_ind)]
    classes = [name for _, name in sorted((int(i), name) for i, name in pairs)]  # 1-based file
    out, files = _Manifest(classes), _Files(extensions)
    for split_name, path in lists.items():
        for line in _read_lines(path):
            rel = line.split()[0]  # trainlist lines carry a 1-based index, testlist lines none
            if "/" not in rel:
                out.issues.malformed.append(f"{path.name}: {line!r}")
                continue
            folder, file = rel.rsplit("/", 1)
            stem = file.rsplit(".", 1)[0]
            label = out.label_of(folder)
            out.add(stem, split_name, label, folder, (files, video_dir / folder, stem))
    return out


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<n>[123])\.txt$")


def _hmdb51(root, annotations, videos, split, extensions):
    """HMDB51: testTrainMulti_7030_splits/{class}_test_splitN.txt, "file.avi T" (1 train, 2 test)."""
    dirs = _annotation_dirs(
        root,
        annotations,
        ["testTrainMulti_7030_splits", "test_train_splits/testTrainMulti_7030_splits"],
    )
    split_files: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for f in sorted(d.iterdir()):
                m = _HMDB_SPLIT.match(f.name)
                if m and int(m["n"]) == split:
                    split_files[m["cls"]] = f
        if split_files:
            break
    if not split_files:
        looked = ", ".join(str(d) for d in dirs)
        raise LayoutError(
            f"hmdb51: expected annotation files {{class}}_test_split{split}.txt "
            f"(testTrainMulti_7030_splits) not found; looked in: {looked}. "
            "Pass --annotations DIR if they live elsewhere."
        )
    video_dir = _find_dir(
        "hmdb51", "video folder", _video_dirs(root, videos, ["hmdb51_org", "hmdb51"]), "--videos"
    )
    classes = sorted(split_files)  # HMDB51 has no class-index file: alphabetical, as is customary
    out, files = _Manifest(classes), _Files(extensions)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for cls, path in split_files.items():
        for line in _read_lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                out.issues.malformed.append(f"{path.name}: {line!r}")
            elif parts[1] != "0":  # 0 = not used in this split
                rows["train" if parts[1] == "1" else "test"].append((cls, parts[0]))
    for split_name, items in rows.items():
        for cls, file in items:
            stem = file.rsplit(".", 1)[0]
            out.add(stem, split_name, out.label_of(cls), cls, (files, video_dir / cls, stem))
    return out


_KINETICS_SPLITS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validate": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _kinetics(root, annotations, videos, split, extensions):
    """Kinetics: CSVs ``label,youtube_id,time_start,time_end,split``; clips named
    ``{youtube_id}_{start:06d}_{end:06d}`` under ``{split}/{label}/`` or flat."""
    dirs = _annotation_dirs(root, annotations, ["annotations", "kinetics400", "kinetics700"])
    csvs: list[Path] = []
    for d in dirs:
        if d.is_dir():
            csvs = [f for f in sorted(d.glob("*.csv")) if _is_kinetics_csv(f)]
        if csvs:
            break
    if not csvs:
        looked = ", ".join(str(d) for d in dirs)
        raise LayoutError(
            "kinetics: expected annotation CSVs (train.csv, val.csv, test.csv with the header "
            f"label,youtube_id,time_start,time_end,split) not found; looked in: {looked}. "
            "Pass --annotations DIR if they live elsewhere."
        )
    video_dir = _find_dir("kinetics", "video folder", _video_dirs(root, videos, []), "--videos")
    records = []
    for path in csvs:
        with open(path, newline="", encoding="utf-8") as f:
            records += [(path, row) for row in csv.DictReader(f)]
    train_labels = {row.get("label") for p, row in records if _kinetics_split(p, row) == "train"}
    all_labels = {row.get("label") for _, row in records}
    classes = sorted(label for label in (train_labels or all_labels) if label)
    out = _Manifest(classes)
    index = _ClipIndex(video_dir, extensions)
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for path, row in records:
        split_name = _kinetics_split(path, row)
        try:
            start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            video_id = f"{row['youtube_id']}_{start:06d}_{end:06d}"
        except (KeyError, TypeError, ValueError):
            out.issues.malformed.append(f"{path.name}: {dict(row)}")
            continue
        if split_name is None:
            out.issues.malformed.append(f"{video_id}: split {row.get('split')!r} in {path.name}")
            continue
        by_split[split_name].append((video_id, row.get("label") or ""))
    for split_name, items in by_split.items():
        for video_id, label in items:
            label_id = out.index.get(label)  # Kinetics names are exact: no case folding
            out.add(video_id, split_name, label_id, label, (index, video_dir, video_id))
    return out


def _is_kinetics_csv(path: Path) -> bool:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return {"youtube_id", "time_start", "time_end"} <= set(header)


def _kinetics_split(path: Path, row: dict) -> str | None:
    value = (row.get("split") or "").strip().lower()
    if not value:  # no split column: the file name says it (kinetics_400_validate.csv)
        value = next((k for k in _KINETICS_SPLITS if k in path.stem.lower()), "")
    return _KINETICS_SPLITS.get(value)


class _ClipIndex(_Files):
    """Kinetics clips may sit in {split}/{label}/, {split}/ or flat: index the tree once by stem."""

    def __init__(self, top: Path, extensions: Sequence[str]):
        super().__init__(extensions)
        self.by_stem: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                stem, _, ext = name.rpartition(".")
                if ext in self.extensions:
                    self.by_stem.setdefault(stem, Path(dirpath) / name)

    def find(self, directory: Path, stem: str) -> Path | None:
        return self.by_stem.get(stem)

    def tried(self, directory: Path, stem: str) -> str:
        return f"{stem}.{{{','.join(self.extensions)}}} anywhere under {directory}"


_READERS = {
    "ssv2": _ssv2,
    "diving48": _diving48,
    "ucf101": _ucf101,
    "hmdb51": _hmdb51,
    "kinetics": _kinetics,
}
_SPLITS_PER_DATASET = {"ssv2": 1, "diving48": 1, "ucf101": 3, "hmdb51": 3, "kinetics": 1}


def read_dataset(
    name: str,
    root: str | Path,
    annotations: str | Path | None = None,
    videos: str | Path | None = None,
    split: int = 1,
    extensions: Iterable[str] | None = None,
) -> tuple[pa.Table, list[str], ReaderIssues]:
    """Read a dataset in its official layout → ``(manifest, classes, issues)``.

    ``split`` picks UCF101's / HMDB51's official split 1-3 (the others have one).
    ``extensions`` are the video file extensions tried in order (default per dataset,
    e.g. ``("webm", "mp4")`` for SSv2).
    """
    if name not in _READERS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if split not in range(1, _SPLITS_PER_DATASET[name] + 1):
        allowed = "1, 2 or 3" if _SPLITS_PER_DATASET[name] == 3 else "1 (one official split)"
        raise ValueError(f"split for {name} must be {allowed}, got {split!r}")
    exts = tuple(e.lstrip(".").lower() for e in (extensions or DEFAULT_EXTENSIONS[name]))
    if not exts or not all(e.isalnum() for e in exts):
        raise ValueError(f"extensions must be non-empty alphanumeric names like mp4, got {exts}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{name}: dataset root {root} is not a directory")
    out = _READERS[name](
        root,
        Path(annotations) if annotations is not None else None,
        Path(videos) if videos is not None else None,
        split,
        exts,
    )
    manifest = out.table()
    if manifest.num_rows == 0 and out.issues.missing:
        raise LayoutError(
            f"{name}: none of the {len(out.issues.missing)} annotated videos was found, e.g. "
            f"{out.issues.missing[0]}. Pass --videos DIR (or --extension) to point at them."
        )
    return manifest, out.classes, out.issues


# --------------------------------------------------------------------------- writing


def manifest_schema(manifest: pa.Table) -> pa.Schema:
    """:data:`MANIFEST_SCHEMA`, with the ``evidence`` column when ``manifest`` has one."""
    has = EVIDENCE_FIELD.name in manifest.column_names
    return MANIFEST_EVIDENCE_SCHEMA if has else MANIFEST_SCHEMA


def with_evidence(manifest: pa.Table) -> pa.Table:
    """``manifest`` (its :data:`MANIFEST_SCHEMA` columns, any order) with the ``evidence``
    column, null where it had none, as :data:`MANIFEST_EVIDENCE_SCHEMA`."""
    if EVIDENCE_FIELD.name not in manifest.column_names:
        empty = pa.nulls(manifest.num_rows, pa.string())
        manifest = manifest.append_column(EVIDENCE_FIELD.name, empty)
    return manifest.select(MANIFEST_EVIDENCE_SCHEMA.names).cast(MANIFEST_EVIDENCE_SCHEMA)


def find_class_groups(
    root: str | Path, annotations: str | Path | None, classes: Sequence[str]
) -> dict[str, dict[str, str]] | None:
    """The synthetic benchmark's ``classes.json`` (name → {index, group, subtlety}) as
    ``{name: {"group", "subtlety"}}``; ``None`` when the dataset has no such file."""
    dirs = ([Path(annotations)] if annotations is not None else []) + [Path(root)]
    for d in dirs:
        path = d / "classes.json"
        if not path.is_file():
            continue
        spec = _read_json(path)
        if not isinstance(spec, dict) or not all(
            isinstance(v, dict) and "group" in v and v.get("subtlety") in SUBTLETIES
            for v in spec.values()
        ):
            return None  # some other classes.json, not the benchmark's
        return {
            name: {"group": str(spec[name]["group"]), "subtlety": spec[name]["subtlety"]}
            for name in classes
            if name in spec
        }
    return None


def write_manifest(
    manifest: pa.Table,
    classes: Sequence[str],
    out: str | Path,
    class_groups: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write ``OUT/manifest.parquet``, ``OUT/classes.json`` ({"0": name, ...}) and, when given,
    ``OUT/class_groups.json`` ({name: {"group", "subtlety"}}). Returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / layout.MANIFEST_FILE
    pq.write_table(manifest.cast(manifest_schema(manifest)), path)
    _write_json(out / layout.CLASSES_FILE, {str(i): name for i, name in enumerate(classes)})
    if class_groups is not None:
        _write_json(out / layout.CLASS_GROUPS_FILE, class_groups)
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
