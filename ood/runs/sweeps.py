"""The number a Hydra sweeper maximises: a run's validation-OOD AUROC (ID val vs validation OOD; never test OOD),
read back from the `validation.json` its evaluation wrote."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ood.errors import ConfigError
from ood.evaluation.sinks import VALIDATION_FILE


def sweep_objective(output_dir: str | Path, detector: str | None) -> float | None:
    """The validation-OOD AUROC a sweeper maximises: of `detector`, or the method's own score when it has one,
    else the first detector. None when the run wrote no validation numbers."""
    path = Path(output_dir) / VALIDATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    aurocs: dict[str, float] = data["auroc"]
    if not aurocs:
        return None
    name = detector or (data["method"] if data["method"] in aurocs else next(iter(aurocs)))
    if name not in aurocs:
        raise ConfigError(f"objective={name}: not scored in this run; choose one of {sorted(aurocs)}")
    return float(aurocs[name])


def check_objective(objective: str | None, method: str, detectors: Iterable[str]) -> None:
    """Refuse, before training, an `objective=` that is neither a detector of the run nor a score of `method` (its
    name, or a part's name it starts: `energy_cfl_recon_dist`): `sweep_objective` refused it only after the run."""
    names = set(detectors)
    if objective is None or objective in names or objective.startswith(method):
        return
    raise ConfigError(f"objective={objective}: not scored in this run; choose one of the detectors {sorted(names)} "
                      f"or the method's own score ({method}, where it has one)")
