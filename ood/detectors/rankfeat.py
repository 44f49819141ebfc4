"""RankFeat, Song, Sebe & Wang, "RankFeat: Rank-1 Feature Removal for Out-of-distribution Detection", NeurIPS 2022
(arXiv 2209.08590), as OpenOOD's `rankfeat` postprocessor (`openood/postprocessors/rankfeat_postprocessor.py`,
`configs/postprocessors/rankfeat.yml`: exact SVD, temperature 1).

For a stage output Z [C, HW], Z' = Z - s_1 u_1 v_1^T (its largest singular component removed, per sample).
logits_4 = fc(pool(Z'_last)), logits_3 = fc(pool(last_stage(Z'_second_last))), the two last stages of the
backbone (OpenOOD: ResNet blocks 4 and 3);
score(x) = T logsumexp(((logits_3 + logits_4) / 2) / T).
It needs the network (the last stage re-runs on the rank-reduced map: `forward_from`), so it is a `needs_model`
detector: one pass to the last two stage outputs plus one pass through the last stage per batch (no gradient).
Deviations: SVD in float64 (OpenOOD float32); a backbone with fewer than two stages raises
`DetectorNotApplicable`.
"""

from __future__ import annotations

import torch
from torch import nn

from ood.detectors.base import POSITIVE, Detector, DetectorNotApplicable, SharedPasses
from ood.detectors.logits import energy_score
from ood.detectors.network import backbone_of, channels_first
from ood.features.bank import FeatureBank


def remove_rank1(z: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> the same with each sample's largest singular component of its [C, HW] matrix removed."""
    flat = z.flatten(2).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return (flat - s[:, :1, None] * u[:, :, :1] @ vh[:, :1, :]).to(z.dtype).view_as(z)


def remove_stage_rank1(backbone: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """`remove_rank1` of a stage output in the backbone's own layout (a ViT's tokens [B, T, D] as the [D, T] matrix,
    NHWC maps as [C, HW]), returned in that layout for the stages after it."""
    return remove_rank1(channels_first(backbone, z).contiguous()).movedim(1, backbone.channel_dim(z))


class RankFeat(Detector):
    """Energy of the mean logits after removing the rank-1 component of the last two stage outputs."""

    name = "rankfeat"
    ranges = {"temperature": POSITIVE}
    needs_model = True

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def score(self, bank: FeatureBank) -> torch.Tensor:
        raise NotImplementedError("rankfeat re-runs the last stage: score it with score_inputs(model, x)")

    def score_inputs(self, model: nn.Module, x: torch.Tensor, shared: SharedPasses | None = None) -> torch.Tensor:
        backbone = backbone_of(model)
        names = list(backbone.layer_names)
        if len(names) < 2:
            raise DetectorNotApplicable(f"it needs two stages; {type(backbone).__name__} has {names}")
        with torch.no_grad():
            maps = backbone.run(x, names[-2:]).layers
            logits_last = backbone.fc(backbone.forward_from(names[-1], remove_stage_rank1(backbone, maps[names[-1]])))  # the pool
            logits_before = backbone.fc(backbone.forward_from(names[-2], remove_stage_rank1(backbone, maps[names[-2]])))
        logits = (logits_last.double() + logits_before.double()) / 2
        return energy_score(logits, self.temperature)
