"""Figures of OOD results (matplotlib figures drawn on Agg, without pyplot: the caller's pyplot backend, a notebook's
inline one, stays as it was), shared by every `ood-train` run folder, `ood.evaluate` and `ood-report`.

- `roc_figure`: ROC curves, one panel per OOD set, one line per scorer (ID is the positive class, so the x axis
  is the fraction of OOD accepted as ID and the y axis the fraction of ID accepted; FPR95 is read at y = 0.95).
- `histogram_figure`: score histograms, one panel per OOD set, ID test vs that set on bin edges shared by all
  panels, so panels are comparable; in a full-spectrum run, one more panel per covariate-shifted ID (csid) set, ID
  test vs that set, on the same bins (how far each detector pushes the shifted ID images towards OOD).
- full-spectrum rows (`mode: fsood`) get their own curves: ID = the ID test scores followed by every csid set's, in
  order, as `ood.evaluation.scoring` pools them (`mode_scores`); `roc_fsood.png` and `hist_fsood_<scorer>.png` in a
  run folder, whose OOD panels show that pooled ID (the csid panels stay ID test vs each set).
- `auroc_bars`: near and far mean AUROC per scorer, with the std over seeds as error bars.
- `sensitivity_figure`: near and far test AUROC against a detector's hyper-parameter (`ood-report` from the runs'
  `sensitivity.jsonl`), mean line and ± std band over seeds, the validation AUROC tuning compared dashed, the points
  tuning chose starred.
- `save_run_figures`: the ROC and histogram figures of one run into `<run>/figures/`.
- `roc_points` / `wandb_roc`: the same ROC vertices, thinned, as a wandb table and line plot (per mode).
- `heatmap_grid`: input | heatmap | overlay rows of the heatmap method's diagnostics (an RGB array the run
  folder saves as a PNG).

Curves come from `ood.metrics.roc_curve`, the code that computes the reported AUROC/FPR95.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ood.metrics import roc_curve

if TYPE_CHECKING:
    import torch

#: ID scores of one scorer per split name (`test` is ID test; the others are OOD and csid sets)
SplitScores = Mapping[str, Any]
#: the ID of the OOD panels per evaluation mode (`ood.evaluation.scoring.MODES`): legend label and colour
ID_LOOK = {"standard": ("ID test", "tab:blue"), "fsood": ("ID: test + csid sets", "tab:purple")}
#: line styles of the 1st, 2nd, ... ten ROC curves of a figure (tab10 colours repeat every ten)
LINE_STYLES = ("-", "--", "-.", ":")
FPR_LABEL = "FPR: OOD accepted as ID"
TPR_LABEL = "TPR: ID accepted"
ID_SPLIT = "test"
MAX_CURVE_POINTS = 1000
BINS = 50
#: the height of one `auroc_bars` bar in inches (an entry's near and far bars fill 0.8 of its row)
BAR_INCHES = 0.16


def _numpy(values: Any) -> np.ndarray:
    return np.asarray(values.numpy() if hasattr(values, "numpy") else values, dtype=np.float64).reshape(-1)


def roc_points(id_scores: Any, ood_scores: Any, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of every ROC vertex, thinned to at most `max_points` evenly spaced vertices (ends kept)."""
    curve = roc_curve(_numpy(id_scores), _numpy(ood_scores))
    keep = np.unique(np.linspace(0, len(curve.fpr) - 1, min(max_points, len(curve.fpr))).round().astype(int))
    return curve.fpr[keep], curve.tpr[keep]


def mode_scores(per_split: SplitScores, mode: str, csid_sets: Sequence[str]) -> SplitScores | None:
    """`per_split` with the ID (`test`) a mode measures: the ID test scores (`standard`), or those followed by every
    csid set's in order (`fsood`, as `ood.evaluation.scoring.evaluate`); None when a csid set was not scored."""
    if mode == "standard":
        return per_split
    if not csid_sets or any(s not in per_split for s in (ID_SPLIT, *csid_sets)):
        return None
    return {**per_split, ID_SPLIT: np.concatenate([_numpy(per_split[s]) for s in (ID_SPLIT, *csid_sets)])}


def csid_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The csid sets of full-spectrum rows, in the order their scores were pooled."""
    return list(dict.fromkeys(name for r in rows for name in r.get("csid_set_acc") or {}))


#: margins of a panel grid in inches (room for tick labels, axis labels, panel titles and the figure title): a
#: fixed layout, as every panel carries the same labels, without `tight_layout`'s measuring draw; the PNG is saved
#: with `bbox_inches="tight"`, so a title or legend wider than the panels (a one-panel report figure) is not cut
LEFT, RIGHT, TOP, BOTTOM, WSPACE, HSPACE = 0.75, 0.3, 0.75, 0.55, 0.8, 0.85
#: inches a panel grid leaves for the legend below it; a taller legend makes the figure taller (`_legend_below`)
LEGEND_ROOM = 0.6


def _grid(n: int, width: float = 3.6, height: float = 3.3) -> tuple[Figure, np.ndarray]:
    cols = 2 if n == 4 else min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows + LEGEND_ROOM))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _legend_below(fig: Figure, *axes: Axes) -> None:
    """One legend under the panels, each label once (the labels of every panel in `axes`), and the panels placed
    around it with the fixed margins above."""
    by_label = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    handles, labels = list(by_label.values()), list(by_label)
    longest = max(map(len, labels), default=1)
    ncol = max(1, min(len(labels), 4, int(fig.get_figwidth() / (0.08 * longest + 0.6))))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False, fontsize=9)
    legend_inches = -(-len(labels) // ncol) * 0.25 + 0.15
    (width, height), grid = fig.get_size_inches(), axes[0].get_gridspec()
    if legend_inches > LEGEND_ROOM:  # the panels keep their height: a long legend (the cluster grid's 36 curves) put
        height += legend_inches - LEGEND_ROOM  # their bottom above their top, and matplotlib refused the layout
        fig.set_size_inches(width, height)
    panel_w = (width - LEFT - RIGHT - WSPACE * (grid.ncols - 1)) / grid.ncols
    panel_h = (height - TOP - BOTTOM - legend_inches - HSPACE * (grid.nrows - 1)) / grid.nrows
    fig.subplots_adjust(left=LEFT / width, right=1 - RIGHT / width, top=1 - TOP / height,
                        bottom=(BOTTOM + legend_inches) / height, wspace=WSPACE / panel_w, hspace=HSPACE / panel_h)


def curve_looks(keys: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(colour, line style) of curves keyed (scorer, configuration): a scorer's colour and a configuration's style,
    the same in each of its curves, when there are at most ten scorers and four configurations; else a curve's own
    place (tab10 repeats after 10 curves: the line style tells those sharing a colour apart)."""
    scorers, configs = list(dict.fromkeys(k[0] for k in keys)), list(dict.fromkeys(k[1] for k in keys))
    if len(scorers) <= 10 and len(configs) <= len(LINE_STYLES):
        return [(f"C{scorers.index(s)}", LINE_STYLES[configs.index(c)]) for s, c in keys]
    return [(f"C{i % 10}", LINE_STYLES[i // 10 % len(LINE_STYLES)]) for i in range(len(keys))]


def roc_figure(
    curves: Mapping[str, Mapping[str, SplitScores]], ood_sets: Sequence[str], path: str | Path, title: str,
    keys: Sequence[tuple[str, str]] | None = None,
) -> Path:
    """ROC curves: a panel per OOD set, a line per label (`curves[label][split]` = ID scores of that split); `keys`,
    (scorer, configuration) per label, colours a scorer's curves alike (`curve_looks`; default: each label a scorer)."""
    looks = curve_looks(keys or [(label, "") for label in curves])
    fig, axes = _grid(len(ood_sets))
    for ax, ood in zip(axes, ood_sets):
        for (label, per_split), (color, style) in zip(curves.items(), looks):
            if ood in per_split and ID_SPLIT in per_split:
                fpr, tpr = roc_points(per_split[ID_SPLIT], per_split[ood])
                ax.plot(fpr, tpr, label=label, linewidth=1.4, color=color, linestyle=style)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8, label="chance")
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.6)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=FPR_LABEL, ylabel=TPR_LABEL, title=ood)
    fig.suptitle(title, fontsize=11)
    _legend_below(fig, *axes[: len(ood_sets)])  # every panel's: a report over two benchmarks has curves in some only
    return _save(fig, path)


def bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """NumPy's `bins` + 1 equal-width edges over `values`; where float64 cannot split their range into `bins` at their
    magnitude (constant scores of 1e16 or more, which NumPy widens by only +-0.5), a range of 1e-6 of the magnitude
    around them."""
    try:
        return np.histogram_bin_edges(values, bins=bins)
    except ValueError:
        centre, half = float(values.mean()), 0.5e-6 * float(np.abs(values).max())
        return np.linspace(min(centre - half, values.min()), max(centre + half, values.max()), bins + 1)


def histogram_figure(
    per_split: SplitScores, ood_sets: Sequence[str], path: str | Path, title: str, csid_sets: Sequence[str] = (),
    mode: str = "standard",
) -> Path:
    """Histograms of one scorer: a panel per OOD set it was scored on, ID vs that set, then a panel per csid set
    (ID test vs that covariate-shifted ID set), all on shared bin edges (a report over several ID datasets passes the
    union of their OOD sets). ID is the ID test (`standard`) or, in the OOD panels of `fsood`, the ID test followed
    by every csid set (`mode_scores`; every csid set must have been scored)."""
    pooled = mode_scores(per_split, mode, csid_sets)
    assert pooled is not None, "fsood histograms need the scores of every csid set"
    ood_sets = [s for s in ood_sets if s in per_split]
    csid_sets = [s for s in csid_sets if s in per_split]
    values = {k: _numpy(v) for k, v in per_split.items() if k == ID_SPLIT or k in ood_sets or k in csid_sets}
    edges = bin_edges(np.concatenate(list(values.values())), BINS)
    test_look = ID_LOOK["standard"]
    panels = [(s, "OOD set", "tab:red", _numpy(pooled[ID_SPLIT]), ID_LOOK[mode]) for s in ood_sets]
    panels += [(s, "csid set (ID, shifted)", "tab:green", values[ID_SPLIT], test_look) for s in csid_sets]
    fig, axes = _grid(len(panels))
    for ax, (name, label, color, ident, (id_label, id_color)) in zip(axes, panels):
        ax.hist(ident, bins=edges, density=True, histtype="stepfilled", alpha=0.55, label=id_label, color=id_color)
        ax.hist(values[name], bins=edges, density=True, histtype="stepfilled", alpha=0.55, label=label, color=color)
        ax.set(xlabel="ID score (higher = more ID)", ylabel="density", title=name if label == "OOD set" else f"{name} (csid)")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # short density labels at any score scale
    fig.suptitle(title, fontsize=11)
    _legend_below(fig, *axes[: len(panels)])
    return _save(fig, path)


def auroc_bars(entries: Sequence[tuple[str, Mapping[str, tuple[float, float]]]], path: str | Path, title: str) -> Path:
    """Horizontal bars: per entry (label, {"near"|"far": (mean, std)} in [0, 1]), near and far AUROC in %."""
    groups = [g for g in ("near", "far") if any(g in v for _, v in entries)]
    height = 0.8 / max(len(groups), 1)
    # 0.16 in (18 px) a bar: 0.64 in an entry drew 8 configurations x 4 detectors 2,360 px tall, its bars 28 px
    fig = Figure(figsize=(8.5, 1.2 + BAR_INCHES / 0.8 * len(entries) * max(len(groups), 1)))
    ax = fig.subplots()
    y = np.arange(len(entries))
    for i, group in enumerate(groups):
        means = [100 * v.get(group, (np.nan, 0))[0] for _, v in entries]
        stds = [100 * v.get(group, (np.nan, 0))[1] for _, v in entries]
        ax.barh(y + (i - (len(groups) - 1) / 2) * height, means, height, xerr=stds, label=f"{group}-OOD", capsize=2)
    ax.set_yticks(y, [label for label, _ in entries], fontsize=9)
    # the first entry on top; an entry's bars span its tick +-0.4, and 0.2 more is left at each end: matplotlib's 5 %
    # margins left the height of 4 entries empty above and below an 81-entry report's bars
    ax.set_ylim(len(entries) - 0.4, -0.6)
    # the lower whiskers too: a bar of 81.8 ± 13.3 beside one of 75 had its whisker cut at the axis edge
    finite = [100 * (m - (s if np.isfinite(s) else 0)) for _, v in entries for m, s in v.values() if np.isfinite(m)]
    ax.set_xlim(max(0.0, min(finite, default=0) - 5), 100.5)
    ax.set(xlabel="AUROC (%), mean ± std over seeds", title=title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.grid(axis="x", linewidth=0.4)
    fig.tight_layout()
    return _save(fig, path)


@dataclass(frozen=True)
class SensitivityLine:
    """One line of a `sensitivity_figure`: its `label`, the hyper-parameter's values `x`, per metric column
    (`val/auroc`, `near/auroc`, `far/auroc`, ...) the (mean, std) at each value, and per value (runs that chose it,
    runs)."""

    label: str
    x: Sequence[Any]
    cells: Mapping[str, Sequence[tuple[float, float]]]
    chosen: Sequence[tuple[int, int]]


#: a hyper-parameter's values spanning more than this factor are drawn on a log axis
LOG_SPAN = 20
#: up to this many grid values are the x ticks themselves (k = 1, 5, 10, 50, 100, not 10^0, 10^1, 10^2)
GRID_TICKS = 12
#: the least y range of a sensitivity panel, in AUROC points: a flat line (99.998 ± 0.001) is drawn flat
MIN_Y_SPAN = 1.0


def sensitivity_figure(lines: Sequence[SensitivityLine], key: str, path: str | Path, title: str) -> Path:
    """A panel per OOD group (near, far): per line its test AUROC (%) against `key` (mean, ± std band), its
    validation AUROC dashed in the same colour, and a star where tuning chose the value (with `k/n` runs when not
    every run of several did). Numbers on a log axis when they span more than `LOG_SPAN`x, ticked at the grid's own
    values (up to `GRID_TICKS`), other values (names, booleans) evenly spaced; y in plain AUROC points, at least
    `MIN_Y_SPAN` of them, so that a flat line reads flat."""
    groups = [g for g in ("near", "far") if any(f"{g}/auroc" in line.cells for line in lines)]
    values = [v for line in lines for v in line.x]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ticks = list(dict.fromkeys(values)) if not numeric else []
    fig, axes = _grid(len(groups), width=4.2)
    for ax, group in zip(axes, groups):
        for i, line in enumerate(lines):
            x = np.array(line.x, dtype=float) if numeric else np.array([ticks.index(v) for v in line.x], dtype=float)
            colour = f"C{i % 10}"
            mean, std = (100 * np.array(line.cells[f"{group}/auroc"]).T)
            ax.plot(x, mean, "o-", color=colour, markersize=3, label=line.label)
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
            val = 100 * np.array(line.cells["val/auroc"]).T[0]
            ax.plot(x, val, "--", color=colour, linewidth=1)
            for xi, yi, (chosen, runs) in zip(x, mean, line.chosen):
                if chosen:
                    ax.plot(xi, yi, "*", color=colour, markersize=13, markeredgecolor="black", markeredgewidth=0.6)
                    if runs > 1 and chosen < runs:
                        ax.annotate(f"{chosen}/{runs}", (xi, yi), textcoords="offset points", xytext=(4, 6), fontsize=7)
        if numeric and min(values) > 0 and max(values) / min(values) > LOG_SPAN:
            ax.set_xscale("log")
        if numeric and len(set(values)) <= GRID_TICKS:
            grid = sorted(set(values))
            ax.set_xticks(grid, [f"{v:g}" for v in grid])
            ax.minorticks_off()
        if not numeric:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks], fontsize=8)
        low, high = ax.get_ylim()
        if high - low < MIN_Y_SPAN:
            low, high = (low + high - MIN_Y_SPAN) / 2, (low + high + MIN_Y_SPAN) / 2
        top = 100 + min(0.5, (high - low) / 20)  # no room (nor a tick) above 100 %: the bands' std may reach past it
        if high > top:
            low, high = min(low, top - MIN_Y_SPAN), top
        ax.set_ylim(low, high)
        ax.ticklabel_format(axis="y", useOffset=False)  # 99.99, not 0.009 under a '+9.999e1'
        ax.set(xlabel=key, ylabel="AUROC (%)", title=f"{group}-OOD")
        ax.grid(linewidth=0.4)
    # the line styles' meaning, once, in black below the lines' own labels
    axes[0].plot([], [], "k-", label="test AUROC, mean ± std over seeds")
    axes[0].plot([], [], "k--", linewidth=1, label="validation AUROC (ID val vs val OOD)")
    axes[0].plot([], [], "k*", markersize=10, linestyle="none", label="chosen by tuning")
    fig.suptitle(title, fontsize=11)
    _legend_below(fig, *axes[: len(groups)])
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    from ood.files import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    return path


def choose_scorers(rows: Sequence[Mapping[str, Any]], k: int = 4) -> list[str]:
    """The scorers worth drawing: the methods' own scores, msp, energy, then the best by mean AUROC, up to `k`; the own
    scores of several methods (a report over an oe and a cluster sweep) take one of the `k` places between them, so
    that each method's entries have their own curve whichever folder the rows came from first."""
    mean: dict[str, list[float]] = {}
    for row in rows:
        mean.setdefault(str(row["detector"]), []).append(float(row["auroc"]))
    best = sorted(mean, key=lambda d: -float(np.mean(mean[d])))
    own = sorted({str(r["method"]) for r in rows if r["detector"] == r["method"]})
    picked = [*own, *(d for d in ("msp", "energy") if d in mean), *best]
    return list(dict.fromkeys(picked))[: k + max(len(own) - 1, 0)]


def clear_curves(figures: Path) -> Path:
    """`figures` without the ROC, histogram and sensitivity PNGs an earlier run into the same folder left there (another
    detector selection would leave them beside the new ones as if they were this run's)."""
    for stale in [*figures.glob("roc*.png"), *figures.glob("hist_*.png"), *figures.glob("sensitivity_*.png")]:
        stale.unlink(missing_ok=True)
    return figures


def save_run_figures(output_dir: str | Path, scores: Mapping[str, SplitScores], rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """For `choose_scorers(rows)`: `figures/roc.png` and `figures/hist_<scorer>.png` of the standard rows, and
    `figures/roc_fsood.png` and `figures/hist_fsood_<scorer>.png` of the full-spectrum rows (`mode_scores`)."""
    if not rows:
        return []
    figures = clear_curves(Path(output_dir) / "figures")
    ood_sets = list(dict.fromkeys(str(r["ood_dataset"]) for r in rows))
    csid_sets = csid_names(rows)
    modes = list(dict.fromkeys(str(r.get("mode", "standard")) for r in rows))  # standard first, as written
    names = [n for n in choose_scorers([r for r in rows if r.get("mode", "standard") == modes[0]]) if n in scores]
    where = f"{rows[0]['method']} on {rows[0]['id_dataset']} (seed {rows[0].get('seed')})"
    paths = []
    for mode in modes:
        suffix, what = ("", "") if mode == "standard" else ("_fsood", "full-spectrum (ID = test + csid sets) ")
        curves = {n: c for n in names if (c := mode_scores(scores[n], mode, csid_sets)) is not None}
        if not curves:  # a csid set's scores are missing: nothing true to draw
            continue
        paths.append(roc_figure(curves, ood_sets, figures / f"roc{suffix}.png", f"{what}ROC, {where}"))
        for name in curves:
            paths.append(histogram_figure(scores[name], ood_sets, figures / f"hist{suffix}_{name}.png",
                                          f"{name} {what}scores, {where}", csid_sets, mode))
    return paths


def wandb_roc(scores: Mapping[str, SplitScores], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """wandb payload: per scorer, a table (`ood_set`, `fpr`, `tpr`) of the thinned ROC and its line plot; for
    full-spectrum rows also `roc_table_fsood` / `roc_fsood`, with ID = the ID test followed by the csid sets."""
    import wandb

    payload: dict[str, Any] = {}
    ood_sets = list(dict.fromkeys(str(r["ood_dataset"]) for r in rows))
    csid_sets = csid_names(rows)
    for mode in dict.fromkeys(str(r.get("mode", "standard")) for r in rows):
        suffix = "" if mode == "standard" else f"_{mode}"
        for name, per_split in scores.items():
            viewed = mode_scores(per_split, mode, csid_sets)
            if viewed is None:
                continue
            data = []
            for ood in ood_sets:
                if ood in viewed:
                    fpr, tpr = roc_points(viewed[ID_SPLIT], viewed[ood], max_points=200)
                    data += [[ood, float(f), float(t)] for f, t in zip(fpr, tpr)]
            table = wandb.Table(columns=["ood_set", "fpr", "tpr"], data=data)
            payload[f"test/{name}/roc_table{suffix}"] = table
            payload[f"test/{name}/roc{suffix}"] = wandb.plot.line(table, "fpr", "tpr", stroke="ood_set",
                                                                  title=f"ROC {name}{' (' + mode + ')' if suffix else ''}")
    return payload


def heatmap_grid(images: torch.Tensor, heat: torch.Tensor, title: str) -> np.ndarray:
    """An RGB uint8 image (H, W, 3): one row per sample, columns input | heatmap max_c |M| | overlay.

    `images` [N, C, H, W] with pixels in [0, 1] (C = 1 or 3); `heat` [N, H, W] in [0, 1]."""
    n = len(images)
    fig = Figure(figsize=(4.2, 1.35 * n + 0.5), dpi=100)
    axes = fig.subplots(n, 3, squeeze=False)
    for row in range(n):
        img = images[row].permute(1, 2, 0).clamp(0, 1).numpy()
        shown = dict(cmap="gray", vmin=0, vmax=1) if img.shape[-1] == 1 else {}
        img = img[..., 0] if img.shape[-1] == 1 else img
        hm = heat[row].numpy()
        axes[row, 0].imshow(img, **shown)
        axes[row, 1].imshow(hm, cmap="inferno", vmin=0, vmax=1)
        axes[row, 1].set_xlabel(f"mean {hm.mean():.2f}", fontsize=7, labelpad=1)
        axes[row, 2].imshow(img, **shown)
        axes[row, 2].imshow(hm, cmap="inferno", vmin=0, vmax=1, alpha=0.55)
    for ax, label in zip(axes[0], ("input", "heatmap", "overlay")):
        ax.set_title(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    # a fixed layout (no ticks, so nothing to measure): 0.45 in above for the titles, 0.2 in under each row for its label
    height, row_h = fig.get_figheight(), (fig.get_figheight() - 0.65 - 0.2 * (n - 1)) / n
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / height)
    fig.subplots_adjust(left=0.1 / 4.2, right=1 - 0.1 / 4.2, top=1 - 0.45 / height, bottom=0.2 / height,
                        wspace=0.15 / 1.23, hspace=0.2 / row_h)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
