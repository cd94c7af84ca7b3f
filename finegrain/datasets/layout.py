"""The shard folder layout: the one place that names the files of a built dataset ``OUT``.

::

    OUT/manifest.parquet            the videos to pack (readers.write_manifest)
    OUT/classes.json                {"0": name, ...}
    OUT/class_groups.json           {name: {"group", "subtlety"}} (synthetic benchmark only)
    OUT/shards/{split}-{k:05d}.parquet   the packed videos (shards.build_shards)
    OUT/shard_meta/{name}.json      a finished shard's sidecar, ``name`` = ``{split}-{k:05d}``
    OUT/report.json                 the build report

Writers (:mod:`.readers`, :mod:`.shards`) and readers (:mod:`.pipeline`,
:mod:`finegrain.platform.data`) build these paths here. Standard library only: the decode actors
import it through :mod:`.pipeline`.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CLASSES_FILE",
    "CLASS_GROUPS_FILE",
    "MANIFEST_FILE",
    "META_DIR",
    "REPORT_FILE",
    "SHARDS_DIR",
    "has_split",
    "meta_path",
    "shard_files",
    "shard_name",
    "shard_path",
    "shard_split",
]

SHARDS_DIR = "shards"
META_DIR = "shard_meta"
MANIFEST_FILE = "manifest.parquet"
CLASSES_FILE = "classes.json"
CLASS_GROUPS_FILE = "class_groups.json"
REPORT_FILE = "report.json"

_SHARD_FILE = re.compile(r"(?P<split>.+)-\d{5}\.parquet")


def shard_name(split: str, k: int) -> str:
    """The name of shard ``k`` of ``split``: ``{split}-{k:05d}``."""
    return f"{split}-{k:05d}"


def shard_path(out: str | Path, name: str) -> Path:
    """``OUT/shards/{name}.parquet``."""
    return Path(out) / SHARDS_DIR / f"{name}.parquet"


def meta_path(out: str | Path, name: str) -> Path:
    """``OUT/shard_meta/{name}.json``, the sidecar of shard ``name``."""
    return Path(out) / META_DIR / f"{name}.json"


def shard_split(filename: str) -> str | None:
    """The split of a shard file name ``{split}-{k:05d}.parquet``; None for any other name."""
    m = _SHARD_FILE.fullmatch(filename)
    return m["split"] if m else None


def _split_files(shard_dir: str | Path, split: str) -> list[str]:
    folder = Path(shard_dir) / SHARDS_DIR
    return sorted(str(p) for p in folder.glob(f"{split}-*.parquet") if shard_split(p.name) == split)


def shard_files(shard_dir: str | Path, split: str) -> list[str]:
    """The shard files ``shard_dir/shards/{split}-{k:05d}.parquet`` of ``split``, sorted.

    Raises FileNotFoundError when ``split`` has none.
    """
    files = _split_files(shard_dir, split)
    if not files:
        folder = Path(shard_dir) / SHARDS_DIR
        raise FileNotFoundError(f"no shards {folder}/{split}-NNNNN.parquet for split {split!r}")
    return files


def has_split(shard_dir: str | Path, split: str) -> bool:
    """Whether ``shard_dir`` holds at least one shard file of ``split``."""
    return bool(_split_files(shard_dir, split))
