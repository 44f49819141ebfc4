"""The comparison table's numbers: rows grouped by configuration (never averaging different ones), mean ± std over
seeds per OOD set, and near/far means taken per run first (unweighted over the group's sets, as OpenOOD), then
averaged over seeds. The configuration keys that differ between runs become columns. The evaluation mode (`standard`,
`fsood`) is a fixed grouping key like the method and detector, never averaged over (a `mode` column whenever a row is
full-spectrum), also with `--by`."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BASE_KEYS = ("method", "detector", "backbone", "id_dataset")
SHOWN = ("auroc", "fpr95")
#: metrics every entry carries, shown or not: OpenOOD's FPR95 convention, a column beside a reference given in it
AGGREGATED = (*SHOWN, "fpr95_oodpos")
#: the accuracies a run reports (the same in every row of a run): ID test, and full-spectrum rows' pooled ID test + csid sets
ACCURACIES = ("id_acc", "csid_acc")


def trained_here(row: Mapping[str, Any]) -> bool:
    """Whether the row's run trained the model it scores (its own `checkpoints/last.ckpt`, or `best.ckpt` when it
    evaluated its epoch of best ID-val accuracy: any file of its own `checkpoints/`), not evaluated a checkpoint; rows
    not read from a run folder (no `_model`) count as trained."""
    model = row.get("_model")
    return model is None or Path(model).parent.parent == Path(row["_run"]).resolve()


def evaluated_epochs(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Run folder -> the epoch (0-based) whose weights its rows score, for runs that say (`evaluated_epoch`:
    `evaluation.weights=best_val_acc`, the epoch of best ID-val accuracy), sorted by folder: it differs between the
    seeds an entry averages, so it is listed under the table, not a column of it."""
    return dict(sorted({str(r["_run"]): int(r["evaluated_epoch"]) for r in rows
                        if r.get("evaluated_epoch") is not None}.items()))


#: the configuration value of a detector hyper-parameter chosen by tuning (its value is a result of the run); one
#: tuned over the user's list reads `tuned [1, 5, 10]` (`config_params`)
TUNED = "tuned"


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


def config_params(row: Mapping[str, Any]) -> dict[str, str]:
    """Configuration columns of a row from its `method_params` and `detector_params`. A tuned detector value reads
    `tuned` (seeds that tuned k differently are one configuration; a blank cell beside a fixed `50` did not say k
    was tuned), followed by its grid where that was the user's list (`tuned_grid`): `tuned [1, 5, 10, 50, 100]`,
    another configuration than the detector's own grid (an `ood-eval` of a checkpoint over the user's list was read
    as its training run's evaluation, and dropped as a re-evaluation). Left out: `method_params.fitted` (statistics a method fits from data, e.g. Energy-OE's margins),
    `init.ckpt` (the starting weights, one per seed when each seed fine-tunes its own CE run) and parameters that
    interpolate `${seed}` (the row's `_seeded` keys)."""
    out = {}
    seeded = set(row.get("_seeded") or ())
    skip = {"fitted"} | {k[len("method."):] for k in seeded}
    tuned = _tuned_keys(row)
    grids = row.get("tuned_grid") or {}
    for prefix, key in (("method", "method_params"), ("detector", "detector_params")):
        for name, value in (row.get(key) or {}).items():
            if key == "method_params" and name in skip:
                continue
            if key == "method_params" and isinstance(value, Mapping):  # init.ckpt, and ${seed} keys such as teacher.seed
                value = {k: v for k, v in value.items()
                         if f"method.{name}.{k}" not in seeded and not (name == "init" and k == "ckpt")}
            if key == "detector_params" and name in tuned:
                value = f"{TUNED} {json.dumps(grids[name])}" if name in grids else TUNED
            out[f"{prefix}.{name}"] = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return out


#: configuration values that set nothing (an empty mapping, null), left out as a key the run does not have: one
#: folder's `ood.evaluate` runs (config `data.ood.csid: {}`, `data.ood.val: null`: every OOD group, given or not)
#: beside `ood-eval` runs (only the groups given) showed a column of `{}` in some rows and empty cells in others
UNSET = ("{}", "null")


def _config_of(row: Mapping[str, Any]) -> dict[str, str]:
    """Everything that names the configuration of a row: base keys, run config (without seed), method and fixed
    detector hyper-parameters; a key whose value is `UNSET` is left out, as in a run without it."""
    config = {**dict(row.get("_config") or {}), **config_params(row)}
    return {**{k: str(row.get(k)) for k in BASE_KEYS}, **{k: v for k, v in config.items() if v not in UNSET},
            "mode": str(row.get("mode", "standard"))}


def config_keys(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Every configuration key of `rows`: what `--by` may name."""
    return {k for row in rows for k in _config_of(row)}


def varying_params(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config columns whose value differs between rows of the same method, detector, backbone and ID dataset."""
    seen: dict[tuple[tuple[str, ...], str], set[str]] = {}
    keys = sorted({k for row in rows for k in _config_of(row)} - set(BASE_KEYS))
    for row in rows:
        config = _config_of(row)
        base = tuple(config[k] for k in BASE_KEYS)
        for key in keys:
            seen.setdefault((base, key), set()).add(config.get(key, ""))
    return sorted({key for (_, key), values in seen.items() if len(values) > 1})


def _drop_aliases(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """Of keys whose values always agree (`method.scheduler.T_max: ${trainer.max_epochs}`), keep the shortest."""
    configs = [_config_of(row) for row in rows]
    kept: dict[tuple[str, ...], str] = {}
    for key in sorted(keys, key=len):
        kept.setdefault(tuple(c.get(key, "") for c in configs), key)
    return sorted(kept.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str] | None = None, notes: list[str] | None = None
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(config columns, metric columns, table rows); metric cells are (mean, std, n) over the runs (seeds), also of
    `fpr95_oodpos`, which is not a column unless a reference gives it (`references.add_reference`); `_runs` lists an
    entry's run folders, `_sets` its OOD sets per group (what its near/far means are over), `_per_run` each run's
    metrics per OOD set.

    Runs are grouped by their whole configuration without the seed, so different configurations are never
    averaged; the columns are the keys that differ. `by` names the grouping keys instead (besides method,
    detector, backbone, ID dataset and, with full-spectrum rows, the mode); keys that then still differ inside a
    group are warned about. Warnings (those, runs lacking some of their configuration's OOD sets, a seed run twice)
    go to stderr and are appended to `notes`: they change what a number in the table is over, so the report says them
    under it.
    """
    fixed = [*BASE_KEYS, *(["mode"] if any(r.get("mode", "standard") != "standard" for r in rows) else [])]
    params = list(by) if by is not None else _drop_aliases(rows, varying_params(rows))
    config_cols = [*fixed, *(p for p in params if p not in fixed)]
    sets: dict[str, str] = {}
    for row in rows:
        sets.setdefault(row["ood_dataset"], row["ood_group"])
    ordered = [s for g in ("near", "far") for s in sets if sets[s] == g]
    groups = [g for g in ("near", "far") if any(r["ood_group"] == g for r in rows)]
    metric_cols = [f"{s}/{m}" for s in ordered for m in SHOWN] + [f"{g}/{m}" for g in groups for m in SHOWN]
    metric_cols += [a for a in ACCURACIES if any(a in r for r in rows)]

    configs: dict[tuple[str, ...], dict[str, dict[str, dict[str, float]]]] = {}
    group_of: dict[tuple[str, ...], dict[str, str]] = {}  # per configuration: one set may be near in one protocol, far in another
    members: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        flat = _config_of(row)
        key = tuple(flat.get(c, "") for c in config_cols)
        configs.setdefault(key, {}).setdefault(row["_run"], {})[row["ood_dataset"]] = {
            m: row[m] for m in (*AGGREGATED, *ACCURACIES) if m in row
        }
        group_of.setdefault(key, {})[row["ood_dataset"]] = row["ood_group"]
        members.setdefault(key, []).append(flat)
    warnings = _mixed(members) if by is not None else _repeated_seeds(
        # an evaluation of a checkpoint without a stored config records its own seed: only runs that trained their model
        configs, {row["_run"]: row.get("seed") for row in rows if trained_here(row)})

    table = []
    for key, runs in configs.items():
        cells: dict[str, list[float]] = {}
        sets_of = group_of[key]  # this configuration's OOD sets -> their group
        for run, per_set in runs.items():
            for s, values in per_set.items():
                for m in AGGREGATED:
                    if m in values:
                        cells.setdefault(f"{s}/{m}", []).append(values[m])
            missing = sorted(set(sets_of) - set(per_set))
            if missing:  # its near/far means would be over other sets than its seeds': not averaged with theirs
                short = " and ".join(g for g in groups if any(sets_of[s] == g for s in missing))
                warnings.append(f"{run} lacks OOD sets {missing} of its configuration: left out of its {short} mean")
            for g in groups:
                in_group = [per_set[s] for s in ordered if sets_of.get(s) == g and s in per_set]
                for m in AGGREGATED:
                    if in_group and all(m in v for v in in_group) and not any(sets_of[s] == g for s in missing):
                        cells.setdefault(f"{g}/{m}", []).append(statistics.fmean(v[m] for v in in_group))
            for acc in ACCURACIES:  # one value per run (every OOD set's row repeats it)
                values = [v[acc] for v in per_set.values() if acc in v]
                if values:
                    cells.setdefault(acc, []).append(values[0])
        entry: dict[str, Any] = dict(zip(config_cols, key))
        entry["seeds"] = len(runs)
        entry["_runs"] = sorted(runs)
        entry["_sets"] = {g: sorted(s for s, of in sets_of.items() if of == g) for g in groups}
        entry["_per_run"] = runs  # run -> OOD set -> metrics: a reference's mean over some of the sets is made from it
        entry.update({col: (*_mean_std(values), len(values)) for col, values in cells.items()})
        table.append(entry)
    table.sort(key=lambda e: tuple(_order(str(e[c])) for c in config_cols))
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if notes is not None:
        notes += warnings
    return config_cols, metric_cols, table


def _order(value: str) -> tuple[int, float, str]:
    """Sort key of a configuration value: finite numbers by value (epochs 5, 10, 20; not "10" < "20" < "5"), before
    text (also "nan" and "inf", which float() would read)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    return (0, number, "") if math.isfinite(number) else (1, 0.0, value)


def _mixed(members: Mapping[tuple[str, ...], Sequence[Mapping[str, str]]]) -> list[str]:
    """The line naming the keys that `--by` averages over, if any."""
    mixed = sorted({k for flats in members.values() for k in {k for f in flats for k in f} if len({f.get(k, "") for f in flats}) > 1})
    return [f"--by averages runs that differ in {', '.join(mixed)}"] if mixed else []


def _repeated_seeds(configs: Mapping[tuple[str, ...], Mapping[str, Any]], seed_of: Mapping[str, Any]) -> list[str]:
    """One line per set of runs that are the same seed of one configuration (a seed trained twice, e.g. a rerun
    beside its sweep): each counts in the mean ± std and in `seeds`, as if it were another seed."""
    repeated: set[tuple[str, ...]] = set()
    for runs in configs.values():
        by_seed: dict[str, list[str]] = {}
        for run in runs:
            if run in seed_of:
                by_seed.setdefault(str(seed_of[run]), []).append(run)
        repeated |= {tuple(sorted(same)) for same in by_seed.values() if len(same) > 1}
    return [f"{', '.join(same)} are seed {seed_of[same[0]]} of one configuration: each counts as a seed in its mean ± "
            "std; report one of them" for same in sorted(repeated)]
