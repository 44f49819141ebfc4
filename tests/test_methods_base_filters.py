"""`OODMethod`'s filter for Lightning's eval-mode warning (ood/methods/base.py): it ends with its fit on every way out."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from ood.methods import CrossEntropy
from ood.models import SmallCNN


class _NoData:
    """A training loader that fails as the fit loop opens it (after the sanity check, before training starts)."""

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[object]:
        raise RuntimeError("no data")


def _frozen_method() -> CrossEntropy:
    method = CrossEntropy(SmallCNN(6), optimizer=partial(torch.optim.SGD, lr=0.1), init={"freeze": ["backbone.fc"]})
    method.apply_init()
    return method


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


def test_a_fit_failing_before_training_leaves_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    """The filter was removed in `on_train_start` only: a fit that failed before it (here its training loader) left
    it in the process for good, silencing that warning for every later fit with as many modules in eval mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Found 3 module\(s\) in eval mode", UserWarning)  # someone else's: stays
        before = list(warnings.filters)
        with pytest.raises(RuntimeError, match="^no data$"):
            _trainer(tmp_path).fit(_frozen_method(), train_dataloaders=_NoData())
        assert warnings.filters == before


def test_a_fit_that_skips_training_leaves_the_warning_filters_as_they_were(tmp_path: Path) -> None:
    """`limit_train_batches=0` (or a resumed run already at `max_epochs`): Lightning skips `on_train_start`, so the
    filter stayed after a fit that succeeded."""
    with warnings.catch_warnings():
        before = list(warnings.filters)
        _trainer(tmp_path, limit_train_batches=0).fit(_frozen_method(), train_dataloaders=_NoData())
        assert warnings.filters == before


def test_the_same_filter_set_by_someone_else_stays_where_it_was(tmp_path: Path) -> None:
    """Adding a filter equal to one already set moves that one to the front; removing "ours" then removed theirs."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Found 1 module\(s\) in eval mode at the start of training", PossibleUserWarning)
        warnings.filterwarnings("ignore", "something else")
        before = list(warnings.filters)
        _trainer(tmp_path).fit(_frozen_method(), train_dataloaders=[])
        assert warnings.filters == before


def test_a_second_stage_of_one_trainer_logs_no_callback_override(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`configure_callbacks` handed Lightning a new filter-removing callback at each stage of one trainer: from the
    second on (a test after the fit) Lightning logged "The following callbacks returned in
    `LightningModule.configure_callbacks` will override existing callbacks passed to Trainer" in a user's script.
    The trainer keeps the first one."""
    method, trainer = _frozen_method(), _trainer(tmp_path)
    with caplog.at_level(logging.INFO):
        trainer.fit(method, train_dataloaders=[])
        trainer.fit(method, train_dataloaders=[])
    assert [r.getMessage() for r in caplog.records if "configure_callbacks" in r.getMessage()] == []
    assert [type(c).__name__ for c in trainer.callbacks].count("_DropFrozenFilterOnException") == 1
