"""`ddu` (DDU, Mukhoti et al., CVPR 2023) against a literal transcription of the authors' released code
(omegafragger/DDU utils/gmm_utils.py `centered_cov_torch`, `gmm_fit` with its JITTERS loop over
torch.distributions.MultivariateNormal, `gmm_get_logits`, and metrics/uncertainty_confidence.py `logsumexp`, the
confidence evaluate.py scores), on banks where jitter 0 works and on banks with singular class covariances where the
jitter loop picks another; known answers by hand in one dimension; bad fit banks refused in one line. No grid: the
registry contract runs in test_detectors*.py."""

from __future__ import annotations

import math

import pytest
import torch
from fabricate import centred_banks

from ood.detectors import DetectorNotApplicable, build_detector
from ood.features.bank import FeatureBank

# ----- transcription of the released code (utils/gmm_utils.py, metrics/uncertainty_confidence.py) -----
DOUBLE_INFO = torch.finfo(torch.double)
RELEASED_JITTERS = [0, DOUBLE_INFO.tiny] + [10**exp for exp in range(-308, 0, 1)]


def centered_cov_torch(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    res = 1 / (n - 1) * x.t().mm(x)
    return res


def gmm_fit(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.distributions.MultivariateNormal, float]:
    """As released, but for the ValueError's message: torch >= 1.8 says "Expected parameter covariance_matrix ... to
    satisfy the constraint PositiveDefinite(), but found invalid values" where the code matched the older "The
    parameter covariance_matrix has invalid values" (unmatched, the loop would `break` with `gmm` unbound)."""
    with torch.no_grad():
        classwise_mean_features = torch.stack([torch.mean(embeddings[labels == c], dim=0) for c in range(num_classes)])
        classwise_cov_features = torch.stack(
            [centered_cov_torch(embeddings[labels == c] - classwise_mean_features[c]) for c in range(num_classes)]
        )

    with torch.no_grad():
        for jitter_eps in RELEASED_JITTERS:
            try:
                jitter = jitter_eps * torch.eye(
                    classwise_cov_features.shape[1], device=classwise_cov_features.device,
                ).unsqueeze(0)
                gmm = torch.distributions.MultivariateNormal(
                    loc=classwise_mean_features, covariance_matrix=(classwise_cov_features + jitter),
                )
            except RuntimeError as e:
                if "cholesky" in str(e):
                    continue
            except ValueError as e:
                if "covariance_matrix" in str(e) and "invalid values" in str(e):
                    continue
            break

    return gmm, jitter_eps  # noqa: F821 (unbound where no jitter works, as released)


def gmm_get_logits(gmm: torch.distributions.MultivariateNormal, embeddings: torch.Tensor) -> torch.Tensor:
    log_probs_B_Y = gmm.log_prob(embeddings[:, None, :])
    return log_probs_B_Y


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=1, keepdim=False)


def released(train: FeatureBank, tests: list[FeatureBank]) -> tuple[float, list[torch.Tensor]]:
    """(the jitter `gmm_fit` picks, the `logsumexp` confidence of each test bank): train embeddings in double
    (`get_embeddings(..., dtype=torch.double)`), test features as the network gives them (float32, promoted by
    `log_prob`)."""
    with torch._tensor_str.printoptions(threshold=8):  # torch's ValueError prints the matrices: only their edges
        gmm, jitter_eps = gmm_fit(train.features.double(), train.labels, train.logits.shape[1])
    return jitter_eps, [logsumexp(gmm_get_logits(gmm, t.features)) for t in tests]


# ----- banks -----
def integer_bank(seed: int, classes: int, per_class: int, dim: int, scale: float = 1.0) -> FeatureBank:
    """Small integer features, `per_class` (a power of two) rows per class: class means, centred rows and their
    products are exact in float64, so the code's covariances and ours are the same matrices and the jitter loop meets
    the same Cholesky outcomes. With per_class <= dim every class covariance is singular (rank <= per_class - 1)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    h = scale * torch.randint(-3, 4, (classes * per_class, dim), generator=gen).float() + 5 * labels[:, None].float()
    weight = torch.randn(classes, dim, generator=gen)
    return FeatureBank(logits=h @ weight.T, features=h, labels=labels, weight=weight, bias=torch.zeros(classes))


def gaussian_bank(seed: int, n: int, classes: int, dim: int, labelled: bool = True, spread: float = 1.0) -> FeatureBank:
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % classes
    h = centres[labels] + spread * torch.randn(n, dim, generator=gen)
    weight = torch.randn(classes, dim, generator=torch.Generator().manual_seed(2))
    return FeatureBank(logits=h @ weight.T, features=h, labels=labels if labelled else None, weight=weight,
                       bias=torch.zeros(classes))


def with_features(bank: FeatureBank, h: torch.Tensor) -> FeatureBank:
    labels = bank.labels if len(h) == len(bank) else None
    return FeatureBank(logits=h @ bank.weight.T, features=h, labels=labels, weight=bank.weight, bias=bank.bias)


def check_equals_released(train: FeatureBank, tests: list[FeatureBank], rtol: float) -> float:
    jitter_eps, expected = released(train, tests)
    det = build_detector("ddu").fit(train)
    assert det.jitter_eps_ == jitter_eps
    assert det.jitter_ == (jitter_eps * torch.eye(1)).item()  # the float32 value the code's identity adds
    for bank, scores in zip(tests, expected):
        got = det.score(bank)
        assert got.dtype == torch.float64 and scores.dtype == torch.float64
        torch.testing.assert_close(got, scores, rtol=rtol, atol=0)
    return jitter_eps


def test_ddu_equals_the_released_code_where_jitter_0_works() -> None:
    """ReLU features of 6 classes x 40 rows in 32 dimensions, ID and OOD rows: jitter 0, scores to rtol 1e-10 (the
    code's one product per class vs our chunked sums: rounding only)."""
    banks = centred_banks(11, {"train": 240, "test": 90, "ood": 90}, ood_labelled=False)
    assert check_equals_released(banks["train"], [banks["test"], banks["ood"]], rtol=1e-10) == 0
    assert check_equals_released(gaussian_bank(0, 300, 3, 8), [gaussian_bank(1, 50, 3, 8, spread=3)], rtol=1e-10) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ddu_equals_the_released_code_on_singular_covariances(seed: int) -> None:
    """8 integer rows per class in 12 dimensions: every class covariance has rank <= 7, jitter 0 fails and the loop
    picks a jitter above 0 (the same one: the matrices are exact). Scores of ID-like and other rows to rtol 1e-9:
    the directions off a class's rows are scaled by 1 / sqrt(jitter), where the two triangular solves agree to
    rounding."""
    train = integer_bank(seed, 3, 8, 12)
    gen = torch.Generator().manual_seed(100 + seed)
    near = with_features(train, train.features + 0.1 * torch.randn(train.features.shape, generator=gen))
    far = with_features(train, 3 * torch.randn(20, 12, generator=gen))
    jitter_eps = check_equals_released(train, [train, near, far], rtol=1e-9)
    assert 1e-20 < jitter_eps < 1e-5


def test_ddu_equals_the_released_code_where_a_class_feature_is_constant() -> None:
    """Class 1's feature 3 is constant (an exact zero row and column of its covariance): the float32 identity adds
    nothing below 1.4e-45, so the code's loop goes to 1e-45 (adds 2^-149), and so does ours; the rows that leave the
    constant are -1e44-ish under class 1, finite. Scores to rtol 1e-10."""
    train = gaussian_bank(3, 120, 3, 6)
    h = train.features.clone()
    h[train.labels == 1, 3] = 2.0
    train = with_features(train, h)
    test = gaussian_bank(4, 30, 3, 6, spread=2)
    on_constant = test.features.clone()
    on_constant[:, 3] = 2.0
    assert check_equals_released(train, [train, test, with_features(test, on_constant)], rtol=1e-10) == 1e-45
    assert build_detector("ddu").fit(train).jitter_ == 2.0**-149


def test_ddu_known_answer_in_one_dimension() -> None:
    """Class 0 rows -1, 1 (mean 0, variance 2 by 1/(n-1), 1 by 1/n), class 1 rows 2, 4, 6 (mean 4, variance 4, not
    8/3): jitter 0, score(h) = log(N(h; 0, 2) + N(h; 4, 4)), N(h; m, v) = exp(-(h - m)^2 / (2 v)) / sqrt(2 pi v)."""
    train = FeatureBank(logits=torch.zeros(5, 2), features=torch.tensor([[-1.0], [1], [2], [4], [6]]),
                        labels=torch.tensor([0, 0, 1, 1, 1]), weight=torch.zeros(2, 1), bias=torch.zeros(2))
    h = [0.0, 4.0, 10.0, -3.0]
    test = FeatureBank(logits=torch.zeros(4, 2), features=torch.tensor(h)[:, None], weight=torch.zeros(2, 1), bias=torch.zeros(2))

    def normal(x: float, m: float, v: float) -> float:
        return math.exp(-((x - m) ** 2) / (2 * v)) / math.sqrt(2 * math.pi * v)

    det = build_detector("ddu").fit(train)
    assert det.jitter_eps_ == 0 and det.means_.flatten().tolist() == [0.0, 4.0]
    expected = torch.tensor([math.log(normal(x, 0, 2) + normal(x, 4, 4)) for x in h], dtype=torch.float64)
    torch.testing.assert_close(det.score(test), expected, rtol=1e-14, atol=0)


def test_ddu_known_answer_with_a_zero_variance_class() -> None:
    """Class 0 rows 3, 3 (variance 0), class 1 rows -1, 1 (variance 2): 0 fails, tiny and 1e-308 .. 1e-46 add 0 in
    the code's float32 identity, 1e-45 adds 2^-149, the smallest float32: variances 2^-149 and 2 + 2^-149 (= 2).
    At h = 3: log(1 / sqrt(2 pi 2^-149) + N(3; 0, 2)); at h = 0: class 0's term is exp(-9 2^148) = 0, log N(0; 0, 2)."""
    train = FeatureBank(logits=torch.zeros(4, 2), features=torch.tensor([[3.0], [3], [-1], [1]]),
                        labels=torch.tensor([0, 0, 1, 1]), weight=torch.zeros(2, 1), bias=torch.zeros(2))
    test = FeatureBank(logits=torch.zeros(2, 2), features=torch.tensor([[3.0], [0.0]]), weight=torch.zeros(2, 1),
                       bias=torch.zeros(2))
    det = build_detector("ddu").fit(train)
    assert det.jitter_eps_ == 1e-45 and det.jitter_ == 2.0**-149
    tiny = 2.0**-149
    at_3 = -0.5 * math.log(2 * math.pi * tiny)  # log N(3; 3, tiny), about 51.3
    n_3 = math.exp(-9 / 4) / math.sqrt(4 * math.pi)
    expected = torch.tensor([at_3 + math.log1p(n_3 / math.exp(at_3)), -0.5 * math.log(4 * math.pi)], dtype=torch.float64)
    torch.testing.assert_close(det.score(test), expected, rtol=1e-14, atol=0)


def test_ddu_refuses_a_class_with_one_fit_row_in_one_line() -> None:
    """1/(n - 1) of one row divides by zero (the code's covariance NaN, no jitter works)."""
    train = gaussian_bank(0, 30, 3, 4)
    keep = torch.cat([torch.tensor([0]), (train.labels != 0).nonzero().flatten()])
    with pytest.raises(DetectorNotApplicable, match=r"^ddu fits a covariance per class \(1/\(n - 1\)\), and 1 class\(es\) have "
                                                    r"fewer than two fit rows \(e\.g\. class 0: 1 row\)$"):
        build_detector("ddu").fit(train.subset(keep))


def test_ddu_refuses_covariances_beyond_its_memory_budget_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """ImageNet-1k x 2048 features: 1000 x 2048 x 2048 x 8 B = 33.6 GB, refused before anything is allocated; the
    budget's edge on a 2-class x 4-feature bank (256 bytes)."""
    import ood.detectors.ddu as ddu_module  # here: without it, the other tests fail on the unknown name, not at import

    labels = torch.arange(1000)
    big = FeatureBank(logits=torch.zeros(1000, 1000), features=torch.zeros(1000, 2048), labels=labels,
                      weight=torch.zeros(1000, 2048), bias=torch.zeros(1000))
    with pytest.raises(DetectorNotApplicable, match=r"^ddu fits a float64 2048 x 2048 covariance per class: 1000 classes x "
                                                    r"2048 features take 33\.6 GB, above its budget of 4 GiB"):
        build_detector("ddu").fit(big)
    small = gaussian_bank(0, 20, 2, 4)
    monkeypatch.setattr(ddu_module, "MAX_COVARIANCE_BYTES", 256)
    assert build_detector("ddu").fit(small).cholesky_.shape == (2, 4, 4)
    monkeypatch.setattr(ddu_module, "MAX_COVARIANCE_BYTES", 255)
    with pytest.raises(DetectorNotApplicable, match=r"^ddu fits a float64 4 x 4 covariance per class"):
        build_detector("ddu").fit(small)


def test_ddu_refuses_covariances_no_jitter_of_the_list_repairs() -> None:
    """Integer features of size 1e9, 4 rows per class in 20 dimensions: the singular covariances' entries are ~1e18,
    where adding 0.1 leaves them as they are; the code's loop ends with `gmm` unbound, ours says so in one line."""
    train = integer_bank(0, 2, 4, 20, scale=1e9)
    with pytest.raises(UnboundLocalError), torch._tensor_str.printoptions(threshold=8):
        gmm_fit(train.features.double(), train.labels, 2)
    with pytest.raises(DetectorNotApplicable, match=r"^ddu: no jitter of the released code's list \(0 up to 0\.1\) makes "
                                                    r"every class covariance positive definite$"):
        build_detector("ddu").fit(train)
