"""Errors that are the user's to fix: the entry points print their message, never a traceback."""

import math
from collections.abc import Sequence
from pathlib import Path


class OODError(Exception):
    """Base class for every error ood raises on purpose."""


class ConfigError(OODError):
    """A configuration value is unknown or inconsistent; the message lists the valid choices."""


class DataNotFoundError(OODError):
    """A dataset is missing on disk; the message says where it was looked for and how to get it."""


class CheckpointError(OODError):
    """A checkpoint is missing, unreadable or does not fit the configured model; names the file."""


class NonFiniteError(OODError):
    """A loss or score became NaN or infinite; names the step, detector or dataset."""


def working_directory_hint(module: str, err: BaseException) -> str:
    """' (<top> is in the working directory, ...: run with PYTHONPATH=.)' when importing `module` failed because its
    top-level package sits in the working directory, which an entry point's `sys.path` lacks (it starts at its bin/
    folder, not at the working directory as `python -m` does); else ''."""
    top = module.partition(".")[0]
    here = isinstance(err, ModuleNotFoundError) and err.name == top and any(Path(top + end).exists() for end in ("", ".py"))
    return f" ({top} is in the working directory, which is not on sys.path: run with PYTHONPATH=.)" if here else ""


def check_range(
    key: str, value: float | None, low: float, high: float = float("inf"), *, open_low: bool = False, integer: bool = False
) -> None:
    """Refuse `key=value` outside [low, high] ((low, high] with `open_low`), naming the range: a negative weight
    trains the opposite objective silently, a zero temperature or count NaNs at step 0 or reads as its default.
    `integer` (counts, sizes) also refuses a fraction, which would otherwise fail deep inside faiss or torch after
    the training it waited for. NaN and an infinite value are refused too: an infinite weight or temperature gives an
    infinite or constant loss, blamed on the learning rate at step 0."""
    if value is None:
        return
    if integer and isinstance(value, float) and value.is_integer() and low <= value <= high:
        raise ConfigError(f"{key}={value!r} is a count: write {int(value)} (Hydra reads 2.0 and 1e4 as floats)")
    fraction = integer and (isinstance(value, bool) or not isinstance(value, int))
    lower = f"({low}" if open_low else f"[{low}"
    whole = "whole numbers in " if integer else ""
    if not fraction and math.isinf(value) and low <= value <= high:
        raise ConfigError(f"{key}={value!r} is not a finite number; its range is {lower}, {high})")
    if fraction or not (low < value if open_low else low <= value) or value > high:
        raise ConfigError(f"{key}={value!r} is outside its range {whole}{lower}, {high}]")


def check_every_class(what: str, counts: Sequence[int], consequence: str, fit_split: bool = False) -> None:
    """Refuse per-class statistics with an empty class (`counts[c]` training images of class c), naming the classes:
    its mean is NaN (a NaN loss at step 0, blamed on the learning rate) or a sampler fails on zero rows, deep inside
    the run. `consequence` says what the empty classes break; `fit_split`: the counts are of the fit split, which
    `data.fit_fraction` subsamples."""
    if empty := [c for c, n in enumerate(counts) if n == 0]:
        where = "in the fit split " if fit_split else ""
        fix = "use data.fit_fraction=1.0, or check" if fit_split else "check"
        raise ConfigError(
            f"{what}: {len(empty)} of the {len(counts)} classes have no training image {where}(first: {empty[:10]}), "
            f"so {consequence}; {fix} that the model's number of classes is the data's"
        )
