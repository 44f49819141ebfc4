"""Loggers: CSV (default) gets the slash-named metrics; every logger and the checkpoint get the flattened config;
wandb works offline with no account, finishes its run, groups seeds and logs ROC tables (read back from its file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import FAST, NO_FIGURES, run_config
from wandb_files import read_run

SHORT = [*FAST, "trainer.max_epochs=1", "detectors.names=[msp,energy]"]


def _logged_keys(run_dir: Path) -> set[str]:
    (metrics,) = run_dir.rglob("metrics.csv")
    with metrics.open() as f:
        return set(next(csv.reader(f)))


@pytest.mark.slow
def test_csv_logger_gets_slash_named_metrics(tmp_path: Path) -> None:
    run_config(tmp_path, SHORT)
    keys = _logged_keys(tmp_path)
    assert {"test/id/acc", "test/msp/digits_6_9/auroc", "test/energy/near/fpr95", "test/msp/far/auroc",
            "test/energy/uniform_noise/fpr95_oodpos", "train/loss", "val/acc"} <= keys
    (hparams,) = tmp_path.rglob("hparams.yaml")
    logged = yaml.safe_load(hparams.read_text())
    assert logged["method.optimizer.lr"] == 0.05 and logged["trainer.max_epochs"] == 1 and logged["seed"] == 0
    assert logged["data.benchmark._target_"] == "ood.data.DigitsBenchmark"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["method.optimizer.lr"] == 0.05


@pytest.mark.slow
def test_wandb_offline_one_run_per_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    runs = {}
    for job, extra in (("a", "seed=0"), ("b", "seed=1"), ("c", "method.optimizer.lr=0.01")):
        run_config(tmp_path / job, [*SHORT, "logger=wandb", "tags=[test]", extra, NO_FIGURES])  # its ROC tables are wandb tables, no figure
        assert wandb.run is None, "wandb.finish() must close each job's run"
        (run_dir,) = (tmp_path / job / "wandb").glob("offline-run-*")
        assert list(run_dir.rglob("test/results*.table.json")), "the results table is logged for the dashboard"
        assert list(run_dir.rglob("test/msp/roc_table*.table.json")), "ROC curves are logged as tables"
        assert "test/msp/digits_6_9/auroc" in _logged_keys(tmp_path / job), "logger=wandb keeps the CSV log"
        runs[job] = read_run(run_dir)
    # Lightning's WandbLogger handed wandb.init `anonymous=None`: "The anonymous setting has no effect ..." every run
    assert "anonymous" not in capfd.readouterr().err
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a["group"] == b["group"] != c["group"], "seeds share a group, other configurations do not"
    assert a["group"].startswith("ce-digits-small_cnn-") and a["job_type"] == "train"
    assert a["group"] == json.loads((tmp_path / "a" / "identity.json").read_text())["group"], "one identity, written once"
    assert set(a["tags"]) == {"test", "ce", "digits", "small_cnn"}
    assert (a["config"]["method.optimizer.lr"], c["config"]["method.optimizer.lr"], b["config"]["seed"]) == (0.05, 0.01, 1)
    assert {"test/msp/roc_table/nrows", "test/energy/digits_6_9/auroc"} <= a["logged"]
    assert a["config"]["_wandb/visualize/test/msp/roc"]["panel_config"]["fieldSettings"] == {"x": "fpr", "y": "tpr", "stroke": "ood_set"}
    (table,) = (tmp_path / "a" / "wandb").rglob("test/msp/roc_table*.table.json")
    data = json.loads(table.read_text())
    assert data["columns"] == ["ood_set", "fpr", "tpr"]
    near = np.array([row[1:] for row in data["data"] if row[0] == "digits_6_9"])
    assert near[0].tolist() == [0, 0] and near[-1].tolist() == [1, 1] and (np.diff(near, axis=0) >= 0).all()


def test_tensorboard_logger(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_config(tmp_path, [*SHORT, "logger=tensorboard"])
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    (hparams,) = (tmp_path / "tensorboard").rglob("hparams.yaml")
    assert yaml.safe_load(hparams.read_text())["method.optimizer.lr"] == 0.05


class RecordingWandbLogger:
    """Stands in for Lightning's `WandbLogger` (no wandb run): keeps the arguments `build_loggers` gives it."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs

    def log_hyperparams(self, params: object) -> None:
        self.params = params


def test_an_evaluations_logged_config_has_the_training_values_of_its_checkpoint(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<run>` logged its own config's training keys as the run's hyper-parameters (wandb config,
    hparams.yaml): `trainer.max_epochs: 15`, the default, for a network trained 3 epochs. The training keys come
    from the checkpoint's stored config; the evaluation's own keys stay."""
    from helpers import compose_config

    from ood.runs.loggers import build_loggers

    cfg = compose_config(tmp_path, ["logger=wandb", f"logger.wandb._target_={__name__}.RecordingWandbLogger",
                                    "detectors.names=[msp]"], config_name="eval")
    trained = {"trainer.max_epochs": 3, "method.optimizer.lr": 0.01, "detectors.names": ["knn"], "seed": 4}
    (logger,) = [x for x in build_loggers(cfg, cfg.hydra.runtime.choices, "g", trained=trained)
                 if isinstance(x, RecordingWandbLogger)]
    assert (logger.params["trainer.max_epochs"], logger.params["method.optimizer.lr"]) == (3, 0.01)
    assert (logger.params["detectors.names"], logger.params["seed"]) == (["msp"], cfg.seed)


def _wandb_args(tmp_path: Path, *overrides: str) -> dict:
    """The arguments `build_loggers` gives the wandb logger of the run `overrides` compose (its identity group)."""
    from helpers import compose_config

    from ood.runs.identity import run_identity
    from ood.runs.loggers import build_loggers

    cfg = compose_config(tmp_path, ["logger=wandb", f"logger.wandb._target_={__name__}.RecordingWandbLogger", *overrides])
    choices = cfg.hydra.runtime.choices
    group = run_identity(cfg, choices, tmp_path, None).group
    (logger,) = [x for x in build_loggers(cfg, choices, group) if isinstance(x, RecordingWandbLogger)]
    return logger.kwargs


def test_wandb_names_one_configuration_and_seed(tmp_path: Path) -> None:
    """`run_name` was `<method>-<data>-<backbone choice>-s<seed>`: `backbone=timm backbone.name=resnet18,resnet50`
    (or a swept lr) gave two configurations' runs one name. The name is the identity group (which has the config's
    hash) and the seed: the seeds of one configuration share the group, each run has its own name; a given
    run_name is kept."""
    def wandb_args(*overrides: str) -> dict:
        return _wandb_args(tmp_path, "backbone=timm", *overrides)

    r18, r50 = wandb_args("backbone.name=resnet18"), wandb_args("backbone.name=resnet50")
    r18_s1 = wandb_args("backbone.name=resnet18", "seed=1")
    assert r18["group"] == r18_s1["group"] != r50["group"] and r18["group"].startswith("ce-digits-timm-")
    assert (r18["name"], r18_s1["name"], r50["name"]) == (f"{r18['group']}-s0", f"{r18['group']}-s1", f"{r50['group']}-s0")
    assert wandb_args("run_name=mine")["name"] == "mine"


def test_wandb_tags_name_the_network_of_a_generic_backbone_as_the_rows_do(tmp_path: Path) -> None:
    """The wandb tag of `backbone=timm` was `timm`, whatever `backbone.name`, where the result rows say
    `timm/resnet50` (`backbone_label`): the tag is the rows' label; a named group tags itself."""
    tags = {over: _wandb_args(tmp_path, *over.split())["tags"] for over in (
        "backbone=timm backbone.name=resnet50", "backbone=torchvision backbone.name=resnet18",
        "backbone=module backbone.target=torch.nn.Linear", "tags=[paper] backbone=small_cnn")}
    assert list(tags.values()) == [["ce", "digits", "timm/resnet50"], ["ce", "digits", "torchvision/resnet18"],
                                   ["ce", "digits", "module/torch.nn.Linear"], ["paper", "ce", "digits", "small_cnn"]]


@pytest.mark.parametrize(("error", "code"), [(None, 0), (KeyboardInterrupt, 130), ("sigterm", 143), (ValueError, 1)])
def test_wandb_run_of_a_stopped_or_failed_job_is_not_finished(monkeypatch: pytest.MonkeyPatch, error: object,
                                                               code: int) -> None:
    """`finish_wandb` ran in `ood.train`'s `finally` and closed every run with exit code 0: a run stopped by SIGTERM
    or Ctrl-C, or failed, showed in wandb as finished, like the complete run its resumed run's name repeats. It now
    hands wandb the process's status, so wandb marks the run failed."""
    import wandb
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ood.runs.loggers import finish_wandb

    codes: list[int] = []
    monkeypatch.setattr(wandb, "run", object())
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None, **_: codes.append(exit_code))
    raised = SIGTERMException if error == "sigterm" else error
    try:
        try:
            if raised is not None:
                raise raised()
        finally:
            finish_wandb()
    except BaseException as err:  # noqa: BLE001  # the job's error, gone on past finish_wandb
        assert isinstance(err, raised)
    assert [c or 0 for c in codes] == [code]
