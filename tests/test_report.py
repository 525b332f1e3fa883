"""`prunesearch report`: PNG, HTML and markdown of a real study (real Ray, SQLite, Parquet),
the chosen trial, and the refusals (exit 2, one line, nothing written)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.budget import Budget, parse_budget
from orchestrator.cli import main
from orchestrator.config import make_config
from orchestrator.prepare import build_space
from orchestrator.report import FILES, baseline_label, choose_trial, layer_rows
from orchestrator.search import run_search
from search_spaces import SearchSpace

pytest.importorskip("matplotlib")
pytest.importorskip("plotly")

BUDGET = "size=20KB"
PNG_BYTES = (20_000, 2_000_000)


@pytest.fixture(scope="module")
def study(ray_cluster, tmp_path_factory):
    """A real 10-trial digits-cnn study with a size budget: some baselines over it."""
    out = tmp_path_factory.mktemp("report")
    config = make_config({"out": str(out), "study": "s", "task": "digits-cnn", "trials": 10,
                          "seed": 1, "budget": BUDGET, "workers": {"count": 2}})  # fmt: skip
    run_search(config)
    return config, out / "s"


def _cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def report(study):
    _, study_dir = study
    code, stdout, stderr = _cli("report", str(study_dir))
    assert code == 0, stderr
    return study_dir, stdout


def _front(study_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(study_dir / "pareto.parquet")


def _trials(study_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(study_dir / "trials")


def _check_png(path: Path) -> tuple[int, int]:
    from PIL import Image

    assert PNG_BYTES[0] <= path.stat().st_size <= PNG_BYTES[1], path.stat().st_size
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        image.load()  # decodes every pixel: a torn file fails here
        width, height = image.size
    assert 800 <= width <= 4000 and 500 <= height <= 3000, (width, height)
    return width, height


def test_report_writes_valid_pngs_html_and_markdown(report):
    study_dir, stdout = report
    assert stdout.split() == [str(study_dir / name) for name in FILES]
    _check_png(study_dir / "report.png")
    _check_png(study_dir / "report-policy.png")

    page = (study_dir / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # self-contained: plotly.js inline, nothing loaded from elsewhere
    assert not re.search(r"<script[^>]+src=", page) and "Plotly.newPlot" in page
    rows = set(re.findall(r'data-trial="(\d+)" data-role="(front|baseline)"', page))
    front, trials = _front(study_dir), _trials(study_dir)
    baselines = trials[trials["origin"] == "baseline"]
    assert len(baselines) == 4  # float, 8, 4, 2 bits
    assert {(str(t), "front") for t in front["trial"]} <= rows
    assert {(str(t), "baseline") for t in baselines["trial"]} <= rows
    assert "size budget 20.00 KB" in page  # the budget line's label

    md = (study_dir / "report.md").read_text()
    for r in front.itertuples():
        assert re.search(rf"^\| {r.trial} \| .* \| {r.metric:.4f} \|", md, re.M), r.trial
    chosen = choose_trial(trials, parse_budget(BUDGET))
    assert f"trial {chosen['trial']}, metric {chosen['metric']:.4f}" in md
    assert "within budget (size <= 20.00 KB)" in md
    assert f"optuna-dashboard sqlite:///{study_dir.resolve()}/study.db" in md
    assert "pip install optuna-dashboard" in md


def test_chosen_trial_is_the_best_within_budget(report):
    study_dir, _ = report
    trials = _trials(study_dir)
    chosen = choose_trial(trials, parse_budget(BUDGET))
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"]]
    assert chosen["size_bytes"] <= 20_000
    assert chosen["metric"] == ok["metric"].max()
    assert chosen["size_bytes"] == ok.loc[ok["metric"] == ok["metric"].max(), "size_bytes"].min()


def test_policy_rows_match_what_the_space_builds(study):
    """Bits and keep by layer, read from run.json alone, agree with the real SearchSpace."""
    config, study_dir = study
    _, _, space = build_space(config)
    run = json.loads((study_dir / "run.json").read_text())
    for row in _trials(study_dir).itertuples():
        values = json.loads(row.policy)
        rows = {r.name: r for r in layer_rows(SearchSpace.from_dict(run["space"]), values)}
        assert list(rows) == [layer.name for layer in space.profile.layers]
        assert {n: r.bits for n, r in rows.items()} == space.layer_bits(values)
        counts = space.channel_counts(values)
        for group, kept in counts.items():  # structured: the root layer's outputs kept
            assert rows[group].keep == kept / space.plan.group(group).channels
        uncut = set(rows) - set(counts)
        assert all(rows[n].keep == 1.0 for n in uncut)  # e.g. the logits layer


def test_report_out_dir_and_a_study_without_budget(study, tmp_path):
    _, study_dir = study
    copy = tmp_path / "nobudget"
    shutil.copytree(study_dir, copy)
    for name in FILES:
        (copy / name).unlink(missing_ok=True)
    run = json.loads((copy / "run.json").read_text())
    run["budget"], run["config"]["budget"] = {"metric_floor": None}, None
    (copy / "run.json").write_text(json.dumps(run))

    code, stdout, stderr = _cli("report", str(copy), "--out", str(tmp_path / "out" / "r"))
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "out" / "r").iterdir()) == sorted(FILES)
    assert not any((copy / name).exists() for name in FILES)  # only --out is written
    page = (tmp_path / "out" / "r" / "report.html").read_text()
    md = (tmp_path / "out" / "r" / "report.md").read_text()
    assert "size budget" not in page and "budget: none" in md
    chosen = choose_trial(_trials(copy), Budget())
    assert f"best metric overall: trial {chosen['trial']}," in md


def _parity_rows(md: str) -> list[list[str]]:
    """The parity table's rows of report.md (header and rule left out)."""
    section = md.split("## Parity (exports)\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_parity_table_shows_what_each_export_found(study, tmp_path):
    """Issue 15, point 6, end to end: a real study, no export yet (the table says so), then
    a quantized trial exported as ONNX (integer initializers) and as safetensors; the
    report's parity rows are the records the exports left, beside the metric and size the
    study's Parquet holds for that trial."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    _, study_dir = study
    copy = tmp_path / "s"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("report*", "export*"))
    code, _, stderr = _cli("report", str(copy))
    assert code == 0, stderr
    md = (copy / "report.md").read_text()
    assert f"No exports yet: `prunesearch export {copy}`." in md and not _parity_rows(md)
    assert "No exports yet" in (copy / "report.html").read_text()

    trials = pd.read_parquet(copy / "trials")
    done = trials[trials["state"] == "COMPLETE"]
    quantized = done[[any(k.startswith("bits:") and v < 32 for k, v in json.loads(p).items())
                      for p in done["policy"]]]  # fmt: skip
    row = quantized.sort_values(["size_bytes", "trial"]).iloc[0]
    trial = int(row["trial"])
    for fmt in ("onnx", "safetensors"):  # written in this order, listed sorted either way
        code, _, stderr = _cli("export", str(copy), "--trial", str(trial), "--format", fmt,
                               "--out", str(tmp_path / fmt))  # fmt: skip
        assert code == 0, stderr
    proto = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    integer = [numpy_helper.to_array(t) for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)]  # fmt: skip
    assert integer and {a.dtype.name for a in integer} <= {"int8", "int4"}
    # symmetric codes: |code| <= 2^(bits-1) - 1 of the container's bits
    assert all(abs(a.astype("int16")).max() <= (7 if a.dtype.name == "int4" else 127)
               for a in integer)  # fmt: skip

    code, _, stderr = _cli("report", str(copy))
    assert code == 0, stderr
    md = (copy / "report.md").read_text()
    assert "No exports yet" not in md
    rows = _parity_rows(md)
    assert [(r[0], r[1]) for r in rows] == [(str(trial), "onnx"), (str(trial), "safetensors")]
    for cells in rows:
        record = json.loads((copy / "exports" / f"trial-{trial}-{cells[1]}.json").read_text())
        assert record["metric"] == row["metric"] and record["size_bytes"] == row["size_bytes"]
        assert float(cells[2]) == pytest.approx(row["metric"], abs=5e-7)
        assert float(cells[3]) == pytest.approx(record["artifact_metric"], abs=5e-7)
        assert float(cells[4]) == pytest.approx(record["artifact_metric"] - row["metric"],
                                                rel=1e-2, abs=1e-12)  # fmt: skip
        assert int(cells[5].replace(",", "")) == row["size_bytes"]
        written = tmp_path / cells[1] / record["model_file"]
        assert int(cells[6].replace(",", "")) == record["file_bytes"] == written.stat().st_size
        assert cells[9] == str((tmp_path / cells[1]).resolve()) == record["out"]
        assert datetime.fromisoformat(record["exported_at"]).tzinfo is not None
    onnx_record, safetensors_record = (
        json.loads((copy / "exports" / f"trial-{trial}-{f}.json").read_text())
        for f in ("onnx", "safetensors"))  # fmt: skip
    # safetensors: the loaded model scores the recorded metric and the file is size_bytes
    assert safetensors_record["artifact_metric"] == pytest.approx(row["metric"], abs=1e-9)
    assert safetensors_record["file_bytes"] == row["size_bytes"]
    assert safetensors_record["artifact_latency_ms"] is None and rows[1][8] == "-"
    # onnx: measured in ONNX Runtime, with its latency
    assert onnx_record["metric_measured_in"] == "onnxruntime"
    assert onnx_record["artifact_latency_ms"] > 0 and rows[0][8].endswith(" ms")
    page = (copy / "report.html").read_text()
    assert page.count(f'data-trial="{trial}" data-role="parity"') == 2


def test_choose_trial_rules():
    def frame(*rows):
        cols = ["trial", "state", "feasible", "metric", "size_bytes"]
        return pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])

    trials = frame((0, "COMPLETE", True, 0.90, 500), (1, "COMPLETE", True, 0.95, 900),
                   (2, "COMPLETE", True, 0.95, 800), (3, "COMPLETE", True, 0.99, 5000),
                   (4, "PRUNED", True, 0.99, 50), (5, "INFEASIBLE", False, None, 9000),
                   (6, "COMPLETE", True, 0.80, 100))  # fmt: skip
    within = Budget(size_bytes=1000)
    assert choose_trial(trials, within)["trial"] == 2  # best metric; tie: the smaller model
    assert choose_trial(trials, Budget())["trial"] == 3  # no budget: best metric overall
    floor = Budget(size_bytes=1000, metric_floor=0.9)
    assert choose_trial(trials, floor)["trial"] == 0  # the smallest keeping the floor
    assert choose_trial(trials, Budget(size_bytes=10)) is None


def test_baseline_labels():
    assert baseline_label({"bits:a": 32, "keep:a": 1.0}) == "float"
    assert baseline_label({"bits:a": 4, "bits:b": 2, "keep:a": 1.0}) == "uniform 2-bit"
    assert baseline_label({"bits:a": 8, "keep:a": 0.5}) == "uniform 8-bit, keep 0.5"


# -- refusals: exit 2, one line, nothing written -------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _part(study_dir: Path) -> Path:
    return sorted((study_dir / "trials").glob("part-*.parquet"))[0]


def _no_complete(study_dir: Path) -> None:
    for part in (study_dir / "trials").glob("part-*.parquet"):
        part.unlink()
    (study_dir / "pareto.parquet").unlink()


DAMAGE = {
    "empty directory": (lambda d: shutil.rmtree(d) or d.mkdir(), "not a prunesearch study"),
    "foreign run.json": (lambda d: (d / "run.json").write_text('{"format": "other/1"}'),
                         "not a prunesearch study"),
    "run.json not JSON": (lambda d: _truncate(d / "run.json"), "run.json' is damaged"),
    "run.json without space": (
        lambda d: (d / "run.json").write_text(json.dumps(
            {k: v for k, v in json.loads((d / "run.json").read_text()).items() if k != "space"})),
        "run.json' is damaged",
    ),
    "torn trial part": (lambda d: _truncate(_part(d)), "trials' is damaged"),
    "garbage pareto": (lambda d: (d / "pareto.parquet").write_bytes(b"PAR1 not parquet"),
                       "pareto.parquet' is damaged"),
    "no completed trial": (_no_complete, "no completed trial"),
    "damaged export record": (
        lambda d: (d / "exports").mkdir() or (d / "exports" / "trial-1-onnx.json").write_text("{"),
        "exports/trial-1-onnx.json' is damaged",
    ),
}  # fmt: skip


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_refusals_exit_2_with_one_line_and_write_nothing(study, tmp_path, case):
    _, study_dir = study
    copy = tmp_path / "s"
    shutil.copytree(study_dir, copy, ignore=shutil.ignore_patterns("report*"))
    damage, message = DAMAGE[case]
    damage(copy)
    before = _snapshot(tmp_path)
    code, stdout, stderr = _cli("report", str(copy), "--out", str(tmp_path / "out"))
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("prunesearch: error: "), stderr
    assert message in stderr
    assert _snapshot(tmp_path) == before  # nothing written, not even --out


def test_out_that_is_a_file_is_refused(study, tmp_path):
    _, study_dir = study
    target = tmp_path / "file"
    target.write_text("x")
    before = _snapshot(tmp_path)
    code, _, stderr = _cli("report", str(study_dir), "--out", str(target))
    assert code == 2 and "is a file" in stderr and stderr.count("\n") == 1
    assert _snapshot(tmp_path) == before


# -- the page in headless Chromium ---------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]  # fmt: skip
# the machine's network is closed: without the flags above Chromium keeps dialling out


def _run(cmd: list[str], timeout: int) -> str | None:
    """None when it worked, else why not (one line)."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(cmd[:3])}: {exc}"
    if done.returncode:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        said = next((ln for ln in lines if "rror" in ln), lines[-1] if lines else "?")
        return f"{' '.join(cmd[:3])}: exit {done.returncode}: {said}"
    return None


def _playwright(reasons: list[str]):
    with contextlib.suppress(ImportError):
        return importlib.import_module("playwright.sync_api")
    reason = _run([sys.executable, "-m", "pip", "install", "-q", "playwright"], 600)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("playwright.sync_api")
    except ImportError:
        reasons.append(reason or "playwright installed but not importable")
        return None


def _system_chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((p for p in map(shutil.which, names) if p), None)


def _install_chromium(reasons: list[str]) -> str | None:
    """Debian's chromium (the registries this machine reaches serve it), else none."""
    if _system_chromium():
        return _system_chromium()
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        reason = _run(["apt-get", "update", "-qq"], 600) or _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], 900
        )
        if reason:
            reasons.append(reason)
    else:
        reasons.append("no chromium on PATH and apt-get unavailable (or not root)")
    return _system_chromium()


@pytest.fixture(scope="module")
def browser():
    reasons: list[str] = []
    api = _playwright(reasons)
    if api is None:
        pytest.skip(f"no headless browser can be installed: {'; '.join(reasons)}")
    executable = _install_chromium(reasons)
    with api.sync_playwright() as pw:
        try:
            launched = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:
            if executable is not None:
                raise  # a browser is there: failing to start it is a failure, not a skip
            # no system chromium: Playwright's own build, where its download is allowed
            reason = _run([sys.executable, "-m", "playwright", "install", "chromium"], 600)
            try:
                launched = pw.chromium.launch(args=CHROMIUM_ARGS)
            except Exception:
                reasons += [reason or "", str(exc).splitlines()[0]]
                pytest.skip("no headless browser can be installed: "
                            + "; ".join(r for r in reasons if r))  # fmt: skip
        yield launched
        launched.close()


def test_html_loads_in_headless_chromium_without_errors(report, browser):
    study_dir, _ = report
    problems: list[str] = []
    requests: list[str] = []
    page = browser.new_page()
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)  # fmt: skip
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((study_dir / "report.html").resolve().as_uri(), wait_until="load")
    page.wait_for_function("() => document.getElementById('front')?._fullLayout !== undefined")

    traces = page.evaluate("() => document.getElementById('front').data.map("
                           "t => [t.name, (t.customdata || []).map(c => c[0])])")  # fmt: skip
    shown = {name: set(trials) for name, trials in traces}
    trials = _trials(study_dir)
    done_baselines = trials[(trials["origin"] == "baseline") & (trials["state"] == "COMPLETE")]
    assert shown["front"] == set(_front(study_dir)["trial"])
    assert shown["uniform baselines"] == set(done_baselines["trial"])
    shapes = page.evaluate("() => document.getElementById('front').layout.shapes"
                           ".map(s => [s.name, s.x0])")  # fmt: skip
    assert ["size budget", 20_000] in shapes

    # hovering a front point shows its trial
    first = int(_front(study_dir).sort_values("size_bytes")["trial"].iloc[0])
    names = [name for name, _ in traces]
    page.evaluate("([c]) => Plotly.Fx.hover('front', [{curveNumber: c, pointNumber: 0}])",
                  [names.index("front")])  # fmt: skip
    hover = page.evaluate("() => Array.from(document.querySelectorAll('#front .hovertext'))"
                          ".map(e => e.textContent).join(' ')")  # fmt: skip
    assert f"trial {first}" in hover and "bits:" in hover
    assert page.locator("#policy .main-svg").count() > 0  # the per-layer chart rendered
    page.close()
    assert problems == []
    assert all(url.startswith("file://") for url in requests), requests


def test_policy_rows_unstructured_ties_and_skipped_layers():
    layer = {"kind": "Linear", "weights": [], "uses": 1, "dtype_bytes": 4}
    space = SearchSpace.from_dict(
        {"pruning": "unstructured", "groups": [],
         "profile": {"layers": [{**layer, "name": n} for n in ("a", "b", "c")], "other_bytes": 0,
                     "has_batchnorm": False, "family": "mlp"},
         "knobs": [{"name": "bits:mid", "kind": "bits", "layers": ["a", "b"], "choices": [3, 32]},
                   {"name": "keep:mid", "kind": "keep", "layers": ["a", "b"],
                    "choices": [0.4, 1.0]}]})  # fmt: skip
    rows = layer_rows(space, {"bits:mid": 3, "keep:mid": 0.4})
    assert [(r.name, r.bits, r.keep, r.kept) for r in rows] == [
        ("a", 3, 0.4, ""),
        ("b", 3, 0.4, ""),
        ("c", 32, 1.0, ""),
    ]  # c: skipped, left float
    with pytest.raises(ValueError, match="no value for knob 'keep:mid'"):
        layer_rows(space, {"bits:mid": 3})
