"""`line` (LINe, Ahn, Park & Kim, CVPR 2023) against a literal transcription of the authors' released code
(`precompute.py`'s per-class mean Taylor scores, `models/route.py`'s `RouteLUNCH`, `forward`'s clip,
`util/score.py`'s energy), and a known answer by hand. The registry contract (pickling, NaN rows, empty banks,
another network's bank, each grid point as tuning scores it) runs over every registered detector in
`test_detectors.py`, `test_detectors_fidelity.py`, `test_detectors_degenerate.py` and `test_sensitivity.py`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fabricate import centred_banks

from ood.detectors import build_detector
from ood.features.bank import FeatureBank


def released_info(train: FeatureBank) -> np.ndarray:
    """`precompute.py`: each train row's first-order Taylor score at the pooled features, the AvgPool's output times
    its gradient at the label's logit (one backward, as the hook's `grad_output`; `_forward`, unclipped), averaged per
    label: `shap_matrix_mean` [D, C]."""
    h = train.features.clone().requires_grad_(True)
    out = torch.nn.functional.linear(h, train.weight, train.bias)
    out.gather(1, train.labels[:, None]).sum().backward()  # rows are independent: each row's grad is its own
    shap_log = (h * h.grad).detach().numpy().astype(np.float64)
    label_log = train.labels.numpy()
    num_classes, featdim = train.weight.shape
    shap_matrix_mean = np.zeros((featdim, num_classes))
    for class_num in range(num_classes):
        mask = np.array(label_log == class_num)
        masked_shap = mask[:, np.newaxis] * shap_log
        shap_matrix_mean[:, class_num] = masked_shap.sum(0) / mask.sum()
    return shap_matrix_mean


def released_scores(info: np.ndarray, test: FeatureBank, p_w: float, p_a: float, clip_threshold: float) -> np.ndarray:
    """`RouteLUNCH.calculate_shap_value` and `forward` (no `.cuda()`), after the network's `x.clip(max=...)`, scored
    by `get_shap_energy_score` (logsumexp of the outputs); the [C, C, D] masked weight as the code builds it."""
    weight, bias = test.weight, test.bias
    out_features, in_features = weight.shape
    contrib = info.T
    mask_f = torch.zeros(out_features, in_features)
    masked_w = torch.zeros((out_features, out_features, in_features))
    for class_num in range(out_features):
        matrix = abs(contrib[class_num, :]) * weight.numpy()
        thresh = np.percentile(matrix, p_w)
        mask_w = torch.Tensor(matrix > thresh)
        masked_w[class_num, :, :] = weight.squeeze() * mask_w
        class_thresh = np.percentile(contrib[class_num, :], p_a)
        mask_f[class_num, :] = torch.Tensor(contrib[class_num, :] > class_thresh)
    x = test.features.clip(max=clip_threshold)
    pred = ((x[:, None, :] * weight).sum(2) + bias).softmax(1)
    preds = np.argmax(pred.numpy(), axis=1)
    cp = torch.stack([x[i] * mask_f[idx] for i, idx in enumerate(preds)])
    vote = torch.stack([cp[i] * masked_w[idx] for i, idx in enumerate(preds)])
    out = vote.sum(2) + bias
    return torch.logsumexp(out, dim=1).numpy()


@pytest.fixture(scope="module")
def banks() -> dict[str, FeatureBank]:
    return centred_banks(5, {"train": 240, "test": 90, "ood": 90}, ood_labelled=False)


@pytest.mark.parametrize(("p_w", "p_a", "q"), [(10, 10, 90), (90, 90, 85), (90, 10, 95), (10, 90, 80)])
def test_line_equals_the_released_code(banks: dict[str, FeatureBank], p_w: float, p_a: float, q: float) -> None:
    """Every grid corner against the transcription, its absolute `clip_threshold` the train activations' q-th
    percentile, on ID and OOD rows; to 1e-5 (the code's float32 logits and Taylor products vs float64 here). The masks
    and the clip change the scores (the comparison tells them apart)."""
    info = released_info(banks["train"])
    clip = float(np.percentile(banks["train"].features.numpy().astype(np.float64), q))
    det = build_detector("line", p_w=p_w, p_a=p_a, percentile=q).fit(banks["train"])
    assert det.threshold_ == clip
    for split in ("test", "ood"):
        expected = released_scores(info, banks[split], p_w, p_a, clip)
        np.testing.assert_allclose(det.score(banks[split]).numpy(), expected, rtol=1e-5, atol=1e-5)
        assert np.abs(released_scores(info, banks[split], p_w, p_a, 1e10) - expected).max() > 1e-2  # the clip matters
        assert np.abs(released_scores(info, banks[split], 0, 0, clip) - expected).max() > 1e-2  # the masks matter


def test_line_known_answer() -> None:
    """Two classes, three features, by hand. Train means by label: class 0 [1, 0, 1], class 1 [0, 2, 1]; with
    W = [[1, -1, .5], [-.5, 1, 1]]: I_0 = [1, 0, .5], I_1 = [0, 2, 1]. p_a = 50 (medians .5 and 1): m_0 = [1, 0, 0],
    m_1 = [0, 1, 0]. p_w = 50: |I_0| * W = [[1, 0, .25], [-.5, 0, .5]], median .125, M_0 W = [[1, 0, .5], [0, 0, 1]];
    |I_1| * W = [[0, -2, .5], [0, 2, 1]], median .25, M_1 W = [[0, 0, .5], [0, 1, 1]]. The clip (percentile 100): the
    largest train activation, 2.
    Row [3, 1, 0] -> [2, 1, 0]: full logits [1.5, -.5], class 0; [2, 0, 0] through M_0 W + b: [2.5, -.5].
    Row [0, 1, 2]: full logits [.5, 2.5], class 1; [0, 1, 0] through M_1 W + b: [.5, .5]."""
    weight = torch.tensor([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]])
    bias = torch.tensor([0.5, -0.5])
    h = torch.tensor([[2.0, 0, 1], [0, 0, 1], [0, 2, 0], [0, 2, 2]])
    train = FeatureBank(logits=h @ weight.T + bias, features=h, labels=torch.tensor([0, 0, 1, 1]), weight=weight, bias=bias)
    x = torch.tensor([[3.0, 1, 0], [0, 1, 2]])
    test = FeatureBank(logits=x @ weight.T + bias, features=x, weight=weight, bias=bias)
    det = build_detector("line", p_w=50, p_a=50, percentile=100).fit(train)
    assert det.threshold_ == 2.0
    expected = [math.log(math.exp(2.5) + math.exp(-0.5)), 0.5 + math.log(2)]
    torch.testing.assert_close(det.score(test), torch.tensor(expected, dtype=torch.float64), rtol=1e-15, atol=1e-15)


def test_tuning_scores_each_grid_point_as_a_detector_fitted_at_it(banks: dict[str, FeatureBank]) -> None:
    """p_w and p_a are score-only (their masks are cut from the fitted I and W): each point the tuning sweeps, four
    per fit, scores the test rows bit for bit as a detector built, fitted and scored at that point alone; the points'
    scores differ."""
    from ood.detectors import detector_class
    from ood.evaluation.scoring import Sweep, search_grid, tune_detector

    cls = detector_class("line")
    tuning = {"train": banks["train"], "val": banks["test"], "val_ood": banks["ood"], "test": banks["test"], "far": banks["ood"]}
    sweep = Sweep(["test", "far"])
    tune_detector(cls, search_grid(cls, {}), tuning, True, sweep=sweep)
    assert len(sweep.points) == 16
    for point in sweep.points:
        det = build_detector(cls, **point.params).fit(banks["train"])
        assert all(torch.equal(point.scores[s], det.score(tuning[s])) for s in ("test", "far")), point.params
    assert len({tuple(p.scores["test"].tolist()) for p in sweep.points}) == 16


def test_tuning_fits_once_per_clip_percentile(banks: dict[str, FeatureBank], monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16 grid points need 4 fits (one per clip percentile; p_w and p_a only cut masks from the fitted I), not 16:
    at ImageNet-1k scale a fit is a pass over the train bank, a partition of its 2.6e9 activations and 1000
    percentiles of C x D weight importances. Each weight-mask and feature-mask cut is computed once per fit and value."""
    import ood.detectors.line as line_module
    from ood.detectors import detector_class
    from ood.evaluation.scoring import search_grid, tune_detector

    calls = {"fit": 0, "cut": 0}

    def counted(name: str, f):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return f(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(line_module, "class_means", counted("fit", line_module.class_means))
    monkeypatch.setattr(line_module, "percentile", counted("cut", line_module.percentile))
    cls = detector_class("line")
    tuning = {"train": banks["train"], "val": banks["test"], "val_ood": banks["ood"]}
    tune_detector(cls, search_grid(cls, {}), tuning, True)
    classes = banks["train"].logits.shape[1]
    # per fit: the clip's percentile, then p_a in {10, 90} x C rows and p_w in {10, 90} x C classes
    assert calls == {"fit": 4, "cut": 4 * (1 + 4 * classes)}


def test_score_grid_shares_the_predictions_and_each_class_weight_importance(banks: dict[str, FeatureBank],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Tuning's four (p_w, p_a) points of one fit: one [C, D] weight importance per predicted class for all four
    (a thousand per row chunk at ImageNet scale, each a C x D product), not one per point; the scores bit for bit
    each point's `score`."""
    from ood.detectors.line import LINe

    det = build_detector("line").fit(banks["train"])
    points = [{"p_w": p_w, "p_a": p_a} for p_w in (10, 90) for p_a in (10, 90)]
    alone = [det.set_params(**point).score(banks["ood"]) for point in points]  # the cuts are cut and kept here
    built = []
    importance = LINe._weight_importance
    monkeypatch.setattr(LINe, "_weight_importance", lambda self, k, w: built.append(k) or importance(self, k, w))
    shared = det.score_grid(banks["ood"], points)
    assert all(torch.equal(a, s) for a, s in zip(alone, shared))
    clip = banks["ood"].features.double().clamp(max=det.threshold_)
    predicted = (clip @ banks["ood"].weight.double().T + banks["ood"].bias.double()).argmax(1)
    assert sorted(built) == predicted.unique().tolist() and len(built) > 1
