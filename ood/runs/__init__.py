"""Run plumbing, one concern per module: `checkpoints` (atomic checkpoints, RNG state, `ckpt_path=` lookup),
`identity` (the run's configuration without the seed, `identity.json`, the wandb group), `loggers`, `failures`
(`FAILED.txt`), `checks` (refusals before a run starts), `console` (progress bars and quiet logs) and `sweeps` (the
sweep objective)."""
