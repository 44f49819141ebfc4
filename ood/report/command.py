"""The `ood-report` command line: read, aggregate, add reference numbers, print and write the tables and figures."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ood.errors import OODError
from ood.files import atomic_write, atomic_write_text
from ood.report.aggregation import aggregate, config_keys, evaluated_epochs, varying_params
from ood.report.figures import clear_figures, write_figures
from ood.report.reading import NOT_STARTED, RESUMED_IN, failed_runs, load_rows
from ood.report.references import (
    add_reference,
    default_references,
    load_reference,
    reference_files,
    std_notes,
)
from ood.report.rendering import (
    FEWER_SEEDS_NOTE,
    FSOOD_NOTE,
    NOTE,
    fewer_seeds,
    to_latex,
    to_markdown,
    write_csv,
)
from ood.report.sensitivity import (
    CSV_FILE,
    fewer_runs,
    left_out_sensitivity,
    load_sensitivity,
    report_note,
    sensitivity_table,
    write_sensitivity_figures,
)


def parser() -> argparse.ArgumentParser:
    """The `ood-report` arguments."""
    out = argparse.ArgumentParser(prog="ood-report", description="The comparison table over runs and sweeps.")
    out.add_argument("paths", nargs="+", help="run or multirun folders (searched for results.jsonl)")
    out.add_argument("--out", type=Path, default=None, help="folder for report.md/.csv/.tex and figures/ (default: first path)")
    out.add_argument(
        "--by", default=None,
        help="comma-separated config keys to group by (besides method, detector, backbone, id_dataset and the "
        "evaluation mode, which are never averaged over), e.g. "
        "method.optimizer.lr,trainer.max_epochs (default: every key that differs)",
    )
    out.add_argument("--detectors", default=None,
                     help="comma-separated detectors to draw ROC curves, histograms, AUROC bars and sensitivity figures "
                     "of (the tables and sensitivity.csv keep every detector)")
    out.add_argument("--no-figures", action="store_true", help="tables only")
    out.add_argument(
        "--reference",
        action="append",
        type=Path,
        default=None,
        help="reference-number file(s) or folders of them; conf/reference/... names ood's own from any directory "
        "(default: conf/reference/<id_dataset>.yaml when it exists)",
    )
    out.add_argument("--no-reference", action="store_true", help="no published reference columns")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`ood-report` entry point."""
    args = parser().parse_args(argv)
    first = Path(args.paths[0])
    out = args.out or (first if first.is_dir() else first.parent)
    if out.is_file():  # mkdir's FileExistsError, a traceback once the table was printed
        print(f"error: --out {out} is a file, not a folder", file=sys.stderr)
        sys.exit(1)
    failed = failed_runs(args.paths)
    dropped: dict[tuple[str, str], set[str]] = {}  # re-evaluations counted once: their sensitivity rows go too
    try:
        rows = load_rows(args.paths, dropped)
        swept = load_sensitivity(rows)
        if args.no_reference:
            references = []
        elif args.reference:
            references = [load_reference(p) for p in reference_files(args.reference)]
        else:
            references = default_references(rows)
    except OODError as err:
        print_missing(failed)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    chosen = [d.strip() for d in args.detectors.split(",") if d.strip()] if args.detectors else None
    scored = sorted({str(r["detector"]) for r in rows})
    unknown = [d for d in chosen or () if d not in scored]
    if unknown:
        print(f"error: --detectors {unknown}: not in these runs; their detectors: {scored}", file=sys.stderr)
        sys.exit(1)
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    keys = config_keys(rows)
    unknown = [k for k in by or () if k not in keys]
    if unknown:  # a misspelt key would group by an empty column, averaging over every other key
        close = {k: difflib.get_close_matches(k, sorted(keys), n=1) for k in unknown}
        hint = "".join(f" ({k}: did you mean {c[0]}?)" for k, c in close.items() if c)
        if "seed" in unknown:  # every run has one, but it is what the mean ± std is over, never a grouping key
            hint += " (seed: the table's mean ± std is over seeds; give one run's folder for that seed's numbers)"
        differ = [k for k in varying_params(rows) if k != "mode"]
        print(f"error: --by {unknown}: no run has these keys{hint}; the keys that differ between these runs: {differ}",
              file=sys.stderr)
        sys.exit(1)
    averaged: list[str] = []  # runs a mean leaves out, counts twice or averages over other keys: under the table too
    config_cols, metric_cols, table = aggregate(rows, by=by, notes=averaged)
    for line in left_out_sensitivity(dropped):
        print(f"warning: {line}", file=sys.stderr)
        averaged.append(line)
    left_out: list[str] = []  # why a reference's numbers are not beside rows of theirs: said under the table too
    metric_cols = add_reference(metric_cols, table, references, left_out)
    ran = sorted({(str(e["id_dataset"]), str(e["backbone"])) for e in table})
    named = sorted({(str(r["id_dataset"]), str(r["backbone"])) for r in references})
    unmatched_files = bool(args.reference) and not set(named) & set(ran)
    if unmatched_files:  # the --reference the user named added no ref: column: say why rather than leave it out silently
        left_out.append(f"no --reference file matches a run's (ID dataset, backbone); the runs are {ran}, the files' "
                        f"{named}")
    note = " ".join([NOTE, *std_notes(references, metric_cols, table),
                     *([FEWER_SEEDS_NOTE] if fewer_seeds(metric_cols, table) else []),
                     *([FSOOD_NOTE] if any(e.get("mode") == "fsood" for e in table) else [])])
    markdown = to_markdown(config_cols, metric_cols, table) + f"\n{note}\n"
    # a run folder's own figures/ are that run's ROC and histograms: the report's go beside them, in report/figures/
    figures_in = out / "report" if (out / "results.jsonl").is_file() else out
    figures_dir = None if args.no_figures else f"{'report/' if figures_in != out else ''}figures"
    if swept:  # the runs' detectors.sensitivity rows: AUROC per grid point
        point_cols, swept_cols, swept_table = sensitivity_table(swept, config_cols)
        markdown += f"\n{report_note(swept_table, figures_dir, chosen)}\n"
    epochs = evaluated_epochs(rows)
    if epochs:
        markdown += ("\nEpochs evaluated (evaluation.weights=best_val_acc: the epoch of best ID-val accuracy, "
                     "0-based):\n" + "".join(f"- `{run}`: {epoch}\n" for run, epoch in epochs.items()))
    if averaged:
        markdown += "\nWhat the means are over (warned of on stderr too):\n" + "".join(f"- {line}\n" for line in averaged)
    sources = reference_sources(references, ran)
    if sources and any(c.startswith("ref:") for c in metric_cols):  # where the ref: columns come from, kept with them
        markdown += "\nReference numbers from:\n" + "".join(f"- {line}\n" for line in sources)
    if left_out:
        markdown += "\nReference numbers left out of the table:\n" + "".join(f"- {line}\n" for line in left_out)
    if failed:
        markdown += "\nJobs not in the table (failed, not evaluated, not started, or still running):\n" + "".join(f"- `{run}`: {why}\n" for run, why in failed.items())
    print(markdown)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown)
    atomic_write(out / "report.csv", lambda tmp: write_csv(tmp, config_cols, metric_cols, table))
    atomic_write_text(out / "report.tex", to_latex(config_cols, metric_cols, table, note))
    if swept:
        atomic_write(out / CSV_FILE, lambda tmp: write_csv(tmp, [*config_cols, *point_cols, "chosen"], swept_cols, swept_table))
        for line in fewer_runs(swept_table, table, config_cols):
            print(f"warning: {line}", file=sys.stderr)
    else:  # an earlier report's would be read as this one's
        (out / CSV_FILE).unlink(missing_ok=True)
    if args.no_figures:
        clear_figures(figures_in)
        if figures_in != out and figures_in.is_dir() and not any(figures_in.iterdir()):
            figures_in.rmdir()  # report/ held only the figures just cleared: an empty folder would read as a report
    else:
        write_figures(figures_in, config_cols, table, rows, chosen)
        if swept:
            write_sensitivity_figures(figures_in / "figures", config_cols, swept_table, chosen)
    print_missing(failed)
    for line in sources:
        print(f"reference numbers {line}", file=sys.stderr)
    if unmatched_files:
        print(f"warning: {left_out[-1]}", file=sys.stderr)
    figures = "" if figures_dir is None else f", {figures_dir}/"
    print(f"wrote {out}/report.md, report.csv, report.tex{f', {CSV_FILE}' if swept else ''}{figures}", file=sys.stderr)


def reference_sources(references: Sequence[Mapping[str, Any]], ran: Sequence[tuple[str, str]]) -> list[str]:
    """`(<ID dataset>, <backbone>[, protocol: ...]): <source>` of each reference of a (ID dataset, backbone) the table
    ran; those of another network (conf/reference/cifar10_resnet18.yaml beside 32 px runs) are not named."""
    lines = []
    for ref in references:
        if (str(ref["id_dataset"]), str(ref["backbone"])) in ran:
            protocol = f", protocol: {ref['protocol']}" if ref.get("protocol") else ""
            lines.append(f"({ref['id_dataset']}, {ref['backbone']}{protocol}): {ref['source']}")
    return lines


def print_missing(missing: dict[str, str]) -> None:
    """The jobs without results on stderr: "failed job" for those that left an error, "resumed job" for those a later
    run resumed in another folder, "job not started" for those of a sweep that have no folder, else "job without
    results" (trained with evaluate=false, still running, or killed)."""
    for run, why in missing.items():
        label = ("job without results" if why.startswith("no results") else
                 "job not started" if why.startswith(NOT_STARTED) else
                 "resumed job" if why.startswith(RESUMED_IN) else "failed job")
        print(f"{label} {run}: {why}", file=sys.stderr)
