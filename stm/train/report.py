"""The ablation report of a sweep: each variant's outcome beside the paper's published
first-split error (``stm/paper_results.json``, which names its source), as a Markdown table in
the paper's layout (Table 2 / Table 3, or one row per variant of any other grid, matched to the
paper's row with the same model settings), a bar plot, and the rows as JSON.

It takes the grid and each variant's ``TrainConfig``: no Ray, no MLflow.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stm.config import ModelConfig, TrainConfig, with_changes
from stm.train.grids import BUILTIN, Grid, format_changes

PAPER_RESULTS = Path(__file__).resolve().parents[1] / "paper_results.json"
PAPER_DATASETS = {"ucf101": "UCF101", "hmdb51": "HMDB51"}
UCF_PAPER, HMDB_PAPER = "UCF101 (paper)", "HMDB51 (paper)"

ModelKey = tuple[str, ...]
PaperRow = dict[str, Any]  # a row of paper_results.json's tables
PaperMatch = tuple[str, PaperRow]  # (its table, the row)


@dataclass
class TrialRow:
    """One variant's outcome for the report."""

    variant: str
    status: str  # ok | failed | stopped (by ASHA) | not run
    reason: str = ""
    run_id: str = ""
    error: float | None = None  # 100 * (1 - score) of the latest evaluation, in %
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


# --- the paper's numbers ----------------------------------------------------------------------
def paper_results() -> dict[str, Any]:
    """The published first-split errors (``stm/paper_results.json``, which names its source)."""
    return json.loads(PAPER_RESULTS.read_text())


def _model_key(model: ModelConfig) -> ModelKey:
    """What identifies a paper row: the connection and the temporal design."""
    direction = model.direction if model.fusion != "none" else "-"
    init = model.temporal_init if model.temporal != "none" else "-"
    return model.fusion, direction, model.temporal, init, model.time_pool


def paper_rows_by_model(paper: Mapping[str, Any] | None = None) -> dict[ModelKey, PaperMatch]:
    """Model settings -> (table, paper row), for matching any variant to the paper."""
    tables = (paper or paper_results())["tables"]
    out: dict[ModelKey, PaperMatch] = {}
    for table, make in BUILTIN.items():
        rows = {r["key"]: r for r in tables[table]["rows"]}
        for v in make():
            key = _model_key(with_changes(ModelConfig(), v.changes))
            if v.name in rows and rows[v.name]["ucf101"] is not None:
                out.setdefault(key, (table, rows[v.name]))
    return out


@dataclass(frozen=True)
class PaperLookup:
    """The paper's numbers, read once per report, and the one rule that finds a variant's row:
    by name in the grid's own table, else by its model settings."""

    results: dict[str, Any]
    by_model: dict[ModelKey, PaperMatch]

    @classmethod
    def load(cls) -> PaperLookup:
        results = paper_results()
        return cls(results, paper_rows_by_model(results))

    def match(self, layout: str, variant: str, model: ModelConfig) -> PaperMatch | None:
        """(table, row) of the paper for ``variant``, or None."""
        if layout in BUILTIN:
            row = next((r for r in self.rows(layout) if r["key"] == variant), None)
            return (layout, row) if row is not None else None
        return self.by_model.get(_model_key(model))

    def rows(self, table: str) -> list[PaperRow]:
        return self.results["tables"][table]["rows"]


# --- the table ----------------------------------------------------------------------------------
def _fmt(value: float | None, uncertain: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" + ("?" if uncertain else "")


def _dataset(configs: Mapping[str, TrainConfig]) -> tuple[str, str]:
    """(source name, display name) of the data the sweep ran on."""
    from stm.data.shards import read_dataset_info

    data = next(iter(configs.values())).data
    try:
        source = str(read_dataset_info(data).get("source", "data"))
    except (FileNotFoundError, OSError, ValueError):
        source = "data"
    return source, PAPER_DATASETS.get(source, source)


def _ours(row: TrialRow) -> str:
    if row.status == "failed":
        return "failed"
    if row.status == "not run":
        return "not run"
    text = _fmt(row.error)
    return text + " (stopped)" if row.status == "stopped" else text


def _layout(grid: Grid, paper: PaperLookup) -> tuple[list[str], tuple[str, ...], str]:
    """The left-hand columns (headers, paper row fields) and the caption of the grid's table."""
    if grid.layout not in BUILTIN:
        title = f"Grid {grid.name}: classification error (%)."
        return ["variant", "changes", "paper row"], (), title
    if grid.layout == "table2":
        head = ["connection", "fusion", "direction", "Fig."]
        cells: tuple[str, ...] = ("connection", "fusion", "direction", "figure")
    else:
        head = ["case", "temporal init.", "pool time"]
        cells = ("case", "init", "pool_time")
    return head, cells, paper.results["tables"][grid.layout]["caption"]


def _left(grid: Grid, cells: tuple[str, ...], variant: str, match: PaperMatch | None) -> list[str]:
    """A row's left-hand cells: the paper's own for its tables, else the variant, its changes
    and the paper row it matches."""
    prow = match[1] if match else None
    if grid.layout in BUILTIN:
        return [str(prow[c]) if prow else variant for c in cells]
    changes = next((v.changes for v in grid.variants if v.name == variant), {})
    return [
        variant,
        format_changes(changes) or "—",
        f"{match[0]}: {match[1]['key']}" if match else "—",
    ]


def _footer(
    title: str, first: TrainConfig, shown: str, uncertain: bool, paper: PaperLookup
) -> list[str]:
    model = first.model
    foot = [
        "",
        f"**{title}**",
        "",
        f"Ours: 100 − fused video accuracy (%) of the latest evaluation on the test list of split "
        f"{first.split} of {shown} (`{first.data}`), {first.epochs} "
        f"epoch{'s' if first.epochs != 1 else ''}, "
        f"{model.appearance_arch} + {model.motion_arch} streams, "
        f"{first.test_frames} test frames ({first.test_mode}). "
        f"Paper: ResNet-50 appearance + ResNet-152 motion, ImageNet-initialised streams, "
        f"first split.",
    ]
    if uncertain:
        foot.append("")
        foot.append("`?`: " + paper.results["note_uncertain"])
    foot.append("")
    foot.append(f"Source of the paper's numbers: {paper.results['source']}")
    return foot


def report_table(
    grid: Grid,
    configs: Mapping[str, TrainConfig],
    rows: Sequence[TrialRow],
    paper: PaperLookup | None = None,
) -> str:
    """The ablation report in Markdown: the paper's rows and layout, our error beside the
    paper's for the same dataset."""
    paper = paper or PaperLookup.load()
    source, shown = _dataset(configs)
    first = next(iter(configs.values()))
    ours_header = f"ours: {shown} split {first.split}"
    head, cells, title = _layout(grid, paper)
    columns = [UCF_PAPER, HMDB_PAPER]
    if source == "ucf101":
        columns.insert(1, ours_header)
    else:
        columns.append(ours_header)
    header = head + columns + ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    uncertain_seen = False
    for row in rows:
        match = paper.match(grid.layout, row.variant, configs[row.variant].model)
        prow = match[1] if match else None
        unc = bool(prow and prow.get("uncertain"))
        uncertain_seen |= unc
        values = {
            UCF_PAPER: _fmt(prow["ucf101"] if prow else None, unc),
            HMDB_PAPER: _fmt(prow["hmdb51"] if prow else None, unc),
            ours_header: _ours(row),
        }
        notes = row.reason if row.status != "ok" else ""
        if prow and prow.get("note"):
            notes = "; ".join(n for n in (notes, "paper: " + prow["note"]) if n)
        cells_out = _left(grid, cells, row.variant, match) + [values[c] for c in columns]
        lines.append("| " + " | ".join(cells_out + [notes.replace("|", "/")]) + " |")
    foot = _footer(title, first, shown, uncertain_seen, paper)
    return "\n".join(lines + foot) + "\n"


# --- the plot -----------------------------------------------------------------------------------
def _paper_bars(
    grid: Grid, configs: Mapping[str, TrainConfig], rows: Sequence[TrialRow], paper: PaperLookup
) -> tuple[list[float], list[float], list[bool]]:
    """The paper's UCF101 and HMDB51 errors of each row (NaN: none) and whether each is
    uncertain."""
    nan = float("nan")
    ucf, hmdb, uncertain = [], [], []
    for r in rows:
        match = paper.match(grid.layout, r.variant, configs[r.variant].model)
        prow = match[1] if match else None
        uncertain.append(bool(prow and prow.get("uncertain")))
        ucf.append(prow["ucf101"] if prow and prow["ucf101"] is not None else nan)
        hmdb.append(prow["hmdb51"] if prow and prow["hmdb51"] is not None else nan)
    return ucf, hmdb, uncertain


def report_plot(
    grid: Grid,
    configs: Mapping[str, TrainConfig],
    rows: Sequence[TrialRow],
    path: str,
    *,
    sweep: str,
    paper: PaperLookup | None = None,
) -> None:
    """Grouped horizontal bars per variant: our error and the paper's (both datasets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    paper = paper or PaperLookup.load()
    _, shown = _dataset(configs)
    names = [r.variant for r in rows]
    ours = [r.error if r.error is not None else np.nan for r in rows]
    ucf, hmdb, uncertain = _paper_bars(grid, configs, rows, paper)
    y = np.arange(len(names))
    h = 0.27
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.55 * len(names)))
    ax.barh(y - h, ours, h, label=f"ours ({shown})", color="tab:blue")
    paper_bars = [
        ax.barh(y, ucf, h, label="paper UCF101", color="tab:orange"),
        ax.barh(y + h, hmdb, h, label="paper HMDB51", color="tab:green"),
    ]
    for bars in paper_bars:
        for patch, unsure in zip(bars.patches, uncertain):
            if unsure:  # a placement the text extraction does not confirm
                patch.set_hatch("//")
                patch.set_alpha(0.6)
    for i, r in enumerate(rows):
        if r.status in ("failed", "not run"):
            ax.text(0.5, i - h, r.status, va="center", fontsize=8, color="tab:red")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("error (%), lower is better")
    ax.set_title(f"{grid.name}: sweep {sweep}", fontsize=9)
    handles = [
        Patch(color="tab:blue", label=f"ours ({shown})"),
        Patch(color="tab:orange", label="paper UCF101"),
        Patch(color="tab:green", label="paper HMDB51"),
    ]
    if any(uncertain):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="uncertain"))
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    grid: Grid,
    configs: Mapping[str, TrainConfig],
    rows: Sequence[TrialRow],
    out_dir: str,
    *,
    sweep: str,
    parent_run_id: str,
) -> str:
    """ablation_report.md / .png / .json in the local folder ``out_dir``; returns the Markdown.

    Args:
        grid: the sweep's grid (its layout picks the paper's table).
        configs: variant -> its training config, in the grid's order.
        rows: each variant's outcome, in the order of the report.
        out_dir: an existing local folder.
        sweep: the sweep's name (the plot's title, the JSON).
        parent_run_id: the sweep's MLflow parent run (the JSON).
    """
    paper = PaperLookup.load()
    text = report_table(grid, configs, rows, paper)
    Path(out_dir, "ablation_report.md").write_text(text)
    plot = str(Path(out_dir, "ablation_report.png"))
    report_plot(grid, configs, rows, plot, sweep=sweep, paper=paper)
    data = {
        "sweep": sweep,
        "grid": grid.name,
        "parent_run_id": parent_run_id,
        "rows": [dataclasses.asdict(r) for r in rows],
    }
    Path(out_dir, "ablation_report.json").write_text(json.dumps(data, indent=1))
    return text
