"""`combood` against an independent transcription of the authors' released scoring (rmagesh148/combood), and known
answers. The registry contract (pickling, NaN rows, empty banks, float64 scores) runs over every registered
detector in `test_detectors.py` / `test_detectors_fidelity.py`."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import compose_config
from scipy.spatial.distance import mahalanobis
from scipy.stats import spearmanr
from sklearn.preprocessing import PowerTransformer, StandardScaler

from ood.detectors import DetectorNotApplicable, build_detector, float16_detectors
from ood.detectors.combood import FEATURES, released_columns
from ood.detectors.network import LayerTaps
from ood.errors import ConfigError
from ood.features.bank import FeatureBank
from ood.models.adapters import ModuleBackbone
from ood.models.resnet import ResNet18, ResNet18_32x32


def _bank(features: np.ndarray | torch.Tensor) -> FeatureBank:
    h = torch.as_tensor(features, dtype=torch.float32)
    return FeatureBank(logits=torch.zeros(len(h), 3), features=h)


def normalizer(x: np.ndarray) -> np.ndarray:
    """The released `normalizer`."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True) + 1e-10


def released_scores(train: np.ndarray, test: np.ndarray, k: int, reg: float, train_maha: np.ndarray | None = None,
                    test_maha: np.ndarray | None = None) -> np.ndarray:
    """`test_ood.py`'s `square_log_probability(pred_mahala, pred_knn, knn_n)` with `fit_knn_faiss` /
    `predict_knn_faiss` on the penultimate features `train` / `test` (K-th squared L2 distance, here brute force) and
    `Confidenciator`'s Mahalanobis on `*_maha` (the extreme features, `extreme=True`), or on the normalised penultimate
    features when they are None (`extreme=False`), transcribed line by line in NumPy / scikit-learn / SciPy."""
    train, test = normalizer(train.astype(np.float64)), normalizer(test.astype(np.float64))
    if train_maha is None or test_maha is None:
        train_maha, test_maha = train, test
    scaler, pt = StandardScaler(), PowerTransformer()
    x = pt.fit_transform(scaler.fit_transform(train_maha))
    inv_cov = np.linalg.inv(np.cov(x, rowvar=False) + reg * np.identity(train_maha.shape[1]))
    mean = np.zeros(train_maha.shape[1])
    pred_mahala = -np.apply_along_axis(lambda row: mahalanobis(row, mean, inv_cov), 1,
                                       pt.transform(scaler.transform(test_maha)))
    d2 = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    pred_knn = -np.sort(d2, axis=1)[:, k - 1]
    n = train.shape[1]
    return (-math.sqrt(n) * np.log(-pred_knn)) - pred_mahala**2


def released_extremes(net: ResNet18_32x32, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The authors' feature extraction on their ResNet-18 (one ReLU module per call, `MinMax` of each ReLU's input,
    then `Max_out` / `Min_out` of the logits), written out over our network's weights: [N, 36] extreme features and
    [N, 512] penultimate features."""
    def minmax(z: torch.Tensor) -> list[torch.Tensor]:
        amin, amax = torch.aminmax(z.reshape(len(z), -1), dim=1)
        return [amax, -amin]

    feats: list[torch.Tensor] = []
    with torch.no_grad():
        stem = net.stages["stem"]
        out = stem[1](stem[0](x))
        feats += minmax(out)
        out = torch.relu(out)
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for block in net.stages[stage]:
                identity = out if block.downsample is None else block.downsample(out)
                h = block.bn1(block.conv1(out))
                feats += minmax(h)
                h = block.bn2(block.conv2(torch.relu(h))) + identity
                feats += minmax(h)
                out = torch.relu(h)
        pooled = out.mean((2, 3))
        logits = net.fc(pooled)
    feats += [logits.max(1).values, -logits.min(1).values]
    return torch.stack(feats, 1).numpy(), pooled.numpy()


def test_extreme_features_match_the_released_run() -> None:
    """The default (`features=extreme`, the released run): the Mahalanobis term over the max and -min of every ReLU
    call's input (17 on a CIFAR ResNet-18, torchvision's basic block calling its one in-place ReLU twice) and of the
    logits, tapped in the cached pass, equals the authors' extraction and scoring."""
    torch.manual_seed(0)
    net = ResNet18_32x32(num_classes=4).eval()
    x = {"train": torch.randn(120, 3, 8, 8), "test": torch.cat([torch.randn(20, 3, 8, 8), 3 * torch.rand(20, 3, 8, 8)])}
    banks = {}
    for split, images in x.items():
        taps = LayerTaps(net, ["combood"])
        with torch.no_grad():
            out = net.run(images)
        banks[split] = FeatureBank(logits=out.logits, features=out.features, extras=taps.pop())
        taps.remove()
    before = [t for key, t in banks["test"].extras.items() if key.startswith("combood:")]
    assert sum(t[0].numel() for t in before) == 34  # 17 ReLU calls x (max, -min)
    det = build_detector("combood").fit(banks["train"])
    (train_maha, train_h), (test_maha, test_h) = released_extremes(net, x["train"]), released_extremes(net, x["test"])
    np.testing.assert_allclose(train_h, banks["train"].features.numpy(), rtol=1e-5, atol=1e-6)
    expected = released_scores(train_h, test_h, 50, 1.0, train_maha, test_maha)
    np.testing.assert_allclose(det.score(banks["test"]).numpy(), expected, rtol=1e-5, atol=1e-4)
    # the penultimate branch scores otherwise: the test tells the two apart
    assert np.abs(released_scores(train_h, test_h, 50, 1.0) - expected).max() > 1.0


def test_extreme_features_need_the_taps_and_features_names_its_choices() -> None:
    bank = _bank(np.abs(np.random.default_rng(3).normal(size=(60, 4))))
    with pytest.raises(DetectorNotApplicable, match=r"features=extreme reads the inputs of the network's activation "
                                                    r"modules .* features=penultimate needs no taps$"):
        build_detector("combood").fit(bank)
    with pytest.raises(ConfigError, match=r"^detector 'combood': features='pooled'; choices: \['extreme', 'extreme_as_released', 'penultimate'\]$"):
        build_detector("combood", features="pooled")
    # reg=0 with a constant feature (a zero column stays zero when normalised): one line, not numpy's LinAlgError
    constant = np.abs(np.random.default_rng(0).normal(size=(60, 4)))
    constant[:, 2] = 0.0
    with pytest.raises(DetectorNotApplicable, match=r"^reg=0 leaves the transformed features' covariance singular"):
        build_detector("combood", reg=0.0, features="penultimate").fit(_bank(constant))


@pytest.mark.parametrize(("k", "reg"), [(50, 1.0), (5, 0.3)])
def test_matches_released_scoring(k: int, reg: float) -> None:
    g = np.random.default_rng(0)
    train = np.abs(g.normal(size=(400, 12))) * g.uniform(0.5, 3, size=12)  # post-ReLU-like, skewed columns
    test = np.concatenate([np.abs(g.normal(size=(40, 12))), g.normal(size=(40, 12)) * 2])
    det = build_detector("combood", k=k, reg=reg, features="penultimate").fit(_bank(train))
    ours = det.score(_bank(test)).numpy()
    np.testing.assert_allclose(ours, released_scores(train.astype(np.float32), test.astype(np.float32), k, reg),
                               rtol=1e-5, atol=1e-4)


def test_known_answers() -> None:
    """kNN term: unit vectors +-e1, +-e2 and a query along (1, 1): the 2nd nearest is at 2 - sqrt 2, the 3rd at
    2 + sqrt 2. Mahalanobis term with reg = 0: over the train rows it averages D (N - 1) / N, whatever the power
    transform (trace of S S^-1 with S of ddof 1)."""
    train = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    query = _bank(torch.tensor([[3.0, 3.0]]))
    for k, d2 in [(2, 2 - math.sqrt(2)), (3, 2 + math.sqrt(2))]:
        det = build_detector("combood", k=k, features="penultimate").fit(_bank(train))
        assert det.knn_sq_distance(query).item() == pytest.approx(d2, rel=1e-6)
        expected = -math.sqrt(2) * math.log(d2) - det.mahalanobis_sq(query).item()
        assert det.score(query).item() == pytest.approx(expected, rel=1e-6)
    g = np.random.default_rng(1)
    bank = _bank(np.abs(g.normal(size=(300, 6))) + 0.1)
    det = build_detector("combood", reg=0.0, features="penultimate").fit(bank)
    # float64 throughout (6 columns, 300 rows): rounding of ~1e-15 (measured 4e-16) amplified by the covariance's
    # condition number; a 1e-10 ridge on its diagonal moves the mean by 2e-10
    assert det.mahalanobis_sq(bank).mean().item() == pytest.approx(6 * 299 / 300, rel=1e-12)


def test_zero_distance_is_the_most_in_distribution_finite_score() -> None:
    """A query equal to its K nearest train rows: the released log(0) is left uninitialised; ours is finite and
    above every other score."""
    g = np.random.default_rng(2)
    train = np.abs(g.normal(size=(100, 5))) + 0.1
    det = build_detector("combood", k=1, features="penultimate").fit(_bank(train))
    scores = det.score(_bank(np.concatenate([train[:1], train[1:10] + 0.05])))
    assert torch.isfinite(scores).all()
    assert scores[0] > scores[1:].max()


def _tapped_bank(g: np.random.Generator, n: int, shift: float = 0.0) -> FeatureBank:
    """A bank with two tapped modules' extremes, as the evaluation's pass stores them (before and after each call:
    the same values, neither module is in place)."""
    before = {"a": torch.as_tensor(g.normal(size=(n, 2)) + shift, dtype=torch.float32),
              "b": torch.as_tensor(g.gamma(2.0, size=(n, 3, 2)) + shift, dtype=torch.float32)}
    extras = {**{f"combood:{m}": v for m, v in before.items()}, **{f"combood_after:{m}": v for m, v in before.items()}}
    return FeatureBank(logits=torch.as_tensor(g.normal(size=(n, 3)), dtype=torch.float32),
                       features=torch.as_tensor(np.abs(g.normal(size=(n, 4))), dtype=torch.float32), extras=extras)


def test_a_bank_is_scored_on_the_taps_it_was_fitted_on_by_name() -> None:
    """The taps are read by name, not in the scored bank's order (a bank whose extras came in another order scored
    its columns through the train columns' scaler and power transform); a bank without them is refused in one line."""
    g = np.random.default_rng(4)
    train, test = _tapped_bank(g, 80), _tapped_bank(g, 20, shift=0.5)
    det = build_detector("combood", k=5).fit(train)
    reordered = FeatureBank(logits=test.logits, features=test.features, extras=dict(reversed(test.extras.items())))
    torch.testing.assert_close(det.score(reordered), det.score(test), rtol=0, atol=0)
    # the same as a fit and score whose columns are in the reordered bank's order throughout
    swapped = FeatureBank(logits=train.logits, features=train.features, extras=dict(reversed(train.extras.items())))
    # float64: the covariance's inverse in another column order rounds otherwise (measured 2e-15)
    torch.testing.assert_close(build_detector("combood", k=5).fit(swapped).score(reordered), det.score(test),
                               rtol=1e-12, atol=1e-12)
    partial = FeatureBank(logits=test.logits, features=test.features, extras={"combood:a": test.extras["combood:a"]})
    with pytest.raises(DetectorNotApplicable, match=r"^this bank lacks 1 of the 2 activation taps it was fitted on "
                                                    r"\('combood:b' first\)"):
        det.score(partial)


def test_a_network_wrapped_as_a_whole_is_tapped() -> None:
    """The taps need activation modules only, not stages: a plain network wrapped as a whole (`ModuleBackbone`, as
    `ood.evaluate` wraps any model) gives each ReLU's input extremes (it was skipped as having none); taps that read
    stages (gram) still add nothing there."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                              torch.nn.ReLU(), torch.nn.Linear(5, 3))
    backbone, x = ModuleBackbone(net).eval(), torch.randn(7, 3, 2, 2)
    taps = LayerTaps(backbone, ["combood", "gram"])
    with torch.no_grad():
        out = backbone.run(x)
        pre1 = net[1](net[0](x))
        pre2 = net[3](torch.relu(pre1))
    tapped = taps.pop()
    taps.remove()
    assert list(tapped) == ["combood:net.2", "combood_after:net.2", "combood:net.4", "combood_after:net.4"]
    for key, pre in zip(tapped, (pre1, pre1, pre2, pre2)):  # not in place: the call leaves its input as it was
        torch.testing.assert_close(tapped[key], torch.stack([pre.amax(1), -pre.amin(1)], 1))
    bank = FeatureBank(logits=out.logits, features=out.features, extras=tapped)
    assert torch.isfinite(build_detector("combood", k=3).fit(bank).score(bank)).all()
    # an EfficientNet's SiLU modules are not the released code's activations: no taps, and the skip says why
    silu = ModuleBackbone(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6), torch.nn.SiLU(),
                                              torch.nn.Linear(6, 3))).eval()
    none = LayerTaps(silu, ["combood"])
    with torch.no_grad():
        unseen = silu.run(x)
    assert none.pop() == {}
    none.remove()
    with pytest.raises(DetectorNotApplicable, match=r"a network whose activations are other modules, e\.g\. SiLU"):
        build_detector("combood").fit(FeatureBank(logits=unseen.logits, features=unseen.features))


def test_timms_own_gelu_modules_are_tapped() -> None:
    """timm's ConvNeXt runs timm's GELU module, not an nn.GELU: each block's activation input is tapped (none was)."""
    timm = pytest.importorskip("timm")
    from ood.models.adapters import as_backbone

    torch.manual_seed(0)
    net = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    backbone, x = as_backbone(net).eval(), torch.randn(2, 3, 32, 32)
    pre: list[torch.Tensor] = []
    block = net.stages[3].blocks[1]
    handle = block.mlp.act.register_forward_pre_hook(lambda _m, args: pre.append(args[0]))
    taps = LayerTaps(backbone, ["combood"])
    with torch.no_grad():
        backbone.run(x)
    tapped = taps.pop()
    taps.remove()
    handle.remove()
    assert len(tapped) == 2 * sum(len(stage.blocks) for stage in net.stages) == 24  # before and after each call
    torch.testing.assert_close(tapped["combood:net.stages.3.blocks.1.mlp.act"],
                               torch.stack([pre[0].flatten(1).amax(1), -pre[0].flatten(1).amin(1)], 1))


def test_a_k_beyond_the_train_bank_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """K is clipped to the train bank (the farthest train feature is read); as knn, the fit says so."""
    train = np.abs(np.random.default_rng(4).normal(size=(30, 5))) + 0.1
    det = build_detector("combood", features="penultimate").fit(_bank(train))
    assert "combood: k=50 exceeds the 30 train features it searches" in caplog.text
    unit = normalizer(train)
    farthest = ((unit[:2, None, :] - unit[None, :, :]) ** 2).sum(-1).max(1)
    np.testing.assert_allclose(det.knn_sq_distance(_bank(train[:2])).numpy(), farthest, rtol=1e-5)


def authors_hook_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """`confidenciator.py`'s `FeatureExtractor` transcribed: a forward hook on every nn.ReLU / GELU / LeakyReLU of
    `model.modules()` storing `MinMax` of `input_[0]` as the call left it, one dict entry per module (a later call
    overwrites it), then `Max_out` / `Min_out` of the logits: [N, 2 x modules called + 2], and the [N, D] features."""
    kept: dict[str, torch.Tensor] = {}

    def save(i: int) -> Any:
        def fn(_: torch.nn.Module, input_: tuple[torch.Tensor, ...], __: torch.Tensor) -> None:
            amin, amax = torch.aminmax(input_[0].view(input_[0].shape[0], -1), dim=1)
            kept[f"Min_relu_{i}"], kept[f"Max_relu_{i}"] = -amin, amax
        return fn

    activations = [m for m in model.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU, torch.nn.LeakyReLU))]
    handles = [m.register_forward_hook(save(i)) for i, m in enumerate(activations)]
    with torch.no_grad():
        out = model.run(x)
    for handle in handles:
        handle.remove()
    columns = [*kept.values(), out.logits.max(1).values, -out.logits.min(1).values]
    return torch.stack(columns, 1).numpy(), out.features.numpy()


def _tapped_pass(net: torch.nn.Module, x: torch.Tensor) -> FeatureBank:
    taps = LayerTaps(net, ["combood"])
    with torch.no_grad():
        out = net.run(x)
    bank = FeatureBank(logits=out.logits, features=out.features, extras=taps.pop())
    taps.remove()
    return bank


def test_extreme_as_released_matches_the_authors_hook_on_torchvisions_resnet18() -> None:
    """`features=extreme_as_released` on torchvision's ResNet-18 (OpenOOD's ResNet18_224x224: the stem's in-place
    ReLU and each basic block's one in-place ReLU, called twice) keeps what the authors' hook kept: 9 entries, each the
    last call's input after the in-place ReLU overwrote it (the stem's or block's output: its -min a constant 0 column),
    scored as their scaler / Yeo-Johnson / covariance + I pipeline scores the 20 columns (`extreme` reads 36 others)."""
    torch.manual_seed(0)
    net = ResNet18(num_classes=3).eval()
    x = {"train": torch.randn(60, 3, 16, 16), "test": torch.cat([torch.randn(10, 3, 16, 16), 3 * torch.rand(10, 3, 16, 16)])}
    banks = {split: _tapped_pass(net, images) for split, images in x.items()}
    (train_maha, train_h), (test_maha, test_h) = (authors_hook_features(net, x[s]) for s in ("train", "test"))
    assert train_maha.shape[1] == 20 and int((train_maha == 0).all(0).sum()) == 9  # the 9 -min columns: constant 0
    np.testing.assert_allclose(train_h, banks["train"].features.numpy(), rtol=1e-5, atol=1e-6)
    expected = released_scores(train_h, test_h, 50, 1.0, train_maha, test_maha)
    det = build_detector("combood", features="extreme_as_released").fit(banks["train"])
    assert len(det.keys_) == 9
    np.testing.assert_allclose(det.score(banks["test"]).numpy(), expected, rtol=1e-5, atol=1e-4)
    every_call = build_detector("combood").fit(banks["train"]).score(banks["test"]).numpy()
    assert np.abs(every_call - expected).max() > 1.0  # the test tells the two apart


def test_extreme_as_released_is_extreme_with_one_module_per_call() -> None:
    """A network calling each activation module once, not in place (the authors' CIFAR ResNet-18): their hook's
    entries are every call's input, so both `features` values score alike, to the bit."""
    torch.manual_seed(1)
    net = ModuleBackbone(torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3), torch.nn.LeakyReLU(0.1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 6), torch.nn.GELU(),
        torch.nn.Linear(6, 3))).eval()
    train, test = _tapped_pass(net, torch.randn(40, 3, 8, 8)), _tapped_pass(net, 2 * torch.rand(12, 3, 8, 8))
    released = build_detector("combood", k=5, features="extreme_as_released").fit(train)
    assert len(released.keys_) == 3
    torch.testing.assert_close(released.score(test), build_detector("combood", k=5).fit(train).score(test), rtol=0, atol=0)


def test_released_columns_keep_each_modules_last_call() -> None:
    """Runs stacked [N, runs, 2] or stored as `<key>#<run>` (a Bottleneck's ReLU: three shapes): the last run of each
    module's after-call taps; the before-call ones are not read."""
    n = 4
    runs = [torch.full((n, 2), float(i)) for i in range(3)]
    extras = {"combood:a": torch.stack(runs, 1), "combood_after:a": torch.stack(runs[:2], 1),
              "combood_after:b#0": runs[0], "combood_after:b#1": runs[1], "combood_after:b#2": runs[2],
              "combood_after:c": runs[1], "combood:d": runs[2], "other:x": runs[2]}
    columns = released_columns(extras)
    assert list(columns) == ["combood_after:a", "combood_after:b", "combood_after:c"]
    for key, run in zip(columns, (1, 2, 1)):
        torch.testing.assert_close(columns[key], runs[run])


def test_a_bank_without_after_call_taps_refuses_extreme_as_released() -> None:
    """A bank holding only the before-call taps (an older ood's) cannot tell in-place modules apart: refused in one
    line, not scored from pre-activations; `extreme` scores it as the full bank."""
    torch.manual_seed(2)
    bank = _tapped_pass(ResNet18(num_classes=3).eval(), torch.randn(12, 3, 16, 16))
    old = FeatureBank(logits=bank.logits, features=bank.features,
                      extras={k: v for k, v in bank.extras.items() if not k.startswith("combood_after:")})
    with pytest.raises(DetectorNotApplicable, match="features=extreme_as_released reads .* older ood"):
        build_detector("combood", k=5, features="extreme_as_released").fit(old)
    torch.testing.assert_close(build_detector("combood", k=5).fit(old).score(old),
                               build_detector("combood", k=5).fit(bank).score(bank), rtol=0, atol=0)


@pytest.mark.parametrize("data", ["imagenet200", "imagenet1k"])
def test_the_imagenet_parity_experiments_read_the_released_features(data: str, tmp_path: Path) -> None:
    """The leaderboard's ImageNet CombOOD rows came from the authors' hook on torchvision's in-place ReLUs: the parity
    experiments score combood with `extreme_as_released` (they read every call's pre-activation)."""
    cfg = compose_config(tmp_path, [f"experiment=parity_{data}"], config_name="eval")
    assert build_detector("combood", **cfg.detectors.params.combood).features == "extreme_as_released"


def test_float16_features_score_as_float32_up_to_their_rounding() -> None:
    """`evaluation.feature_dtype=float16` keeps the penultimate features in half (taps and logits in float32); combood
    upcasts them before any arithmetic (it was refused). The extreme Mahalanobis term is the same to the bit; the kNN
    term, sqrt(64) = 8 x log of the K-th squared distance, moves by float16's relative rounding (2^-11 per value, the
    distance's log by well under 1e-3): |delta| < 1e-2 against scores spread over about 2, the ranking kept."""
    assert "combood" in float16_detectors()
    g = np.random.default_rng(5)

    def bank(n: int, shift: float) -> FeatureBank:
        b = _tapped_bank(g, n, shift)
        return replace(b, features=torch.as_tensor(np.abs(g.normal(size=(n, 64))) + shift, dtype=torch.float32))

    train, test = bank(200, 0.0), bank(60, 0.3)
    half = lambda b: replace(b, features=b.features.half())  # noqa: E731
    for features in FEATURES:
        f32, f16 = (build_detector("combood", k=10, features=features).fit(b) for b in (train, half(train)))
        s32, s16 = f32.score(test), f16.score(half(test))
        assert s16.dtype == torch.float64 and float(s32.std()) > 1.5
        assert float((s16 - s32).abs().max()) < 1e-2 and spearmanr(s16, s32).statistic > 0.999
        if features != "penultimate":
            torch.testing.assert_close(f16.mahalanobis_sq(half(test)), f32.mahalanobis_sq(test), rtol=0, atol=0)


def test_extremes_of_a_channels_last_map_are_its_max_and_negated_min() -> None:
    """`extremes` reduces over every dim but the batch without flattening (a channels_last map was copied, twice per
    activation call): the same values on a channels_last and a contiguous map."""
    from ood.detectors.combood import extremes

    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) - 5
    expected = torch.tensor([[6.0, 5.0], [18.0, -7.0]])
    torch.testing.assert_close(extremes(z), expected, rtol=0, atol=0)
    torch.testing.assert_close(extremes(z.to(memory_format=torch.channels_last)), expected, rtol=0, atol=0)
