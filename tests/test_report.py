"""`ood-report`: grouping, mean ± std over seeds, near/far means per run, varying hyper-parameter columns."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from ood.report import main
from ood.report.aggregation import aggregate
from ood.report.reading import load_rows
from ood.report.rendering import FSOOD_NOTE, to_markdown


def _row(seed: int, ood: str, group: str, auroc: float, **method_params: object) -> dict:
    return {
        "method": "cluster", "detector": "cluster", "backbone": "small_cnn", "id_dataset": "digits",
        "ood_dataset": ood, "ood_group": group, "seed": seed, "auroc": auroc, "fpr95": 1 - auroc,
        "aupr_in": 0.5, "aupr_out": 0.5, "fpr95_oodpos": 0.5, "id_acc": 0.9, "n_id": 10, "n_ood": 10,
        "method_params": dict(method_params), "detector_params": {},
    }


def _write(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mean_std_over_seeds_and_group_means(tmp_path: Path) -> None:
    values = {0: (0.9, 0.6, 0.8), 1: (0.7, 0.4, 1.0)}  # near, far1, far2 per seed
    for seed, (near, far1, far2) in values.items():
        _write(tmp_path / str(seed), [
            _row(seed, "near_set", "near", near, distance="cosine"),
            _row(seed, "far_a", "far", far1, distance="cosine"),
            _row(seed, "far_b", "far", far2, distance="cosine"),
        ])
    config_cols, metric_cols, table = aggregate(load_rows([tmp_path]))
    assert config_cols == ["method", "detector", "backbone", "id_dataset"]  # nothing varies
    assert metric_cols[:2] == ["near_set/auroc", "near_set/fpr95"] and "far/auroc" in metric_cols
    (entry,) = table
    assert entry["seeds"] == 2
    assert entry["near_set/auroc"][:2] == pytest.approx((0.8, statistics.stdev([0.9, 0.7])))
    far_per_seed = [(0.6 + 0.8) / 2, (0.4 + 1.0) / 2]
    assert entry["far/auroc"][:2] == pytest.approx((statistics.fmean(far_per_seed), statistics.stdev(far_per_seed)))
    assert "80.00 ± 14.14" in to_markdown(config_cols, metric_cols, table)


def test_varying_hyperparameters_become_columns(tmp_path: Path) -> None:
    for i, distance in enumerate(["cosine", "euclidean"]):
        _write(tmp_path / str(i), [_row(0, "s", "near", 0.5 + i / 10, distance=distance, k=6)])
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "method.distance" in config_cols and "method.k" not in config_cols
    assert {e["method.distance"]: e["s/auroc"][0] for e in table} == {"cosine": 0.5, "euclidean": 0.6}


def test_a_report_on_one_run_keeps_the_runs_own_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _write(run, [_row(0, "s", "near", 0.75)])
    (run / "figures").mkdir()
    (run / "figures" / "roc.png").write_bytes(b"the run's own ROC")
    main([str(run)])
    assert (run / "figures" / "roc.png").read_bytes() == b"the run's own ROC"
    assert (run / "report" / "figures" / "auroc_bars.png").stat().st_size > 5_000 and (run / "report.md").is_file()
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {run}/report.md, report.csv, report.tex, report/figures/"


def test_unknown_figure_detector_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "run", [_row(0, "s", "near", 0.75)])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--detectors", "mps"])
    assert capsys.readouterr().err.splitlines()[-1] == "error: --detectors ['mps']: not in these runs; their detectors: ['cluster']"
    assert not (tmp_path / "report.md").exists()


def test_cli_writes_markdown_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path / "run", [_row(0, "s", "near", 0.75)])
    main([str(tmp_path)])
    assert "| 75.00 |" in capsys.readouterr().out
    (tmp_path / "taken").touch()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "taken")])
    assert capsys.readouterr().err.splitlines()[-1] == f"error: --out {tmp_path / 'taken'} is a file, not a folder"
    note = "mean ± std over the row's `seeds` runs (sample std, n - 1; one seed: the value alone)"
    assert note in (tmp_path / "report.md").read_text().splitlines()[-1]  # the std's formula goes with the table
    caption = (tmp_path / "report.tex").read_text().splitlines()[3]  # the compiled table's caption, not a % comment
    assert "mean $\\pm$ std over the row's \\texttt{seeds} runs (sample std, n - 1; one seed: the value alone)" in caption
    # which FPR95 the fpr95 column is (OpenOOD's is the other one): it was not said anywhere in the report
    fpr95 = "fpr95: OOD accepted as ID at the threshold keeping 95 % of ID (ID positive, as ODIN / Energy)"
    assert fpr95 in (tmp_path / "report.md").read_text().splitlines()[-1]
    header, line = (tmp_path / "report.csv").read_text().splitlines()
    cells = dict(zip(header.split(","), line.split(",")))
    assert (cells["s/auroc_mean"], cells["s/auroc_std"]) == ("0.75", "")  # one seed: no std (was 0.0)


def test_a_seed_run_twice_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 0 trained twice (a rerun beside its sweep) counts twice in one configuration's mean ± std: the report
    names the runs; different configurations of one seed are not repeats."""
    for name, seed, auroc in (("sweep/0", 0, 0.8), ("sweep/1", 1, 0.6), ("rerun", 0, 0.8)):
        _write(tmp_path / name, [_row(seed, "s", "near", auroc, k=6)])
    _write(tmp_path / "other", [_row(0, "s", "near", 0.5, k=7)])
    _, _, table = aggregate(load_rows([tmp_path]))
    assert {e["method.k"]: e["seeds"] for e in table} == {"6": 3, "7": 1}
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}/rerun, {tmp_path}/sweep/0 are seed 0 of one configuration: each counts as a seed in its "
        "mean ± std; report one of them"
    ]


def test_no_results_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    # an empty folder, or one that holds no run (a typo'd path, the project's root): what ood-report takes
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no results.jsonl found under {tmp_path}: ood-report takes the folders ood-train and ood-eval write, a "
        "run's (logs/train/runs/<run>) or a sweep's (logs/train/multiruns/<sweep>), or folders holding them")
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")  # a sweep stopped before its first job is a sweep
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: no results.jsonl found under {tmp_path}: a sweep that has started no job yet (its multirun.yaml alone)")
    (tmp_path / "multirun.yaml").unlink()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.jsonl").write_text("")  # a run that scored nothing (detectors=none, ce)
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert capsys.readouterr().err.splitlines()[-1] == f"error: only 1 results.jsonl without rows found under {tmp_path}"


def test_tuned_values_do_not_split_seeds(tmp_path: Path) -> None:
    """knn tuned to k=50, 100, 50 on three seeds is still one configuration with three seeds."""
    for seed, k in enumerate([50, 100, 50]):
        row = {**_row(seed, "s", "near", 0.8 + seed / 100), "detector": "knn", "detector_params": {"k": k}, "tuned": True}
        _write(tmp_path / str(seed), [row])
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "detector.k" not in config_cols
    (entry,) = table
    assert entry["seeds"] == 3 and entry["s/auroc"][0] == pytest.approx(0.81)


def test_fixed_detector_values_stay_columns(tmp_path: Path) -> None:
    """Two runs at fixed k = 10 and k = 20: one entry each, under its own k, with its own AUROC (never averaged)."""
    for i, k in enumerate([10, 20]):
        row = {**_row(0, "s", "near", 0.8 + k / 100), "detector": "knn", "detector_params": {"k": k}, "tuned": False}
        _write(tmp_path / str(i), [row])
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "detector.k" in config_cols
    assert {e["detector.k"]: (e["seeds"], e["s/auroc"][0]) for e in table} == {"10": (1, pytest.approx(0.9)),
                                                                                "20": (1, pytest.approx(1.0))}


def test_modes_are_never_averaged_also_with_by(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Standard and full-spectrum rows of the same runs stay apart: `mode` is a fixed grouping key, `--by` or not."""
    for seed in (0, 1):
        rows = [_row(seed, "s", "near", 0.9 - seed / 10),
                {**_row(seed, "s", "near", 0.6 - seed / 10), "mode": "fsood", "csid_acc": 0.7 + seed / 10}]
        _write(tmp_path / str(seed), rows)
    for by in (None, ["method.distance"]):
        config_cols, _, table = aggregate(load_rows([tmp_path]), by=by)
        assert config_cols[:5] == ["method", "detector", "backbone", "id_dataset", "mode"]
        assert {e["mode"]: (e["seeds"], e["s/auroc"][:2]) for e in table} == {
            "standard": (2, pytest.approx((0.85, statistics.stdev([0.9, 0.8])))),
            "fsood": (2, pytest.approx((0.55, statistics.stdev([0.6, 0.5]))))}
    assert "averages runs that differ" not in capsys.readouterr().err
    # the full-spectrum accuracy (ID test + csid sets pooled) is a column beside id_acc
    _, metric_cols, table = aggregate(load_rows([tmp_path]))
    assert metric_cols[-2:] == ["id_acc", "csid_acc"]
    assert {e["mode"]: e.get("csid_acc", (None,))[0] for e in table} == {"standard": None, "fsood": pytest.approx(0.75)}
    _write(tmp_path / "fsood_only", [{**_row(0, "s", "near", 0.5), "mode": "fsood"}])
    config_cols, _, table = aggregate(load_rows([tmp_path / "fsood_only"]))
    assert config_cols[-1] == "mode" and [e["mode"] for e in table] == ["fsood"]
    # report.md says what the full-spectrum rows are (it did not: mode fsood and csid_acc were read from the README)
    main([str(tmp_path / "0"), "--no-figures"])
    assert FSOOD_NOTE in (tmp_path / "0" / "report.md").read_text()
    _write(tmp_path / "standard_only", [_row(0, "s", "near", 0.5)])
    main([str(tmp_path / "standard_only"), "--no-figures"])
    assert FSOOD_NOTE not in (tmp_path / "standard_only" / "report.md").read_text()


def test_a_broken_results_line_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A line cut short or a row without a shown metric names its file and line (was a JSONDecodeError / KeyError)."""
    row = _row(0, "s", "near", 0.75)
    _write(tmp_path / "cut", [row])
    with (tmp_path / "cut" / "results.jsonl").open("a") as f:
        f.write('{"method": "clu\n')
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cut")])
    cut = tmp_path / "cut" / "results.jsonl"
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {cut}:2: not a JSON line (Unterminated string starting at)"
    _write(tmp_path / "lacking", [{k: v for k, v in row.items() if k != "auroc"}])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "lacking")])
    lacking = tmp_path / "lacking" / "results.jsonl"
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {lacking}:1: not a result row, it lacks ['auroc']"
    # a sweep's multirun.yaml given for its folder: what ood-report takes is said (it said "not a JSON line" alone)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "sweep" / "multirun.yaml")])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {tmp_path / 'sweep' / 'multirun.yaml'}:1: not a JSON line (Expecting value): ood-report takes run or "
        "sweep folders or a results.jsonl"
    )


def test_a_run_lacking_an_ood_set_is_left_out_of_that_groups_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 1 scored far set b only, seed 0 b and c: averaging seed 1's far mean (b) with seed 0's (b, c) mixes
    different sets, so far is seed 0's alone, near both seeds', and the run is named."""
    _write(tmp_path / "0", [_row(0, "a", "near", 0.9), _row(0, "b", "far", 0.8), _row(0, "c", "far", 0.6)])
    _write(tmp_path / "1", [_row(1, "a", "near", 0.7), _row(1, "b", "far", 0.8)])
    _, _, (entry,) = aggregate(load_rows([tmp_path]))
    assert entry["far/auroc"] == pytest.approx((0.7, 0.0, 1))
    assert entry["near/auroc"] == pytest.approx((0.8, statistics.stdev([0.9, 0.7]), 2))
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {tmp_path}/1 lacks OOD sets ['c'] of its configuration: left out of its far mean"
    ]


def test_figures_draw_the_lowest_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep `seed=1,0` puts seed 1 in job folder 0: the figures said "first seed" and drew it."""
    import numpy as np

    from ood import plots
    from ood.report.figures import write_figures

    for folder, seed in (("0", 1), ("1", 0)):
        _write(tmp_path / folder, [_row(seed, "s", "near", 0.75)])
        np.savez(tmp_path / folder / "scores.npz", **{"cluster/test": np.full(2, float(seed)), "cluster/s": np.zeros(1)})
    drawn = {}
    monkeypatch.setattr(plots, "histogram_figure", lambda scores, *a: drawn.update({a[2]: scores["test"][0]}))
    monkeypatch.setattr(plots, "roc_figure", lambda curves, sets, path, title, keys: drawn.update({title: None}))
    rows = load_rows([tmp_path])
    config_cols, _, table = aggregate(rows)
    write_figures(tmp_path, config_cols, table, rows, ["cluster"])
    assert drawn == {"ROC (lowest seed of each configuration)": None, "cluster scores (seed 0)": 0.0}


def test_failed_jobs_are_listed_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job's FAILED.txt (an error message over lines, as CUDA's) and a job without results are named under the table."""
    _write(tmp_path / "0", [_row(0, "s", "near", 0.75)])
    for job in ("1", "2"):
        (tmp_path / job / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / "FAILED.txt").write_text("RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be\n")
    (tmp_path / "3").mkdir()  # an `ood.evaluate` run folder (no .hydra/) that failed: it was left out of the list
    (tmp_path / "3" / "FAILED.txt").write_text("ConfigError: detector 'knn': k=0 is outside its range\n")
    main([str(tmp_path), "--no-figures"])
    assert (tmp_path / "report.md").read_text().split("Jobs not in the table (failed, not evaluated, not started, or still running):\n")[1] == (
        f"- `{tmp_path}/1`: RuntimeError: CUDA error: out of memory CUDA kernel errors might be\n"
        f"- `{tmp_path}/2`: no results: still running or killed\n"
        f"- `{tmp_path}/3`: ConfigError: detector 'knn': k=0 is outside its range\n"
    )
    err = capsys.readouterr().err.splitlines()
    assert f"failed job {tmp_path}/1: RuntimeError: CUDA error: out of memory CUDA kernel errors might be" in err
    # a job that left no error is not called failed (evaluate=false, still running, killed)
    assert f"job without results {tmp_path}/2: no results: still running or killed" in err


def test_an_evaluation_of_a_copied_training_run_counts_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep copied from a cluster keeps identity.json's old checkpoint path; an `ood-eval` of the copy names the new
    one. Both are one model: one seed, not two (and the copy still trained its model: a rerun seed is warned about)."""
    from ood.runs.identity import RunIdentity, write_identity

    config = {"trainer.max_epochs": "1"}
    for name, seed in (("0", 0), ("rerun", 0)):
        run = tmp_path / "sweep" / name
        _write(run, [_row(seed, "s", "near", 0.75)])
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").touch()
        write_identity(run, RunIdentity(config, f"/cluster/sweep/{name}/checkpoints/last.ckpt"))
    _write(tmp_path / "eval", [_row(0, "s", "near", 0.7)])
    write_identity(tmp_path / "eval", RunIdentity(config, str(tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt")))
    _, _, (entry,) = aggregate(load_rows([tmp_path]))
    assert (entry["seeds"], entry["s/auroc"][0]) == (2, 0.75)
    assert "are seed 0 of one configuration" in capsys.readouterr().err


def test_a_set_near_in_one_protocol_and_far_in_another_counts_in_each_ones_group(tmp_path: Path) -> None:
    """CIFAR-10's cifar100 is near in openood_v1.5 and far in oodformer: the oodformer runs' far mean includes it and
    they have no near mean (the first row's group was taken for every run)."""
    _write(tmp_path / "openood", [_row(0, "cifar100", "near", 0.8, protocol="openood_v1.5"),
                                  _row(0, "svhn", "far", 0.9, protocol="openood_v1.5")])
    _write(tmp_path / "oodformer", [_row(0, "cifar100", "far", 0.6, protocol="oodformer"),
                                    _row(0, "svhn", "far", 1.0, protocol="oodformer")])
    _, _, table = aggregate(load_rows([tmp_path]))
    means = {e["method.protocol"]: (e.get("near/auroc", (None,))[0], e["far/auroc"][0]) for e in table}
    assert means == {"openood_v1.5": (0.8, 0.9), "oodformer": (None, pytest.approx(0.8))}


def test_by_seed_says_what_the_seed_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--by seed` was refused as a key no run has, though every run has one."""
    _write(tmp_path / "0", [_row(0, "s", "near", 0.75)])
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--by", "seed", "--no-figures"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --by ['seed']: no run has these keys (seed: the table's mean ± std is over seeds; give one run's folder "
        "for that seed's numbers); the keys that differ between these runs: []")


def test_long_legend_values_are_cut_unless_labels_would_clash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60-character value made the legend wider than the axes; cut, two labels must not become one."""
    from ood import plots
    from ood.report.figures import write_figures

    bars: list[list[str]] = []
    monkeypatch.setattr(plots, "auroc_bars", lambda entries, *a: bars.append([label for label, _ in entries]))
    middle = ["a" * 20 + "x" * 20 + "b" * 20, "a" * 20 + "y" * 20 + "b" * 20]  # the same once cut
    for values in (["a" * 30 + "x" * 30, "short"], middle):
        for i, value in enumerate(values):
            _write(tmp_path / str(len(bars)) / str(i), [_row(0, "s", "near", 0.75, path=value)])
        rows = load_rows([tmp_path / str(len(bars))])
        config_cols, _, table = aggregate(rows)
        write_figures(tmp_path, config_cols, table, rows, ["cluster"])
    assert bars == [
        [f"cluster path={'a' * 13}…{'x' * 13}", "cluster path=short"],
        [f"cluster path={middle[0]}", f"cluster path={middle[1]}"],
    ]


def test_a_failed_rerun_into_a_folder_leaves_no_earlier_rows_under_its_name(tmp_path: Path) -> None:
    """A sweep rerun into its fixed folder with other data, failing there, left the earlier attempt's results.jsonl
    beside its own config.yaml and FAILED.txt: ood-report read the earlier data's rows as this configuration's. A run
    now removes an earlier attempt's results as it starts; the report names the job as failed."""
    from helpers import run_config

    from ood.errors import ConfigError
    from ood.report.reading import failed_runs

    run = tmp_path / "job"
    (run / ".hydra").mkdir(parents=True)
    (run / "results.jsonl").write_text(json.dumps({"id_dataset": "cifar10", "auroc": 0.9}) + "\n")
    (run / "scores.npz").write_bytes(b"earlier")
    with pytest.raises(ConfigError):
        run_config(run, ["train=false"], config_name="eval")  # no checkpoint: fails before training
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "FAILED.txt"]
    assert list(failed_runs([tmp_path])) == [str(run)]


def test_a_run_of_evaluate_false_is_named_as_such_not_as_killed(tmp_path: Path) -> None:
    """A sweep of `evaluate=false` trained every job to its checkpoint, and ood-report listed each as "no results:
    still running or killed"; it now says how to evaluate it. A job without that setting is still "killed"."""
    from ood.report.reading import failed_runs

    for job, evaluate in (("0", "false"), ("1", "true")):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / "config.yaml").write_text(f"seed: 0\nevaluate: {evaluate}\n")
    assert failed_runs([tmp_path]) == {
        str(tmp_path / "0"): f"no results: trained with evaluate=false (evaluate it: ood-eval ckpt_path={tmp_path / '0'}), "
                             "or still running",
        str(tmp_path / "1"): "no results: still running or killed",
    }


def test_no_figures_leaves_no_earlier_reports_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--no-figures` into a folder an earlier report drew in left its figures/ there, read as this report's: they
    are removed (a file of the user's stays), and a run's own figures beside a one-run report stay."""
    _write(tmp_path / "sweep" / "0", [_row(0, "s", "near", 0.75)])
    main([str(tmp_path / "sweep")])
    figures = tmp_path / "sweep" / "figures"
    (figures / "hist_00_cluster.png").write_bytes(b"an earlier report's histogram")
    main([str(tmp_path / "sweep"), "--no-figures"])
    assert not figures.exists()
    main([str(tmp_path / "sweep")])
    (figures / "notes.txt").write_text("mine")
    main([str(tmp_path / "sweep"), "--no-figures"])
    assert [p.name for p in figures.iterdir()] == ["notes.txt"]
    run = tmp_path / "sweep" / "0"
    main([str(run)])
    (run / "figures").mkdir()
    (run / "figures" / "roc.png").write_bytes(b"the run's own ROC")
    main([str(run), "--no-figures"])
    assert not (run / "report" / "figures").exists() and (run / "figures" / "roc.png").read_bytes() == b"the run's own ROC"
    assert capsys.readouterr().err.splitlines()[-1] == f"wrote {run}/report.md, report.csv, report.tex"


def test_no_figures_in_a_run_folder_leaves_no_empty_report_folder(tmp_path: Path) -> None:
    """`--no-figures` rerun in one run's folder cleared report/figures/ but left report/ behind, empty; it is removed
    then, and kept when it holds a file of the user's."""
    run = tmp_path / "run"
    _write(run, [_row(0, "s", "near", 0.75)])
    main([str(run)])
    assert (run / "report" / "figures" / "auroc_bars.png").is_file()
    main([str(run), "--no-figures"])
    assert not (run / "report").exists()
    main([str(run)])
    (run / "report" / "notes.txt").write_text("mine")
    main([str(run), "--no-figures"])
    assert [p.name for p in (run / "report").iterdir()] == ["notes.txt"]


def test_report_md_says_why_reference_numbers_are_left_out(tmp_path: Path) -> None:
    """The warnings that a reference's numbers are not beside rows of theirs (other OOD sets, another mode, a
    --reference of no run's network) went to stderr only: a reader of report.md never learnt why the ref: columns were
    missing. They are listed under the table (and its note), as the failed jobs are."""
    sets = {"cifar100": "near", "mnist": "far", "svhn": "far", "texture": "far", "places365": "far"}  # no TIN
    rows = [{"method": "ce", "detector": "msp", "backbone": "resnet18_32x32", "id_dataset": "cifar10", "seed": 0,
             "ood_dataset": s, "ood_group": g, "auroc": 0.9, "fpr95": 0.3, "mode": mode}
            for mode in ("standard", "fsood") for s, g in sets.items()]
    _write(tmp_path / "run", rows)
    main([str(tmp_path), "--no-figures"])
    report = (tmp_path / "report.md").read_text()
    head, _, left_out = report.partition("\nReference numbers left out of the table:\n")
    head, _, sources = head.partition("\nReference numbers from:\n")
    assert head.splitlines()[-1].startswith("Metrics in %") and "| ref:far/auroc |" in head
    assert sources.startswith("- (cifar10, resnet18_32x32): https://github.com/zjysteven/OpenOOD results/cifar10.csv")
    assert [line.split(" (")[0] for line in left_out.splitlines()] == [
        "- no ref: columns for the cifar10 resnet18_32x32 rows of mode=fsood: the reference's numbers are standard",
        "- no ref:near columns for the cifar10 resnet18_32x32 rows: their near-OOD sets ['cifar100'] are not the "
        "reference's ['cifar100', 'tin']"]
    main([str(tmp_path), "--no-figures", "--reference", "conf/reference/cifar10_resnet18.yaml"])
    report = (tmp_path / "report.md").read_text()
    assert report.endswith("\nReference numbers left out of the table:\n- no --reference file matches a run's (ID "
                           "dataset, backbone); the runs are [('cifar10', 'resnet18_32x32')], the files' [('cifar10', "
                           "'resnet18')]\n") and "ref:" not in report.partition("\n\n")[0]


def test_a_cell_over_fewer_seeds_than_its_row_says_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed 1 lacks far set c: the row says 2 seeds, but c and the far mean are seed 0's alone. They were printed as
    bare values ("one seed: the value alone"), read as 2 seeds' mean, and the reason went to stderr only."""
    _write(tmp_path / "0", [_row(0, "a", "near", 0.9), _row(0, "b", "far", 0.8), _row(0, "c", "far", 0.6)])
    _write(tmp_path / "1", [_row(1, "a", "near", 0.7), _row(1, "b", "far", 0.8)])
    main([str(tmp_path), "--no-figures"])
    md = (tmp_path / "report.md").read_text()
    header, _, line = md.splitlines()[:3]
    cells = dict(zip(header.split(" | "), line.split(" | ")))
    assert (cells["seeds"], cells["a/auroc"], cells["b/auroc"]) == ("2", "80.00 ± 14.14", "80.00 ± 0.00")
    assert (cells["c/auroc"], cells["far/auroc"], cells["near/auroc"]) == ("60.00 (n=1)", "70.00 (n=1)", "80.00 ± 14.14")
    assert "(n=k): over k of the row's seeds" in md
    assert f"- {tmp_path}/1 lacks OOD sets ['c'] of its configuration: left out of its far mean\n" in md
    tex = (tmp_path / "report.tex").read_text()
    assert " & 60.00 (n=1) & " in tex and "(n=k): over k of the row's seeds" in tex.splitlines()[3]
    assert md in capsys.readouterr().out  # the console shows what report.md holds


def test_a_seed_run_twice_is_named_under_the_table(tmp_path: Path) -> None:
    """The table's `seeds` counts a seed trained twice twice: report.md, which is what gets pasted, says so (it was
    on stderr only)."""
    for name, seed in (("sweep/0", 0), ("sweep/1", 1), ("rerun", 0)):
        _write(tmp_path / name, [_row(seed, "s", "near", 0.8)])
    main([str(tmp_path), "--no-figures"])
    assert (f"- {tmp_path}/rerun, {tmp_path}/sweep/0 are seed 0 of one configuration: each counts as a seed in its "
            "mean ± std; report one of them\n") in (tmp_path / "report.md").read_text()


def test_a_tuned_detector_value_reads_tuned_beside_a_fixed_one(tmp_path: Path) -> None:
    """knn with k tuned (50 on one seed, 100 on the other) beside knn with k fixed at 50: two entries, the tuned one's
    cell was blank, which did not say k was tuned."""
    for seed, k in enumerate([50, 100]):
        for tuned in (True, False):
            row = {**_row(seed, "s", "near", 0.8), "detector": "knn", "detector_params": {"k": k if tuned else 50},
                   "tuned": tuned, "tuned_params": ["k"] if tuned else []}
            _write(tmp_path / f"{tuned}{seed}", [row])
    config_cols, _, table = aggregate(load_rows([tmp_path]))
    assert "detector.k" in config_cols
    assert {e["detector.k"]: e["seeds"] for e in table} == {"50": 2, "tuned": 2}


def test_jobs_of_a_stopped_sweep_that_never_started_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep of 2 seeds x 2 learning rates stopped (SIGTERM) in job 2 left folders 0-2: the report named job 2 but
    said nothing of job 3, so the table's 2 seeds of one rate read as complete. The jobs `multirun.yaml` lists
    that have no folder are named, with their overrides and the command that runs them."""
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  sweep:\n    dir: logs/x\n    subdir: ${hydra.job.num}\n"
        "  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n    params: null\n"
        "  overrides:\n    task:\n    - seed=0,1\n    - method.optimizer.lr=0.05,0.1\n    - trainer.max_epochs=1\n")
    _write(tmp_path / "0", [_row(0, "s", "near", 0.75)])
    _write(tmp_path / "1", [_row(0, "s", "near", 0.85)])
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / "FAILED.txt").write_text("SIGTERMException: terminated by SIGTERM; resume with ckpt_path=last\n")
    main([str(tmp_path), "--no-figures"])
    why = (f"not started: the sweep stopped before it, or is still running (the sweep's command plus ckpt_path=last "
           f"hydra.sweep.dir={tmp_path} runs it and the others); to run it alone: ood-train seed=1 "
           f"method.optimizer.lr=0.1 trainer.max_epochs=1 hydra.run.dir={tmp_path}/3")
    assert (tmp_path / "report.md").read_text().endswith(f"- `{tmp_path}/3`: {why}\n")
    assert f"job not started {tmp_path}/3: {why}" in capsys.readouterr().err.splitlines()



def test_the_unstarted_jobs_of_an_evaluation_sweep_are_not_told_to_add_ckpt_path_last(tmp_path: Path) -> None:
    """An `ood-eval` sweep's jobs evaluate the checkpoint its command names (`ckpt_path=<run>/...`): the hint's
    `ckpt_path=last` replaced it (the later override wins), and an evaluation's `last` is the newest training run
    under logs/train/runs, so every job evaluated that one network. It is told to run the sweep's command again."""
    from ood.report.reading import unstarted_jobs

    (tmp_path / "multirun.yaml").write_text(
        "train: false\nhydra:\n  sweep:\n    dir: logs/x\n    subdir: ${hydra.job.num}\n  job:\n    config_name: eval\n"
        "  sweeper:\n    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n    params: null\n"
        "  overrides:\n    task:\n    - seed=0,1\n    - ckpt_path=runs/a\n")
    (tmp_path / "0").mkdir()
    assert unstarted_jobs(tmp_path / "multirun.yaml") == {str(tmp_path / "1"): (
        f"not started: the sweep stopped before it, or is still running (the sweep's command plus "
        f"hydra.sweep.dir={tmp_path} runs it and the others); to run it alone: ood-eval seed=1 ckpt_path=runs/a "
        f"hydra.run.dir={tmp_path}/1")}


@pytest.mark.parametrize("folder", ["sweep", "my sweep"])
def test_the_command_of_an_unstarted_job_runs_that_job_when_pasted(tmp_path: Path, folder: str) -> None:
    """The overrides of a job that never started were printed as Hydra hands them to the job, joined by spaces:
    pasted into bash, `key='a,b'` lost its quotes (Hydra then read a sweep), `key="a b"` became two words and
    `$\\{seed\\}` lost its backslashes. The line now ends with the command that runs the job alone, in its folder:
    the shell's words, read by Hydra's parser, are the job's overrides, values and all."""
    import shlex

    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ood.report.reading import unstarted_jobs

    sweep = tmp_path / folder
    task = ["seed=0,1", "+a='x,y'", "+b=${seed}", r"+c=\${seed}", '+d="a b"', "+e=[p,'q r']", "+f='$HOME'", "+g={k: v}",
            "+h='it\\'s'", "trainer.enable_progress_bar=false"]
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweep": {"dir": "x", "subdir": "${hydra.job.num}"}, "job": {"config_name": "train"},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": task}}}))
    (sweep / "0").mkdir()
    why = unstarted_jobs(sweep / "multirun.yaml")[str(sweep / "1")]
    words = shlex.split(why.partition("; to run it alone: ")[2])
    assert words[:1] == ["ood-train"]
    parsed = OverridesParser.create().parse_overrides(words[1:])
    assert {o.key_or_group: o.value() for o in parsed} == {
        "seed": 1, "a": "x,y", "b": "${seed}", "c": "\\${seed}", "d": "a b", "e": ["p", "q r"], "f": "$HOME",
        "g": {"k": "v"}, "h": "it's", "trainer.enable_progress_bar": False, "hydra.run.dir": str(sweep / "1")}

@pytest.mark.parametrize(("task_name", "entry"), [("train", "ood-train"), ("eval", "ood-eval")])
def test_the_command_of_an_unstarted_job_composes_the_sweeps_own_config(tmp_path: Path, task_name: str,
                                                                        entry: str) -> None:
    """The command of a job that never started, of a sweep run with a primary config of the user's own
    (`--config-dir my_conf -cn mine`) or a preset found on `hydra.searchpath`, had neither: pasted, it composed ood's
    train.yaml (another job, silently) or stopped at "unknown method 'mine'". It now names the config folder, the
    config (its entry point by its `task_name`) and the searchpath, each one shell word."""
    import shlex

    import yaml

    from ood.report.reading import unstarted_jobs

    conf, sweep = tmp_path / "my conf", tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"task_name": task_name, "hydra": {
        "sweep": {"dir": "x", "subdir": "${hydra.job.num}"}, "job": {"config_name": "mine"},
        "searchpath": [f"file://{conf}"],
        "runtime": {"config_sources": [{"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
                                       {"path": str(conf), "schema": "file", "provider": "command-line"}]},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["seed=0,1", "method=mine"]}}}))
    (sweep / "0").mkdir()
    why = unstarted_jobs(sweep / "multirun.yaml")[str(sweep / "1")]
    assert shlex.split(why.partition("; to run it alone: ")[2]) == [
        entry, f"--config-dir={conf}", "--config-name=mine", f'hydra.searchpath=["file://{conf}"]', "seed=1",
        "method=mine", f"hydra.run.dir={sweep / '1'}"]


@pytest.mark.parametrize(("train", "entry", "kept"), [(True, "ood-train", []), (False, "ood-eval", ["ckpt_path=last"])])
def test_the_command_of_an_unstarted_job_of_a_resumed_sweep_does_not_resume_another_run(
        tmp_path: Path, train: bool, entry: str, kept: list[str]) -> None:
    """A sweep resumed with `ckpt_path=last` and stopped again: its never-started job's command kept `ckpt_path=last`,
    which outside a sweep, in a folder without a checkpoint, resumes the newest run under logs/train/runs (another
    run, its rows then filed as this job's) or fails. The job trains from scratch in its sweep: so alone, without it.
    An evaluation's `ckpt_path` names what it evaluates: kept."""
    import shlex

    import yaml

    from ood.report.reading import unstarted_jobs

    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"train": train, "hydra": {
        "sweep": {"dir": "x", "subdir": "${hydra.job.num}"}, "job": {"config_name": entry[4:]},
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["seed=0,1", "ckpt_path=last"]}}}))
    (tmp_path / "0").mkdir()
    why = unstarted_jobs(tmp_path / "multirun.yaml")[str(tmp_path / "1")]
    assert shlex.split(why.partition("; to run it alone: ")[2]) == [entry, "seed=1", *kept,
                                                                   f"hydra.run.dir={tmp_path / '1'}"]


def _latex_problems(tex: str) -> list[str]:
    """What would stop a LaTeX run on report.tex or misprint it (no LaTeX here): braces, `$` or environments left open or
    closed twice, a raw `_ ^ # ~ < >` or non-ASCII character in text, a `%` (a comment) inside a line, a tabular row
    without the tabular's columns."""
    problems, envs, depth, math, columns = [], [], 0, False, 0
    for n, line in enumerate(tex.splitlines(), 1):
        if line.startswith("%"):
            continue
        cells = 1
        for token in re.findall(r"\\begin\{\w+\}(?:\{[lcr]+\})?|\\end\{\w+\}|\\ifdim\\\w+[<>=]|\\(?:[A-Za-z]+|.)|.", line):
            if token.startswith("\\begin"):
                envs.append(token[7:].split("}")[0])
                columns = len(token.split("{")[2][:-1]) if envs[-1] == "tabular" else columns
            elif token.startswith("\\end") and (not envs or envs.pop() != token[5:-1]):
                problems.append(f"line {n}: {token} closes nothing open")
            elif token in "{}":
                depth += 1 if token == "{" else -1
                problems += [f"line {n}: a }} closes no {{"] if depth < 0 else []
            elif token == "$":
                math = not math
            elif token == "&":
                cells += 1
            elif token == "%" and not line.endswith("{%") and not line.endswith("}%"):
                problems.append(f"line {n}: % comments out the rest of the line")
            elif not math and (token in "_^#~<>" or not token.isascii()):
                problems.append(f"line {n}: {token} in text")
        if math:
            problems.append(f"line {n}: $ left open")
        if envs[-1:] == ["tabular"] and line.endswith("\\\\") and cells != columns:
            problems.append(f"line {n}: {cells} cells in a tabular of {columns} columns")
    return problems + ([f"{depth} braces left open"] if depth > 0 else []) + [f"\\begin{{{e}}} not ended" for e in envs]


def test_the_latex_checker_finds_what_latex_would_stop_at() -> None:
    assert _latex_problems("\\begin{tabular}{lr}\na_b & {c} & 2 % x \\\\\n\\end{table}\n$x") == [
        "line 2: _ in text", "line 2: % comments out the rest of the line", "line 2: 3 cells in a tabular of 2 columns",
        "line 3: \\end{table} closes nothing open", "line 4: $ left open"]
    assert _latex_problems("{±} } <\n\\begin{table}") == [
        "line 1: ± in text", "line 1: a } closes no {", "line 1: < in text", "\\begin{table} not ended"]


def test_report_tex_is_a_captioned_table_a_paper_can_input(tmp_path: Path) -> None:
    """report.tex was a bare tabular: what ± is over, the std's formula and which way a metric is better were a `%`
    comment, absent from the compiled table. It is a `table` float whose caption is the note, with a label, and the
    tabular shrunk to the line width when wider (a digits report has 18 columns); it parses, special characters
    (a config value's, the note's `%`, `_`, `±`, backticks, `<sets>`) escaped. The (n=k) note points to report.md
    for the runs left out ("named below" was true under report.md's table, not in a paper's caption)."""
    from ood.report.references import STD_CONVENTIONS, SUBSET_NOTE
    from ood.report.rendering import FEWER_SEEDS_NOTE, LATEX_PACKAGE, NOTE, to_latex

    value = "C:\\a_b~^{x}<y>|&%$#±"  # a config value with every character LaTeX treats specially
    _write(tmp_path / "0", [_row(0, "s", "near", 0.75, path=value), _row(0, "t", "far", 0.6, path=value)])
    _write(tmp_path / "1", [_row(1, "s", "near", 0.7, path=value)])  # t in seed 0 only: the caption says (n=k)
    _write(tmp_path / "2", [_row(0, "s", "near", 0.8, path="plain")])  # the path a column
    main([str(tmp_path), "--no-figures"])
    tex = (tmp_path / "report.tex").read_text()
    assert _latex_problems(tex) == []
    lines = tex.splitlines()
    assert lines[0] == LATEX_PACKAGE and "\\usepackage{graphicx} (\\resizebox" in lines[0]
    assert lines[1:3] + lines[4:7] == ["\\begin{table}", "\\centering", "\\label{tab:ood-report}",
                                       "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
                                       "\\begin{tabular}{lllll" + "r" * 10 + "}"]
    assert lines[-4:] == ["\\bottomrule", "\\end{tabular}%", "}", "\\end{table}"]
    assert lines[3] == (
        "\\caption[OOD detection: metrics in \\%, mean $\\pm$ std over seeds]{Metrics in \\% (report.csv: the same as "
        "fractions, 0-1, in \\texttt{\\_mean} / \\texttt{\\_std} columns): mean $\\pm$ std over the row's \\texttt{seeds} "
        "runs (sample std, n - 1; one seed: the value alone); near/far: the mean over the group's OOD sets per run, then "
        "over seeds. fpr95: OOD accepted as ID at the threshold keeping 95 \\% of ID (ID positive, as ODIN / Energy); "
        "fpr95\\_oodpos: ID rejected at 95 \\% of OOD caught (OpenOOD v1.5's). Higher is better for auroc and the "
        "accuracies, lower for fpr95 and fpr95\\_oodpos. (n=k): over k of the row's seeds, those that scored every OOD "
        "set the cell averages (report.md names the others).}")
    assert "Higher is better for auroc and the accuracies" in (tmp_path / "report.md").read_text()  # and under report.md's
    assert lines[10].startswith("cluster & cluster & small\\_cnn & digits & C:\\textbackslash{}a\\_b\\textasciitilde{}"
                               "\\textasciicircum{}\\{x\\}$<$y$>$\\textbar{}\\&\\%\\$\\#$\\pm$ & 2 & 72.50 $\\pm$ 3.54 & ")
    # every note the caption may hold: a reference's std convention (±) and a subset column's `<sets>`
    note = " ".join([NOTE, *STD_CONVENTIONS.values(), SUBSET_NOTE, FSOOD_NOTE, FEWER_SEEDS_NOTE])
    caption = to_latex(["method"], [], [{"method": "ce", "seeds": 1}], note).splitlines()[3]
    assert _latex_problems(caption) == [] and "near[$<$sets$>$] / far[$<$sets$>$]" in caption


def test_the_note_says_report_csv_holds_fractions_and_what_seeds_counts(tmp_path: Path) -> None:
    """report.md and report.tex read "Metrics in %" while report.csv held the same numbers as fractions (0.75, not
    75.00), said nowhere; nor was the `seeds` column explained. The note says both."""
    for seed, auroc in ((0, 0.7), (1, 0.8)):
        _write(tmp_path / str(seed), [_row(seed, "s", "near", auroc)])
    main([str(tmp_path), "--no-figures"])
    note = (tmp_path / "report.md").read_text().split("\n\n")[1]
    assert note.startswith("Metrics in % (report.csv: the same as fractions, 0-1, in `_mean` / `_std` columns): mean ± "
                           "std over the row's `seeds` runs (sample std")
    csv_row = (tmp_path / "report.csv").read_text().splitlines()[1].split(",")
    header = (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    assert float(csv_row[header.index("s/auroc_mean")]) == pytest.approx(0.75)


def test_a_report_without_references_imports_no_torch(tmp_path: Path) -> None:
    """`ood-report` imported the detector registry (torch, Lightning: 6.5 of a digits report's 7.3 s) to match
    references even where there are none (digits); without figures it now needs neither."""
    import subprocess
    import sys

    _write(tmp_path / "0", [_row(0, "near_set", "near", 0.9), _row(0, "far_a", "far", 0.8)])
    code = (f"import sys; from ood.report import main; main([{str(tmp_path)!r}, '--no-figures']); "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines()[-1] == "[]"
    assert "| cluster | cluster | small_cnn | digits |" in (tmp_path / "report.md").read_text()


def test_two_networks_of_a_generic_backbone_group_are_never_averaged(tmp_path: Path) -> None:
    """A sweep `backbone=timm backbone.name=resnet18,resnet50` wrote `backbone: timm` in both runs' rows: `--by`
    (the named keys only) averaged the two networks as two seeds of one entry. Such rows are read with the network
    named, as later runs write them (`timm/resnet18`); a named group (`resnet18_32x32`, a user's `my_vit` extending
    timm) keeps its label."""
    runs = [("timm", "timm", "resnet18"), ("timm", "timm", "resnet50"), ("timm/resnet50", "timm", "resnet50"),
            ("my_vit", "timm", "vit_tiny"), ("resnet18_32x32", None, None)]
    for i, (label, library, name) in enumerate(runs):
        _write(tmp_path / str(i), [{**_row(i, "s", "near", 0.5 + i / 10), "backbone": label}])
        node = f"\n  library: {library}\n  name: {name}" if library else ""
        (tmp_path / str(i) / "config.yaml").write_text(f"seed: {i}\nbackbone:\n  _target_: x.Net{node}\n")
    _, _, table = aggregate(load_rows([tmp_path]), by=[])
    assert {e["backbone"]: (e["seeds"], round(e["s/auroc"][0], 6)) for e in table} == {
        "timm/resnet18": (1, 0.5), "timm/resnet50": (2, 0.65), "my_vit": (1, 0.8), "resnet18_32x32": (1, 0.9)}


def test_the_detectors_option_says_it_chooses_the_auroc_bars_too() -> None:
    """`--detectors` chooses the detectors of auroc_bars.png and the sensitivity figures as well as roc.png and
    hist_*.png (auroc_bars draws roc.png's detectors); its help named the curves and histograms alone."""
    from ood.report.command import parser

    said = next(a.help for a in parser()._actions if "--detectors" in a.option_strings)
    assert said == ("comma-separated detectors to draw ROC curves, histograms, AUROC bars and sensitivity figures of "
                    "(the tables and sensitivity.csv keep every detector)")


def test_an_evaluation_over_a_users_grid_is_its_own_entry_beside_the_training_runs(tmp_path: Path) -> None:
    """`ood-eval` of a training run's checkpoint with `detectors.params.knn.k=[1,5,10,50,100]` (k=1 chosen, 92.3)
    read as the training run's configuration (k over knn's own grid: 50, 63.0), so the report kept only the training
    run's rows. The user's grid (`tuned_grid`) is its own configuration value: two entries, a `detector.k` column
    telling them apart, nothing dropped; seeds tuned over one grid stay one entry."""
    from ood.runs.identity import RunIdentity, write_identity

    grid = [1, 5, 10, 50, 100]
    for seed in (0, 1):
        train, evaluated = tmp_path / "train" / str(seed), tmp_path / "eval" / str(seed)
        tuned = {**_row(seed, "s", "near", 0.63), "detector": "knn", "tuned": True, "tuned_params": ["k"]}
        _write(train, [{**tuned, "detector_params": {"k": 50, "index": "exact"}}])
        _write(evaluated, [{**tuned, "auroc": 0.923, "detector_params": {"k": 1 + seed, "index": "exact"},
                            "tuned_grid": {"k": grid}}])
        (train / "checkpoints").mkdir()
        (train / "checkpoints" / "last.ckpt").touch()
        for run in (train, evaluated):
            write_identity(run, RunIdentity({}, str((train / "checkpoints" / "last.ckpt").resolve())))
    dropped: dict[tuple[str, str], set[str]] = {}
    rows = load_rows([tmp_path / "train", tmp_path / "eval"], dropped)
    assert (len(rows), dropped) == (4, {})
    config_cols, _, table = aggregate(rows)
    assert "detector.k" in config_cols
    assert {e["detector.k"]: (e["seeds"], e["s/auroc"][0]) for e in table} == {
        "tuned": (2, 0.63), "tuned [1, 5, 10, 50, 100]": (2, 0.923)}
    main([str(tmp_path / "train"), str(tmp_path / "eval"), "--no-figures", "--no-reference", "--out", str(tmp_path)])
    assert "| tuned [1, 5, 10, 50, 100] |" in (tmp_path / "report.md").read_text()
