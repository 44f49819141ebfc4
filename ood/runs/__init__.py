"""Run plumbing, one concern per module: `checkpoints` (atomic checkpoints, RNG state, `ckpt_path=` lookup),
`identity` (the run's configuration without the seed, `identity.json`, the wandb group), `loggers`, `failures`
(`FAILED.txt`), `checks` (refusals before a run starts), `console` (progress bars and quiet logs) and `sweeps` (the
sweep objective)."""

# `ood.evaluation.evaluator` still imports the sweep metric from here; it lives in `ood.metrics` (the pyproject
# import-linter contract lists that import until the evaluator imports `ood.metrics.validation_aurocs` itself)
from ood.metrics import validation_aurocs

__all__ = ["validation_aurocs"]
