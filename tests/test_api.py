"""`ood.evaluate` / `ood.extract` on a classifier trained outside the framework, against `ood-eval` and scikit-learn."""

from __future__ import annotations

import json
import os
import random
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import NO_FIGURES, make_image_folders, run_config
from omegaconf import OmegaConf
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn
from torchvision import transforms as T

import ood
from ood.api import torchvision_name
from ood.data.hygiene import BadImageError
from ood.detectors import build_detector
from ood.errors import CheckpointError, ConfigError, NonFiniteError, OODError

NORMALIZE = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _train_outside(train_dir: Path, steps: int = 6) -> torch.nn.Module:
    """A plain PyTorch loop over the PNG folder: nothing from ood."""
    data = torchvision.datasets.ImageFolder(str(train_dir), transform=T.Compose([T.ToTensor(), NORMALIZE]))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step + 1 == steps:
            break
    return model.eval()


#: the run figures (matplotlib) cost seconds and are not what these tests check
pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], torch.nn.Module, Path]:
    root = tmp_path_factory.mktemp("api")
    paths = make_image_folders(root / "data")
    model = _train_outside(paths["id"] / "train")
    weights = root / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    return paths, model, weights


def test_python_api_equals_cli_and_sklearn(trained, tmp_path: Path) -> None:
    paths, model, weights = trained
    detectors = ["msp", "knn", "mahalanobis"]
    results = ood.evaluate(
        model, paths["id"], {"near": {"noise": paths["near"]}, "far": {"checkers": paths["far"]}},
        detectors=detectors, image_size=32, resize=32, device="cpu", output_dir=tmp_path / "api",
    )
    cli = run_config(tmp_path / "cli", [
        "backbone=torchvision", "backbone.name=resnet18", f"backbone.weights={weights}", "data=folder",
        f"data.root={paths['id']}", f"+data.ood.near={{noise: {paths['near']}}}",
        f"+data.ood.far={{checkers: {paths['far']}}}", "data.image_size=32", "data.resize=32", "data.num_workers=0",
        f"detectors.names=[{','.join(detectors)}]", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
    ], config_name="eval")
    assert results.rows == cli
    assert len(cli) == 2 * len(detectors)
    # the model object is recorded by the builder name the command line names, so ood-report groups both alike
    assert OmegaConf.load(tmp_path / "api" / "config.yaml").backbone.name == "resnet18"
    # and its OOD sets, given as Paths, as the command line's (config.yaml held `data.ood: {}`: ood-report's identity
    # of the run lacked them)
    recorded = [OmegaConf.load(tmp_path / run / "config.yaml").data.ood for run in ("api", "cli")]
    assert [(ood.near, ood.far) for ood in recorded] == [({"noise": str(paths["near"])}, {"checkers": str(paths["far"])})] * 2

    # MSP from the user's own forward pass over the same files, scored with scikit-learn
    def msp(files: list[Path]) -> np.ndarray:
        x = torch.stack([NORMALIZE(T.functional.to_tensor(Image.open(f).convert("RGB"))) for f in files])
        with torch.no_grad():
            return model(x).softmax(1).amax(1).numpy()

    id_scores = msp(sorted(paths["id"].glob("test/*/*.png")))
    ood_scores = msp(sorted(paths["near"].glob("*.png")))
    expected = roc_auc_score(np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))], np.r_[id_scores, ood_scores])
    row = next(r for r in results.rows if r["detector"] == "msp" and r["ood_dataset"] == "noise")
    assert row["auroc"] == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(np.exp(results.scores["msp"]["noise"]), ood_scores, atol=1e-6)  # log MSP
    # image by image: each score traced to its file (samples.csv), labels the class folders'
    per_image = results.per_image("msp")
    assert list(per_image.columns) == ["split", "dataset_index", "label", "file", "msp"]
    assert list(dict.fromkeys(per_image.split)) == ["test", "noise", "checkers"]
    test, noise = per_image[per_image.split == "test"], per_image[per_image.split == "noise"]
    id_files = sorted(paths["id"].glob("test/*/*.png"))
    assert list(test.file) == [str(f) for f in id_files] and list(test.label) == [int(f.parent.name[1:]) for f in id_files]
    assert list(noise.file) == [str(f) for f in sorted(paths["near"].glob("*.png"))] and set(noise.label) == {-1}
    np.testing.assert_allclose(np.exp(test.msp.to_numpy()), id_scores, atol=1e-6)
    np.testing.assert_allclose(np.exp(noise.msp.to_numpy()), ood_scores, atol=1e-6)
    assert results.per_image().columns[4:].tolist() == detectors
    assert (tmp_path / "api" / "samples.csv").read_text() == next((tmp_path / "cli").rglob("samples.csv")).read_text()
    with pytest.raises(ConfigError, match=r"no scores of \['energy'\] in .*; choices: \['knn', 'mahalanobis', 'msp'\]$"):
        results.per_image(["energy"])

    table = results.table
    assert list(table.columns) == ["auroc", "fpr95", "fpr95_oodpos", "aupr_in", "aupr_out", "id_acc"]
    assert list(table.loc["msp"].index) == ["noise", "checkers", "near", "far"]
    assert table.loc[("msp", "near"), "auroc"] == pytest.approx(expected, abs=1e-6)
    saved = results.save(tmp_path / "copy")
    assert ood.Results.from_dir(saved).rows == results.rows and (saved / "overlap.json").is_file()
    # into a folder holding files (another run's): refused, nothing copied (its scores would read as this run's)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scores.npz").write_bytes(b"another run")
    with pytest.raises(ConfigError, match=r"other is not empty: save the results into a new or empty folder$"):
        results.save(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["scores.npz"]


def test_metrics_are_one_flat_dict_for_a_logger_under_the_keys_runs_log(tmp_path: Path) -> None:
    """A training loop logs an evaluation in one line (`self.log_dict(results.metrics("ood"))`): the scalars of
    every OOD set, the near / far means, the ID accuracy and the full-spectrum ones, keyed as ood's runs log them."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    results = ood.evaluate(net, paths["id"], {"near": {"noise": paths["near"]}, "far": {"checkers": paths["far"]},
                                              "csid": {"shifted": paths["id"] / "test"}},
                           detectors="msp", image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    metrics = results.metrics("ood")
    columns = ["auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_oodpos"]
    expected = {f"{stage}/msp/{name}/{m}": results.table.loc[(mode, "msp", name), m]
                for mode, stage in (("standard", "ood"), ("fsood", "ood_fsood"))
                for name in ("noise", "checkers", "near", "far") for m in columns}
    row = next(r for r in results.rows if r["mode"] == "fsood")
    expected |= {"ood/id/acc": row["id_acc"], "ood_fsood/id/acc": row["csid_acc"],
                 "ood_fsood/csid/shifted/acc": row["csid_set_acc"]["shifted"]}
    assert metrics == pytest.approx(expected, abs=1e-12) and len(metrics) == 2 * 4 * 5 + 3
    assert all(type(v) is float for v in metrics.values())
    assert set(results.metrics()) == {"test" + key.removeprefix("ood") for key in expected}  # ood-eval's own keys


def test_torchvision_models_are_recorded_by_builder_name() -> None:
    """resnet18 and resnet34 objects were both recorded as `resnet`, so ood-report averaged their runs as seeds of one
    configuration; a changed head, which no builder makes, keeps the class name."""
    with torch.device("meta"):
        changed = torchvision.models.resnet18()
        changed.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 3))
        nets = [torchvision.models.resnet34(num_classes=3), torchvision.models.mobilenet_v3_small(num_classes=7), changed]
    assert [torchvision_name(net) for net in nets] == ["resnet34", "mobilenet_v3_small", "resnet"]


def test_torchvision_name_builds_each_family_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding the builder built every resnet builder on the meta device at each `ood.evaluate` call (about 0.3 s); a
    second network of the same class and shapes is now named without a build, one of other shapes builds again."""
    import ood.api

    ood.api._torchvision_name.cache_clear()
    builds = []
    get_model = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: builds.append(name) or get_model(name, **kw))
    with torch.device("meta"):
        nets = [torchvision.models.resnet18(num_classes=3), torchvision.models.resnet18(num_classes=3),
                torchvision.models.resnet18(num_classes=5)]
    assert torchvision_name(nets[0]) == "resnet18"
    first = len(builds)
    assert first >= 1 and builds[-1] == "resnet18"
    assert torchvision_name(nets[1]) == "resnet18" and len(builds) == first
    assert torchvision_name(nets[2]) == "resnet18" and len(builds) == 2 * first


def test_extract_gives_the_bank_detectors_take(trained) -> None:
    paths, model, _ = trained
    bank = ood.extract(model, paths["id"] / "test", image_size=32, resize=32, batch_size=5)
    files = sorted(paths["id"].glob("test/*/*.png"))
    x = torch.stack([NORMALIZE(T.functional.to_tensor(Image.open(f).convert("RGB"))) for f in files])
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(bank.logits, logits, atol=1e-5, rtol=1e-5)
    assert bank.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    torch.testing.assert_close(bank.features @ bank.weight.T + bank.bias, logits, atol=1e-5, rtol=1e-5)
    scores = build_detector("msp").fit(bank).score(bank)
    torch.testing.assert_close(scores.exp(), logits.softmax(1).amax(1).double(), atol=1e-6, rtol=0)  # log MSP
    with pytest.raises(ConfigError, match=r"^image_size given with a transform object"):  # it was ignored
        ood.extract(model, paths["id"] / "test", transform=T.Compose([T.ToTensor(), NORMALIZE]), image_size=64)


def test_extract_labels_follow_classes_as_evaluate_does(trained) -> None:
    """A model trained with another class order: `ood.evaluate(classes=...)` follows it by name, but `ood.extract`
    had no `classes` (a TypeError of an inner function) and labelled by sorted folder, so a class-conditional
    detector fitted on its bank (caref: the class mean of the predicted class) paired logits and labels wrongly."""
    paths, _, _ = trained
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    order = ["c2", "c0", "c1"]
    bank = ood.extract(net, paths["id"] / "test", classes=order, image_size=32, resize=32)
    assert bank.labels.tolist() == [1] * 4 + [2] * 4 + [0] * 4
    data = torchvision.datasets.ImageFolder(str(paths["id"] / "test"), transform=T.Compose([T.ToTensor(), NORMALIZE]))
    assert ood.extract(net, data, classes=order).labels.tolist() == [1] * 4 + [2] * 4 + [0] * 4
    with pytest.raises(ConfigError, match=r"^classes=\['c2', 'c0'\] does not name the class\(es\) \['c1'\] of .*test$"):
        ood.extract(net, paths["id"] / "test", classes=order[:2], image_size=32, resize=32)
    with pytest.raises(ConfigError, match=r"^classes= needs class folders or a Dataset with `classes` to follow by name; "):
        ood.extract(net, paths["far"], classes=order, image_size=32, resize=32)


def test_extract_classes_match_folders_in_either_unicode_form(tmp_path: Path) -> None:
    """`ood.extract(classes=...)` compared names by their code points while the folder reader matches them in NFC:
    `classes=['café', ...]` typed in NFC over folders copied from macOS (NFD) was refused as not naming the folder
    'café' (and an NFD name over NFC folders likewise). Names are compared in NFC form; one name given twice is one
    line."""
    import unicodedata

    from fabricate import image_folder

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for name in (nfd, "bar"):
        image_folder(tmp_path / "data", name, 2, side=8, ext="png")
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    bank = ood.extract(net, tmp_path / "data", classes=[nfc, "bar"], image_size=8, resize=8)
    assert bank.labels.tolist() == [1, 1, 0, 0]  # sorted folders: 'bar', 'café'; café is output 0
    (tmp_path / "data" / nfd).rename(tmp_path / "data" / nfc)
    assert ood.extract(net, tmp_path / "data", classes=[nfd, "bar"], image_size=8, resize=8).labels.tolist() == [1, 1, 0, 0]
    with pytest.raises(ConfigError, match=r"^classes= names \['café'\] more than once \(names are compared in Unicode NFC"):
        ood.extract(net, tmp_path / "data", classes=[nfc, "bar", nfd], image_size=8, resize=8)


def test_extract_keeps_a_layer_called_features_apart() -> None:
    """A stage named `features` (torchvision's VGG / MobileNet trunk) is an extra; the bank's features stay the
    head's input. One layer may be named by a string."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v3_small(num_classes=3).eval()
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
    bank = ood.extract(net, data, layers="features", feature_layer="classifier.3", batch_size=4)
    with torch.no_grad():
        trunk = net.features(data.tensors[0])
    assert bank.features.shape == (4, 1024) and list(bank.extras) == ["features"]
    torch.testing.assert_close(bank.extras["features"], trunk)
    torch.testing.assert_close(bank.logits, net(data.tensors[0]))


def test_head_class_count_mismatch_is_one_line(trained, tmp_path: Path) -> None:
    paths, _, _ = trained
    with pytest.raises(ConfigError, match=r"head, layer 'fc', has 5 outputs but the ID data \(id: \['c0', 'c1', 'c2'\]\) has 3 classes"):
        ood.evaluate(torchvision.models.resnet18(num_classes=5), paths["id"], [paths["far"]], detectors=["msp"],
                     image_size=32, resize=32, device="cpu", output_dir=tmp_path)


def test_a_detector_class_of_ones_own_is_named_by_its_name(trained, tmp_path: Path) -> None:
    """`detectors=["msp", MyDetector]` (a class defined in the caller's code, registered as it was defined) failed
    on a bare TypeError (the list went into the config by `','.join`); it runs under its `name` now, and a subclass
    that inherits its parent's name is one line (its rows would be the parent's)."""
    from ood.detectors import Detector
    from ood.detectors import base as registry
    from ood.detectors.knn import KNN
    from ood.features.bank import FeatureBank

    class Norm(Detector):
        name = "api_test_norm"

        def score(self, bank: FeatureBank) -> torch.Tensor:
            return bank.features.double().norm(dim=1)

    class MyKNN(KNN):
        pass

    paths, model, _ = trained
    try:
        results = ood.evaluate(model, paths["id"], [paths["far"]], detectors=["msp", Norm], image_size=32, resize=32,
                               device="cpu", output_dir=tmp_path / "run")
        bank = ood.extract(model, paths["id"] / "test", image_size=32, resize=32, device="cpu")
        with pytest.raises(ConfigError, match=r"^detector class .*MyKNN inherits the name 'knn' of KNN: give it its own"):
            ood.evaluate(model, paths["id"], [paths["far"]], detectors=[MyKNN], image_size=32, resize=32, device="cpu",
                         output_dir=tmp_path / "knn")
    finally:
        registry._REGISTRY.pop("api_test_norm", None)
    assert [r["detector"] for r in results.rows] == ["msp", "api_test_norm"]
    ours = torch.as_tensor(results.per_image("api_test_norm").query("split == 'test'")["api_test_norm"].to_numpy().copy())
    torch.testing.assert_close(ours, bank.features.double().norm(dim=1))


def test_evaluate_prints_no_lightning_deprecation_and_leaves_the_callers_warning_filters(trained, tmp_path: Path,
                                                                                         caplog) -> None:
    """Lightning's pytree helper warns "`isinstance(treespec, LeafSpec)` is deprecated" on this torch at every
    evaluation: the entry points ignore it, and `ood.evaluate` printed it into the caller's program (nothing they can
    act on). It is ignored inside the call; the caller's own filters are as they were afterwards. Lightning's
    start-up chatter ("Seed set to 0", "GPU available: ...", its litlogger "Tip" advert), which the entry points keep
    off the console, was printed at every call too; it is off inside the call, the caller's logger levels kept."""
    import logging
    import warnings

    paths, model, _ = trained
    kwargs = dict(detectors=["msp"], image_size=32, resize=32, device="cpu")
    ood.evaluate(model, paths["id"], [paths["far"]], output_dir=tmp_path / "first", **kwargs)  # imports add filters
    lightning = logging.getLogger("lightning.pytorch")
    lightning.setLevel(logging.INFO)  # the caller's own choice, restored after the call
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        ood.evaluate(model, paths["id"], [paths["far"]], output_dir=tmp_path / "second", **kwargs)
        assert warnings.filters == before
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lightning") and r.levelno < logging.WARNING] == []
    assert lightning.level == logging.INFO
    lightning.setLevel(logging.NOTSET)


def test_the_calls_console_keeps_the_callers_own_ood_logging(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `ood.evaluate` ood's INFO lines show on stderr when the caller set up no logging for them. A caller who
    quieted ood (`getLogger("ood").setLevel(WARNING)`, no handler) got its INFO lines all the same, and one whose
    handler sits on an ood logger below `ood` (`getLogger("ood.data")`) got every line twice: the caller's level and
    handler are their logging; the call adds none beside them, and leaves them as they were."""
    import logging

    from ood.api import _console_logs

    monkeypatch.setattr(logging.root, "handlers", [])  # a program without logging (pytest's capture handlers off)
    ours, line = logging.getLogger("ood"), logging.getLogger("ood.data.folder")
    try:
        with _console_logs():
            line.info("shown")
        ours.setLevel(logging.WARNING)
        with _console_logs():
            line.info("quieted")
            line.warning("warned")
        assert ours.level == logging.WARNING and ours.handlers == []
        ours.setLevel(logging.NOTSET)
        theirs = logging.getLogger("ood.data")
        records: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        theirs.addHandler(handler)
        theirs.setLevel(logging.INFO)
        with _console_logs():
            line.info("theirs")
        assert records == ["theirs"]
    finally:
        ours.setLevel(logging.NOTSET)
        logging.getLogger("ood.data").handlers.clear()
        logging.getLogger("ood.data").setLevel(logging.NOTSET)
    assert capsys.readouterr().err == "shown\nwarned\n"
    assert ours.handlers == [] and ours.level == logging.NOTSET


def test_spawned_ranks_log_the_ood_lines_the_calls_console_shows(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `trainer=ddp_cpu` a spawned rank recreated the main process's root handlers alone, not the console
    `ood.evaluate` puts on the `ood` logger: rank 0's INFO lines (`id: preprocessing {...}`, which `trainer=cpu`
    shows) were lost and its warnings printed by Python's last-resort handler. A rank now gets that handler too: each
    line once, as on one process; another rank's marked `[rank N]` (`ood.utils.get_logger` keeps those quiet)."""
    import logging

    from ood import strategies
    from ood.api import _console_logs

    monkeypatch.setattr(logging.root, "handlers", [])  # a program without logging (pytest's capture handlers off)
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    ours, line = logging.getLogger("ood"), logging.getLogger("ood.data.folder")
    with _console_logs():
        targets, level = strategies._log_targets(), ours.level
    assert [(t.logger, t.stream) for t in targets] == [("ood", "stderr")] and ours.handlers == []
    try:
        for rank in (0, 1):  # what `_SpawnLauncher._wrapping_function` gives a rank, then its lines
            strategies._log_to(targets, logging.WARNING, rank)
            ours.setLevel(level)  # `_quiet_like`: the main process's logger levels
            line.info("id: preprocessing")
            line.warning("a warning")
            ours.handlers.clear()
    finally:
        ours.handlers.clear()
        ours.setLevel(logging.NOTSET)
    assert capsys.readouterr().err == ("id: preprocessing\na warning\n"
                                       "[rank 1] id: preprocessing\n[rank 1] a warning\n")


def test_one_unknown_detector_name_is_named_with_the_detectors(trained, tmp_path: Path) -> None:
    """`detectors="msp"` evaluates msp alone, and a misspelt `detectors="mps"` was "unknown detector selection 'mps'
    (did you mean 'msp'?); choices: ['full', 'all', 'cached'] or a list of names": the choices left out the name it
    suggested (and `fast`, `none`). One name is a one-name list: the line lists the detectors."""
    paths, model, _ = trained
    with pytest.raises(ConfigError, match=r"^unknown detector 'mps' \(did you mean 'msp'\?\); available: .*\bmsp\b"):
        ood.evaluate(model, paths["id"], [paths["far"]], detectors="mps", device="cpu", output_dir=tmp_path)


def test_one_detector_class_is_a_one_class_list() -> None:
    """One name went in as a one-name list, but one class of one's own (`detectors=FeatureNorm`, not in a list)
    stopped with "'ABCMeta' object is not iterable": it is the list of it, as a name is."""
    from ood.api import _detector_overrides
    from ood.detectors import detector_class

    assert _detector_overrides(detector_class("msp")) == _detector_overrides(["msp"]) == [
        "detectors=all", "detectors.names=[msp]"]


def test_a_model_file_or_another_non_module_is_one_line_saying_what_to_pass(tmp_path: Path) -> None:
    """`ood.evaluate("resnet18.pth", ...)`, the file a user has, failed with "'str' object has no attribute
    'parameters'"; now one line saying to build the network and load the file, or to give it to ood-eval."""
    message = (r"^model='resnet18.pth' is a path, not a network \(nn.Module\): build it and load the file "
               r"\(model = torchvision.models.resnet18\(num_classes=K\); model.load_state_dict\(torch.load\(path\)\)\), "
               r"or evaluate the file with ood-eval backbone.weights=resnet18.pth backbone=torchvision\|timm\|module .*$")
    with pytest.raises(ConfigError, match=message):
        ood.evaluate("resnet18.pth", tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        ood.extract(Path("resnet18.pth"), tmp_path / "id")
    assert not (tmp_path / "run").exists()


def test_a_path_as_the_model_is_named_before_the_missing_data(tmp_path: Path) -> None:
    """`ood.evaluate("<run folder>", overrides=[...])`, a run folder given as the model without data keywords, said
    "needs id_data= and ood_data=": the data check came first; the model is checked first, so the line says the path
    is no network."""
    with pytest.raises(ConfigError, match=rf"^model='{re.escape(str(tmp_path))}' is a path, not a network \(nn.Module\)"):
        ood.evaluate(str(tmp_path), overrides=["detectors.sensitivity=true"])
    (tmp_path / "checkpoints").mkdir()  # an ood run folder: the line names the ood-eval command of its checkpoint
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"^model='{re.escape(str(tmp_path))}' is an ood run folder, not a network "
                                          rf"\(nn.Module\): evaluate its checkpoint with ood-eval "
                                          rf"ckpt_path={re.escape(str(last))} \(its data and method as trained; "
                                          r"the other ood-eval keys as overrides\)$"):
        ood.evaluate(str(tmp_path))


def test_a_state_dict_as_the_model_says_to_load_it_into_the_network(tmp_path: Path) -> None:
    """`model=torch.load("resnet18.pth")`, the weights without their network, was "model= takes a network
    (nn.Module), got a OrderedDict": one line saying to build the network and load them into it."""
    state = nn.Linear(2, 3).state_dict()
    with pytest.raises(ConfigError, match=r"^model= is a mapping of 2 entries \(a state dict or checkpoint: weights "
                                          r"without their network\): build the network and load them "
                                          r"\(model = torchvision.models.resnet18\(num_classes=K\); "
                                          r"model.load_state_dict\(state\)\)$"):
        ood.evaluate(state, tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^model= takes a network \(nn.Module\), got an int$"):
        ood.extract(3, tmp_path / "id")


def test_a_model_on_the_meta_device_is_one_line(tmp_path: Path) -> None:
    """A network built on the meta device (no values: `torch.device("meta")`, `init_empty_weights`) stopped with
    PyTorch's "Cannot copy out of meta tensor; no data!" after the data was read; now one line before the run."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3, device="meta"))
    message = (r"^the model's parameters are on the meta device \(shapes without values\): load its weights first "
               r"\(model.to_empty\(device='cpu'\), then model.load_state_dict\(...\)\)$")
    with pytest.raises(ConfigError, match=message):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        ood.extract(net, tmp_path / "id")


def test_an_unusable_device_is_one_line(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _, _ = trained
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device='cuda' but torch .* sees no CUDA GPU; use device='cpu'$"):
        ood.evaluate(nn.Linear(2, 3), paths["id"], [paths["far"]], device="cuda", output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"^device='cuda:1' but torch .* sees no CUDA GPU"):
        ood.extract(nn.Linear(2, 3), paths["id"], device="cuda:1")
    with pytest.raises(ConfigError, match=r"^device='gpu' is unknown; choices: cpu, cuda, cuda:<index>$"):
        ood.evaluate(nn.Linear(2, 3), paths["id"], [paths["far"]], device="gpu", output_dir=tmp_path)


def test_a_half_precision_model_is_one_line(trained, tmp_path: Path) -> None:
    """A `model.half()` (or bf16, float64) met float32 images in its first layer: PyTorch's dtype traceback after
    the data was read; now one line before the run, saying what to pass."""
    paths, _, _ = trained
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)).to(torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^the model's parameters are torch.bfloat16 and the evaluation feeds float32 "
                                          r"images: pass model.float\(\)"):
        ood.evaluate(net, paths["id"], [paths["far"]], device="cpu", output_dir=tmp_path)
    assert not (tmp_path / "config.yaml").exists()


def test_a_misspelt_data_option_is_one_line(trained, tmp_path: Path) -> None:
    paths, _, _ = trained
    with pytest.raises(ConfigError, match=r"^ood.evaluate got an unknown keyword 'image_sze' \(did you mean 'image_size'\?\); "
                                          r"data options: \['bad_images', .*'val_fraction'\]$"):
        ood.evaluate(nn.Linear(2, 3), paths["id"], [paths["far"]], image_sze=32, device="cpu", output_dir=tmp_path)


def test_a_misspelt_method_or_extract_keyword_is_one_line(trained, tmp_path: Path) -> None:
    """`method=` a name with no config raised Hydra's "In 'train': Could not find 'method/grod'" (after clearing the
    output folder); a misspelt `ood.extract` keyword raised "resolve_preprocessing() got an unexpected keyword
    argument", an inner function's TypeError. Both are one line naming the choices."""
    paths, _, _ = trained
    with pytest.raises(ConfigError, match=r"^method='grod' is no method config; choices: ce, cluster, .*grood, .*oe$"):
        ood.evaluate(nn.Linear(2, 3), paths["id"], [paths["far"]], method="grod", device="cpu", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"^ood.extract got an unknown keyword 'imagesize' \(did you mean 'image_size'\?\); "
                                          r"preprocessing options: \['image_size', 'resize', 'mean', 'std', 'interpolation'\]$"):
        ood.extract(nn.Linear(2, 3), paths["far"], imagesize=32)


def test_keywords_of_the_wrong_type_or_range_are_one_line(trained, tmp_path: Path) -> None:
    """`seed=1.5` and `seed=True` were run and written into the rows as the seed (`ood-report` groups by it),
    `seed=-1` failed in NumPy naming its bounds, `fsood='yes'` was read as True (and `fsood=1` too: a data without
    csid sets was then told it needs them), `detectors=123` and `transform='x'` ended in Python's TypeErrors on an int
    and a str, `output_dir=5` in one from `os.fspath`. Each is now one line naming the keyword, before a folder is
    made or an image read."""
    paths, _, _ = trained
    call = {"id_data": paths["id"], "ood_data": [paths["far"]], "device": "cpu", "output_dir": tmp_path / "run"}
    for kwargs, message in [
        ({"seed": 1.5}, r"seed=1.5: must be a whole number in \[0, 2\*\*32 - 1\]"),
        ({"seed": True}, r"seed=True: must be a whole number"),
        ({"seed": -1}, r"seed=-1: must be a whole number"),
        ({"seed": 2**32}, r"seed=4294967296: must be a whole number"),
        ({"fsood": "yes"}, r"fsood='yes': must be True, False or None \(None: full-spectrum rows when ood_data has "
                           r"csid sets\)$"),
        ({"fsood": 1}, r"fsood=1: must be True, False or None"),
        ({"detectors": 123}, r"detectors=123: give a detector selection \(all, cached, fast, full, none\), a "
                             r"detector name or class, or a list of them$"),
        ({"transform": "x"}, r"transform='x': must be a callable from a PIL image to a tensor \(a torchvision "
                             r"transform\) or None$"),
        ({"output_dir": 5}, r"output_dir=5: must be a folder path \(str or os.PathLike\) or None \(a temporary "
                            r"folder\)$"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{message}"):
            ood.evaluate(nn.Linear(2, 3), **{**call, **kwargs})
        assert not (tmp_path / "run").exists(), kwargs
    with pytest.raises(ConfigError, match=r"^transform=3: must be a callable"):
        ood.extract(nn.Linear(2, 3), paths["far"], transform=3)
    for key in ("layers", "taps"):  # Python's "'int' object is not iterable"
        with pytest.raises(ConfigError, match=rf"^{key}=5: give a name or a list of names$"):
            ood.extract(nn.Linear(2, 3), paths["far"], **{key: 5})
    with pytest.raises(ConfigError, match=r"^data=5: give a folder of images \(str or os.PathLike\) or a torch Dataset$"):
        ood.extract(nn.Linear(2, 3), 5)
    # NumPy's integers and bools are taken: the rows' seed is a plain int
    results = ood.evaluate(trained[1], paths["id"], [paths["far"]], detectors=["msp"], seed=np.int64(3),
                           fsood=np.bool_(False), image_size=32, resize=32, device="cpu", output_dir=tmp_path / "np")
    assert [r["seed"] for r in results.rows] == [3] and type(results.rows[0]["seed"]) is int
    assert list(results.per_image({"msp"}).columns)[-1] == "msp"  # any iterable of names, as before
    with pytest.raises(ConfigError, match=r"^detectors=5: give a name or a list of names$"):
        results.per_image(5)
    with pytest.raises(ConfigError, match=r"/results.jsonl: a file, not a folder; give the run folder an evaluation"):
        ood.Results.from_dir(tmp_path / "np" / "results.jsonl")  # it said "no such folder" of a file that is there


def test_a_run_file_cut_short_is_one_line_naming_it(trained, tmp_path: Path) -> None:
    """`Results.from_dir` of a run whose results.jsonl, scores.npz or samples.csv was cut short (a crash while it was
    written, a copy cut off) ended in json's error naming no file, NumPy's advice to unpickle the scores, or pandas'
    traceback."""
    paths, model, _ = trained
    run = tmp_path / "run"
    ood.evaluate(model, paths["id"], [paths["far"]], detectors=["msp"], image_size=32, resize=32, device="cpu",
                 output_dir=run)
    lines = (run / "results.jsonl").read_text()
    (run / "results.jsonl").write_text(lines + '{"detector": "ms')
    with pytest.raises(OODError, match=rf"^{re.escape(str(run))}/results.jsonl:2: not a JSON line \(Unterminated "
                                       r"string starting at\)$"):
        ood.Results.from_dir(run)
    (run / "results.jsonl").write_text(lines)
    (run / "scores.npz").write_bytes((run / "scores.npz").read_bytes()[:100])
    with pytest.raises(ConfigError, match=r"/scores.npz cannot be read as a NumPy .npz archive: cut short by a crash "
                                          r"while it was written\? rerun the evaluation$"):
        ood.Results.from_dir(run)
    (run / "scores.npz").unlink()
    (run / "samples.csv").write_text('split,row\n"id_test,1\n')
    with pytest.raises(ConfigError, match=r"/samples.csv cannot be read as a CSV table \(ParserError: .*\): cut short"):
        ood.Results.from_dir(run)


def test_a_method_whose_score_needs_its_training_is_refused(trained, tmp_path: Path) -> None:
    """`method="heatmap"` scored the model with a randomly initialised decoder, and `energy_cfl` its distance to
    untrained (zero) class centres: rows of AUROCs that say nothing about the model. Refused in one line; a post-hoc
    method (cluster) still runs."""
    paths, _, _ = trained
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    run = dict(detectors="none", image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    # the command line's rule (the configured parts no file fills), whose file key is named (it was not)
    file = r", or give its file: overrides=\['\+method.decoder_ckpt=<file>'\]"
    for method, parts, files in (("heatmap", "decoder", file), ("energy_cfl", "centres, head", "")):
        with pytest.raises(ConfigError, match=rf"^method='{method}' scores with parts trained with the network \({parts}\), "
                                              rf"which ood.evaluate neither trains nor loads: train it \(ood-train "
                                              rf"method={method}\) and evaluate its run \(ood-eval ckpt_path=<run>\){files}$"):
            ood.evaluate(net, paths["id"], [paths["far"]], method=method, **run)
        assert not (tmp_path / "run" / "results.jsonl").exists()
    rows = ood.evaluate(net, paths["id"], [paths["far"]], method="cluster", **run).rows
    assert [(r["detector"], r["ood_dataset"]) for r in rows] == [("cluster", "checkers")]


def test_the_refusal_of_untrained_parts_names_the_configured_method_and_an_override_that_is_taken(
        tmp_path: Path) -> None:
    """A method given in `overrides` (the `method` keyword left None) was refused as `method=None` ('ood-train
    method=None'), and the file key it offered, `overrides=['method.decoder_ckpt=<file>']`, was refused in turn as an
    unknown config key: method=heatmap's config has no decoder_ckpt. The refusal names the configured method and the
    override as it is taken (the next call, given it, reads the file)."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    run = dict(detectors="none", image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^method='heatmap' scores with parts trained with the network \(decoder\), "
                                          r"which ood.evaluate neither trains nor loads: train it \(ood-train "
                                          r"method=heatmap\) and evaluate its run \(ood-eval ckpt_path=<run>\), or give "
                                          r"its file: overrides=\['\+method.decoder_ckpt=<file>'\]$"):
        ood.evaluate(net, paths["id"], [paths["far"]], overrides=["method=heatmap"], **run)
    decoder = tmp_path / "decoder.pt"
    with pytest.raises(CheckpointError, match=rf"^checkpoint not found: {re.escape(str(decoder))}$"):
        ood.evaluate(net, paths["id"], [paths["far"]], method="heatmap", overrides=[f"+method.decoder_ckpt={decoder}"],
                     **run)


def test_a_corrupt_image_read_by_a_worker_is_one_line(tmp_path: Path) -> None:
    """A DataLoader worker's error comes back with a traceback as its text; the API raises the one line it was."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    bad = sorted((paths["id"] / "test").rglob("*.png"))[0]
    bad.write_bytes(b"junk")
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(BadImageError, match=rf"^unreadable image {bad}: UnidentifiedImageError: [^\n]*$"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                     num_workers=1, output_dir=tmp_path / "run")
    with pytest.raises(BadImageError, match=rf"^unreadable image {bad}: [^\n]*$"):
        ood.extract(net, paths["id"] / "test", image_size=32, resize=32, num_workers=1)


def test_evaluate_leaves_the_callers_random_streams_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ood.evaluate` inside the user's own loop: the run seeds the global generators and turns deterministic
    algorithms on (trainer=cpu); the caller gets back its random streams, its flags and no PL_GLOBAL_SEED."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    deterministic = torch.are_deterministic_algorithms_enabled()  # an earlier run in this process may have left it
    torch.use_deterministic_algorithms(False)
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))

    def draws() -> tuple[torch.Tensor, float, float]:
        return torch.rand(3), float(np.random.rand()), random.random()

    def seeded() -> None:
        torch.manual_seed(123)
        np.random.seed(123)
        random.seed(123)

    seeded()
    expected = draws()
    seeded()
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run")
    after = draws()
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert not torch.are_deterministic_algorithms_enabled() and "PL_GLOBAL_SEED" not in os.environ
    torch.use_deterministic_algorithms(deterministic)


def _one_fake_cuda_generator(monkeypatch: pytest.MonkeyPatch) -> torch.Generator:
    """One visible GPU whose default generator is a CPU generator standing in for it (torch's seeding code runs
    as on a GPU): what CUDA's generators hold, without one."""
    gen = torch.Generator()
    monkeypatch.setattr(torch.cuda.random, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (gen,))
    return gen


def _first_cuda_use() -> None:
    """What CUDA's initialisation does with the seeds queued before it (`torch.manual_seed` before any CUDA call)."""
    for call in torch.cuda._lazy_seed_tracker.get_calls():
        if call is not None:
            call[0]()


def test_a_cpu_evaluate_keeps_the_seed_the_callers_first_cuda_use_gets(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch.manual_seed(7)` before any CUDA call queues seed 7 for CUDA's first use; the run's seed_everything
    (seed 0) replaced it and the generators were restored only once CUDA was initialised: the caller's CUDA stream
    then started from seed 0."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    torch.manual_seed(7)
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run")
    gen = _one_fake_cuda_generator(monkeypatch)
    _first_cuda_use()
    assert gen.initial_seed() == 7


@pytest.mark.parametrize("caller_seed", [7, None])
def test_an_evaluate_that_initialises_cuda_gives_the_caller_its_own_cuda_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caller_seed: int | None) -> None:
    """CUDA first initialised by the run (the caller's first CUDA use is `ood.evaluate(device='cuda')`): its
    generators stayed seeded with the run's seed and advanced by its draws, so the caller's CUDA draws afterwards
    (dropout, `torch.randn(device='cuda')`) were not those of its own seed, or of torch's default seed when it set
    none. Faked: CUDA initialises once the run is built, which draws 5 numbers on the device."""
    from ood import train

    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    gen = _one_fake_cuda_generator(monkeypatch)
    initialised = [False]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialised[0])
    build = train.build

    def build_on_cuda(*args: object, **kwargs: object) -> object:
        built = build(*args, **kwargs)  # seed_everything(0) queues seed 0 for CUDA's first use
        initialised[0] = True  # the model moved to the device
        _first_cuda_use()
        torch.rand(5, generator=gen)
        return built

    monkeypatch.setattr(train, "build", build_on_cuda)
    own = torch.Generator()  # CUDA's generator as the caller's first CUDA use would find it
    if caller_seed is None:  # nothing queued (an earlier test's torch.manual_seed would be)
        monkeypatch.setattr(torch.cuda, "_lazy_seed_tracker", type(torch.cuda._lazy_seed_tracker)())
    else:
        torch.manual_seed(caller_seed)
        own.manual_seed(caller_seed)
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run")
    assert initialised[0] and gen.initial_seed() == own.initial_seed()
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=own))


def test_evaluate_inside_a_callers_hydra_app_leaves_its_hydra(tmp_path: Path) -> None:
    """A researcher's own `@hydra.main` script (or `initialize_config_dir`) calling `ood.evaluate`: the run cleared
    their GlobalHydra, so their next `compose()` failed with "GlobalHydra is not initialized"."""
    from hydra import compose, initialize_config_dir

    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("lr: 0.1\n")
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base="1.3"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                     output_dir=tmp_path / "run")
        assert compose("mine", overrides=["lr=0.2"]) == {"lr": 0.2}


def test_evaluate_and_extract_inside_the_callers_inference_mode(tmp_path: Path) -> None:
    """Evaluation code often runs under `torch.inference_mode()`: `ood.evaluate` there stopped on "Inference tensors
    do not track version counter" (the banks' finiteness check read `_version`), and with that passed, tempscale's
    gradient fit failed ("does not require grad"); a bank `ood.extract` made there could not be fitted either."""
    paths = make_image_folders(tmp_path / "data", train=3, test=2, ood=3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    run = dict(detectors=["msp", "tempscale"], image_size=32, resize=32, device="cpu")
    plain = ood.evaluate(net, paths["id"], [paths["far"]], output_dir=tmp_path / "plain", **run)
    with torch.inference_mode():
        inside = ood.evaluate(net, paths["id"], [paths["far"]], output_dir=tmp_path / "inside", **run)
        bank = ood.extract(net, paths["far"], image_size=32, resize=32)
        scores = build_detector("msp").fit(bank).score(bank)
    assert inside.rows == plain.rows
    np.testing.assert_array_equal(inside.scores["tempscale"]["checkers"], plain.scores["tempscale"]["checkers"])
    np.testing.assert_allclose(scores.numpy(), plain.scores["msp"]["checkers"], rtol=1e-6)


def test_evaluate_inside_a_callers_autocast_scores_as_outside(tmp_path: Path) -> None:
    """A training script's validation block often runs under `torch.autocast`: the pass that collects the banks ran
    the caller's network in bf16 there, so the rows moved with the caller's precision (the CPU's autocast stands in
    for CUDA's)."""
    paths = make_image_folders(tmp_path / "data", train=3, test=2, ood=3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    run = dict(detectors=["msp", "vim"], image_size=32, resize=32, device="cpu")
    plain = ood.evaluate(net, paths["id"], [paths["far"]], output_dir=tmp_path / "plain", **run)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ood.evaluate(net, paths["id"], [paths["far"]], output_dir=tmp_path / "inside", **run)
    assert inside.rows == plain.rows
    for name in ("msp", "vim"):
        np.testing.assert_array_equal(inside.scores[name]["checkers"], plain.scores[name]["checkers"])


def test_extract_inside_a_callers_autocast_banks_as_outside() -> None:
    """`ood.extract` under a caller's `torch.autocast` gave a bf16 bank (features 3e-3 off the float32 ones), where
    `ood.evaluate` and `ood-eval` bank in float32 whatever the caller's precision."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    plain = ood.extract(net, data, transform=nn.Identity())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ood.extract(net, data, transform=nn.Identity())
    for key in ("features", "logits"):
        torch.testing.assert_close(getattr(inside, key), getattr(plain, key), rtol=0, atol=0)


class _CtrlC(torch.utils.data.Dataset):
    """Images until the third, where the user presses Ctrl-C."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == 2:
            raise KeyboardInterrupt
        return torch.zeros(3, 32, 32)


def test_ctrl_c_during_evaluate_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    """Lightning ends a Ctrl-C with `sys.exit(1)`: the caller's program (a notebook cell, a loop over models with
    `except KeyboardInterrupt`) got a SystemExit. It gets the KeyboardInterrupt back, its SIGINT handler as it was,
    and the run folder FAILED.txt."""
    import signal

    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        ood.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3)), paths["id"], {"far": {"x": _CtrlC()}},
                     detectors="msp", image_size=32, resize=32, mean=[0.5] * 3, std=[0.5] * 3, device="cpu",
                     output_dir=tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is handler
    assert (tmp_path / "run" / "FAILED.txt").read_text() == "KeyboardInterrupt: \n"


def test_evaluate_gives_the_model_back_as_it_was(tmp_path: Path) -> None:
    """The run scores in eval mode and Lightning's teardown moves the module to the CPU: the caller's model comes
    back in its own modes, module by module. The device half (a CUDA model handed back on the CPU) needs a GPU:
    `make gpu-check`'s api check evaluates a CUDA ResNet-18 in training mode."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    net[2].eval()  # a frozen batch norm inside a model in training
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run")
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True]
    assert {p.device.type for p in net.parameters()} == {"cpu"}


def test_evaluate_keeps_the_gradients_a_training_loop_accumulated(tmp_path: Path) -> None:
    """Lightning's `trainer.test` sets every parameter's `.grad` to None (`zero_grad` before its stage): a loop that
    accumulates gradients over several batches and evaluates between two of them stepped with the batches after the
    call alone (and its `clip_grad_norm_` / gradient logging read None)."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    net(torch.ones(2, 3, 32, 32)).sum().backward()
    accumulated = [p.grad.clone() for p in net.parameters()]
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run")
    assert [p.grad is not None and torch.equal(p.grad, g) for p, g in zip(net.parameters(), accumulated, strict=True)] == [True, True]


def test_evaluate_leaves_the_callers_network_trainable(tmp_path: Path) -> None:
    """A method that freezes its backbone (`method=heatmap`'s `init.freeze: [backbone]`, or the override here) set
    `requires_grad=False` on the caller's own parameters, which stayed so after the call: the training loop that
    evaluated went on with a network that no longer learned (its optimizer skipped the parameters without `.grad`)."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    net[1].bias.requires_grad_(False)  # the caller's own frozen part stays frozen
    ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                 output_dir=tmp_path / "run", overrides=["method.init.freeze=[backbone]"])
    assert [p.requires_grad for p in net.parameters()] == [True, False]


def test_size_and_channel_mismatches_say_what_to_pass(tmp_path: Path) -> None:
    """PyTorch's errors halfway through the pass become one line naming the `transform` to pass: a transform that
    keeps each image's size (`T.ToTensor()` on images of two sizes), and a grey-level network on RGB images."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(paths["id"] / "test" / "c0" / "small.png")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"^images of different sizes in one batch \(\[3, 32, 32\] at entry 0 and "
                                          r"\[3, 20, 24\] at entry 1\): transform= must give every image one size"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", transform=T.ToTensor(), device="cpu",
                     output_dir=tmp_path / "sizes")
    (paths["id"] / "test" / "c0" / "small.png").unlink()
    grey = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ConfigError, match=r"^the model's first convolution reads 1 channel\(s\) and images are decoded "
                                          r"as RGB: pass transform= making 1-channel tensors, e.g. T.Compose\(\[T.Grayscale\(1\)"):
        ood.evaluate(grey, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                     output_dir=tmp_path / "grey")
    transform = T.Compose([T.Grayscale(1), T.ToTensor()])  # what the message asks for: the run goes through
    ood.evaluate(grey, paths["id"], [paths["far"]], detectors="msp", transform=transform, device="cpu",
                 output_dir=tmp_path / "grey_ok")
    ones = torch.utils.data.TensorDataset(torch.zeros(6, 1, 8, 8), torch.arange(6) % 3)  # a Dataset's own tensors
    with pytest.raises(ConfigError, match=r"^the model's first convolution reads 3 channel\(s\) and the input tensors "
                                          r"have 1: the Dataset's tensors \(or the transform's output\) must have 3$"):
        ood.evaluate(net, {"train": ones, "test": ones}, [paths["far"]], detectors="msp", device="cpu",
                     output_dir=tmp_path / "ones")


def test_a_transform_object_gives_its_normalisation_to_odin(tmp_path: Path) -> None:
    """ODIN steps by noise / std: with a `transform` its `Normalize` gives the std (it was taken as 1, a 4.4x smaller
    step than the same preprocessing given as values), or `std=` when given; size options beside it are refused."""
    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    run = dict(detectors=["odin"], device="cpu", overrides=["+detectors.params.odin.noise=0.1"])
    values = ood.evaluate(net, paths["id"], [paths["far"]], image_size=32, resize=32, output_dir=tmp_path / "v", **run)
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), NORMALIZE])
    given = ood.evaluate(net, paths["id"], [paths["far"]], transform=transform, output_dir=tmp_path / "t", **run)
    assert np.array_equal(given.scores["odin"]["test"], values.scores["odin"]["test"])
    recorded = json.loads((tmp_path / "t" / "preprocessing.json").read_text())
    assert (recorded["mean"], recorded["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    bare = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    ones = ood.evaluate(net, paths["id"], [paths["far"]], transform=bare, std=[1.0, 1.0, 1.0], output_dir=tmp_path / "s", **run)
    halves = ood.evaluate(net, paths["id"], [paths["far"]], transform=bare, output_dir=tmp_path / "h", **run)
    assert not np.array_equal(ones.scores["odin"]["test"], halves.scores["odin"]["test"])
    with pytest.raises(ConfigError, match=r"^image_size given with a transform object, which does all the preprocessing"):
        ood.evaluate(net, paths["id"], [paths["far"]], transform=bare, image_size=32, output_dir=tmp_path / "x", **run)


def test_extract_caches_the_layer_taps_a_detector_reads() -> None:
    """`ood.extract(taps=["combood"])`: the bank holds combood's activation taps (each ReLU's input extremes), so the
    detector fits on it (an extracted bank had none, and combood's default could not run from `ood.extract`); the
    caller's network is left without hooks; a detector that reads no taps is refused in one line."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(9, 3, 2, 2), torch.tensor([0, 1, 2] * 3))
    bank = ood.extract(net, data, taps="combood", batch_size=4)
    with torch.no_grad():
        pre = net[1](net[0](data.tensors[0]))
    assert list(bank.extras) == ["combood:net.2", "combood_after:net.2"]  # before and after the call (not in place)
    for key in bank.extras:
        torch.testing.assert_close(bank.extras[key], torch.stack([pre.amax(1), -pre.amin(1)], 1))
    assert not net[2]._forward_pre_hooks and torch.isfinite(build_detector("combood", k=3).fit(bank).score(bank)).all()
    with pytest.raises(ConfigError, match=r"^taps=\['knn'\]: \['knn'\] read no layer taps; detectors that do: \[.*'combood'"):
        ood.extract(net, data, taps=["knn"])


def test_a_head_without_bias_reads_as_a_zero_bias(tmp_path: Path) -> None:
    """A final `nn.Linear(..., bias=False)` (cosine and bias-free heads) stopped the evaluation with an
    AttributeError; the detectors that read the head see b = 0, as a zero-bias twin gives them."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3, bias=False))
    twin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    twin[1].weight.data.copy_(bare[1].weight.data)
    twin[1].bias.data.zero_()
    scores = [ood.evaluate(net, paths["id"], [paths["far"]], detectors=["fdbd", "react", "adascale_a"], image_size=32,
                           resize=32, device="cpu", output_dir=tmp_path / name, overrides=["detectors.tune=false"]).scores
              for name, net in (("bare", bare), ("twin", twin))]
    assert scores[0].keys() == scores[1].keys() == {"fdbd", "react"}  # adascale_a needs stages: skipped, not a crash
    for detector, splits in scores[0].items():
        for split, values in splits.items():
            np.testing.assert_allclose(values, scores[1][detector][split], rtol=1e-6, err_msg=f"{detector} {split}")
    bank = ood.extract(bare, paths["far"], image_size=32, resize=32)
    assert torch.equal(bank.bias, torch.zeros(3))


@pytest.mark.parametrize(("keyword", "message"), [
    ({"batch_size": 0}, r"batch_size=0 is outside its range whole numbers in \[1, inf\]"),
    ({"batch_size": 2.5}, r"batch_size=2.5 is outside its range whole numbers in \[1, inf\]"),
    ({"num_workers": -1}, r"num_workers=-1 is outside its range whole numbers in \[0, inf\]"),
    ({"fit_fraction": 2}, r"fit_fraction must be in \(0, 1\], got 2"),
])
def test_a_loader_keyword_out_of_range_is_named_as_the_call_gives_it(tmp_path: Path, keyword: dict, message: str) -> None:
    """`ood.evaluate(batch_size=0)` was refused as `data.eval_batch_size=0` (a config key the call does not have, the
    datamodule's check), after the output folder was made; `ood.extract(batch_size=0)` with torch's ValueError. Both
    name the keyword, before anything runs."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                     output_dir=tmp_path / "run", **keyword)
    assert not (tmp_path / "run").exists()
    if "fit_fraction" not in keyword:
        with pytest.raises(ConfigError, match=rf"^{message}$"):
            ood.extract(net, paths["far"], image_size=32, resize=32, device="cpu", **keyword)


@pytest.mark.parametrize(("keyword", "argument"), [
    ({"eval_batch_size": 8}, "batch_size= (the evaluation's batch size)"),
    ({"root": "elsewhere"}, "id_data=<folder>"),
    ({"train": "elsewhere/train"}, "id_data={'train': ...}"),
    ({"test": "elsewhere/test"}, "id_data={'test': ...}"),
    ({"val": "elsewhere/val"}, "id_data={'val': ...}"),
    ({"ood": {"far": {"x": "elsewhere"}}}, "ood_data="),
    ({"csid": {"shifted": "elsewhere"}}, "fsood= (the full-spectrum rows; the sets: ood_data={..., 'csid': {name: folder}})"),
    ({"csid": False}, "fsood= (the full-spectrum rows; the sets: ood_data={..., 'csid': {name: folder}})"),
    ({"report_dir": "elsewhere"}, "output_dir="),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_a_key_the_call_sets_from_its_own_arguments_is_refused_naming_them(tmp_path: Path, keyword: dict,
                                                                         argument: str) -> None:
    """A folder-data key that `ood.evaluate` fills from its own arguments was taken as a `**data` option and replaced
    them without a word: `eval_batch_size=8` overrode `batch_size=`, `root=` evaluated another folder than `id_data`
    (its `train` / `test` / `val` keys its splits, `ood=` the OOD sets). One line naming the argument, before
    anything runs."""
    [(name, value)] = keyword.items()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    message = f"ood.evaluate got {name}={value!r}, a folder-data key this call sets from {argument}: give it there"
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], batch_size=64, output_dir=tmp_path / "run", **keyword)
    assert not (tmp_path / "run").exists()


OUTLIERS = "it reads no outlier-exposure set; the OOD sets it scores are ood_data"


@pytest.mark.parametrize(("keyword", "instead"), [
    ({"drop_last": False}, "its pass scores every image, the last partial batch too"),
    ({"augment": False}, "every split gets the evaluation preprocessing (transform=, or image_size / resize / mean / std)"),
    ({"outliers": "data/outliers"}, OUTLIERS),
    ({"augment_outliers": False}, OUTLIERS),
    ({"outlier_batch_size": 16}, OUTLIERS),
    # data=folder's copy of ood-train's switch: taken since it is a key of folder.yaml, and ignored (it was unknown)
    ({"evaluate": False}, "it evaluates the OOD sets of ood_data, always (ood-train evaluate=false trains without them)"),
])
def test_a_training_option_is_refused_naming_what_the_evaluation_does(tmp_path: Path, keyword: dict, instead: str) -> None:
    """`ood.evaluate(..., drop_last=False)` (and the other training options of the folder data: augmentation,
    outlier exposure) ran without a word and changed nothing but the recorded config.yaml: an evaluation never
    trains. Each is one line, before anything runs."""
    [(name, value)] = keyword.items()
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    message = f"ood.evaluate got {name}={value!r}: {name} is a training option; ood.evaluate never trains: {instead}"
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run", **keyword)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("data.drop_last=false", "data.drop_last is a training option; ood.evaluate never trains: its pass scores every "
                             "image, the last partial batch too"),
    ("+data.outliers=elsewhere", "data.outliers is a training option; ood.evaluate never trains: " + OUTLIERS),
    ("data.evaluate=false", "data.evaluate is a training option; ood.evaluate never trains: it evaluates the OOD sets "
                            "of ood_data, always (ood-train evaluate=false trains without them)"),
    ("data.root=elsewhere", "a folder-data key this call sets from id_data=<folder>: give it there"),
    ("data.ood.far.x=elsewhere", "a folder-data key this call sets from ood_data=: give it there"),
])
def test_an_override_of_a_training_option_or_of_the_calls_data_is_refused(tmp_path: Path, override: str,
                                                                          message: str) -> None:
    """The same keys as keywords are refused (`drop_last=`, `root=`); through `overrides=` a training option changed
    nothing and `data.root` / `data.ood` were dropped in silence (set after the compose from id_data / ood_data)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ConfigError, match=rf"^ood.evaluate got overrides {re.escape(override)}[:,] {re.escape(message)}$"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run", overrides=[override])
    assert not (tmp_path / "run").exists()


def test_a_call_refused_by_its_checks_leaves_an_earlier_evaluations_folder_as_it_was(tmp_path: Path) -> None:
    """`ood.evaluate(..., output_dir=<an earlier evaluation's folder>)` refused by a check after the folder was taken
    (a misspelt override) deleted that evaluation's results.jsonl and scores.npz, then left FAILED.txt beside its
    config.yaml (ood-train keeps a finished folder as it was in the same case). Now nothing there changes."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    run = tmp_path / "run"
    run.mkdir()
    files = {"config.yaml": "data: {}\n", "results.jsonl": "{}\n", "scores.npz": "npz"}
    for name, text in files.items():
        (run / name).write_text(text)
    with pytest.raises(ConfigError, match="detectors.parms"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], output_dir=run, overrides=["detectors.parms.knn.k=3"])
    assert {p.name: p.read_text() for p in run.iterdir()} == files


@pytest.mark.parametrize(("overrides", "message"), [
    (["detectors.names"], r"override 'detectors.names' is not key=value: give its value, 'detectors.names=<value>' "
                          r"\(or '~detectors.names' to delete the key\)"),
    (["seed 3"], r"override 'seed 3' is not key=value: give 'seed=3'"),
    (["seed = 3"], r"override 'seed = 3' is not key=value: give 'seed=3'"),
    ("seed=3", r"overrides='seed=3' is one string: give a list, overrides=\['seed=3'\]"),
], ids=["no-value", "space", "spaced-equals", "one-string"])
def test_an_override_that_is_not_key_value_is_one_line(tmp_path: Path, overrides: list[str] | str, message: str) -> None:
    """An override without `=` (or with a space for it) raised Hydra's parse error, with a traceback, after the output
    folder was made; one string was taken character by character. Now one line naming it, before anything runs."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ConfigError, match=rf"^{message}$"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], overrides=overrides, output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_keyword_and_an_override_of_its_config_key_must_agree(tmp_path: Path) -> None:
    """`image_size=64` with `overrides=["data.image_size=32"]` evaluated at 64 without a word (a data keyword is set
    after the compose), and `seed=3` with `"seed=4"` at 4 (the overrides come after the keywords'): every keyword
    that sets a config key is one line naming both when an override sets it to another value. The same value twice,
    and a deletion `~key`, run."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    for keyword, override in (({"image_size": 64}, "data.image_size=32"), ({"seed": 3}, "seed=4"),
                              ({"batch_size": 8}, "+data.eval_batch_size=16"), ({"method": "cluster"}, "method=grood"),
                              ({"detectors": ["msp"]}, "detectors.names=[knn]"), ({"detectors": "fast"}, "detectors=all"),
                              ({"fsood": False}, "evaluation.fsood=true"), ({"classes": ("c0", "c1")}, "data.classes=[c1,c0]")):
        [(name, value)] = keyword.items()
        with pytest.raises(ConfigError, match=rf"^{re.escape(f'{name}={value!r} and overrides {override} disagree: give one')}$"):
            ood.evaluate(net, paths["id"], [paths["far"]], device="cpu", output_dir=tmp_path / "run",
                         overrides=["trainer.enable_progress_bar=false", override], **keyword)
    assert not (tmp_path / "run").exists()
    for keyword in ("msp", ["msp"]):  # one name and the list of it agree (refused as disagreeing before)
        ood.api._check_keywords_against(["detectors.names=[msp]", "detectors.names=msp"], {"detectors": keyword})
    results = ood.evaluate(net, paths["id"], [paths["far"]], detectors=["msp"], image_size=32, resize=32, seed=3,
                           mean=(0.5, 0.5, 0.5), device="cpu", output_dir=tmp_path / "run",
                           overrides=["data.image_size=32", "detectors.names=[msp]", "seed=3", "data.mean=[0.5,0.5,0.5]",
                                      "~callbacks"])
    assert [(r["detector"], r["seed"]) for r in results.rows] == [("msp", 3)]
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert (config.data.image_size, list(config.data.mean)) == (32, [0.5, 0.5, 0.5])


def test_output_dir_of_a_cli_run_is_refused(tmp_path: Path) -> None:
    """`output_dir=` a training run's folder replaced its config.yaml (read with its checkpoint by ood-heatmap and
    ood-eval), results and scores, and left its identity.json naming another configuration; an earlier
    `ood.evaluate` folder is reused as before."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    run = tmp_path / "logs" / "train" / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: true\n")
    with pytest.raises(ConfigError, match=rf"^output_dir={run} holds an ood run \(checkpoints\): ood.evaluate would "
                                          r"replace its config.yaml, results.jsonl and scores.npz; give a folder of its own$"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu", output_dir=run)
    assert (run / "config.yaml").read_text() == "train: true\n"
    for _ in range(2):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors="msp", image_size=32, resize=32, device="cpu",
                     output_dir=tmp_path / "mine")


def test_example_script_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Path(__file__).resolve().parent.parent / "examples" / "your_model.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path), "--detectors", "msp,knn", "--steps", "2"])
    runpy.run_path(str(script), run_name="__main__")
    rows = ood.Results.from_dir(tmp_path / "run").rows
    assert sorted({(r["detector"], r["ood_dataset"]) for r in rows}) == [
        ("knn", "checkers"), ("knn", "noise"), ("msp", "checkers"), ("msp", "noise")
    ]
    assert (tmp_path / "run" / "preprocessing.json").is_file()


def test_a_reused_output_dir_keeps_no_earlier_run_files(tmp_path: Path) -> None:
    """Two models evaluated into one output_dir: the second run's Results hold its own scores, or none with
    `save_scores=false` (the first model's scores.npz was read back as its own), and no bad_images.json of the
    first run's `bad_images=skip`."""
    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2)
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    run = dict(detectors=["msp"], image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    first = ood.evaluate(nets[0], paths["id"], [paths["far"]], bad_images="skip", **run)
    assert json.loads((tmp_path / "run" / "bad_images.json").read_text()) == {"count": 0, "files": []}
    second = ood.evaluate(nets[1], paths["id"], [paths["far"]], overrides=["evaluation.sinks.results.save_scores=false"], **run)
    assert len(first.scores["msp"]["test"]) == 6 and second.scores == {}
    assert second.rows[0]["auroc"] != first.rows[0]["auroc"]
    assert not (tmp_path / "run" / "bad_images.json").exists()
    # a post-hoc method's diagnostics (cluster_stats.json) stayed beside the next run's rows, read as that run's
    ood.evaluate(nets[0], paths["id"], [paths["far"]], method="cluster", **run)
    assert (tmp_path / "run" / "cluster_stats.json").is_file()
    second = ood.evaluate(nets[1], paths["id"], [paths["far"]], **run)
    assert not (tmp_path / "run" / "cluster_stats.json").exists()
    # the first Results' folder now holds the second run: saving it copied the second run's rows under its name
    with pytest.raises(ConfigError, match=r"run no longer holds these results \(another evaluation into the same "
                                          r"output_dir replaced them\): give each evaluation its own output_dir to save it$"):
        first.save(tmp_path / "first")
    assert not (tmp_path / "first").exists()
    assert ood.Results.from_dir(second.save(tmp_path / "second")).rows == second.rows
    # a copy inside the run folder copied itself into itself (copy/copy) at every save
    with pytest.raises(ConfigError, match=r"copy is inside the run folder .*/run: save the results elsewhere$"):
        second.save(tmp_path / "run" / "copy")
    assert not (tmp_path / "run" / "copy").exists()


def test_a_failed_run_into_a_used_output_dir_leaves_failed_txt_not_the_earlier_results(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second evaluation into an `output_dir` that fails after writing its config.yaml left the first run's
    results.jsonl and scores.npz beside it: `Results.from_dir` and ood-report read the first run's msp rows under a
    config naming knn. As `ood-eval` does, the earlier results go first and the error is left in FAILED.txt. A call
    its checks refuse (a hyper-parameter out of range, checked as the evaluator is made) leaves the folder as it was."""
    from ood.evaluation.evaluator import Evaluator

    paths = make_image_folders(tmp_path / "data", train=2, test=2, ood=2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    run = dict(image_size=32, resize=32, device="cpu", output_dir=tmp_path / "run")
    ood.evaluate(net, paths["id"], [paths["far"]], detectors=["msp"], **run)
    with pytest.raises(ConfigError, match=r"^detector 'knn': k=0 is outside its range"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors=["knn"], overrides=["+detectors.params.knn.k=0"], **run)
    assert (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "run" / "FAILED.txt").exists()

    def fails(*args: object, **kwargs: object) -> None:
        raise ConfigError("detector 'knn': failed in the run")

    with monkeypatch.context() as patch:
        patch.setattr(Evaluator, "evaluate", fails)
        with pytest.raises(ConfigError, match=r"^detector 'knn': failed in the run$"):
            ood.evaluate(net, paths["id"], [paths["far"]], detectors=["knn"], **run)
    assert not (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "run" / "scores.npz").exists()
    assert (tmp_path / "run" / "FAILED.txt").read_text().startswith("ConfigError: detector 'knn': failed in the run")
    with pytest.raises(ConfigError, match=r"holds no results.jsonl: the evaluation did not finish$"):
        ood.Results.from_dir(tmp_path / "run")
    assert ood.evaluate(net, paths["id"], [paths["far"]], detectors=["msp"], **run).rows[0]["detector"] == "msp"
    assert not (tmp_path / "run" / "FAILED.txt").exists()


def test_a_temporary_run_folder_goes_when_the_process_ends(tmp_path: Path) -> None:
    """Without `output_dir`, each call's `ood-eval-*` temporary folder lives as long as the Python process (the
    results stay readable), then is deleted: a session of evaluations left them all behind."""
    paths = make_image_folders(tmp_path / "data", train=2, test=1, ood=2)
    script = (
        "import torch.nn as nn, ood\n"
        "net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))\n"
        f"r = ood.evaluate(net, {str(paths['id'])!r}, [{str(paths['far'])!r}], detectors='msp', image_size=32, "
        f"resize=32, device='cpu', overrides=[{NO_FIGURES!r}])\n"  # a subprocess: `no_figures` does not reach it
        "assert (r.run_dir / 'results.jsonl').is_file() and r.run_dir.name.startswith('ood-eval-')\n"
        "print(r.run_dir)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ood.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1])
    assert run_dir.name.startswith("ood-eval-") and not run_dir.exists()


def test_figures_leave_the_callers_pyplot_backend(tmp_path: Path) -> None:
    """A notebook's inline pyplot backend (svg here): ood's figures set `matplotlib.use("Agg")` when imported, so after
    `import ood` / `ood.evaluate` the researcher's own `plt` plots of the results no longer showed. The figures are
    now drawn without pyplot, leaving its backend and its list of figures as they were."""
    script = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt, numpy as np, ood\n"
        "from ood import plots\n"
        f"plots.roc_figure({{'msp': {{'test': np.arange(5.0), 'far': np.arange(5.0) - 1}}}}, ['far'], {str(tmp_path / 'roc.png')!r}, 't')\n"
        "print(matplotlib.get_backend(), plt.get_fignums())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(ood.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "svg []"
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_features_that_overflow_float16_stop_the_run_in_one_line(trained, tmp_path: Path) -> None:
    """Penultimate features above 65504 become inf in float16 banks; knn scored such rows -3.4e38 (a finite score:
    no NaN check caught it). The evaluation now stops naming the split, the count and the fix."""
    paths, _, _ = trained
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.mul_(1e6)
    with pytest.raises(NonFiniteError, match=r"^split train: \d+ of \d+ feature values are NaN or infinite; float16 features "
                                             r"overflow above 65504: use evaluation.feature_dtype=float32$"):
        ood.evaluate(net, paths["id"], [paths["far"]], detectors=["knn"], image_size=32, resize=32, device="cpu",
                     output_dir=tmp_path, overrides=["evaluation.feature_dtype=float16"])



def test_an_unpicklable_object_for_spawned_ranks_is_one_line() -> None:
    """`trainer=ddp_cpu` sends the model, data and transform to its ranks pickled: a lambda transform or a local
    Dataset class raised pickle's bare error (checked by hand: both now give this line through `ood.evaluate`)."""
    import pickle

    from ood.api import one_line_errors

    for err in (pickle.PicklingError("Can't pickle <function <lambda> at 0x1>: attribute lookup <lambda> on __main__ failed"),
                AttributeError("Can't pickle local object 'imgs.<locals>.D'")):
        with pytest.raises(ConfigError, match=r"^the run starts its ranks in new processes, which receive the model, "
                                              r"data and transform pickled, and: Can't pickle .*; pass picklable objects"), \
                one_line_errors():
            raise err
    with pytest.raises(AttributeError, match="no attribute"), one_line_errors():  # other errors pass unchanged
        raise AttributeError("'X' object has no attribute 'y'")


def test_two_widths_of_one_module_class_are_two_configurations(tmp_path: Path) -> None:
    """Two widths of one `nn.Module` class shared `backbone.target`, so ood-report averaged them as seeds of one
    configuration; the recorded `backbone.shapes` (parameter names and shapes) tells them apart and keeps the seeds
    of one width together, and a network built again from the config must have it."""
    from omegaconf import DictConfig

    from ood.api import _describe_backbone
    from ood.models.adapters import architecture_digest, module_backbone
    from ood.runs.identity import flat_config, identity

    def recorded(width: int, seed: int) -> DictConfig:
        torch.manual_seed(seed)
        node = OmegaConf.create({"library": "module", "target": "?", "weights": None})
        _describe_backbone(node, nn.Sequential(nn.Conv2d(3, width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)))
        return node

    nodes = [recorded(4, 0), recorded(4, 1), recorded(8, 0)]
    assert nodes[0].target == "torch.nn.modules.container.Sequential"
    configs = [identity(flat_config(OmegaConf.create({"backbone": node, "seed": 0}))) for node in nodes]
    assert configs[0] == configs[1] != configs[2]
    with torch.device("meta"):
        changed = torchvision.models.resnet18()
        changed.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 3))
    node = OmegaConf.create({"library": "torchvision", "name": "?"})
    _describe_backbone(node, changed)  # no builder makes it: its class name, and its shapes
    assert node.name == "resnet" and len(node.shapes) == 12
    with pytest.raises(ConfigError, match=rf"^backbone.shapes=000000000000 is the digest of the network the run "
                                          rf"evaluated; this one has {architecture_digest(nn.Identity())} \(other"):
        module_backbone("torch.nn.Identity", num_classes=3, shapes="000000000000")


def test_a_home_folder_in_an_override_is_expanded_as_on_the_command_line(tmp_path: Path) -> None:
    """`overrides=["evaluation.bank_dir=~/banks"]` stopped on Hydra's grammar ("quote a value with spaces or
    brackets"): `~` is expanded as the entry points expand it. Shown by the call reaching its next check."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))
    with pytest.raises(ConfigError, match=r"^ood.evaluate got overrides data.drop_last=false: data.drop_last is a "
                                          r"training option"):
        ood.evaluate(net, tmp_path / "id", [tmp_path / "far"], output_dir=tmp_path / "run",
                     overrides=["evaluation.bank_dir=~/banks", "data.drop_last=false"])


class _GreyToRGB(nn.Module):
    """An RGB net that reads grey images (its forward repeats the one channel): the channel probe runs it once."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize(("channels", "reads"), [(1, 1), (2, 3)])
def test_the_channel_probe_fires_none_of_the_callers_hooks(channels: int, reads: int) -> None:
    """`input_channels` runs the network on one zero image when its first convolution reads other channels than the
    data has: the caller's forward hooks and forward-pre hooks (a feature log, module or global) saw that image. They
    are off for the probe, and there, unchanged, after it, also when its forward fails (2 channels: the stem's
    refusal), and the probe's own hooks are gone."""
    from ood.models.base import input_channels

    net, seen = _GreyToRGB(), []
    handles = [net.body.register_forward_hook(lambda m, args, out: seen.append("body")),
               net.body[0].register_forward_pre_hook(lambda m, args: seen.append("conv")),
               net.fc.register_forward_hook(lambda m, args, kwargs, out: seen.append("fc"), with_kwargs=True),
               nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append("pre")),
               nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append("post"))]
    try:
        assert input_channels(net, channels, 8) == reads
        assert seen == []
        net(torch.zeros(1, 1, 8, 8))
    finally:
        for handle in handles:
            handle.remove()
    assert seen.count("body") == seen.count("conv") == seen.count("fc") == 1
    assert seen.count("pre") == seen.count("post") == len(list(net.modules()))
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules()) == 0


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_evaluate_takes_a_wrapped_model_as_the_module_inside(wrap: str, tmp_path: Path) -> None:
    """`ood.evaluate` / `ood.extract` on `torch.compile(net)` or `nn.DataParallel(net)` (as a training loop hands a model
    over): the adapters took the wrapper as one opaque module, so the stage-by-stage detectors (rankfeat) were
    skipped. The module inside is evaluated: the plain network's scores and layers."""
    from torch.utils.data import TensorDataset

    gen = torch.Generator().manual_seed(0)

    def images(n: int, shift: float = 0.0) -> TensorDataset:
        return TensorDataset(torch.rand(n, 3, 32, 32, generator=gen) + shift, torch.arange(n) % 3)

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    wrapped = torch.compile(net, backend="aot_eager") if wrap == "compile" else nn.DataParallel(net)
    test = images(6)
    result = ood.evaluate(wrapped, {"train": images(12), "test": test}, {"shifted": images(6, 0.5)},
                          detectors=["msp", "rankfeat"], batch_size=6, device="cpu", output_dir=tmp_path,
                          overrides=["detectors.tune=false"])
    assert result.scores.keys() == {"msp", "rankfeat"}
    with torch.no_grad():
        msp = net(test.tensors[0]).double().log_softmax(1).amax(1).numpy()
    np.testing.assert_allclose(result.scores["msp"]["test"], msp, rtol=1e-6)
    layer = ood.extract(wrapped, test, layers=["layer4"]).extras["layer4"]
    assert torch.equal(layer, ood.extract(net, test, layers=["layer4"]).extras["layer4"])


def test_a_distributed_data_parallel_model_is_the_module_inside(tmp_path: Path) -> None:
    """Under DDP the wrapper's every forward also broadcast the buffers, a collective the evaluation's ranks do not
    call alike: `DistributedDataParallel(net)`, also nested with `torch.compile` and `nn.DataParallel`, is `net`."""
    from ood.api import _network

    net = torchvision.models.resnet18(num_classes=3)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(net)
        assert _network(ddp) is net and _network(torch.compile(ddp)) is net and _network(nn.DataParallel(ddp)) is net
    finally:
        torch.distributed.destroy_process_group()
