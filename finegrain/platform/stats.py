"""How sure a table is: bootstrap intervals and paired tests over seeds and validation videos.

A row of a table (one variant) is a matrix ``C[s, v]``: 1 where seed ``s``'s run classified
validation video ``v`` correctly. Its accuracy is ``C.mean()``.

- :func:`bootstrap_ci`: a 95 % interval of that mean from a two-way bootstrap that resamples
  seeds and videos (with replacement, independently), so it carries both the training noise
  (seeds) and the finite test set (videos). A row with one video column (only per-seed
  accuracies known) is resampled over seeds alone; a constant row's interval is a point.
- :func:`paired_test`: a row against the baseline row, paired by seed and video (only seeds and
  videos both have): the per-video difference of the seed-averaged correctness, tested with a
  sign-flip permutation test (:func:`scipy.stats.permutation_test`, ``permutation_type="samples"``:
  under the null each video's two results are exchangeable), two-sided. Identical rows give
  p = 1.

Written here because no kept library does the two-way (seed × video) bootstrap; the
permutation test itself is SciPy's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 2000
ALPHA = 0.05


@dataclass(frozen=True)
class Correctness:
    """``matrix[s, v]`` in {0, 1} (or a per-seed accuracy when ``videos`` is empty)."""

    seeds: tuple[int, ...]
    videos: tuple[str, ...]
    matrix: np.ndarray

    @classmethod
    def from_runs(cls, runs: Mapping[int, Mapping[str, float]]) -> Correctness:
        """``{seed: {video_id: correct}}`` → the seeds × common-videos matrix."""
        seeds = tuple(sorted(runs))
        common = set.intersection(*(set(r) for r in runs.values())) if runs else set()
        videos = tuple(sorted(common))
        matrix = np.array([[float(runs[s][v]) for v in videos] for s in seeds], dtype=float)
        return cls(seeds, videos, matrix.reshape(len(seeds), len(videos)))

    @classmethod
    def from_accuracies(cls, accuracies: Mapping[int, float]) -> Correctness:
        """Per-seed accuracies only (runs that logged no per-video results)."""
        seeds = tuple(sorted(accuracies))
        return cls(seeds, (), np.array([[accuracies[s]] for s in seeds], dtype=float))

    @property
    def mean(self) -> float:
        return float(self.matrix.mean()) if self.matrix.size else float("nan")


def bootstrap_ci(
    c: Correctness, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean under a two-way (seeds × videos) bootstrap."""
    m = c.matrix
    if m.size == 0:
        return float("nan"), float("nan")
    if np.all(m == m.flat[0]):
        return float(m.flat[0]), float(m.flat[0])
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, m.shape[0], size=(resamples, m.shape[0]))
    v_idx = rng.integers(0, m.shape[1], size=(resamples, m.shape[1]))
    # mean over the resampled rows and columns: row sums first keeps memory at S x V per draw
    means = np.array([m[s][:, v].mean() for s, v in zip(s_idx, v_idx, strict=True)])
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedTest:
    difference: float  # mean accuracy of the row minus the baseline's, on the paired part
    p_value: float
    seeds: int
    videos: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def paired_test(
    row: Correctness, baseline: Correctness, resamples: int = 9999, seed: int = 0
) -> PairedTest | None:
    """Sign-flip permutation test of ``row`` vs ``baseline`` on their common seeds and videos;
    ``None`` when they share no seed or have no per-video results."""
    seeds = [s for s in row.seeds if s in baseline.seeds]
    videos = [v for v in row.videos if v in set(baseline.videos)]
    if not seeds or not videos:
        return None

    def part(c: Correctness) -> np.ndarray:
        si = [c.seeds.index(s) for s in seeds]
        vi = {v: i for i, v in enumerate(c.videos)}
        return c.matrix[np.ix_(si, [vi[v] for v in videos])].mean(axis=0)  # per video

    x, y = part(row), part(baseline)
    diff = float((x - y).mean())
    if np.all(x == y):
        return PairedTest(diff, 1.0, len(seeds), len(videos))
    result = stats.permutation_test(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        alternative="two-sided",
        random_state=seed,
    )
    return PairedTest(diff, float(result.pvalue), len(seeds), len(videos))
