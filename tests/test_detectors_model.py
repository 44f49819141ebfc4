"""Detectors that need the network: enrolled contract tests on a tiny trained CNN, and each detector's scores
against an independent transcription of its reference code (OpenOOD / pytorch-ood), written here from the
reference, not through the detector's code path."""

from __future__ import annotations

import copy
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import fit_detector
from omegaconf import OmegaConf
from scipy.stats import spearmanr
from torch import nn

from ood import CONFIG_DIR
from ood.detectors import DetectorNotApplicable, available_detectors, build_detector, detector_class
from ood.detectors import odin as odin_module
from ood.detectors.adascale import AdaScaleA
from ood.detectors.base import Detector
from ood.detectors.gram import gram_rows
from ood.detectors.mcdropout import ImageDropout, image_keys
from ood.detectors.network import FitInputs, LayerTaps, ModelFitted, StagedForward
from ood.errors import ConfigError
from ood.evaluation.scoring import JointInputs, detector_scorers
from ood.features.bank import FeatureBank
from ood.metrics import ood_metrics, validation_aurocs
from ood.models.adapters import ModuleBackbone, as_backbone
from ood.models.base import Backbone, GlobalPool
from ood.models.resnet import ResNet18_32x32, _TorchvisionResNet

#: detectors that run the network or read maps cached by layer taps (the synthetic-bank tests cannot run them)
NETWORK = [n for n in available_detectors() if detector_class(n).needs_model or hasattr(detector_class(n), "taps")]
MINE = ["adascale_a", "adascale_l", "gram", "gram_stream", "iodin", "mahalanobis_odin", "mcdropout", "mds_ensemble", "nac", "rankfeat"]
STD = 0.5


class TinyNet(Backbone):
    """Two conv stages on 1x8x8 inputs, dropout in the second, 100-d features (so OpenOOD's k2 = 1 % is 1)."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(
            {
                "block1": nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2)),
                "block2": nn.Sequential(nn.Conv2d(6, 100, 3, padding=1), nn.BatchNorm2d(100), nn.ReLU(), nn.Dropout(dropout)),
            }
        )
        self.pool = GlobalPool()
        self.fc = nn.Linear(100, 3)


def _images(n: int, gen: torch.Generator, ood: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ID: a bright horizontal bar at row 2y+1 (y in 0..2) plus noise; OOD: unstructured noise."""
    y = torch.arange(n) % 3
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    if ood:
        return x + 0.8 * torch.rand(n, 1, 8, 8, generator=gen).round(), y
    for i in range(n):
        x[i, 0, 2 * y[i] + 1 : 2 * y[i] + 3, 1:7] += 2.0
    return x, y


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread for these tiny tensors (two spin-waiting threads on a loaded 2-core machine run this file
    10x slower); the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """The trained tiny network, the inputs of every split and their banks cached with every detector's taps."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = TinyNet()
    splits = {"train": _images(240, gen, False), "val": _images(90, gen, False), "val_ood": _images(90, gen, True),
              "test": _images(120, gen, False), "ood": _images(120, gen, True)}
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = splits["train"]
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    taps = LayerTaps(net, available_detectors())
    banks = {}
    with torch.no_grad():
        for name, (x, y) in splits.items():
            out = net.run(x)
            banks[name] = FeatureBank(out.logits, out.features, y if "ood" not in name else None,
                                      net.fc.weight.detach(), net.fc.bias.detach(), extras=taps.pop())
    taps.remove()
    return {"net": net, "x": {k: v[0] for k, v in splits.items()}, "banks": banks}


def _model_scores(tiny: dict[str, Any]) -> Callable[..., torch.Tensor]:
    """The evaluation's model-score function: `score_inputs` over a split (or the given rows of it) in batches of 64."""

    def model_scores(det: Detector, split: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        x = tiny["x"][split] if rows is None else tiny["x"][split][rows]
        return torch.cat([det.score_inputs(tiny["net"], chunk) for chunk in x.split(64)])

    return model_scores


def _fitted(name: str, tiny: dict[str, Any], **params: Any) -> Detector:
    params = {"input_std": STD, **params} if "input_std" in build_detector(name).hparams else params
    return fit_detector(name, params, tiny["banks"], tune=False, model_scores=_model_scores(tiny))[0]


def _scores(det: Detector, tiny: dict[str, Any], split: str) -> torch.Tensor:
    return _model_scores(tiny)(det, split) if det.needs_model else det.score(tiny["banks"][split])


def _agrees(ours: torch.Tensor, reference: torch.Tensor, tiny: dict[str, Any], ours_ood: torch.Tensor, reference_ood: torch.Tensor) -> None:
    """Spearman rho >= 0.999 on ID and OOD scores together and the ID-vs-OOD AUROC within 1e-3."""
    a, b = torch.cat([ours, ours_ood]).double(), torch.cat([reference, reference_ood]).double()
    assert spearmanr(a.numpy(), b.numpy())[0] >= 0.999
    assert abs(ood_metrics(ours, ours_ood)["auroc"] - ood_metrics(reference.double(), reference_ood.double())["auroc"]) <= 1e-3


# ----- contract, every detector that needs the network ------------------------------------------------------------
def test_every_network_detector_is_enrolled() -> None:
    assert set(MINE) <= set(NETWORK)


@pytest.mark.parametrize("name", [n for n in NETWORK if detector_class(n).needs_model])
def test_a_frozen_network_scores_as_a_trainable_one(name: str, tiny: dict[str, Any]) -> None:
    """A backbone whose parameters are frozen (heatmap's and OAL's classifiers, a user's `requires_grad_(False)`
    model): NAC's layer-state gradients had no graph (a RuntimeError that stopped the heatmap digits run); every
    network-pass detector fits and scores as on the trainable network."""
    def run() -> torch.Tensor:
        torch.manual_seed(0)
        det = _fitted(name, tiny)
        return torch.cat([_scores(det, tiny, "test"), _scores(det, tiny, "ood")])

    trainable = run()
    tiny["net"].requires_grad_(False)
    try:
        torch.testing.assert_close(run(), trainable, rtol=0, atol=0)
    finally:
        tiny["net"].requires_grad_(True)


@pytest.mark.parametrize("name", NETWORK)
def test_separates_id_from_ood_through_the_evaluation_path(name: str, tiny: dict[str, Any]) -> None:
    """Tuned on val vs val_ood and fitted as the evaluation does; higher = more ID, float64 [N], finite."""
    params = {"input_std": STD} if "input_std" in build_detector(name).hparams else {}
    det, _ = fit_detector(name, params, tiny["banks"], tune=True, model_scores=_model_scores(tiny))
    id_s, ood_s = _scores(det, tiny, "test"), _scores(det, tiny, "ood")
    assert id_s.shape == (120,) and id_s.dtype == torch.float64
    assert bool(torch.isfinite(id_s).all() and torch.isfinite(ood_s).all())
    assert ood_metrics(id_s, ood_s)["auroc"] > 0.9, name


@pytest.mark.parametrize("name", NETWORK)
def test_a_fitted_network_detector_pickles_and_scores_alike_after(name: str, tiny: dict[str, Any]) -> None:
    """A user keeps fitted detectors with `pickle` (`torch.save`) or `copy.deepcopy`: every network detector comes
    back scoring the test split as it did (the cached ones: tests/test_detectors.py)."""
    det = _fitted(name, tiny)
    want = _scores(det, tiny, "test")
    for restored in (pickle.loads(pickle.dumps(det)), copy.deepcopy(det)):
        assert type(restored) is type(det) and restored.hparams == det.hparams
        torch.testing.assert_close(_scores(restored, tiny, "test"), want, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in NETWORK if detector_class(n).score_params and detector_class(n).needs_model])
def test_score_inputs_grid_equals_fresh_detectors(name: str, tiny: dict[str, Any]) -> None:
    """The shared passes of tuning (`score_inputs_grid`) equal scoring each grid point with its own detector."""
    cls = detector_class(name)
    points = [dict(zip(cls.grid, v)) for v in zip(*cls.grid.values())][:3] if len(cls.grid) == 1 else None
    if points is None:
        keys = sorted(cls.score_params)
        points = [{k: cls.grid[k][i] for k in keys} for i in (0, -1)]
    det = _fitted(name, tiny, **points[0])
    x = tiny["x"]["val"]
    shared = det.score_inputs_grid(tiny["net"], x, points)
    for point, got in zip(points, shared):
        torch.testing.assert_close(got, _fitted(name, tiny, **point).score_inputs(tiny["net"], x), msg=f"{name} {point}")


def test_validation_auroc_of_a_tuned_network_detector_costs_no_second_pass(tiny: dict[str, Any]) -> None:
    """The chosen point's val / val_ood scores come from the search: `validation_aurocs` runs no further pass over
    them, and they equal a fresh pass at that point (so the validation AUROC is the one a re-scoring gives)."""
    calls: list[str] = []
    score = _model_scores(tiny)

    def counting(det: Detector, split: str) -> torch.Tensor:
        calls.append(split)
        return score(det, split)

    banks = {k: v for k, v in tiny["banks"].items()}
    (scorer,) = detector_scorers(["odin"], {"odin": {"input_std": STD}}, banks, tune=True, model_scores=counting)
    assert calls == ["val", "val_ood", "test", "ood"]  # one grid run over each validation split, one run per test split
    auroc = validation_aurocs([scorer], list(banks))["odin"]
    scorer.score("test"), scorer.score("ood")
    assert calls == ["val", "val_ood", "test", "ood"]
    det = _fitted("odin", tiny, **{k: scorer.hparams[k] for k in ("temperature", "noise")})
    assert auroc == ood_metrics(_scores(det, tiny, "val"), _scores(det, tiny, "val_ood"))["auroc"]


JOINT = ["odin", "iodin", "adascale_a", "adascale_l", "rankfeat", "mds_ensemble", "mcdropout", "nac", "mahalanobis_odin"]


def test_network_detectors_score_together_as_they_score_alone(tiny: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """One run per split for every network-pass detector (`network_scores`) gives each the scores it gets alone,
    bit for bit, and the work ODIN and i-ODIN, AdaSCALE-A and -L have in common runs once per batch."""
    params = {n: {"input_std": STD} for n in JOINT if "input_std" in build_detector(n).hparams}
    calls: list[tuple[str, int]] = []
    score = _model_scores(tiny)

    def counting(det: Detector, split: str) -> torch.Tensor:
        calls.append((split, len(getattr(det, "detectors", [det]))))
        return score(det, split)

    scorers = detector_scorers(JOINT, params, tiny["banks"], tune=False, model_scores=counting)
    assert [s.name for s in scorers] == JOINT
    fitting = [c for c in calls if c[1] == 1]  # the fit passes of the detectors fitted from the network
    assert calls[len(fitting):] == [("test", 9), ("ood", 9), ("val", 9), ("val_ood", 9)]
    for scorer in scorers:  # mcdropout too: its masks are a function of each image, not of the global RNG's stream
        det = _fitted(scorer.name, tiny)
        for split in ("test", "ood", "val"):
            assert torch.equal(scorer.score(split), _scores(det, tiny, split).double()), (scorer.name, split)

    # interleaved on purpose: a group's members are scored one after the other, and its shared graph is dropped
    # before the next group runs (at most one group's passes alive)
    names = ("odin", "adascale_a", "iodin", "mds_ensemble", "adascale_l", "mahalanobis_odin")
    dets = [_fitted(n, tiny) for n in names]
    passes: list[tuple[str, int]] = []
    alive: weakref.WeakSet = weakref.WeakSet()

    def counted(cls: type, label: str) -> None:
        original = cls.__init__

        def init(self: Any, *args: Any) -> None:
            passes.append((label, len(alive)))
            alive.add(self)
            original(self, *args)

        monkeypatch.setattr(cls, "__init__", init)

    counted(odin_module.InputGradients, "odin")
    counted(StagedForward, "staged")
    original_passes = AdaScaleA._passes
    monkeypatch.setattr(AdaScaleA, "_passes", lambda *a: (passes.append(("adascale", len(alive))), original_passes(*a))[1])
    joint = JointInputs(dets).score_inputs(tiny["net"], tiny["x"]["test"][:64])
    assert passes == [("odin", 0), ("adascale", 0), ("staged", 0)]
    for name, det, column in zip(names, dets, joint.T):
        assert torch.equal(column, det.score_inputs(tiny["net"], tiny["x"]["test"][:64]).double()), name


class _Unstaged(nn.Module):
    """The tiny network's logits without its stages: no intermediate maps to read."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_network_detector_found_inapplicable_in_its_pass_is_skipped(tiny: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """rankfeat finds in its first pass that the model has no stages: it is skipped with a warning, the others score."""
    model = _Unstaged(tiny["net"])

    def model_scores(det: Detector, split: str) -> torch.Tensor:
        return torch.cat([det.score_inputs(model, x) for x in tiny["x"][split].split(64)])

    with caplog.at_level("WARNING"):
        scorers = detector_scorers(["rankfeat", "odin", "msp"], {"odin": {"input_std": STD}}, tiny["banks"], tune=False,
                                   model_scores=model_scores)
    assert [s.name for s in scorers] == ["odin", "msp"]
    assert "skipping detector rankfeat: it needs the intermediate maps of a staged backbone" in caplog.text
    assert torch.equal(scorers[0].score("test"), _scores(_fitted("odin", tiny), tiny, "test"))


def test_skip_reasons_on_a_model_wrapped_whole_are_short(tiny: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """On a user's model wrapped as a whole, the skip warnings said `no grid point of {'percentile': [(60, 65), ...
    36 pairs]}` (adascale) and `this bank has []` (gram; on a one-stage timm model every gram.* key, 50 of them for
    EfficientNet-B0): now a short line that says why."""
    model = _Unstaged(tiny["net"])
    bare = {s: FeatureBank(b.logits, b.features, b.labels, b.weight, b.bias) for s, b in tiny["banks"].items()}

    def model_scores(det: Detector, split: str) -> torch.Tensor:
        return torch.cat([det.score_inputs(model, x) for x in tiny["x"][split].split(64)])

    with caplog.at_level("WARNING"):
        scorers = detector_scorers(["adascale_a", "gram", "mds_ensemble", "msp"], {}, bare, tune=True, model_scores=model_scores)
    assert [s.name for s in scorers] == ["msp"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert lines == [
        "skipping detector adascale_a: none of its 36 grid points (percentile) applies: it needs the intermediate maps "
        "of a staged backbone; TinyNet is wrapped as a whole",
        *(f"skipping detector {n}: {n} reads {p}* maps from the evaluation cache, which holds none: they are tapped from "
          "the stage modules of a staged backbone (a network wrapped as a whole has none), in an evaluation's pass or "
          f"by ood.extract(..., taps=['{n}'])"
          for n, p in (("gram", "gram."), ("mds_ensemble", "stage_mean."))),
    ]


def test_maps_come_from_the_single_pass_and_missing_maps_are_not_applicable(tiny: dict[str, Any]) -> None:
    """gram and mds_ensemble read the taps cached in the one pass; a bank without them is not applicable."""
    bank = tiny["banks"]["train"]
    assert {"stage_mean.block1", "stage_mean.block2"} <= set(bank.extras)
    assert bank.extras["stage_mean.block2"].shape == (240, 100) and bank.extras["gram.stages.block1.0"].shape == (240, 5, 6)
    bare = FeatureBank(bank.logits, bank.features, bank.labels, bank.weight, bank.bias)
    for name in ("gram", "mds_ensemble"):
        with pytest.raises(DetectorNotApplicable, match=rf"from the evaluation cache, which holds none: .* or by "
                                                        rf"ood\.extract\(\.\.\., taps=\['{name}'\]\)$"):
            build_detector(name).fit(bare)  # an ood.extract bank without taps: the message says how to get them


def test_taps_reduce_outside_autocast(tiny: dict[str, Any]) -> None:
    """Under bf16 autocast (trainer=gpu_fast) the maps are bf16, but the cached reductions (gram's Gram-row products,
    channel means) are computed from them in float32, as outside autocast."""
    net, x = tiny["net"], tiny["x"]["test"][:16]
    conv = net.stages["block2"][0]
    maps: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda _m, _i, out: maps.append(out.detach()))
    taps = LayerTaps(net, ["gram", "mds_ensemble"])
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            net.run(x)
        got = taps.pop()
    finally:
        taps.remove()
        handle.remove()
    assert maps[0].dtype == torch.bfloat16
    assert torch.equal(got["gram.stages.block2.0"], gram_rows(maps[0]).float())


def test_a_module_run_on_maps_of_different_widths_is_tapped_per_run() -> None:
    """torchvision's Bottleneck runs one ReLU on width, width and 4 x width channels: its runs cannot be stacked, so
    each is kept under `<key>#<run>` (a ReLU run on equal shapes stays stacked on dim 1)."""
    relu = nn.ReLU()
    net = TinyNet()
    net.stages = nn.ModuleDict({"block1": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), relu, nn.Conv2d(4, 100, 3, padding=1), relu)})
    maps: list[torch.Tensor] = []
    handle = relu.register_forward_hook(lambda _m, _i, out: maps.append(out))
    taps = LayerTaps(net, ["gram"])
    try:
        with torch.no_grad():
            net(torch.randn(5, 1, 8, 8))
        got = taps.pop()
    finally:
        taps.remove()
        handle.remove()
    # in tap order, a module's runs together (as when stacked)
    assert list(got) == ["gram.stages.block1.0", "gram.stages.block1.1#0", "gram.stages.block1.1#1", "gram.stages.block1.2"]
    assert got["gram.stages.block1.1#0"].shape == (5, 5, 4) and got["gram.stages.block1.1#1"].shape == (5, 5, 100)
    assert torch.equal(got["gram.stages.block1.1#1"], gram_rows(maps[1]).float())


def test_mcdropout_without_dropout_is_not_applicable(tiny: dict[str, Any]) -> None:
    net = TinyNet(dropout=0.0).eval()
    with pytest.raises(DetectorNotApplicable, match=r"^no dropout in the network \(TinyNet\): MC-Dropout needs dropout layers$"):
        fit_detector("mcdropout", {}, tiny["banks"], tune=False, model_scores=lambda d, s: d.score_inputs(net, tiny["x"][s]))
    with pytest.raises(DetectorNotApplicable, match="^it needs the intermediate maps of a staged backbone; Linear is wrapped as a whole$"):
        build_detector("rankfeat").score_inputs(nn.Linear(4, 2), torch.zeros(3, 4))
    # inside a method, the user's network is named (it said "(CrossEntropy)")
    method = nn.Module()
    method.backbone = ModuleBackbone(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(DetectorNotApplicable, match=r"^no dropout in the network \(Sequential\): MC-Dropout needs"):
        build_detector("mcdropout").score_inputs(method, tiny["x"]["test"])


@pytest.mark.parametrize("name", [n for n in NETWORK if detector_class(n).needs_model])
def test_network_detector_scores_an_image_alike_in_any_batch(name: str, tiny: dict[str, Any]) -> None:
    """Every network-pass detector scores the 120 ID test images in one batch as in batches of 7 (a prime that cuts
    classes unevenly, as `data.eval_batch_size=7` would), to float32 kernel order: no per-batch statistic, no loss
    averaged over the batch whose scale decides anything, no random stream consumed per batch (MC-Dropout's masks
    were: 0.9 relative apart). Measured: 6e-7 relative at most (mahalanobis_odin)."""
    det, x = _fitted(name, tiny), tiny["x"]["test"]
    whole = det.score_inputs(tiny["net"], x)
    sevens = torch.cat([det.score_inputs(tiny["net"], chunk) for chunk in x.split(7)])
    torch.testing.assert_close(sevens, whole, rtol=1e-5, atol=1e-8)

def test_nac_scores_an_image_bit_for_bit_in_any_batch(tiny: dict[str, Any]) -> None:
    """NAC's score is a mean of clamped counts: summed as whole numbers and divided once, it is the same float64 in
    any batch, bit for bit (the mean of the fractions was summed in a batch-size-dependent order: last-bit
    differences that split NAC's many exact ties differently, and moved its digits AUROC by 5e-5 between
    eval_batch_size 512 and 7); equal to the textbook mean of min(o / o_star, 1) to float64 rounding."""
    det, x, net = _fitted("nac", tiny), tiny["x"]["ood"], tiny["net"]
    whole = det.score_inputs(net, x)
    assert torch.equal(torch.cat([det.score_inputs(net, chunk) for chunk in x.split(7)]), whole)
    assert torch.equal(torch.cat([det.score_inputs(net, chunk) for chunk in x.split(1)]), whole)
    textbook, start = torch.zeros(len(x), dtype=torch.float64), 0
    for idx in det.states(net, x):
        o = det.counts_[start : start + idx.shape[1]].gather(1, idx.T).T.double()
        textbook += (o / det.o_star).clamp(max=1.0).mean(1)
        start += idx.shape[1]
    torch.testing.assert_close(whole, textbook, rtol=1e-14, atol=0)

def test_mcdropout_scores_an_image_alike_in_any_batch(tiny: dict[str, Any]) -> None:
    """An image's MC-Dropout score is a function of the image: the same in one batch of 120, in batches of 7, alone,
    after other draws from the global RNG, which it leaves as it was (its masks came from that RNG's stream, so the
    same image scored differently at eval_batch_size 512 and 7: relative differences up to ~1e-1 here). The masks drop
    about p of the elements, scale the others by 1 / (1 - p), and differ between images, passes and calls."""
    net, x, det = tiny["net"], tiny["x"]["test"], build_detector("mcdropout")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    whole = det.score_inputs(net, x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    torch.rand(17)
    sevens = torch.cat([det.score_inputs(net, chunk) for chunk in x.split(7)])
    torch.testing.assert_close(sevens, whole, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(det.score_inputs(net, x[5:6]), whole[5:6], rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        plain = torch.log_softmax(net(x).double(), 1).max(1).values
    assert ((whole - plain).abs() / plain.abs()).max() > 0.1  # dropout is on
    masks, ones, keys, original = ImageDropout(), torch.ones(64, 2, 500), image_keys(torch.randn(32, 3)), F.dropout
    with masks.active(keys, 0):
        first, second = F.dropout(ones, 0.2), F.dropout(ones, 0.2)  # 2 rows per image, two calls
    assert set(first.unique().tolist()) == {0.0, 1.25}
    assert abs(float((first == 0).double().mean()) - 0.2) < 0.01
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2]) and not torch.equal(first, second)
    with masks.active(keys, 1):
        assert not torch.equal(F.dropout(ones, 0.2), first)
    assert F.dropout is original and masks.keys is None


# ----- equal to the reference ------------------------------------------------------------------------------------
def _odin_reference(net: nn.Module, x: torch.Tensor, temperature: float, noise: float, one_pixel: bool) -> torch.Tensor:
    """OpenOOD's odin / iodin postprocess: max softmax at T of the (masked) sign step."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    F.cross_entropy(out / temperature, out.detach().argmax(1)).backward()
    grad = x.grad.detach()
    gradient = (torch.ge(grad, 0).float() - 0.5) * 2 / STD
    if one_pixel:
        flat = grad.abs().view(len(x), -1)
        mask = torch.zeros_like(flat, dtype=torch.uint8).scatter_(1, flat.argmax(1, keepdim=True), 1).view_as(grad)
        gradient = gradient * mask
    with torch.no_grad():
        out = net(x.detach() - noise * gradient) / temperature
    return torch.softmax(out, 1).max(1).values


def test_iodin_equals_openood(tiny: dict[str, Any]) -> None:
    det = _fitted("iodin", tiny, temperature=10, noise=0.01)
    ours, refs = {}, {}
    for split in ("test", "ood"):
        ours[split], refs[split] = _scores(det, tiny, split), _odin_reference(tiny["net"], tiny["x"][split], 10, 0.01, one_pixel=True)
        torch.testing.assert_close(ours[split].exp().float(), refs[split], rtol=1e-5, atol=1e-6)
    _agrees(ours["test"], refs["test"], tiny, ours["ood"], refs["ood"])
    ref = refs["ood"]
    # the one-pixel step differs from ODIN's full step
    assert not torch.allclose(_odin_reference(tiny["net"], tiny["x"]["ood"], 10, 0.01, one_pixel=False), ref)


def test_mcdropout_equals_openood(tiny: dict[str, Any]) -> None:
    """OpenOOD's procedure with the same masks (each image's, `ImageDropout`, pass t = 0..4): the mean logits of 5
    passes with only the dropout in training mode, max softmax."""
    net, ours, refs = tiny["net"], {}, {}
    for split in ("test", "ood"):
        ours[split] = build_detector("mcdropout").score_inputs(net, tiny["x"][split])
        assert not net.training and not net.stages.block2[3].training
        net.stages.block2[3].train()
        masks, keys = ImageDropout(), image_keys(tiny["x"][split])
        with torch.no_grad():
            logits = 0
            for t in range(5):
                with masks.active(keys, t):
                    logits = logits + net(tiny["x"][split])
            logits = logits / 5
        net.stages.block2[3].eval()
        refs[split] = torch.softmax(logits, 1).max(1).values
        torch.testing.assert_close(ours[split].exp().float(), refs[split], rtol=1e-5, atol=1e-6)
    _agrees(ours["test"], refs["test"], tiny, ours["ood"], refs["ood"])


def test_mcdropout_finds_timm_drop_rate() -> None:
    """timm's ResNet applies its `drop_rate` as `F.dropout(training=self.training)` in its head, with no Dropout
    module: mcdropout skipped such a model ("no dropout"). Now only the model itself trains (its batch norms stay in
    eval mode) and the scores are the reference's with the same per-image masks, not MSP's."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=3, drop_rate=0.5).eval()
    x = torch.randn(4, 3, 16, 16)
    ours = build_detector("mcdropout").score_inputs(net, x)
    assert not any(m.training for m in net.modules())
    net.training = True  # the model alone, as the detector does
    masks, keys, passes = ImageDropout(), image_keys(x), []
    with torch.no_grad():
        for t in range(5):
            with masks.active(keys, t):
                passes.append(net(x).double())
    net.training = False
    logits = sum(passes) / 5
    torch.testing.assert_close(ours, torch.log_softmax(logits, 1).max(1).values)
    with torch.no_grad():
        msp = torch.log_softmax(net(x).double(), 1).max(1).values
    assert (ours - msp).abs().max() > 1e-3


def _class_gaussian(z: torch.Tensor, y: torch.Tensor, scatter: bool, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and the shared precision: pinv(sum of scatter + ridge I) (pytorch-ood: ridge 1e-6) or inv(cov)
    (sklearn)."""
    mu = torch.stack([z[y == c].mean(0) for c in range(3)])
    centred = z - mu[y]
    if scatter:
        return mu, torch.linalg.pinv(centred.T @ centred + ridge * torch.eye(z.shape[1], dtype=z.dtype))
    from sklearn.covariance import EmpiricalCovariance

    return mu, torch.from_numpy(EmpiricalCovariance(assume_centered=False).fit(centred.numpy()).precision_)


def test_mahalanobis_odin_equals_pytorch_ood(tiny: dict[str, Any]) -> None:
    """pytorch-ood's scores are ours / N (it inverts the unnormalised scatter): to float64 rounding without its
    1e-6 I ridge, and within what that ridge can move them with it."""
    net, labels = tiny["net"], tiny["banks"]["train"].labels
    with torch.no_grad():
        train = net.run(tiny["x"]["train"]).features.double()

    def reference(x: torch.Tensor, ridge: float = 1e-6, step_ridge: float | None = None) -> torch.Tensor:
        """pytorch-ood's scores; `step_ridge`: the ridge of the precision its input step is taken with (default:
        `ridge`, as pytorch-ood)."""
        mu, precision = _class_gaussian(train, labels, True, ridge)
        step = precision if step_ridge is None else _class_gaussian(train, labels, True, step_ridge)[1]
        x = x.clone().requires_grad_(True)
        z = net.run(x).features.double()
        gau = torch.stack([-0.5 * (((z.detach() - m) @ step) * (z.detach() - m)).sum(1) for m in mu], 1)
        centred = z - mu[gau.argmax(1)]
        (0.5 * ((centred @ step) * centred).sum(1)).mean().backward()
        with torch.no_grad():
            z = net.run(x.detach() - 0.005 * torch.sign(x.grad) / STD).features.double()
        return torch.stack([-0.5 * (((z - m) @ precision) * (z - m)).sum(1) for m in mu], 1).max(1).values

    det = _fitted("mahalanobis_odin", tiny, noise=0.005)
    ours, ref = _scores(det, tiny, "test").double(), reference(tiny["x"]["test"])
    # the ridge taken out, the same arithmetic in float64 (measured 2e-12 relative): a change of ours, e.g. its
    # precision in float32, shows
    torch.testing.assert_close(ours, len(labels) * reference(tiny["x"]["test"], ridge=0.0), rtol=1e-9, atol=0)
    # with it, each class's quadratic form at an input shrinks by a factor within [1 - 1e-6 / lambda_min, 1],
    # lambda_min the scatter's smallest eigenvalue (1 / the ridge-free precision's largest): 6.7e-4 here, 2.6e-4
    # measured. At the same perturbed input: the ridge also turns the input gradient a little, and an element near 0
    # may change sign (seen with MKL's AVX2 kernels: one score 1.2e-3 off), which no bound on the form covers
    bound = 1e-6 * float(torch.linalg.eigvalsh(_class_gaussian(train, labels, True, 0.0)[1]).max())
    at_ours = reference(tiny["x"]["test"], step_ridge=0.0)
    torch.testing.assert_close(ours, len(labels) * at_ours, rtol=bound, atol=0)
    _agrees(ours, ref, tiny, _scores(det, tiny, "ood"), reference(tiny["x"]["ood"]))


@pytest.mark.parametrize("stages", [None, ["block1"]])
def test_mds_ensemble_equals_openood(tiny: dict[str, Any], stages: list[str] | None) -> None:
    """Every stage (the paper), or the first only with the step over 0.5 (OpenOOD's leaderboard config, STD = 0.5)."""
    net, layers = tiny["net"], stages or ["block1", "block2"]
    with torch.no_grad():
        train_maps = net.run(tiny["x"]["train"], layers).layers
    gaussians = [_class_gaussian(train_maps[layer].mean((2, 3)).double(), tiny["banks"]["train"].labels, False) for layer in layers]

    def reference(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(x), dtype=torch.float64)
        for layer, (mu, precision) in zip(layers, gaussians):
            data = x.clone().requires_grad_(True)
            z = net.run(data, [layer]).layers[layer].mean((2, 3)).double()
            gau = torch.stack([-0.5 * torch.mm(torch.mm(z.detach() - m, precision), (z.detach() - m).t()).diag() for m in mu], 1)
            zero_f = z - mu.index_select(0, gau.max(1)[1])
            torch.mean(0.5 * torch.mm(torch.mm(zero_f, precision), zero_f.t()).diag()).backward()
            gradient = (torch.ge(data.grad, 0).float() - 0.5) * 2 / STD
            with torch.no_grad():
                z = net.run(data.detach() - 0.0014 * gradient, [layer]).layers[layer].mean((2, 3)).double()
            total += torch.stack([-0.5 * torch.mm(torch.mm(z - m, precision), (z - m).t()).diag() for m in mu], 1).max(1)[0]
        return total

    det = _fitted("mds_ensemble", tiny, stages=stages)
    ours, ref = _scores(det, tiny, "test"), reference(tiny["x"]["test"])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    _agrees(ours, ref, tiny, _scores(det, tiny, "ood"), reference(tiny["x"]["ood"]))


def test_mds_ensemble_names_the_stages_it_can_use(tiny: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"mds_ensemble: stages \['stem'\] have no cached means; choices: "
                                          r"\['block1', 'feature1', 'block2'\]"):
        _fitted("mds_ensemble", tiny, stages=["stem"])


class OpenOODResNet(torchvision.models.ResNet):
    """OpenOOD's 224 px ResNet forward (openood/networks/resnet50.py: feature1 after the max-pool), transcribed on a
    torchvision ResNet of one BasicBlock per stage."""

    def __init__(self) -> None:
        super().__init__(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False) -> Any:
        feature1 = self.relu(self.bn1(self.conv1(x)))
        feature1 = self.maxpool(feature1)
        feature2 = self.layer1(feature1)
        feature3 = self.layer2(feature2)
        feature4 = self.layer3(feature3)
        feature5 = self.layer4(feature4)
        feature5 = self.avgpool(feature5)
        logits_cls = self.fc(feature5.view(feature5.size(0), -1))
        if return_feature_list:
            return logits_cls, [feature1, feature2, feature3, feature4, feature5]
        return logits_cls


def _tapped(backbone: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> FeatureBank:
    """The bank of one pass over `x` with mds_ensemble's taps."""
    taps = LayerTaps(backbone, ["mds_ensemble"])
    try:
        with torch.no_grad():
            out = backbone.run(x)
        return FeatureBank(out.logits, out.features, y, extras=taps.pop())
    finally:
        taps.remove()


def _openood_mds_ensemble(net: nn.Module, train: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """OpenOOD's mds_ensemble_postprocessor.py (get_MDS_stat, compute_Mahalanobis_score) with its config
    (feature_type_list [mean], reduce_dim none, alpha [1], noise 0.0014, the step over 0.5), in float64 from the
    float32 features and without .cuda()."""
    from sklearn.covariance import EmpiricalCovariance

    with torch.no_grad():
        feats = net(train[0], return_feature_list=True)[1][0].flatten(2).mean(-1).double()
    mu = torch.stack([feats[train[1] == c].mean(0) for c in range(3)])
    precision = torch.from_numpy(EmpiricalCovariance(assume_centered=False).fit((feats - mu[train[1]]).numpy()).precision_)
    data = x.clone().requires_grad_(True)
    out = net(data, return_feature_list=True)[1][0].flatten(2).mean(-1).double()
    gau = torch.stack([-0.5 * torch.mm(torch.mm(out.data - m, precision), (out.data - m).t()).diag() for m in mu], 1)
    zero_f = out - mu.index_select(0, gau.max(1)[1])
    torch.mean(0.5 * torch.mm(torch.mm(zero_f, precision), zero_f.t()).diag()).backward()
    gradient = (torch.ge(data.grad.data, 0).float() - 0.5) * 2 / 0.5
    with torch.no_grad():
        noisy = net(torch.add(data.data, gradient, alpha=-0.0014), return_feature_list=True)[1][0].flatten(2).mean(-1).double()
    return torch.stack([-0.5 * torch.mm(torch.mm(noisy - m, precision), (noisy - m).t()).diag() for m in mu], 1).max(1)[0]


@pytest.mark.parametrize("regrouped", [True, False])
def test_mds_ensemble_feature1_is_openoods_after_the_max_pool(regrouped: bool) -> None:
    """On a torchvision ResNet (ood's regrouping, max-pool in `layer1`, or the adapted net, max-pool a step of it)
    `feature1` is OpenOOD's first feature map, after the max-pool (`stem` ends before it), and mds_ensemble at it
    (OpenOOD's leaderboard setting) scores as OpenOOD's postprocessor."""
    torch.manual_seed(0)
    net = OpenOODResNet().eval()
    backbone = _TorchvisionResNet(net, 3, None, "resnet") if regrouped else as_backbone(net)
    train = (torch.randn(96, 3, 16, 16), torch.arange(96) % 3)
    x = torch.randn(16, 3, 16, 16)
    bank = _tapped(backbone, *train)
    with torch.no_grad():
        theirs = net(train[0], return_feature_list=True)[1][0].mean((2, 3))
    torch.testing.assert_close(bank.extras["stage_mean.feature1"], theirs, rtol=1e-6, atol=1e-7)
    assert bank.extras["stage_mean.stem"].shape == theirs.shape and not torch.allclose(bank.extras["stage_mean.stem"], theirs)
    det = build_detector("mds_ensemble", stages=["feature1"], input_std=0.5).fit(bank)
    torch.testing.assert_close(det.score_inputs(backbone, x), _openood_mds_ensemble(net, train, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("benchmark", ["cifar10", "cifar100", "imagenet200", "imagenet1k"])
def test_parity_presets_run_mds_ensemble_on_openoods_first_feature(benchmark: str) -> None:
    """Each parity preset's mds_ensemble stage caches the channel means of OpenOOD's feature1 on the preset's backbone
    (ImageNet: the torchvision ResNet's stem after the max-pool; `stem` alone ended before it)."""
    preset = OmegaConf.load(CONFIG_DIR / "experiment" / f"parity_{benchmark}.yaml")
    (stage,) = preset.detectors.params.mds_ensemble.stages
    defaults = {k: v for d in preset.defaults for k, v in d.items()}
    target = OmegaConf.load(CONFIG_DIR / "backbone" / f"{defaults['override /backbone']}.yaml")._target_
    torch.manual_seed(0)
    backbone = hydra.utils.get_class(target)(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stem = backbone.stages["stem"](x)
        first = backbone.stages["layer1"][0]  # OpenOOD's feature1: after the max-pool where layer1 starts with one
        theirs = (first(stem) if isinstance(first, nn.MaxPool2d) else stem).mean((2, 3))
    torch.testing.assert_close(_tapped(backbone, x, None).extras[f"stage_mean.{stage}"], theirs, rtol=1e-6, atol=1e-7)


def test_mds_ensemble_feature1_is_the_stem_without_a_max_pool() -> None:
    """On OpenOOD's ResNet18_32x32 (the CIFAR parity presets' network) feature1 is the stem's output: the cached means
    and the scores are bitwise those of `stages=[stem]`, so the CIFAR rows stay as they were."""
    torch.manual_seed(0)
    backbone = ResNet18_32x32(num_classes=3).eval()
    bank = _tapped(backbone, torch.randn(48, 3, 8, 8), torch.arange(48) % 3)
    assert torch.equal(bank.extras["stage_mean.feature1"], bank.extras["stage_mean.stem"])
    x = torch.randn(8, 3, 8, 8)
    stem, feature1 = (build_detector("mds_ensemble", stages=[s], input_std=0.5).fit(bank) for s in ("stem", "feature1"))
    assert torch.equal(stem.score_inputs(backbone, x), feature1.score_inputs(backbone, x))


def test_gram_equals_openood(tiny: dict[str, Any]) -> None:
    """OpenOOD's hooks on every ReLU/Conv2d, G_p, per-class min/max on 90 % of train, the 10 % normaliser (the
    held-out rows the detector drew), deviations over the softmax confidence."""
    net = tiny["net"]
    det = _fitted("gram", tiny)

    def gram_features(x: torch.Tensor) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        feats: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: feats.append(o)) for m in net.modules() if isinstance(m, (nn.ReLU, nn.Conv2d))]
        with torch.no_grad():
            logits = net(x)
        for h in hooks:
            h.remove()
        out = []
        for f in feats:
            per_power = []
            for p in range(1, 6):
                t = f.double() ** p
                t = t.reshape(t.shape[0], t.shape[1], -1)
                t = torch.matmul(t, t.transpose(2, 1)).sum(2)
                per_power.append(t.sign() * torch.abs(t) ** (1 / p))
            out.append(per_power)
        return logits, out

    def delta(mins: torch.Tensor, maxs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (F.relu(mins - x) / torch.abs(mins + 1e-6)).sum(1) + (F.relu(x - maxs) / torch.abs(maxs + 1e-6)).sum(1)

    y, held = tiny["banks"]["train"].labels, det.holdout_
    _, train = gram_features(tiny["x"]["train"])
    bounds, norms = [], []
    for layer in train:
        mm = {(p, c): (g[(y == c) & ~held].min(0)[0], g[(y == c) & ~held].max(0)[0]) for p, g in enumerate(layer) for c in range(3)}
        total = torch.cat([sum(delta(*mm[p, c], g[(y == c) & held]) for p, g in enumerate(layer)) for c in range(3)])
        bounds.append(mm)
        norms.append(total.mean())

    def reference(x: torch.Tensor) -> torch.Tensor:
        logits, layers = gram_features(x)
        conf, pred = torch.softmax(logits, 1).max(1)
        dev = torch.zeros(len(x), dtype=torch.float64)
        for mm, n, layer in zip(bounds, norms, layers):
            for p, g in enumerate(layer):
                for c in range(3):
                    dev[pred == c] += delta(*mm[p, c], g[pred == c]) / n
        return -dev / conf.double()

    ours, ours_ood = _scores(det, tiny, "test"), _scores(det, tiny, "ood")
    ref, ref_ood = reference(tiny["x"]["test"]), reference(tiny["x"]["ood"])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_ood, ref_ood, rtol=1e-4, atol=1e-6)
    _agrees(ours, ref, tiny, ours_ood, ref_ood)


def test_gram_stream_equals_the_cached_gram(tiny: dict[str, Any]) -> None:
    """The streaming form (network passes, no cached rows) has the cached form's held-out draw and bounds exactly,
    and its normalisers and scores to 1e-10 (float64 summation order). Each split is scored in one batch, as the
    cache's pass ran it: float32 logits may round by the batch size (MKL's AVX2 kernels do; 8e-8 relative)."""
    cached, stream = _fitted("gram", tiny), _fitted("gram_stream", tiny)
    assert torch.equal(stream.holdout_, cached.holdout_) and int(cached.holdout_.sum()) == 24  # 3 classes x 8 of 80
    assert len(stream.mins_) == len(cached.mins_) == 4  # a Conv2d and a ReLU output per block
    for ours, theirs in zip([*stream.mins_, *stream.maxs_], [*cached.mins_, *cached.maxs_]):
        assert ours.dtype == torch.float64 and torch.equal(ours, theirs)
    np.testing.assert_allclose(stream.norms_, cached.norms_, rtol=1e-10, atol=0)
    assert 1.0 not in cached.norms_  # measured held-out deviations, not the fallback 1
    for split in ("test", "ood"):
        whole = stream.score_inputs(tiny["net"], tiny["x"][split])
        torch.testing.assert_close(whole, _scores(cached, tiny, split), rtol=1e-10, atol=1e-10)


def test_gram_stream_fit_passes_visit_each_train_row_once(tiny: dict[str, Any]) -> None:
    """The bounds pass sees the fit rows only, the normaliser pass the held-out rows only (counted as images through
    the network and as the rows asked of the model-score function): one train pass in all."""
    net, asked, seen = tiny["net"], [], []
    handle = net.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    score = _model_scores(tiny)

    def counting(det: Detector, split: str, rows: torch.Tensor | None = None) -> torch.Tensor:
        asked.append((split, None if rows is None else rows.clone()))
        seen.append("|")
        return score(det, split, rows)

    try:
        det, _ = fit_detector("gram_stream", {}, tiny["banks"], tune=False, model_scores=counting)
    finally:
        handle.remove()
    held = det.holdout_.nonzero().flatten()
    assert [split for split, _ in asked] == ["train", "train"]
    assert torch.equal(asked[0][1], (~det.holdout_).nonzero().flatten()) and torch.equal(asked[1][1], held)
    images = " ".join(map(str, seen)).split("|")[1:]
    assert [sum(map(int, part.split())) for part in images] == [240 - 24, 24]


def test_gram_stream_refuses_a_model_score_function_without_rows(tiny: dict[str, Any]) -> None:
    """A user's model-score function of the older form `(det, split)` cannot give the chosen rows: gram_stream is not
    applicable (the run skips it and says why) instead of a TypeError ending the whole scoring."""

    def two(det: Detector, split: str) -> torch.Tensor:
        raise AssertionError("not called")

    with pytest.raises(DetectorNotApplicable, match=r"the model-score function given takes no rows \(det, split, rows\)"):
        fit_detector("gram_stream", {}, tiny["banks"], tune=False, model_scores=two)


def test_gram_rows_float32_and_overflow_fall_back_to_float64() -> None:
    """The row sums without the [C, C] product equal the textbook Gram rows (float64 reference): to float32 precision
    normally, and exactly (float64) for a chunk whose p=5 products overflow float32."""
    from ood.detectors.gram import gram_rows

    def textbook(z: torch.Tensor) -> torch.Tensor:
        z = z.flatten(2).double()
        rows = [(z**p @ (z**p).transpose(1, 2)).sum(2) for p in range(1, 6)]
        return torch.stack([g.sign() * g.abs() ** (1 / p) for p, g in enumerate(rows, 1)], 1)

    z = torch.randn(6, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gram_rows(z), textbook(z), rtol=1e-5, atol=0)
    huge = z * 1e6  # z^10 * 16 overflows float32
    assert not torch.isfinite(huge.flatten(2) ** 5 @ (huge.flatten(2) ** 5).sum(1).unsqueeze(2)).all()
    torch.testing.assert_close(gram_rows(huge), textbook(huge), rtol=1e-12, atol=0)
    # a sample's rows do not depend on its batch: one overflowing neighbour redid the whole chunk in float64, so the
    # same image scored differently with another `data.eval_batch_size`
    mixed = gram_rows(torch.cat([z, huge[:1]]))
    assert torch.equal(mixed[:6], gram_rows(z)) and not torch.equal(mixed[:6], textbook(z))
    torch.testing.assert_close(mixed[6:], textbook(huge[:1]), rtol=1e-12, atol=0)


def test_rankfeat_equals_openood(tiny: dict[str, Any]) -> None:
    net = tiny["net"]

    def reference(x: torch.Tensor) -> torch.Tensor:
        def drop(feat: torch.Tensor) -> torch.Tensor:
            b, c, h, w = feat.size()
            feat = feat.view(b, c, h * w)
            u, s, v = torch.linalg.svd(feat, full_matrices=False)
            return (feat - s[:, 0:1].unsqueeze(2) * u[:, :, 0:1].bmm(v[:, 0:1, :])).view(b, c, h, w)

        with torch.no_grad():
            feat2 = net.stages.block1(x)
            feat1 = net.stages.block2(feat2)
            logits1 = net.fc(torch.flatten(F.adaptive_avg_pool2d(drop(feat1), 1), 1))
            logits2 = net.fc(torch.flatten(F.adaptive_avg_pool2d(net.stages.block2(drop(feat2)), 1), 1))
        return torch.logsumexp((logits1 + logits2) / 2, 1)

    det = _fitted("rankfeat", tiny)
    ours, refs = {s: _scores(det, tiny, s) for s in ("test", "ood")}, {s: reference(tiny["x"][s]) for s in ("test", "ood")}
    for split in ("test", "ood"):
        torch.testing.assert_close(ours[split].float(), refs[split], rtol=1e-4, atol=1e-4)
    _agrees(ours["test"], refs["test"], tiny, ours["ood"], refs["ood"])


def test_nac_equals_pytorch_ood(tiny: dict[str, Any]) -> None:
    """pytorch-ood NACUE: hooks on the stages, sigmoid(100 * mean(z * dL/dz)), geometric bins, coverage sums."""
    net, m, alpha, o_star = tiny["net"], 50, 100.0, 50
    layers = [net.stages.block1, net.stages.block2]
    left = torch.logspace(np.log10(1e-6), np.log10(0.5), m // 2 + 1)
    edges = torch.cat([left, (1.0 - left.flip(0))[1:]])

    def bins(x: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _m, _i, o: captured.append(o)) for layer in layers]
        p = torch.softmax(net(x), 1)
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad((-(torch.log(p + 1e-12)).mean(1)).sum(), captured)
        out = []
        for z, g in zip(captured, grads):
            z_hat = torch.sigmoid(alpha * (z * g).mean((2, 3))).detach().clamp(1e-6, 1 - 1e-6)
            out.append((torch.bucketize(z_hat, edges, right=False) - 1).clamp(0, m - 1))
        return out

    counts = [torch.zeros(n, m, dtype=torch.long) for n in (6, 100)]
    for idx, c in zip(bins(tiny["x"]["train"]), counts):
        c.view(-1).scatter_add_(0, (torch.arange(idx.shape[1]) * m + idx).flatten(), torch.ones(idx.numel(), dtype=torch.long))

    def reference(x: torch.Tensor) -> torch.Tensor:
        return sum(torch.clamp(c.gather(1, idx.T).T.float() / o_star, max=1.0).mean(1) for idx, c in zip(bins(x), counts))

    det = _fitted("nac", tiny)
    ours, ours_ood = _scores(det, tiny, "test"), _scores(det, tiny, "ood")
    ref, ref_ood = reference(tiny["x"]["test"]), reference(tiny["x"]["ood"])
    torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=1e-6)
    _agrees(ours, ref, tiny, ours_ood, ref_ood)


@pytest.mark.parametrize("name", ["adascale_a", "adascale_l"])
def test_adascale_equals_openood(name: str, tiny: dict[str, Any]) -> None:
    net, (lo, hi), k1, k2, lmbda, o = tiny["net"], (70, 90), 5, 1, 10, 0.05

    def passes(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        data = data.clone().requires_grad_(True)
        out = net.run(data)
        output, feature = out.logits, out.features
        labels = output.detach().argmax(1)
        output[torch.arange(len(labels)), labels].backward(torch.ones_like(labels, dtype=output.dtype))
        grad = data.grad.detach()
        b, c, h, w = data.shape
        abs_grad = abs(grad).view(b, c * h * w)
        idx = torch.topk(abs_grad, int(c * h * w * o), dim=1, largest=False)[1]
        mask = torch.zeros_like(abs_grad, dtype=torch.uint8).scatter_(1, idx, 1).view(b, c, h, w)
        with torch.no_grad():
            perturbed = net.run(data.detach() + grad.sign() * mask * 0.5).features
        feature = feature.detach()
        return feature, perturbed, abs(feature - perturbed)

    def q(feature: torch.Tensor, perturbed: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        d = feature.shape[1]
        top1 = torch.gather(torch.relu(perturbed), 1, torch.topk(feature, dim=1, k=int(d * k1 / 100))[1])
        top2 = torch.gather(shift, 1, torch.topk(feature, dim=1, k=int(d * k2 / 100))[1])
        return top1.sum(1) + lmbda * top2.sum(1)

    reference_q = np.sort(q(*passes(tiny["x"]["val"])).numpy())

    def reference(x: torch.Tensor) -> torch.Tensor:
        feature, perturbed, shift = passes(x)
        ecdf = np.searchsorted(reference_q, q(feature, perturbed, shift).numpy(), side="right") / len(reference_q)
        percentiles = torch.from_numpy(lo + (1 - ecdf) * (hi - lo))
        a = torch.relu(feature)
        n = a.shape[1]
        ks = n - torch.round(n * percentiles / 100.0).to(torch.int)
        values = torch.topk(a, int(ks.max()), dim=1)[0]
        keep = torch.arange(int(ks.max()))[None, :] < ks[:, None]
        scale = a.sum(1, keepdim=True) / (values * keep).sum(1, keepdim=True)
        if name == "adascale_l":
            logits = net.fc(feature) * scale**2.0
        else:
            logits = net.fc(feature * torch.exp(scale))
        return torch.logsumexp(logits.detach(), 1)

    det = _fitted(name, tiny, percentile=(lo, hi))
    ours, ours_ood = _scores(det, tiny, "test"), _scores(det, tiny, "ood")
    ref, ref_ood = reference(tiny["x"]["test"]), reference(tiny["x"]["ood"])
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-4, atol=1e-4)
    _agrees(ours, ref, tiny, ours_ood, ref_ood)


def test_model_fitted_detectors_fit_through_the_model_score_function(tiny: dict[str, Any]) -> None:
    """`fit_detector` runs their fit pass over the fit split (`FitInputs`) and refuses without a model."""
    det = build_detector("adascale_a")
    assert isinstance(det, ModelFitted)
    stats = _model_scores(tiny)(FitInputs(det), "val")
    assert stats.shape == (90,)
    with pytest.raises(DetectorNotApplicable, match="needs the model"):
        fit_detector("nac", {}, tiny["banks"], tune=False)


def _mcdropout_is_a_function_of_the_image(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mcdropout's scores of `x`, checked equal in batches of 3 and after other draws, the global RNG untouched."""
    det = build_detector("mcdropout")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    whole = det.score_inputs(net, x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    # the scores are log-probabilities near 0: float32 logits' rounding (batch-dependent in MKL's AVX2 kernels, 7e-8)
    # stays absolute there; a mask drawn per batch instead of per image moves them by > 1e-3 (the tests below)
    torch.testing.assert_close(torch.cat([det.score_inputs(net, c) for c in x.split(3)]), whole, rtol=1e-6, atol=1e-6)
    return whole


@pytest.mark.parametrize("fused", [True, False])
def test_mcdropout_masks_timm_attention_dropout_per_image(fused: bool) -> None:
    """A timm ViT with attention dropout only: its fused path hands the rate to `F.scaled_dot_product_attention` while
    the Attention module trains, which it did not under mcdropout (attention dropout silently off: MSP's scores),
    and the unfused path drew nothing but kept it on: the two paths gave different detectors. Now both drop the
    attention weights with the per-image masks and agree."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                            num_classes=3, attn_drop_rate=0.3).eval()
    for m in net.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    x = torch.randn(6, 3, 16, 16)
    ours = _mcdropout_is_a_function_of_the_image(net, x)
    assert not any(m.training for m in net.modules())
    for m in net.modules():  # the reference: the unfused path, its attention dropout masked per image
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
            m.attn_drop.training = True
    masks, keys, passes = ImageDropout(), image_keys(x), []
    with torch.no_grad():
        for t in range(5):
            with masks.active(keys, t):
                passes.append(net(x).double())
        msp = torch.log_softmax(net.eval()(x).double(), 1).max(1).values
    torch.testing.assert_close(ours, torch.log_softmax(sum(passes) / 5, 1).max(1).values, rtol=1e-5, atol=1e-7)
    assert (ours - msp).abs().max() > 1e-3


class _TranscribedAttention(nn.Module):
    """`nn.MultiheadAttention`'s forward for one batch-first input, transcribed: softmax(q k^T / sqrt(d)) v per head,
    the attention weights [B, heads, L, L] dropped by `F.dropout` in training mode (inside `ImageDropout.active`,
    the image's masks)."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, None]:
        a, (b, n, d) = self.attention, x.shape
        q, k, v = (t.reshape(b, n, a.num_heads, -1).transpose(1, 2) for t in F.linear(x, a.in_proj_weight, a.in_proj_bias).chunk(3, -1))
        weights = torch.softmax(q @ k.transpose(-2, -1) / (d // a.num_heads) ** 0.5, -1)
        return a.out_proj((F.dropout(weights, a.dropout, training=True) @ v).transpose(1, 2).reshape(b, n, d)), None


def test_mcdropout_masks_multihead_attention_without_weights_per_image() -> None:
    """torchvision's ViT calls `nn.MultiheadAttention` with `need_weights=False`, whose dropout goes to
    `F.scaled_dot_product_attention`'s `dropout_p`, drawn from the global RNG: an image's score depended on the seed
    and its batch. Now it is masked per image: the scores are those of the attention transcribed by hand with the
    per-image masks on its weights."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                            attention_dropout=0.3, num_classes=3).eval()
    nn.init.normal_(net.heads.head.weight)  # torchvision starts the head at zero: constant scores
    x = torch.randn(6, 3, 16, 16)
    ours = _mcdropout_is_a_function_of_the_image(net, x)
    reference = copy.deepcopy(net)
    block = reference.encoder.layers[0]
    block.self_attention = _TranscribedAttention(block.self_attention)
    masks, keys, passes = ImageDropout(), image_keys(x), []
    with torch.no_grad():
        for t in range(5):
            with masks.active(keys, t):
                passes.append(reference(x).double())
        msp = torch.log_softmax(net(x).double(), 1).max(1).values
    torch.testing.assert_close(ours, torch.log_softmax(sum(passes) / 5, 1).max(1).values, rtol=1e-5, atol=1e-7)
    assert (ours - msp).abs().max() > 1e-3


def test_mcdropout_leaves_stochastic_depth_off() -> None:
    """torchvision's `StochasticDepth` names its rate `p`, so mcdropout switched it on (EfficientNet, ConvNeXt): whole
    residual branches dropped with draws from the global RNG, an image's score depending on the seed and its batch.
    Stochastic depth is not dropout: off, and only the Dropout samples."""
    from torchvision.ops import StochasticDepth

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.depth = nn.Conv2d(3, 3, 3, padding=1), StochasticDepth(0.5, "row")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.depth(self.conv(x))

    torch.manual_seed(0)
    net = nn.Sequential(Residual(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(3 * 8 * 8, 3)).eval()
    x = torch.randn(6, 3, 8, 8)
    ours = _mcdropout_is_a_function_of_the_image(net, x)
    net[2].train()  # the reference: the Dropout alone trains, the residual branch always kept
    masks, keys, passes = ImageDropout(), image_keys(x), []
    with torch.no_grad():
        for t in range(5):
            with masks.active(keys, t):
                passes.append(net(x).double())
    torch.testing.assert_close(ours, torch.log_softmax(sum(passes) / 5, 1).max(1).values)
