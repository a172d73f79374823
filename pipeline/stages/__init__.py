"""One module per DVC stage, each a `run(config)` that orchestrates the layers below it."""
