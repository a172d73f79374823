"""The cluster layer: the pipeline (or any command) submitted as a Ray job."""
