"""`ood-report PATH [PATH ...]`: the comparison table over runs and sweeps.

Reads every `results.jsonl` below the given folders, groups rows by configuration (method, detector, backbone,
ID dataset, and every method or detector hyper-parameter that varies between the runs), and reports per OOD
set and per near/far group the mean ± std over seeds. Near/far means are taken per run first (unweighted over
the group's sets, as OpenOOD), then averaged over seeds. Writes `report.md` and `report.csv` next to the runs.

Published reference numbers (`conf/reference/<id_dataset>.yaml`, e.g. the OpenOOD v1.5 leaderboard AUROC for
CIFAR-10/100) are added as `ref:near/auroc` and `ref:far/auroc` columns for the rows with the same ID dataset,
backbone, method and detector; `--reference FILE` picks other files (the paper tables of `make reproduce-<paper>`,
`conf/reference/<paper>/`), `--no-reference` leaves them out. A reference file may also give FPR95 (`fpr95:`, same
shape) with its `fpr95_convention`: `id_positive` (ODIN / Energy / the seed papers; our `fpr95`) gives
`ref:<group>/fpr95` columns, `ood_positive` (OpenOOD v1.5, pytorch-ood; our `fpr95_oodpos`) `ref:<group>/fpr95_oodpos`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ood import CONFIG_DIR
from ood.errors import OODError

BASE_KEYS = ("method", "detector", "backbone", "id_dataset")
SHOWN = ("auroc", "fpr95")
REFERENCE_DIR = CONFIG_DIR / "reference"
REFERENCE_COLS = ("ref:near/auroc", "ref:far/auroc")
#: reference file's `fpr95_convention` -> our metric of that convention
FPR95_CONVENTIONS = {"id_positive": "fpr95", "ood_positive": "fpr95_oodpos"}


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All result rows under `paths` (files or folders searched recursively), each tagged with its run folder."""
    rows = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("results.jsonl"))
        if not path.exists():
            raise OODError(f"no such file or folder: {path}")
        for file in files:
            for line in file.read_text().splitlines():
                if line.strip():
                    rows.append({**json.loads(line), "_run": str(file.parent)})
    if not rows:
        raise OODError(f"no results.jsonl found under {', '.join(map(str, paths))}")
    return rows


def _tuned_keys(row: Mapping[str, Any]) -> set[str]:
    """Detector hyper-parameters chosen by tuning in this row: results of the run, not part of its configuration
    (seeds that tuned k differently are still the same configuration)."""
    if not row.get("tuned"):
        return set()
    if "tuned_params" in row:
        return set(row["tuned_params"])
    from ood.detectors import detector_class
    from ood.errors import ConfigError

    try:
        return set(detector_class(str(row["detector"])).grid)
    except ConfigError:
        return set()


def _flat_params(row: Mapping[str, Any]) -> dict[str, str]:
    """Configuration columns of a row. Left out, like tuned detector values: `method_params.fitted` (statistics a
    method fits from data, e.g. Energy-OE's margins) and `init.ckpt` (the starting weights, one per seed when each
    seed fine-tunes its own CE run)."""
    out = {}
    skip = {"detector_params": _tuned_keys(row), "method_params": {"fitted"}}
    for prefix, key in (("method", "method_params"), ("detector", "detector_params")):
        for name, value in (row.get(key) or {}).items():
            if key == "method_params" and name == "init" and isinstance(value, Mapping):
                value = {k: v for k, v in value.items() if k != "ckpt"}
            if name not in skip[key]:
                out[f"{prefix}.{name}"] = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return out


def varying_params(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Hyper-parameter columns whose value differs between rows of the same method and detector."""
    seen: dict[tuple[str, str, str], set[str]] = {}
    for row in rows:
        for key, value in _flat_params(row).items():
            seen.setdefault((row["method"], row["detector"], key), set()).add(value)
    return sorted({key for (_, _, key), values in seen.items() if len(values) > 1})


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(config columns, metric columns, table rows); metric cells are (mean, std, n) over seeds."""
    params = varying_params(rows)
    config_cols = [*BASE_KEYS, *params]
    sets: dict[str, str] = {}
    for row in rows:
        sets.setdefault(row["ood_dataset"], row["ood_group"])
    ordered = [s for g in ("near", "far") for s in sets if sets[s] == g]
    groups = [g for g in ("near", "far") if g in sets.values()]
    metric_cols = [f"{s}/{m}" for s in ordered for m in SHOWN] + [f"{g}/{m}" for g in groups for m in SHOWN]

    configs: dict[tuple[str, ...], dict[str, dict[str, dict[str, float]]]] = {}
    for row in rows:
        flat = {**{k: str(row.get(k)) for k in BASE_KEYS}, **_flat_params(row)}
        key = tuple(flat.get(c, "") for c in config_cols)
        configs.setdefault(key, {}).setdefault(row["_run"], {})[row["ood_dataset"]] = {m: row[m] for m in SHOWN}

    table = []
    for key, runs in configs.items():
        cells: dict[str, list[float]] = {}
        for per_set in runs.values():
            for s, values in per_set.items():
                for m in SHOWN:
                    cells.setdefault(f"{s}/{m}", []).append(values[m])
            for g in groups:
                members = [per_set[s] for s in ordered if sets[s] == g and s in per_set]
                for m in SHOWN:
                    if members:
                        cells.setdefault(f"{g}/{m}", []).append(statistics.fmean(v[m] for v in members))
        entry: dict[str, Any] = dict(zip(config_cols, key))
        entry["seeds"] = len(runs)
        for col in metric_cols:
            if col in cells:
                entry[col] = (*_mean_std(cells[col]), len(cells[col]))
        table.append(entry)
    table.sort(key=lambda e: tuple(str(e[c]) for c in config_cols))
    return config_cols, metric_cols, table


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        mean, std, n = value
        return f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"
    return str(value)


def to_markdown(config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table (metrics in %, mean ± std over seeds)."""
    cols = [*config_cols, "seeds", *metric_cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(entry.get(c, "")) for c in cols) + " |" for entry in table]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> None:
    """CSV with `<col>_mean` and `<col>_std` per metric, values in [0, 1]."""
    header = [*config_cols, "seeds"] + [f"{c}_{s}" for c in metric_cols for s in ("mean", "std")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for entry in table:
            metrics = [v for c in metric_cols for v in (entry[c][:2] if c in entry else ("", ""))]
            writer.writerow([entry[c] for c in config_cols] + [entry["seeds"], *metrics])


def load_reference(path: str | Path) -> dict[str, Any]:
    """A reference file: `source`, `id_dataset`, `backbone`, `auroc: {method: {detector: {near|far: [mean(, std)]}}}` (%),
    optionally `fpr95` of the same shape with `fpr95_convention` (`id_positive` | `ood_positive`)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise OODError(f"no such reference file: {path}")
    reference = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(reference, dict)
    missing = {"source", "id_dataset", "backbone"} - set(reference)
    if not {"auroc", "fpr95"} & set(reference):
        missing.add("auroc or fpr95")
    if missing:
        raise OODError(f"reference file {path} lacks {sorted(missing)}")
    if "fpr95" in reference and reference.get("fpr95_convention") not in FPR95_CONVENTIONS:
        raise OODError(f"reference file {path} gives fpr95 without fpr95_convention: one of {list(FPR95_CONVENTIONS)}")
    return reference


def reference_files(paths: Iterable[Path]) -> list[Path]:
    """`--reference` arguments as files: a folder (e.g. `conf/reference/heatmap`) stands for its `*.yaml`, sorted."""
    return [f for p in paths for f in (sorted(Path(p).glob("*.yaml")) if Path(p).is_dir() else [Path(p)])]


def default_references(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `conf/reference/<id_dataset>.yaml` and `<id_dataset>_*.yaml` (other backbones) files of the ID datasets
    in `rows`."""
    names = sorted({str(row["id_dataset"]) for row in rows})
    files = [p for n in names for p in [REFERENCE_DIR / f"{n}.yaml", *sorted(REFERENCE_DIR.glob(f"{n}_*.yaml"))]]
    return [load_reference(p) for p in files if p.is_file()]


def add_reference(
    metric_cols: Sequence[str], table: Sequence[dict[str, Any]], references: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Add the published near/far AUROC (and FPR95 when given) as (mean, std, runs) in [0, 1] to matching table
    entries, in place.

    An entry matches a reference on `id_dataset`, `backbone`, `method` and `detector`. Returns the metric columns
    with the matched reference columns appended (`REFERENCE_COLS` first, then FPR95 ones), else unchanged.
    """
    matched: set[str] = set()
    for entry in table:
        for ref in references:
            if (str(ref["id_dataset"]), str(ref["backbone"])) != (entry["id_dataset"], entry["backbone"]):
                continue
            metrics = {"auroc": ref["auroc"]}
            if "fpr95" in ref:
                metrics[FPR95_CONVENTIONS[ref["fpr95_convention"]]] = ref["fpr95"]
            for metric, numbers in metrics.items():
                groups = ((numbers or {}).get(entry["method"]) or {}).get(entry["detector"]) or {}
                for group in ("near", "far"):
                    if group in groups:
                        values = [float(v) / 100 for v in groups[group]]
                        col = f"ref:{group}/{metric}"
                        entry[col] = (values[0], values[1] if len(values) > 1 else 0.0, 3 if len(values) > 1 else 1)
                        matched.add(col)
    order = [*REFERENCE_COLS, *(f"ref:{g}/{m}" for m in FPR95_CONVENTIONS.values() for g in ("near", "far"))]
    return [*metric_cols, *(c for c in order if c in matched)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ood-report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run or multirun folders (searched for results.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md/report.csv (default: first path)")
    parser.add_argument(
        "--reference",
        action="append",
        type=Path,
        default=None,
        help="reference-number file(s) or folders of them (default: conf/reference/<id_dataset>.yaml when it exists)",
    )
    parser.add_argument("--no-reference", action="store_true", help="no published reference columns")
    args = parser.parse_args(argv)
    try:
        rows = load_rows(args.paths)
        if args.no_reference:
            references = []
        elif args.reference:
            references = [load_reference(p) for p in reference_files(args.reference)]
        else:
            references = default_references(rows)
    except OODError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    config_cols, metric_cols, table = aggregate(rows)
    metric_cols = add_reference(metric_cols, table, references)
    markdown = to_markdown(config_cols, metric_cols, table)
    print(markdown)
    first = Path(args.paths[0])
    out = args.out or (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    write_csv(out / "report.csv", config_cols, metric_cols, table)
    for ref in references:
        protocol = f", protocol: {ref['protocol']}" if ref.get("protocol") else ""
        print(f"reference numbers ({ref['id_dataset']}, {ref['backbone']}{protocol}): {ref['source']}", file=sys.stderr)
    print(f"wrote {out / 'report.md'} and {out / 'report.csv'}", file=sys.stderr)


if __name__ == "__main__":
    main()
