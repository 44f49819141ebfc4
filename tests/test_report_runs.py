"""`ood-report` over real run folders (fabricated `config.yaml` + `results.jsonl` + `scores.npz`): grouping by the
whole configuration without the seed, re-evaluations counted once, `--by`, LaTeX, figures and their axes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import histogram_bars
from omegaconf import OmegaConf

from ood import plots
from ood.report import main
from ood.report.aggregation import _order, aggregate, trained_here
from ood.report.reading import load_rows
from ood.report.rendering import to_latex, to_markdown

SETS = {"near_set": "near", "far_set": "far"}


def _run(folder: Path, seed: int, epochs: int, auroc: float, *, method: str = "ce", ckpt: Path | None = None,
         init: str | None = None, data: dict | None = None) -> Path:
    """A run folder as `ood-train` (or `ood-eval` when `ckpt`) leaves it, with msp and energy rows."""
    folder.mkdir(parents=True)
    config = {"seed": seed, "train": ckpt is None, "ckpt_path": str(ckpt) if ckpt else None,
              "trainer": {"max_epochs": epochs, "enable_progress_bar": False},
              "method": {"_target_": f"ood.methods.{method}", "optimizer": {"lr": 0.05}, "scheduler": {"T_max": epochs},
                         "init": {"ckpt": init, "modules": None, "freeze": []}},
              "data": {"batch_size": 64, "num_workers": 0, **(data or {})}, "backbone": {"width": 32}, "paths": {"output_dir": str(folder)}}
    OmegaConf.save(OmegaConf.create(config), folder / "config.yaml")
    rows = [{"method": method, "detector": det, "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": s,
             "ood_group": g, "seed": seed, "auroc": auroc - i / 10, "fpr95": 0.3, "id_acc": 0.9, "method_params": {},
             "detector_params": {}} for i, det in enumerate(("msp", "energy")) for s, g in SETS.items()]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = np.random.default_rng(seed)
    scores = {f"{det}/{split}": rng.normal(1.0 if split == "test" else 0.0, 1.0, 50)
              for det in ("msp", "energy") for split in ("test", *SETS)}
    np.savez(folder / "scores.npz", **scores)
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    _run(tmp_path / "sweep" / "0", 0, 1, 0.70)
    _run(tmp_path / "sweep" / "1", 1, 1, 0.80)
    trained = _run(tmp_path / "sweep" / "2", 0, 3, 0.90)
    _run(tmp_path / "evals" / "again", 0, 15, 0.90, ckpt=trained / "checkpoints" / "last.ckpt")  # a re-evaluation
    _run(tmp_path / "evals" / "grood", 0, 15, 0.95, method="grood", ckpt=trained)  # a post-hoc method on it
    return tmp_path


def test_configurations_are_never_averaged(runs: Path) -> None:
    config_cols, metric_cols, table = aggregate(load_rows([runs]))
    assert config_cols == ["method", "detector", "backbone", "id_dataset", "trainer.max_epochs"], \
        "the varying key is a column; its alias method.scheduler.T_max and the seed are not"
    by = {(e["method"], e["detector"], e["trainer.max_epochs"]): e for e in table}
    assert sorted(by) == [("ce", "energy", "1"), ("ce", "energy", "3"), ("ce", "msp", "1"), ("ce", "msp", "3"),
                          ("grood", "energy", "3"), ("grood", "msp", "3")], "eval runs take the trained epochs"
    assert by[("ce", "msp", "1")]["seeds"] == 2 and by[("ce", "msp", "1")]["near/auroc"][:2] == pytest.approx((0.75, 0.0707107))
    assert by[("ce", "msp", "3")]["seeds"] == 1, "re-evaluating a checkpoint does not add a seed"
    assert by[("ce", "msp", "3")]["id_acc"][0] == pytest.approx(0.9) and "id_acc" in metric_cols


def test_numeric_configuration_values_sort_by_value(tmp_path: Path) -> None:
    """A sweep over trainer.max_epochs=3,10,20 was listed 10, 20, 3 (text order); numbers sort by value now."""
    for epochs in (20, 3, 10):
        _run(tmp_path / str(epochs), 0, epochs, 0.8)
    _, _, table = aggregate(load_rows([tmp_path]))
    assert [(e["detector"], e["trainer.max_epochs"]) for e in table] == [
        ("energy", "3"), ("energy", "10"), ("energy", "20"), ("msp", "3"), ("msp", "10"), ("msp", "20")]
    assert sorted(["nan", "inf", "1e-3", "lr", "0.1"], key=_order) == ["1e-3", "0.1", "inf", "lr", "nan"]


def test_the_training_run_is_kept_before_its_re_evaluation(tmp_path: Path) -> None:
    """A re-evaluation that scores a little differently (another GPU, another ood version) is dropped for the run
    that trained the checkpoint, whatever the folders' names sort like ("again" < "zz_trained" here)."""
    trained = _run(tmp_path / "zz_trained", 0, 3, 0.90)
    _run(tmp_path / "again", 0, 15, 0.85, ckpt=trained / "checkpoints" / "last.ckpt")
    rows = load_rows([tmp_path])
    assert {r["_run"] for r in rows} == {str(trained)} and max(r["auroc"] for r in rows) == 0.9


def test_evaluations_of_two_seeds_checkpoints_are_no_repeated_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ood-eval method=grood ckpt_path=<seed s run>` of a checkpoint that stores no seed records its own (0): two
    such runs are two models, not seed 0 twice."""
    for seed in (0, 1):
        trained = _run(tmp_path / "sweep" / str(seed), seed, 1, 0.8)
        _run(tmp_path / "evals" / str(seed), 0, 1, 0.7, method="grood", ckpt=trained / "checkpoints" / "last.ckpt")
    _, _, table = aggregate(load_rows([tmp_path]))
    assert {e["seeds"] for e in table if e["method"] == "grood"} == {2}
    assert "warning" not in capsys.readouterr().err


def test_a_re_evaluation_in_another_configuration_is_its_own_entry(runs: Path) -> None:
    """Re-evaluating a checkpoint with another fit fraction is not a repeat of the same numbers: its rows stay, as
    their own entry with the key as a column (they were dropped as a re-evaluation)."""
    trained = runs / "sweep" / "2" / "checkpoints" / "last.ckpt"
    _run(runs / "evals" / "half", 0, 15, 0.60, ckpt=trained, data={"fit_fraction": 0.5})
    config_cols, _, table = aggregate(load_rows([runs / "sweep", runs / "evals" / "again", runs / "evals" / "half"]))
    assert "data.fit_fraction" in config_cols
    msp = {e["data.fit_fraction"]: e for e in table if e["detector"] == "msp" and e["trainer.max_epochs"] == "3"}
    assert {k: (e["seeds"], e["near/auroc"][0]) for k, e in msp.items()} == {"": (1, pytest.approx(0.9)),
                                                                           "0.5": (1, pytest.approx(0.6))}


def test_fine_tunes_of_each_seeds_own_init_are_one_configuration(tmp_path: Path) -> None:
    """`method.init.ckpt=logs/ce_s${seed}/...`: the per-seed starting checkpoints do not split the seeds."""
    for seed in (0, 1, 2):
        _run(tmp_path / f"oe_s{seed}", seed, 10, 0.8 + seed / 100, method="oe", init=f"logs/ce_s{seed}/checkpoints/last.ckpt")
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "method.init.ckpt" not in config_cols and {e["seeds"] for e in table} == {3} and len(table) == 2


def test_parameters_interpolating_the_seed_do_not_split_seeds(tmp_path: Path) -> None:
    """OAL's `method.sampling_seed: ${seed}` (Hydra's unresolved `.hydra/config.yaml` says so) varies with the seed:
    three seeds are one configuration, in the run config and in the rows' method_params alike."""
    for seed in (0, 1, 2):
        run = _run(tmp_path / f"oal_s{seed}", seed, 10, 0.8, method="oal")
        config = OmegaConf.load(run / "config.yaml")
        config.method.sampling_seed, config.method.teacher = seed, {"seed": seed, "epochs": 30}
        OmegaConf.save(config, run / "config.yaml")
        config.method.sampling_seed, config.method.teacher.seed = "${seed}", "${seed}"
        (run / ".hydra").mkdir()
        OmegaConf.save(config, run / ".hydra" / "config.yaml")
        rows = [{**json.loads(line), "method_params": {"sampling_seed": seed, "teacher": {"seed": seed, "epochs": 30}}}
                for line in (run / "results.jsonl").read_text().splitlines()]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert not any("seed" in c for c in config_cols) and {e["seeds"] for e in table} == {3} and len(table) == 2


def test_by_chooses_the_grouping_and_warns(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_cols, _, table = aggregate(load_rows([runs / "sweep"]), by=["method.optimizer.lr"])
    assert config_cols[-1] == "method.optimizer.lr"
    assert {e["detector"]: e["seeds"] for e in table} == {"msp": 3, "energy": 3}
    assert "--by averages runs that differ in method.scheduler.T_max, trainer.max_epochs" in capsys.readouterr().err


def test_a_by_key_no_run_has_is_refused(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt `--by` key grouped by an empty column, averaging over every key that differs: one line instead."""
    with pytest.raises(SystemExit):
        main([str(runs / "sweep"), "--by", "method.optimizer.learning_rate", "--no-figures"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --by ['method.optimizer.learning_rate']: no run has these keys (method.optimizer.learning_rate: did you "
        "mean method.optimizer.lr?); the keys that differ between these runs: ['method.scheduler.T_max', "
        "'trainer.max_epochs']")
    assert not (runs / "sweep" / "report.md").exists()


def test_latex_is_booktabs(runs: Path) -> None:
    tex = to_latex(*aggregate(load_rows([runs / "sweep"])))
    lines = tex.splitlines()
    assert lines[6] == "\\begin{tabular}{lllll" + "r" * 10 + "}" and lines[7] == "\\toprule" and lines[9] == "\\midrule"
    assert lines[-4:-2] == ["\\bottomrule", "\\end{tabular}%"]
    assert "id\\_dataset & trainer.max\\_epochs & seeds" in lines[8]
    assert "ce & msp & small\\_cnn & digits & 1 & 2 & 75.00 $\\pm$ 7.07" in tex


def test_latex_escapes_each_special_character_once() -> None:
    """A config value with LaTeX's special characters (a checkpoint path from elsewhere, a `ckpt` column) compiles and
    reads as written: a backslash's own braces are not escaped again, `~` and `^` are text."""
    entry = {"method": "ce", "ckpt": "C:\\runs\\~me\\a_b^2 {x}.ckpt", "seeds": 1, "near/auroc": (0.5, 0.0, 1)}
    line = to_latex(["method", "ckpt"], ["near/auroc"], [entry]).splitlines()[10]
    assert line == ("ce & C:\\textbackslash{}runs\\textbackslash{}\\textasciitilde{}me\\textbackslash{}a\\_b"
                    "\\textasciicircum{}2 \\{x\\}.ckpt & 1 & 50.00 \\\\")


def test_a_bar_in_a_config_value_stays_in_its_cell() -> None:
    """A `|` in a config value (an OOD-set list `a|b`, a regex) opened a new Markdown column and shifted every metric
    under the wrong header; in LaTeX it printed as an em dash."""
    entry = {"method": "ce", "data.ood.far": "svhn|mnist", "seeds": 1, "near/auroc": (0.5, 0.0, 1)}
    row = to_markdown(["method", "data.ood.far"], ["near/auroc"], [entry]).splitlines()[2]
    assert row == "| ce | svhn\\|mnist | 1 | 50.00 |"
    assert re.split(r"(?<!\\)\|", row)[1:-1] == [" ce ", " svhn\\|mnist ", " 1 ", " 50.00 "]
    line = to_latex(["method", "data.ood.far"], ["near/auroc"], [entry]).splitlines()[10]
    assert line == "ce & svhn\\textbar{}mnist & 1 & 50.00 \\\\"


def test_cli_writes_tables_and_readable_figures(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = {}
    save = plots._save

    def record(fig, path):  # noqa: ANN001, ANN202 - wraps the private saver to inspect the figure
        drawn[Path(path).name] = {
            "axes": [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes if ax.get_visible()],
            "legend": [t.get_text() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg for t in leg.get_texts()],
        }
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    main([str(runs / "sweep"), "--detectors", "msp"])
    out = runs / "sweep"
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.csv", "report.tex", "figures"}
    assert sorted(drawn) == ["auroc_bars.png", "hist_00_msp.png", "hist_01_msp.png", "roc.png"]
    assert all((out / "figures" / name).stat().st_size > 10_000 for name in drawn)
    assert drawn["roc.png"]["axes"] == [(plots.FPR_LABEL, plots.TPR_LABEL, s) for s in SETS]
    assert drawn["roc.png"]["legend"] == ["msp max_epochs=1", "msp max_epochs=3", "chance"]
    assert drawn["hist_00_msp.png"]["axes"][0][:2] == ("ID score (higher = more ID)", "density")
    assert drawn["hist_00_msp.png"]["legend"] == ["ID test", "OOD set"]
    assert drawn["auroc_bars.png"]["axes"][0][0] == "AUROC (%), mean ± std over seeds"
    assert drawn["auroc_bars.png"]["legend"] == ["near-OOD", "far-OOD"]


def test_histograms_share_bins() -> None:
    fig_axes = {}
    save = plots._save
    try:
        plots._save = lambda fig, path: fig_axes.setdefault("axes", [ax for ax in fig.axes if ax.get_visible()])  # type: ignore[assignment]
        plots.histogram_figure({"test": np.array([0.0, 1.0]), "a": np.array([-5.0]), "b": np.array([3.0])}, ["a", "b"], "x.png", "t")
    finally:
        plots._save = save
    edges = [[e for e, _ in histogram_bars(ax).values()] for ax in fig_axes["axes"]]
    assert all(np.array_equal(e, edges[0][0]) for e in [*edges[0], *edges[1]]), "one set of bin edges over every split"
    assert edges[0][0][0] == pytest.approx(-5.0) and edges[0][0][-1] == pytest.approx(3.0)
    assert len(edges[0][0]) == plots.BINS + 1


def test_roc_curves_beyond_ten_stay_apart() -> None:
    """tab10 repeats after ten curves: the eleventh and twelfth get the colour of the first two with another style."""
    drawn = {}
    save = plots._save
    try:
        plots._save = lambda fig, path: drawn.setdefault("lines", [(ln.get_color(), ln.get_linestyle()) for ln in fig.axes[0].lines])  # type: ignore[assignment]
        curves = {f"d{i}": {"test": np.arange(5.0) + i, "far": np.arange(5.0)} for i in range(12)}
        plots.roc_figure(curves, ["far"], "x.png", "t")
    finally:
        plots._save = save
    styles = drawn["lines"][:12]
    assert len(set(styles)) == 12 and styles[10] == ("C0", "--") and styles[0] == ("C0", "-")


def test_roc_legend_names_curves_of_every_panel() -> None:
    """A report over two benchmarks: each configuration's curves are in its own sets' panels only, and the legend
    named only those of the first panel."""
    drawn = {}
    save = plots._save
    try:
        plots._save = lambda fig, path: drawn.setdefault("legend", [t.get_text() for t in fig.legends[0].get_texts()])  # type: ignore[assignment]
        curves = {"msp on digits": {"test": np.arange(5.0), "noise": np.arange(5.0) - 1},
                  "msp on folders": {"test": np.arange(5.0), "checkers": np.arange(5.0) - 2}}
        plots.roc_figure(curves, ["noise", "checkers"], "x.png", "t")
    finally:
        plots._save = save
    assert drawn["legend"] == ["msp on digits", "chance", "msp on folders"]


def test_a_long_roc_legend_makes_the_figure_taller_not_the_panels() -> None:
    """40 configurations (a cluster-grid report): the legend's rows fit below panels of the usual height; the layout
    failed with matplotlib's 'bottom cannot be >= top'."""
    drawn: dict[int, tuple[float, float]] = {}
    save = plots._save
    try:
        plots._save = lambda fig, path: drawn.setdefault(len(fig.legends[0].get_texts()), (  # type: ignore[assignment]
            fig.get_figheight(), fig.axes[0].get_position().height * fig.get_figheight()))
        for n in (1, 40):
            curves = {f"config {i:02d} with a long name": {"test": np.arange(5.0), "a": np.arange(5.0) - 1, "b": np.arange(5.0) - 2}
                      for i in range(n)}
            plots.roc_figure(curves, ["a", "b"], "x.png", "t")
    finally:
        plots._save = save
    (short_fig, short_panel), (long_fig, long_panel) = drawn[2], drawn[41]
    planned = 3.3 - plots.TOP - plots.BOTTOM  # a panel row of `_grid` with its legend room used up
    assert long_panel == pytest.approx(planned) and short_panel >= planned and long_fig > short_fig + 4


def test_run_figures_in_the_run_folder(tmp_path: Path) -> None:
    rows = [{"method": "ce", "detector": d, "id_dataset": "digits", "ood_dataset": "far_set", "auroc": a, "seed": 0}
            for d, a in (("msp", 0.7), ("energy", 0.8), ("knn", 0.9), ("vim", 0.6), ("gen", 0.5))]
    scores = {r["detector"]: {"test": np.arange(10.0), "far_set": np.arange(10.0) - 3} for r in rows}
    paths = plots.save_run_figures(tmp_path, scores, rows)
    assert [p.name for p in paths] == ["roc.png", "hist_msp.png", "hist_energy.png", "hist_knn.png", "hist_vim.png"]
    assert all(p.parent == tmp_path / "figures" and p.stat().st_size > 5_000 for p in paths)
    plots.save_run_figures(tmp_path, {"knn": scores["knn"]}, rows[2:3])  # a rerun into the folder, one detector
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["hist_knn.png", "roc.png"]


@pytest.mark.parametrize("references", [["--no-reference"], [], ["--reference", "conf/reference/cifar10.yaml",
                                                                   "--reference", "conf/reference/cifar100.yaml"]])
def test_wrote_line_printed_once(runs: Path, references: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """The closing "wrote report.md" line appears exactly once, with no, default or two reference files; reference
    files of no run's (ID dataset, backbone) are not named as the table's reference numbers, but in the warning."""
    from ood import PROJECT_ROOT

    refs = [a if a.startswith("--") else str(PROJECT_ROOT / a) for a in references]
    main([str(runs / "sweep"), "--no-figures", *refs])
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("wrote ")] == [f"wrote {runs / 'sweep'}/report.md, report.csv, report.tex"]
    assert not [line for line in err if line.startswith("reference numbers")]
    warning = ("warning: no --reference file matches a run's (ID dataset, backbone); the runs are [('digits', 'small_cnn')], "
               "the files' [('cifar10', 'resnet18_32x32'), ('cifar100', 'resnet18_32x32')]")
    assert [line for line in err if line.startswith("warning: no --reference")] == ([warning] if refs[1:] else [])


def test_identity_file_is_what_the_report_reads(tmp_path: Path) -> None:
    """A run's `identity.json` decides its group, over what its `config.yaml` would re-derive (old folders)."""
    from ood.runs.identity import IDENTITY_FILE, read_identity

    for seed in (0, 1):
        _run(tmp_path / f"s{seed}", seed, 3, 0.8)
    derived = read_identity(tmp_path / "s0")
    assert derived.config["trainer.max_epochs"] == "3" and derived.hash == read_identity(tmp_path / "s1").hash
    assert derived.model == str((tmp_path / "s0" / "checkpoints" / "last.ckpt").resolve())
    written = {**read_identity(tmp_path / "s1").to_json(), "config": {**derived.config, "method.optimizer.lr": "0.1"}}
    (tmp_path / "s1" / IDENTITY_FILE).write_text(json.dumps(written))
    assert read_identity(tmp_path / "s1").config["method.optimizer.lr"] == "0.1"
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "method.optimizer.lr" in config_cols and {e["seeds"] for e in table} == {1} and len(table) == 4


def test_an_empty_mapping_or_null_reads_as_a_missing_key(tmp_path: Path) -> None:
    """`ood.evaluate` writes every OOD group (`data.ood.csid: {}`, `data.ood.near: {}`, `data.ood.val: null`),
    `ood-eval` only those given: in one folder the report showed a `data.ood.csid` column of `{}` beside empty cells
    and split the seeds of one configuration in two entries. An empty mapping or null prints as a missing key (an
    empty cell, the same configuration); a column empty in every row is not shown; a set value still is."""
    far = {"far": {"x": "/data/x"}}
    _run(tmp_path / "api", 0, 3, 0.8, data={"ood": {**far, "near": {}, "val": None, "csid": {}}})
    _run(tmp_path / "cli", 1, 3, 0.7, data={"ood": far})
    config_cols, metric_cols, table = aggregate(load_rows([tmp_path]))
    assert config_cols == ["method", "detector", "backbone", "id_dataset"] and [e["seeds"] for e in table] == [2, 2]
    assert "{}" not in to_markdown(config_cols, metric_cols, table) and "null" not in to_markdown(config_cols, metric_cols, table)
    _run(tmp_path / "val", 2, 3, 0.6, data={"ood": {**far, "val": "/data/v"}})
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert config_cols[-1] == "data.ood.val"
    assert sorted((e["data.ood.val"], e["seeds"]) for e in table) == [("", 2), ("", 2), ("/data/v", 1), ("/data/v", 1)]


@pytest.mark.parametrize("value", [1e17, -3.4e38])
def test_histograms_of_constant_scores_at_a_huge_magnitude_are_drawn(value: float) -> None:
    """NumPy cannot cut +-0.5 around a constant 1e17 into 50 bins ("Too many bins for data range"): the figure widens
    the range to 1e-6 of the magnitude, and every score lands in one bin."""
    fig_axes = {}
    save = plots._save
    try:
        plots._save = lambda fig, path: fig_axes.setdefault("axes", [ax for ax in fig.axes if ax.get_visible()])  # type: ignore[assignment]
        plots.histogram_figure({"test": np.full(4, value), "a": np.full(3, value)}, ["a"], "x.png", "t")
    finally:
        plots._save = save
    (edges, heights), _ = histogram_bars(fig_axes["axes"][0]).values()
    assert len(edges) == plots.BINS + 1 and np.all(np.diff(edges) > 0)
    assert edges[0] < value < edges[-1] and np.count_nonzero(heights) == 1


def test_a_best_val_acc_run_and_an_evaluation_of_its_last_ckpt_are_two_models(tmp_path: Path) -> None:
    """A run trained with `evaluation.weights=best_val_acc` (its rows are best.ckpt's), `ood-eval` of its best.ckpt
    (as trained: the same model) and of its last.ckpt (`evaluation.weights=last`, another model): two entries apart by
    an `evaluation.weights` column, each one seed; the training run's rows are of its own model (`trained_here`). The
    epoch its best.ckpt is of was in no report (a column cannot hold it: the seeds of an entry differ): listed under
    the table, once per model."""

    def weights(run: Path, value: str | None, epoch: int | None = None) -> None:
        config = OmegaConf.load(run / "config.yaml")
        config.evaluation = {"weights": value}
        OmegaConf.save(config, run / "config.yaml")
        if epoch is not None:
            rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
            (run / "results.jsonl").write_text("".join(json.dumps({**r, "evaluated_epoch": epoch}) + "\n" for r in rows))

    trained = _run(tmp_path / "trained", 0, 3, 0.90)
    weights(trained, "best_val_acc", epoch=1)
    weights(_run(tmp_path / "eval_best", 0, 15, 0.85, ckpt=trained / "checkpoints" / "best.ckpt"), None, epoch=1)
    weights(_run(tmp_path / "eval_last", 0, 15, 0.70, ckpt=trained / "checkpoints" / "last.ckpt"), "last")
    rows = load_rows([tmp_path])
    assert {r["_run"]: trained_here(r) for r in rows} == {str(trained): True, str(tmp_path / "eval_last"): False}
    config_cols, _, table = aggregate(rows)
    assert config_cols[-1] == "evaluation.weights"
    assert sorted((e["detector"], e["evaluation.weights"], e["seeds"], e["near/auroc"][0]) for e in table) == [
        ("energy", "", 1, pytest.approx(0.6)), ("energy", "best_val_acc", 1, pytest.approx(0.8)),
        ("msp", "", 1, pytest.approx(0.7)), ("msp", "best_val_acc", 1, pytest.approx(0.9))]
    main([str(tmp_path), "--no-figures", "--no-reference", "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "report.md").read_text().endswith(
        f"\nEpochs evaluated (evaluation.weights=best_val_acc: the epoch of best ID-val accuracy, 0-based):\n- `{trained}`: 1\n")


def test_auroc_bars_show_the_lower_whiskers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The axis began 5 points below the lowest mean: knn's near bar of 81.76 ± 13.33 had its whisker (68.43) cut at
    the 70.40 edge beside msp's 75.40."""
    limits = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: limits.append(fig.axes[0].get_xlim()))
    plots.auroc_bars([("msp", {"near": (0.754, 0.01)}), ("knn", {"near": (0.8176, 0.1333), "far": (0.9, float("nan"))})],
                     tmp_path / "bars.png", "t")
    assert limits[0][0] == pytest.approx(81.76 - 13.33 - 5)


def test_every_methods_own_score_is_drawn() -> None:
    """A report over an oe sweep and a cluster sweep drew oe's own score only (the first row's method), whichever
    folder came first: cluster's entries had no curve of their own score in roc.png."""
    rows = [{"method": m, "detector": d, "auroc": a} for m, d, a in (
        ("oe", "oe", 0.6), ("oe", "msp", 0.6), ("oe", "knn", 0.9), ("cluster", "cluster", 0.7), ("cluster", "energy", 0.5))]
    assert plots.choose_scorers(rows) == ["cluster", "oe", "msp", "energy", "knn"]
    assert plots.choose_scorers(rows[3:] + rows[:3]) == ["cluster", "oe", "msp", "energy", "knn"]
    assert plots.choose_scorers(rows[:3]) == ["oe", "msp", "knn"]


def test_auroc_bars_leave_no_empty_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib's 5 % margins left 4 empty rows' height above the first bar and below the last of an 81-entry
    report (a band of 260 px each end)."""
    limits = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: limits.append(fig.axes[0].get_ylim()))
    plots.auroc_bars([(f"d{i}", {"near": (0.7, 0.01), "far": (0.9, 0.01)}) for i in range(81)], tmp_path / "b.png", "t")
    assert limits == [(80.6, -0.6)]


def test_a_detectors_roc_curves_share_its_colour_and_a_configuration_its_style(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Curves were coloured by their order: in a ce + oe report energy was blue for ce and red for oe, and oe's own
    score (the eleventh curve) dashed blue, beside ce's blue energy. A detector keeps one colour, a configuration one
    line style."""
    from ood.report.figures import write_figures

    rows = []
    for method in ("ce", "oe"):
        folder = tmp_path / method
        folder.mkdir()
        dets = ("msp", "energy", *(["oe"] if method == "oe" else []))
        rows += [{"method": method, "detector": d, "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": "s",
                  "ood_group": "near", "seed": 0, "auroc": 0.7, "fpr95": 0.5, "id_acc": 0.9, "method_params": {},
                  "detector_params": {}} for d in dets]
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["method"] == method))
        np.savez(folder / "scores.npz", **{f"{d}/{split}": np.arange(5.0) - (split == "s") for d in dets for split in ("test", "s")})
    lines = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: Path(path).name == "roc.png" and lines.extend(
        (ln.get_label(), ln.get_color(), ln.get_linestyle()) for ln in fig.axes[0].lines if ln.get_label()[0] != "_" and ln.get_label() != "chance"))
    monkeypatch.setattr(plots, "histogram_figure", lambda *a, **k: None)
    rows = load_rows([tmp_path])
    write_figures(tmp_path, *aggregate(rows)[::2], rows, ["energy", "msp", "oe"])
    assert lines == [("energy method=ce", "C0", "-"), ("msp method=ce", "C1", "-"), ("energy method=oe", "C0", "--"),
                         ("msp method=oe", "C1", "--"), ("oe method=oe", "C2", "--")]


def test_auroc_bars_draw_the_detectors_roc_draws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auroc_bars.png drew every detector x configuration beside a roc.png of four detectors (81 entries, 5,800 px tall
    for a 27-detector sweep of 3 methods): it draws the entries of roc.png's detectors, the automatic choice or
    `--detectors`, in the same order, and names them in its title; its height is 0.16 in a bar."""
    from ood.report.figures import write_figures

    detectors = ("msp", "energy", "knn", "vim", "gen", "mls")
    for lr in (0.1, 0.01):
        folder = tmp_path / str(lr)
        folder.mkdir()
        rows = [{"method": "ce", "detector": d, "backbone": "small_cnn", "id_dataset": "digits", "ood_dataset": s,
                 "ood_group": g, "seed": 0, "auroc": 0.5 + i / 20, "fpr95": 0.5, "id_acc": 0.9,
                 "method_params": {"optimizer.lr": lr}, "detector_params": {}}
                for i, d in enumerate(detectors) for s, g in (("a", "near"), ("b", "far"))]
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        np.savez(folder / "scores.npz", **{f"{d}/{s}": np.arange(5.0) - (s != "test") for d in detectors for s in ("test", "a", "b")})
    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    monkeypatch.setattr(plots, "histogram_figure", lambda *a, **k: None)
    rows = load_rows([tmp_path])
    for chosen in (None, ["vim", "msp"]):
        write_figures(tmp_path, *aggregate(rows)[::2], rows, chosen)
        ax = drawn["auroc_bars.png"].axes[0]
        curves = [ln.get_label() for ln in drawn["roc.png"].axes[0].lines if ln.get_label()[0] != "_"][:-1]  # no chance
        assert [t.get_text() for t in ax.get_yticklabels()] == curves
        drawn[str(chosen)] = (ax.get_title(), curves, drawn["auroc_bars.png"].get_figheight())
    assert drawn["None"] == ("near / far AUROC per configuration: energy, gen, mls, msp",
                             ["energy lr=0.01", "energy lr=0.1", "gen lr=0.01", "gen lr=0.1", "mls lr=0.01", "mls lr=0.1",
                              "msp lr=0.01", "msp lr=0.1"], pytest.approx(1.2 + 8 * 2 * 0.16 / 0.8))
    assert drawn["['vim', 'msp']"][:2] == ("near / far AUROC per configuration: msp, vim",
                                           ["msp lr=0.01", "msp lr=0.1", "vim lr=0.01", "vim lr=0.1"])
