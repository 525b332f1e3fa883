"""Export: a study's best policy as a real, smaller model file, and the loader for it.

`export_best` picks a trial (the best within a budget, or a named one), rebuilds exactly
the model that trial scored (the driver's config, space, Rebuilder and recovery), stores
each compressible layer in the encoding the cost model counted (so the model file,
header included, is `size_bytes` to the byte), loads the bytes back and checks the
loaded model's metric against the recorded one before writing anything. Files (docs/export.md):

- `model.safetensors`: tensors only, no pickles, back to back in one entry; packed layers
  as uint8 bit streams with float32 scales, masks as bitmaps;
- `manifest.json`: what the loader needs (where each tensor lies in the model file,
  encodings, shapes, channel counts, the task or the architecture);
- `policy.json`: what was exported and why (policy, per-layer table, predicted cost,
  recorded and verified metric, versions); no timestamps, so exports are byte-identical;
- `model.onnx` (optional, the `onnx` extra): the loaded model, checked with onnxruntime.

Each export also leaves a record of what it found in the study directory,
`exports/trial-<N>-<format>.json` (recorded against artifact metric, size and latency, the
time and where the files went), which `prunesearch report` shows as its parity table.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from orchestrator.atomic import atomic_write_bytes, atomic_write_json
from orchestrator.batches import call_model, to_device
from orchestrator.budget import Budget, BudgetError, format_bytes, parse_budget
from orchestrator.compress.activations import params_from_json, params_to_json, quantize_activations
from orchestrator.compress.architecture import architecture, build_architecture
from orchestrator.compress.codec import (
    Encoded,
    ExportError,
    decode_state,
    dtype_name,
    dtype_of,
    encode,
    keep_packed,
    layer_masks,
    model_file,
    unpack_file,
)
from orchestrator.compress.structured import slice_model
from orchestrator.config import SearchConfig, make_config
from orchestrator.errors import ConfigError
from orchestrator.export_onnx import check_format, export_onnx_trial
from orchestrator.runrecord import RunRecord, read_study
from search_spaces import SearchSpace, SpaceError
from search_spaces.config import FLOAT_BITS
from search_spaces.cost import FILE_FORMAT, file_bytes, policy_cost
from search_spaces.kinds import ACT_BITS, BITS, layer_act_bits
from search_spaces.policy import Policy

FORMAT = FILE_FORMAT  # 2: the tensors in one safetensors entry, the manifest's `stored` index
FORMAT_1 = "prunesearch-compressed/1"  # an entry per tensor (before issue 14); still loads
POLICY_FORMAT = "prunesearch-policy/1"
MODEL_FILE, MANIFEST_FILE, POLICY_FILE, ONNX_FILE = (
    "model.safetensors", "manifest.json", "policy.json", "model.onnx")  # fmt: skip
METRIC_TOLERANCE = 1e-9  # the loaded model must score what the trial recorded
ONNX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}  # onnxruntime vs torch outputs
LOADER_CONFIG_KEYS = ("task", "pruning", "importance", "space")
MODEL_FIELDS = ("bytes", "payload_bytes", "header_bytes", "sha256")  # policy.json's model_file
EXPORTS_DIR = "exports"  # <study_dir>/exports/trial-<N>-<format>.json: the parity records
RECORD_FORMAT = "prunesearch-export-record/1"


# -- which trial ------------------------------------------------------------------------


def _budget(text: str | None, config: SearchConfig) -> Budget:
    if text is None:
        return config.parsed_budget
    try:
        return parse_budget(text)
    except BudgetError as exc:
        raise ConfigError(f"--budget: {exc}") from None


def _describe(row: Any) -> str:
    return f"trial {row.trial}, {format_bytes(row.size_bytes)} with metric {row.metric:.4f}"


def choose_trial(trials: pd.DataFrame, budget: Budget, *, trial: int | None,
                 study: str) -> Any:  # fmt: skip
    """The named trial, or the best COMPLETE trial within `budget` (`Budget.rank`; ties:
    the earlier trial)."""
    if trial is not None:
        rows = list(trials[trials["trial"] == trial].itertuples())
        if not rows:
            raise ConfigError(f"--trial {trial}: study '{study}' has no such trial (it has "
                              f"{len(trials)} trials); see 'prunesearch front'")  # fmt: skip
        row = rows[0]
        if row.state != "COMPLETE" or pd.isna(row.metric):
            raise ConfigError(f"--trial {trial} is {row.state}; only COMPLETE trials (scored on "
                              "all validation data) can be exported")  # fmt: skip
        if budget and not budget.within(row):
            raise ConfigError(f"--trial {trial} ({_describe(row)}) is not within budget "
                              f"{budget.describe()}; drop --budget or pick another trial")  # fmt: skip
        return row
    done = trials[(trials["state"] == "COMPLETE") & trials["metric"].notna()]
    if done.empty:
        raise ConfigError(f"study '{study}' has no COMPLETE trial to export; run more trials "
                          "(prunesearch run --resume)")  # fmt: skip
    fits = [r for r in done.sort_values("trial").itertuples() if budget.within(r)]
    if not fits:
        smallest = min(done.itertuples(), key=lambda r: (r.size_bytes, -r.metric, r.trial))
        raise ConfigError(f"no COMPLETE trial of study '{study}' is within budget "
                          f"{budget.describe()}: the smallest recorded is {_describe(smallest)}; "
                          "raise --budget or give --trial N")  # fmt: skip
    return budget.best(fits)


# -- loading --------------------------------------------------------------------------


def _export_dir(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_export(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest and stored tensors of an export directory (or a file in it), checked
    against the manifest's SHA-256; ConfigError for anything missing or damaged."""
    from safetensors.torch import load

    where = _export_dir(path)
    manifest_path = where / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ConfigError(f"'{path}' is not a prunesearch export (no {MANIFEST_FILE}); give the "
                          "directory 'prunesearch export' wrote")  # fmt: skip
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") not in (FORMAT, FORMAT_1):
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
        data = (where / manifest["model_file"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
            raise ValueError(f"{manifest['model_file']} does not match the manifest's SHA-256")
        tensors = load(data)
        if manifest["format"] == FORMAT:
            tensors = unpack_file(tensors, manifest["stored"])
    except Exception as exc:
        raise ConfigError(f"export '{where}' is damaged: {type(exc).__name__}: {exc}; export "
                          "it again") from None  # fmt: skip
    return manifest, tensors


def _model_of(manifest: Mapping[str, Any], *, base: nn.Module | None = None,
              space: SearchSpace | None = None) -> nn.Module:  # fmt: skip
    """The module to load the state into: from the manifest's architecture, else the task's
    model (sliced to the manifest's channel counts when structured)."""
    if manifest.get("architecture") is not None:
        return build_architecture(manifest["architecture"])
    if base is None or space is None:
        from orchestrator.prepare import build_space

        try:
            _, base, space = build_space(make_config(manifest["config"]))
        except ConfigError as exc:
            raise ConfigError(f"loading this export needs task '{manifest['task']}' (its model "
                              f"is not a plain nn.Sequential): {exc}") from None  # fmt: skip
    if manifest["pruning"] == "structured":
        return slice_model(base, space.plan, manifest["channels"])
    return copy.deepcopy(base)  # the caller's base model stays as it was


def _assemble(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
              base: nn.Module | None = None, space: SearchSpace | None = None) -> nn.Module:  # fmt: skip
    try:
        state = decode_state(manifest, tensors)
    except Exception as exc:
        raise ConfigError(f"the export is damaged: {type(exc).__name__}: {exc}; export it "
                          "again") from None  # fmt: skip
    model = _model_of(manifest, base=base, space=space)
    # the export keeps tensors only; modules whose loaders read the version torch records
    # with a state dict (torchvision's MNASNet) get the versions of the model being filled
    state = collections.OrderedDict(state)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"the model of task '{manifest['task']}' no longer matches this "
                          f"export ({' '.join(line.strip() for line in first[:2])})") from None  # fmt: skip
    # 8-bit activations (act_bits): the scales the trial was scored with, as fake-quant
    quantize_activations(model, params_from_json(manifest.get("activations", {})))
    return model.eval()


def load_compressed(path: str | Path, *, packed: bool = False) -> nn.Module:
    """The exported model, runnable, on CPU, in eval mode. `path`: the export directory
    (or its manifest.json / model.safetensors).

    Weights are dequantized on load (a plain model). With `packed=True` each packed layer
    keeps its bit stream, scales and bitmap instead (parametrizations) and dequantizes its
    weights on every forward pass. A plain nn.Sequential rebuilds from the manifest
    alone; any other model needs its task (the model definition): see docs/export.md."""
    manifest, tensors = read_export(path)
    model = _assemble(manifest, tensors)
    if packed:
        keep_packed(model, manifest, tensors)
    return model


# -- ONNX (the `onnx` extra) ----------------------------------------------------------


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the onnx extra ({exc.name} is missing): pip "
                          "install 'prunesearch[onnx]'") from None  # fmt: skip


def _leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


def _as_args(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}


def _twice(inputs: Any) -> Any:
    """A batch of two from a batch of one: a batch of one would fix the batch size."""
    if isinstance(inputs, torch.Tensor):
        return torch.cat([inputs, inputs])
    if isinstance(inputs, Mapping):
        return {k: _twice(v) for k, v in inputs.items()}
    return type(inputs)(_twice(v) for v in inputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx logs and warns a lot (missing torchvision ops, decompositions)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def onnx_bytes(model: nn.Module, example_inputs: Any, *, check_inputs: Any = None) -> bytes:
    """The model as ONNX (dynamic batch size), checked: onnxruntime's outputs on
    `check_inputs` (default: the example inputs, doubled) match torch's (ONNX_TOLERANCE)."""
    _require_onnx()
    import onnxruntime

    model = model.cpu().eval()
    args, kwargs = _as_args(_twice(example_inputs))
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({k: {0: batch} for k in kwargs} if kwargs
               else tuple({0: batch} for _ in args))  # fmt: skip
    with _quiet():
        program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True,
                                    dynamic_shapes=dynamic, verbose=False)  # fmt: skip
    data = program.model_proto.SerializeToString()
    check = _twice(example_inputs) if check_inputs is None else to_device(check_inputs, "cpu")
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _leaves(check), strict=True)}
    with torch.no_grad():
        expected = _leaves(call_model(model, check))
    got = session.run(None, feeds)
    for want, have in zip(expected, got, strict=True):
        if not torch.allclose(torch.from_numpy(have), want, **ONNX_TOLERANCE):
            diff = (torch.from_numpy(have) - want).abs().max().item()
            raise ExportError(f"the ONNX model's outputs differ from torch's by up to {diff:.3g} "
                              f"(tolerance {ONNX_TOLERANCE})")  # fmt: skip
    return data


def export_onnx(source: nn.Module | str | Path, path: str | Path, *,
                example_inputs: Any = None) -> Path:  # fmt: skip
    """Write `source` (a model, or an export directory: its loaded model) as ONNX at `path`,
    checked with onnxruntime. Without `example_inputs`, the export's recorded input shapes
    (random values) are used."""
    model = source if isinstance(source, nn.Module) else load_compressed(source)
    if example_inputs is None:
        if isinstance(source, nn.Module):
            raise ConfigError("export_onnx: give example_inputs for a model")
        manifest, _ = read_export(source)
        example_inputs = sample_inputs(manifest["inputs"])
    path = Path(path)
    atomic_write_bytes(path, onnx_bytes(model, example_inputs))
    return path


def describe_inputs(inputs: Any) -> Any:
    """Shapes and dtypes of (example) inputs, for the manifest."""
    if isinstance(inputs, torch.Tensor):
        return {"shape": list(inputs.shape), "dtype": dtype_name(inputs.dtype)}
    if isinstance(inputs, Mapping):
        return {"dict": {k: describe_inputs(v) for k, v in inputs.items()}}
    if isinstance(inputs, (tuple, list)):
        return {"tuple": [describe_inputs(v) for v in inputs]}
    return None


def sample_inputs(spec: Any, *, seed: int = 0) -> Any:
    """Inputs of the described shapes: floats standard normal, integers zero."""
    generator = torch.Generator().manual_seed(seed)

    def make(s: Any) -> Any:
        if "dict" in s:
            return {k: make(v) for k, v in s["dict"].items()}
        if "tuple" in s:
            return tuple(make(v) for v in s["tuple"])
        dtype = dtype_of(s["dtype"])
        if dtype.is_floating_point:
            return torch.randn(s["shape"], generator=generator).to(dtype)
        return torch.zeros(s["shape"], dtype=dtype)

    return make(spec)


# -- export_best ------------------------------------------------------------------------


def versions() -> dict[str, str]:
    from importlib import metadata

    from orchestrator.search import versions as study_versions

    found = study_versions()
    for dist in ("safetensors", "onnx", "onnxruntime", "onnxscript"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """The worker's thread count: the same float summation order as when it was scored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device(config: SearchConfig) -> torch.device:
    """Where the trial was scored: the workers' device (auto: a GPU only if they had one)."""
    from orchestrator.evaluate import pick_device

    w = config.workers
    if w.device == "auto":
        return pick_device("auto" if w.gpus_per_worker != 0 else "cpu")  # "auto" or > 0
    return pick_device(w.device)


@dataclass(frozen=True, kw_only=True)
class Exported:
    """One trial's export, in memory and checked; nothing written yet."""

    files: dict[str, bytes]  # file name -> bytes
    metric: float  # the loaded model's metric
    model: nn.Module  # the loaded model
    example_inputs: Any
    check_inputs: Any  # a validation batch's inputs


def _rebuild(config: SearchConfig, space: SearchSpace, task: Any, policy: Policy):
    """The scored model of `policy` (the driver's Evaluator, the worker's threads and
    device) and the float weights its quantizer got."""
    from orchestrator.evaluate import Evaluator, RecoverySettings

    evaluator = Evaluator(task, space, recovery=RecoverySettings(**config.recovery.model_dump()),
                          device=_device(config))  # fmt: skip
    keys = {w.key for layer in space.profile.layers for w in layer.weights}
    before: dict[str, torch.Tensor] = {}

    def snapshot(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        before.update({k: v.detach().clone() for k, v in model.state_dict().items() if k in keys})

    return evaluator, evaluator.compressed_model(policy, before_quantize=snapshot), before


def study_space(config: SearchConfig, run: RunRecord) -> tuple[Any, nn.Module, SearchSpace]:
    """The study's task, base model and space, as they are now: refused when the space is
    no longer the one the study searched."""
    from orchestrator.prepare import build_space

    task, base, space = build_space(config)
    if (run.space or {}).get("knobs") != space.to_dict()["knobs"]:
        raise ConfigError(f"the search space of task '{config.task}' differs from the one study "
                          f"'{run.study or '?'}' searched (its model or space changed); export "
                          "from a matching task")  # fmt: skip
    return task, base, space


def export_trial(config: SearchConfig, run: RunRecord, row: Any, *,
                 budget: Budget | None = None) -> Exported:  # fmt: skip
    """Rebuild trial `row` of a study, encode it, load the bytes back and check them."""
    task, base, space = study_space(config, run)
    try:
        policy = Policy.from_json(space, row.policy)
    except (SpaceError, ValueError) as exc:
        raise ConfigError(f"trial {row.trial}'s recorded policy is damaged: {exc}") from None
    cost = policy_cost(space, policy)
    # before issue 14 a study recorded the payload alone: its file_bytes is today's size
    if row.size_bytes != cost.size_bytes and file_bytes(int(row.size_bytes)) != cost.size_bytes:
        raise ConfigError(f"trial {row.trial} recorded {row.size_bytes} bytes but the cost model "
                          f"now says {cost.size_bytes}: task '{config.task}' changed")  # fmt: skip
    with _threads(int(config.workers.cpus_per_worker)):
        evaluator, scored, before = _rebuild(config, space, task, policy)
        acts = evaluator.activation_params(scored, policy)
        encoded = encode(scored, before, space, policy, layer_masks(space, policy, base))
        model_bytes, stored = model_file(encoded.tensors)
        if len(model_bytes) != cost.size_bytes:
            raise ExportError(f"internal: the model file takes {len(model_bytes)} bytes, the "
                              f"cost model counted {cost.size_bytes}")  # fmt: skip
        manifest = _manifest(config, space, policy, task, scored, encoded, model_bytes, stored)
        if acts:  # older readers never see the key unless a layer needs it
            manifest["activations"] = params_to_json(acts)
        tensors = unpack_file(_load_bytes(model_bytes), stored)
        loaded = _assemble(manifest, tensors, base=base, space=space)
        _same_state(loaded, encoded.state)
        metric = float(task.metric(loaded.to(evaluator.device), evaluator.validation))
    loaded.cpu()
    if not abs(metric - row.metric) <= METRIC_TOLERANCE:
        raise ExportError(f"the exported model of trial {row.trial} scores {metric:.6f} but the "
                          f"trial recorded {row.metric:.6f}: its evaluation does not reproduce "
                          "here (another device or thread count, or a nondeterministic task); "
                          "nothing was written")  # fmt: skip
    record = _policy_record(run, row, space, policy, cost, manifest, metric)
    record.update(task=config.task, budget=budget.describe() if budget else None)
    return Exported(files={MODEL_FILE: model_bytes, MANIFEST_FILE: _json_bytes(manifest),
                           POLICY_FILE: _json_bytes(record)},
                    metric=metric, model=loaded, example_inputs=task.example_inputs(),
                    check_inputs=evaluator.validation[0][0])  # fmt: skip


def _load_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def _same_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in model.state_dict().items():
        if not torch.equal(tensor.cpu(), state[key]):
            raise ExportError(f"internal: the loaded tensor {key} differs from the scored model's")


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _manifest(config: SearchConfig, space: SearchSpace, policy: Policy, task: Any,
              scored: nn.Module, encoded: Encoded, model_bytes: bytes,
              stored: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    payload = sum(t.numel() * t.element_size() for t in encoded.tensors.values())
    # what build_space needs to rebuild the task's model and plan (the loader's fallback)
    recorded = {k: v for k, v in config.to_dict().items() if k in LOADER_CONFIG_KEYS}
    return {
        "format": FORMAT,
        "model_file": MODEL_FILE,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "bytes": len(model_bytes),
        "payload_bytes": payload,
        "header_bytes": len(model_bytes) - payload,
        "task": config.task,
        "config": recorded,
        "pruning": space.pruning,
        "channels": dict(sorted(space.channel_counts(policy).items())),
        "architecture": architecture(scored),
        "inputs": describe_inputs(task.example_inputs()),
        "stored": stored,  # where each tensor lies in the model file's one entry
        **encoded.manifest,
    }


def _policy_record(run: RunRecord, row: Any, space: SearchSpace,
                   policy: Policy, cost: Any, manifest: Mapping[str, Any],
                   metric: float) -> dict[str, Any]:  # fmt: skip
    channels = {t["key"]: t["shape"] for t in manifest["tensors"]}
    layers = []
    acts = layer_act_bits(space, policy)
    for entry, info in zip(manifest["layers"], space.profile.layers, strict=True):
        first = info.weights[0]
        layers.append({
            "layer": entry["name"], "kind": entry["kind"], BITS.name: entry[BITS.name],
            ACT_BITS.name: acts.get(info.name, FLOAT_BITS),
            "channels": channels[first.key][0], "channels_of": first.shape[0],
            "weights": entry["kept"], "weights_of": info.numel,
            "encoding": entry["encoding"], "bytes": entry["bytes"],
        })  # fmt: skip
    groups = {g.name: {"kept": manifest["channels"].get(g.name, g.channels), "of": g.channels,
                       "unit": g.unit} for g in (space.plan.groups if space.plan else ())}  # fmt: skip
    return {
        "format": POLICY_FORMAT,
        "study": run.study,
        "trial": int(row.trial),
        "policy": dict(policy.items_),
        "policy_hash": policy.hash,
        "layers": layers,
        "groups": groups,
        "predicted": cost.as_dict(),
        "metric": float(row.metric),
        "verified_metric": metric,
        "base": run.base.model_dump(exclude_unset=True),  # as run.json holds it
        "model_file": {"name": MODEL_FILE, **{k: manifest[k] for k in MODEL_FIELDS}},
        "versions": versions(),
    }


def export_best(
    study_dir: str | Path,
    *,
    budget: str | None = None,
    trial: int | None = None,
    out: str | Path | None = None,
    onnx: bool = False,
    format: str | None = None,
    accept_latency: bool = False,
) -> Path:
    """Export the best trial of a study within `budget` (default: the study's budget, else
    the best metric overall; ties: the smaller model), or trial number `trial`.

    Writes policy.json, model.safetensors and manifest.json (and model.onnx with `onnx`)
    to `out` (default `<study_dir>/export/`) and returns that directory. `format` "onnx"
    (the default for a study of the onnxruntime target) writes model.onnx, the trial's
    ONNX file with integer weights, and policy.json (orchestrator/export_onnx.py);
    `accept_latency` writes it even where its latency here disagrees with the trial's.
    Refusals raise ConfigError (one line) and write nothing; so does a failed check
    (ExportError)."""
    study_dir = Path(study_dir)
    run, trials = read_study(study_dir, needs=("config",))
    try:
        config = make_config(run.config)
    except ConfigError as exc:
        raise ConfigError(f"study '{study_dir}' is damaged: run.json's config: {exc}") from None
    # the study's budget picks the best; a named trial is checked only against --budget
    limits = _budget(budget, config) if trial is None or budget is not None else Budget()
    study = run.study or study_dir.name
    row = choose_trial(trials, limits, trial=trial, study=study)
    target = Path(out) if out is not None else study_dir / "export"
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out '{target}' is a file; give a directory")
    if check_format(format, config) == "onnx":
        task, base, space = study_space(config, run)
        with _threads(int(config.workers.cpus_per_worker)):
            data, record = export_onnx_trial(config, run, row, space, task, base, budget=limits,
                                             device=_device(config),
                                             accept_latency=accept_latency)  # fmt: skip
        record["model_file"]["name"] = ONNX_FILE
        record["versions"] = versions()
        _write(target, {ONNX_FILE: data, POLICY_FILE: _json_bytes(record)},
               stale=(MODEL_FILE, MANIFEST_FILE))  # fmt: skip
        _record_export(study_dir, target, row, config, study=study, found={
            "format": "onnx", "model_file": ONNX_FILE, "file_bytes": len(data),
            "artifact_metric": record["artifact_metric"], "metric_measured_in": "onnxruntime",
            "artifact_latency_ms": record["latency_ms"]})  # fmt: skip
        return target
    if onnx:
        _require_onnx()
    exported = export_trial(config, run, row, budget=limits)
    files = dict(exported.files)
    if onnx:
        files[ONNX_FILE] = onnx_bytes(exported.model, exported.example_inputs,
                                      check_inputs=exported.check_inputs)  # fmt: skip
    _write(target, files, stale=() if onnx else (ONNX_FILE,))
    _record_export(study_dir, target, row, config, study=study, found={
        "format": "safetensors", "model_file": MODEL_FILE, "file_bytes": len(files[MODEL_FILE]),
        "artifact_metric": exported.metric, "metric_measured_in": "torch (load_compressed)",
        "artifact_latency_ms": None})  # fmt: skip
    return target


def _write(target: Path, files: Mapping[str, bytes], *, stale: tuple[str, ...]) -> None:
    """The files, each atomically; `stale`: another export's files, removed."""
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(target / name, data)
    for name in stale:  # never leave another export's model beside this one
        (target / name).unlink(missing_ok=True)


# -- what each export found: the parity records ----------------------------------------


def export_record_path(study_dir: Path, trial: int, format: str) -> Path:
    return study_dir / EXPORTS_DIR / f"trial-{trial}-{format}.json"


def _record_export(study_dir: Path, target: Path, row: Any, config: SearchConfig, *,
                   study: str, found: Mapping[str, Any]) -> None:  # fmt: skip
    """Note in the study directory what this export found (`found`: the export's format,
    model file and its bytes, the artifact's metric and where it was measured, its latency
    if measured) beside what the trial recorded: issue 15, point 6, the parity table of
    `prunesearch report`. The export's own files stay timestamp-free; this record holds the
    time. A study directory that cannot be written (read-only) keeps no record: the export
    has succeeded, so that is a warning, not an error."""
    out = target.resolve()
    with contextlib.suppress(ValueError):  # inside the study: relative (a bucket's copy too)
        out = out.relative_to(study_dir.resolve())
    record = {
        "record": RECORD_FORMAT, "study": study, "trial": int(row.trial),
        "target": config.target, "out": str(out),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metric": float(row.metric), "size_bytes": int(row.size_bytes),
        "latency_ms": _present(getattr(row, "latency_ms", None)),
        **found,
        "artifact_metric": float(found["artifact_metric"]),
        "artifact_latency_ms": _present(found["artifact_latency_ms"]),
    }  # fmt: skip
    path = export_record_path(study_dir, record["trial"], found["format"])
    try:
        path.parent.mkdir(exist_ok=True)
        atomic_write_json(path, record)
    except OSError as exc:
        log = logging.getLogger(__name__)
        log.warning("export written, but its parity record was not: %s (%s)", path, exc)


def _present(value: Any) -> float | None:
    return None if value is None or value != value else float(value)  # NaN: not measured


def read_export_records(study_dir: str | Path) -> list[dict[str, Any]]:
    """Every export's record of a study (`exports/trial-<N>-<format>.json`), sorted by trial
    then format; [] when nothing was exported. A record that does not read raises
    ConfigError naming the file."""
    found = []
    for path in sorted((Path(study_dir) / EXPORTS_DIR).glob("trial-*.json")):
        try:
            record = json.loads(path.read_text())
            if record.get("record") != RECORD_FORMAT:
                raise ValueError(f"record {record.get('record')!r}, expected {RECORD_FORMAT!r}")
            if not isinstance(record["trial"], int) or not isinstance(record["format"], str):
                raise ValueError("its 'trial' is not a number or its 'format' not a name")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"export record '{path}' is damaged: {exc}; delete it or export "
                              "that trial again") from None  # fmt: skip
        found.append(record)
    return sorted(found, key=lambda r: (r["trial"], r["format"]))
