"""The training layer: Ray Train (the per-worker loop, its state and checkpoints, the trainer), Ray Tune over
it, and the local-or-cluster Ray runtime with its resource plan. Knows Ray, not MLflow: the stages hand it
the objects that log to MLflow."""
