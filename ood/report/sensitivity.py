"""`ood-report`'s hyper-parameter sensitivity: the `sensitivity.jsonl` rows of the reported runs
(`detectors.sensitivity=true`: every grid point of a detector's search on every test set) as `sensitivity.csv`,
mean ± std over seeds per configuration x detector x grid point of the near / far means (per run first, as the
table's) and of the validation AUROC tuning compared, and one figure per detector, `figures/sensitivity_<detector>.png`
(`ood.plots.sensitivity_figure`)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ood.errors import OODError
from ood.report.aggregation import _config_of, _mean_std, _order

#: the file `ood.evaluation.sinks.ResultsWriter` writes beside `results.jsonl` (its `SENSITIVITY_FILE`; not imported:
#: the report starts without torch)
SENSITIVITY_FILE = "sensitivity.jsonl"
#: the metrics averaged per OOD group
METRICS = ("auroc", "fpr95")
#: what the report writes beside report.csv when its runs have sensitivity rows
CSV_FILE = "sensitivity.csv"


def _match_key(row: Mapping[str, Any], run: str) -> tuple[str, ...]:
    return run, str(row["method"]), str(row["detector"]), str(row.get("mode", "standard")), str(row["ood_dataset"])


def load_sensitivity(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `sensitivity.jsonl` rows of the runs of the result `rows` (`ood.report.reading.load_rows`), each with the
    result row of its run, detector, mode and OOD set as `_result`: its configuration is that row's (the table
    entry it belongs to). A run's rows that `load_rows` dropped (a re-evaluation counted once) are dropped here too."""
    results = {_match_key(r, str(r["_run"])): r for r in rows}
    out = []
    for run in sorted({str(r["_run"]) for r in rows}):
        for row in _read(Path(run) / SENSITIVITY_FILE):
            result = results.get(_match_key(row, run))
            if result is not None:
                out.append({**row, "_run": run, "_result": result})
    return out


def _read(file: Path) -> list[dict[str, Any]]:
    """The rows of one `sensitivity.jsonl` (none when there is no file), each checked to name its match key."""
    if not file.is_file():
        return []
    rows = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
            _match_key(rows[-1], "")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise OODError(f"{file}:{number}: not a sensitivity row (a JSON object naming its method, detector "
                           "and OOD set)") from None
    return rows


def left_out_sensitivity(dropped: Mapping[tuple[str, str], set[str]]) -> list[str]:
    """One line per run whose sensitivity rows `load_sensitivity` drops with its results (`load_rows`' `dropped`: a
    re-evaluation of another run's model in the same configuration, counted once): `ood-report <train sweep> <eval
    sweep>` of an `ood-eval` with detectors.sensitivity=true over the detectors' own grids (the option is no
    configuration) kept the training runs' rows and wrote no sensitivity.csv, saying nothing. One over the user's
    lists is another configuration (`config_params`), kept."""
    lines = []
    for (run, kept), detectors in sorted(dropped.items()):
        file = Path(run) / SENSITIVITY_FILE
        swept = sorted(detectors & {str(row["detector"]) for row in _read(file)})
        if swept:
            lines.append(f"{file} left out ({', '.join(swept)}): its run re-evaluates the model of {kept} in the same "
                         "configuration (the same detector settings and grids), whose rows the report "
                         f"keeps; report {run} without {kept} for its sensitivity.csv and figures")
    return lines


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def sensitivity_table(
    swept: Sequence[Mapping[str, Any]], config_cols: Sequence[str]
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(point columns `point.<key>`, metric columns, entries): one entry per configuration (the report table's
    `config_cols`) and grid point, its metric cells (mean, std, n) over the runs (seeds): `val/auroc` (ID val vs
    validation OOD, what tuning compared) and `<near|far>/<metric>`, each run's unweighted mean over the group's OOD
    sets first; `chosen` counts the runs whose tuning chose the point, `seeds` the runs, `_params` is the point."""
    keys = list(dict.fromkeys(k for s in swept for k in s["params"]))
    point_cols = [f"point.{k}" for k in keys]
    groups = [g for g in ("near", "far") if any(s["ood_group"] == g for s in swept)]
    runs: dict[tuple[str, ...], dict[str, list[Mapping[str, Any]]]] = {}
    params: dict[tuple[str, ...], dict[str, Any]] = {}
    for s in swept:
        config = _config_of(s["_result"])
        key = (*(config.get(c, "") for c in config_cols), *(_text(s["params"][k]) if k in s["params"] else "" for k in keys))
        runs.setdefault(key, {}).setdefault(s["_run"], []).append(s)
        params[key] = s["params"]
    table = []
    for key, per_run in runs.items():
        cells: dict[str, list[float]] = {"val/auroc": [sets[0]["val_auroc"] for sets in per_run.values()]}
        for sets in per_run.values():
            for g in groups:
                in_group = [s for s in sets if s["ood_group"] == g]
                for m in METRICS:
                    if in_group:
                        cells.setdefault(f"{g}/{m}", []).append(statistics.fmean(s[m] for s in in_group))
        entry: dict[str, Any] = dict(zip([*config_cols, *point_cols], key))
        entry.update(seeds=len(per_run), chosen=sum(bool(sets[0]["chosen"]) for sets in per_run.values()),
                     _params=params[key])
        entry.update({col: (*_mean_std(values), len(values)) for col, values in cells.items()})
        table.append(entry)
    table.sort(key=lambda e: tuple(_order(str(e[c])) for c in (*config_cols, *point_cols)))
    metric_cols = ["val/auroc", *(f"{g}/{m}" for g in groups for m in METRICS)]
    return point_cols, metric_cols, table


def fewer_runs(
    swept_table: Sequence[Mapping[str, Any]], table: Sequence[Mapping[str, Any]], config_cols: Sequence[str]
) -> list[str]:
    """One line per configuration of the report `table` whose `sensitivity_table` entries come from fewer of its runs
    (a seed evaluated without `detectors.sensitivity=true` has no sensitivity.jsonl): their means are over those runs
    alone, which the csv's `seeds` column says but nothing warned of."""
    runs = {tuple(str(e[c]) for c in config_cols): e["seeds"] for e in table}
    swept: dict[tuple[str, ...], int] = {}
    for e in swept_table:
        key = tuple(str(e[c]) for c in config_cols)
        swept[key] = max(swept.get(key, 0), e["seeds"])
    return [f"{CSV_FILE}: {' '.join(f'{c}={v}' for c, v in zip(config_cols, key))} is over {n} of its {runs[key]} "
            f"runs (the others have no {SENSITIVITY_FILE} rows for it: evaluated without detectors.sensitivity=true)"
            for key, n in swept.items() if n < runs.get(key, 0)]


def write_sensitivity_figures(
    figures: Path, config_cols: Sequence[str], table: Sequence[Mapping[str, Any]],
    detectors: Sequence[str] | None = None,
) -> list[Path]:
    """`figures/sensitivity_<detector>.png` per detector of the `sensitivity_table` entries (of `detectors` alone
    when given: `ood-report --detectors`, as the ROC curves, histograms and bars): its first swept key on x, one line
    per configuration that differs between its entries and value of its other swept keys."""
    from ood import plots

    paths = []
    for detector in figure_detectors(table, detectors):
        entries = [e for e in table if e["detector"] == detector]
        keys = list(dict.fromkeys(k for e in entries for k in e["_params"]))
        varying = [c for c in config_cols if c != "detector" and len({str(e.get(c)) for e in entries}) > 1]
        lines: dict[str, list[Mapping[str, Any]]] = {}
        for e in entries:
            parts = [f"{c.rsplit('.', 1)[-1]}={e.get(c)}" for c in varying]
            parts += [f"{k}={_text(e['_params'][k])}" for k in keys[1:] if k in e["_params"]]
            lines.setdefault(" ".join(parts) or detector, []).append(e)
        curves = [plots.SensitivityLine(label, [e["_params"][keys[0]] for e in members],
                                        {col: [e[col][:2] for e in members] for col in members[0] if "/" in col},
                                        [(e["chosen"], e["seeds"]) for e in members])
                  for label, members in lines.items()]
        title = f"{detector}: test AUROC against {keys[0]} (mean ± std over seeds)"
        axis = axis_label(detector, keys[0], [x for curve in curves for x in curve.x])
        paths.append(plots.sensitivity_figure(curves, axis, figures / f"sensitivity_{detector}.png", title))
    return paths


def figure_detectors(table: Sequence[Mapping[str, Any]], detectors: Sequence[str] | None = None) -> list[str]:
    """The detectors `write_sensitivity_figures` draws a figure of: those of the `sensitivity_table` entries (of
    `detectors` alone when given), in the table's order."""
    return list(dict.fromkeys(str(e["detector"]) for e in table if detectors is None or e["detector"] in detectors))


def axis_label(detector: str, key: str, values: Sequence[Any]) -> str:
    """`key`, or "`key` (fraction of D)" where the registered `detector` counts it relatively (`relative_counts`:
    ViM's `dim`) and every value is a fraction in (0, 1): 0.125 on the axis reads as D/8, not 0.125 dimensions."""
    from ood.detectors import available_detectors, detector_class

    relative = detector in available_detectors() and key in detector_class(detector).relative_counts
    fractions = all(isinstance(v, float) and 0 < v < 1 for v in values)
    return f"{key} (fraction of D)" if relative and values and fractions else key


def report_note(table: Sequence[Mapping[str, Any]], figures: str | None, detectors: Sequence[str] | None = None) -> str:
    """report.md's line naming what the report wrote of the runs' sensitivity rows: `CSV_FILE` and, unless `figures`
    is None (no figures), the `figures/sensitivity_<detector>.png` of `write_sensitivity_figures` in folder
    `figures`; the stderr "wrote" line alone named them."""
    drawn = [f"`{figures}/sensitivity_{d}.png`" for d in figure_detectors(table, detectors)] if figures else []
    pictured = f"; figures: {', '.join(drawn)}" if drawn else ""
    return f"Hyper-parameter sensitivity (test AUROC per grid point of the tuning): `{CSV_FILE}`{pictured}"
