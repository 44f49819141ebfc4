"""BATS: Zhu, Chen, Xie, Li, Zhang, Xue, Tian, Zheng & Chen, "Boosting Out-of-distribution Detection with Typical
Features", NeurIPS 2022 (arXiv 2210.04200; code github.com/alibaba/easyrobust, examples/ood_detection/BATS/,
`test_ood.py` `iterate_data_energy` with `--bats 1`, run by `test.sh`). Each penultimate activation is rectified into
its "typical set" [mu_d - lam sigma_d, mu_d + lam sigma_d] before an OOD score; here the energy form, the code's
default `--score Energy` at its default `--temperature_energy 1`:
  h'_d = max(min(h_d, mu_d + lam sigma_d), mu_d - lam sigma_d)   (the code's two `torch.where`, upper bound first),
  score = LSE(W h' + b)                                            (`forward_head`, the final linear layer).
Where: the pooled penultimate vector, as the code (`forward_features`: ResNet-18's average-pooled, flattened layer4
output in `cifar_resnet.py`; for timm's ViT-B/16, `forward_features` is the class token or, in later timm versions,
every token, `forward_head` then pooling them: the files do not pin the version), so it scores from the cached
features.

mu and sigma: the code loads them from files, with no script that makes them. `cifar_features_mean.pt` and
`cifar_features_std.pt` are 512-d `torch.nn.Parameter`s (requires_grad), the "mean" negative in every dimension
(-0.371 to -0.012), the "std" 0.024 to 0.766: not statistics of the pooled vector, which follows a ReLU and is never
negative, but a BN layer's beta and gamma (the paper's BN-based estimate of the typical set, a BN output being roughly
N(beta, gamma^2) per channel), applied by the code to the pooled vector after the last block's residual sum, ReLU
and pooling, which is not that BN's output. `vit_features_mean.pt` / `vit_features_std.pt` are plain 768-d tensors
(means of both signs, stds 0.64 to 11.2), consistent with statistics of the features (a ViT has no BN); the files do
not say how they were computed. A bank holds no BN parameters, and many backbones have none, so here mu and sigma are
the per-dimension mean and standard deviation of the ID-train pooled features (fit): the statistics of the vector
that is clipped, for every backbone. Deviation for BN networks, where the code's CIFAR form clips at beta +- lam gamma:
there the code's lam and ours bound different spreads. sigma is the sample standard deviation (n - 1, torch's
default `Tensor.std`): the files cannot tell which, and at train-set sizes the two differ by a factor 1 + O(1/n).

lam (`lam`): the code's `lam = 3.25` for CIFAR (ResNet-18, `run_eval`) is the default; it uses 1.05 for ImageNet
(ViT). Grid [0.5, 1, 1.05, 2, 3.25, 5]: both published values and around them, tuned on ID-val vs val-OOD (the
published values bound BN's gamma or the ViT statistics, not necessarily the spread of another network's pooled
features). lam is score-only: one fit serves the grid.

Deviations from the released code, besides the statistics above: float64 clipping and logits (the code's are
float32; equal to rounding); its MSP, ODIN and GradNorm forms of the rectified features are not offered (`msp`,
`odin`, `gradnorm` score the unrectified network). Memory: the statistics go through the train bank `CHUNK` rows at a
time in float64 (a mean pass, then a pass of squared deviations), the scores chunk by chunk, never a float64 copy of
a bank; float16 banks are widened chunk by chunk. A fit bank of one row (its sample std NaN, every score NaN) is
refused in one line (`DetectorNotApplicable`: the run skips bats, saying why).
"""

from __future__ import annotations

import torch

from ood.detectors.base import POSITIVE, Detector, DetectorNotApplicable
from ood.detectors.logits import energy_score, head_logits
from ood.detectors.mahalanobis import feature_mean, row_chunks
from ood.features.bank import FeatureBank


def feature_mean_std(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and sample standard deviation (n - 1) of `features` [N, D], float64, two passes of
    `CHUNK`-row float64 chunks (no float64 copy of the whole bank)."""
    mean = feature_mean(features)
    var = sum((features[rows].double() - mean).square().sum(0) for rows in row_chunks(len(features))) / (len(features) - 1)
    return mean, var.sqrt()


class BATS(Detector):
    """LSE(W h' + b), h' = h clipped per dimension to the ID-train mean +- lam standard deviations."""

    name = "bats"
    reads_head = True
    float16_features = True
    ranges = {"lam": POSITIVE}
    grid = {"lam": [0.5, 1, 1.05, 2, 3.25, 5]}
    score_params = frozenset({"lam"})

    def __init__(self, lam: float = 3.25) -> None:
        self.lam = lam

    def fit(self, bank: FeatureBank) -> BATS:
        if len(bank) < 2:
            raise DetectorNotApplicable(f"bats fits a sample standard deviation per feature, and its fit bank has {len(bank)} row(s): "
                                        "give it at least two")
        self.mean_, self.std_ = feature_mean_std(bank.features)
        return self

    def score(self, bank: FeatureBank) -> torch.Tensor:
        mean, spread = self.mean_.to(bank.features.device), self.lam * self.std_.to(bank.features.device)
        low, high = mean - spread, mean + spread
        clipped = (bank.features[rows].double().minimum(high).maximum(low) for rows in row_chunks(len(bank)))
        return torch.cat([energy_score(head_logits(h, bank)) for h in clipped])
