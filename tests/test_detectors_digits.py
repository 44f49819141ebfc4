"""Every detector on a real (tiny) network: one seeded digits training run, then fit/tune/score from its cache.

Floors are per detector, about 0.05-0.1 below the lowest AUROC measured over runs of this seeded training (BLAS
thread scheduling moves it a little; DICE and NNGuide, with 10% of the weights and 6 guide samples, move most),
so a sign flip, a collapse to 0.5 or a broken fit fails CI, while harmless numerical drift does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, compose_config

from ood.data.benchmark import OODDataModule
from ood.detectors import available_detectors, detector_class
from ood.detectors.network import LayerTaps
from ood.evaluation.callback import OODEvaluation
from ood.evaluation.scoring import detector_scorers, evaluate
from ood.features.bank import FeatureBank
from ood.methods.base import OODMethod
from ood.train import build

#: ODIN keeps its defaults here (its tuning is unit-tested), so does odin_energy_ood (ODIN over energy_ood's 40-point
#: grid); every other detector is tuned on its grid
PARAMS: dict[str, dict[str, Any]] = {name: {"temperature": 1000, "noise": 0.0014} for name in ("odin", "odin_energy_ood")}

NEAR, FLOWER, GAUSS = "digits_6_9", "flower_patches", "gaussian_noise"
#: detector -> (OOD set, AUROC floor); the set is one where the detector works on this small network
#: (e.g. SCALE's rescaling inverts near-OOD ranking at D=64, DICE and SHE fail on flower patches)
FLOORS: dict[str, tuple[str, float]] = {
    "msp": (NEAR, 0.9), "maxlogit": (NEAR, 0.9), "energy": (NEAR, 0.9), "entropy": (NEAR, 0.9),
    "tempscale": (NEAR, 0.9), "gen": (NEAR, 0.9), "klm": (NEAR, 0.88), "odin": (NEAR, 0.9), "odin_energy_ood": (NEAR, 0.9),
    "oe_xent": (NEAR, 0.87), "mahalanobis": (FLOWER, 0.95), "gem": (FLOWER, 0.95), "rmds": (NEAR, 0.93), "vim": (FLOWER, 0.95), "knn": (NEAR, 0.9),
    "nnguide": (NEAR, 0.7), "react": (FLOWER, 0.9), "ash": (NEAR, 0.85), "ash_s": (FLOWER, 0.85), "ash_p": (NEAR, 0.85), "dice": (NEAR, 0.7),
    "scale": (FLOWER, 0.93), "she": (NEAR, 0.85), "gradnorm": (NEAR, 0.9), "fdbd": (GAUSS, 0.9), "nci": (NEAR, 0.9),
    "residual": (FLOWER, 0.95), "relation": (NEAR, 0.88), "vra": (FLOWER, 0.9), "cfood": (NEAR, 0.9),
    "openmax": (NEAR, 0.85), "gmm": (NEAR, 0.9), "lts": (FLOWER, 0.9), "pnml": (NEAR, 0.9),
    "cadref": (NEAR, 0.9), "caref": (NEAR, 0.9), "graduncertainty": (NEAR, 0.9), "rmds_pp": (NEAR, 0.9),
    "weiper": (NEAR, 0.8), "mahalanobis_pp": (FLOWER, 0.93), "neco": (FLOWER, 0.93),
    "adascale_a": (FLOWER, 0.9), "adascale_l": (FLOWER, 0.9), "iodin": (NEAR, 0.9), "gram": (FLOWER, 0.95), "gram_stream": (FLOWER, 0.95),
    "gram_v15": (FLOWER, 0.95),
    "mahalanobis_odin": (FLOWER, 0.95), "mds_ensemble": (FLOWER, 0.95), "nac": (GAUSS, 0.8), "rankfeat": (GAUSS, 0.7),
    "combood": (NEAR, 0.93), "otod": (NEAR, 0.85), "optfs": (NEAR, 0.86),
    "line": (FLOWER, 0.93),
    "bats": (FLOWER, 0.85),
    "ddu": (NEAR, 0.92),
}
#: the small CNN has no dropout: mcdropout is skipped there (its documented `DetectorNotApplicable`)
REPORTED = [n for n in available_detectors() if n != "mcdropout"]


def cache_banks(method: OODMethod, datamodule: OODDataModule) -> dict[str, FeatureBank]:
    """One forward pass per evaluation split, as the callback caches it (single process), with the layer taps the
    detectors declare (gram's Gram rows, mds_ensemble's stage means) in `extras`."""
    weight, bias = method.backbone.fc.weight.detach(), method.backbone.fc.bias.detach()
    banks = {}
    method.eval()
    taps = LayerTaps(method, available_detectors())
    with torch.no_grad():
        for split, loader in zip(datamodule.eval_splits, datamodule.test_dataloader()):
            outs = [method.eval_outputs(b.x, split) | taps.pop() | {"labels": b.y} for b in loader]
            cat = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
            labelled = split.role in ("fit", "id_val", "id_test")
            extras = {k: v for k, v in cat.items() if k not in ("logits", "features", "labels")}
            banks[split.name] = FeatureBank(cat["logits"], cat["features"], cat["labels"] if labelled else None, weight, bias,
                                            extras=extras)
    taps.remove()
    return banks


@pytest.fixture(scope="module")
def digits_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    cfg = compose_config(Path(tmp_path_factory.mktemp("digits")), [*FAST, "detectors=none", "logger=none", "callbacks=none"])
    method, datamodule, trainer, _ = build(cfg)
    trainer.fit(method, datamodule=datamodule)
    banks = cache_banks(method, datamodule)
    loaders = dict(zip([s.name for s in datamodule.eval_splits], datamodule.test_dataloader()))
    scorers = detector_scorers(
        available_detectors(), PARAMS, banks, tune=True,
        model_scores=lambda det, split, rows=None: OODEvaluation._model_scores(det, method, loaders[split], rows=rows),
    )
    id_acc = float((banks["test"].predictions == banks["test"].labels).double().mean())
    rows, _ = evaluate(scorers, datamodule.eval_splits, id_acc, {"method": "ce"})
    return rows


@pytest.mark.slow
def test_every_detector_is_reported_with_its_hyperparameters(digits_rows: list[dict[str, Any]]) -> None:
    assert {r["detector"] for r in digits_rows} == set(REPORTED)
    for row in digits_rows:
        tunable = set(detector_class(row["detector"]).grid) - set(PARAMS.get(row["detector"], {}))
        assert row["tuned"] == any(len(detector_class(row["detector"]).grid[k]) > 1 for k in tunable)
        assert set(detector_class(row["detector"]).grid) <= set(row["detector_params"])


@pytest.mark.slow
@pytest.mark.parametrize("name", REPORTED)
def test_digits_auroc_floor(name: str, digits_rows: list[dict[str, Any]]) -> None:
    assert name in FLOORS, f"new detector {name}: add its digits AUROC floor to FLOORS"
    ood_set, floor = FLOORS[name]
    row = next(r for r in digits_rows if r["detector"] == name and r["ood_dataset"] == ood_set)
    assert row["auroc"] >= floor, f"{name} on {ood_set}: AUROC {row['auroc']:.3f} < floor {floor}"

