"""The number a Hydra sweeper maximises: a run's validation-OOD AUROC (ID val vs validation OOD; never test OOD),
read back from the `validation.json` its evaluation wrote; the line that ends an Optuna sweep, naming its best job
(`BestTrial`); and the lines that end a failed sweep, naming every failed job (`SweepStart`, `failed_jobs_listed`)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback

from ood.errors import ConfigError
from ood.runs.failures import FAILED_FILE, failure


def sweep_objective(output_dir: str | Path, detector: str | None) -> float | None:
    """The validation-OOD AUROC a sweeper maximises: of `detector`, or the method's own score when it has one,
    else the first detector. None when the run wrote no validation numbers."""
    from ood.evaluation.sinks import VALIDATION_FILE  # here: `BestTrial`'s module is imported as Hydra starts

    path = Path(output_dir) / VALIDATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    aurocs: dict[str, float] = data["auroc"]
    if not aurocs:
        return None
    name = objective_name(data, detector)
    if name not in aurocs:
        raise ConfigError(f"objective={name}: not scored in this run; choose one of {sorted(aurocs)}")
    return float(aurocs[name])


def objective_name(validation: dict[str, Any], detector: str | None) -> str:
    """The scorer whose AUROC is the objective, of a run's `validation.json` (`validation`): `detector`, else the
    method's own score when it has one, else the first detector."""
    aurocs = validation["auroc"]
    return detector or (validation["method"] if validation["method"] in aurocs else next(iter(aurocs)))


#: the file the Optuna sweeper writes into its sweep folder: `best_params` and `best_value`
OPTIMIZATION_FILE = "optimization_results.yaml"


class BestTrial(HydraCallback):
    """`hydra.callbacks` of every run: an Optuna sweep (`hydra/sweeper=optuna_val`) ends with the job folder of its
    best trial, which AUROC its value is, in %, and where the test numbers are. Optuna's own last line,
    `Best value: 0.3075925925925926`, named no score and no folder, and was a fraction beside tables in %."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        file = sweep / OPTIMIZATION_FILE
        if not file.is_file():
            return
        import yaml

        from ood.evaluation.sinks import VALIDATION_FILE  # imports torch: not as Hydra starts

        best = yaml.safe_load(file.read_text())
        value, objective = best["best_value"], config.get("objective")
        # in job order: Optuna's best is the first trial to reach the best value (a later tie does not replace it)
        found = sorted(sweep.glob(f"*/{VALIDATION_FILE}"), key=lambda p: _job_order(p.parent.name))
        jobs = [p.parent for p in found if sweep_objective(p.parent, objective) == value]
        params = " ".join(f"{key}={val}" for key, val in best["best_params"].items())
        name = objective_name(json.loads((jobs[0] / VALIDATION_FILE).read_text()), objective) if jobs else (
            objective or "the objective")
        print(f"best trial: {jobs[0] if jobs else 'a job of ' + str(sweep)} ({params}): validation AUROC of {name} "
              f"(ID val vs validation OOD) {100 * value:.2f} %, Optuna's best_value {value} in {file}; test numbers of "
              f"every trial: ood-report {sweep}")


def _job_order(name: str) -> tuple[int, int, str]:
    """A job folder's place in its sweep: by job number (`10` after `2`), as Hydra's default `hydra.sweep.subdir`
    names them; other names after, by name."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


#: the sweep this process launched, (its folder, when), noted by `SweepStart` for `failed_jobs_listed`
_launched: tuple[Path, float] | None = None


class SweepStart(HydraCallback):
    """`hydra.callbacks` of every run: notes the folder and start of the sweep a multirun launches, so that a failed
    sweep can end listing every job that failed (`failed_jobs_listed`); Hydra's own last lines name the first alone,
    and it calls `on_multirun_end` only after a sweep whose jobs all succeeded."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _launched
        _launched = (Path(config.hydra.sweep.dir), time.time())


@contextmanager
def failed_jobs_listed() -> Iterator[None]:
    """An entry point's failed sweep ends with a line per job that failed in it (each job folder's `FAILED.txt`
    written since the sweep started: not an earlier attempt's) and the `ood-report` command that shows the others."""
    global _launched
    try:
        yield
    except SystemExit as exit_:
        if exit_.code not in (0, None) and _launched is not None:
            sweep, since = _launched
            jobs = sorted(p.parent for p in sweep.rglob(FAILED_FILE) if p.stat().st_mtime >= since - 1)
            if jobs:
                print(f"{len(jobs)} job{'s' if len(jobs) > 1 else ''} of the sweep failed:", file=sys.stderr)
                for job in jobs:
                    print(f"  {job}: {failure(job)}", file=sys.stderr)
                print(f"the sweep's report (its failed jobs listed under the table): ood-report {sweep}", file=sys.stderr)
        raise
    finally:
        _launched = None  # a later command of this process (a script calling main() again) is not this sweep


def check_objective(objective: str | None, method: str, detectors: Iterable[str]) -> None:
    """Refuse, before training, an `objective=` that is neither a detector of the run nor a score of `method` (its
    name, or a part's name it starts: `energy_cfl_recon_dist`): `sweep_objective` refused it only after the run."""
    names = set(detectors)
    if objective is None or objective in names or objective.startswith(method):
        return
    raise ConfigError(f"objective={objective}: not scored in this run; choose one of the detectors {sorted(names)} "
                      f"or the method's own score ({method}, where it has one)")
