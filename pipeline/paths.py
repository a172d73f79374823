"""Where each stage reads and writes, relative to the project root (the working directory).

These are the paths `dvc.yaml` declares; stages talk to each other only through them.
"""

from pathlib import Path

CORPUS_DIR = Path("corpus")  # a dependency of prepare: DVC hashes a local corpus kept here
PREPARED_DIR = Path("data/prepared")
PREPARE_STATS = Path("reports/prepare_stats.json")
PREPARE_METRICS = Path("reports/prepare_metrics.json")
PROCESSED_DIR = Path("data/processed")
MODELS_DIR = Path("models")
REPORTS_DIR = Path("reports")
BEST_PARAMS = REPORTS_DIR / "best_params.json"
TUNE_TRIALS = REPORTS_DIR / "tune_trials.csv"
TRAIN_HISTORY = REPORTS_DIR / "train_history.csv"
TRAIN_RUN = REPORTS_DIR / "train_run.json"
TRAIN_METRICS = REPORTS_DIR / "train_metrics.json"
METRICS = REPORTS_DIR / "metrics.json"
SAMPLES = REPORTS_DIR / "samples.jsonl"
REGISTRY_REPORT = REPORTS_DIR / "registry.json"
DVC_LOCK = Path("dvc.lock")
