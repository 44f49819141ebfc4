"""The report's figures (`figures/` next to the tables), of the chosen detectors: near/far AUROC bars of their table
entries, ROC curves per OOD set and score histograms, drawn by `ood.plots` from the lowest seed of each group; a
full-spectrum entry (`mode=fsood`) draws its curves with ID = the ID test followed by its run's csid sets
(`ood.plots.mode_scores`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: legend values longer than this are cut in the middle (a long path or list squeezed the axes to a sliver)
LABEL_VALUE = 28


def _short(value: Any, width: int | None) -> str:
    text = str(value)
    return text if width is None or len(text) <= width else f"{text[:width // 2 - 1]}…{text[-(width // 2 - 1):]}"


def _label(entry: Mapping[str, Any], config_cols: Sequence[str], detector_only: bool, width: int | None = None) -> str:
    """A short legend label: the detector, then the method and the varying keys that are not constant, each value cut
    to `width` characters."""
    parts = [str(entry["detector"])]
    if not detector_only:
        parts += [f"{c.rsplit('.', 1)[-1]}={_short(entry[c], width)}" for c in config_cols if c != "detector" and entry.get(c)]
    return " ".join(parts)


def clear_figures(out: Path) -> None:
    """Remove the figures an earlier report left in `out/figures` (`--no-figures`: they would be read as this
    report's), and the folder when nothing else is in it."""
    figures = out / "figures"
    if not figures.is_dir():
        return
    from ood import plots  # matplotlib, only when there is something to clear

    plots.clear_curves(figures)
    (figures / "auroc_bars.png").unlink(missing_ok=True)
    if not any(figures.iterdir()):
        figures.rmdir()


def write_figures(
    out: Path, config_cols: Sequence[str], table: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
    detectors: Sequence[str] | None = None,
) -> list[Path]:
    """For the chosen detectors (default `ood.plots.choose_scorers`): `figures/auroc_bars.png` (their table
    entries, the detectors named in its title), `figures/roc.png` and `figures/hist_<n>.png` (`hist_<nn>_fsood_<detector>.png` for a
    full-spectrum entry), each drawn from the scores of the lowest seed of its group (not its first folder: a sweep's job `0` may be
    any seed, and `10` sorts before `2`)."""
    import numpy as np

    from ood import plots

    varying = [c for c in config_cols if c not in ("detector",) and len({str(e.get(c)) for e in table}) > 1]
    single = not varying
    # cut long values unless that makes two entries' labels equal (one curve would hide the other)
    width = LABEL_VALUE if len({_label(e, varying, single, LABEL_VALUE) for e in table}) == len(table) else None
    figures = plots.clear_curves(out / "figures")
    chosen = list(detectors) if detectors else plots.choose_scorers(rows)
    # the bars of roc.png's detectors only: every detector x configuration (81 bars of a 27-detector, 3-method
    # report) made a figure 5,800 px tall
    bars = [
        (_label(e, varying, single, width) if not single else str(e["detector"]),
         {g: e[f"{g}/auroc"][:2] for g in ("near", "far") if f"{g}/auroc" in e})
        for e in table if e["detector"] in chosen
    ]
    drawn = ", ".join(dict.fromkeys(str(e["detector"]) for e in table if e["detector"] in chosen))  # the bars' order
    paths = [plots.auroc_bars(bars, figures / "auroc_bars.png", f"near / far AUROC per configuration: {drawn}")]
    ood_sets = list(dict.fromkeys(str(r["ood_dataset"]) for r in rows))
    curves: dict[str, plots.SplitScores] = {}  # label -> scores, ID as the entry's mode measures it
    scored: dict[str, tuple[str, list[str], dict[str, np.ndarray], Any]] = {}  # label -> mode, csid sets, scores, seed
    keys: dict[str, tuple[str, str]] = {}  # label -> (detector, the rest): a detector's curves share a colour
    seed_of = {str(r["_run"]): r.get("seed") for r in rows}
    for entry in table:
        if entry["detector"] not in chosen:
            continue
        runs = sorted(entry["_runs"], key=lambda r: (not isinstance(seed_of.get(r), int), seed_of.get(r) or 0, r))
        run = next((Path(r) for r in runs if (Path(r) / "scores.npz").is_file()), None)
        if run is None:
            continue
        mode = entry.get("mode", "standard")  # a column whenever a row is full-spectrum
        csid_sets = plots.csid_names([r for r in rows if r["_run"] == str(run)])
        with np.load(run / "scores.npz") as npz:
            prefix = f"{entry['detector']}/"
            per_split = {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}
        viewed = plots.mode_scores(per_split, mode, csid_sets)
        if viewed is not None:
            label = _label(entry, varying, single, width)
            curves[label], scored[label] = viewed, (mode, csid_sets, per_split, seed_of[str(run)])
            keys[label] = (str(entry["detector"]), label[len(str(entry["detector"])):])
    if curves:
        full = " (fsood: ID = ID test + csid sets)" if any(mode == "fsood" for mode, *_ in scored.values()) else ""
        paths.append(plots.roc_figure(curves, ood_sets, figures / "roc.png", f"ROC (lowest seed of each configuration){full}",
                                      list(keys.values())))
        for i, (label, (mode, csid_sets, per_split, seed)) in enumerate(scored.items()):
            # a full-spectrum entry's file says so, as a run's `hist_fsood_<scorer>.png` does
            fs = "fsood_" if mode == "fsood" else ""
            name = f"{fs}{label}" if single else f"{i:02d}_{fs}{label.split()[0]}"
            what = " full-spectrum" if mode == "fsood" else ""
            paths.append(plots.histogram_figure(per_split, ood_sets, figures / f"hist_{name}.png",
                                                f"{label}{what} scores (seed {seed})", csid_sets, mode))
    return paths
