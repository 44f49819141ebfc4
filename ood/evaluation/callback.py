"""`OODEvaluation`: the one evaluation callback behind `ood-train` (after fit) and `ood-eval`.

During `trainer.test` it caches, from one forward pass per split, whatever the method's `eval_outputs` returns
(DDP-exact via `SplitCollector`); at the end of the epoch it builds a `FeatureBank` per split, lets the method
fit its own score, fits/tunes every configured detector from the cache, computes the metrics, logs slash-named
scalars (`test/<detector>/<ood_set>/auroc`, `test/<detector>/near/auroc`, `test/id/acc`) and writes
`results.jsonl` and `scores.npz` into `output_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer

from ood.data.benchmark import EvalSplit, OODDataModule
from ood.detectors.base import Detector, detector_class
from ood.evaluation.scoring import METRICS, Scorer, detector_scorers, evaluate, group_means, with_data_facts
from ood.features.bank import FeatureBank
from ood.features.collector import SplitCollector
from ood.methods.base import OODMethod
from ood.utils import get_logger

log = get_logger(__name__)


class OODEvaluation(Callback):
    """Cache one pass per split, score with the method and every detector, write results.

    Args:
        detectors: detector names (see `ood.detectors.available_detectors()`).
        params: fixed hyper-parameters per detector name (never tuned).
        tune: choose the remaining hyper-parameters on ID-val vs validation OOD from each detector's grid.
        output_dir: where `results.jsonl` and `scores.npz` go (None: nothing written).
        info: fields copied into every result row (method, backbone, id_dataset, seed, method_params, ...).
        save_scores: also write the per-sample scores of every scorer as `scores.npz`.
    """

    def __init__(
        self,
        detectors: Sequence[str] = ("msp", "maxlogit", "energy", "mahalanobis", "knn"),
        params: Mapping[str, Mapping[str, Any]] | None = None,
        tune: bool = True,
        output_dir: str | None = None,
        info: Mapping[str, Any] | None = None,
        save_scores: bool = True,
    ) -> None:
        self.detectors = list(detectors)
        for name in self.detectors:
            detector_class(name)  # unknown names fail now, listing the choices, not after training
        self.params = {k: dict(v) for k, v in (params or {}).items()}
        self.tune = tune
        self.output_dir = Path(output_dir) if output_dir else None
        self.info = dict(info or {})
        self.save_scores = save_scores
        self.rows: list[dict[str, Any]] = []
        self._collectors: dict[int, SplitCollector] = {}

    # ----- collection ----------------------------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collectors = {}
        self.rows = []
        assert isinstance(pl_module, OODMethod), "OODEvaluation needs an OODMethod"
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
        self._collectors[dataloader_idx].update(**outputs)

    def _banks(self, splits: Sequence[EvalSplit], pl_module: OODMethod) -> dict[str, FeatureBank]:
        # banks are float32 whatever the trainer precision (bf16/fp16 autocast outputs would break float64 detectors)
        weight, bias = (t.detach().float() for t in pl_module.linear_head())
        banks = {}
        for i, split in enumerate(splits):
            if i not in self._collectors:
                raise RuntimeError(f"evaluation split {split.name!r} produced no batches")
            # torchmetrics squeezes one-element results to 0-d: restore the per-sample axis
            data = {
                k: v.reshape(-1) if k in ("index", "labels") else v.float() if v.is_floating_point() else v
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

    # ----- scoring -------------------------------------------------------------------------------------------
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert isinstance(pl_module, OODMethod), "OODEvaluation needs an OODMethod"
        datamodule = trainer.datamodule
        assert isinstance(datamodule, OODDataModule), "OODEvaluation needs an OODDataModule"
        splits = datamodule.eval_splits
        banks = self._banks(splits, pl_module)
        pl_module.setup_ood(banks)
        test_bank = banks["test"]
        assert test_bank.labels is not None
        id_acc = float((pl_module.predict(test_bank) == test_bank.labels).double().mean())
        scorers: list[Scorer] = []
        if type(pl_module).ood_score is not OODMethod.ood_score:
            scorers.append(Scorer(pl_module.name, lambda split: pl_module.ood_score(banks[split])))
        loaders = dict(zip([s.name for s in splits], datamodule.test_dataloader()))
        params = with_data_facts(self.detectors, self.params, {"input_std": datamodule.benchmark.input_std})
        scorers += detector_scorers(
            self.detectors, params, banks, self.tune, lambda det, split: self._model_scores(det, pl_module, loaders[split])
        )
        info = {
            "method": pl_module.name,
            "id_dataset": datamodule.name,
            **self.info,
            "method_params": _plain(dict(pl_module.hparams)),
        }
        self.rows, scores = evaluate(scorers, splits, id_acc, info)
        self._log(trainer, id_acc)
        if trainer.is_global_zero:
            self._log_wandb(trainer, scores)
        if trainer.is_global_zero and self.output_dir is not None:
            self._write(scores)

    @staticmethod
    def _model_scores(det: Detector, pl_module: LightningModule, loader: torch.utils.data.DataLoader) -> torch.Tensor:
        """Scores of an input-perturbing detector (an extra pass for it alone, with gradients enabled); the detector
        sees the method's own logits (`pl_module(x)`), e.g. a contrastive method's linear probe."""
        chunks = []
        with torch.inference_mode(False), torch.enable_grad():
            for batch in loader:
                chunks.append(det.score_inputs(pl_module, batch.x.to(pl_module.device)).detach())
        return torch.cat(chunks)

    def _log(self, trainer: Trainer, id_acc: float) -> None:
        metrics: dict[str, float] = {"test/id/acc": id_acc}
        for row in self.rows:
            for m in METRICS:
                metrics[f"test/{row['detector']}/{row['ood_dataset']}/{m}"] = row[m]
        for (detector, group), means in group_means(self.rows).items():
            for m, value in means.items():
                metrics[f"test/{detector}/{group}/{m}"] = value
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()

    def _log_wandb(self, trainer: Trainer, scores: dict[str, dict[str, torch.Tensor]]) -> None:
        """wandb dashboards: the results as a table, and per detector one score histogram per split with shared
        bin edges (so ID and OOD are comparable)."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            import wandb

            columns = [k for k in self.rows[0] if k not in ("detector_params", "method_params")] if self.rows else []
            payload: dict[str, Any] = {"test/results": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in self.rows])}
            for detector, per_split in scores.items():
                edges = np.histogram_bin_edges(torch.cat(list(per_split.values())).numpy(), bins=64)
                for split, values in per_split.items():
                    payload[f"test/{detector}/{split}/scores"] = wandb.Histogram(np_histogram=np.histogram(values.numpy(), bins=edges))
            logger.experiment.log(payload)

    def _write(self, scores: dict[str, dict[str, torch.Tensor]]) -> None:
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "results.jsonl"
        with path.open("w") as f:
            for row in self.rows:
                f.write(json.dumps(row, default=_jsonable) + "\n")
        if self.save_scores:
            flat = {f"{det}/{split}": s.numpy() for det, per_split in scores.items() for split, s in per_split.items()}
            np.savez_compressed(self.output_dir / "scores.npz", **flat)
        log.info("wrote %d result rows to %s", len(self.rows), path)


def _plain(value: Any) -> Any:
    """Hyper-parameters as JSON-friendly builtins (OmegaConf containers and tuples become lists/dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
