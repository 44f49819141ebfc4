"""float16 feature banks for she, fdbd, nci, neco, nnguide, gradnorm, graduncertainty, caref, cadref, otod and weiper
(`float16_features`): fit and score widen the bank `CHUNK` rows at a time, never copying it whole (the
registry-parametrised tests/test_detectors.py `test_float16_detectors_score_float16_banks_in_chunks` checks their
scores against the float32 bank's)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ood.detectors.mahalanobis as mahalanobis_module
from ood.detectors import build_detector, float16_detectors
from ood.features.bank import FeatureBank

#: the detectors this file covers, with hyper-parameters that keep their state and per-row outputs small beside a bank
#: (weiper: 2 perturbed copies of the head, 20 bins; nnguide: a 10-row guide bank)
CHUNKED = {
    "she": {}, "fdbd": {}, "nci": {}, "neco": {}, "nnguide": {"k": 5}, "gradnorm": {}, "graduncertainty": {},
    "caref": {}, "cadref": {}, "otod": {}, "weiper": {"n_repeats": 2, "n_bins": 20},
}
ROWS, DIM, CLASSES, CHUNK = 1000, 128, 6, 50


class _LargestNewTensor(TorchDispatchMode):
    """The most elements of any float32 or float64 tensor an op allocates (outputs sharing an input's storage, views
    and in-place results, are not new; the guards' finiteness checks of the float16 bank itself are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            wide = isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64)
            if wide and t.untyped_storage().data_ptr() not in inputs and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def _bank(seed: int, n: int = ROWS) -> FeatureBank:
    """float16 ReLU features around one centre per class; a head roughly aligned with them."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(CLASSES, DIM, generator=gen).relu()
    w = (centres + torch.randn(CLASSES, DIM, generator=gen)) / DIM**0.5
    y = torch.arange(n) % CLASSES
    h = (centres[y] + torch.randn(n, DIM, generator=gen)).relu().half()
    return FeatureBank(logits=h.float() @ w.T, features=h, labels=y, weight=w, bias=torch.zeros(CLASSES))


def test_the_chunked_detectors_declare_float16_features() -> None:
    assert set(CHUNKED) <= set(float16_detectors())


@pytest.mark.parametrize("name", list(CHUNKED))
def test_fit_and_score_never_copy_a_whole_float16_bank(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With CHUNK = 50 of 1000 rows, no op allocates a float32 or float64 tensor of half a bank's elements (a widening
    of the whole bank did); the largest is a chunk's."""
    monkeypatch.setattr(mahalanobis_module, "CHUNK", CHUNK)
    train, test = _bank(0), _bank(1)
    det = build_detector(name, **CHUNKED[name])
    with _LargestNewTensor() as fit_mode:
        det.fit(train)
    with _LargestNewTensor() as score_mode:
        scores = det.score(test)
    assert scores.shape == (ROWS,) and bool(torch.isfinite(scores).all())
    for mode in (fit_mode, score_mode):
        assert mode.largest < ROWS * DIM // 2, (name, mode.largest, mode.op)


def test_she_known_answer_on_a_float16_bank_in_chunks_of_one_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patterns are the means of the correctly classified rows only: class 0 from rows (2, 0) and (4, 2) -> (3, 1);
    the row (6, 6) labelled 0 but predicted 1 is left out; class 1 from (0, 2) alone. Score = <h, m_yhat>."""
    monkeypatch.setattr(mahalanobis_module, "CHUNK", 1)
    h = torch.tensor([[2.0, 0.0], [4.0, 2.0], [6.0, 6.0], [0.0, 2.0]])
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    w = torch.eye(2)
    fit = FeatureBank(logits=logits, features=h.half(), labels=torch.tensor([0, 0, 0, 1]), weight=w, bias=torch.zeros(2))
    det = build_detector("she").fit(fit)
    assert torch.equal(det.patterns_, torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64))
    test = FeatureBank(logits=torch.tensor([[2.0, 1.0], [0.0, 3.0]]), features=torch.tensor([[1.0, 1.0], [1.0, 5.0]]).half(),
                       weight=w, bias=torch.zeros(2))
    assert det.score(test).tolist() == [4.0, 10.0]  # <(1, 1), (3, 1)> and <(1, 5), (0, 2)>
