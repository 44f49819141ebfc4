"""The evaluation's numerics do not depend on the caller's CUDA-only settings that a CPU test run never has."""

from __future__ import annotations

import torch
from fabricate import synthetic_banks

from ood.data.benchmark import EvalSplit
from ood.evaluation.evaluator import Evaluator
from ood.methods import CrossEntropy
from ood.models import SmallCNN


def test_scores_ignore_a_callers_autocast() -> None:
    """`ood.evaluate` called inside a user's `torch.autocast` (a training script's validation block) ran the
    detectors' float32 products in bf16: cfood's, relation's, residual's, ViM's and WeiPer's scores moved by up to
    0.2, cfood's ranking to Spearman 0.98. The CPU's autocast stands in for CUDA's (the same casts of `matmul` / `addmm`)."""
    banks = synthetic_banks()
    splits = [EvalSplit("test", "id_test"), EvalSplit("ood", "ood", "far")]
    evaluator = Evaluator(detectors=["cfood", "relation", "vim"], tune=False)
    method = CrossEntropy(SmallCNN(6), optimizer=torch.optim.SGD)
    want = evaluator.evaluate(method, banks, splits, "synthetic").scores
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = evaluator.evaluate(method, banks, splits, "synthetic").scores
    assert sorted(got) == sorted(want) == ["cfood", "relation", "vim"]
    for name, per_split in want.items():
        for split, scores in per_split.items():
            assert torch.equal(got[name][split], scores), (name, split)
