"""GROOD (`method=grood`): closed-form gradient, prototypes, mix-up, bank, DDP-exact sums, digits end to end."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FAST, NO_FIGURES, rows_by, run_config
from torchvision.transforms.functional import gaussian_blur

from ood.data.batch import Batch
from ood.data.benchmark import EvalSplit
from ood.data.fit import FitData
from ood.detectors.mahalanobis import class_means
from ood.errors import ConfigError
from ood.features.bank import FeatureBank
from ood.methods.ce import CrossEntropy
from ood.methods.grood import GROOD, ncp_gradient
from ood.models import ResNet18_32x32, SmallCNN, WideResNet

C, B = 3, 8  # classes and evaluation batch size of the hand-built runs


def _model(**kwargs: object) -> GROOD:
    torch.manual_seed(0)
    kwargs.setdefault("proto_batch_size", B)
    model = GROOD(
        SmallCNN(num_classes=C, width=4, feature_dim=8), optimizer=partial(torch.optim.SGD, lr=0.1), **kwargs
    )
    return model.eval()


def _evaluate(
    model: GROOD, splits: Mapping[str, tuple[str, torch.Tensor, torch.Tensor]]
) -> dict[str, FeatureBank]:
    """Drive `test_step` over `splits` (name -> (role, x, y)) in batches of B as the callback does; run setup."""
    roles = [EvalSplit(name, role) for name, (role, _, _) in splits.items()]
    model.begin_evaluation(roles)  # what the evaluation callback gives the method before the pass
    banks = {}
    with torch.no_grad():
        for i, (name, (role, x, y)) in enumerate(splits.items()):
            outs = [
                model.test_step(Batch(xb, yb, ib), j, i)
                for j, (xb, yb, ib) in enumerate(zip(x.split(B), y.split(B), torch.arange(len(x)).split(B)))
            ]
            cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
            labels = cat["labels"] if role != "ood_val" else None
            banks[name] = FeatureBank(cat["logits"], cat["features"], labels, index=cat["index"])
        model.setup_ood(banks)
    return banks


def _data(n: int = 30, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=gen), torch.arange(n) % C


# ----- closed-form gradient ----------------------------------------------------------------------------------
def test_closed_form_gradient_equals_autograd_and_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    h, protos = (
        torch.randn(6, 5, generator=gen, dtype=torch.float64),
        torch.randn(C + 1, 5, generator=gen, dtype=torch.float64),
    )
    closed = ncp_gradient(h, protos)

    def loss(p_ood: torch.Tensor, i: int, y_hat: int) -> torch.Tensor:
        s = -(h[i] - torch.cat([protos[:-1], p_ood[None]])).norm(dim=1)
        return F.cross_entropy(s[None], torch.tensor([y_hat]))

    for y_hat in range(C):
        for i in range(len(h)):
            p = protos[-1].clone().requires_grad_(True)
            (auto,) = torch.autograd.grad(loss(p, i, y_hat), p)
            torch.testing.assert_close(closed[i], auto, atol=1e-12, rtol=0)  # float64, gradients below 1: rounding
            eps = 1e-6
            fd = torch.stack(
                [
                    (loss(protos[-1] + eps * e, i, y_hat) - loss(protos[-1] - eps * e, i, y_hat)) / (2 * eps)
                    for e in torch.eye(5, dtype=torch.float64)
                ]
            )
            # central differences at eps 1e-6 in float64: rounding 1e-16 / 1e-6 and truncation eps^2 (measured 3e-10)
            torch.testing.assert_close(closed[i], fd, atol=1e-8, rtol=0)


def test_gradient_norm_is_q_ood_and_direction_is_unit_h_minus_p_ood() -> None:
    gen = torch.Generator().manual_seed(1)
    h, protos = (
        torch.randn(20, 7, generator=gen, dtype=torch.float64),
        torch.randn(C + 1, 7, generator=gen, dtype=torch.float64),
    )
    grads = ncp_gradient(h, protos)
    dist = ((h[:, None, :] - protos[None]) ** 2).sum(2).sqrt()
    q_ood = torch.softmax(-dist, 1)[:, -1]
    torch.testing.assert_close(grads.norm(dim=1), q_ood, atol=1e-12, rtol=0)
    assert ((q_ood > 0) & (q_ood < 1)).all()
    diff = h - protos[-1]
    torch.testing.assert_close(grads / grads.norm(dim=1, keepdim=True), diff / diff.norm(dim=1, keepdim=True))


# ----- backbone and prototypes -------------------------------------------------------------------------------
def test_forward_from_reproduces_features_at_every_stage() -> None:
    net = _model().backbone
    x, _ = _data(5)
    with torch.no_grad():
        h, layers = net.features(x, net.layer_names)
        for name in net.layer_names:
            torch.testing.assert_close(net.forward_from(name, layers[name]), h, atol=0, rtol=0)


def test_state_dict_equals_ce_and_default_mix_layer_is_first_stage() -> None:
    model = _model()
    ce = CrossEntropy(
        SmallCNN(num_classes=C, width=4, feature_dim=8), optimizer=partial(torch.optim.SGD, lr=0.1)
    )
    assert model.state_dict().keys() == ce.state_dict().keys()
    assert model.mix_layer == "block1"
    assert {
        "ood_proto_source",
        "mix_layer",
        "mix_lambda",
        "n_proto",
        "k",
        "correct_only",
        "score",
        "index",
    } <= set(model.hparams)


def test_prototypes_are_class_means_and_prediction_is_nearest_prototype() -> None:
    model = _model()
    x, y = _data(30)
    banks = _evaluate(model, {"train": ("fit", x, y), "test": ("id_test", x[:10], y[:10])})
    with torch.no_grad():
        h, layers = model.backbone.features(x, ["block1"])
    summary = model.fit_summary()
    torch.testing.assert_close(summary.class_prototypes, class_means(h, y, C).float())
    early = torch.stack([layers["block1"][y == c].mean(0) for c in range(C)])
    torch.testing.assert_close(summary.early_prototypes, early)
    torch.testing.assert_close(model.prototypes[:C], summary.class_prototypes)
    expected = ((h[:10, None, :] - summary.class_prototypes[None]) ** 2).sum(2).argmin(1)
    assert torch.equal(model.predict(banks["test"]), expected)


def test_mixup_at_lambda_one_gives_mean_feature_of_the_kept_whole_batches() -> None:
    model = _model(mix_lambda=1.0, n_proto=10)  # 10 rounded up to whole batches of 8 -> the first 16 images
    x, y = _data(30)
    _evaluate(model, {"train": ("fit", x, y)})
    with torch.no_grad():
        h = model.backbone.features(x[:16])[0]
    torch.testing.assert_close(model.prototypes[-1], h.mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make", [partial(ResNet18_32x32, C), partial(WideResNet, C, depth=10, widen_factor=1)]
)
def test_mixup_on_cifar_backbones_uses_the_stage_after_the_stem(make: partial) -> None:
    torch.manual_seed(0)
    model = GROOD(make(), optimizer=partial(torch.optim.SGD, lr=0.1), mix_lambda=1.0, n_proto=3, proto_batch_size=B).eval()
    assert model.mix_layer == model.backbone.layer_names[1] != "stem"
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    _evaluate(model, {"train": ("fit", x, torch.arange(12) % C)})
    with torch.no_grad():
        h = model.backbone.features(x[:8])[0]
    torch.testing.assert_close(model.prototypes[-1], h.mean(0), atol=1e-5, rtol=0)


def test_mixup_uses_second_most_likely_class_prototype() -> None:
    model = _model(mix_lambda=0.5, n_proto=8)
    x, y = _data(30)
    banks = _evaluate(model, {"train": ("fit", x, y)})
    summary = model.fit_summary()
    with torch.no_grad():
        z = model.backbone.features(x[:8], ["block1"])[1]["block1"]
        second = banks["train"].logits[:8].topk(2, dim=1).indices[:, 1]
        h = model.backbone.forward_from("block1", 0.5 * z + 0.5 * summary.early_prototypes[second])
    torch.testing.assert_close(model.prototypes[-1], h.mean(0), atol=1e-6, rtol=0)


def test_other_prototype_sources() -> None:
    x, y = _data(30)
    mean = _model(ood_proto_source="proto_mean")
    _evaluate(mean, {"train": ("fit", x, y)})
    torch.testing.assert_close(mean.prototypes[-1], mean.prototypes[:C].mean(0))

    noise = _model(
        ood_proto_source="uniform_noise", n_proto=150
    )  # 2 batches of 100 noise images, 10 kept of each
    _evaluate(noise, {"train": ("fit", x, y)})
    # reference selection, written independently: the same seeded noise (docs/methods/grood.md: blurred U[0,1], kernel 5x7,
    # sigma ~ U[0.2, 5] per 100), and of each 100 the 10 rows with the lowest logsumexp, found by a full argsort
    gen = torch.Generator().manual_seed(0)
    expected = []
    with torch.no_grad():
        for _ in range(2):
            images = torch.rand((100, 1, 16, 16), generator=gen)
            sigma = float(torch.empty(()).uniform_(0.2, 5.0, generator=gen))
            out = noise.backbone.run(gaussian_blur(images, [5, 7], [sigma, sigma]))
            lowest = out.logits.logsumexp(1).argsort()[:10]
            expected.append(out.features[lowest])
    expected_features = torch.cat(expected)
    assert expected_features.shape == (20, 8)
    # float32 means of 20 rows below 5e-3 (ulps of 5e-10; measured equal)
    torch.testing.assert_close(noise.prototypes[-1], expected_features.mean(0), atol=1e-8, rtol=0)


def test_fitted_without_a_trainer_leaves_the_global_rng_and_modes() -> None:
    """GROOD fits post hoc from the evaluation pass alone (splits given by `begin_evaluation`, no Trainer); its
    noise-prototype pass (the shared `forward_dataset`) leaves the global random stream and the train/eval modes
    as they were."""
    x, y = _data(30)
    model = _model(ood_proto_source="uniform_noise", n_proto=100).train()
    first = next(iter(model.backbone.stages.values()))
    first.eval()
    assert model._trainer is None
    torch.manual_seed(4)
    banks = _evaluate(model, {"train": ("fit", x, y)})
    drawn = torch.rand(3)
    torch.manual_seed(4)
    assert torch.equal(drawn, torch.rand(3))
    assert model.training and model.backbone.training and not first.training
    assert bool((model.ood_score(banks["train"]) <= 0).all())  # minus a squared distance


class _Recording(dict):
    """A dict of banks that records which splits were read."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> FeatureBank:
        self.read.add(key)
        return super().__getitem__(key)


def test_val_ood_prototype_reads_only_the_val_ood_split() -> None:
    model = _model(ood_proto_source="val_ood", n_proto=5)
    x, y = _data(30)
    x_ood = _data(20, seed=7)[0] * 3
    banks = _evaluate(model, {"train": ("fit", x, y), "val_ood": ("ood_val", x_ood, torch.full((20,), -1))})
    recording = _Recording(banks)
    p_ood = model.ood_prototype(recording, model.fit_summary())
    assert recording.read == {"val_ood"}
    with torch.no_grad():
        expected = model.backbone.features(x_ood[:8])[0].mean(0)  # 5 rounded up to one batch of 8
    torch.testing.assert_close(p_ood.float(), expected, atol=1e-6, rtol=0)



def test_val_ood_prototype_without_a_val_ood_set_is_refused_at_fit_start() -> None:
    """`prepare` (fit start, before training) refuses the val_ood source on a benchmark without validation OOD; with
    one it passes."""
    def fit_data(*names: str) -> FitData:
        return FitData(datasets={n: torch.zeros(1) for n in names}, benchmark="b", num_classes=C, seed=0, batch_size=8,
                       eval_batch_size=8)

    with pytest.raises(ConfigError, match=r"ood_proto_source=val_ood needs .* validation-OOD set .*\+data.ood.val="):
        _model(ood_proto_source="val_ood").prepare(fit_data("train", "test"))
    _model(ood_proto_source="val_ood").prepare(fit_data("train", "test", "val_ood"))
    _model().prepare(fit_data("train", "test"))

# ----- bank and score ----------------------------------------------------------------------------------------
def _train_with_mixed_correctness(model: GROOD) -> tuple[dict[str, FeatureBank], torch.Tensor]:
    """A train split labelled with the model's own prediction on even rows and a wrong class on odd rows."""
    x, _ = _data(30)
    with torch.no_grad():
        pred = model.backbone(x).argmax(1)
    rows = torch.arange(30)
    y = torch.where(rows % 2 == 0, pred, (pred + 1 + (rows // 2) % 2) % C)
    return _evaluate(model, {"train": ("fit", x, y), "test": ("id_test", x, y)}), y == pred


@pytest.mark.parametrize("correct_only", [True, False])
def test_bank_holds_correct_samples_and_members_score_exactly_zero(correct_only: bool) -> None:
    model = _model(correct_only=correct_only)
    banks, correct = _train_with_mixed_correctness(model)
    assert model.bank_index is not None
    assert model.bank_index.ntotal == (int(correct.sum()) if correct_only else 30)
    scores = model.ood_score(banks["test"])
    assert (scores <= 0).all()
    members = correct if correct_only else torch.ones(30, dtype=torch.bool)
    assert torch.equal(scores[members], torch.zeros(int(members.sum())))
    if correct_only:
        assert (scores[~correct] < 0).all()


def test_a_bank_with_no_correct_sample_is_one_line() -> None:
    """Every training label wrong (e.g. a model trained with another class order): one line naming the fix."""
    model = _model()
    banks, correct = _train_with_mixed_correctness(model)
    wrong = banks["train"].subset(~correct)
    with pytest.raises(ConfigError, match=rf"grood: none of the {int((~correct).sum())} training images is classified "
                                          "correctly, so its gradient bank .* is empty"):
        model._build_index(wrong, B)


def test_a_class_missing_from_the_fit_split_is_one_line() -> None:
    """A class without a fit image (a small data.fit_fraction, or a model with more classes than the data) has no
    prototype: a one-line ConfigError naming the classes and the fix, not a ValueError traceback after training."""
    x, y = _data(30)
    with pytest.raises(ConfigError, match=r"grood: 1 of the 3 classes have no training image in the fit split \(first: "
                                          r"\[2\]\), so they have no prototype; use data.fit_fraction=1.0"):
        _evaluate(_model(), {"train": ("fit", x, y % 2), "test": ("id_test", x, y)})


def test_kth_neighbour_and_grad_norm_scores() -> None:
    model = _model(k=3)
    banks, correct = _train_with_mixed_correctness(model)
    grads = model.gradients(banks["test"])
    bank = grads[correct]
    d2 = torch.cdist(grads.double(), bank.double()) ** 2
    torch.testing.assert_close(
        model.ood_score(banks["test"]).double(), -d2.sort(1).values[:, 2], atol=1e-5, rtol=0
    )
    norm = _model(score="grad_norm")
    banks, _ = _train_with_mixed_correctness(norm)
    torch.testing.assert_close(norm.ood_score(banks["test"]), -norm.gradients(banks["test"]).abs().sum(1))
    assert norm.bank_index is None


def test_ivf_as_released_with_all_cells_probed_equals_exact_on_the_kept_bank() -> None:
    x, y = _data(40)
    exact = _model(correct_only=False)
    ivf = _model(correct_only=False, index="ivf_as_released", nprobe=1000)
    for model in (exact, ivf):
        banks = _evaluate(model, {"train": ("fit", x, y)})
    # 5 batches of 8: T = int(0.8 * 5) = 4, so the released code drops the gradients of rows 32..39
    assert ivf.bank_index.ntotal == 32
    grads = ivf.gradients(banks["train"])
    d2 = torch.cdist(grads.double(), grads[:32].double()) ** 2
    torch.testing.assert_close(ivf.ood_score(banks["train"]).double(), -d2.min(1).values, atol=1e-5, rtol=0)
    assert torch.equal(exact.ood_score(banks["train"]), torch.zeros(40))


def _released_grood(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, queries: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """OpenOOD's `GrOODPostprocessor` (openood/postprocessors/grood.py, use_proto_mean, autograd gradients),
    transcribed on batches of B: running-mean prototypes (update_prototype), the OOD prototype as their mean
    (get_prototype_mean), per-sample autograd of CE(-||h - P||, argmax logits) w.r.t. p_ood for the correctly
    classified rows (_compute_grad), faiss IVF-Flat with T = min(600, int(0.8 * batches)) training batches, batch T
    dropped (index_grads; every cell probed here, so the search is exact), score -dist[:, -1] of the 1-NN and the
    NCC prediction (postprocess). Returns (scores, predictions, index size)."""
    import faiss

    batches = list(zip(x.split(B), y.split(B)))
    protos, count = torch.zeros(C, net.feature_dim), torch.zeros(C, dtype=torch.long)
    for xb, yb in batches:
        feats = net.features(xb)[0]
        for cl in yb.unique():
            m = yb == cl
            protos[cl] = (feats[m].sum(0) + count[cl] * protos[cl]) / (count[cl] + m.sum())
            count[cl] += m.sum()
    noise = protos.clone().mean(0).view(-1)

    def grads(data: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        p_ood = noise.clone().requires_grad_(True)
        with torch.enable_grad():
            feats, logits = net.features(data)[0], net(data)
            pseudo = logits.argmax(1)
            prototypes = torch.cat([protos, p_ood.view(1, -1)])
            ncc = -torch.norm(feats.reshape(len(data), 1, -1).detach() - prototypes, dim=2)
            loss = F.cross_entropy(ncc, pseudo, reduction="none")
            out = [torch.autograd.grad(loss[i], [p_ood], retain_graph=True)[0].view(1, -1)
                   for i in range(len(data)) if labels is None or labels[i] == pseudo[i]]
        return torch.cat(out), ncc[:, :-1].argmax(1)

    n_samples = len(batches)
    t = min(600, int(n_samples * 0.8))
    nlist = int(4 * math.sqrt(t))
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(net.feature_dim), net.feature_dim, nlist, faiss.METRIC_L2)
    kept, trained = [], False
    for idx, batch in enumerate(batches):
        g = grads(*batch)[0].numpy()
        if trained:
            index.add(g)
        elif idx >= t:
            everything = np.concatenate(kept)
            index.train(everything)
            index.add(everything)
            trained = True
        else:
            kept.append(g)
    index.nprobe = nlist
    g, pred = grads(queries, None)
    dists, _ = index.search(g.numpy(), 1)
    return torch.from_numpy(-dists[:, -1]), pred, index.ntotal


def test_score_and_prediction_equal_the_released_postprocessor_transcribed() -> None:
    """End to end against an independent transcription of the released code (`_released_grood`): the same kept
    bank, scores and NCC predictions (`index: ivf_as_released`, every cell probed; `proto_mean` OOD prototype)."""
    model = _model(ood_proto_source="proto_mean", index="ivf_as_released", nprobe=1000)
    x, _ = _data(40)
    with torch.no_grad():
        pred = model.backbone(x).argmax(1)
    rows = torch.arange(40)
    y = torch.where(rows % 3 == 0, (rows // 3) % C, pred)  # every class present; a wrong label is not banked
    queries, _ = _data(12, seed=7)
    banks = _evaluate(model, {"train": ("fit", x, y), "test": ("id_test", queries, torch.zeros(12, dtype=torch.long))})
    scores, predictions, ntotal = _released_grood(model.backbone, x, y, queries)
    assert model.bank_index.ntotal == ntotal == int((y == pred)[:32].sum())
    torch.testing.assert_close(model.ood_score(banks["test"]), scores, atol=1e-5, rtol=0)
    assert torch.equal(model.predict(banks["test"]), predictions)


# ----- end to end on digits ----------------------------------------------------------------------------------
#: no test here reads a figure
QUIET = ["detectors.names=[msp,knn,mahalanobis]", NO_FIGURES]


@pytest.mark.slow
def test_digits_run_and_eval_from_checkpoint(tmp_path: Path) -> None:
    rows = run_config(tmp_path / "train", ["method=grood", *FAST, *QUIET, "seed=0"])
    grood = rows_by(rows, "grood")
    assert set(grood) == {"digits_6_9", "flower_patches", "gaussian_noise", "uniform_noise"}
    assert sum(r["auroc"] for r in grood.values()) / 4 >= 0.8
    assert grood["digits_6_9"]["auroc"] >= 0.9
    assert all(
        r["method"] == "grood" and r["method_params"]["ood_proto_source"] == "synthetic_mixup" for r in rows
    )

    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    again = run_config(
        tmp_path / "eval", ["method=grood", f"ckpt_path={ckpt}", *QUIET, "seed=0"], config_name="eval"
    )
    assert [(r["ood_dataset"], r["auroc"], r["fpr95"]) for r in again if r["detector"] == "grood"] == [
        (r["ood_dataset"], r["auroc"], r["fpr95"]) for r in rows if r["detector"] == "grood"
    ]
    val_ood = run_config(
        tmp_path / "val_ood",
        ["method=grood", "method.ood_proto_source=val_ood", f"ckpt_path={ckpt}", "detectors=none", NO_FIGURES, "seed=0"],
        config_name="eval",
    )
    assert sum(r["auroc"] for r in rows_by(val_ood, "grood").values()) / 4 >= 0.8


def test_fit_split_sums_of_bf16_maps_are_accumulated_in_float32() -> None:
    """Under `trainer=gpu_fast` the cached early maps are bf16; summed in bf16, 5,000 values of 0.7 stop at 256.
    The class prototypes are the exact means of the bf16 values."""
    from ood.methods.grood import FitSplitStats

    stats = FitSplitStats(num_classes=2, input_shape=(1, 2, 2), n_proto=4, batch_size=500)
    value = torch.tensor(0.7, dtype=torch.bfloat16)  # 0.69921875
    for start in range(0, 10_000, 500):
        index = torch.arange(start, start + 500)
        stats.update(index, index % 2, torch.full((500, 1, 2, 2), float(value), dtype=torch.bfloat16),
                     torch.ones(500, 3), torch.zeros(500, 2, dtype=torch.bfloat16))
    summary = stats.summary()
    assert summary.counts.tolist() == [5000, 5000]
    assert torch.equal(summary.early_prototypes, torch.full((2, 1, 2, 2), float(value)))
    assert summary.class_prototypes.dtype == torch.float32 and torch.equal(summary.class_prototypes, torch.ones(2, 3))
