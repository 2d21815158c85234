"""Tracking: MLflow runs, registered models and the pyfunc wrapper around slimforge artifacts."""
