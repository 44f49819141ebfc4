"""LINe: Ahn, Park & Kim, "LINe: Out-of-Distribution Detection by Leveraging Important Neurons", CVPR 2023 (arXiv
2303.13995; code github.com/YongHyun-Ahn/LINe-Out-of-Distribution-Detection-by-Leveraging-Important-Neurons:
`precompute.py`, `models/route.py` `RouteLUNCH`, `models/resnet.py` / `models/densenet.py` `forward`, scored by
`util/score.py` `get_shap_energy_score`, the `--method taylor` of `ood_eval.py`). ReAct's clip, then a per-class mask
of the important features and a per-class mask of the head's weights, both from Shapley values approximated by the
first-order Taylor score.

Fit, on the ID-train features h (unclipped: `precompute.py` runs `_compute_taylor_scores`, whose `_forward` skips
`forward`'s clip) and labels y: the Taylor score of a row at the pooled features is h_d d f_y / d h_d (the AvgPool's
output times its `grad_output` at the logit of the *label*, one backward per row); for the linear head that is
h_d w_{y,d}, computed here in closed form, and its per-class mean (by label) is
  I_k = mean_{n: y_n = k}(h_n) * w_k  [C, D]  (`shap_matrix_mean`, RouteLUNCH's `contrib`).
  feature mask  m_k = I_k > the p_a-th percentile of the D entries of I_k;
  weight mask   M_k = |I_k|[None, :] * W > the p_w-th percentile of the C x D entries of |I_k|[None, :] * W
                (W signed, as the code: `abs(contrib[k]) * weight`); both `np.percentile`, linear, strict `>`;
  t = the `percentile`-th percentile of every ID-train activation (ReAct's threshold code, `activation.percentile`).
Score of a row h: h' = min(h, t); k = argmax_c (W h' + b)_c (the full head; the code's argmax of its softmax);
  score = LSE((W * M_k)(h' * m_k) + b)  (energy of the masked head's logits plus the unmasked bias).
Grid: the published (p_w, p_a) pairs (`demo-*.sh`: ImageNet 10/10, CIFAR-10 90/90, CIFAR-100 90/10) span {10, 90}
x {10, 90}: the two are separate arguments of the code, tuned as two keys (the cross product adds 10/90); the
default is ImageNet's 10/10. The clip percentile over {80, 85, 90, 95}, default 90. p_w and p_a are score-only
(`score_params`): the fit keeps I and W, and the masks at each (p_w, p_a) are cut from them at the first score and
kept (`cuts_`), so tuning fits 4 times (one per clip percentile), not 16, and scores a fit's four points in one pass
over the rows (`score_grid`: one weight importance per predicted class, one weight mask per p_w).

Deviations from the released code:
- the clip is a percentile of the ID-train activations, not the code's absolute `clip_threshold` (0.8 on ImageNet
  ResNet-50, 1.0 on the CIFAR DenseNets): an absolute value holds for one network only, and ood runs any network.
  ReAct's 90th percentile is about 1.0 on ImageNet ResNet-50 (ReAct's paper), so the grid's 80-95 brackets both
  published values on such networks. No absolute-threshold keyword: a fixed percentile
  (`detectors.params.line.percentile=85`) is the one-network setting, and one keyword overriding another would
  leave the percentile grid searching identical points. Fitted on ID-train, where the masks are fitted (react fits its
  threshold on ID-val, OpenOOD's choice; a detector fits on one split).
- float64 throughout: the code's Taylor scores are float32 products averaged in float64 and its logits float32; the
  masks' percentiles are float64 in both. Equal to rounding.
- memory: the code materialises a [C, C, D] masked weight (8 GB at ImageNet's 1000 x 1000 x 2048) and a [N, C, D]
  product per batch; here the fitted state is I and the fit's W [C, D] each, and per (p_w, p_a) scored the feature
  masks [C, D] and one weight-mask threshold per class, and each predicted class's [C, D] weight mask is rebuilt
  from them (the same float64 product as for its threshold) once per row chunk (`row_chunks`) for the rows
  predicting it. The clip's percentile goes
  through one float32 partition copy of the ID-train activations (`activation.percentile`: 10 GB for ImageNet-1k train, not a 21 GB float64 copy).
  A float16 bank (`float16_features`) is read chunk by chunk in float64 (class means, scores) and partitioned in
  float16 for the clip (5 GB).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ood.detectors.activation import percentile
from ood.detectors.base import PERCENTILE, Detector
from ood.detectors.logits import energy_score, head_logits
from ood.detectors.mahalanobis import class_means, row_chunks
from ood.features.bank import FeatureBank


class LINe(Detector):
    """LSE((W * M_k)(min(h, t) * m_k) + b), k the predicted class, M_k / m_k its important weights / features."""

    name = "line"
    reads_head = True
    per_class = True
    float16_features = True
    ranges = {"p_w": PERCENTILE, "p_a": PERCENTILE, "percentile": PERCENTILE}
    grid = {"p_w": [10, 90], "p_a": [10, 90], "percentile": [80, 85, 90, 95]}
    score_params = frozenset({"p_w", "p_a"})

    def __init__(self, p_w: float = 10, p_a: float = 10, percentile: float = 90) -> None:
        self.p_w = p_w
        self.p_a = p_a
        self.percentile = percentile

    def fit(self, bank: FeatureBank) -> LINe:
        self.weight_ = bank.head()[0].double()
        self.contrib_ = class_means(bank.features, bank.labels, self.weight_.shape[0]) * self.weight_  # I_k: class k's mean h_d w_{k,d}
        self.threshold_ = percentile(bank.features, self.percentile)
        self.cuts_: dict[tuple[str, float], torch.Tensor | list[float]] = {}
        return self

    def _cuts(self) -> tuple[torch.Tensor, list[float]]:
        """The feature masks m_k [C, D] at p_a and the weight-mask thresholds at p_w, one per class, from the fit's
        I and W; each computed once per value (`cuts_`): tuning scores every (p_w, p_a) from one fit per clip."""
        key_a, key_w = ("p_a", self.p_a), ("p_w", self.p_w)
        if key_a not in self.cuts_:
            cuts = torch.tensor([percentile(row, self.p_a) for row in self.contrib_], dtype=torch.float64)
            self.cuts_[key_a] = self.contrib_ > cuts.to(self.contrib_.device)[:, None]
        if key_w not in self.cuts_:
            self.cuts_[key_w] = [percentile(self._weight_importance(k, self.weight_), self.p_w) for k in range(len(self.contrib_))]
        return self.cuts_[key_a], self.cuts_[key_w]

    def _weight_importance(self, k: int, w: torch.Tensor) -> torch.Tensor:
        """[C, D] |I_k| * W, the importance of each weight for predicted class k (masked against its percentile)."""
        return self.contrib_[k].abs().to(w.device)[None, :] * w

    def score(self, bank: FeatureBank) -> torch.Tensor:
        return self._scores(bank, [{}])[0]

    def score_grid(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor | None]:
        """Every point in one pass over the rows: the clip and the predicted classes are shared, and each predicted
        class's weight importance once, its weight mask once per p_w (serving each p_a with it), where scoring point
        by point rebuilt both per point (C x D each, a thousand per row chunk at ImageNet scale)."""
        return list(self._scores(bank, points))

    def _scores(self, bank: FeatureBank, points: Sequence[dict[str, Any]]) -> list[torch.Tensor]:
        """Scores at each point (score-only settings, the last one left set)."""
        w = bank.head()[0].double()
        settings = []
        for point in points:
            feature_mask, weight_cut = self.set_params(**point)._cuts()
            settings.append((self.p_w, feature_mask.to(w.device), weight_cut))
        out: list[list[torch.Tensor]] = [[] for _ in points]
        for rows in row_chunks(len(bank)):
            h = bank.features[rows].double().clamp(max=self.threshold_)
            predicted = head_logits(h, bank).argmax(1)
            scores = torch.empty(len(points), len(h), dtype=torch.float64, device=h.device)
            for k in predicted.unique().tolist():
                sel = predicted == k
                importance = self._weight_importance(k, w)
                masked: dict[float, torch.Tensor] = {}
                for i, (p_w, feature_mask, weight_cut) in enumerate(settings):
                    if p_w not in masked:
                        masked[p_w] = torch.where(importance > weight_cut[k], w, 0.0)
                    scores[i, sel] = energy_score(head_logits(h[sel] * feature_mask[k], bank, weight=masked[p_w]))
            for i in range(len(points)):
                out[i].append(scores[i])
        return [torch.cat(chunks) for chunks in out]
