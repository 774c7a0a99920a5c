"""Training one stage: configuration, the trainer, checkpoints and run directories, parallelism, export to a model directory."""
