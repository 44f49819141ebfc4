"""The feature cache below methods and detectors: `FeatureBank` and the DDP-exact collectors (neither imports the
evaluation orchestrator)."""
