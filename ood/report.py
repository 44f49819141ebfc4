"""`ood-report PATH [PATH ...]`: the comparison table over runs and sweeps.

Reads every `results.jsonl` below the given folders, groups rows by configuration (method, detector, backbone,
ID dataset, and every method or detector hyper-parameter that varies between the runs), and reports per OOD
set and per near/far group the mean ± std over seeds. Near/far means are taken per run first (unweighted over
the group's sets, as OpenOOD), then averaged over seeds.

Runs are grouped by their whole configuration without the seed (from each run's `config.yaml`: method and its
parameters, backbone, data, epochs, initial weights), never averaging different configurations; the keys that
differ become columns (`--by` chooses them). An `ood-eval` of a checkpoint already in the report counts once.
Besides `report.md`/`report.csv` it writes `report.tex` (booktabs) and `figures/` (ROC curves per OOD set,
score histograms, near/far AUROC bars), and names the jobs of a sweep that failed.

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


#: config keys that only matter for training: an evaluation run takes them from the run that trained its checkpoint
TRAINING_KEYS = ("trainer.max_epochs", "method.optimizer.", "method.scheduler.")


def seeded_keys(run_dir: str | Path) -> set[str]:
    """The run's config keys that interpolate `${seed}` (`ood.runs.seed_keys`), read from Hydra's unresolved copy of
    the config (`.hydra/config.yaml`; none without it): they vary with the seed, so they never split seeds."""
    from omegaconf import OmegaConf

    from ood.runs import seed_keys

    raw = Path(run_dir) / ".hydra" / "config.yaml"
    return seed_keys(OmegaConf.load(raw)) if raw.is_file() else set()


def run_facts(run_dir: str | Path) -> tuple[dict[str, str], str]:
    """(configuration without the seed, model) of one run folder, from its `config.yaml`.

    The model is the checkpoint the numbers come from: a training run's own `checkpoints/last.ckpt`, or an
    evaluation run's `ckpt_path`. An evaluation run takes the epochs (and seed) of the training run that wrote its
    checkpoint (`TRAINING_KEYS`), so re-evaluating a checkpoint is recognised as the same model.
    """
    from omegaconf import OmegaConf

    from ood.runs import flat_config, identity

    run_dir = Path(run_dir)
    own = str((run_dir / "checkpoints" / "last.ckpt").resolve())
    if not (run_dir / "config.yaml").is_file():
        return {}, own
    flat = flat_config(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))  # type: ignore[arg-type]
    config = identity(flat, seeded_keys(run_dir))
    if flat.get("train", True) or not flat.get("ckpt_path"):
        return config, own
    ckpt = Path(str(flat["ckpt_path"]))
    ckpt = ckpt / "checkpoints" / "last.ckpt" if ckpt.is_dir() else ckpt
    trained = ckpt.parent.parent / "config.yaml"
    config = {k: v for k, v in config.items() if not k.startswith(TRAINING_KEYS)}
    if ckpt.parent.name == "checkpoints" and trained.is_file():
        train_flat = flat_config(OmegaConf.to_container(OmegaConf.load(trained)))  # type: ignore[arg-type]
        config.update({k: v for k, v in identity(train_flat, seeded_keys(trained.parent)).items() if k.startswith(TRAINING_KEYS)})
    elif "ckpt_path" not in seeded_keys(run_dir):  # `ckpt_path=.../s${seed}/...`: one network per seed, not a config
        config["ckpt"] = str(ckpt)
    return config, str(ckpt.resolve())


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """All result rows under `paths` (files or folders searched recursively), each tagged with its run folder
    (`_run`), its configuration without the seed (`_config`) and its model (`_model`). Rows of a model already
    seen with the same method, detector settings and OOD set (a re-evaluation of one checkpoint) are dropped,
    training runs first, so each model counts once."""
    rows = []
    for path in map(Path, paths):
        files = [path] if path.is_file() else sorted(path.rglob("results.jsonl"))
        if not path.exists():
            raise OODError(f"no such file or folder: {path}")
        for file in files:
            config, model = run_facts(file.parent)
            seeded = sorted(seeded_keys(file.parent))
            for line in file.read_text().splitlines():
                if line.strip():
                    rows.append({**json.loads(line), "_run": str(file.parent), "_config": config, "_model": model,
                                 "_seeded": seeded})
    if not rows:
        raise OODError(f"no results.jsonl found under {', '.join(map(str, paths))}")
    seen: dict[tuple[str, ...], str] = {}
    kept = []
    for row in sorted(rows, key=lambda r: ("ckpt" in r["_config"], r["_run"])):
        key = (row["_model"], str(row["method"]), str(row["detector"]), json.dumps(_flat_params(row), sort_keys=True), str(row["ood_dataset"]))
        if seen.setdefault(key, row["_run"]) == row["_run"]:
            kept.append(row)
    return kept


def failed_runs(paths: Iterable[str | Path]) -> dict[str, str]:
    """Job folders (holding `.hydra/`) under `paths` without `results.jsonl`: folder -> why (the error a failed
    run left in `FAILED.txt`, else "no results: still running or killed")."""
    from ood.runs import FAILED_FILE

    out = {}
    for path in map(Path, paths):
        for hydra in sorted(path.rglob(".hydra")) if path.is_dir() else []:
            run = hydra.parent
            if not (run / "results.jsonl").is_file():
                failed = run / FAILED_FILE
                out[str(run)] = failed.read_text().strip() if failed.is_file() else "no results: still running or killed"
    return out


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
    method fits from data, e.g. Energy-OE's margins), `init.ckpt` (the starting weights, one per seed when each
    seed fine-tunes its own CE run) and parameters that interpolate `${seed}` (`seeded_keys`)."""
    out = {}
    seeded = set(row.get("_seeded") or ())
    skip = {"detector_params": _tuned_keys(row), "method_params": {"fitted"} | {k[len("method."):] for k in seeded}}
    for prefix, key in (("method", "method_params"), ("detector", "detector_params")):
        for name, value in (row.get(key) or {}).items():
            if key == "method_params" and isinstance(value, Mapping):  # init.ckpt, and ${seed} keys such as teacher.seed
                value = {k: v for k, v in value.items()
                         if f"method.{name}.{k}" not in seeded and not (name == "init" and k == "ckpt")}
            if name not in skip[key]:
                out[f"{prefix}.{name}"] = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return out


def _config_of(row: Mapping[str, Any]) -> dict[str, str]:
    """Everything that names the configuration of a row: base keys, run config (without seed), method and fixed
    detector hyper-parameters."""
    return {**{k: str(row.get(k)) for k in BASE_KEYS}, **dict(row.get("_config") or {}), **_flat_params(row)}


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
    rows: Sequence[Mapping[str, Any]], by: Sequence[str] | None = None
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(config columns, metric columns, table rows); metric cells are (mean, std, n) over the runs (seeds).

    Runs are grouped by their whole configuration without the seed, so different configurations are never
    averaged; the columns are the keys that differ. `by` names the grouping keys instead (besides method,
    detector, backbone, ID dataset); keys that then still differ inside a group are warned about.
    """
    params = list(by) if by is not None else _drop_aliases(rows, varying_params(rows))
    config_cols = [*BASE_KEYS, *(p for p in params if p not in BASE_KEYS)]
    sets: dict[str, str] = {}
    for row in rows:
        sets.setdefault(row["ood_dataset"], row["ood_group"])
    ordered = [s for g in ("near", "far") for s in sets if sets[s] == g]
    groups = [g for g in ("near", "far") if g in sets.values()]
    metric_cols = [f"{s}/{m}" for s in ordered for m in SHOWN] + [f"{g}/{m}" for g in groups for m in SHOWN]
    metric_cols += ["id_acc"] if any("id_acc" in r for r in rows) else []

    configs: dict[tuple[str, ...], dict[str, dict[str, dict[str, float]]]] = {}
    members: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        flat = _config_of(row)
        key = tuple(flat.get(c, "") for c in config_cols)
        configs.setdefault(key, {}).setdefault(row["_run"], {})[row["ood_dataset"]] = {
            m: row[m] for m in (*SHOWN, "id_acc") if m in row
        }
        members.setdefault(key, []).append(flat)
    if by is not None:
        _warn_mixed(members)

    table = []
    for key, runs in configs.items():
        cells: dict[str, list[float]] = {}
        for per_set in runs.values():
            for s, values in per_set.items():
                for m in SHOWN:
                    cells.setdefault(f"{s}/{m}", []).append(values[m])
            for g in groups:
                in_group = [per_set[s] for s in ordered if sets[s] == g and s in per_set]
                for m in SHOWN:
                    if in_group:
                        cells.setdefault(f"{g}/{m}", []).append(statistics.fmean(v[m] for v in in_group))
            accs = [v["id_acc"] for v in per_set.values() if "id_acc" in v]
            if accs:
                cells.setdefault("id_acc", []).append(accs[0])
        entry: dict[str, Any] = dict(zip(config_cols, key))
        entry["seeds"] = len(runs)
        entry["_runs"] = sorted(runs)
        for col in metric_cols:
            if col in cells:
                entry[col] = (*_mean_std(cells[col]), len(cells[col]))
        table.append(entry)
    table.sort(key=lambda e: tuple(str(e[c]) for c in config_cols))
    return config_cols, metric_cols, table


def _warn_mixed(members: Mapping[tuple[str, ...], Sequence[Mapping[str, str]]]) -> None:
    mixed = sorted({k for flats in members.values() for k in {k for f in flats for k in f} if len({f.get(k, "") for f in flats}) > 1})
    if mixed:
        print(f"warning: --by averages runs that differ in {', '.join(mixed)}", file=sys.stderr)


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


def to_latex(config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> str:
    """A LaTeX `booktabs` tabular (metrics in %, mean $\\pm$ std over seeds); needs `\\usepackage{booktabs}`."""

    def tex(text: str) -> str:
        for char in ("\\", "&", "%", "$", "#", "_", "{", "}"):
            text = text.replace(char, "\\" + char if char != "\\" else "\\textbackslash{}")
        return text.replace(" ± ", " $\\pm$ ")

    cols = [*config_cols, "seeds", *metric_cols]
    lines = [
        "\\begin{tabular}{" + "l" * (len(config_cols)) + "r" * (len(cols) - len(config_cols)) + "}",
        "\\toprule",
        " & ".join(tex(c) for c in cols) + " \\\\",
        "\\midrule",
        *(" & ".join(tex(_cell(entry.get(c, ""))) for c in cols) + " \\\\" for entry in table),
        "\\bottomrule",
        "\\end{tabular}",
    ]
    return "\n".join(lines) + "\n"


def _label(entry: Mapping[str, Any], config_cols: Sequence[str], detector_only: bool) -> str:
    """A short legend label: the detector, then the method and the varying keys that are not constant."""
    parts = [str(entry["detector"])]
    if not detector_only:
        parts += [f"{c.rsplit('.', 1)[-1]}={entry[c]}" for c in config_cols if c != "detector" and entry.get(c)]
    return " ".join(parts)


def write_figures(
    out: Path, config_cols: Sequence[str], table: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
    detectors: Sequence[str] | None = None,
) -> list[Path]:
    """`figures/auroc_bars.png` (every table entry), and for the chosen detectors (default
    `ood.plots.choose_scorers`) `figures/roc.png` and `figures/hist_<n>.png`, each drawn from the scores of the
    first run of its group."""
    import numpy as np

    from ood import plots

    varying = [c for c in config_cols if c not in ("detector",) and len({str(e.get(c)) for e in table}) > 1]
    single = not varying
    figures = out / "figures"
    bars = [
        (_label(e, varying, single) if not single else str(e["detector"]),
         {g: e[f"{g}/auroc"][:2] for g in ("near", "far") if f"{g}/auroc" in e})
        for e in table
    ]
    paths = [plots.auroc_bars(bars, figures / "auroc_bars.png", "near / far AUROC per configuration")]
    chosen = list(detectors) if detectors else plots.choose_scorers(rows)
    ood_sets = list(dict.fromkeys(str(r["ood_dataset"]) for r in rows))
    curves: dict[str, dict[str, np.ndarray]] = {}
    for entry in table:
        if entry["detector"] not in chosen:
            continue
        scores_file = next((Path(r) / "scores.npz" for r in entry["_runs"] if (Path(r) / "scores.npz").is_file()), None)
        if scores_file is None:
            continue
        with np.load(scores_file) as npz:
            prefix = f"{entry['detector']}/"
            curves[_label(entry, varying, single)] = {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}
    if curves:
        paths.append(plots.roc_figure(curves, ood_sets, figures / "roc.png", "ROC (first seed of each configuration)"))
        for i, (label, per_split) in enumerate(curves.items()):
            name = label if single else f"{i:02d}_{label.split()[0]}"
            paths.append(plots.histogram_figure(per_split, ood_sets, figures / f"hist_{name}.png", f"{label} scores (first seed)"))
    return paths


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
    parser.add_argument("--out", type=Path, default=None, help="folder for report.md/.csv/.tex and figures/ (default: first path)")
    parser.add_argument(
        "--by", default=None,
        help="comma-separated config keys to group by (besides method, detector, backbone, id_dataset), e.g. "
        "method.optimizer.lr,trainer.max_epochs (default: every key that differs)",
    )
    parser.add_argument("--detectors", default=None, help="comma-separated detectors to draw ROC curves and histograms of")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument(
        "--reference",
        action="append",
        type=Path,
        default=None,
        help="reference-number file(s) or folders of them (default: conf/reference/<id_dataset>.yaml when it exists)",
    )
    parser.add_argument("--no-reference", action="store_true", help="no published reference columns")
    args = parser.parse_args(argv)
    failed = failed_runs(args.paths)
    try:
        rows = load_rows(args.paths)
        if args.no_reference:
            references = []
        elif args.reference:
            references = [load_reference(p) for p in reference_files(args.reference)]
        else:
            references = default_references(rows)
    except OODError as err:
        for run, why in failed.items():
            print(f"failed job {run}: {why}", file=sys.stderr)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    config_cols, metric_cols, table = aggregate(rows, by=by)
    metric_cols = add_reference(metric_cols, table, references)
    markdown = to_markdown(config_cols, metric_cols, table)
    if failed:
        markdown += "\nFailed jobs (not in the table):\n" + "".join(f"- `{run}`: {why}\n" for run, why in failed.items())
    print(markdown)
    first = Path(args.paths[0])
    out = args.out or (first if first.is_dir() else first.parent)
    out.mkdir(parents=True, exist_ok=True)
    from ood.files import atomic_write, atomic_write_text

    atomic_write_text(out / "report.md", markdown)
    atomic_write(out / "report.csv", lambda tmp: write_csv(tmp, config_cols, metric_cols, table))
    atomic_write_text(out / "report.tex", to_latex(config_cols, metric_cols, table))
    if not args.no_figures:
        chosen = [d.strip() for d in args.detectors.split(",")] if args.detectors else None
        write_figures(out, config_cols, table, rows, chosen)
    for run, why in failed.items():
        print(f"failed job {run}: {why}", file=sys.stderr)
    for ref in references:
        protocol = f", protocol: {ref['protocol']}" if ref.get("protocol") else ""
        print(f"reference numbers ({ref['id_dataset']}, {ref['backbone']}{protocol}): {ref['source']}", file=sys.stderr)
        print(f"wrote {out}/report.md, report.csv, report.tex" + ("" if args.no_figures else ", figures/"), file=sys.stderr)


if __name__ == "__main__":
    main()
