"""hrbatch pipelines: one module per HR batch operation, plus the CLI."""
