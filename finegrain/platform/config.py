"""The experiment configuration: typed, validated before Ray starts.

One :class:`ExperimentConfig` with sections ``data``, ``model``, ``optim``, ``eval``, ``scaling``,
``tracking`` and ``run``. It is loaded from a YAML file (a path, or a name in
``experiments/configs/``), then overridden with ``--set section.field=value`` pairs (values are
parsed as YAML: ``0.01``, ``true``, ``[0.1, 0.2]``). The ``model`` section takes the method's own
options (``model.neurons=12`` for DSTS), validated by the method's own ``Options`` (its spec in ``finegrain.models``).

Validation uses pydantic (already a Ray dependency) with ``extra="forbid"``; every problem becomes
one line naming the field and what is allowed, collected in :class:`ConfigError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from finegrain.models import BACKBONES, BASELINE, METHODS, method_options, method_spec
from finegrain.models.spec import describe_options_error

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"
DATASETS = ("synthetic", "ssv2", "diving48", "ucf101", "hmdb51", "kinetics")


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is one line per bad field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    # finegrained: the benchmark; pretrain: its complement, coarse shapes x motions (16
    # classes, disjoint from the benchmark's), the pretraining set of the project's backbone
    kind: Literal["finegrained", "pretrain"] = "finegrained"
    classes: int = Field(12, ge=2, le=22)
    videos_per_class: int = Field(24, ge=2, le=10_000)
    # None: a quarter of videos_per_class are validation videos; a number: that many validation
    # videos per class on top of videos_per_class training ones
    val_videos_per_class: int | None = Field(None, ge=1, le=10_000)
    size: int = Field(64, ge=32, le=512, multiple_of=2)
    seed: int = 0

    @model_validator(mode="after")
    def _classes_of_kind(self):
        most = {"finegrained": 22, "pretrain": 16}[self.kind]
        if self.classes > most:
            raise ValueError(
                f"data.synthetic.classes: the {self.kind} set has {most} classes, got "
                f"{self.classes}"
            )
        return self


class DataConfig(_Section):
    dataset: Literal[DATASETS] = "synthetic"  # type: ignore[valid-type]
    root: str | None = None  # the dataset's download folder (not used for synthetic)
    shards: str | None = None  # a prebuilt build_shards.py output folder (skips building)
    split: int = Field(1, ge=1, le=3)
    synthetic: SyntheticConfig = SyntheticConfig()
    sampling: Literal["tsn", "dense"] = "tsn"
    num_frames: int = Field(8, ge=1, le=128)
    stride: int = Field(2, ge=1, le=16)
    short_side: int = Field(64, ge=16, le=1024)
    crop: int = Field(56, ge=16, le=1024)
    flip: bool | None = None  # None: off for ssv2 and synthetic (left/right classes), on otherwise
    # per training worker: decode actors, the Ray CPUs each reserves (an actor decodes on one
    # thread; the reservation is a scheduling token), videos per actor call, the Ray CPUs of
    # a shard-read task
    decode_actors: int = Field(1, ge=1, le=256)
    decode_cpus: float = Field(0.5, ge=0.05, le=64)
    # 16 keeps small data pipelined (tests, the demo); the paper configs read large datasets
    # with 32 (README, Speed: 261 clips/s against 185 at 16 on 2 cores)
    decode_batch: int = Field(16, ge=1, le=4096)
    # not 0: Ray schedules 0-CPU tasks without limit, and Ray Data then started ~80 read
    # processes on 2 cores (measured) until workers aborted
    read_cpus: float = Field(0.25, ge=0.05, le=64)
    # the previous epoch's training batches kept (uint8, CPU) for work between epochs (U2S's
    # category similarity matrix): all of them when they fit, else a uniform sample
    replay_mb: int = Field(256, ge=1, le=1 << 20)

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop > self.short_side:
            raise ValueError(
                f"data.crop ({self.crop}) must be <= data.short_side ({self.short_side})"
            )
        if self.dataset != "synthetic" and not (self.root or self.shards):
            raise ValueError(f"data.root or data.shards is required for dataset {self.dataset!r}")
        return self


class ModelConfig(BaseModel):
    """method + backbone + the method's own options (flat: ``model.neurons``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    method: str = BASELINE  # a registered method (finegrain.models.METHODS)
    backbone: Literal[tuple(BACKBONES)] = "tiny"  # type: ignore[valid-type]
    # a local state-dict file for the backbone (a relative path: from the working directory,
    # else from the project root, where the project's own pretrained weights live)
    weights: str | None = None
    keep_time: bool = False  # ResNet family: no temporal stride in the last two stages
    width: int | None = Field(None, ge=2, le=256)  # tiny backbone: width of its first stage

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(
                f"model.method: {method!r} is not a method; valid: {', '.join(METHODS)}"
            )
        return method

    @model_validator(mode="after")
    def _method_options(self):
        if self.width is not None and self.backbone != "tiny":
            raise ValueError(
                f"model.width applies to the tiny backbone, not {self.backbone!r} "
                "(the synthetic configs set it: add model.width=null)"
            )
        spec = method_spec(self.method)
        try:
            spec.options(**(self.model_extra or {}))  # the method's own validation, the only one
        except ValidationError as error:
            lines = describe_options_error(self.method, spec.options, error)
            raise ValueError("; ".join(f"model.{line}" for line in lines)) from None
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``build_model`` (method options and backbone options)."""
        opts = dict(self.model_extra or {})
        if self.keep_time:
            opts["keep_time"] = True
        if self.weights:
            opts["weights"] = str(weights_path(self.weights))
        if self.width is not None:
            opts["width"] = self.width
        return opts


def weights_path(path: str) -> Path:
    """``path`` made absolute: as given when it exists (or is absolute), else relative to the
    project root (so a config's ``weights/...`` works from any working directory, and on Ray
    workers whose working directory is not the driver's)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given.absolute()
    return CONFIG_DIR.parents[1] / given


class OptimConfig(_Section):
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    epochs: int = Field(6, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=4096)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, le=100)
    step_size: int = Field(10, ge=1)  # epochs between x0.1 decays for schedule=step
    grad_clip: float | None = Field(5.0, gt=0)
    stage_epochs: list[int] | None = None  # epochs per training stage (U2S: 3 numbers)
    # the backbone's learning rate as a multiple of optim.lr, the same for every method (0.1 is
    # the Video Swin / DSTS recipe for a pretrained backbone; METHODS.md: 1.0 by default)
    backbone_lr_scale: float = Field(1.0, gt=0, le=10)
    # warm-up at the start of every training stage (U2S) instead of only the first one
    warmup_every_stage: bool = False


class EvalConfig(_Section):
    clips: int = Field(1, ge=1, le=32)  # temporal views per video
    crops: Literal[1, 3] = 1  # spatial views per clip
    batch_size: int = Field(32, ge=1, le=4096)
    # the validation views are decoded once and kept by each worker when its share fits in
    # this many MiB (0: decode them at every evaluation)
    cache_mb: int = Field(1024, ge=0, le=1 << 22)
    # precise BN: before every evaluation, recompute every BatchNorm's running statistics on
    # this many training batches (a uniform sample of the epoch's; 0: off)
    precise_bn_batches: int = Field(16, ge=0, le=10_000)


class ScalingConfig(_Section):
    workers: int = Field(2, ge=1, le=1024)
    gpus_per_worker: float = Field(0, ge=0, le=8)
    cpus_per_worker: float = Field(1, gt=0, le=256)
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    threads_per_worker: int = Field(1, ge=1, le=256)  # torch intra-op threads per worker


class TrackingConfig(_Section):
    mlflow_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or the embedded SQLite store
    experiment: str = "finegrain"
    parent_run_id: str | None = None  # set by the tuner: nests this run under a sweep


class RunConfig(_Section):
    name: str | None = None  # same name → resume from its latest checkpoint
    dir: str = "runs"  # run directory (relative to the project root, or absolute)
    seed: int = Field(0, ge=0)
    max_failures: int = Field(1, ge=-1, le=100)
    fail_at_step: int | None = Field(None, ge=0)  # fault injection: rank 1 raises once there
    log_every: int = Field(0, ge=0)  # steps between progress lines (0: epoch lines only)
    # times a worker group that cannot get its resources within a minute is tried again before
    # the run fails (None: 2 on a fixed cluster, 10 where an autoscaler may be adding nodes)
    startup_retries: int | None = Field(None, ge=0, le=1000)


# config fields that say where a run lives and logs, not what it computes: MLflow tags
BOOKKEEPING = ("run.dir", "run.name", "tracking.")


class ExperimentConfig(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()

    def resolved(self) -> dict[str, Any]:
        """The whole configuration as plain data, the method's options with their defaults
        filled in (what the run used, so that it can be reproduced from what MLflow holds)."""
        d = self.model_dump(mode="json")
        defaults = method_options(self.model.method)
        d["model"] |= {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in defaults.items()
            if k not in d["model"]
        }
        return d

    def flat(self) -> dict[str, Any]:
        """``{"model.neurons": 12, ...}``, defaults included."""
        return _flatten(self.resolved())

    def params(self) -> dict[str, Any]:
        """What MLflow logs as the run's params: every field that says what the run computes;
        where it runs and logs (:data:`BOOKKEEPING`) goes to :meth:`bookkeeping` (tags)."""
        return {k: v for k, v in self.flat().items() if not k.startswith(BOOKKEEPING)}

    def bookkeeping(self) -> dict[str, str]:
        """The run's bookkeeping options as tags (unset ones left out: no ``None`` tags)."""
        flat = self.flat().items()
        return {k: str(v) for k, v in flat if k.startswith(BOOKKEEPING) and v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a file in experiments/configs/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"--config {name_or_path!r}: no such file; named configs: {', '.join(names)}")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["model.neurons=12", "optim.lr=0.01"]`` → nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {pair!r}: expected section.field=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is a value, not a section")
        node[leaf] = value
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    config: str | None = None, overrides: list[str] | None = None, **sections: dict
) -> ExperimentConfig:
    """YAML file (or named config) → ``sections`` (from CLI flags) → ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if config:
        path = resolve_config_path(config)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for name, values in sections.items():
        raw = _merge(raw, {name: {k: v for k, v in values.items() if v is not None}})
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate(raw)


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        parts = [str(p) for p in err["loc"]]
        loc = ".".join(parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            section = ExperimentConfig
            for part in parts[:-1]:
                section = section.model_fields[part].annotation
            valid = ", ".join(section.model_fields)
            lines.append(f"{loc}: unknown field; valid fields: {valid}")
        elif msg.startswith(loc + ".") or msg.startswith(loc + " ") or msg.startswith("--"):
            lines.append(msg)  # our own validators already name the field
        else:
            got = err.get("input")
            lines.append(f"{loc}: {msg}" + ("" if isinstance(got, dict) else f"; got {got!r}"))
    return "\n".join(lines)


def apply_params(base: dict, params: dict[str, Any]) -> ExperimentConfig:
    """Set dotted keys (``model.neurons``; ``model.gamma.0`` builds a list) on a config dict
    and validate it: the one patcher of sweeps, suites and ``--set``-style overrides."""
    raw = json.loads(json.dumps(base))
    lists: dict[tuple[str, ...], dict[int, Any]] = {}
    for key, value in params.items():
        parts = key.split(".")
        if parts[-1].isdigit():
            lists.setdefault(tuple(parts[:-1]), {})[int(parts[-1])] = value
            continue
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = plain(value)
    for parts, items in lists.items():
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = [plain(items[i]) for i in sorted(items)]
    return validate(raw)


def plain(value):
    """numpy scalars (from the searchers) → Python values, so the config validates."""
    return value.item() if hasattr(value, "item") else value
