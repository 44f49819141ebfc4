"""CombOOD, Rajasekaran et al., "COMBOOD: A Semiparametric Approach for Detecting Out-of-distribution Data for Image
Classification", SDM 2024 (doi 10.1137/1.9781611978032.74), after the authors' released code (rmagesh148/combood:
`test_ood.py`'s active path `square_log_probability`, `confidenciator.py`'s `Confidenciator`):

  score(x) = -sqrt(D) * log d_K(h)^2 - M(e)^2

- d_K(h)^2: squared L2 distance from h_hat = h / ||h|| (h the penultimate feature, D its dimension) to its K-th
  nearest L2-normalised ID-train feature (K = 50, faiss `IndexFlatL2`, as `fit_knn_faiss` / `predict_knn_faiss`).
- M(e)^2 = z^T (S + reg I)^-1 z with z = YJ(SS(e)): SS a StandardScaler and YJ a Yeo-Johnson PowerTransformer
  (sklearn defaults, standardising), both fitted on the ID-train rows; S the covariance (ddof 1) of the transformed
  train rows; reg = 1; the centre is 0 (the released `self.mean = np.zeros(...)`), the train mean after YJ.
- e (`features`): `extreme` (default; the released run, `FeatureTester(..., extreme=True)`, X-OOD's features): the
  max and -min over each sample of the *input* of every nn.ReLU / GELU / LeakyReLU call of the network, plus its max
  and -min logit (36 values on a CIFAR ResNet-18: the stem and two per basic block, 17 calls). They are tapped in the
  evaluation's one cached pass (`InputTap`, a forward pre-hook, so an in-place ReLU has not overwritten its input).
  `extreme_as_released`: what the authors' hook kept (`FeatureExtractor.save_features_hook`, a forward hook writing
  `MinMax(input_[0])` into one dict entry per module): per activation module, its last call's input as the call
  left it (an in-place module's output), plus the logits' max and -min. The same as `extreme` on a network with
  one non-in-place module per call (their CIFAR run); on torchvision's ResNets (OpenOOD's ImageNet networks) it
  is their ImageNet run's features (see below), read by a forward hook (`AFTER_PREFIX` taps) on every module.
  `penultimate`: the released code's other branch (`add_prediction_and_penultimate_features_dl_to_mahala`), e = h_hat.
- Fitted on the ID train split only; nothing is tuned (the released code has no sweep). Min-max rescaling of the
  scores before the metrics (`taylor_table`) is monotone and left out.

Deviations, and why:
- `extreme` (the default) makes every call of an activation module a feature. The authors' forward hook keeps one
  entry per module, read after the call. Their CIFAR ResNet-18 has one ReLU module per call, not in place, where
  that is each call's input: `extreme` records each call's input, the same 36 features. Their ImageNet-1K run used
  OpenOOD's torchvision ResNet-50 as it is: the stem's and each Bottleneck's one in-place ReLU (called three times),
  so their hook kept 17 entries, each the last call's input read after the in-place ReLU had overwritten it: the
  max of the stem's or block's output, and -min = 0 (a constant column unless every value of a sample is
  positive): 36 columns, 17 constant. OpenOOD's ResNet18_224x224 (ImageNet-200; torchvision's, one in-place ReLU
  per basic block, called twice) gives 9 entries: 20 columns, 9 constant. Their pipeline drops none: the
  StandardScaler maps a constant column to 0 (a zero variance gets scale 1), the Yeo-Johnson transform keeps 0 at 0
  whatever its lambda, and the covariance, singular there, is inverted with the +I; a scored row whose column is
  not 0 (every value of the map positive) adds its transformed value squared. `extreme` reads the 49 calls'
  pre-activations there (100 columns): the CIFAR run's features on that network; `extreme_as_released` reruns the
  released ImageNet features (`experiment=parity_imagenet1k` / `parity_imagenet200` use it).
  Functional activations (`F.relu`, not modules) are not seen: a network with none as modules cannot use
  `extreme` (the run says so; `features=penultimate` runs), and one with some gets only those (our WRN-40-2 calls
  a module per ReLU, as OpenOOD's). timm's own GELU module (its ConvNeXt's) counts as GELU. The taps need modules,
  not stages: a network wrapped as a whole (`ModuleBackbone`, any model given to `ood.evaluate`) is tapped too, and
  `ood.extract(..., taps="combood")` caches the same taps.
- A zero K-th distance (a query equal to K train features) is clamped to the smallest positive float64, a finite
  maximal score; the released `np.log(..., where=d > 0)` without `out` leaves such entries uninitialised.
- `evaluation.feature_dtype=float16` runs: the penultimate features are upcast before any arithmetic (float32 for
  the kNN term, float64 for `penultimate`'s transforms), the taps and logits are kept in float32; the scores move
  by float16's rounding of the features (tests/test_combood.py bounds it).
- float64 for the scaler, the power transform and the precision (the released code fits them on float32 columns;
  the added 1e-10 of its `normalizer` shifts every coordinate alike and changes neither term). With `penultimate`
  the fit holds the train features as float64 arrays, a few at once (sklearn's transforms copy): 0.2 GB each for
  CIFAR's 50 k x 512, 21 GB each for ImageNet-1K's 1.28 M x 2048, where it needs a large host; `extreme` holds 2
  values per activation call and 2 logits per row (ResNet-18: 36; torchvision's ResNet-50, 49 ReLU calls: 100), and
  the pass taps every activation call twice (before and after it), 2 more values each, whichever `features` runs,
  so that a bank serves both (a bank without the after-call taps, from an older ood, refuses `extreme_as_released`).
"""

from __future__ import annotations

import math
import sys
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ood.detectors.base import COUNT, NON_NEGATIVE, Detector, DetectorNotApplicable
from ood.detectors.knn import normalised_distances
from ood.detectors.mahalanobis import row_chunks
from ood.detectors.network import InputTap, tapped_keys
from ood.errors import ConfigError
from ood.features.bank import FeatureBank
from ood.neighbors import IndexKind, KNNIndex
from ood.utils import get_logger

log = get_logger(__name__)

#: extras keys of the tapped activation inputs' extremes, read before each call
PREFIX = "combood:"
#: extras keys of an activation module's input extremes as each call left it (an in-place one's output): the authors' hook
AFTER_PREFIX = "combood_after:"
#: the activation modules whose inputs the released code reads (`supported_activations`)
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.LeakyReLU)


def activation_types() -> tuple[type[nn.Module], ...]:
    """`ACTIVATIONS`, and timm's own GELU module (timm's ConvNeXt, not an `nn.GELU`) once timm is loaded."""
    timm_activations = sys.modules.get("timm.layers.activations")
    return ACTIVATIONS + ((timm_activations.GELU,) if timm_activations is not None else ())


#: the Mahalanobis term's features: the activation extremes of every call (`extreme`) or as the authors' hook kept
#: them (`extreme_as_released`), or the released code's other branch's penultimate ones
FEATURES = ("extreme", "extreme_as_released", "penultimate")


def extremes(z: torch.Tensor) -> torch.Tensor:
    """[B, 2]: each sample's max and -min (the released `MinMax`), reduced in place (no flattened copy of a
    channels_last map)."""
    dims = tuple(range(1, z.dim()))
    return torch.stack([z.amax(dims), -z.amin(dims)], 1)


def last_calls(extras: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{module name: [N, 2] extremes of its last call} from the taps under `prefix` (`LayerTaps` stores a module's
    runs stacked [N, runs, 2], or under `<key>#<run>` when their shapes differ)."""
    out: dict[str, torch.Tensor] = {}
    last: dict[str, int] = {}
    for key, value in extras.items():
        if key.startswith(prefix):
            module, _, run = key[len(prefix) :].partition("#")
            if not run and value.dim() == 3:
                value = value[:, -1]
            if int(run or 0) >= last.get(module, 0):
                out[module], last[module] = value, int(run or 0)
    return out


def released_columns(extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the authors' forward hook kept, by extras key: one [N, 2] entry per activation module, its last call's
    input read after the call (`AFTER_PREFIX` taps: an in-place module's output, any other's input)."""
    return {f"{AFTER_PREFIX}{m}": v for m, v in last_calls(extras, AFTER_PREFIX).items()}


class CombOOD(Detector):
    """-sqrt(D) log(K-th kNN squared distance) - squared Mahalanobis norm of extreme (or penultimate) features after a
    scaler and a Yeo-Johnson transform."""

    name = "combood"
    ranges = {"k": COUNT, "reg": NON_NEGATIVE}
    #: float16 penultimate features are upcast as knn's (float32 per chunk for the index, float32 to search, float64
    #: for `penultimate`'s transforms); the taps and logits stay float32
    float16_features = True
    #: its taps are activation modules, found in any network (`LayerTaps`): a network wrapped as a whole too
    taps_need_stages: ClassVar[bool] = False

    def __init__(self, k: int = 50, reg: float = 1.0,
                 features: Literal["extreme", "extreme_as_released", "penultimate"] = "extreme",
                 index: IndexKind = "exact") -> None:
        if features not in FEATURES:
            raise ConfigError(f"detector 'combood': features={features!r}; choices: {list(FEATURES)}")
        self.k = k
        self.reg = reg
        self.features = features
        self.index = index

    @classmethod
    def taps(cls, backbone: nn.Module) -> dict[str, InputTap]:
        """The input of every activation module, reduced to its max and -min, before each call (`extreme`) and after
        it (`extreme_as_released`: an in-place module has overwritten it by then)."""
        modules = [(name, m) for name, m in backbone.named_modules() if isinstance(m, activation_types())]
        return {**{f"{PREFIX}{name}": InputTap(m, extremes) for name, m in modules},
                **{f"{AFTER_PREFIX}{name}": InputTap(m, extremes, after_call=True) for name, m in modules}}

    def fitted_taps(self, bank: FeatureBank) -> list[str]:
        """The extras keys of the tapped extremes, in tap order (`extreme_as_released`: each module's last call's);
        `DetectorNotApplicable` when the bank has none."""
        prefix = PREFIX if self.features == "extreme" else AFTER_PREFIX
        keys = tapped_keys(bank, prefix, self.name, missing=(
            f"features={self.features} reads the inputs of the network's activation modules (nn.ReLU / GELU / "
            "LeakyReLU), tapped in an evaluation's pass (ood-eval, ood.evaluate, a training's evaluation) or by "
            "ood.extract(..., taps='combood'), and this bank has none (a network whose activations are other modules, "
            "e.g. SiLU, or functions such as F.relu; or a bank from another pass or an older ood); "
            "features=penultimate needs no taps"))
        return keys if self.features == "extreme" else list(released_columns(bank.extras))

    def tapped_columns(self, bank: FeatureBank) -> dict[str, torch.Tensor]:
        """The bank's activation extremes by extras key: every call's (`extreme`), or each module's last call's as
        the call left it (`extreme_as_released`)."""
        return bank.extras if self.features == "extreme" else released_columns(bank.extras)

    def mahalanobis_input(self, bank: FeatureBank) -> np.ndarray:
        """[N, E] float64: the tapped extremes fitted on (`keys_`, by name) and the max / -min logit (`extreme`,
        `extreme_as_released`), or the L2-normalised penultimate features (`penultimate`, normalised in float32 as
        the kNN index sees them)."""
        if self.features == "penultimate":
            return F.normalize(bank.features.float(), dim=1).double().cpu().numpy()
        tapped = self.tapped_columns(bank)
        missing = [key for key in self.keys_ if key not in tapped]
        if missing:
            raise DetectorNotApplicable(f"this bank lacks {len(missing)} of the {len(self.keys_)} activation taps it "
                                        f"was fitted on ({missing[0]!r} first): score banks of the same network's pass")
        columns = [tapped[key].flatten(1) for key in self.keys_] + [extremes(bank.logits)]
        return torch.cat([c.double().cpu() for c in columns], 1).numpy()

    def fit(self, bank: FeatureBank) -> CombOOD:
        from sklearn.preprocessing import PowerTransformer, StandardScaler

        self.keys_ = [] if self.features == "penultimate" else self.fitted_taps(bank)
        x = self.mahalanobis_input(bank)
        self.index_ = KNNIndex("l2", kind=self.index, device=bank.features.device).add(
            bank.features, lambda h: F.normalize(h, dim=1))
        if self.k > len(bank):
            log.warning("combood: k=%d exceeds the %d train features it searches: it reads the farthest of them; set "
                        "detectors.params.combood.k below %d", self.k, len(bank), len(bank))
        self.scaler_, self.power_ = StandardScaler(), PowerTransformer()
        z = self.power_.fit_transform(self.scaler_.fit_transform(x))  # as the released code, one pass each
        cov = np.atleast_2d(np.cov(z, rowvar=False))
        try:
            self.precision_ = np.linalg.inv(cov + self.reg * np.eye(z.shape[1]))
        except np.linalg.LinAlgError:
            raise DetectorNotApplicable(f"reg={self.reg:g} leaves the transformed features' covariance singular (a "
                                        "constant feature); raise reg") from None
        return self

    def mahalanobis_sq(self, bank: FeatureBank) -> torch.Tensor:
        """[N] z^T (S + reg I)^-1 z of the transformed features, float64, in row chunks."""
        x = self.mahalanobis_input(bank)
        out = [np.zeros(0)]  # an empty bank scores empty (sklearn refuses transforming no rows)
        for rows in row_chunks(len(x)) if len(x) else []:
            z = self.power_.transform(self.scaler_.transform(x[rows]))
            out.append(((z @ self.precision_) * z).sum(1))
        return torch.from_numpy(np.concatenate(out)).to(bank.features.device)

    def knn_sq_distance(self, bank: FeatureBank) -> torch.Tensor:
        """[N] squared distance to the K-th nearest normalised train feature (K clipped to the bank), float64."""
        return normalised_distances(self.index_, bank.features, min(self.k, self.index_.ntotal))[:, -1].double()

    def score(self, bank: FeatureBank) -> torch.Tensor:
        d2 = self.knn_sq_distance(bank).clamp_min(torch.finfo(torch.float64).tiny)
        return -math.sqrt(bank.features.shape[1]) * torch.log(d2) - self.mahalanobis_sq(bank)
