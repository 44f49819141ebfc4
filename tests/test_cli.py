"""The entry points end to end: a multirun over seeds, then `ood-report` on it (in this process: its jobs run in the
sweep's own process, a subprocess only imported torch again); a sweep whose Hydra plugin is not installed (in a
subprocess); `ood-eval ckpt_path=<run>` taking the detectors its training evaluated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import NO_FIGURES, multirun_here
from omegaconf import OmegaConf


@pytest.mark.slow
def test_multirun_then_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ood.report import main as report

    sweep = tmp_path / "sweep"
    multirun_here(tmp_path, monkeypatch, ["seed=0,1", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                                          "detectors.names=[msp,energy]", NO_FIGURES, f"hydra.sweep.dir={sweep}"])
    assert sorted(p.parent.name for p in sweep.glob("*/results.jsonl")) == ["0", "1"]
    report([str(sweep), "--no-figures"])
    table = (sweep / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    (msp,) = [line for line in table.splitlines() if line.startswith("| ce | msp | small_cnn | digits | 2 |")]
    # every cell the mean ± sample std over the two jobs of their results.jsonl rows (near / far: each job's mean first)
    jobs = [[json.loads(line) for line in (sweep / job / "results.jsonl").read_text().splitlines()] for job in "01"]
    rows = [[r for r in job if r["detector"] == "msp"] for job in jobs]
    per_job: dict[str, list[float]] = {"id_acc": [job[0]["id_acc"] for job in rows]}
    for metric in ("auroc", "fpr95"):
        for key, pick in [*((r["ood_dataset"], "ood_dataset") for r in rows[0]), ("near", "ood_group"), ("far", "ood_group")]:
            per_job[f"{key}/{metric}"] = [float(np.mean([r[metric] for r in job if r[pick] == key])) for job in rows]
    expected = {col: f"{100 * np.mean(v):.2f} ± {100 * np.std(v, ddof=1):.2f}" for col, v in per_job.items()}
    cells = dict(zip(header.strip("| ").split(" | "), msp.strip("| ").split(" | "), strict=True))
    assert {col: cells[col] for col in expected} == expected and len(expected) == 13


@pytest.mark.parametrize(("module", "argv", "code", "last_line"), [
    ("ood.eval", ["detectors.parms=3"], 1, "error: unknown config key 'detectors.parms': did you mean detectors.params=...? "
                                           "(+detectors.parms=... would add it as a new key)"),
    ("ood.report", [], 2, "ood-report: error: the following arguments are required: paths"),
], ids=["ood.eval", "ood.report"])
def test_python_m_runs_the_entry_point(module: str, argv: list[str], code: int, last_line: str) -> None:
    """`python -m ood.eval` / `python -m ood.report`, the commands benchmarks/parity_openood.py runs, are `ood-eval` /
    `ood-report` (each refuses a command line as the entry point does): test_parity runs those commands in-process
    through `main`, so their `__main__` code runs here only (well under a second each: refused before torch loads)."""
    proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.splitlines()[-1:]) == (code, [last_line]), proc.stderr


@pytest.mark.parametrize(("override", "plugin"), [("hydra/launcher=slurm", "hydra_submitit_launcher"),
                                                  ("hydra/launcher=parallel", "hydra_joblib_launcher"),
                                                  ("hydra/sweeper=optuna_val", "hydra_optuna_sweeper")])
def test_a_sweep_plugin_not_installed_says_to_install_the_sweep_extra(tmp_path: Path, override: str, plugin: str) -> None:
    """Without the `sweep` extra, `hydra/launcher=slurm` ended in Hydra's "Could not load
    'hydra/launcher/submitit_slurm'" and its config search path; one line now says what to install. The plugin is
    made missing for the subprocess only (`None` in `sys.modules`: its import fails, Hydra's plugin scan skips it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules['hydra_plugins.{plugin}'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "ood.train", "-m", override, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {override} needs Hydra's {plugin.replace('_', '-')} plugin, which is not "
                           "installed: pip install 'ood[sweep]'\n")
    assert not (tmp_path / "sweep").exists()


def _run_with_detectors(tmp_path: Path, names: str, override: str = "detectors.names") -> Path:
    """A run folder of `ood-train '<override>=<names>'` (its command line only: all `ood-eval` reads first)."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- {override}={names}\n")
    return run


@pytest.mark.parametrize(("argv", "expected"), [([], "cached"), (["detectors.names=[energy]"], ["energy"]),
                                                (["detectors=all"], "all")])
def test_ood_eval_of_a_run_takes_its_detectors_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
    expected: list[str] | str,
) -> None:
    """A run trained with `detectors=fast` was re-evaluated by `ood-eval ckpt_path=<run>` with the default selection
    (`all`): the group is taken from the run now (said on stderr), its names replaced by a command line's
    `detectors.names=`, the whole group by its `detectors=`."""
    from ood.eval import main

    run = _run_with_detectors(tmp_path, "fast", override="detectors")
    monkeypatch.setattr("sys.argv", ["ood-eval", "--cfg", "job", f"ckpt_path={run}", *argv])
    main()
    out = capsys.readouterr()
    assert OmegaConf.to_container(OmegaConf.create(out.out))["detectors"]["names"] == expected
    assert out.err == ("" if argv == ["detectors=all"] else f"ood-eval: as trained in {run}: detectors=fast\n")


@pytest.mark.parametrize(("argv", "expected"), [([], ["msp", "my_detectors.FeatureNorm"]),
                                                (["detectors.names=[energy]"], ["energy"]),
                                                (["detectors=fast"], "cached")])
def test_ood_eval_of_a_run_takes_the_detectors_it_evaluated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str],
    expected: list[str] | str,
) -> None:
    """`ood-eval ckpt_path=<run of ood-train 'detectors.names=[msp,my_detectors.FeatureNorm]'>` evaluated the default
    selection (`all`), without the user's detector, unless it was named again; it takes the run's `detectors.names`
    now, and a command line's `detectors.names=` or `detectors=` wins."""
    from ood.eval import main

    (tmp_path / "my_detectors.py").write_text("")  # found, not imported: --cfg job runs nothing
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _run_with_detectors(tmp_path, "[msp,my_detectors.FeatureNorm]")
    monkeypatch.setattr("sys.argv", ["ood-eval", "--cfg", "job", f"ckpt_path={run}", *argv])
    main()
    out = capsys.readouterr()
    assert OmegaConf.to_container(OmegaConf.create(out.out))["detectors"]["names"] == expected
    assert out.err == ("" if argv else f"ood-eval: as trained in {run}: detectors.names=[msp,my_detectors.FeatureNorm]\n")


def test_ood_eval_of_a_run_whose_detector_cannot_be_imported_says_the_override_that_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A detector the run named by its import path whose module is not on the import path here is one line naming
    it and the `detectors.names=` that leaves it out, before Hydra starts (not "cannot be imported" in the run, for
    a name this command line never gave)."""
    from ood.eval import main

    run = _run_with_detectors(tmp_path, "[msp,gone_detectors.FeatureNorm,energy,gone.pkg.Det]")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["ood-eval", f"ckpt_path={run}"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err == (
        f"error: {run} was trained with detectors 'gone_detectors.FeatureNorm', 'gone.pkg.Det' (detectors.names), "
        "whose modules are not on the import path here: put their folders on PYTHONPATH (PYTHONPATH=<folder> "
        "ood-eval ...), or leave them out: 'detectors.names=[msp,energy]'\n")
    assert not (tmp_path / "logs").exists() and sorted(p.name for p in run.iterdir()) == [".hydra"]


@pytest.mark.parametrize(("override", "closest"), [
    ("detectors.parms.knn.k=3", "detectors.params.knn.k"),  # a misspelt empty mapping, then new keys below it
    ("detectors.parms=3", "detectors.params"),
])
def test_a_misspelt_key_names_the_closest_one_also_below_an_empty_mapping(override: str, closest: str) -> None:
    """README: a misspelt key is one line naming the closest. `detectors.params` starts empty, so `knn.k` below it
    had no sub-key to match and the line named none."""
    from ood import CONFIG_DIR
    from ood.errors import ConfigError
    from ood.runs.checks import check_overrides

    with pytest.raises(ConfigError, match=rf"^unknown config key '{override.partition('=')[0]}': "
                                          rf"did you mean {closest}=\.\.\.\?"):
        check_overrides(CONFIG_DIR, "train", [override])
