"""Every detector's default hyper-parameters and tuning grid against the reference file its module names, the values
transcribed here with that file and line: OpenOOD v1.5's `configs/postprocessors/<key>.yml` (Jingkang50/OpenOOD,
`postprocessor_args` = defaults, `postprocessor_sweep` = grid, searched only where `APS_mode` is true) or, for the
detectors OpenOOD lacks, the code the module follows. A value that differs from its reference is asserted as the
deviation its module docstring states, with the reference's value beside it. Class attributes only: no data, no fit.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import ood.detectors.cfood as cfood_module
from ood.detectors import available_detectors, detector_class
from ood.detectors.base import relative_count
from ood.evaluation.scoring import sweep_order

#: OpenOOD v1.5 yml (file:line of the values) -> (our name, our defaults, our grid); names mapped to ours (`K` -> `k`,
#: `dropout_times` -> `samples`, `<x>_list` -> `<x>`); hyper-parameters with no counterpart here are left out
OPENOOD: dict[str, tuple[str, dict[str, Any], dict[str, list[Any]]]] = {
    # ebo.yml:5 temperature: 1; :7 temperature_list: [1]
    "ebo.yml": ("energy", {"temperature": 1}, {"temperature": [1]}),
    # gen.yml:5-6 gamma: 0.1, M: 100; :8-9 gamma_list, M_list
    "gen.yml": ("gen", {"gamma": 0.1, "M": 100}, {"gamma": [0.01, 0.1, 0.5, 1, 2, 5, 10], "M": [10, 50, 100, 200, 500, 1000]}),
    # odin.yml / iodin.yml:5-6 temperature: 1000, noise: 0.0014; :8-9 the sweep
    "odin.yml": ("odin", {"temperature": 1000, "noise": 0.0014}, {"temperature": [1, 10, 100, 1000], "noise": [0.0014, 0.0028]}),
    "iodin.yml": ("iodin", {"temperature": 1000, "noise": 0.0014}, {"temperature": [1, 10, 100, 1000], "noise": [0.0014, 0.0028]}),
    # knn.yml:5 K: 50; :7 K_list
    "knn.yml": ("knn", {"k": 50}, {"k": [50, 100, 200, 500, 1000]}),
    # nnguide.yml:5-6 alpha: 0.01, K: 100; :8-9 K_list: [100], alpha_list: [0.01] (APS_mode: False, one point)
    "nnguide.yml": ("nnguide", {"k": 100, "alpha": 0.01}, {"k": [100], "alpha": [0.01]}),
    # nci.yml:5 alpha: 0.0001; :7 alpha_list
    "nci.yml": ("nci", {"alpha": 0.0001}, {"alpha": [0.0001, 0.001, 0.01, 0.1]}),
    # fdbd.yml:5 distance_as_normalizer: True; :7 [True, False]
    "fdbd.yml": ("fdbd", {"distance_as_normalizer": True}, {"distance_as_normalizer": [True, False]}),
    # relation.yml:5 pow: 1; :7 pow_list
    "relation.yml": ("relation", {"pow": 1}, {"pow": [1, 2, 4, 6, 8]}),
    # react.yml:5 percentile: 90; :7 percentile_list
    "react.yml": ("react", {"percentile": 90}, {"percentile": [85, 90, 95, 99]}),
    # ash.yml:5 percentile: 90; :7 percentile_list
    "ash.yml": ("ash", {"percentile": 90}, {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    # scale.yml:5 percentile: 85; :7 percentile_list
    "scale.yml": ("scale", {"percentile": 85}, {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    # dice.yml:5 p: 90; :7 p_list: [90]
    "dice.yml": ("dice", {"p": 90}, {"p": [90]}),
    # vra.yml:5-6 percentile_high: 90, percentile_low: 10; :8-9 the two lists
    "vra.yml": ("vra", {"percentile_high": 90, "percentile_low": 10},
                {"percentile_high": [85, 90, 95, 99], "percentile_low": [1, 5, 10, 15]}),
    # mds_ensemble.yml:5 noise: 0.0014; :10 noise_list: [0.0014] (one point: no grid here)
    "mds_ensemble.yml": ("mds_ensemble", {"noise": 0.0014}, {}),
    # rankfeat.yml:6 temperature: 1 (APS_mode: False)
    "rankfeat.yml": ("rankfeat", {"temperature": 1}, {}),
    # dropout.yml:6 dropout_times: 5 (APS_mode: False; its dropout_p: 0.5 is the network's, unread by the postprocessor)
    "dropout.yml": ("mcdropout", {"samples": 5}, {}),
    # gmm.yml:11,14 the last (weight 1, :13) layer's 50 clusters and pca_50; no sweep
    "gmm.yml": ("gmm", {"num_clusters": 50, "reduce_dim": 50}, {}),
    # cfood.yml:8-9 alpha: 0.1, k: 0.01; :15-29 the sweep list (APS_mode: false in OpenOOD; tuned here, stated)
    "cfood.yml": ("cfood", {"alpha": 0.1, "k": 0.01},
                  {"alpha": [0.1, 0.5, 1.0], "k": [0.001, 0.005, 0.01, 0.05]}),
}
#: adascale_a.yml / adascale_l.yml:5-10 and :12 (36 pairs), k1..o_list single values
ADASCALE_ARGS = {"num_samples": 5000, "percentile": (75, 85), "k1": 5, "k2": 1, "lmbda": 10, "o": 0.05}
ADASCALE_PAIRS = [(lo, hi) for lo in (60, 65, 70, 75, 80, 85, 90, 95) for hi in (65, 70, 75, 80, 85, 90, 95, 99) if lo < hi]


def _defaults(cls: type) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def _same(ours: Any, theirs: Any) -> bool:
    """Equal values and, for booleans, equal types (True == 1 would hide a flag set to a number)."""
    return ours == theirs and isinstance(ours, bool) == isinstance(theirs, bool)


@pytest.mark.parametrize("yml", sorted(OPENOOD))
def test_defaults_and_grid_are_openood_config_values(yml: str) -> None:
    name, args, sweep = OPENOOD[yml]
    cls = detector_class(name)
    defaults = _defaults(cls)
    assert all(_same(defaults[k], v) for k, v in args.items()), (defaults, args)
    assert {k: list(v) for k, v in cls.grid.items()} == sweep
    assert all(_same(a, b) for k in sweep for a, b in zip(cls.grid[k], sweep[k], strict=True))


def test_adascale_defaults_and_grid_are_openood_config_values() -> None:
    for name in ("adascale_a", "adascale_l"):
        cls = detector_class(name)
        assert {k: _defaults(cls)[k] for k in ADASCALE_ARGS} == ADASCALE_ARGS
        assert [tuple(p) for p in cls.grid["percentile"]] == ADASCALE_PAIRS and list(cls.grid) == ["percentile"]


def test_relative_dimension_defaults_and_grids_at_openood_resnet50() -> None:
    """ViM and residual count dimensions relative to D; at ImageNet's ResNet-50 (D = 2048): vim.yml:5 dim: 256, :7
    dim_list: [256, 1000]; residual.yml:4 dim: 512. Stated deviations (ood/detectors/vim.py): the grid's 1000 is
    D/2 = 1024 and ViM's default the paper's D/2, not the yml's 256."""
    vim, residual = detector_class("vim"), detector_class("residual")
    assert [relative_count(v, 2048) for v in vim.grid["dim"]] == [256, 1024]  # theirs [256, 1000]
    assert relative_count(_defaults(vim)["dim"], 2048) == 1024  # theirs 256
    assert relative_count(_defaults(residual)["dim"], 2048) == 512 and residual.grid == {}


def test_search_order_is_openood_order() -> None:
    """Ties of validation AUROC keep the first point in OpenOOD's order (`sweep_order`): the yml sweep keys' order for
    its recursive generator (first key fastest), and cfood.yml:15-29's explicit list (alpha outer, k fastest)."""
    assert [list(detector_class(n).grid) for n in ("gen", "odin", "iodin", "vra", "nnguide")] == [
        ["gamma", "M"], ["temperature", "noise"], ["temperature", "noise"], ["percentile_high", "percentile_low"],
        ["k", "alpha"]]
    cfood_list = [(a, k) for a in (0.1, 0.5, 1) for k in (0.001, 0.005, 0.01, 0.05)]
    assert [(p["alpha"], p["k"]) for p in sweep_order(detector_class("cfood").grid)] == cfood_list


def test_detectors_openood_runs_untuned_have_one_point_here() -> None:
    """OpenOOD's yml with APS_mode False (dice, nnguide, rankfeat, she, dropout, klm, mds, rmds, msp, mls, gradnorm,
    temp_scaling) run at their defaults: one grid point here too. cfood (APS_mode: false, cfood.yml:3) is tuned here
    over its listed sweep, a deviation its module states."""
    names = ["dice", "nnguide", "rankfeat", "she", "mcdropout", "klm", "mahalanobis", "rmds", "msp", "maxlogit",
             "gradnorm", "tempscale"]
    for name in names:  # the one point is the defaults (a key listing no value would leave no point to score)
        cls = detector_class(name)
        assert sweep_order(cls.grid) == [{k: _defaults(cls)[k] for k in cls.grid}], name
    assert "APS_mode: false" in (cfood_module.__doc__ or "")


#: detectors OpenOOD lacks: (name, reference, our defaults, our grid)
OTHERS = [
    # pytorch-ood detector/mahalanobis.py MahalanobisODIN eps: float = 0.002; grid: deep_Mahalanobis_detector's
    # noise list [0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005] (sorted here)
    ("mahalanobis_odin", {"noise": 0.002}, {"noise": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01]}),
    # pytorch-ood detector/nac.py NACUE m_bins=50, alpha=100.0, o_star=50; no grid
    ("nac", {"bins": 50, "alpha": 100.0, "o_star": 50}, {}),
    # pytorch-ood detector/pnml.py PNML eps=1e-12; no grid
    ("pnml", {"eps": 1e-12}, {}),
    # pytorch-ood detector/cadref.py CADRef logit_score default EnergyBased.score; hyperparameter_space
    # {energy, gen, maxlogit, msp} (another order here)
    ("cadref", {"logit_score": "energy"}, {"logit_score": ["energy", "maxlogit", "msp", "gen"]}),
    # andrijazz/ash config/imagenet_config.yml:15 method: "ash_s@90" (no config runs ash_p: ash's 90, stated); grid
    # OpenOOD's ash.yml:7 percentile_list, as `ash` (stated)
    ("ash_s", {"percentile": 90}, {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    ("ash_p", {"percentile": 90}, {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    # Qinyu-Allen-Zhao/OptFSOOD eval_ood.py:96 -o/--use_ood_score default "vanilla" (detector/ours.py Ours too); no grid
    ("optfs", {"ood_score": "vanilla"}, {}),
    # andrijazz/lts lts.py: def lts(x, percentile=65); no published grid (SCALE's OpenOOD list, stated)
    ("lts", {"percentile": 65}, {"percentile": [65, 70, 75, 80, 85, 90, 95]}),
    # YongHyun-Ahn/LINe demo-imagenet.sh: --p-w 10 --p-a 10 (defaults); demo-cifar.sh 90/90, 90/10 (grid {10, 90}^2);
    # the clip a percentile here (the code's absolute --clip_threshold 0.8 / 1.0; deviation stated in line.py)
    ("line", {"p_w": 10, "p_a": 10, "percentile": 90}, {"p_w": [10, 90], "p_a": [10, 90], "percentile": [80, 85, 90, 95]}),
    # alibaba/easyrobust examples/ood_detection/BATS/test_ood.py run_eval: lam = 3.25 (CIFAR), 1.05 (ImageNet ViT);
    # no published grid: both values and around them (stated in bats.py)
    ("bats", {"lam": 3.25}, {"lam": [0.5, 1, 1.05, 2, 3.25, 5]}),
    # omegafragger/DDU utils/gmm_utils.py gmm_fit(embeddings, labels, num_classes): no hyper-parameter (its jitter is
    # searched over the code's JITTERS list at every fit); no grid
    ("ddu", {}, {}),
    # HengGao12/OTOD otdp_postprocessor.py: self.T = 3; otdp.yml APS_mode: False
    ("otod", {"temperature": 3.0}, {}),
    # wetliu/energy_ood CIFAR/run.sh Odin: T in 1000 100 10 1, noise in 0 .. 0.0048 (defaults ODIN's, stated)
    ("odin_energy_ood", {"temperature": 1000, "noise": 0.0014},
     {"temperature": [1, 10, 100, 1000], "noise": [0, 0.0004, 0.0008, 0.0014, 0.002, 0.0024, 0.0028, 0.0032, 0.0038, 0.0048]}),
]


@pytest.mark.parametrize(("name", "args", "grid"), OTHERS, ids=[o[0] for o in OTHERS])
def test_defaults_and_grid_of_detectors_openood_lacks(name: str, args: dict[str, Any], grid: dict[str, list[Any]]) -> None:
    cls = detector_class(name)
    assert {k: _defaults(cls)[k] for k in args} == args
    assert {k: list(v) for k, v in cls.grid.items()} == grid


def test_every_detector_with_a_grid_or_hyper_parameters_is_audited_here() -> None:
    """A new detector (or a new grid) gets its reference values transcribed here."""
    audited = {v[0] for v in OPENOOD.values()} | {o[0] for o in OTHERS} | {"adascale_a", "adascale_l", "vim", "residual"}
    audited |= {"weiper"}  # tests/test_weiper_reference.py: weiper_kldiv.yml's args and sweep
    audited |= {"neco", "combood", "openmax"}  # test_neco_and_combood_and_openmax_defaults below
    tunable = {n for n in available_detectors() if detector_class(n).grid}
    assert tunable <= audited, sorted(tunable - audited)


def test_neco_and_combood_and_openmax_defaults() -> None:
    """neco: pytorch-ood NECO d=100 at D = 768 (0.13 D; here D/8) and use_max_logit=False (the reference's CNN form),
    hyperparameter_space d in {16, ..., 768} written as fractions of D; combood: the released K = 50, reg = 1;
    openmax: OpenOOD openmax_postprocessor.py:16,18 weibull_alpha = 3, weibull_tail = 20."""
    neco = detector_class("neco")
    assert _defaults(neco)["dim"] == 1 / 8 and _defaults(neco)["use_max_logit"] is False
    assert neco.grid == {"dim": [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2], "use_max_logit": [False, True]}
    assert {k: _defaults(detector_class("combood"))[k] for k in ("k", "reg")} == {"k": 50, "reg": 1.0}
    assert _defaults(detector_class("openmax")) == {"tailsize": 20, "alpha": 3}
