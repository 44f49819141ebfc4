"""Published reference numbers beside the report's rows.

A reference file (`conf/reference/<id_dataset>.yaml`, e.g. the OpenOOD v1.5 leaderboard AUROC for CIFAR-10/100, or a
paper table under `conf/reference/<paper>/`) gives `source`, `id_dataset`, `backbone` and
`auroc: {method: {detector: {near|far: [mean(, std)]}}}` in % (a bare number is the mean). The matching rows (same ID dataset, backbone, method
and detector; a detector that `reproduces` another, e.g. `gram_stream`, matches that one's numbers) get
`ref:near/auroc` and `ref:far/auroc` columns. A file may also give FPR95 (`fpr95:`, same shape)
with its `fpr95_convention`: `id_positive` (ODIN / Energy / the seed papers; our `fpr95`) gives `ref:<group>/fpr95`
columns, `ood_positive` (OpenOOD v1.5, pytorch-ood; our `fpr95_oodpos`) `ref:<group>/fpr95_oodpos`.
`ood_sets: {near|far: [set, ...]}` names the OOD sets a published group mean is over: a row whose group holds them
and more (outlier-exposure's released far mean over 3 of the 6 sets of `protocol=classic`) gets our mean over exactly
those sets beside it (`<group>[<set>,...]/<metric>`, per run, then mean ± std over the runs, and
`ref:<group>[<set>,...]/<metric>`); a row whose group lacks some of them (TIN missing from a torchvision-only CIFAR
tree, another protocol's far sets) gets no `ref:` column for it, and a warning (on stderr and under report.md's
table) says why; `mode` (default `standard`) is the evaluation mode the
numbers are of (full-spectrum rows measure another ID set). `same_network: {method: trained_as}` lets rows of a post-hoc method that trains exactly as another
(`grood: ce`) read that method's numbers for the detectors the file does not list under their own method. `std`
(`population` | `sample`) says how the std of its [mean, std] entries was taken: a line under the table says so.
`id_acc: [mean(, std)]` (%), the ID test accuracy of the network the numbers are of, goes beside the rows' `id_acc`
as `ref:id_acc` (rows of a method the file lists): a gap there means another network or preprocessing than the
published one, before any AUROC is read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ood import CONFIG_DIR
from ood.errors import OODError

REFERENCE_DIR = CONFIG_DIR / "reference"
REFERENCE_COLS = ("ref:near/auroc", "ref:far/auroc")
#: the ID test accuracy of the reference's network, beside the rows' `id_acc` (a checkpoint or preprocessing
#: that is not the published one shows here first)
ID_ACC_COL = "ref:id_acc"
#: reference file's `fpr95_convention` -> our metric of that convention
FPR95_CONVENTIONS = {"id_positive": "fpr95", "ood_positive": "fpr95_oodpos"}
#: reference file's `std` (how the std of its [mean, std] entries was taken) -> the line under the report's table
STD_CONVENTIONS = {
    "population": "ref: ± is the population std over the published runs (n; OpenOOD's np.std), ours the sample std "
                  "(n - 1): of the same 3 values the population std is 0.82 x the sample std.",
    "sample": "ref: ± is the sample std over the published runs (n - 1), as ours.",
}


SUBSET_NOTE = ("near[<sets>] / far[<sets>]: the mean over those OOD sets alone per run, then over seeds, beside a "
               "reference whose group mean is over them.")


def load_reference(path: str | Path) -> dict[str, Any]:
    """A reference file: `source`, `id_dataset`, `backbone`, `auroc: {method: {detector: {near|far: [mean(, std)]}}}` (%),
    optionally `fpr95` of the same shape with `fpr95_convention` (`id_positive` | `ood_positive`), `ood_sets`,
    `mode`, `same_network`, `std` (`STD_CONVENTIONS`) and `id_acc` ([mean(, std)], %)."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(path)
    if not path.is_file():
        raise OODError(f"no such reference file: {path}")
    try:  # a malformed file ended `ood-report` in YAML's multi-line traceback
        reference = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise OODError(f"reference file {path} is not valid YAML: {err.problem}{where}") from None
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as err:
        raise OODError(f"reference file {path} cannot be read as YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(reference, dict):
        raise OODError(f"reference file {path} holds a {type(reference).__name__}, not a mapping of source, id_dataset, "
                       "backbone, auroc ...")
    missing = {"source", "id_dataset", "backbone"} - set(reference)
    if not {"auroc", "fpr95"} & set(reference):
        missing.add("auroc or fpr95")
    if missing:
        raise OODError(f"reference file {path} lacks {sorted(missing)}")
    if "fpr95" in reference and reference.get("fpr95_convention") not in FPR95_CONVENTIONS:
        raise OODError(f"reference file {path} gives fpr95 without fpr95_convention: one of {list(FPR95_CONVENTIONS)}")
    sets = reference.get("ood_sets") or {}
    if not isinstance(sets, dict) or not set(sets) <= {"near", "far"} or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in sets.values()):
        raise OODError(f"reference file {path}: ood_sets is {sets!r}: give {{near|far: [set, ...]}}")
    if reference.get("std", "sample") not in STD_CONVENTIONS:
        raise OODError(f"reference file {path}: std is {reference['std']!r}: one of {list(STD_CONVENTIONS)}")
    same = reference.get("same_network") or {}
    if not isinstance(same, dict) or not all(isinstance(v, str) for v in same.values()):
        raise OODError(f"reference file {path}: same_network is {same!r}: give {{method: the method it trains as}}")
    if "id_acc" in reference:
        reference["id_acc"] = _numbers(reference["id_acc"], f"reference file {path}: id_acc")
    for metric in ("auroc", "fpr95"):
        where = f"reference file {path}: {metric}"
        for method, detectors in _mapping(reference.get(metric), where, "method: {detector: ...}").items():
            for detector, groups in _mapping(detectors, f"{where}.{method}", "detector: {near|far: ...}").items():
                for group, value in _mapping(groups, f"{where}.{method}.{detector}", "near|far: [mean, std]").items():
                    groups[group] = _numbers(value, f"{where}.{method}.{detector}.{group}")
    return reference


def _mapping(value: Any, where: str, shape: str) -> dict[str, Any]:
    """A level of a reference's `auroc` / `fpr95` nesting (None: empty); anything but a mapping is one line naming
    where it is and the shape to give (a list or a number ended in an AttributeError in the report)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OODError(f"{where} is {value!r}: give {{{shape}}}")
    return value


def _cell(values: Sequence[float]) -> tuple[float, float, int]:
    """A reference's [mean(, std)] as a table cell (mean, std, runs): a std means the leaderboard's three runs."""
    return values[0], values[1] if len(values) > 1 else 0.0, 3 if len(values) > 1 else 1


def _numbers(value: Any, where: str) -> list[float]:
    """A reference entry as [mean(, std)]: a bare number is its mean (it was a TypeError deep in the report)."""
    values = value if isinstance(value, list) else [value]
    if not 1 <= len(values) <= 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise OODError(f"{where} is {value!r}: give a number or [mean, std] in %")
    return [float(v) for v in values]


def reference_files(paths: Iterable[Path]) -> list[Path]:
    """`--reference` arguments as files: a folder (e.g. `conf/reference/heatmap`) stands for its `*.yaml`, sorted. A
    relative `conf/...` path that is not there names ood's own configs (`CONFIG_DIR`), so the documented
    `--reference conf/reference/<paper>` works outside the checkout's root and from an installed ood."""
    files = []
    for path in map(Path, paths):
        if not path.exists() and not path.is_absolute() and path.parts[:1] == ("conf",):
            path = CONFIG_DIR.joinpath(*path.parts[1:])
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    return files


def default_references(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The `conf/reference/<id_dataset>.yaml` and `<id_dataset>_*.yaml` (other backbones) files of the ID datasets
    in `rows`."""
    names = sorted({str(row["id_dataset"]) for row in rows})
    files = [p for n in names for p in [REFERENCE_DIR / f"{n}.yaml", *sorted(REFERENCE_DIR.glob(f"{n}_*.yaml"))]]
    return [load_reference(p) for p in files if p.is_file()]


def std_notes(
    references: Sequence[Mapping[str, Any]], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]
) -> list[str]:
    """How the references of the table's (ID dataset, backbone) pairs took their std (`STD_CONVENTIONS`), and what a
    column over a reference's sets is (`SUBSET_NOTE`), when a ref: column is shown."""
    if not any(c.startswith("ref:") for c in metric_cols):
        return []
    ran = {(str(e["id_dataset"]), str(e["backbone"])) for e in table}
    subsets = [SUBSET_NOTE] if any("[" in c for c in metric_cols) else []
    return [STD_CONVENTIONS[s] for s in sorted({str(r["std"]) for r in references
                                                 if "std" in r and (str(r["id_dataset"]), str(r["backbone"])) in ran})] + subsets


def add_reference(
    metric_cols: Sequence[str], table: Sequence[dict[str, Any]], references: Sequence[Mapping[str, Any]],
    left_out: list[str] | None = None,
) -> list[str]:
    """Add the published near/far AUROC (and FPR95 when given) as (mean, std, runs) in [0, 1] to matching table
    entries, in place.

    An entry matches a reference on `id_dataset`, `backbone`, `method` (or the one it trains as: `same_network`),
    `detector` (`reference_name`: the detector it reproduces, if any) and evaluation mode, a group also on its OOD
    sets (`_sets`, when the reference names its `ood_sets`); a group or mode that does not match is warned about once
    per kind of entry, on stderr and appended to `left_out` (the report says so under its table). Returns the metric columns
    with our columns of a matched convention not shown yet (`<group>/fpr95_oodpos`) and the matched reference
    columns appended (`REFERENCE_COLS` first, then FPR95 ones), else unchanged.
    """
    if not references:  # e.g. digits: none to match, and the registry's import (torch) is most of a report's time
        return list(metric_cols)
    from ood.detectors import reference_name

    matched: set[str] = set()
    subsets: set[str] = set()  # our means over a reference's sets, where our group holds more
    unmatched: dict[str, None] = {}  # warnings, in order, once each
    for entry in table:
        for ref in references:
            if (str(ref["id_dataset"]), str(ref["backbone"])) != (entry["id_dataset"], entry["backbone"]):
                continue
            where = f"the {entry['id_dataset']} {entry['backbone']} rows"
            detector = reference_name(str(entry["detector"]))
            methods = (entry["method"], (ref.get("same_network") or {}).get(entry["method"]))
            mode, ref_mode = entry.get("mode", "standard"), ref.get("mode", "standard")
            metrics = {"auroc": ref.get("auroc")}  # a file may give fpr95 alone
            if "fpr95" in ref:
                metrics[FPR95_CONVENTIONS[ref["fpr95_convention"]]] = ref["fpr95"]
            for metric, numbers in metrics.items():
                groups = next((g for m in methods if (g := ((numbers or {}).get(m) or {}).get(detector))), {})
                if groups and mode != ref_mode:
                    unmatched[f"no ref: columns for {where} of mode={mode}: the reference's numbers are "
                              f"{ref_mode} ({ref['source'].strip()})"] = None
                    continue
                for group in (g for g in ("near", "far") if g in groups):
                    ours, theirs = entry.get("_sets", {}).get(group), (ref.get("ood_sets") or {}).get(group)
                    column = group
                    if theirs is not None and sorted(ours or ()) != sorted(theirs):
                        held = bool(ours) and set(theirs) < set(ours)
                        cell = _subset_cell(entry.get("_per_run", {}), sorted(theirs), metric) if held else None
                        if cell is not None:  # our mean over exactly their sets stands beside theirs
                            column = f"{group}[{','.join(sorted(theirs))}]"
                            entry[f"{column}/{metric}"] = cell
                            subsets.add(f"{column}/{metric}")
                        else:
                            why = (f"no run scored {metric} on every one of them" if held else
                                   f"their {group}-OOD sets {ours} are not the reference's {sorted(theirs)}")
                            if ours:  # no group of ours (a protocol without near-OOD): nothing to stand beside
                                unmatched[f"no ref:{group} columns for {where}: {why} ({ref['source'].strip()})"] = None
                            continue
                    values = [float(v) / 100 for v in groups[group]]
                    col = f"ref:{column}/{metric}"
                    entry[col] = _cell(values)
                    matched.add(col)
            trained = {m for metric in ("auroc", "fpr95") for m in (ref.get(metric) or {})}
            if "id_acc" in ref and "id_acc" in entry and any(m in trained for m in methods):
                entry[ID_ACC_COL] = _cell([float(v) / 100 for v in ref["id_acc"]])
                matched.add(ID_ACC_COL)
    for line in unmatched:
        print(f"warning: {line}", file=sys.stderr)
    if left_out is not None:
        left_out += unmatched
    order = [*REFERENCE_COLS, *(f"ref:{g}/{m}" for m in FPR95_CONVENTIONS.values() for g in ("near", "far")),
             *(f"ref:{c}" for c in sorted(subsets)), ID_ACC_COL]
    # our numbers in a reference's convention that the table does not show (fpr95_oodpos) go beside it, as our means
    # over a reference's sets
    ours = [c[len("ref:"):] for c in order if c in matched and c[len("ref:"):] not in metric_cols]
    return [*metric_cols, *(c for c in ours if any(c in e for e in table)), *(c for c in order if c in matched)]


def _subset_cell(per_run: Mapping[str, Mapping[str, Mapping[str, float]]], sets: Sequence[str],
                 metric: str) -> tuple[float, float, int] | None:
    """Our (mean, std, runs) of `metric` averaged over `sets` in each run that scored them all, then over those
    runs; None when no run scored them all."""
    import statistics

    values = [statistics.fmean(scored[s][metric] for s in sets) for scored in per_run.values()
              if all(metric in scored.get(s, {}) for s in sets)]
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)) if values \
        else None
