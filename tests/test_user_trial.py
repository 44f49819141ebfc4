"""What a new user meets following the README's "Your model, your data" on fabricated folders: the Python API takes
an override as the command line does, and reading results back names what is wrong with the folder given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import make_image_folders
from torch import nn

import ood
from ood.errors import ConfigError, DataNotFoundError

#: the run figures (matplotlib) cost seconds and are not what these tests check
pytestmark = pytest.mark.usefixtures("no_figures")


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_an_override_of_a_new_detector_parameter_needs_no_plus(tmp_path: Path) -> None:
    """The knn warning says "set detectors.params.knn.k below 6"; `overrides=["detectors.params.knn.k=2"]` raised
    Hydra's traceback ("Could not override ... use +detectors.params.knn.k=5") where `ood-eval` takes the same
    override without the `+`. Now it is taken as the command line takes it, and a misspelt key is one line."""
    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2, size=8)
    run = dict(detectors=["knn"], image_size=8, resize=8, device="cpu")
    results = ood.evaluate(_net(), paths["id"], [paths["far"]], overrides=["detectors.params.knn.k=2"],
                           output_dir=tmp_path / "run", **run)
    assert {r["detector_params"]["k"] for r in results.rows} == {2}
    with pytest.raises(ConfigError, match=r"^unknown config key 'detectors.tunee': did you mean detectors.tune=\.\.\.\?"):
        ood.evaluate(_net(), paths["id"], [paths["far"]], overrides=["detectors.tunee=false"],
                     output_dir=tmp_path / "bad", **run)


def test_reading_results_back_from_a_wrong_folder_says_which_folder_to_give(tmp_path: Path) -> None:
    """`Results.from_dir` of a mistyped path, or of the folder holding the runs (`logs/eval/runs`, an `output_dir`
    parent), said "holds no results.jsonl: the evaluation did not finish", sending the user after a failure that
    never happened. Now a missing folder and a folder of runs are named as such (the latter with a run to give)."""
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^\S+nope: no such folder; give the run folder an evaluation wrote"):
        ood.Results.from_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"^\S+runs holds run folders, not one run's results: give one of them, e.g. "
                                          r"\S+runs/a \(1 here: a\); `ood-report \S+runs` compares them all$"):
        ood.Results.from_dir(tmp_path / "runs")


def test_an_image_file_given_as_a_set_names_the_folder_to_give(tmp_path: Path) -> None:
    """An OOD set given as one of its images (`["data/dtd/0.png"]`) was told to pass it as an image list,
    `{imglist: .../0.png}`, which reads the PNG as text; now the line says to give the folder of its images."""
    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2, size=8)
    image = paths["far"] / "0.png"
    with pytest.raises(DataNotFoundError,
                       match=rf"^0.png: {re.escape(str(image))} is one image, not a folder \(expected a folder of images; ID splits: "
                             r"<folder>/<class>/<image>\): give the folder that holds the set's images$"):
        ood.evaluate(_net(), paths["id"], [image], detectors=["msp"], image_size=8, resize=8, device="cpu",
                     output_dir=tmp_path / "run")


def test_detector_names_in_one_string_say_to_give_a_list(tmp_path: Path) -> None:
    """`detectors="msp,knn"` (the CLI's `detectors.names=[msp,knn]` typed as one Python string) raised Hydra's sweep
    error about `-m`; now one line saying to give a list."""
    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2, size=8)
    with pytest.raises(ConfigError, match=r"^detectors='msp, knn' is one string, not a list of names: give "
                                          r"detectors=\['msp', 'knn'\]$"):
        ood.evaluate(_net(), paths["id"], [paths["far"]], detectors="msp, knn", image_size=8, resize=8, device="cpu",
                     output_dir=tmp_path / "run")


def test_a_run_stopped_by_an_unreadable_image_resumes_with_bad_images_skip(tmp_path: Path) -> None:
    """A run whose evaluation met an unreadable OOD file said "data.bad_images=skip skips such files"; resuming the
    finished training with it (`ckpt_path=last data.bad_images=skip`) was refused as another configuration. Every
    file the checkpoint's epochs read decoded, so that resume is taken; other data changes are still refused."""
    import torch
    from helpers import compose_config, folder_overrides

    from ood.runs.checks import check_run
    from ood.runs.identity import flat_config

    overrides = ["data=folder", *folder_overrides(tmp_path), "trainer.max_epochs=1"]
    ckpt = tmp_path / "old" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"config": flat_config(compose_config(tmp_path / "old", overrides))}}, ckpt)
    check_run(compose_config(tmp_path / "new", [*overrides, "data.bad_images=skip", f"ckpt_path={ckpt}"]), str(ckpt))
    with pytest.raises(ConfigError, match=r"trained with data.augment=true \(now false\): resuming keeps its weights"):
        check_run(compose_config(tmp_path / "new2", [*overrides, "data.bad_images=skip", "data.augment=false",
                                                     f"ckpt_path={ckpt}"]), str(ckpt))


def test_an_evaluation_started_elsewhere_has_its_training_runs_identity(tmp_path: Path) -> None:
    """`ood-eval ckpt_path=<run>` started in another folder anchors the run's relative paths there (`data.root=id` ->
    `/abs/id`); its identity hashed the absolute paths, so ood-report set the evaluation beside its own training run
    as another configuration instead of counting it once. It now hashes the training's values."""
    from helpers import compose_config

    from ood.runs.checks import as_trained_paths
    from ood.runs.identity import flat_config, run_identity

    relative = ["data=folder", "data.root=id", "+data.ood.far={a: ood_a}", "data.outliers=pool", "method=oe"]
    absolute = ["data=folder", f"data.root={tmp_path}/id", f"+data.ood.far={{a: {tmp_path}/ood_a}}",
                f"data.outliers={tmp_path}/pool", "method=oe"]
    stored = flat_config(compose_config(tmp_path / "train", relative))
    here, elsewhere = (compose_config(tmp_path / n, o, "eval") for n, o in (("here", relative), ("there", absolute)))
    trained = run_identity(here, {}, tmp_path / "here", "last.ckpt")
    assert run_identity(elsewhere, {}, tmp_path / "there", "last.ckpt").hash != trained.hash
    anchored = as_trained_paths(elsewhere, stored)
    assert run_identity(anchored, {}, tmp_path / "there", "last.ckpt").hash == trained.hash
    assert anchored.data.root == "id" and elsewhere.data.root == f"{tmp_path}/id"  # the run reads the absolute one
