"""`prunesearch report STUDY_DIR`: what a study found, as files a person opens.

`report.png` (the front: size against metric, uniform baselines, the base model, budget
lines, the chosen trial), `report.html` (the same, interactive: hovering a point shows
its trial and policy; one self-contained page, plotly.js inline, no network request),
`report-policy.png` (bits and keep by layer of the chosen policy) and `report.md`. Both
the page and the summary end with the parity table: per exported trial (the records
`prunesearch export` leaves in `<study>/exports/`), the recorded metric and size beside
the exported file's.

Everything is read and rendered in memory first and written only at the end, each file
to a temporary name and renamed, so a refusal (not a study, damaged files) writes
nothing and a crash never leaves a torn report.
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.atomic import atomic_write_bytes
from orchestrator.budget import Budget, format_bytes
from orchestrator.errors import ConfigError
from orchestrator.results import SCHEMA, compute_front, read_trials
from orchestrator.runrecord import BaseFigures, RunRecord, damaged, read_record
from search_spaces import SearchSpace
from search_spaces.kinds import BITS, KEEP, layer_bits, layer_keeps

FILES = {
    "report.png": "the front: model size against metric, every completed trial, the uniform "
    "baselines, the base model, budget lines and the chosen trial",
    "report.html": "the same front, interactive: hover a point for its trial, metric, size, "
    "MACs, BOPs and policy (self-contained, opens offline)",
    "report-policy.png": "the chosen policy by layer: weight bits and the share kept",
    "report.md": "this summary: the chosen policy, the front, the baselines, the exports' parity",
}
_RUN_NEEDS = ("config", "space", "budget")
_MAX_LABELLED = 30  # front points labelled with their trial number in the PNG


@dataclass(frozen=True, kw_only=True)
class Study:
    dir: Path
    name: str
    run: RunRecord
    trials: pd.DataFrame
    front: pd.DataFrame
    budget: Budget
    exports: list[dict[str, Any]]  # orchestrator.export.read_export_records, by (trial, format)

    @property
    def base(self) -> BaseFigures:
        return self.run.base

    @cached_property
    def space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.run.space)  # _read_run made sure it reads

    @property
    def baselines(self) -> pd.DataFrame:
        return self.trials[self.trials["origin"] == "baseline"].sort_values("size_bytes")


@dataclass(frozen=True, kw_only=True)
class LayerRow:
    """What the chosen policy does to one compressible layer."""

    name: str
    kind: str  # Conv2d, Linear, LSTM, ...
    bits: int  # 32: left in float
    keep: float  # structured: share of output channels kept; unstructured: of weights
    kept: str = ""  # structured: "kept/channels" of the output channels

    @property
    def keep_text(self) -> str:
        return f"{self.keep:.2f}" + (f" ({self.kept})" if self.kept else "")


# -- reading ------------------------------------------------------------------------------


def _read_run(study_dir: Path) -> RunRecord:
    """The run record, with what the report draws: a space that reads as the search's
    (knobs, layers) and the base model's size."""
    run = read_record(study_dir, needs=_RUN_NEEDS)
    try:
        SearchSpace.from_dict(run.space or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise damaged(study_dir / "run.json", "its 'space' has no knobs or layers") from None
    if run.base.size_bytes is None:
        raise damaged(study_dir / "run.json", "its 'base' has no size_bytes")
    return run


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        if path.name == "trials":
            trials = read_trials(path.parent)
            for text in trials["policy"].dropna():  # every policy must parse: hover shows it
                if not isinstance(json.loads(text), dict):
                    raise ValueError(f"policy {text[:40]!r} is not a JSON object")
            return trials
        return pq.read_table(path, schema=SCHEMA).to_pandas()
    except Exception as exc:
        raise damaged(path, f"{type(exc).__name__}: {exc}") from None


def load_study(study_dir: str | Path) -> Study:
    """A study directory read and checked, or ConfigError (one line) saying what is wrong."""
    study_dir = Path(study_dir)
    run = _read_run(study_dir)
    budget = run.budget.budget() if run.budget is not None else Budget()
    trials = _read_parquet(study_dir / "trials")
    # pareto.parquet is only checked: the front is recomputed from the trials, which a
    # crash between the two writes could leave one flush ahead of it.
    if (study_dir / "pareto.parquet").exists():
        _read_parquet(study_dir / "pareto.parquet")
    if not (trials["state"] == "COMPLETE").any():
        raise ConfigError(f"study '{study_dir}' has no completed trial to report yet; run or "
                          "resume it first")  # fmt: skip
    trials = trials.sort_values("trial").reset_index(drop=True)
    from orchestrator.export import read_export_records

    return Study(dir=study_dir, name=run.study or study_dir.name, run=run, trials=trials,
                 front=compute_front(trials), budget=budget,
                 exports=read_export_records(study_dir))  # fmt: skip


# -- the chosen trial ------------------------------------------------------------------


def choose_trial(trials: pd.DataFrame, budget: Budget, *, study: str = "") -> pd.Series | None:
    """The trial the study recommends, as `prunesearch export` picks it (one rule, kept in
    orchestrator.export.choose_trial): the best metric within the budget (ties: the
    smaller model, then the earlier trial); with a metric floor, the smallest model keeping
    it; with no budget, the best metric overall. None when no completed trial fits."""
    from orchestrator.export import choose_trial as pick

    try:
        row = pick(trials, budget, trial=None, study=study)
    except ConfigError:  # with trial=None: nothing completed fits the budget
        return None
    return trials[trials["trial"] == row.trial].iloc[0]


def layer_rows(space: SearchSpace, policy: Mapping[str, Any]) -> list[LayerRow]:
    """Bits and keep of every compressible layer under `policy`, read by the kinds' own
    code (search_spaces.kinds), as the search reads them."""
    missing = [k.name for k in space.knobs if k.name not in policy]
    if missing:
        raise ValueError(f"the policy has no value for knob '{missing[0]}'")
    bits, keeps = layer_bits(space, policy), layer_keeps(space, policy)
    return [LayerRow(name=layer.name, kind=layer.kind, bits=bits[layer.name],
                     keep=keeps[layer.name][0], kept=keeps[layer.name][1])
            for layer in space.profile.layers]  # fmt: skip


def _keep_meaning(space: SearchSpace) -> str:
    return {"structured": "output channels kept", "unstructured": "weights kept (mask)"}.get(
        space.pruning, "kept"
    )


# -- labels ------------------------------------------------------------------------------


def _bits_label(bits: int) -> str:
    return "float" if bits == BITS.reference else f"{bits}-bit"


def baseline_label(policy: Mapping[str, Any]) -> str:
    """'uniform 4-bit', 'float', ...: a uniform baseline named by its bits (and keep).
    Its fewest bits are the uniform target: layers a preset protects take the nearest
    choice they allow (orchestrator.proposals.baselines), e.g. 4 bits in a 2-bit one."""
    bits = {int(v) for k, v in policy.items() if k.startswith(f"{BITS.name}:")}
    keeps = {float(v) for k, v in policy.items() if k.startswith(f"{KEEP.name}:")}
    name = f"uniform {_bits_label(min(bits))}" if bits else "uniform"
    if keeps and keeps != {1.0}:
        name += f", keep {min(keeps):g}" if len(keeps) == 1 else ", pruned"
    return "float" if name == "uniform float" else name


def describe_budget(budget: Budget) -> str:
    parts = []
    if budget.size_bytes is not None:
        parts.append(f"size <= {format_bytes(budget.size_bytes)}")
    for field in ("macs", "bops"):
        if getattr(budget, field) is not None:
            parts.append(f"{field} <= {getattr(budget, field):,}")
    if budget.metric_floor is not None:
        parts.append(f"metric >= {budget.metric_floor:g}")
    return ", ".join(parts) or "none"


def _chosen_where(study: Study) -> str:
    if study.budget.metric_floor is not None:
        return f"smallest model within budget ({describe_budget(study.budget)})"
    if study.budget:
        return f"best metric within budget ({describe_budget(study.budget)})"
    return "best metric overall"


# -- the front as PNG ---------------------------------------------------------------------


def _groups(study: Study) -> dict[str, pd.DataFrame]:
    """The point sets both front pictures draw, by legend name."""
    done = study.trials[study.trials["state"] == "COMPLETE"]
    feasible = done["feasible"].astype(bool)
    on_front = done["trial"].isin(study.front["trial"])
    baselines = study.baselines[study.baselines["state"] == "COMPLETE"]
    return {
        "trials": done[feasible & ~on_front & (done["origin"] != "baseline")],
        "over budget (metric floor)": done[~feasible & (done["origin"] != "baseline")],
        "front": study.front.sort_values("size_bytes"),
        "uniform baselines": baselines,
    }


def render_front_png(study: Study, chosen: pd.Series | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    sets = _groups(study)
    styles = {
        "trials": {"color": "0.65", "s": 14, "marker": "o"},
        "over budget (metric floor)": {"color": "tab:red", "s": 18, "marker": "x"},
        "uniform baselines": {"color": "tab:orange", "s": 60, "marker": "D", "zorder": 4},
    }
    for name, style in styles.items():
        rows = sets[name]
        if not rows.empty:
            ax.scatter(rows["size_bytes"], rows["metric"], label=name, **style)
    front = sets["front"]
    ax.step(front["size_bytes"], front["metric"], where="post", color="tab:blue", lw=1.5,
            marker="o", ms=5, label="front", zorder=3)  # fmt: skip
    if len(front) <= _MAX_LABELLED:
        for r in front.itertuples():
            ax.annotate(str(r.trial), (r.size_bytes, r.metric), xytext=(3, -9),
                        textcoords="offset points", fontsize=7, color="tab:blue")  # fmt: skip
    for r in sets["uniform baselines"].itertuples():
        ax.annotate(baseline_label(json.loads(r.policy)), (r.size_bytes, r.metric),
                    xytext=(5, 4), textcoords="offset points", fontsize=8,
                    color="tab:orange")  # fmt: skip
    base = study.base
    if base.metric is not None:
        ax.scatter([base.size_bytes], [base.metric], marker="*", s=160, color="black",
                   label="base model", zorder=5)  # fmt: skip
    if chosen is not None:
        ax.scatter([chosen["size_bytes"]], [chosen["metric"]], s=260, facecolors="none",
                   edgecolors="tab:green", linewidths=2, zorder=6,
                   label=f"chosen: trial {int(chosen['trial'])}")  # fmt: skip
    _budget_lines_png(ax, study.budget)
    ax.set_xscale("log")
    ax.set_xlabel("model size (bytes, log scale)")
    ax.set_ylabel("metric (higher is better)")
    ax.set_title(f"{study.name}: size against metric ({len(study.trials)} trials; budget: "
                 f"{describe_budget(study.budget)})", fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _budget_lines_png(ax: Any, budget: Budget) -> None:
    if budget.size_bytes is not None:
        ax.axvline(budget.size_bytes, color="tab:red", ls="--", lw=1.2,
                   label=f"size budget {format_bytes(budget.size_bytes)}")  # fmt: skip
    if budget.metric_floor is not None:
        ax.axhline(budget.metric_floor, color="tab:purple", ls="--", lw=1.2,
                   label=f"metric floor {budget.metric_floor:g}")  # fmt: skip


# -- the chosen policy by layer as PNG ----------------------------------------------------


def render_policy_png(study: Study, chosen: pd.Series | None, rows: list[LayerRow]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    width = min(20.0, max(7.0, 0.55 * len(rows) + 3))
    fig = Figure(figsize=(width, 6), dpi=150, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    if chosen is None:
        fig.suptitle(f"{study.name}: no completed trial within the budget "
                     f"({describe_budget(study.budget)})")  # fmt: skip
    else:
        fig.suptitle(f"{study.name}: trial {int(chosen['trial'])} ({_chosen_where(study)}), "
                     f"metric {chosen['metric']:.4f} at {format_bytes(chosen['size_bytes'])}",
                     fontsize=10)  # fmt: skip
    x = range(len(rows))
    bits = [min(r.bits, 16) for r in rows]  # float drawn as a full bar, labelled 'float'
    colors = ["0.6" if r.bits == BITS.reference else "tab:blue" for r in rows]
    top.bar(x, bits, color=colors)
    for i, r in enumerate(rows):
        top.annotate(_bits_label(r.bits).removesuffix("-bit"), (i, bits[i]), ha="center",
                     va="bottom", fontsize=8)  # fmt: skip
    top.set_ylabel("weight bits")
    top.set_ylim(0, max(bits) * 1.2)
    bottom.bar(x, [r.keep for r in rows], color="tab:green")
    for i, r in enumerate(rows):
        bottom.annotate(r.keep_text, (i, r.keep), ha="center", va="bottom", fontsize=8)
    bottom.set_ylabel(_keep_meaning(study.space))
    bottom.set_ylim(0, 1.12)
    bottom.set_xticks(list(x), [f"{r.name}\n{r.kind}" for r in rows], fontsize=8,
                      rotation=90 if len(rows) > 12 else 0)  # fmt: skip
    for ax in (top, bottom):
        ax.grid(True, axis="y", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- the interactive page -------------------------------------------------------------------


def _hover_data(rows: pd.DataFrame) -> list[list[Any]]:
    out = []
    for r in rows.itertuples():
        policy = ", ".join(f"{k}={v:g}" for k, v in json.loads(r.policy).items())
        out.append([int(r.trial), format_bytes(r.size_bytes), f"{int(r.macs):,}",
                    f"{int(r.bops):,}", r.origin or "", _wrap(policy)])  # fmt: skip
    return out


def _wrap(text: str, width: int = 80) -> str:
    lines, line = [], ""
    for part in text.split(", "):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line = f"{line}, {part}" if line else part
    return "<br>".join([*lines, line])


_HOVER = ("<b>trial %{customdata[0]}</b><br>metric %{y:.4f}<br>size %{customdata[1]}"
          "<br>macs %{customdata[2]}<br>bops %{customdata[3]}<br>origin %{customdata[4]}"
          "<br>%{customdata[5]}<extra>%{fullData.name}</extra>")  # fmt: skip


def _front_figure(study: Study, chosen: pd.Series | None) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    sets = _groups(study)
    styles = {
        "trials": {"mode": "markers", "marker": {"color": "#a6a6a6", "size": 6}},
        "over budget (metric floor)": {"mode": "markers",
                                       "marker": {"color": "#d62728", "symbol": "x", "size": 7}},
        "front": {"mode": "lines+markers", "line": {"shape": "hv", "color": "#1f77b4"},
                  "marker": {"size": 8}},
        "uniform baselines": {"mode": "markers+text", "textposition": "top center",
                              "marker": {"color": "#ff7f0e", "symbol": "diamond", "size": 11}},
    }  # fmt: skip
    for name, style in styles.items():
        rows = sets[name]
        extra = {}
        if name == "uniform baselines":
            extra["text"] = [baseline_label(json.loads(p)) for p in rows["policy"]]
        fig.add_trace(go.Scatter(x=rows["size_bytes"].tolist(), y=rows["metric"].tolist(),
                                 name=name, customdata=_hover_data(rows), hovertemplate=_HOVER,
                                 **style, **extra))  # fmt: skip
    base = study.base
    if base.metric is not None:
        fig.add_trace(go.Scatter(x=[base.size_bytes], y=[base.metric], name="base model",
                                 mode="markers", marker={"symbol": "star", "size": 14,
                                                         "color": "black"},
                                 hovertemplate="base model (float)<br>metric %{y:.4f}<br>size "
                                 f"{format_bytes(base.size_bytes)}<extra></extra>"))  # fmt: skip
    if chosen is not None:
        fig.add_trace(go.Scatter(x=[chosen["size_bytes"]], y=[chosen["metric"]],
                                 name=f"chosen: trial {int(chosen['trial'])}", mode="markers",
                                 marker={"size": 20, "color": "rgba(0,0,0,0)",
                                         "line": {"color": "#2ca02c", "width": 3}},
                                 customdata=_hover_data(chosen.to_frame().T),
                                 hovertemplate=_HOVER))  # fmt: skip
    _budget_lines_html(fig, study.budget)
    fig.update_layout(
        title=f"{html.escape(study.name)}: size against metric (budget: "
        f"{html.escape(describe_budget(study.budget))})",
        xaxis={"type": "log", "title": {"text": "model size (bytes, log scale)"}},
        yaxis={"title": {"text": "metric (higher is better)"}},
        hovermode="closest", template="plotly_white", height=560,
    )  # fmt: skip
    return fig


def _budget_lines_html(fig: Any, budget: Budget) -> None:
    if budget.size_bytes is not None:
        fig.add_vline(x=budget.size_bytes, line={"color": "#d62728", "dash": "dash"},
                      name="size budget")  # fmt: skip
        # Annotations on a log axis take log10 of the position (add_vline's own would not).
        fig.add_annotation(x=math.log10(budget.size_bytes), y=1.0, yref="paper",
                           text=f"size budget {format_bytes(budget.size_bytes)}",
                           showarrow=False, xanchor="left", yanchor="bottom",
                           font={"color": "#d62728"})  # fmt: skip
    if budget.metric_floor is not None:
        fig.add_hline(y=budget.metric_floor, line={"color": "#9467bd", "dash": "dash"},
                      annotation_text=f"metric floor {budget.metric_floor:g}",
                      name="metric floor")  # fmt: skip


def _policy_figure(study: Study, rows: list[LayerRow]) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    names = [r.name for r in rows]
    fig.add_trace(go.Bar(x=names, y=[min(r.bits, 16) for r in rows], name="weight bits",
                         text=[_bits_label(r.bits) for r in rows],
                         hovertemplate="%{x}: %{text}<extra></extra>"), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Bar(x=names, y=[r.keep for r in rows], name=_keep_meaning(study.space),
                         text=[r.keep_text for r in rows],
                         hovertemplate="%{x}: %{y:.3f}<extra></extra>"), row=2, col=1)  # fmt: skip
    fig.update_yaxes(title_text="weight bits", range=[0, 18], row=1, col=1)
    fig.update_yaxes(title_text=_keep_meaning(study.space), range=[0, 1.1], row=2, col=1)
    fig.update_layout(template="plotly_white", height=480, showlegend=False,
                      title="chosen policy by layer")  # fmt: skip
    return fig


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1200px}}
table{{border-collapse:collapse;font-size:0.9em}}td,th{{border:1px solid #ccc;padding:2px 8px;
text-align:right}}th{{background:#f4f4f4}}code{{font-size:0.85em}}</style>
</head><body>
<h1>{title}</h1>
<p>{summary}</p>
{front_div}
<h2>Chosen policy</h2>
<p>{chosen}</p>
{policy_div}
<h2>Front</h2>
{front_table}
<h2>Uniform baselines</h2>
{baseline_table}
<h2>Parity (exports)</h2>
{parity}
<p>Open the whole study in optuna-dashboard: <code>pip install optuna-dashboard</code>, then
<code>optuna-dashboard {storage}</code>.</p>
</body></html>
"""


def _table(headers: list[str], rows: list[tuple[str, list[Any]]]) -> str:
    """rows: (data attributes, cells)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr {attrs}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                   + "</tr>" for attrs, cells in rows)  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(study: Study, chosen: pd.Series | None, rows: list[LayerRow]) -> str:
    config = {"displaylogo": False, "responsive": True}
    front_div = _front_figure(study, chosen).to_html(
        full_html=False, include_plotlyjs=True, config=config, div_id="front"
    )
    policy_div = ""
    if chosen is not None:
        policy_div = _policy_figure(study, rows).to_html(
            full_html=False, include_plotlyjs=False, config=config, div_id="policy"
        )
    front_rows = [(f'data-trial="{c[0]}" data-role="front"', c) for c in _front_cells(study)]
    baseline_rows = [(f'data-trial="{c[1]}" data-role="baseline"', c)
                     for c in _baseline_cells(study)]  # fmt: skip
    return _PAGE.format(
        title=html.escape(f"prunesearch report: {study.name}"),
        summary=html.escape(_summary_line(study)),
        front_div=front_div, policy_div=policy_div,
        chosen=html.escape(_chosen_line(study, chosen)),
        front_table=_table(_FRONT_HEADERS, front_rows),
        baseline_table=_table(_BASELINE_HEADERS, baseline_rows),
        parity=_parity_html(study),
        storage=html.escape(_storage(study)),
    )  # fmt: skip


# -- the markdown summary -------------------------------------------------------------------

_FRONT_HEADERS = ["trial", "size", "smaller", "metric", "vs base", "macs", "bops", "origin"]
_BASELINE_HEADERS = ["policy", "trial", "state", "size", "metric", "on front"]


def _front_cells(study: Study) -> list[list[Any]]:
    base_size, base_metric = study.base.size_bytes, study.base.metric
    cells = []
    for r in study.front.sort_values("size_bytes").itertuples():
        cells.append([int(r.trial), format_bytes(r.size_bytes),
                      f"{base_size / r.size_bytes:.1f}x" if base_size else "",
                      f"{r.metric:.4f}",
                      f"{r.metric - base_metric:+.4f}" if base_metric is not None else "",
                      f"{int(r.macs):,}", f"{int(r.bops):,}", r.origin or ""])  # fmt: skip
    return cells


def _baseline_cells(study: Study) -> list[list[Any]]:
    on_front = set(study.front["trial"])
    cells = []
    for r in study.baselines.itertuples():
        metric = f"{r.metric:.4f}" if r.state == "COMPLETE" else "-"
        cells.append([baseline_label(json.loads(r.policy)), int(r.trial), r.state,
                      format_bytes(r.size_bytes), metric,
                      "yes" if r.trial in on_front else ""])  # fmt: skip
    return cells


_PARITY_HEADERS = ["trial", "format", "recorded metric", "artifact metric", "difference",
                   "recorded size", "file size", "recorded latency", "artifact latency",
                   "exported to"]  # fmt: skip
_PARITY_NOTE = ("Recorded: the trial's row in the study's Parquet. Artifact: the exported file, "
                "measured by the export (`onnx`: in ONNX Runtime; `safetensors`: the model "
                "`load_compressed` reads back). A torch study records its safetensors file's "
                "size, so its `onnx` export's file size differs by design.")  # fmt: skip


def _no_exports(study: Study) -> str:
    return f"No exports yet: `prunesearch export {study.dir}`."


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _parity_cells(study: Study) -> list[list[Any]]:
    """One row per export record, as read (sorted by trial, then format)."""
    return [[r["trial"], r["format"], f"{r['metric']:.6f}", f"{r['artifact_metric']:.6f}",
             f"{r['artifact_metric'] - r['metric']:+.3g}", f"{r['size_bytes']:,}",
             f"{r['file_bytes']:,}", _ms(r.get("latency_ms")), _ms(r.get("artifact_latency_ms")),
             r["out"]] for r in study.exports]  # fmt: skip


def _parity_html(study: Study) -> str:
    if not study.exports:
        return f"<p>{html.escape(_no_exports(study))}</p>"
    rows = [(f'data-trial="{c[0]}" data-role="parity"', c) for c in _parity_cells(study)]
    return _table(_PARITY_HEADERS, rows) + f"<p>{html.escape(_PARITY_NOTE)}</p>"


def _md_table(headers: list[str], cells: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in cells]
    return "\n".join(lines)


def _summary_line(study: Study) -> str:
    run, base = study.run, study.base
    counts = study.trials["state"].value_counts()
    states = ", ".join(f"{n} {s}" for s, n in counts.items())
    metric = f", metric {base.metric:.4f}" if base.metric is not None else ""
    return (f"task {run.task}, objective {run.objective}, "
            f"sampler {run.sampler or '?'}; base model {format_bytes(base.size_bytes)}"
            f"{metric}; {len(study.trials)} trials ({states}); budget: "
            f"{describe_budget(study.budget)}")  # fmt: skip


def _chosen_line(study: Study, chosen: pd.Series | None) -> str:
    if chosen is None:
        return f"No completed trial within the budget ({describe_budget(study.budget)})."
    ratio = study.base.size_bytes / chosen["size_bytes"]
    return (f"{_chosen_where(study)}: trial {int(chosen['trial'])}, metric "
            f"{chosen['metric']:.4f} at {format_bytes(chosen['size_bytes'])} "
            f"({ratio:.1f}x smaller than the base model).")  # fmt: skip


def _storage(study: Study) -> str:
    return f"sqlite:///{(study.dir / 'study.db').resolve()}"


def render_markdown(study: Study, chosen: pd.Series | None, rows: list[LayerRow]) -> str:
    parts = [f"# prunesearch report: {study.name}", "", _summary_line(study) + ".", "",
             "## Chosen policy", "", _chosen_line(study, chosen)]  # fmt: skip
    if chosen is not None:
        layer_cells = [[r.name, r.kind, _bits_label(r.bits), r.keep_text] for r in rows]
        parts += ["", _md_table(["layer", "type", BITS.name, _keep_meaning(study.space)],
                                layer_cells),
                  "", f"Policy (`prunesearch eval --policy FILE` takes this JSON): "
                  f"`{chosen['policy']}`"]  # fmt: skip
    parts += ["", "## Front (size against metric)", "", _md_table(_FRONT_HEADERS, _front_cells(study)),
              "", "## Uniform baselines", "", _md_table(_BASELINE_HEADERS, _baseline_cells(study)),
              "", "## Parity (exports)", ""]  # fmt: skip
    if study.exports:
        parts += [_md_table(_PARITY_HEADERS, _parity_cells(study)), "", _PARITY_NOTE]
    else:
        parts.append(_no_exports(study))
    parts += ["", "## Files", ""]
    parts += [f"- `{name}`: {what}" for name, what in FILES.items()]
    parts += ["", "## Open the study in optuna-dashboard", "", "```bash",
              "pip install optuna-dashboard", f"optuna-dashboard {_storage(study)}", "```",
              "", "then open http://127.0.0.1:8080/ in a browser.", ""]  # fmt: skip
    return "\n".join(parts)


# -- all together ----------------------------------------------------------------------------


def _out_dir(study: Study, out: str | Path | None) -> Path:
    target = Path(out) if out is not None else study.dir
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--out '{target}' is a file; give a directory")
    return target


def write_report(study_dir: str | Path, *, out: str | Path | None = None) -> list[Path]:
    """Render the report of one study directory; returns the files written (in `out`,
    default the study directory). ConfigError (nothing written) for a bad study."""
    try:
        import matplotlib  # noqa: F401
        import plotly  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"prunesearch report needs matplotlib and plotly ({exc.name} is "
                          "missing); pip install 'prunesearch[report]'") from None  # fmt: skip
    study = load_study(study_dir)
    target = _out_dir(study, out)
    chosen = choose_trial(study.trials, study.budget, study=study.name)
    rows: list[LayerRow] = []
    if chosen is not None:
        try:
            rows = layer_rows(study.space, json.loads(chosen["policy"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise damaged(study.dir / "run.json", f"space against trial "
                          f"{int(chosen['trial'])}: {exc}") from None  # fmt: skip
    rendered = {
        "report.png": render_front_png(study, chosen),
        "report.html": render_html(study, chosen, rows).encode(),
        "report-policy.png": render_policy_png(study, chosen, rows),
        "report.md": render_markdown(study, chosen, rows).encode(),
    }
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in rendered.items():
        atomic_write_bytes(target / name, data)
        written.append(target / name)
    return written
