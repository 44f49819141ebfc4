"""Sinks: where an `EvaluationResult` goes once the evaluator has made it (a method returns its diagnostics from a
hook and never writes files or logs metrics itself).

Each sink is small and independent, configured under `evaluation.sinks` (one `_target_` node each), and called on
every rank after the evaluation pass with the result and a `SinkContext` (the rank, the loggers, `log_dict`: not the
trainer); sinks that write or print act on global rank zero only.
- `MetricLogger`: slash-named scalars through Lightning's `log_dict` (so `trainer.callback_metrics` and every logger
  get them): `test/<detector>/<ood_set>/<metric>`, `test/<detector>/near|far/<metric>`, `test/id/acc`, and the
  method's float diagnostics as `test/<method>/<key>`.
- `ResultsWriter`: `results.jsonl`, `scores.npz` with `samples.csv` (the image of each score), `validation.json`,
  `sensitivity.jsonl` (with `detectors.sensitivity=true`), `figures/` (`ood.plots`) and the method's diagnostics (`<key>.png` images, `<method>_stats.json` for the rest) in
  the run folder, each written atomically (`ood.files`: a kill leaves the earlier file or none, never half of one).
- `WandbReporter`: the results table, per-split score histograms with shared bins, ROC tables and line plots,
  diagnostic images.
- `RunTable`: the console table of the run (AUROC / FPR95 per OOD set, near and far means), naming the FPR95
  convention and ending with the run folder, then the hyper-parameters tuning chose as one compact block; with
  both evaluation modes on, each column is followed by its full-spectrum (`FS`) twin and the caption gives the
  accuracy on every covariate-shifted ID set.

Full-spectrum (`mode: fsood`) scalars are logged under `test_fsood/...` (same names as the standard `test/...`), plus
`test_fsood/csid/<set>/acc` and `test_fsood/id/acc` (OpenOOD's `csid_acc`: ID test and every csid set pooled).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from lightning.pytorch.loggers import Logger

from ood.errors import ConfigError
from ood.evaluation.evaluator import EvaluationResult, Samples
from ood.evaluation.scoring import METRICS, group_means, rows_by_mode
from ood.files import atomic_savez, atomic_write, atomic_write_text
from ood.plots import bin_edges, clear_curves, save_run_figures, wandb_roc
from ood.utils import get_logger

log = get_logger(__name__)

#: per-scorer AUROC of ID val vs validation OOD, written next to `results.jsonl` (the sweep objective)
VALIDATION_FILE = "validation.json"
#: every grid point of the swept detectors on every test set (`detectors.sensitivity=true`), next to `results.jsonl`
SENSITIVITY_FILE = "sensitivity.jsonl"


#: the image behind each row of the `scores.npz` arrays (`samples_csv`), written beside them
SAMPLES_FILE = "samples.csv"
#: the run table's title, caption and tuned block wrap at the console's width, at most this (lines stay readable)
TEXT_WIDTH = 120


def samples_csv(samples: Mapping[str, Samples]) -> str:
    """CSV text, one line per scored image: `split`, `row` (its position in every `<detector>/<split>` array of
    scores.npz), `dataset_index` (its item in the split's dataset), `label` (ID class, -1 for OOD) and `file` (the
    image file, or `<split>[<dataset_index>]` for an image held only in memory)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("split", "row", "dataset_index", "label", "file"))
    for split, s in samples.items():
        writer.writerows((split, row, i, y, name) for row, (i, y, name) in enumerate(zip(s.index, s.labels, s.names)))
    return text.getvalue()


@dataclasses.dataclass(frozen=True)
class SinkContext:
    """What a sink may use of the run it reports, built by `OODEvaluation` for each evaluation (a sink is given these
    facts, not the whole trainer and module): `is_global_zero` (sinks that write or print act there only), the run's
    `loggers` (`WandbReporter` finds its `WandbLogger` there) and the module's `log_dict` (`MetricLogger`)."""

    is_global_zero: bool
    loggers: Sequence[Logger]
    log_dict: Callable[..., None]


class Sink(Protocol):
    """Receives the result of one evaluation (called on every rank)."""

    def write(self, result: EvaluationResult, context: SinkContext) -> None: ...


def check_sink(name: str, sink: Any) -> None:
    """Refuse, when the evaluation is built, a sink whose `write` cannot take `(result, context)`: one written for the
    earlier `write(result, trainer, pl_module)` failed with a bare TypeError only after the whole run's evaluation."""
    try:
        signature = inspect.signature(sink.write)
    except AttributeError:
        signature = None
    except ValueError:  # a callable without an inspectable signature (a builtin): it is taken at its word
        return
    try:
        if signature is None:
            raise TypeError
        signature.bind(None, None)
    except TypeError:
        raise ConfigError(f"evaluation.sinks.{name}: {type(sink).__name__} needs a method write(result, context) (context: "
                          "ood.evaluation.sinks.SinkContext with is_global_zero, loggers, log_dict; sinks are no longer "
                          "given the trainer and module)") from None


def _is_image(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[-1] in (1, 3, 4)


def split_diagnostics(diagnostics: dict[str, Any]) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, Any]]:
    """(floats, images, the rest) of a method's diagnostics."""
    floats = {k: v for k, v in diagnostics.items() if isinstance(v, float)}
    images = {k: v for k, v in diagnostics.items() if _is_image(v)}
    rest = {k: v for k, v in diagnostics.items() if k not in floats and k not in images}
    return floats, images, rest


def scalar_metrics(result: EvaluationResult) -> dict[str, float]:
    """Every scalar of a result under its slash-named key."""
    metrics: dict[str, float] = {"test/id/acc": result.id_acc}
    for mode, rows in rows_by_mode(result.rows).items():
        stage = "test" if mode == "standard" else f"test_{mode}"
        for row in rows:
            for m in METRICS:
                metrics[f"{stage}/{row['detector']}/{row['ood_dataset']}/{m}"] = row[m]
        for (detector, group), means in group_means(rows).items():
            for m, value in means.items():
                metrics[f"{stage}/{detector}/{group}/{m}"] = value
        if mode == "fsood" and rows:
            metrics[f"{stage}/id/acc"] = rows[0]["csid_acc"]
            metrics.update({f"{stage}/csid/{name}/acc": acc for name, acc in rows[0]["csid_set_acc"].items()})
    floats, _, _ = split_diagnostics(result.diagnostics)
    metrics.update({f"test/{result.method}/{k}": v for k, v in floats.items()})
    return metrics


class MetricLogger:
    """Scalars through `LightningModule.log_dict`. They are identical on every rank: the max over ranks returns them
    exactly (a mean of identical floats need not), and a synced value spares Lightning's per-metric DDP warning."""

    def write(self, result: EvaluationResult, context: SinkContext) -> None:
        context.log_dict(scalar_metrics(result), sync_dist=True, reduce_fx="max")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor | np.ndarray):
        return value.tolist()
    return str(value)


def _json_lines(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, default=_jsonable) + "\n" for row in rows)


class ResultsWriter:
    """`results.jsonl` (one row per detector and OOD set), `sensitivity.jsonl` (one row per swept detector, grid
    point and OOD set, when the result has them: `detectors.sensitivity`), `scores.npz` (`<detector>/<split>` arrays), the ROC and
    histogram figures (`figures=False`: none; drawing them takes 1-2 s of a CPU evaluation, which a sweep of many
    small runs may rather leave to `ood-report`) and the method's diagnostics, in `output_dir`."""

    def __init__(self, output_dir: str | None, save_scores: bool = True, figures: bool = True) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.save_scores = save_scores
        self.figures = figures

    def write(self, result: EvaluationResult, context: SinkContext) -> None:
        if self.output_dir is None or not context.is_global_zero:
            return
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        # first: `results.jsonl` marks the files beside it as one evaluation's (`ood-report`); kept while the files
        # below are replaced, a kill there left an earlier evaluation's rows beside this one's scores
        (out / "results.jsonl").unlink(missing_ok=True)
        atomic_write_text(out / VALIDATION_FILE, json.dumps({"method": result.method, "auroc": result.validation}))
        if result.sensitivity:
            atomic_write_text(out / SENSITIVITY_FILE, _json_lines(result.sensitivity))
        else:  # an earlier run's in this folder would be reported as this run's (`ood-report`)
            (out / SENSITIVITY_FILE).unlink(missing_ok=True)
        if self.save_scores:
            flat = {f"{d}/{split}": s.numpy() for d, per_split in result.scores.items() for split, s in per_split.items()}
            atomic_savez(out / "scores.npz", flat)
        else:  # an earlier run's scores in this folder would be read back as this run's (`ood.Results`)
            (out / "scores.npz").unlink(missing_ok=True)
        if self.save_scores and result.samples:  # none from an evaluator called without the evaluation callback
            atomic_write_text(out / SAMPLES_FILE, samples_csv(result.samples))
        else:
            (out / SAMPLES_FILE).unlink(missing_ok=True)
        if self.figures:
            save_run_figures(out, result.scores, result.rows)
        else:  # an earlier run's in this folder would be taken for this run's
            clear_curves(out / "figures")
        floats, images, rest = split_diagnostics(result.diagnostics)
        for key, image in images.items():
            import matplotlib.image

            pixels = image.squeeze(-1) if image.shape[-1] == 1 else image
            atomic_write(out / f"{key}.png", functools.partial(matplotlib.image.imsave, arr=pixels, format="png"))
        for stale in out.glob("*_stats.json"):  # an earlier run's in this folder (another method's) read as this one's
            stale.unlink()
        if result.diagnostics:
            stats = {**floats, **rest}
            atomic_write_text(out / f"{result.method}_stats.json", json.dumps(stats, indent=2, default=_jsonable))
        # last: `results.jsonl` marks the run complete (`ood-report`), so a run that dies while writing the scores,
        # figures or diagnostics is reported as killed rather than taken as complete without them (or with an
        # earlier evaluation's)
        path = out / "results.jsonl"
        atomic_write_text(path, _json_lines(result.rows))
        log.debug("wrote %d result rows to %s", len(result.rows), path)  # the run table names the folder


class WandbReporter:
    """wandb dashboards (only for a `WandbLogger`): the results table, per detector one score histogram per split
    with shared bin edges (ID and OOD comparable), and the method's diagnostic images."""

    def write(self, result: EvaluationResult, context: SinkContext) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not context.is_global_zero:
            return
        for logger in context.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            rows = result.rows
            # every row's scalar fields (full-spectrum rows add csid_acc), the dicts left out
            nested = ("detector_params", "method_params", "tuned_params", "tuned_grid", "csid_set_acc")
            columns = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in nested]
            payload: dict[str, Any] = {"test/results": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}
            for detector, per_split in result.scores.items():
                edges = bin_edges(torch.cat(list(per_split.values())).numpy(), 64)
                for split, values in per_split.items():
                    payload[f"test/{detector}/{split}/scores"] = wandb.Histogram(np_histogram=np.histogram(values.numpy(), bins=edges))
            _, images, _ = split_diagnostics(result.diagnostics)
            payload.update({f"test/{result.method}/{k}": wandb.Image(v) for k, v in images.items()})
            payload.update(wandb_roc(result.scores, result.rows))
            logger.experiment.log(payload)


class RunTable:
    """The console table of one run: detector x OOD set (AUROC / FPR95 in %), near and far means.

    On a terminal (or with `COLUMNS` set) it fits the terminal's width: a wider table is printed in parts of whole
    columns, one under another (squeezed, its numbers were cut), and the title above and the caption below wrap at
    that width (at most `TEXT_WIDTH`), not at the table's (a narrow table's title broke mid-phrase). Into a log file
    the table goes whole (200 columns, 320 with both modes)."""

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir

    def write(self, result: EvaluationResult, context: SinkContext) -> None:
        if not context.is_global_zero:
            return
        if not result.rows:
            log.warning("no scores to report: no OOD set was scored, or the method has no score of its own and no "
                        "detector is configured")
            return
        from rich.console import Console
        from rich.table import Table

        modes = rows_by_mode(result.rows)
        rows = next(iter(modes.values()))
        sets = list(dict.fromkeys(r["ood_dataset"] for r in rows))
        groups = list(dict.fromkeys(r["ood_group"] for r in rows))
        means = {mode: group_means(mode_rows) for mode, mode_rows in modes.items()}
        by = {(r.get("mode", "standard"), r["detector"], r["ood_dataset"]): r for r in result.rows}
        cell = lambda m: f"{100 * m['auroc']:.2f} / {100 * m['fpr95']:.2f}"  # noqa: E731
        fs = "fsood" in modes
        # the backbone named (rows carry it from the run's info): a small_cnn and a resnet18 run read the same otherwise
        backbone = rows[0].get("backbone")
        run = f"{result.method} with {backbone} on {rows[0]['id_dataset']}" if backbone else \
            f"{result.method} on {rows[0]['id_dataset']}"
        title = f"{run} (ID acc {100 * result.id_acc:.2f}%): AUROC / FPR95 in %"
        if fs and "standard" not in modes:
            title = f"{run}, full-spectrum: AUROC / FPR95 in %"
        caption = ("FPR95: fraction of OOD accepted at the threshold keeping 95% of ID (ID positive; `fpr95_oodpos` "
                   "in results.jsonl is OpenOOD's OOD-positive one)")
        if fs:
            first = modes["fsood"][0]
            accs = ", ".join(f"{name} {100 * acc:.2f}%" for name, acc in first["csid_set_acc"].items())
            caption += (f"\nfull-spectrum (FS): ID = ID test + every covariate-shifted ID set; accuracy {accs}; "
                        f"ID test and csid pooled {100 * first['csid_acc']:.2f}%")
        # both modes: each column, then its full-spectrum twin
        columns = [(name, mode) for name in (*sets, *groups) for mode in modes]
        headers = [f"{name} FS" if mode == "fsood" and len(modes) > 1 else name for name, mode in columns]
        detectors = list(dict.fromkeys(r["detector"] for r in rows))
        cells = {d: [cell(by[mode, d, name]) if name in sets else cell(means[mode][d, name]) for name, mode in columns]
                 for d in detectors}
        console = Console()  # the terminal's width, or COLUMNS
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=200 if len(modes) == 1 else 320)
        text = min(console.width, TEXT_WIDTH)
        console.print(title, width=text, style="table.title", markup=False, highlight=False)
        # a column is its text, 2 spaces of padding and a border; the first border is 1 more
        widths = [max(len(h), *(len(cells[d][i]) for d in detectors)) + 3 for i, h in enumerate(headers)]
        room = console.width - 1 - max(map(len, ["detector", *detectors])) - 3
        for part in _column_parts(widths, room, len(modes)):  # wider than the console: parts, one under another
            table = Table()
            table.add_column("detector", justify="left")
            for i in part:
                table.add_column(headers[i], justify="right")
            for detector in detectors:
                table.add_row(detector, *(cells[detector][i] for i in part))
            console.print(table)
        console.print(caption, width=text, style="table.caption", markup=False, highlight=False)
        if self.output_dir:
            # its own unwrapped line: in a narrow table's caption the path was cut mid-name (not copyable)
            console.print(f"run folder: {self.output_dir}", highlight=False, soft_wrap=True)
        chosen = tuned_summary(rows, result.validation)
        if chosen:
            console.print(chosen, width=text, highlight=False, soft_wrap=False)


def _column_parts(widths: list[int], room: int, step: int) -> list[list[int]]:
    """The column indices in consecutive parts whose `widths` sum to at most `room` (a column and its `step - 1`
    full-spectrum twins stay together; a part has at least one such group), so that no number is cut to fit."""
    parts: list[list[int]] = [[]]
    for start in range(0, len(widths), step):
        group = list(range(start, min(start + step, len(widths))))
        if parts[-1] and sum(widths[i] for i in [*parts[-1], *group]) > room:
            parts.append([])
        parts[-1] += group
    return parts


def tuned_summary(rows: list[dict[str, Any]], validation: dict[str, float]) -> str:
    """One block naming the hyper-parameters each tuned detector chose on ID val vs validation OOD, with that
    validation AUROC in % (empty when nothing was tuned)."""
    chosen = {}
    for row in rows:
        if row.get("tuned_params") and row["detector"] not in chosen:
            params = " ".join(f"{k}={row['detector_params'][k]}" for k in row["tuned_params"])
            auroc = f" ({100 * validation[row['detector']]:.2f})" if row["detector"] in validation else ""
            chosen[row["detector"]] = f"{row['detector']} {params}{auroc}"
    if not chosen:
        return ""
    return "chosen on ID val vs validation OOD (val AUROC %): " + ", ".join(chosen.values())
