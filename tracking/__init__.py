"""Tracking: MLflow runs, registered models and the pyfunc wrapper around slimforge artifacts."""

import os

# Per-file download progress bars would bury slimforge's own progress output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
