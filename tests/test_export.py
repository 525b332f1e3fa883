"""prunesearch export: real short studies of every built-in task (real Ray, Optuna, Parquet),
exported trial by trial and loaded back.

Each export's model file is exactly the predicted size_bytes (tensors and header, on a
model of many small tensors and on torchvision's mobilenet_v3_small too), its loaded
model scores the recorded metric, exports are byte-identical, format-1 exports still
load, ONNX matches torch, and bad input is refused with one line and no file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import orchestrator
from orchestrator.batches import accuracy
from orchestrator.budget import format_bytes
from orchestrator.cli import main
from orchestrator.compress.codec import model_file, unpack_file
from orchestrator.config import make_config
from orchestrator.errors import ConfigError
from orchestrator.evaluate import Evaluator, RecoverySettings
from orchestrator.export import (
    FORMAT_1,
    MANIFEST_FILE,
    MODEL_FILE,
    ONNX_FILE,
    POLICY_FILE,
    export_best,
    export_onnx,
    export_trial,
    load_compressed,
)
from orchestrator.prepare import build_space
from orchestrator.results import SCHEMA, load_results
from orchestrator.runrecord import RunRecord
from orchestrator.search import run_search
from orchestrator.task import Task, resolve_task
from search_spaces.cost import FILE_ENTRY, FILE_FORMAT, file_bytes, header_bytes, policy_cost
from search_spaces.policy import Policy

TASKS = ("digits-cnn", "digits-resnet", "digits-lstm")
CNN_BUDGET = 30_000  # digits-cnn's study budget: the float and 8-bit baselines exceed it
EXPORT_FILES = {MODEL_FILE, MANIFEST_FILE, POLICY_FILE}


@pytest.fixture(scope="module")
def studies(ray_cluster, tmp_path_factory):
    """One short real search per built-in task (uniform baselines + sampled policies)."""
    out = tmp_path_factory.mktemp("studies")
    found = {}
    for task in TASKS:
        config = make_config({
            "task": task, "out": str(out), "study": task, "trials": 8, "seed": 1,
            "workers": {"count": 2, "gpus_per_worker": 0}, "seeding": False, "fidelity": {"enabled": False},
            "budget": f"size={CNN_BUDGET}B" if task == "digits-cnn" else None,
        })  # fmt: skip
        result = run_search(config)
        assert result.error is None
        found[task] = result.study_dir
    return found


@pytest.fixture(autouse=True)
def _one_thread():
    """Score as the workers did (one thread each): the same float summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _complete(study: Path) -> pd.DataFrame:
    trials = load_results(study)
    return trials[trials["state"] == "COMPLETE"]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("task", TASKS)
def test_every_trial_exports_at_its_predicted_size_and_metric(studies, tmp_path, task):
    done = _complete(studies[task])
    assert len(done) >= 4
    validation = resolve_task(task).validation()
    encodings = set()
    for row in done.itertuples():
        out = export_best(studies[task], trial=row.trial, out=tmp_path / str(row.trial))
        assert {p.name for p in out.iterdir()} == EXPORT_FILES
        manifest = _read_json(out / MANIFEST_FILE)
        size = (out / MODEL_FILE).stat().st_size
        # the file is exactly size_bytes: the tensors and the one entry's header
        assert size == row.size_bytes == manifest["bytes"]
        assert manifest["header_bytes"] == header_bytes(manifest["payload_bytes"]) <= 128
        assert size == manifest["payload_bytes"] + manifest["header_bytes"]
        encodings |= {layer["encoding"] for layer in manifest["layers"]}

        model = load_compressed(out)
        assert accuracy(model, validation) == pytest.approx(row.metric, abs=1e-9)
        assert sum(p.numel() for p in model.parameters()) == row.params  # physically smaller

        record = _read_json(out / POLICY_FILE)
        assert record["trial"] == row.trial and record["policy_hash"] == row.policy_hash
        assert record["policy"] == json.loads(row.policy)
        assert record["predicted"]["size_bytes"] == row.size_bytes
        assert record["predicted"]["macs"] == row.macs
        assert record["metric"] == row.metric == pytest.approx(record["verified_metric"])
        assert record["base"]["metric"] is not None
        assert {"torch", "safetensors", "prunesearch"} <= set(record["versions"])
        policy = json.loads(row.policy)
        for layer in record["layers"]:  # the per-layer table: bits and kept channels
            assert layer["bits"] == policy.get(f"bits:{layer['layer']}", 32)
            assert 1 <= layer["channels"] <= layer["channels_of"]
    assert encodings >= {"dense-packed"}


def test_default_export_is_the_best_within_the_study_budget(studies):
    done = _complete(studies["digits-cnn"])
    fits = done[done["size_bytes"] <= CNN_BUDGET]
    best = fits.sort_values(["metric", "size_bytes", "trial"], ascending=[False, True, True])
    out = export_best(studies["digits-cnn"])
    assert out == studies["digits-cnn"] / "export"
    record = _read_json(out / POLICY_FILE)
    assert record["trial"] == best.iloc[0]["trial"]
    assert record["budget"] == f"size={CNN_BUDGET}"


def test_budget_flag_and_no_budget(studies, tmp_path):
    done = _complete(studies["digits-resnet"])
    order = ["metric", "size_bytes", "trial"]
    best = done.sort_values(order, ascending=[False, True, True]).iloc[0]
    record = _read_json(export_best(studies["digits-resnet"], out=tmp_path / "a") / POLICY_FILE)
    assert record["trial"] == best["trial"] and record["budget"] is None

    limit = int(done["size_bytes"].median())
    fits = done[done["size_bytes"] <= limit].sort_values(order, ascending=[False, True, True])
    out = export_best(studies["digits-resnet"], budget=f"size={limit}B", out=tmp_path / "b")
    assert _read_json(out / POLICY_FILE)["trial"] == fits.iloc[0]["trial"]

    floor = float(done["metric"].min())  # a metric floor: the smallest model that keeps it
    keeps = done[done["metric"] >= floor].sort_values(["size_bytes", "metric", "trial"],
                                                      ascending=[True, False, True])  # fmt: skip
    out = export_best(studies["digits-resnet"], budget=f"metric>={floor!r}", out=tmp_path / "c")
    assert _read_json(out / POLICY_FILE)["trial"] == keeps.iloc[0]["trial"]


@pytest.mark.parametrize("task", TASKS)
def test_export_is_deterministic(studies, tmp_path, task):
    first = export_best(studies[task], out=tmp_path / "first")
    second = export_best(studies[task], out=tmp_path / "second")
    for name in EXPORT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("task", TASKS)
def test_onnx_matches_torch(studies, tmp_path, task):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    out = export_best(studies[task], out=tmp_path, onnx=True)
    model = load_compressed(out)
    inputs = resolve_task(task).validation()[1][0]  # a batch of 60: the batch size is dynamic
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    with torch.no_grad():
        want = model(inputs)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)
    if task == "digits-lstm":  # from the export directory alone: the manifest's input shapes
        path = export_onnx(out, tmp_path / "again.onnx")
        assert ort.InferenceSession(str(path)).get_inputs()[0].shape[1:] == [8, 8]


@pytest.mark.parametrize("task", ["digits-cnn", "digits-lstm"])
def test_packed_loading_dequantizes_on_the_fly(studies, tmp_path, task):
    done = _complete(studies[task])
    low = done[done["size_bytes"] == done["size_bytes"].min()].iloc[0]
    out = export_best(studies[task], trial=int(low["trial"]), out=tmp_path)
    plain, packed = load_compressed(out), load_compressed(out, packed=True)
    packed_layers = [e for e in _read_json(out / MANIFEST_FILE)["layers"]
                     if e["encoding"].endswith("packed")]  # fmt: skip
    assert packed_layers
    for entry in packed_layers:
        owner, _, attr = entry["weights"][0]["key"].rpartition(".")
        assert parametrize.is_parametrized(packed.get_submodule(owner), attr)
    assert any(b.dtype == torch.uint8 for b in packed.buffers())
    inputs = resolve_task(task).validation()[0][0]
    with torch.no_grad():
        assert torch.equal(packed(inputs), plain(inputs))


def test_builtin_models_need_their_task_to_load(studies, tmp_path):
    out = export_best(studies["digits-resnet"], out=tmp_path)
    manifest = _read_json(out / MANIFEST_FILE)
    assert manifest["architecture"] is None and manifest["task"] == "digits-resnet"
    manifest["task"] = manifest["config"]["task"] = "no_such_module:make_task"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="needs task 'no_such_module:make_task'"):
        load_compressed(out)


# -- a user task whose model is a plain nn.Sequential: it loads from the manifest alone --

SEQUENTIAL_TASK = "tests.test_export:sequential_task"


def sequential_task() -> Task:
    digits = resolve_task("digits-cnn")

    def model() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
            ).eval()  # fmt: skip

    return Task(name="sequential", model=model, example_inputs=digits.example_inputs,
                calibration=digits.calibration, validation=digits.validation)  # fmt: skip


@pytest.mark.parametrize("pruning, bits, keep, encoding", [
    ("unstructured", 32, 1.0, "dense-float"), ("unstructured", 8, 1.0, "dense-packed"),
    ("unstructured", 32, 0.2, "sparse-float"), ("unstructured", 4, 0.3, "sparse-packed"),
    ("structured", 4, 0.5, "dense-packed"),
])  # fmt: skip
def test_sequential_models_load_without_their_task(tmp_path, monkeypatch, pruning, bits, keep,
                                                   encoding):  # fmt: skip
    config = make_config({"task": SEQUENTIAL_TASK, "pruning": pruning})
    task, _, space = build_space(config)
    policy = Policy.uniform(space, bits, keep)
    cost = policy_cost(space, policy)
    evaluator = Evaluator(task, space, recovery=RecoverySettings())
    metric = evaluator.evaluate(policy)["metric"]
    row = SimpleNamespace(trial=0, policy=policy.to_json(), size_bytes=cost.size_bytes,
                          metric=metric)  # fmt: skip
    exported = export_trial(config, RunRecord(study="t", space=space.to_dict()), row)
    for name, data in exported.files.items():
        (tmp_path / name).write_bytes(data)
    manifest = _read_json(tmp_path / MANIFEST_FILE)
    assert manifest["architecture"] is not None
    assert (tmp_path / MODEL_FILE).stat().st_size == manifest["bytes"] == cost.size_bytes
    assert encoding in {layer["encoding"] for layer in manifest["layers"]}

    def no_task(spec):
        raise AssertionError("loading a plain nn.Sequential must not need its task")

    monkeypatch.setattr("orchestrator.prepare.resolve_task", no_task)
    model = load_compressed(tmp_path / MODEL_FILE)
    assert type(model) is nn.Sequential
    assert accuracy(model, task.validation()) == pytest.approx(metric, abs=1e-9)
    if pruning == "structured":  # the rebuilt architecture is the smaller one
        assert model[0].out_channels == 4 and model[5].in_features == 4 * 4 * 4


# -- the model file is exactly size_bytes, on a model of many small tensors --------------

MOBILE_TASK = "tests.test_export:mobile_task"


class _Inverted(nn.Module):
    """mobilenet_v2's inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, add."""

    def __init__(self, channels: int, expand: int) -> None:
        super().__init__()
        wide = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(),
            nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False), nn.BatchNorm2d(wide),
            nn.ReLU6(), nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class _Mobile(nn.Module):
    """A mobilenet-like model of 8x8 digits: 80 small tensors (BatchNorm statistics,
    depthwise kernels), the shape of model whose file an entry per tensor bloated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6())  # fmt: skip
        self.blocks = nn.Sequential(*(_Inverted(8, 2) for _ in range(4)))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def mobile_task() -> Task:
    digits = resolve_task("digits-cnn")

    def model() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _Mobile().eval()

    return Task(name="mobile", model=model, example_inputs=digits.example_inputs,
                calibration=digits.calibration, validation=digits.validation)  # fmt: skip


def _export(task_spec: str, pruning: str, policy_of) -> tuple[dict[str, bytes], int, Any]:
    """Export `policy_of(space)` of a task as export_best would: the files' bytes by name,
    the policy's predicted size_bytes and the export (its loaded model)."""
    config = make_config({"task": task_spec, "pruning": pruning})
    task, _, space = build_space(config)
    policy = policy_of(space)
    cost = policy_cost(space, policy)
    metric = Evaluator(task, space, recovery=RecoverySettings()).evaluate(policy)["metric"]
    row = SimpleNamespace(trial=0, policy=policy.to_json(), size_bytes=cost.size_bytes,
                          metric=metric)  # fmt: skip
    exported = export_trial(config, RunRecord(study="t", space=space.to_dict()), row)
    return exported.files, cost.size_bytes, exported


def _mixed(space):
    """Every knob at a different choice: bits and keep vary layer to layer."""
    return Policy.from_values(space, {k.name: k.choices[i % len(k.choices)]
                                      for i, k in enumerate(space.knobs)})  # fmt: skip


@pytest.mark.parametrize("pruning", ["structured", "unstructured"])
@pytest.mark.parametrize("policy_of", [
    lambda space: Policy.uniform(space, 32, 1.0), lambda space: Policy.uniform(space, 8, 1.0),
    lambda space: Policy.uniform(space, 4, 0.5), lambda space: Policy.uniform(space, 2, 0.25),
    _mixed,
], ids=["float", "8-bit", "4-bit-keep-0.5", "2-bit-keep-0.25", "mixed"])  # fmt: skip
def test_model_file_is_exactly_the_predicted_size(tmp_path, pruning, policy_of):
    """Issue 14: the file is size_bytes to the byte, however many tensors the model has;
    an entry per tensor (format 1) put ~80 bytes of header on each, here ~6.5 KB."""
    from safetensors.torch import save

    files, predicted, exported = _export(MOBILE_TASK, pruning, policy_of)
    assert len(files[MODEL_FILE]) == predicted
    manifest = json.loads(files[MANIFEST_FILE])
    assert manifest["format"] == FILE_FORMAT
    assert manifest["bytes"] == predicted == file_bytes(manifest["payload_bytes"])
    assert json.loads(files[POLICY_FILE])["predicted"]["size_bytes"] == predicted
    assert len(manifest["tensors"]) == 80
    assert len(manifest["stored"]) >= 80
    # what format 1 wrote: far more than 1% of header on a small model
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    per_tensor = save(unpack_file(_safetensors_load(files[MODEL_FILE]), manifest["stored"]))
    assert len(per_tensor) - manifest["payload_bytes"] > 60 * len(manifest["stored"])
    inputs = resolve_task("digits-cnn").validation()[0][0]
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path)(inputs), exported.model(inputs))


def _safetensors_load(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


@pytest.mark.parametrize("policy_of", [lambda space: Policy.uniform(space, 2, 0.25), _mixed],
                         ids=["2-bit-keep-0.25", "mixed"])  # fmt: skip
def test_torchvision_mobilenet_file_is_exactly_the_predicted_size(policy_of):
    """A real architecture: 244 state-dict tensors, once a 26.8 KB header on 137 KB."""
    pytest.importorskip("torchvision")
    files, predicted, _ = _export("orchestrator.tasks.vision:mobilenet_v3_small", "auto",
                                  policy_of)  # fmt: skip
    assert len(files[MODEL_FILE]) == predicted


def test_model_file_layout_round_trips_every_dtype():
    """One uint8 entry, each tensor aligned to its element size, byte for byte what
    safetensors writes, and back to the same tensors (dtypes, shapes, 0-dim ones)."""
    from safetensors.torch import save

    tensors = {
        "codes": torch.arange(13, dtype=torch.uint8), "w": torch.randn(3, 5),
        "half": torch.randn(7, dtype=torch.float16), "bf": torch.randn(2, 3, dtype=torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64), "flag": torch.tensor([True, False, True]),
        "double": torch.randn(2, dtype=torch.float64),
    }  # fmt: skip
    data, stored = model_file(tensors)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(data) == file_bytes(payload)
    assert data == save({FILE_ENTRY: torch.frombuffer(bytearray(data[-payload:]), dtype=torch.uint8)},
                        metadata={"format": FILE_FORMAT})  # fmt: skip
    end = 0
    for part in stored:
        begin, stop = part["data_offsets"]
        size = tensors[part["key"]].element_size()
        assert begin == end and begin % size == 0
        end = stop
    assert [p["key"] for p in stored] == ["count", "double", "w", "half", "bf", "codes", "flag"]
    back = unpack_file(_safetensors_load(data), stored)
    assert list(back) == [p["key"] for p in stored]
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_a_damaged_stored_index_is_refused():
    data, stored = model_file({"a": torch.zeros(4), "b": torch.zeros(3, dtype=torch.uint8)})
    entries = _safetensors_load(data)
    gap = [stored[0], {**stored[1], "data_offsets": [17, 20]}]
    with pytest.raises(ValueError, match="stored tensor b lies at 17..20"):
        unpack_file(entries, gap)
    short = [{**stored[0], "data_offsets": [0, 12]}, stored[1]]
    with pytest.raises(ValueError, match="stored tensor a lies at 0..12"):
        unpack_file(entries, short)
    with pytest.raises(ValueError, match="the model file holds 19"):
        unpack_file(entries, stored[:1])
    with pytest.raises(ValueError, match="one 1-D uint8 entry"):
        unpack_file({**entries, "other": torch.zeros(1)}, stored)


def test_format_1_exports_still_load(tmp_path):
    """An export of before issue 14 (an entry per tensor, no `stored` index) loads as it
    did, with the model it held."""
    from safetensors.torch import save

    files, _, exported = _export(MOBILE_TASK, "structured", _mixed)
    manifest = json.loads(files[MANIFEST_FILE])
    tensors = unpack_file(_safetensors_load(files[MODEL_FILE]), manifest.pop("stored"))
    old = save(tensors, metadata={"format": FORMAT_1})
    manifest.update(format=FORMAT_1, sha256=hashlib.sha256(old).hexdigest(), bytes=len(old))
    (tmp_path / MODEL_FILE).write_bytes(old)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    inputs = resolve_task("digits-cnn").validation()[0][0]
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path)(inputs), exported.model(inputs))
        assert torch.equal(load_compressed(tmp_path, packed=True)(inputs), exported.model(inputs))


# -- refusals: exit 2, one line, nothing written ---------------------------------------


def _refused(capsys, argv: list[str], *expected: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("prunesearch: error: "), captured.err
    assert captured.out == ""
    for text in expected:
        assert text in lines[0]
    return lines[0]


def _copy(study: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("export"))
    return copy


def test_nothing_within_budget_names_the_smallest(studies, tmp_path, capsys):
    study = _copy(studies["digits-lstm"], tmp_path)
    done = _complete(study)
    smallest = done.sort_values(["size_bytes", "metric"], ascending=[True, False]).iloc[0]
    _refused(capsys, ["export", str(study), "--budget", "size=100B"], "within budget size=100",
             f"trial {smallest['trial']}, {format_bytes(smallest['size_bytes'])} with metric "
             f"{smallest['metric']:.4f}")  # fmt: skip
    assert not (study / "export").exists()


def test_refusals(studies, tmp_path, capsys):
    study = _copy(studies["digits-cnn"], tmp_path)
    out = tmp_path / "out"
    _refused(capsys, ["export", str(tmp_path), "--out", str(out)], "not a prunesearch study")
    _refused(capsys, ["export", str(study), "--budget", "size=lots"], "--budget")
    _refused(capsys, ["export", str(study), "--trial", "999"], "--trial 999")
    _refused(capsys, ["export", str(study), "--trial", "x"], "--trial")
    infeasible = load_results(study).query("state == 'INFEASIBLE'")
    if not infeasible.empty:
        _refused(capsys, ["export", str(study), "--trial", str(infeasible["trial"].iloc[0])],
                 "is INFEASIBLE")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:  # as if the onnx extra were not installed
        patch.setitem(sys.modules, "onnxruntime", None)
        _refused(capsys, ["export", str(study), "--onnx", "--out", str(out)], "onnx extra")
    part = sorted((study / "trials").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    _refused(capsys, ["export", str(study), "--out", str(out)], "damaged")
    (study / "run.json").write_text("{")
    _refused(capsys, ["export", str(study), "--out", str(out)], "damaged")
    assert not out.exists() and not (study / "export").exists()


def test_a_metric_that_does_not_reproduce_writes_nothing(studies, tmp_path, capsys):
    """The loader check: the loaded model must score what the trial recorded (exit 1)."""
    study = _copy(studies["digits-cnn"], tmp_path)
    trial = int(_complete(study)["trial"].iloc[-1])
    for part in (study / "trials").glob("part-*.parquet"):
        frame = pq.read_table(part, schema=SCHEMA).to_pandas()
        frame.loc[frame["trial"] == trial, "metric"] -= 0.25
        pq.write_table(pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False), part)
    assert main(["export", str(study), "--trial", str(trial)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not reproduce" in err[0]
    assert not (study / "export").exists()


def test_cli_export_and_damaged_exports(studies, tmp_path, capsys):
    study = studies["digits-lstm"]
    trial = int(_complete(study)["trial"].iloc[0])
    out = tmp_path / "e"
    assert main(["export", str(study), "--trial", str(trial), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported trial {trial} of study digits-lstm" in printed
    assert str(out / MODEL_FILE) in printed and str(out / POLICY_FILE) in printed
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert orchestrator.load_compressed is load_compressed  # the public API
    assert orchestrator.export_best is export_best

    data = bytearray((out / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of a tensor
    (out / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="damaged"):
        load_compressed(out)
    (out / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match="not a prunesearch export"):
        load_compressed(out)


@pytest.mark.parametrize("task", TASKS)
def test_format_onnx_of_a_torch_study_stores_integer_weights(studies, tmp_path, task):
    """Issue 15, point 6: the torch target's ONNX export holds integer codes (2/3-bit in
    int4, 5..8-bit in int8) with per-row scales, at the ONNX cost model's size, with
    its ONNX Runtime metric beside the recorded one."""
    import onnx
    from onnx import numpy_helper

    done = _complete(studies[task])
    low = done[done["size_bytes"] == done["size_bytes"].min()].iloc[0]
    out = export_best(studies[task], trial=int(low["trial"]), out=tmp_path, format="onnx")
    assert {p.name for p in out.iterdir()} == {ONNX_FILE, POLICY_FILE}
    record = _read_json(out / POLICY_FILE)
    data = (out / ONNX_FILE).read_bytes()
    assert record["model_file"]["bytes"] == len(data) and record["target"] == "torch"
    proto = onnx.load_from_string(data)
    integer = [t for t in proto.graph.initializer if t.data_type in (3, 22)]  # int8, int4
    policy = json.loads(low["policy"])
    quantized = [k for k, v in policy.items() if k.startswith("bits:") and v < 32]
    assert quantized  # the smallest trial is a quantized one: the check below means something
    assert bool(integer) == bool(quantized)
    # each one made a weight: DequantizeLinear (a layer on 8-bit activations) or Cast + Mul
    made = [n for n in proto.graph.node if n.op_type in ("DequantizeLinear", "Cast")]
    assert sorted(n.input[0] for n in made) == sorted(t.name for t in integer)
    # the initializers read back as integers (onnx's own reader), symmetric codes in range
    for tensor in integer:
        codes = numpy_helper.to_array(tensor)
        assert codes.dtype.name == ("int8" if tensor.data_type == 3 else "int4")
        assert abs(codes.astype("int16")).max() <= (127 if tensor.data_type == 3 else 7)
    assert record["artifact_metric"] == pytest.approx(record["metric"], abs=0.02)
    # the study keeps what the export found, for `prunesearch report`'s parity table
    found = _read_json(studies[task] / "exports" / f"trial-{int(low['trial'])}-onnx.json")
    assert found["artifact_metric"] == record["artifact_metric"]
    assert found["metric"] == low["metric"] and found["size_bytes"] == low["size_bytes"]
    assert found["file_bytes"] == len(data) and found["out"] == str(tmp_path.resolve())


def test_an_unwritable_study_keeps_no_record_but_exports(studies, tmp_path, monkeypatch, caplog):
    """A study directory the export cannot write (read-only: simulated, as root writes
    anywhere) still gets its export; only the parity record is skipped, with a warning."""
    import orchestrator.export as export

    study = _copy(studies["digits-lstm"], tmp_path)
    shutil.rmtree(study / "exports", ignore_errors=True)
    trial = int(_complete(study)["trial"].iloc[0])

    def read_only(path, data):
        raise PermissionError(13, "Read-only file system", str(path))

    monkeypatch.setattr(export, "atomic_write_json", read_only)
    out = export_best(study, trial=trial, out=tmp_path / "out")
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert not list((study / "exports").glob("*.json"))
    assert "parity record was not" in caplog.text
