"""`OODEvaluation`: the one evaluation callback behind `ood-train` (after fit) and `ood-eval`.

During `trainer.test` it caches, from one forward pass per split, whatever the method's `eval_outputs` returns
(DDP-exact via `SplitCollector`); at the end of the epoch it builds a `FeatureBank` per split (with the method's
own linear head), hands them to the pure `Evaluator` (method score, every detector, metrics) and passes the
`EvaluationResult` to each configured sink (results file, logger scalars, wandb, run table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer

from ood.data.benchmark import EvalSplit, OODDataModule
from ood.detectors.base import Detector
from ood.errors import ConfigError
from ood.evaluation.evaluator import EvaluationResult, Evaluator
from ood.evaluation.sinks import Sink
from ood.features.bank import FeatureBank
from ood.features.collector import SplitCollector
from ood.methods.base import OODMethod

#: detectors that read float16 feature banks (chunked float64 statistics or logits only); see `feature_dtype`
FLOAT16_DETECTORS = frozenset({"msp", "maxlogit", "energy", "entropy", "tempscale", "gen", "klm", "knn", "mahalanobis",
                               "rmds", "vim"})


class OODEvaluation(Callback):
    """Cache one pass per split, evaluate, hand the result to the sinks.

    Args:
        evaluator: the pure evaluator (detectors, fixed parameters, tuning).
        sinks: named sinks (`ood.evaluation.sinks`), called in order.
        info: run facts copied into every result row (backbone, seed, ...).
        feature_dtype: `float32`, or `float16` to collect, gather and keep the penultimate features in half
            precision (half the memory of every bank at ImageNet scale; detectors in `FLOAT16_DETECTORS` only).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        sinks: Mapping[str, Sink] | Sequence[Sink] = (),
        info: Mapping[str, Any] | None = None,
        feature_dtype: str = "float32",
    ) -> None:
        if feature_dtype not in ("float32", "float16"):
            raise ConfigError(f"evaluation.feature_dtype={feature_dtype!r} is unknown; choices: ['float32', 'float16']")
        unsafe = sorted(set(evaluator.detectors) - FLOAT16_DETECTORS) if feature_dtype == "float16" else []
        if unsafe:
            raise ConfigError(f"evaluation.feature_dtype=float16 supports the detectors {sorted(FLOAT16_DETECTORS)}; not {unsafe}")
        self.feature_dtype = getattr(torch, feature_dtype)
        self.evaluator = evaluator
        self.sinks = list(sinks.values()) if isinstance(sinks, Mapping) else list(sinks)
        self.evaluator.info.update(info or {})
        self.result: EvaluationResult | None = None
        self._collectors: dict[int, SplitCollector] = {}

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The result rows of the last evaluation (empty before one)."""
        return self.result.rows if self.result is not None else []

    # ----- collection ----------------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, OODMethod), "OODEvaluation needs an OODMethod"
        assert isinstance(trainer.datamodule, OODDataModule), "OODEvaluation needs an OODDataModule"
        self._collectors, self.result = {}, None
        pl_module.eval_splits = trainer.datamodule.eval_splits

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx not in self._collectors:
            fields = [k for k in outputs if k != "index"]
            self._collectors[dataloader_idx] = SplitCollector(fields).to(pl_module.device)
        self._collectors[dataloader_idx].update(**{**outputs, "features": outputs["features"].to(self.feature_dtype)})

    def _banks(self, splits: Sequence[EvalSplit], pl_module: OODMethod) -> dict[str, FeatureBank]:
        # banks are float32 whatever the trainer precision (bf16/fp16 autocast outputs would break float64 detectors)
        weight, bias = (t.detach().float() for t in pl_module.linear_head())
        banks = {}
        for i, split in enumerate(splits):
            if i not in self._collectors:
                raise RuntimeError(f"evaluation split {split.name!r} produced no batches")
            # torchmetrics squeezes one-element results to 0-d: restore the per-sample axis
            data = {
                k: v.reshape(-1) if k in ("index", "labels") else v.to(self.feature_dtype) if k == "features"
                else v.float() if v.is_floating_point() else v
                for k, v in self._collectors[i].compute().items()
            }
            labels = data.pop("labels")
            banks[split.name] = FeatureBank(
                logits=data.pop("logits"),
                features=data.pop("features"),
                labels=labels if split.role in ("fit", "id_val", "id_test") else None,
                weight=weight,
                bias=bias,
                index=data.pop("index"),
                extras=data,
            )
        return banks

    # ----- evaluation ----------------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, OODMethod)
        datamodule = trainer.datamodule
        splits = datamodule.eval_splits
        loaders = dict(zip([s.name for s in splits], datamodule.test_dataloader()))
        self.result = self.evaluator.evaluate(
            pl_module,
            self._banks(splits, pl_module),
            splits,
            id_dataset=datamodule.name,
            data_facts={"input_std": datamodule.benchmark.input_std},
            model_scores=lambda det, split: self._model_scores(det, pl_module, loaders[split]),
        )
        for sink in self.sinks:
            sink.write(self.result, trainer, pl_module)

    @staticmethod
    def _model_scores(det: Detector, pl_module: LightningModule, loader: torch.utils.data.DataLoader) -> torch.Tensor:
        """Scores of an input-perturbing detector (an extra pass for it alone, with gradients enabled); the detector
        sees the method's own logits (`pl_module(x)`), e.g. a contrastive method's linear probe."""
        chunks = []
        with torch.inference_mode(False), torch.enable_grad():
            for batch in loader:
                chunks.append(det.score_inputs(pl_module, batch.x.to(pl_module.device)).detach())
        return torch.cat(chunks)
