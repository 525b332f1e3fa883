"""SearchConfig: one YAML file validated up front; every CLI flag overrides a key.

A bad config raises ConfigError with one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.budget import Budget, BudgetError, parse_budget
from orchestrator.errors import ConfigError
from orchestrator.targets.base import LatencySettings, TargetSettings
from search_spaces.config import Importance, PruningMode, SpaceConfig


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Number = Annotated[StrictInt | float, AfterValidator(_finite)]
Finite = Annotated[float, AfterValidator(_finite)]
MAX_SEED = 2**32 - 1  # numpy's (and so Optuna's samplers') seed range


def _plain_text(value: str | None) -> str | None:
    """Paths and names: a NUL or control character cannot be a file name (os calls raise)."""
    if value is not None and any(ord(c) < 32 or c == "\x7f" for c in value):
        raise ValueError("must not contain control characters (NUL, newline, tab, ...)")
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkersConfig(_Frozen):
    # auto: one per GPU of the cluster (gpus_per_worker), else one per cpus_per_worker CPUs;
    # grows as nodes join
    count: StrictInt | Literal["auto"] = "auto"
    cpus_per_worker: Number = Field(default=1, gt=0)
    # auto: 1 where the cluster has GPUs, else 0; fractions share a GPU (0.5: two per GPU)
    gpus_per_worker: Number | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def gpus(self, cluster_gpus: float) -> float:
        """GPUs per worker on a cluster with `cluster_gpus` GPUs in all."""
        if self.gpus_per_worker == "auto":
            return 1.0 if cluster_gpus > 0 else 0.0
        return float(self.gpus_per_worker)

    @field_validator("gpus_per_worker")
    @classmethod
    def _gpus(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be 0 or more (fractions share a GPU), or auto")
        return v

    @field_validator("count", mode="before")
    @classmethod
    def _count(cls, v):
        if isinstance(v, bool) or not (v == "auto" or isinstance(v, int)):
            raise ValueError(f"must be a whole number of workers or 'auto', got {v!r}")
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or auto")
        return v


class RecoveryConfig(_Frozen):
    bn_recalibration: StrictBool = True
    calibration_batches: StrictInt | None = Field(default=None, ge=1)
    finetune_steps: StrictInt = Field(default=0, ge=0)  # short fine-tune on the train batches
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Finite = Field(default=1e-3, gt=0)
    # how activation scales are calibrated (space.act_bits; orchestrator/compress/activations.py)
    act_calibration: Literal["minmax", "percentile"] = "minmax"


class FidelityConfig(_Frozen):
    """Multi-fidelity evaluation (orchestrator.fidelity): auto is on with the default
    accuracy metric (its range is [0, 1])."""

    enabled: StrictBool | Literal["auto"] = "auto"
    steps: tuple[float, ...] = (0.25, 0.5, 1.0)
    error_rate: float = Field(default=0.05, gt=0, lt=1)
    metric_range: tuple[Finite, Finite] = (0.0, 1.0)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("fractions of the validation data in (0, 1], e.g. [0.25, 0.5, 1]")
        return tuple(sorted(v))

    @field_validator("metric_range")
    @classmethod
    def _range(cls, v):
        if not v[0] < v[1]:
            raise ValueError("[lowest, highest] the metric can take, lowest first, e.g. [0, 1]")
        return v


class SensitivityConfig(_Frozen):
    # the sensitivity phase's evaluations, at most this share of `trials` (probes on part
    # of the validation data count by that part): fewer probes per knob, the largest
    # knobs first, the rest priced by the kinds' priors
    share: float = Field(default=0.25, gt=0, le=1)


class LatencyConfig(_Frozen):
    """How a worker measures latency in the target runtime (issue 15): `repeats` timed
    forwards of a `batch`-sample input with `threads` intra-op threads, after `warmup`."""

    batch: StrictInt = Field(default=1, ge=1)
    threads: StrictInt = Field(default=1, ge=1)
    warmup: StrictInt = Field(default=10, ge=0)
    repeats: StrictInt = Field(default=50, ge=1)


# the sampler names (the factories behind them: orchestrator.search.SAMPLERS, one per name
# but auto, which picks one of them per run)
SAMPLERS = ("auto", "tpe", "nsga2", "random")


class SearchConfig(_Frozen):
    task: StrictStr = "digits-cnn"
    study: StrictStr | None = None  # default: <task>-<timestamp>
    out: StrictStr = "runs"
    trials: StrictInt = Field(default=60, ge=1)
    seed: StrictInt | None = Field(default=0, ge=0, le=MAX_SEED)
    sampler: Literal[SAMPLERS] = "auto"
    # front: the whole size/metric front; budget: the best within `budget` (front kept too)
    objective: Literal["front", "budget"] = "front"
    # the front's axis against the metric: size_bytes, or latency_ms measured in the target
    # runtime (`latency:`)
    front: Literal["size", "latency"] = "size"
    budget: StrictStr | dict[str, StrictStr | Number] | None = None
    pruning: PruningMode = "auto"
    # the runtime the model ships on (orchestrator/targets): what the space offers, what is
    # scored (the artifact itself) and how it is exported
    target: StrictStr = "torch"
    latency: LatencyConfig = LatencyConfig()
    importance: Importance = "l1"  # structured: which channels a group keeps
    space: SpaceConfig = SpaceConfig()
    workers: WorkersConfig = WorkersConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    fidelity: FidelityConfig = FidelityConfig()
    baselines: StrictBool = True  # evaluate the uniform float/8/4/2-bit policies first
    seeding: StrictBool = True  # sensitivity analysis, then knapsack-seeded policies first
    sensitivity: SensitivityConfig = SensitivityConfig()
    repair: StrictBool = True  # follow each over-budget ask with its nearest fitting policy
    # objective budget: every other ask after the first candidates is a local move from the
    # incumbent (one or two knobs a step), repaired to the budget's edge
    local_search: StrictBool = True
    retries: StrictInt = Field(default=2, ge=0)  # re-dispatches of a candidate whose worker died
    # seconds one evaluation may take; past it the worker is replaced and the trial FAILs
    timeout: Number | None = Field(default=None, gt=0)
    # Ray: None starts a local one (127.0.0.1 only); "auto" joins the cluster this runs in;
    # or host:port / ray://host:10001
    address: StrictStr | None = None
    # Optuna storage: None = sqlite in the study directory; postgresql://user@host/db (the
    # password only from PRUNESEARCH_STORAGE_PASSWORD); journal:///path/file.log (no server)
    storage: StrictStr | None = None
    pip: tuple[StrictStr, ...] = ()  # `submit`: pip requirements installed for the job

    @field_validator("storage")
    @classmethod
    def _storage(cls, v):
        if v is not None:
            from orchestrator.storage import check_storage_url

            check_storage_url(v)
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v):
        from orchestrator.targets import TARGETS

        if v not in TARGETS:
            raise ValueError(f"unknown target '{v}'; use one of {', '.join(TARGETS)}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget(cls, v):
        parse_budget(v)  # raise early with the budget's own message
        return v

    @field_validator("study")
    @classmethod
    def _study(cls, v):
        if v is not None and (not v or "/" in v or v.startswith(".")):
            raise ValueError("must be a plain directory name (no '/', not starting with '.')")
        return _plain_text(v)

    @field_validator("out")
    @classmethod
    def _out(cls, v):
        if not v:
            raise ValueError("must name a directory, e.g. runs")
        return _plain_text(v)

    @model_validator(mode="after")
    def _objective(self) -> SearchConfig:
        if self.objective == "budget" and not parse_budget(self.budget):
            raise ValueError("objective: budget needs a budget, e.g. --budget size=40KB or "
                             "--budget metric>=0.95")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _target_pruning(self) -> SearchConfig:
        from orchestrator.targets import target_of

        target = target_of(self.target)
        if self.pruning != "auto" and self.pruning not in target.pruning:
            raise ValueError(f"config key 'pruning': target {self.target} runs {self.pruning} "
                             f"pruning's masked weights dense (no smaller, no faster); use "
                             f"pruning: {', '.join(('auto', *target.pruning))}")  # fmt: skip
        return self

    def target_settings(self) -> TargetSettings:
        """What a worker needs to score for the target (orchestrator/targets)."""
        from orchestrator.targets import target_of

        measure = (target_of(self.target).measures_latency or self.front == "latency"
                   or self.parsed_budget.latency_ms is not None)  # fmt: skip
        return TargetSettings(name=self.target, latency=LatencySettings(**self.latency.model_dump()),
                              measure_latency=measure)  # fmt: skip

    @property
    def directions(self) -> list[str]:
        """Optuna directions. front: (size_bytes or latency_ms, metric); budget: the metric
        within the budget, or with a metric floor (`metric>=X`) the size of the smallest
        model."""
        if self.objective == "front":
            return ["minimize", "maximize"]
        return ["minimize"] if self.parsed_budget.metric_floor is not None else ["maximize"]

    @property
    def front_axis(self) -> str:
        """The trial column of the front's (and the front objective's) first axis."""
        return {"size": "size_bytes", "latency": "latency_ms"}[self.front]

    @property
    def parsed_budget(self) -> Budget:
        return parse_budget(self.budget)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (`X`, `tuple[X, ...]`, `X | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _fields_at(path: list[str | int]) -> list[str]:
    """Field names at `path` in the config tree, for did-you-mean."""
    model: type[BaseModel] | None = SearchConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# Type tags pydantic puts in error locations of union fields; they are not config keys.
_TAGS = {"int", "float", "str", "bool", "list", "tuple", "dict", "literal", "none"}


def _explain(exc: ValidationError) -> str:
    err = exc.errors()[0]
    # Drop pydantic's union/type tags from the location: keep only config keys and indexes.
    raw = err["loc"]
    if err["type"] == "extra_forbidden":  # the last part is the user's key, whatever it is
        raw, unknown = raw[:-1], str(raw[-1])
    loc = tuple(p for p in raw if isinstance(p, int) or (p.isidentifier() and p not in _TAGS))
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(unknown, _fields_at(list(loc)), n=1, cutoff=0.6)
        hint = f"; did you mean '{_dotted((*loc, close[0]))}'?" if close else ""
        return f"unknown config key '{_dotted((*loc, unknown))}'{hint}"
    key = _dotted(loc)
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = (
        ""
        if isinstance(got, (dict, list, tuple)) or err["type"].startswith("value_error")
        else f" (got {got!r})"
    )
    if not key:  # a check across keys: its message names them
        return msg
    return f"config key '{key}': {msg}{shown}"


def make_config(data: dict[str, Any] | None = None, **overrides: Any) -> SearchConfig:
    """Validate a config mapping, with dotted-key overrides (`workers.count=2`) from flags."""
    merged: dict[str, Any] = copy.deepcopy(dict(data or {}))  # never change the caller's
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
        node[last] = value
    try:
        return SearchConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None
    except BudgetError as exc:
        raise ConfigError(f"config key 'budget': {exc}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; give a YAML file or no argument "
                          "for the embedded default")  # fmt: skip
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"config file '{path}' is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys (task:, trials:, ...)")
    return data
