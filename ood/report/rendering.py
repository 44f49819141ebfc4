"""The comparison table as text: Markdown and LaTeX (a captioned `table` float; metrics in %, mean ± std over seeds)
and CSV (values in [0, 1], `<col>_mean` / `<col>_std`)."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: LaTeX's special characters in text, replaced in one pass (the braces of `\textbackslash{}` stay as they are); `<`
#: and `>` print as ¡ and ¿ in LaTeX's default OT1 font encoding, `±` needs a text-mode glyph: both in math
LATEX_ESCAPES = {"\\": "\\textbackslash{}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
                 "|": "\\textbar{}", "<": "$<$", ">": "$>$", "±": "$\\pm$", **{c: "\\" + c for c in "&%$#_{}"}}
#: how the numbers were made, under the Markdown table and atop the LaTeX one: a reader of the table alone cannot tell
#: the std's formula, how near/far are averaged, nor which of the two FPR95 conventions a column is
NOTE = ("Metrics in % (report.csv: the same as fractions, 0-1, in `_mean` / `_std` columns): mean ± std over the row's "
        "`seeds` runs (sample std, n - 1; one seed: the value alone); near/far: the mean over "
        "the group's OOD sets per run, then over seeds. fpr95: OOD accepted as ID at the threshold keeping 95 % of ID "
        "(ID positive, as ODIN / Energy); fpr95_oodpos: ID rejected at 95 % of OOD caught (OpenOOD v1.5's). Higher is "
        "better for auroc and the accuracies, lower for fpr95 and fpr95_oodpos.")
#: the packages report.tex's table needs, a comment atop it (the table alone does not say them)
LATEX_PACKAGE = ("% needs \\usepackage{booktabs} (\\toprule, \\midrule, \\bottomrule) and \\usepackage{graphicx} "
                 "(\\resizebox: the table shrinks to the line width when wider, else keeps its size)")
#: report.tex's table's `\label`, for `\ref` in the paper
LATEX_LABEL = "tab:ood-report"
#: its short caption, in a list of tables (the full one is the note)
LATEX_SHORT_CAPTION = "OOD detection: metrics in \\%, mean $\\pm$ std over seeds"


#: what full-spectrum rows are, under the table whenever it has some
FSOOD_NOTE = ("mode fsood: full-spectrum (OpenOOD v1.5's FSOOD), ID = ID test + the run's covariate-shifted ID (csid) "
              "sets; csid_acc: the accuracy over ID test and the csid sets pooled.")


#: what a cell's `(n=k)` says, under the table whenever a cell has one (report.tex's caption too, where nothing is
#: below: report.md names the runs left out)
FEWER_SEEDS_NOTE = ("(n=k): over k of the row's seeds, those that scored every OOD set the cell averages (report.md "
                    "names the others).")


def _cell(value: Any, seeds: int | None = None) -> str:
    """A metric cell in %: mean ± std, the value alone for one value; `(n=k)` when it is over fewer runs than the
    row's `seeds` (a run lacking an OOD set), which a reader would otherwise take it to average."""
    if isinstance(value, tuple):
        mean, std, n = value
        text = f"{100 * mean:.2f}" if n == 1 else f"{100 * mean:.2f} ± {100 * std:.2f}"
        return f"{text} (n={n})" if seeds is not None and n < seeds else text
    return str(value)


def _cells(cols: Sequence[str], entry: Mapping[str, Any]) -> list[str]:
    """A row's cells; a `ref:` cell's n is the published runs, not ours, so only our cells are held to `seeds`."""
    return [_cell(entry.get(c, ""), None if c.startswith("ref:") else entry.get("seeds")) for c in cols]


def fewer_seeds(metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a cell of the table is over fewer runs than its row's `seeds` (it then reads `(n=k)`)."""
    return any("(n=" in cell for entry in table for cell in _cells(metric_cols, entry))


def to_markdown(config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table (metrics in %, mean ± std over seeds)."""

    def md(text: str) -> str:  # a `|` in a config value (`data.ood.far=a|b`) would open a column; a newline end the row
        return " ".join(text.split("\n")).replace("|", "\\|")

    cols = [*config_cols, "seeds", *metric_cols]
    lines = ["| " + " | ".join(md(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(md(c) for c in _cells(cols, entry)) + " |" for entry in table]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]]) -> None:
    """CSV with `<col>_mean` and `<col>_std` per metric, values in [0, 1]; `_std` is empty for one value (one seed, a
    reference without std), as the Markdown shows the value alone: a 0.0 would read as seeds that agree."""
    header = [*config_cols, "seeds"] + [f"{c}_{s}" for c in metric_cols for s in ("mean", "std")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for entry in table:
            metrics = [v for c in metric_cols for v in (_mean_and_std(entry[c]) if c in entry else ("", ""))]
            writer.writerow([entry[c] for c in config_cols] + [entry["seeds"], *metrics])


def _mean_and_std(cell: tuple[float, float, int]) -> tuple[float, float | str]:
    mean, std, n = cell
    return mean, std if n > 1 else ""


def latex_text(text: str) -> str:
    """`text` as LaTeX text: special characters escaped (`LATEX_ESCAPES`), each once."""
    return re.sub(r"[\\&%$#_{}~^|<>±]", lambda m: LATEX_ESCAPES[m.group()], text)


def to_latex(config_cols: Sequence[str], metric_cols: Sequence[str], table: Sequence[Mapping[str, Any]],
             note: str = NOTE) -> str:
    """report.tex: a `table` float captioned by `note` (what ± is over, which way each metric is better: a reader of
    the compiled table sees no `%` comment) around a booktabs tabular (metrics in %, mean ± std over seeds),
    shrunk to the line width when wider (a report's many metric columns overran the page), never enlarged."""
    cols = [*config_cols, "seeds", *metric_cols]
    # the note is Markdown: its `code` spans become \texttt
    caption = re.sub(r"`([^`]*)`", r"\\texttt{\1}", latex_text(note))
    lines = [
        LATEX_PACKAGE,
        "\\begin{table}",
        "\\centering",
        f"\\caption[{LATEX_SHORT_CAPTION}]{{{caption}}}",
        f"\\label{{{LATEX_LABEL}}}",
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
        "\\begin{tabular}{" + "l" * (len(config_cols)) + "r" * (len(cols) - len(config_cols)) + "}",
        "\\toprule",
        " & ".join(latex_text(c) for c in cols) + " \\\\",
        "\\midrule",
        *(" & ".join(latex_text(c) for c in _cells(cols, entry)) + " \\\\" for entry in table),
        "\\bottomrule",
        "\\end{tabular}%",
        "}",
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"
