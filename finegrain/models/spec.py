"""What a method tells the platform about itself: :class:`MethodSpec`.

Each method's package (``finegrain/models/<method>/``) defines one ``SPEC`` beside its code, the
way timm registers a model next to its definition. The platform (config validation, the trainer,
Tune, the suites and the figures) reads only specs, never a method's name:

- ``options``: a pydantic model with ``extra="forbid"``, the only validation of the method's
  options (types, ranges, cross-field rules). Its fields and defaults are the method's options.
- ``build(num_classes, backbone, options)``: the thin builder, given validated options.
- ``needs_stages``: the method taps several CNN stages (a one-stage token backbone such as MViT
  cannot serve it).
- ``space``: the default search space of the method's own options (``tune.py`` adds the shared
  learning-rate and weight-decay ranges).
- ``suite``: the ablation suite, the rows of its paper's tables (``ablate.py --suite <method>``).
- ``figures``: ``"module:function"`` drawing the method's diagnostics pictures, imported only when
  a picture is drawn (Ray's helper processes never import matplotlib or the models for it).
- ``extra_batches``: the ``extra_batches`` the built model will have (see
  :class:`~finegrain.models.base.FineGrainModel`), from the validated options alone; None: 0.
- ``mechanisms_need_evidence``: the scorer scores only against evidence boxes (it returns ``{}``
  without them), so evaluations on datasets without evidence skip collecting its diagnostics.
- ``mechanisms``: ``"module:function"`` scoring the mechanism the method's paper argues through
  against the ground truth the synthetic benchmark knows (its ``class_groups`` and each
  validation clip's evidence boxes), imported only when scored
  (:meth:`MethodSpec.score_mechanisms`). The function's signature::

      def score(diagnostics: list[dict], labels: Tensor, preds: Tensor,
                class_names: list[str], class_groups: dict,
                evidence: list[dict | None] | None = None) -> dict[str, float]

  ``diagnostics``: the per-batch diagnostics dicts (CPU tensors) of every evaluated clip, all
  batches in order; ``labels`` (N,): the clips' true classes, concatenated in the same order;
  ``preds`` (N,): each clip's argmax prediction, same order; ``class_groups``: ``{class name:
  {"group", "subtlety": "spatial" | "temporal"}}``, empty on datasets without groups (then the
  group-based scores are skipped); ``evidence``: the per-batch ``batch["evidence"]`` dicts (CPU
  tensors) aligned with ``diagnostics`` (same batches, same order), None for a batch without
  one, or None altogether (then the evidence-based scores are skipped): ``"part"`` and
  ``"object"`` ``(B, T, 4)`` float boxes ``(x0, y0, x1, y1)`` in the pixels of the model-input
  clip (its T frames), NaN where there is no box (real datasets: all NaN), ``"visible"``
  ``(B, T)`` bool, the frames where the class difference shows; :mod:`finegrain.models.evidence`
  scores a method's maps against the boxes. It returns plain floats keyed without the
  ``mech/`` prefix the platform adds, ``{}`` when the diagnostics (or the evidence) it needs
  are missing, leaves out a score that is undefined (NaN) and never raises on a missing key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    """Base of every method's options: unknown keys are errors, values are checked on change."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Variant:
    """One row of an ablation table: config overrides, the paper's name for it, its table.

    ``evaluates``: the variant is an evaluation of another variant's checkpoint (no training).
    """

    name: str
    overrides: dict[str, Any]
    paper: str
    table: str
    evaluates: str | None = None


@dataclass(frozen=True)
class Suite:
    """An ablation suite: ``method`` is the base config's method (rows may switch it)."""

    name: str
    method: str
    title: str
    variants: tuple[Variant, ...] = field(default_factory=tuple)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(
            f"--variants {name!r}: not a variant of suite {self.name!r}; "
            f"valid: {', '.join(v.name for v in self.variants)}"
        )


def variant(name, overrides, paper, table, evaluates=None) -> Variant:
    return Variant(name, dict(overrides), paper, table, evaluates)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str  # how tables and the methods suite name it
    options: type[Options]
    build: Callable[..., Any]
    needs_stages: bool = True
    space: dict[str, dict] = field(default_factory=dict)
    suite: Suite | None = None
    figures: str | None = None
    mechanisms: str | None = None
    # the scorer needs the evidence boxes: on a dataset without them (real data) the evaluator
    # keeps no diagnostics for it (DFB's are ~36·K bytes per view: 160 MB an SSv2 evaluation)
    mechanisms_need_evidence: bool = False
    # the built model's ``extra_batches`` from its validated options alone (None: 0): a worker
    # opens the run's data stream, whose plan depends on it, before it builds the model
    extra_batches: Callable[[Any], int] | None = None

    def defaults(self) -> dict[str, Any]:
        """The method's options with their defaults."""
        return {name: f.default for name, f in self.options.model_fields.items()}

    def verdict(self, scores: dict[str, tuple[float, float, float]]) -> str:
        """In words, whether the paper's mechanism claim holds given ``scores`` ({key: (mean,
        CI low, CI high)} over seeds), by the ``verdict`` function beside the scorer."""
        if not self.mechanisms:
            return "no mechanism score defined for this method yet"
        import importlib

        module = importlib.import_module(self.mechanisms.split(":")[0])
        judge = getattr(module, "verdict", None)
        return judge(scores) if judge else "no verdict defined"

    def draw(self, diagnostics, sample, names, class_groups) -> dict:
        """The method's diagnostics pictures (``{}`` without a figures function)."""
        if not self.figures:
            return {}
        import importlib

        module, function = self.figures.split(":")
        return getattr(importlib.import_module(module), function)(
            diagnostics, sample, names, class_groups
        )

    def score_mechanisms(
        self, diagnostics, labels, preds, class_names, class_groups, evidence=None
    ) -> dict[str, float]:
        """The method's mechanism scores (``{}`` without a mechanisms function). A scorer that
        fails prints a warning and gives ``{}``: a score never stops a run. ``evidence``: the
        per-batch evidence dicts aligned with ``diagnostics``, or None (no ground truth)."""
        if not self.mechanisms:
            return {}
        import importlib

        try:
            module, function = self.mechanisms.split(":")
            scorer = getattr(importlib.import_module(module), function)
            # a scorer written before the evidence existed (five arguments) still runs
            extra = {"evidence": evidence} if _takes(scorer, "evidence") else {}
            scores = scorer(
                diagnostics, labels, preds, list(class_names or []), class_groups or {}, **extra
            )
            scores = {str(k): float(v) for k, v in (scores or {}).items()}
        except Exception as error:  # a score must never kill a run
            print(
                f"warning: {self.name} mechanism scores ({self.mechanisms}) failed: "
                f"{type(error).__name__}: {error}",
                flush=True,
            )
            return {}
        return {k: v for k, v in scores.items() if math.isfinite(v)}  # undefined: left out


def _takes(function: Callable, name: str) -> bool:
    """Whether ``function`` accepts the keyword argument ``name`` (True when unknown)."""
    import inspect

    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def parse_options(method: str, options_type: type[Options], options: dict[str, Any]) -> Options:
    """``options_type(**options)``; a problem raises ``ValueError``, one line per bad field
    (``neurons: Input should be greater than or equal to 2 (got 1)``)."""
    from pydantic import ValidationError

    try:
        return options_type(**options)
    except ValidationError as error:
        raise ValueError("; ".join(describe_options_error(method, options_type, error))) from None


def describe_options_error(method: str, options_type: type[Options], error) -> list[str]:
    """One line per problem: ``field: what is wrong (got value)``; a rule over several fields
    (a ``model_validator``) gives its own message."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = ", ".join(sorted(options_type.model_fields)) or "(none)"
            lines.append(f"{where}: not an option of method {method!r}; valid: {valid}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if where and "input" in e else ""
        lines.append(f"{where}: {msg}{got}" if where else msg)
    return lines
