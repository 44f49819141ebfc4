"""docs/adding_a_detector.md and docs/adding_a_method.md hold what they promise a contributor: the page's network
detectors (`needs_model`, `taps`) score as written, and the method contract's part attributes are declared by
`OODMethod` and behave as the page says (`part_files` fills a trained part, `unstored_parts` skips an older file's
entries)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import doc_blocks
from omegaconf import OmegaConf
from torch import nn

import ood.detectors.base as base_module
from ood import PROJECT_ROOT
from ood.detectors import build_detector
from ood.detectors.network import LayerTaps
from ood.errors import CheckpointError
from ood.evaluation.scoring import detector_scorers
from ood.features.bank import FeatureBank
from ood.methods.base import OODMethod
from ood.models.checkpoint import load_modules
from ood.models.small_cnn import SmallCNN
from ood.runs.checks import untrained_parts

DOCS = PROJECT_ROOT / "docs"


@pytest.fixture
def net_detectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """adding_a_detector.md's second example, written out as `net_detectors` and imported (its detectors
    registered); both undone after the test."""
    blocks = doc_blocks(DOCS / "adding_a_detector.md", "python")
    (tmp_path / "net_detectors.py").write_text(blocks[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    import net_detectors

    yield net_detectors
    for name in ("temp_msp", "stage_mean"):
        base_module._REGISTRY.pop(name, None)
    sys.modules.pop("net_detectors", None)


def test_the_network_detectors_of_the_page_score_as_written(net_detectors: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`score_inputs(model, x)` gets the model and the batch; a tap's reduction reaches `bank.extras` under its key;
    a bank without the taps (a network wrapped as a whole) skips the tapped detector with a warning, as the page says."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=3, width=4, feature_dim=8).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        logits = model(x).double()
        last = model.run(x, (model.layer_names[-1],)).layers[model.layer_names[-1]]
    scores = build_detector("temp_msp", temperature=2.0).score_inputs(model, x)
    torch.testing.assert_close(scores, (logits / 2.0).softmax(1).max(1).values)

    taps = LayerTaps(model, ["stage_mean"])
    with torch.no_grad():
        out = model.run(x)
    extras = taps.pop()
    taps.remove()
    bank = FeatureBank(out.logits, out.features, labels=torch.tensor([0, 1, 2, 0, 1]), extras=extras)
    det = build_detector("stage_mean").fit(bank)
    torch.testing.assert_close(det.score(bank), last.flatten(1).mean(1).double())

    untapped = {"train": FeatureBank(out.logits, out.features, labels=bank.labels)}
    with caplog.at_level(logging.WARNING):
        assert detector_scorers([net_detectors.StageMean], {}, untapped, tune=False) == []
    assert "skipping detector stage_mean: stage_mean reads stage_mean/* maps from the evaluation cache" in caplog.text


class Centred(OODMethod):
    """A method with a trained part (`centres`) that a file may fill, as the method page's section describes."""

    name = "centred"
    trained_parts = ("centres",)
    part_files = {"centres": "centres_file"}


def test_the_part_attributes_the_method_page_names_are_declared_by_oodmethod() -> None:
    """The page's "Parts beyond the network" names `trained_parts`, `part_files` and `unstored_parts`; `OODMethod`
    declared only the first (the others were read with `getattr` where used), so a contributor reading the base
    class found no `part_files` or `unstored_parts` to set."""
    section = (DOCS / "adding_a_method.md").read_text().split("## Parts beyond the network")[1].split("\n## ")[0]
    named = re.findall(r"^- `(\w+) = ", section, re.M)
    assert named == ["trained_parts", "part_files", "unstored_parts"]
    assert {n: getattr(OODMethod, n, "undeclared") for n in named} == {"trained_parts": (), "part_files": {},
                                                                       "unstored_parts": ()}


def test_a_part_file_fills_a_trained_part() -> None:
    """`part_files`: with its `method.*` key set, the configured method lacks no trained part."""
    cfg = OmegaConf.create({"_target_": f"{__name__}.Centred", "centres_file": None})
    assert untrained_parts(cfg) == ["centres"]
    cfg.centres_file = "centres.pt"
    assert untrained_parts(cfg) == []


def test_an_unstored_part_kept_out_of_the_module_tree_skips_an_older_files_entries() -> None:
    """`unstored_parts` with the part outside the module tree (the page's advice): a file that still holds its
    entries loads into the rest, and the part keeps its own weights."""

    class Student(nn.Module):
        unstored_parts = ("teacher",)

        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(2, 2)
            object.__setattr__(self, "_teacher", nn.Linear(2, 2))

    student, old = Student(), Student()
    teacher = student._teacher.weight.clone()
    state = {**old.state_dict(), **{f"teacher.{k}": v for k, v in old._teacher.state_dict().items()}}
    assert load_modules(student, state, None, "old.ckpt") == [""]
    torch.testing.assert_close(student.backbone.weight, old.backbone.weight)
    torch.testing.assert_close(student._teacher.weight, teacher)


def test_an_unstored_part_left_in_the_module_tree_is_one_line_naming_it() -> None:
    """`unstored_parts` naming a registered sub-module: its checkpoints store the part, and the load skipped it and
    failed its own file with "missing 'teacher.bias' ... pass the method= it was trained with"; now one line naming
    the part and the fix."""

    class Student(nn.Module):
        unstored_parts = ("teacher",)

        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.teacher = nn.Linear(2, 2), nn.Linear(2, 2)

    student = Student()
    with pytest.raises(CheckpointError, match=r"^Student declares unstored_parts \['teacher'\], but 'teacher' is a "
                       r"registered sub-module, so its checkpoints store it: keep it out of the module tree "
                       r"\(object.__setattr__, as OAL's teacher\) or drop it from unstored_parts$"):
        load_modules(student, student.state_dict(), None, "own.ckpt")
